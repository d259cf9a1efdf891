"""Unit tests of common/config.py: flag > environment > default, conversions and checks, and the
typed, frozen settings built from the option tables (each default stated once, in the table)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence

import pytest

from common import config
from common.config import (
    CLIENT_OPTIONS,
    HEAD_OPTIONS,
    PROVIDER_OPTIONS,
    ClientSettings,
    HeadSettings,
    Option,
    ProviderSettings,
    parse,
    resolve,
)
from common.errors import ConfigError


def ns(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**values)


def head(argv: Sequence[str] = (), env: dict[str, str] | None = None) -> HeadSettings:
    return config.head_settings(list(argv), env=env or {})


def provider(argv: Sequence[str] = (), env: dict[str, str] | None = None) -> ProviderSettings:
    return config.provider_settings(list(argv), env=env or {})


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
    cfg = HeadSettings.from_namespace(ns())
    assert cfg.task_port == 6101
    assert resolve(ns(), HEAD_OPTIONS).task_port == 6101


def test_resolve_explicit_env_ignores_os_environ(monkeypatch):
    monkeypatch.setenv("DCF_TASK_PORT", "6101")
    cfg = HeadSettings.from_namespace(ns(), env={})
    assert cfg.task_port == 5556


def test_resolve_with_namespace_values():
    cfg = HeadSettings.from_namespace(ns(result_port="1234", log_level="ERROR"), env={"DCF_RESULT_PORT": "99"})
    assert cfg.result_port == 1234
    assert cfg.log_level == "ERROR"


def test_option_names():
    opt = Option("state_dir", str, "x", "help")
    assert opt.flag == "--state-dir"
    assert opt.env == "DCF_STATE_DIR"


def test_client_options():
    cfg = config.client_settings([], env={"DCF_HEAD_URL": "http://h:1", "DCF_API_TOKEN": "t"})
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



# ---- typed, frozen settings ------------------------------------------------------------------------
TABLES = [(HeadSettings, HEAD_OPTIONS), (ProviderSettings, PROVIDER_OPTIONS), (ClientSettings, CLIENT_OPTIONS)]


@pytest.mark.parametrize(("cls", "options"), TABLES)
def test_each_default_is_the_option_tables(cls, options):
    built = cls.parse([], env={})
    assert built == cls.defaults()
    for opt in options:
        assert getattr(built, opt.name) == opt.default, opt.name
        assert type(getattr(built, opt.name)) is type(opt.default), opt.name
    # the dataclass states no default of its own: all come from the table
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))


@pytest.mark.parametrize(("cls", "options"), TABLES)
def test_fields_follow_the_table(cls, options):
    hints = typing.get_type_hints(cls)
    assert [f.name for f in dataclasses.fields(cls)] == [o.name for o in options]
    for opt in options:
        assert hints[opt.name] is opt.value_type


def test_a_class_that_does_not_follow_its_table_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Wrong(config.Settings):
        OPTIONS: typing.ClassVar[tuple[Option, ...]] = (Option("port", int, 1, "p"), Option("name", str, "", "n"))
        name: str
        port: int

    with pytest.raises(TypeError, match="do not follow"):
        config._check_fields(Wrong)

    @dataclasses.dataclass(frozen=True)
    class Mistyped(config.Settings):
        OPTIONS: typing.ClassVar[tuple[Option, ...]] = (Option("port", int, 1, "p"),)
        port: float

    with pytest.raises(TypeError, match="Mistyped.port"):
        config._check_fields(Mistyped)


@pytest.mark.parametrize(("cls", "options"), TABLES)
def test_settings_are_frozen(cls, options):
    built = cls.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, options[0].name, options[0].default)


def test_settings_functions_and_types():
    h = config.head_settings([], env={})
    p = config.provider_settings(["--device", "cpu"], env={})
    c = config.client_settings(["--head", "http://h:9"], env={})
    assert isinstance(h, HeadSettings) and isinstance(p, ProviderSettings) and isinstance(c, ClientSettings)
    assert p.device == "cpu" and c.head_url == "http://h:9"
    assert isinstance(resolve(ns(), HEAD_OPTIONS, env={}), HeadSettings)
    assert isinstance(parse(PROVIDER_OPTIONS, [], "x", "y", env={}), ProviderSettings)


def test_settings_precedence_flag_env_default():
    env = {"DCF_HTTP_PORT": "9001", "DCF_ACK_TIMEOUT": "3", "DCF_MIN_DEADLINE": "7.5"}
    h = config.head_settings(["--http-port", "9002"], env=env)
    assert h.http_port == 9002  # flag over env
    assert h.ack_timeout == 3.0 and isinstance(h.ack_timeout, float)  # env over default
    assert h.min_deadline == 7.5
    assert h.max_attempts == config.option(HEAD_OPTIONS, "max_attempts").default  # default


def test_settings_read_os_environ_when_env_is_none(monkeypatch):
    monkeypatch.setenv("DCF_MAX_ATTEMPTS", "9")
    assert config.head_settings([]).max_attempts == 9


def test_head_timing_defaults_are_in_the_settings():
    # head_node/state.py Timing takes these from HeadSettings (same names)
    h = config.head_settings([], env={})
    assert (h.heartbeat_interval, h.ack_timeout, h.min_deadline, h.max_attempts) == (5.0, 10.0, 60.0, 5)
    assert f"{config.MISSED_HEARTBEATS} missed" in config.option(HEAD_OPTIONS, "heartbeat_interval").help


def test_replace_is_checked_too():
    h = config.head_settings([], env={})
    with pytest.raises(ConfigError, match="http_port: 0 out of range"):
        dataclasses.replace(h, http_port=0)
    with pytest.raises(ConfigError, match="log_level: 'LOUD' is not one of"):
        dataclasses.replace(h, log_level="LOUD")
    with pytest.raises(ConfigError, match="max_attempts: '5' is not of type int"):
        dataclasses.replace(h, max_attempts="5")  # type: ignore[arg-type]  # a wrong type on purpose
    with pytest.raises(ConfigError, match="fsync"):
        dataclasses.replace(h, fsync=1)  # type: ignore[arg-type]  # a wrong type on purpose
    assert dataclasses.replace(h, ack_timeout=2).ack_timeout == 2.0  # an int for a float is a float
    assert isinstance(dataclasses.replace(h, ack_timeout=2).ack_timeout, float)


def test_head_ports_must_differ():
    with pytest.raises(ConfigError, match="must all differ"):
        config.head_settings(["--http-port", "5556"], env={})
    with pytest.raises(ConfigError, match="must all differ"):
        config.head_settings([], env={"DCF_RESULT_PORT": "5555"})


def test_from_values_takes_typed_values_and_refuses_unknown_names():
    c = ClientSettings.from_values({"queue_wait": 0, "head_url": None}, env={"DCF_HEAD_URL": "http://e:1"})
    assert c.queue_wait == 0.0 and isinstance(c.queue_wait, float) and c.head_url == "http://e:1"
    assert ClientSettings.from_values({"queue_wait": "2.5"}, env={}).queue_wait == 2.5
    with pytest.raises(ConfigError, match="queue_wait: -1.0 out of range"):
        ClientSettings.from_values({"queue_wait": -1}, env={})
    with pytest.raises(ConfigError, match="queue_wait: inf out of range"):
        ClientSettings.from_values({"queue_wait": float("inf")}, env={})
    with pytest.raises(ConfigError, match="has no option hed_url"):
        ClientSettings.from_values({"hed_url": "x"}, env={})


def test_from_namespace_ignores_other_attributes():
    args = argparse.Namespace(head_url="http://n:2", command="jobs", json=True)
    c = ClientSettings.from_namespace(args, env={})
    assert c.head_url == "http://n:2" and not hasattr(c, "command")


def test_tokens_stay_out_of_the_repr():
    h = config.head_settings(["--api-token", "s3cret"], env={})
    c = config.client_settings(["--token", "s3cret"], env={})
    assert h.api_token == c.api_token == "s3cret"
    assert "s3cret" not in repr(h) and "s3cret" not in repr(c)


def test_option_lookup_and_unknown_tables():
    assert config.option(HEAD_OPTIONS, "http_port").default == 8080
    with pytest.raises(ConfigError, match="no option"):
        config.option(HEAD_OPTIONS, "nope")
    with pytest.raises(ConfigError, match="not the table"):
        resolve(ns(), [Option("x", str, "", "x")], env={})
    assert config.settings_class(list(HEAD_OPTIONS)) is HeadSettings


def test_help_names_the_program(capsys):
    with pytest.raises(SystemExit) as info:
        config.head_settings(["--help"], env={})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dcf-head") and "--heartbeat-interval" in out and "DCF_HEARTBEAT_INTERVAL" in out


# ---- boolean options are flags (issue 11) ------------------------------------------------------------
def test_boolean_options_are_flags():
    cfg = head(["--fsync", "--log-json"])
    assert cfg.fsync is True and cfg.log_json is True
    assert head(["--no-fsync"], env={"DCF_FSYNC": "true"}).fsync is False  # a flag beats the environment
    assert head(["--fsync", "false"]).fsync is False  # an explicit value still works
    assert provider(["--log-json"]).log_json is True
    bools = [opt for opt in (*HEAD_OPTIONS, *PROVIDER_OPTIONS, *CLIENT_OPTIONS) if opt.value_type is bool]
    assert bools
    for opt in bools:
        assert f"`--no-{opt.flag[2:]}`" in config.markdown_table()


def test_head_url_without_a_scheme_is_http():
    assert config.client_settings(["--head", "10.0.0.2:8080"], env={}).head_url == "http://10.0.0.2:8080"
    assert config.client_settings([], env={"DCF_HEAD_URL": "h:1"}).head_url == "http://h:1"
    assert ClientSettings.from_values({"head_url": "https://h"}, env={}).head_url == "https://h"
    for bad in ("ftp://h:1", "http://", "http://h:99999"):
        with pytest.raises(ConfigError, match="--head: .* is not an http:// or https:// URL"):
            config.client_settings(["--head", bad], env={})


def test_reconnect_wait_option():
    assert config.client_settings([], env={}).reconnect_wait == 60.0
    assert config.client_settings(["--reconnect-wait", "0"], env={}).reconnect_wait == 0.0
    with pytest.raises(ConfigError, match="DCF_RECONNECT_WAIT"):
        config.client_settings([], env={"DCF_RECONNECT_WAIT": "-1"})


def test_memory_limit_reads_bytes_with_units_and_refuses_nonsense():
    assert config.byte_size("4GiB") == 4 * 2**30 and config.byte_size("512MB") == 512 * 10**6
    assert config.byte_size("1_000") == 1000 and config.byte_size("1.5g") == 1_500_000_000
    assert config.provider_settings(["--memory-limit", "2kB"], {}).memory_limit == 2000
    assert config.provider_settings([], {"DCF_MEMORY_LIMIT": "1MiB"}).memory_limit == 2**20
    assert config.provider_settings([], {}).memory_limit == 0
    for bad in ("", "GB", "4XB", "-1", "nan"):
        with pytest.raises(ConfigError):
            config.provider_settings(["--memory-limit", bad], {})
