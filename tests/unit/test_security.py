"""CURVE keys (common/security.py) and the head's ZAP decisions (head_node/zap.py), without sockets."""

from __future__ import annotations

import shutil
import time
from argparse import Namespace
from pathlib import Path

import pytest
import zmq.utils.z85

from common import security
from common.errors import ConfigError
from head_node import zap


def test_generate_layout_keeps_existing_keys(tmp_path: Path) -> None:
    head_pub, created = security.generate_head(tmp_path)
    assert created and head_pub == tmp_path / "head.key"
    secret, created = security.generate_provider(tmp_path, "gpu-1")
    assert created and secret == tmp_path / "providers" / "gpu-1.key_secret"
    assert (tmp_path / "allowed" / "gpu-1.key").is_file()
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "head.key_secret").stat().st_mode & 0o777) == "0o600"
    assert oct(head_pub.stat().st_mode & 0o777) == "0o644"
    before = secret.read_bytes()
    assert security.generate_provider(tmp_path, "gpu-1") == (secret, False)
    assert security.generate_head(tmp_path) == (head_pub, False)
    assert secret.read_bytes() == before
    (tmp_path / "allowed" / "gpu-1.key").unlink()  # revoked: generating again must not re-allow it
    assert security.generate_provider(tmp_path, "gpu-1") == (secret, False)
    assert not (tmp_path / "allowed" / "gpu-1.key").exists()
    shutil.copyfile(tmp_path / "providers" / "gpu-1.key", tmp_path / "allowed" / "gpu-1.key")
    public, _ = security.load_secret(secret)
    assert security.read_allow_list(tmp_path / "allowed") == {public: "gpu-1"}


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a b", "a/b"])
def test_provider_key_names_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        security.generate_provider(tmp_path, name)


def test_copy_for_provider(tmp_path: Path) -> None:
    security.generate_head(tmp_path / "k")
    security.generate_provider(tmp_path / "k", "p")
    copied = security.copy_for_provider(tmp_path / "k", "p", tmp_path / "out")
    assert sorted(p.name for p in copied) == ["head.key", "p.key", "p.key_secret"]
    keys = security.client_keys(Namespace(curve_secret_key=str(tmp_path / "out" / "p.key_secret"),
                                          curve_server_key=str(tmp_path / "out" / "head.key")))
    assert keys is not None and keys.server_public == security.load_public(tmp_path / "k" / "head.key")


def test_configuration_is_checked(tmp_path: Path) -> None:
    security.generate_head(tmp_path)
    off = Namespace(curve_secret_key="", curve_allow="", curve_server_key="")
    assert security.server_keys(off) is None and security.client_keys(off) is None
    with pytest.raises(ConfigError, match="needs both"):
        security.server_keys(Namespace(curve_secret_key=str(tmp_path / "head.key_secret"), curve_allow=""))
    with pytest.raises(ConfigError, match="not a directory"):
        security.server_keys(Namespace(curve_secret_key=str(tmp_path / "head.key_secret"),
                                       curve_allow=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="holds no secret key"):
        security.server_keys(Namespace(curve_secret_key=str(tmp_path / "head.key"), curve_allow=str(tmp_path)))
    (tmp_path / "bad.key_secret").write_text("metadata\ncurve\n    public-key = \"short\"\n")
    with pytest.raises(ConfigError):
        security.load_secret(tmp_path / "bad.key_secret")
    with pytest.raises(ConfigError, match="needs both"):
        security.client_keys(Namespace(curve_secret_key="", curve_server_key=str(tmp_path / "head.key")))


def _request(public_z85: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", b"dcf", b"10.0.0.9", b"", mechanism, zmq.utils.z85.decode(public_z85)]


def test_zap_answers_from_the_allow_list_and_reloads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zap, "RELOAD_EVERY", 0.0)
    keys = tmp_path / "keys"
    security.generate_provider(keys, "ok")
    security.generate_provider(keys, "late")
    (keys / "allowed" / "late.key").unlink()
    handler = zap.ZapHandler(zmq.Context.instance(), keys / "allowed")
    ok, _ = security.load_secret(keys / "providers" / "ok.key_secret")
    late, _ = security.load_secret(keys / "providers" / "late.key_secret")
    assert handler.answer(_request(ok)) == [b"1.0", b"7", b"200", b"OK", ok, b""]
    reply = handler.answer(_request(late))
    assert reply[2] == b"400" and handler.denied == 1
    time.sleep(0.01)
    shutil.copyfile(keys / "providers" / "late.key", keys / "allowed" / "late.key")
    assert handler.answer(_request(late))[2] == b"200"
    (keys / "allowed" / "ok.key").unlink()  # revoked
    assert handler.answer(_request(ok))[2] == b"400"


def test_zap_refuses_other_mechanisms_and_malformed_requests(tmp_path: Path) -> None:
    security.generate_provider(tmp_path, "ok")
    handler = zap.ZapHandler(zmq.Context.instance(), tmp_path / "allowed")
    assert handler.answer([b"1.0", b"1", b"dcf", b"1.2.3.4", b"", b"NULL"])[2] == b"400"
    assert handler.answer([b"1.0", b"1", b"dcf", b"1.2.3.4", b"", b"CURVE", b"short"])[2] == b"400"
    assert handler.answer([b"2.0", b"1", b"", b"", b"", b""])[2] == b"500"
    assert handler.answer([b"x"])[2] == b"500"
