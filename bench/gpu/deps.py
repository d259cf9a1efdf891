#!/usr/bin/env python3
"""The GPU check's dependency helper: the project's runtime requirements, read from pyproject.toml.

    python3 bench/gpu/deps.py requirements   # one requirement a line (prepare.sh downloads these)
    python3 bench/gpu/deps.py check          # each one installed and new enough? where from? (run.sh)

``check`` exits 1 when a requirement is missing or too old, or when dcf's roles do not import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: what the head, the providers and the client import at start (each needs the wheels carried)
ROLE_MODULES = ("zmq", "fastapi", "uvicorn", "pydantic", "aio_pika", "httpx", "msgpack", "numpy",
                "head_node.__main__", "provider_node.__main__", "user_client")


def requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [str(d) for d in deps]


def _check_one(spec: str, why: str) -> list[str]:
    """Problems with requirement ``spec`` (and, for ``name[extra]``, with that extra's own requirements)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: names only
        name = spec.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        try:
            print(f"  {name:22} {md.version(name):12} (version not checked: no 'packaging')")
            return []
        except md.PackageNotFoundError:
            return [f"{name} is not installed ({why})"]
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return []
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        return [f"{req.name} is not installed (needed: {spec}, {why})"]
    version = dist.version
    where = str(dist.locate_file(""))
    ok = req.specifier.contains(version, prereleases=True)
    print(f"  {req.name:22} {version:12} {'ok ' if ok else 'OLD'} {spec:28} from {where}")
    problems = [] if ok else [f"{req.name} {version} does not satisfy {spec} ({why})"]
    for extra in sorted(req.extras):
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is not None and sub_req.marker.evaluate({"extra": extra}) \
                    and not sub_req.marker.evaluate({"extra": ""}):
                problems += _check_one(f"{sub_req.name}{sub_req.specifier}", f"{req.name}[{extra}]")
    return problems


def check() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    problems: list[str] = []
    for spec in requirements():
        problems += _check_one(spec, "pyproject.toml")
    for mod in ROLE_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # any import failure is the finding
            problems.append(f"import {mod} failed: {type(exc).__name__}: {exc}")
    try:
        import torch

        print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    except ImportError:
        print("  torch: not installed")
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"deps: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["requirements", "check"])
    args = ap.parse_args()
    if args.what == "requirements":
        print("\n".join(requirements()))
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
