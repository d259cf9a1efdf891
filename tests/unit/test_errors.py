"""Unit tests of common/errors.py: one class per error code, the code-to-class registry, and no
builtin exception escaping the client's, config's and security's public functions."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import config, errors, security
from common.errors import (
    ConfigError,
    DcfError,
    HeadUnreachable,
    HttpError,
    PeerError,
    ProtocolError,
    ValidationError,
    WaitTimeout,
    error_class,
    error_codes,
    error_from_dict,
)
from user_client.arrays import save_npy, wire_array
from user_client.channel import Reply
from user_client.client import Client

#: the codes on the wire and in HTTP bodies: they never change
WIRE_CODES = {
    "error": "DcfError", "bad_config": "ConfigError", "bad_message": "ProtocolError", "bad_version": "VersionMismatch",
    "bad_request": "BadRequest", "method_not_allowed": "MethodNotAllowed", "http_error": "HttpError",
    "invalid": "ValidationError", "too_large": "TooLarge", "wrong_result": "WrongResult",
    "no_space": "NoSpace",
    "not_found": "NotFound", "conflict": "Conflict",
    "unauthorized": "Unauthorized", "unknown_provider": "UnknownProvider", "internal": "InternalError",
    "head_unreachable": "HeadUnreachable", "queue_unavailable": "QueueUnavailable", "standby": "StandbyHead",
    "too_many_jobs": "TooManyJobs", "timeout": "WaitTimeout",
    "task_failed": "TaskError", "bad_device": "DeviceError",
}


def _tree() -> list[type[DcfError]]:
    return [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, DcfError)]


def test_every_code_has_its_class_and_keeps_its_string():
    assert {code: cls.__name__ for code, cls in error_codes().items()} == WIRE_CODES


def test_every_class_of_the_tree_states_a_code_of_its_own():
    for cls in _tree():
        if cls is PeerError:  # the stand-in for codes of a newer peer
            assert "code" not in cls.__dict__ and PeerError not in error_codes().values()
            continue
        assert "code" in cls.__dict__, cls
        assert error_class(cls.code) is cls


def test_subclass_codes_are_unique():
    codes = [cls.code for cls in _tree() if "code" in cls.__dict__]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(("code", "cls"), sorted(error_codes().items()))
def test_round_trip(code, cls):
    sent = cls(f"a {code} happened")
    assert sent.to_dict() == {"code": code, "message": f"a {code} happened"}
    back = error_from_dict(sent.to_dict(), 418)
    assert type(back) is cls and back.code == code and back.message == sent.message
    assert back.http_status == cls.http_status  # a known code keeps its class's status


def test_device_error_is_rebuilt():  # the hand-kept list of old missed it
    assert type(error_from_dict({"code": "bad_device", "message": "no cuda"})) is errors.DeviceError


def test_http_statuses():
    assert errors.InternalError.http_status == 500 and errors.MethodNotAllowed.http_status == 405
    assert errors.UnknownProvider.http_status == 400 and errors.NotFound.http_status == 404


def test_unknown_code_keeps_code_and_status():
    err = error_from_dict({"code": "from_the_future", "message": "m"}, 451)
    assert type(err) is PeerError and isinstance(err, DcfError)
    assert err.code == "from_the_future" and err.http_status == 451 and err.message == "m"
    assert err.to_dict() == {"code": "from_the_future", "message": "m"}
    assert error_from_dict({"code": "other"}).http_status == DcfError.http_status
    assert DcfError.code == "error"  # the instance code did not leak into the class


def test_missing_fields_and_non_objects():
    assert type(error_from_dict({})) is DcfError
    assert error_from_dict({"code": "not_found"}).message == "not_found"
    err = error_from_dict(["not", "an", "object"], 502)
    assert type(err) is HttpError and err.http_status == 502 and "unexpected error reply" in err.message


def test_a_second_class_for_a_code_is_refused():
    with pytest.raises(TypeError, match="'not_found'"):
        type("AnotherNotFound", (DcfError,), {"code": "not_found"})
    assert error_class("not_found") is errors.NotFound


def test_a_subclass_without_a_code_of_its_own_is_not_registered():
    class MyInvalid(ValidationError):
        pass

    assert MyInvalid("x").code == "invalid" and error_class("invalid") is ValidationError


def test_wait_timeout_is_also_a_timeout_error():
    with pytest.raises(TimeoutError) as info:
        raise WaitTimeout("slow")
    assert isinstance(info.value, DcfError) and info.value.message == "slow" and str(info.value) == "slow"
    assert info.value.to_dict() == {"code": "timeout", "message": "slow"}


# ---- no builtin exception escapes ---------------------------------------------------------------------
class FakeChannel:
    """Answers the client's requests with ``handler(method, path)`` (no network)."""

    url = "http://fake-head"

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def move_on(self, failed_url: str) -> None:
        pass

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float | None = None) -> Reply:
        return self.handler(method, path)

    def close(self) -> None:
        pass


def _reply(status: int, body: Any = None, text: str | None = None) -> Reply:
    data = text.encode() if text is not None else json.dumps(body).encode() if body is not None else b""
    return Reply(status, data, "application/json" if text is None else "text/html")


