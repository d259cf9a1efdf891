"""Configuration by flags and ``DCF_*`` environment variables, validated at start-up.

Each program declares its options once (``HEAD_OPTIONS``, ``PROVIDER_OPTIONS``,
``CLIENT_OPTIONS``); ``parse`` builds the argparse parser from them, reads the
environment, and checks types and ranges. Precedence: flag, then environment,
then default. ``python -m common.config`` prints the table kept in the README.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


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


def _port(v: int) -> bool:
    return 0 < v < 65536


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


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
    Option("heartbeat_interval", float, 5.0, "seconds between provider heartbeats; 3 missed = dead",
           _positive, "> 0"),
    Option("plugins", str, "", "comma-separated modules to import that register extra task types"),
]

HEAD_OPTIONS = [
    Option("host", str, "0.0.0.0", "address the head binds its ZeroMQ and HTTP ports to"),
    Option("state_dir", str, "./dcf-state", "directory of the job store, operands and results"),
    Option("amqp_url", str, "", "RabbitMQ URL (amqp://user:pass@host:5672/vhost); empty: embedded store"),
    Option("amqp_queue", str, "dcf.jobs", "RabbitMQ queue of this head's jobs (heads sharing a vhost need "
           "different ones)", lambda v: 0 < len(v) <= 200 and v.isascii() and v.isprintable()
           and not v.startswith("amq."), "1-200 printable ASCII characters, not starting with amq."),
    _port_opt("http_port", 8080, "REST API port"),
    *PORT_OPTIONS,
    *COMMON_OPTIONS,
    Option("ack_timeout", float, 10.0, "seconds a provider has to acknowledge a subtask before it is re-sent",
           _positive, "> 0"),
    Option("min_deadline", float, 60.0, "minimum seconds a subtask may run before it is given to another "
           "provider", _positive, "> 0"),
    Option("max_attempts", int, 5, "attempts per subtask before its job fails", _positive, ">= 1"),
    Option("max_upload_bytes", int, 8 * 1024**3, "largest accepted upload (bytes)", _positive, "> 0"),
    Option("fsync", _bool, False, "also survive power loss: fsync operands before accepting a job, results, "
           "checkpoints and models before reporting them, and every job-store commit (off: files and commits "
           "reach the OS before any acknowledgement, which survives any crash of the head process)"),
    Option("api_token", str, "", "bearer token the REST API requires (empty: none)"),
    Option("curve_secret_key", str, "", "this program's CURVE secret key file (`NAME.key_secret` from `dcf keys "
           "generate`); with it, all ZeroMQ traffic is encrypted and authenticated (empty: CURVE off)"),
    Option("curve_allow", str, "", "head: directory of allowed provider public keys (`*.key`), re-read when "
           "it changes; required with --curve-secret-key"),
]

PROVIDER_OPTIONS = [
    Option("head", str, "127.0.0.1", "host name or address of the head"),
    *PORT_OPTIONS,
    *COMMON_OPTIONS,
    Option("device", str, "auto", "compute device", choices=("auto", "cpu", "cuda", "mps")),
    Option("name", str, "", "provider name shown by `dcf nodes` (default: host name and device)"),
    Option("threads", int, 0, "BLAS/torch threads on the CPU (0: all cores)", lambda v: v >= 0, ">= 0"),
    Option("request_timeout", float, 2.5, "Lazy Pirate: seconds to wait for a head reply before retrying",
           _positive, "> 0"),
    Option("shared_files", str, "auto", "auto: on the head's machine, exchange arrays as files in the head's "
           "state dir instead of over sockets/HTTP; off: always send them", choices=("auto", "off")),
    next(o for o in HEAD_OPTIONS if o.name == "curve_secret_key"),
    Option("curve_server_key", str, "", "provider: the head's CURVE public key file (`head.key`); required "
           "with --curve-secret-key"),
    Option("delay", float, 0.0, "testing and chaos: seconds to sleep before each subtask",
           lambda v: math.isfinite(v) and v >= 0, ">= 0"),
]

CLIENT_OPTIONS = [
    Option("head_url", str, "http://127.0.0.1:8080", "URL of the head's REST API", flag_name="--head"),
    Option("api_token", str, "", "bearer token for the REST API", flag_name="--token"),
    Option("queue_wait", float, 60.0, "seconds a submission waits (retrying) while the head's job queue "
           "(RabbitMQ) is unreachable; 0: fail at once", lambda v: math.isfinite(v) and v >= 0, ">= 0"),
    next(o for o in PROVIDER_OPTIONS if o.name == "shared_files"),
]


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        parser.add_argument(opt.flag, dest=opt.name, default=None, choices=opt.choices,
                            help=f"{opt.help} [env {opt.env}, default {opt.default!r}]")


def resolve(ns: argparse.Namespace, options: Sequence[Option],
            env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Fill every option from flag, env or default, converting and checking each."""
    env = os.environ if env is None else env
    for opt in options:
        raw = getattr(ns, opt.name, None)
        source = opt.flag
        if raw is None and opt.env in env:
            raw, source = env[opt.env], opt.env
        if raw is None:
            value = opt.default
        else:
            try:
                value = opt.type(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: cannot read {raw!r} as {opt.type.__name__}") from None
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{source}: {value!r} is not one of {', '.join(opt.choices)}")
        if opt.check and raw is not None and not opt.check(value):
            raise ConfigError(f"{source}: {value!r} out of range ({opt.check_text})")
        setattr(ns, opt.name, value)
    return ns


def parse(options: Sequence[Option], argv: Sequence[str] | None, prog: str, description: str,
          env: Mapping[str, str] | None = None) -> argparse.Namespace:
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
        rows.append(f"| `{opt.flag}` | `{opt.env}` | {default} | {', '.join(seen[key])} | {opt.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
