"""Unit tests of common/config.py: flag > environment > default, conversions and checks."""

from __future__ import annotations

import argparse

import pytest

from common import config
from common.config import (
    CLIENT_OPTIONS,
    HEAD_OPTIONS,
    PROVIDER_OPTIONS,
    Option,
    parse,
    resolve,
)
from common.errors import ConfigError


def ns(**values) -> argparse.Namespace:
    return argparse.Namespace(**values)


def head(argv=(), env=None) -> argparse.Namespace:
    return parse(HEAD_OPTIONS, list(argv), "dcf-head", "test", env=env or {})


def provider(argv=(), env=None) -> argparse.Namespace:
    return parse(PROVIDER_OPTIONS, list(argv), "dcf-provider", "test", env=env or {})


# ---- precedence ------------------------------------------------------------------------------------
def test_defaults():
    cfg = head()
    assert cfg.registration_port == 5555 and cfg.task_port == 5556 and cfg.result_port == 5557
    assert cfg.http_port == 8080
    assert cfg.heartbeat_interval == 5.0 and isinstance(cfg.heartbeat_interval, float)
    assert cfg.log_level == "INFO"
    assert cfg.log_json is False
    assert cfg.fsync is False
    assert cfg.max_attempts == 5
    assert cfg.amqp_url == ""
    p = provider()
    assert p.device == "auto" and p.threads == 0 and p.delay == 0.0 and p.head == "127.0.0.1"


def test_env_beats_default():
    cfg = head(env={"DCF_REGISTRATION_PORT": "6000", "DCF_HEARTBEAT_INTERVAL": "0.5",
                    "DCF_LOG_LEVEL": "DEBUG", "DCF_FSYNC": "no", "DCF_HOST": "127.0.0.1"})
    assert cfg.registration_port == 6000
    assert cfg.heartbeat_interval == 0.5
    assert cfg.log_level == "DEBUG"
    assert cfg.fsync is False
    assert cfg.host == "127.0.0.1"


def test_flag_beats_env():
    cfg = head(["--registration-port", "7000", "--log-json", "yes"],
               env={"DCF_REGISTRATION_PORT": "6000", "DCF_LOG_JSON": "false"})
    assert cfg.registration_port == 7000
    assert cfg.log_json is True


def test_flag_beats_bad_env():
    # the env value is never read when the flag is given
    cfg = head(["--http-port", "9000"], env={"DCF_HTTP_PORT": "not-a-port"})
    assert cfg.http_port == 9000


def test_resolve_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("DCF_TASK_PORT", "6101")
    cfg = resolve(ns(), HEAD_OPTIONS)
    assert cfg.task_port == 6101


def test_resolve_explicit_env_ignores_os_environ(monkeypatch):
    monkeypatch.setenv("DCF_TASK_PORT", "6101")
    cfg = resolve(ns(), HEAD_OPTIONS, env={})
    assert cfg.task_port == 5556


def test_resolve_with_namespace_values():
    cfg = resolve(ns(result_port="1234", log_level="ERROR"), HEAD_OPTIONS, env={"DCF_RESULT_PORT": "99"})
    assert cfg.result_port == 1234
    assert cfg.log_level == "ERROR"


def test_option_names():
    opt = Option("state_dir", str, "x", "help")
    assert opt.flag == "--state-dir"
    assert opt.env == "DCF_STATE_DIR"


def test_client_options():
    cfg = parse(CLIENT_OPTIONS, [], "dcf", "test", env={"DCF_HEAD_URL": "http://h:1", "DCF_API_TOKEN": "t"})
    assert cfg.head_url == "http://h:1" and cfg.api_token == "t"


# ---- bad values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "5.0", "", "0x10", "1e3"])
def test_bad_int_from_env_names_the_variable(value):
    with pytest.raises(ConfigError) as info:
        head(env={"DCF_REGISTRATION_PORT": value})
    assert "DCF_REGISTRATION_PORT" in info.value.message
    assert "cannot read" in info.value.message
    assert info.value.code == "bad_config"


def test_bad_int_from_flag_names_the_flag():
    with pytest.raises(ConfigError) as info:
        head(["--max-attempts", "many"])
    assert info.value.message.startswith("--max-attempts:")
    assert "'many'" in info.value.message