def _client(handler: Any) -> Client:
    c = Client("http://head.invalid:1", shared_files="off", queue_wait=0)
    c.channel = FakeChannel(handler)  # type: ignore[assignment]
    return c


def test_client_wait_timeout_is_a_dcf_error():
    with _client(lambda m, p: _reply(200, {"job_id": "j", "state": "running"})) as c, \
            pytest.raises(WaitTimeout, match="still running"):
        c.wait("j", timeout=0.01, poll=0.01)


def test_client_replies_that_break_the_api():
    with _client(lambda m, p: _reply(502, text="<html>bad gateway</html>")) as c:
        with pytest.raises(HttpError) as info:
            c.nodes()
        assert info.value.http_status == 502 and info.value.code == "http_error"
    with _client(lambda m, p: _reply(200, text="not json")) as c, pytest.raises(ProtocolError):
        c.health()
    with _client(lambda m, p: _reply(200, {"no": "state"})) as c, pytest.raises(ProtocolError):
        c.status("j")
    with _client(lambda m, p: _reply(200, {"a": 1})) as c, pytest.raises(ProtocolError):
        c.jobs()
    missing = {"error": {"code": "not_found", "message": "no job"}}
    with _client(lambda m, p: _reply(404, missing)) as c, pytest.raises(errors.NotFound, match="no job"):
        c.cancel("j")
    with _client(lambda m, p: _reply(200, text="\x93\x01")) as c, pytest.raises(ProtocolError):
        c.submit_many([{"type": "matmul", "inputs": {"a": np.ones((2, 2)), "b": np.ones((2, 2))}}])


def test_client_unreachable_head():
    with Client("http://127.0.0.1:9", shared_files="off") as c, pytest.raises(HeadUnreachable):
        c.health()


def test_client_settings_errors_and_precedence(monkeypatch):
    monkeypatch.setenv("DCF_QUEUE_WAIT", "soon")
    with pytest.raises(ConfigError, match="DCF_QUEUE_WAIT"):
        Client("http://h:1")
    monkeypatch.setenv("DCF_QUEUE_WAIT", "7")
    monkeypatch.setenv("DCF_HEAD_URL", "http://env:2/")
    monkeypatch.delenv("DCF_API_TOKEN", raising=False)
    monkeypatch.delenv("DCF_SHARED_FILES", raising=False)
    with Client() as c:
        assert c.url == "http://env:2" and c.queue_wait == 7.0 and c.settings.shared_files == "auto"
    with Client("http://arg:3", queue_wait=0) as c:
        assert c.url == "http://arg:3" and c.queue_wait == 0.0
    with pytest.raises(ConfigError, match="shared_files: 'sometimes' is not one of auto, off"):
        Client(shared_files="sometimes")
    base = config.client_settings([], env={})
    with Client(settings=base, token="t") as c:
        assert c.url == base.head_url and c.settings.api_token == "t" and c.queue_wait == base.queue_wait


def test_client_input_errors(tmp_path: Path):
    with _client(lambda m, p: _reply(500)) as c:
        with pytest.raises(ValidationError):
            c.upload(wire_array([[1.0, 2.0], [3.0]]))  # ragged
        with pytest.raises(ValidationError, match="not a Dataset"):
            c.submit_train(object())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValidationError, match="cannot write"):
        save_npy(tmp_path / "file" / "out.npy", np.zeros(2))


def test_security_file_errors_are_config_errors(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write CURVE keys"):
        security.generate_head(tmp_path / "file" / "keys")
    with pytest.raises(ConfigError, match="cannot write CURVE keys"):
        security.generate_provider(tmp_path / "file" / "keys", "p")
    security.generate_head(tmp_path / "k")
    with pytest.raises(ConfigError, match="cannot write CURVE keys"):  # no such provider to copy
        security.copy_for_provider(tmp_path / "k", "nobody", tmp_path / "out")


def test_a_hand_typed_job_id_is_sent_as_a_valid_request_target():
    from user_client.channel import target

    assert target("/v1/jobs/a b/cancel") == "/v1/jobs/a%20b/cancel"
    assert target("/v1/jobs/é?wait=2.5") == "/v1/jobs/%C3%A9?wait=2.5"
    assert target("/v1/jobs?state=done&limit=5") == "/v1/jobs?state=done&limit=5"


def test_disk_full_is_recognised_and_named() -> None:
    import errno
    import sqlite3

    from head_node import store

    assert store.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert store.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not store.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert store.is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert store.reserve_bytes(64 << 20) == store.RESERVE_MIN and store.reserve_bytes(1 << 40) == store.RESERVE_MAX
    with pytest.raises(errors.NoSpace, match=store.NO_SPACE) as caught, \
            store.disk_full_is_no_space(Path("/state"), "an upload"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.http_status == 507 and caught.value.code == "no_space"
    with pytest.raises(OSError), store.disk_full_is_no_space(Path("/state"), "an upload"):
        raise OSError(errno.EACCES, "Permission denied")
