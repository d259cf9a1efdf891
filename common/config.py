"""Configuration by flags and ``DCF_*`` environment variables, validated at start-up.

Each program declares its options once (``HEAD_OPTIONS``, ``PROVIDER_OPTIONS``,
``CLIENT_OPTIONS``): name, converter, default, help, check. The settings each
program runs with are a frozen dataclass (``HeadSettings``, ``ProviderSettings``,
``ClientSettings``) whose fields are checked against its table when this module is
imported: same names, same order, the type of each default; the defaults live only
in the tables. ``head_settings(argv, env)`` (and the provider and client ones) build
the argparse parser from the table, read the environment, convert and check every
value. Precedence: flag, then environment, then default. ``python -m common.config``
prints the table kept in the README.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from .errors import ConfigError

#: heartbeats a provider may miss before the head declares it dead (not an option)
MISSED_HEARTBEATS: Final = 3
#: seconds a registered provider's task connection may stay closed before the head declares it dead (not an
#: option). The head's XPUB reports the unsubscribe of a provider's topic as soon as its last SUB connection
#: ends: the process died (the kernel closes its sockets), the link broke, or ZMTP heartbeats found the peer
#: silent. A provider that only reconnects (libzmq retries after 0.1 s) or reopens its sockets subscribes
#: again well within it, and loses nothing.
DISCONNECT_GRACE: Final = 0.5
#: ZMTP heartbeats (ZMQ_HEARTBEAT_*) on every socket of the head and of a provider close a connection that
#: heard nothing (not even a PONG) for MISSED_HEARTBEATS heartbeat intervals, but never sooner than this
#: many seconds: libzmq counts only whole frames as signs of life, so one large frame crossing a slow link
#: must not look like a dead peer (not an option)
ZMTP_TIMEOUT_MIN: Final = 10.0


def zmtp_heartbeat_ms(heartbeat_interval: float) -> tuple[int, int]:
    """(``ZMQ_HEARTBEAT_IVL``, ``ZMQ_HEARTBEAT_TIMEOUT`` = ``ZMQ_HEARTBEAT_TTL``), in milliseconds, for
    sockets of a cluster whose heartbeat interval is ``heartbeat_interval`` seconds: a connection silent
    for ``timeout = max(MISSED_HEARTBEATS × interval, ZMTP_TIMEOUT_MIN)`` is closed, and a PING goes every
    ``timeout / MISSED_HEARTBEATS`` (so every interval, but not more often than every 3.3 s: the pings
    only free what dead peers hold, and at 500 providers and 1 s they cost the head's I/O thread ~1,500
    a second). (The TTL, sent in each PING, makes the peer close it too; libzmq keeps it in
    deciseconds, ≤ 6553.5 s.)"""
    timeout = min(6_553_500, max(round(MISSED_HEARTBEATS * heartbeat_interval * 1000),
                                 round(ZMTP_TIMEOUT_MIN * 1000)))
    return max(100, timeout // MISSED_HEARTBEATS), timeout


#: the file in a head's state dir holding its API token (created on first start; owner-only)
API_TOKEN_FILE: Final = "api-token"
#: the folder in a head's state dir holding its CURVE keys (``dcf keys generate``'s layout)
KEY_DIR: Final = "keys"
#: the head's job-message signing key in the state dir (security.queue_key)
QUEUE_KEY_FILE: Final = "queue.key"


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_api_token(state_dir: str | os.PathLike[str]) -> str:
    """The API token in ``state_dir``'s token file ("" when there is none, or it cannot be read: the
    head's files are its user's only, so only that user's clients find it)."""
    try:
        with open(os.path.join(state_dir, API_TOKEN_FILE), encoding="ascii") as f:
            return f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        return ""


@dataclass(frozen=True)
class Option:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    check_text: str = ""
    choices: Sequence[str] | None = None
    flag_name: str | None = None  # when the flag is not --name-with-dashes

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "DCF_" + self.name.upper()

    @property
    def value_type(self) -> builtins.type[Any]:
        """The type of this option's values: the type of its default."""
        return type(self.default)


def _port(v: int) -> bool:
    return 0 < v < 65536


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0


def _fraction(v: float) -> bool:
    return math.isfinite(v) and 0 <= v <= 1


def _amqp_urls(v: str) -> bool:
    return all(u.strip().startswith(("amqp://", "amqps://")) for u in v.split(",")) if v else True


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