def test_bad_float():
    with pytest.raises(ConfigError, match="--heartbeat-interval: cannot read 'fast' as float"):
        head(["--heartbeat-interval", "fast"])


@pytest.mark.parametrize("port", ["0", "-1", "65536", "100000"])
def test_port_out_of_range(port):
    with pytest.raises(ConfigError, match=r"--task-port: .* out of range \(1-65535\)"):
        head(["--task-port", port])
    with pytest.raises(ConfigError, match=r"DCF_TASK_PORT: .* out of range \(1-65535\)"):
        head(env={"DCF_TASK_PORT": port})


@pytest.mark.parametrize("port", ["1", "65535", " 80 "])
def test_port_in_range(port):
    assert head(["--http-port", port]).http_port == int(port)


@pytest.mark.parametrize(("name", "value"), [
    ("heartbeat_interval", "0"), ("heartbeat_interval", "-1"), ("heartbeat_interval", "nan"),
    ("ack_timeout", "0"), ("min_deadline", "-5"), ("max_attempts", "0"), ("max_upload_bytes", "0"),
])
def test_positive_checks(name, value):
    env = {"DCF_" + name.upper(): value}
    with pytest.raises(ConfigError, match="DCF_" + name.upper()):
        head(env=env)


@pytest.mark.parametrize("value", ["inf", "1e999"])
def test_infinite_heartbeat_interval_rejected(value):
    with pytest.raises(ConfigError, match="--heartbeat-interval"):
        head(["--heartbeat-interval", value])


def test_provider_non_negative_checks():
    assert provider(env={"DCF_THREADS": "0", "DCF_DELAY": "0"}).threads == 0
    with pytest.raises(ConfigError, match="DCF_THREADS: -1 out of range"):
        provider(env={"DCF_THREADS": "-1"})
    with pytest.raises(ConfigError, match="--delay"):
        provider(["--delay", "-0.5"])


def test_bad_choice_from_env():
    with pytest.raises(ConfigError) as info:
        provider(env={"DCF_DEVICE": "tpu"})
    msg = info.value.message
    assert msg.startswith("DCF_DEVICE:")
    assert "'tpu' is not one of auto, cpu, cuda, mps" in msg


def test_bad_choice_from_env_is_case_sensitive():
    with pytest.raises(ConfigError, match="DCF_LOG_LEVEL"):
        head(env={"DCF_LOG_LEVEL": "debug"})


def test_bad_choice_from_flag_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        provider(["--device", "tpu"])
    assert info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_bad_choice_through_resolve_names_the_flag():
    with pytest.raises(ConfigError, match="--device: 'tpu' is not one of"):
        resolve(ns(device="tpu"), PROVIDER_OPTIONS, env={})


def test_good_choice():
    assert provider(["--device", "cuda"]).device == "cuda"
    assert provider(env={"DCF_DEVICE": "mps"}).device == "mps"


# ---- booleans ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" true ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False), ("", False),
])
def test_boolean_parsing(text, value):
    assert head(env={"DCF_LOG_JSON": text}).log_json is value
    assert head(["--fsync", text]).fsync is value


@pytest.mark.parametrize("text", ["maybe", "2", "y", "t", "enable"])
def test_bad_boolean(text):
    with pytest.raises(ConfigError, match="DCF_FSYNC: cannot read"):
        head(env={"DCF_FSYNC": text})


# ---- misc ----------------------------------------------------------------------------------------
def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        head(["--no-such-flag", "1"])


def test_markdown_table_lists_every_option():
    table = config.markdown_table()
    for opt in (*HEAD_OPTIONS, *PROVIDER_OPTIONS, *CLIENT_OPTIONS):
        assert f"`{opt.flag}`" in table
        assert f"`{opt.env}`" in table
    lines = table.splitlines()
    assert lines[0].startswith("| flag |")
    names = [tuple(c.strip() for c in line.split("|")[1:3]) for line in lines[2:]]
    assert len(names) == len(set(names))  # each (flag, variable) once
    shared = next(line for line in lines if "`--shared-files`" in line)
    assert "dcf-provider, dcf" in shared
