"""``dcf keys generate``: CURVE key pairs for the head and its providers (common/security.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any, shared: argparse.ArgumentParser) -> None:
    k = sub.add_parser("keys", help="ZeroMQ CURVE keys for the head and its providers", parents=[shared])
    actions = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = actions.add_parser("generate", parents=[shared], help="create the head's key pair and provider key "
                           "pairs, and add the providers' public keys to the head's allow-list (existing keys "
                           "are kept)")
    g.add_argument("--dir", default="keys", help="key directory (default: ./keys)")
    g.add_argument("--provider", action="append", default=None, metavar="NAME",
                   help="a provider key to create (repeat for several; default: one named 'provider')")
    g.add_argument("--copy-to", metavar="DIR", help="also copy what a provider machine needs (head.key and the "
                   "providers' key pairs) into DIR, e.g. a provider container's key volume")


def cmd_keys(args: argparse.Namespace, emit: Any) -> int:
    key_dir = Path(args.dir)
    from common import security  # zmq: only when keys are made

    head_public, head_new = security.generate_head(key_dir)
    made: dict[str, Any] = {"dir": str(key_dir), "head_public_key": str(head_public), "head_created": head_new,
                            "providers": []}
    lines = [f"{'created' if head_new else 'kept   '} {head_public} (+ .key_secret): the head's key pair"]
    for name in args.provider or ["provider"]:
        secret, created = security.generate_provider(key_dir, name)
        made["providers"].append({"name": name, "secret_key": str(secret), "created": created})
        lines.append(f"created {secret}: provider {name}'s key pair, public key in {key_dir / 'allowed'}"
                     if created else f"kept    {secret}: provider {name}'s key pair (allow-list unchanged)")
        if args.copy_to:
            for copied in security.copy_for_provider(key_dir, name, Path(args.copy_to)):
                lines.append(f"copied  {copied}")
    lines += [
        "",
        f"head:     --curve-secret-key {key_dir}/head.key_secret --curve-allow {key_dir}/allowed",
        f"provider: --curve-secret-key {key_dir}/providers/NAME.key_secret --curve-server-key {key_dir}/head.key",
        "Copy each provider's .key_secret to its machine only; the head re-reads allowed/ when it changes.",
    ]
    emit(args, made, "\n".join(lines))
    return 0