#: unit suffixes ``byte_size`` reads (case-insensitive), in bytes
BYTE_UNITS: Final = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                     "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """A count of bytes, bare (``1000000``) or with a unit: ``512MB``, ``4GiB``, ``1.5g`` (``BYTE_UNITS``)."""
    low = str(text).strip().lower().replace("_", "")
    number = low.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = low[len(number):].strip()
    if unit not in BYTE_UNITS or not number:
        raise ValueError(f"not a size in bytes: {text!r}")
    value = float(number) * BYTE_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"not a size in bytes: {text!r}")
    return int(value)


def head_url(text: str) -> str:
    """The head's URL as given, with ``http://`` put in front of a bare ``host:port``."""
    text = str(text).strip()
    return text if "://" in text else "http://" + text


def head_urls(text: str) -> str:
    """``head_url`` of each of several comma-separated URLs."""
    return ",".join(head_url(u) for u in str(text).split(",") if u.strip())


def _http_urls(v: str) -> bool:
    return bool(v) and all(_http_url(u) for u in v.split(","))


def _http_url(v: str) -> bool:
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(v)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _queue_name(v: str) -> bool:
    return 0 < len(v) <= 200 and v.isascii() and v.isprintable() and not v.startswith("amq.")


def _port_opt(name: str, default: int, what: str) -> Option:
    return Option(name, int, default, what, _port, "1-65535")


PORT_OPTIONS = [
    _port_opt("registration_port", 5555, "head ROUTER port: registration and heartbeats (REQ-REP)"),
    _port_opt("task_port", 5556, "head XPUB port: subtasks (PUB-SUB)"),
    _port_opt("result_port", 5557, "head PULL port: acknowledgements and results (PUSH-PULL)"),
]

COMMON_OPTIONS = [
    Option("log_level", str, "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("log_json", _bool, False, "write logs as JSON lines"),
    Option("heartbeat_interval", float, 5.0, f"seconds between provider heartbeats; {MISSED_HEARTBEATS} "
           "missed = dead", _positive, "> 0"),
    Option("plugins", str, "", "comma-separated modules to import that register extra task types"),
]

CURVE_SECRET_KEY = Option(
    "curve_secret_key", str, "", "this program's CURVE secret key file (`NAME.key_secret` from `dcf keys "
    "generate` or `dcf keys add-provider`); with it, all ZeroMQ traffic is encrypted and authenticated (empty: "
    "a provider has CURVE off; a head uses the key pair in STATE_DIR/keys, created on its first start, unless "
    "--insecure)")

SHARED_FILES = Option(
    "shared_files", str, "auto", "auto: on the head's machine, exchange arrays as files in the head's state dir "
    "instead of over sockets/HTTP; off: always send them", choices=("auto", "off"))

HEAD_OPTIONS = [
    Option("host", str, "0.0.0.0", "address the head binds its ZeroMQ and HTTP ports to"),
    Option("state_dir", str, "./dcf-state", "directory of the job store, operands and results"),
    Option("amqp_url", str, "", "RabbitMQ URL (amqp://user:pass@host:5672/vhost); several, comma-separated: "
           "nodes of one cluster, tried in turn when the one in use is lost; empty: embedded store", _amqp_urls,
           "an amqp:// or amqps:// URL, or several comma-separated"),
    Option("amqp_queue", str, "dcf.jobs", "RabbitMQ queue of this head's jobs (heads sharing a vhost need "
           "different ones)", _queue_name, "1-200 printable ASCII characters, not starting with amq."),
    Option("amqp_queue_type", str, "classic", "type of the jobs queue: classic (one broker node) or quorum "
           "(replicated over a RabbitMQ cluster's nodes by Raft: survives losing a minority of them)",
           choices=("classic", "quorum")),
    Option("amqp_republish_after", float, 30.0, "seconds an accepted job may stay undelivered to the head while "
           "it has room for more (another consumer of its queue took it) before the head publishes it again",
           _positive, "> 0"),
    Option("amqp_heartbeat", float, 5.0, "seconds of broker heartbeat timeout on the connection holding the "
           "leader lock (docs/RELIABILITY.md, 'Standby head'): an active head cut off from the broker stops "
           "dispatching within half of it, and a standby takes over once the broker drops that connection (2-3 "
           "times it after the last frame; at once when the active head's process dies)",
           lambda v: _positive(v) and v >= 1, ">= 1"),
    Option("standby", _bool, False, "wait as a standby head (needs --amqp-url and the active head's state dir): "
           "answer 'standby, active is X' and become the active head when the one holding the broker's leader "
           "lock loses it; without it, a head that finds another active refuses to start"),
    _port_opt("http_port", 8080, "REST API port"),
    *PORT_OPTIONS,
    *COMMON_OPTIONS,
    Option("ack_timeout", float, 10.0, "seconds a provider has to acknowledge a subtask before it is re-sent",
           _positive, "> 0"),
    Option("min_deadline", float, 60.0, "minimum seconds a subtask may run before it is given to another "
           "provider", _positive, "> 0"),
    Option("max_attempts", int, 5, "attempts per subtask before its job fails", _positive, ">= 1"),
    Option("verify_rate", float, 0.0, "fraction of the subtasks without a check of their own (training gradients "
           "and local-SGD rounds, predictions) also run on a second provider and compared; a provider outvoted "
           "is quarantined (matmul is always checked by Freivalds' algorithm)", _fraction, "0-1"),
    _port_opt("rendezvous_port", 5558, "TCP port of the training rendezvous: the torch.distributed TCPStore the "
              "head starts for `--sync allreduce` jobs (providers connect to it, then to each other)"),
    Option("max_upload_bytes", int, 8 * 1024**3, "largest accepted upload (bytes)", _positive, "> 0"),
    Option("blob_ttl", float, 3600.0, "seconds an uploaded blob that no job uses is kept, then deleted (so are "
           "files left in STATE_DIR/incoming); 0: kept until deleted", _non_negative, ">= 0"),
    Option("max_unused_bytes", int, 32 * 1024**3, "bytes of uploaded blobs that no job uses the head keeps at "
           "once; an upload past it is refused with 507 no_space", _positive, "> 0"),
    Option("max_jobs", int, 10_000, "most unfinished jobs the head holds at once (with RabbitMQ: those it took "
           "from the queue); a submission past it is refused with 503 too_many_jobs, which clients wait on and "
           "retry like an unreachable queue", _positive, ">= 1"),
    Option("fsync", _bool, False, "also survive power loss: fsync operands before accepting a job, results, "
           "checkpoints and models before reporting them, and every job-store commit (off: files and commits "
           "reach the OS before any acknowledgement, which survives any crash of the head process)"),
    Option("accept_empty_store", _bool, False, "start although the job store lost the jobs this state dir held "
           "(`jobs.sqlite3` emptied, deleted, replaced or unreadable and moved aside): they are forgotten; without "
           "it the head refuses to start, saying why"),
    Option("api_token", str, "", "bearer token the REST API requires (empty: the one in STATE_DIR/api-token, "
           "created on the head's first start, unless --insecure)"),
    CURVE_SECRET_KEY,
    Option("curve_allow", str, "", "head: directory of allowed provider public keys (`*.key`), re-read when "
           "it changes; required with --curve-secret-key (empty: STATE_DIR/keys/allowed, unless --insecure)"),
    Option("insecure", _bool, False, "run without what was not given explicitly: no API token and no CURVE "
           "unless --api-token or --curve-* are set (a warning at start); without it, a head creates both in "
           "its state dir on first start and requires them"),
]

PROVIDER_OPTIONS = [
    Option("head", str, "127.0.0.1", "host name or address of the head; several, comma-separated (an active "
           "head and its standbys): the provider follows whichever is active"),
    *PORT_OPTIONS,
    *COMMON_OPTIONS,
    Option("device", str, "auto", "compute device", choices=("auto", "cpu", "cuda", "mps")),
    Option("name", str, "", "provider name shown by `dcf nodes` (default: host name and device)"),
    Option("threads", int, 0, "BLAS/torch threads on the CPU (0: all cores)", _non_negative, ">= 0"),
    Option("request_timeout", float, 2.5, "Lazy Pirate: seconds to wait for a head reply before retrying",
           _positive, "> 0"),
    SHARED_FILES,
    CURVE_SECRET_KEY,
    Option("curve_server_key", str, "", "provider: the head's CURVE public key file (`head.key`); required "
           "with --curve-secret-key"),
    Option("data", str, "", "datasets this provider holds on its own disk, `NAME=PATH.npz[,NAME=PATH.npz...]` (`X`, "
           "`y`, optionally `X_test`, `y_test`): train jobs with `--dataset provider:NAME` use them where they are, "
           "and no sample leaves this machine"),
    Option("memory_limit", byte_size, 0, "the most memory this provider offers, in bytes or with a unit (`4GiB`, "
           "`512MB`); 0: what its device has free. matmul splits to fit it, and allreduce training makes it a "
           "member only of groups whose model fits it", _non_negative, ">= 0"),
    Option("delay", float, 0.0, "testing and chaos: seconds to sleep before each subtask", _non_negative, ">= 0"),
]

CLIENT_OPTIONS = [
    Option("head_url", head_urls, "http://127.0.0.1:8080", "URL of the head's REST API (`HOST:PORT` means "
           "`http://HOST:PORT`); several, comma-separated (an active head and its standbys): the client follows "
           "whichever is active", _http_urls, "an http:// or https:// URL with a host, or several comma-separated",
           flag_name="--head"),
    Option("api_token", str, "", "bearer token for the REST API", flag_name="--token"),
    Option("queue_wait", float, 60.0, "seconds a submission waits (retrying) while the head's job queue "
           "(RabbitMQ) is unreachable; 0: fail at once", _non_negative, ">= 0"),
    Option("reconnect_wait", float, 60.0, "seconds a client waiting for a job (`--wait`, a submission's "
           "follow-up, a result download) keeps reconnecting, with back-off, while the head is unreachable "
           "(e.g. restarting); 0: fail at once", _non_negative, ">= 0"),
    SHARED_FILES,
    Option("state_dir", str, "./dcf-state", "the head's state dir, for a client on the head's machine: with no "
           "token given and a loopback head URL, the token is read from STATE_DIR/api-token (the same variable "
           "as the head's --state-dir)", flag_name="--head-state-dir"),
]


# ---- reading and checking values -------------------------------------------------------------------
def _convert(opt: Option, raw: object, source: str) -> Any:
    """A flag or environment value (text) read by the option's converter; a typed value from a
    caller (e.g. ``Client(queue_wait=0)``) is kept as it is, an int for a float made a float."""
    if not isinstance(raw, str):
        is_int = isinstance(raw, int) and not isinstance(raw, bool)
        return float(raw) if opt.value_type is float and is_int else raw  # type: ignore[arg-type]
    try:
        return opt.type(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: cannot read {raw!r} as {opt.type.__name__}") from None


def check_value(opt: Option, value: object, source: str) -> None:
    """Raise ConfigError, naming ``source``, unless ``value`` is of the option's type and acceptable."""
    kind = opt.value_type
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise ConfigError(f"{source}: {value!r} is not of type {kind.__name__}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{source}: {value!r} is not one of {', '.join(opt.choices)}")
    if opt.check and not opt.check(value):
        if opt.check_text.startswith(("a ", "an ")):  # what the value must be, e.g. "an http:// URL"
            raise ConfigError(f"{source}: {value!r} is not {opt.check_text}")
        raise ConfigError(f"{source}: {value!r} out of range ({opt.check_text})")


def resolve_values(given: Mapping[str, object], options: Sequence[Option],
                   env: Mapping[str, str] | None = None, *, given_as_flags: bool = True) -> dict[str, Any]:
    """Every option's value: from ``given`` (None: not given), else ``env`` (default: the process
    environment), else its default; converted and checked. Errors name a given value by its flag,
    or by its option name when ``given_as_flags`` is false (values from Python code)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in options:
        raw, source = given.get(opt.name), opt.flag if given_as_flags else opt.name
        if raw is None and opt.env in env:
            raw, source = env[opt.env], opt.env
        if raw is None:
            values[opt.name] = opt.default
            continue
        value = _convert(opt, raw, source)
        check_value(opt, value, source)
        values[opt.name] = value
    return values


# ---- typed settings ----------------------------------------------------------------------------
S = TypeVar("S", bound="Settings")


class Settings:
    """Base of the frozen settings dataclasses; ``OPTIONS`` is the table their fields follow."""

    OPTIONS: ClassVar[Sequence[Option]] = ()
    PROG: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for opt in self.OPTIONS:
            check_value(opt, getattr(self, opt.name), opt.name)
            if opt.value_type is float:  # an int given for a float field is stored as a float
                object.__setattr__(self, opt.name, float(getattr(self, opt.name)))

    @classmethod
    def _complete(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Values resolved from flags, environment and defaults, completed from this machine where a
        settings class does (the client's token)."""
        return values

    @classmethod
    def defaults(cls: type[S]) -> S:
        return cls(**{opt.name: opt.default for opt in cls.OPTIONS})

    @classmethod
    def from_values(cls: type[S], given: Mapping[str, object], env: Mapping[str, str] | None = None) -> S:
        """From values by option name (None or absent: not given), then ``env``, then defaults."""
        unknown = set(given) - {opt.name for opt in cls.OPTIONS}
        if unknown:
            raise ConfigError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
        return cls(**cls._complete(resolve_values(given, cls.OPTIONS, env, given_as_flags=False)))

    @classmethod
    def from_namespace(cls: type[S], ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> S:
        """From parsed flags (other attributes of ``ns``, e.g. a subcommand's, are ignored)."""
        return cls(**cls._complete(resolve_values(vars(ns), cls.OPTIONS, env)))

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=cls.PROG, description=cls.DESCRIPTION)
        add_options(parser, cls.OPTIONS)
        return parser

    @classmethod
    def parse(cls: type[S], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> S:
        """From command-line flags (None: ``sys.argv[1:]``; ``--help`` and bad flags exit, as argparse
        does), then ``env`` (None: the process environment), then defaults."""
        return cls.from_namespace(cls.parser().parse_args(argv), env)


@dataclass(frozen=True)
class HeadSettings(Settings):
    """What ``dcf-head`` runs with (HEAD_OPTIONS)."""

    OPTIONS: ClassVar[Sequence[Option]] = HEAD_OPTIONS
    PROG: ClassVar[str] = "dcf-head"
    DESCRIPTION: ClassVar[str] = "Run the dcf head: registration, scheduling, job store and REST API."

    host: str
    state_dir: str
    amqp_url: str
    amqp_queue: str
    amqp_queue_type: str
    amqp_republish_after: float
    amqp_heartbeat: float
    standby: bool
    http_port: int
    registration_port: int
    task_port: int
    result_port: int
    log_level: str
    log_json: bool
    heartbeat_interval: float
    plugins: str
    ack_timeout: float
    min_deadline: float
    max_attempts: int
    verify_rate: float
    rendezvous_port: int
    max_upload_bytes: int
    blob_ttl: float
    max_unused_bytes: int
    max_jobs: int
    fsync: bool
    accept_empty_store: bool
    api_token: str = field(repr=False)
    curve_secret_key: str
    curve_allow: str
    insecure: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        ports = (self.http_port, self.registration_port, self.task_port, self.result_port, self.rendezvous_port)
        if len(set(ports)) != len(ports):
            raise ConfigError("the HTTP, registration, task, result and rendezvous ports must all differ")


@dataclass(frozen=True)
class ProviderSettings(Settings):
    """What ``dcf-provider`` runs with (PROVIDER_OPTIONS)."""

    OPTIONS: ClassVar[Sequence[Option]] = PROVIDER_OPTIONS
    PROG: ClassVar[str] = "dcf-provider"
    DESCRIPTION: ClassVar[str] = "Run a dcf provider: compute subtasks for a head on this machine's device."

    head: str
    registration_port: int
    task_port: int
    result_port: int
    log_level: str
    log_json: bool
    heartbeat_interval: float
    plugins: str
    device: str
    name: str
    threads: int
    request_timeout: float
    shared_files: str
    curve_secret_key: str
    curve_server_key: str
    data: str
    memory_limit: int
    delay: float


@dataclass(frozen=True)
class ClientSettings(Settings):
    """What the ``dcf`` CLI and ``user_client.Client`` talk to the head with (CLIENT_OPTIONS)."""

    OPTIONS: ClassVar[Sequence[Option]] = CLIENT_OPTIONS
    PROG: ClassVar[str] = "dcf"
    DESCRIPTION: ClassVar[str] = "dcf: distributed matrix multiplication and training on a pool of machines."

    head_url: str
    api_token: str = field(repr=False)
    queue_wait: float
    reconnect_wait: float
    shared_files: str
    state_dir: str

    @classmethod
    def _complete(cls, values: dict[str, Any]) -> dict[str, Any]:
        """No token given (flag, DCF_API_TOKEN, argument) and a head on this machine: the token its
        state dir holds (``local_api_token``), as a local ``dcf status`` needs nothing more."""
        if not values["api_token"] and is_loopback_url(values["head_url"]):
            values["api_token"] = local_api_token(values["state_dir"])
        return values


SETTINGS: Final = (HeadSettings, ProviderSettings, ClientSettings)


def _check_fields(cls: type[Settings]) -> None:
    """The dataclass follows its table: same names in the same order, each typed as its default."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    expected = [opt.name for opt in cls.OPTIONS]
    if names != expected:
        raise TypeError(f"{cls.__name__} fields {names} do not follow its options {expected}")
    for opt in cls.OPTIONS:
        if hints[opt.name] is not opt.value_type:
            raise TypeError(f"{cls.__name__}.{opt.name} is {hints[opt.name]}, its default is {opt.value_type}")


for _cls in SETTINGS:
    _check_fields(_cls)


def head_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> HeadSettings:
    """The head's settings from flags (None: ``sys.argv[1:]``), ``env`` (None: os.environ), defaults."""
    return HeadSettings.parse(argv, env)


def provider_settings(argv: Sequence[str] | None = None,
                      env: Mapping[str, str] | None = None) -> ProviderSettings:
    """A provider's settings from flags (None: ``sys.argv[1:]``), ``env`` (None: os.environ), defaults."""
    return ProviderSettings.parse(argv, env)


def client_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ClientSettings:
    """The client's settings from its flags only (``--head``, ``--token``, ...; None: ``sys.argv[1:]``),
    ``env`` (None: os.environ), defaults."""
    return ClientSettings.parse(argv, env)


# ---- argparse and tables -------------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], default: Any = None) -> None:
    """A flag for each option (``default``: what an absent flag leaves; ``argparse.SUPPRESS`` leaves no
    attribute, for a copy of the flags on a subcommand that must not overwrite the main command's).
    A boolean option is a flag (``--fsync``), takes an explicit value too (``--fsync false``), and has
    a ``--no-`` form (``--no-fsync``)."""
    for opt in options:
        text = f"{opt.help} [env {opt.env}, default {opt.default!r}]"
        if opt.value_type is bool:
            parser.add_argument(opt.flag, dest=opt.name, default=default, nargs="?", const="true",
                                metavar="true|false", help=text)
            parser.add_argument("--no-" + opt.flag[2:], dest=opt.name, default=default, action="store_const",
                                const="false", help=f"the same as {opt.flag} false")
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=default, choices=opt.choices, help=text)


def option(options: Sequence[Option], name: str) -> Option:
    """The option ``name`` of a table (e.g. ``option(HEAD_OPTIONS, "http_port").default``)."""
    for opt in options:
        if opt.name == name:
            return opt
    raise ConfigError(f"no option {name!r} in this table")


def settings_class(options: Sequence[Option]) -> type[Settings]:
    """The settings class of an option table (HEAD_OPTIONS, PROVIDER_OPTIONS, CLIENT_OPTIONS)."""
    for cls in SETTINGS:
        if list(options) == list(cls.OPTIONS):
            return cls
    raise ConfigError("these options are not the table of any settings class")


def resolve(ns: argparse.Namespace, options: Sequence[Option],
            env: Mapping[str, str] | None = None) -> Any:
    """The settings of the table ``options`` (a ``HeadSettings`` for HEAD_OPTIONS, ...) from parsed
    flags ``ns``, ``env`` and defaults. Typed code calls ``HeadSettings.from_namespace`` instead."""
    return settings_class(options).from_namespace(ns, env)


def parse(options: Sequence[Option], argv: Sequence[str] | None, prog: str, description: str,
          env: Mapping[str, str] | None = None) -> Any:
    """The settings of the table ``options`` from ``argv`` (its own parser, named ``prog``). Typed
    code calls ``head_settings(argv, env)`` (and the provider and client ones) instead."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, options)
    return resolve(parser.parse_args(argv), options, env)


def markdown_table() -> str:
    rows = ["| flag | environment | default | used by | meaning |", "|---|---|---|---|---|"]
    seen: dict[tuple[str, str], list[str]] = {}
    opts: dict[tuple[str, str], Option] = {}
    programs = (("dcf-head", HEAD_OPTIONS), ("dcf-provider", PROVIDER_OPTIONS), ("dcf", CLIENT_OPTIONS))
    for who, options in programs:
        for opt in options:
            key = (opt.flag, opt.env)
            seen.setdefault(key, []).append(who)
            opts.setdefault(key, opt)
    for key, opt in opts.items():
        default = "(empty)" if opt.default == "" else f"`{opt.default}`"
        flag = f"`{opt.flag}`, `--no-{opt.flag[2:]}`" if opt.value_type is bool else f"`{opt.flag}`"
        rows.append(f"| {flag} | `{opt.env}` | {default} | {', '.join(seen[key])} | {opt.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
