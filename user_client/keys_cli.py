"""``dcf keys generate``: CURVE key pairs for the head and its providers (common/security.py).
``dcf keys add-provider NAME``: enrol one provider with a head that made its own keys (secure by
default): its key pair in the head's STATE_DIR/keys, its public key on the allow-list, and what its
machine needs in one folder to hand over."""

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
    a = actions.add_parser("add-provider", parents=[shared], help="enrol a provider with a head that created its "
                           "keys (its key pair made, its public key put on the head's allow-list, taking effect "
                           "at once) and write what the provider's machine needs to NAME-keys/")
    a.add_argument("name", metavar="NAME", help="the provider's key name (letters, digits, '-', '_', '.')")
    a.add_argument("--dir", default=None, help="the head's key directory (default: STATE_DIR/keys of "
                   "--head-state-dir / DCF_STATE_DIR, ./dcf-state/keys)")
    a.add_argument("--out", default=None, metavar="DIR", help="where to write head.key and NAME's key pair "
                   "for the provider's machine (default: ./NAME-keys)")


def cmd_keys(args: argparse.Namespace, emit: Any) -> int:
    if args.keys_command == "add-provider":
        return cmd_add_provider(args, emit)
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


def cmd_add_provider(args: argparse.Namespace, emit: Any) -> int:
    from common import config, security  # zmq: only when keys are made

    key_dir = Path(args.dir) if args.dir else Path(args.settings.state_dir) / config.KEY_DIR
    out = Path(args.out) if args.out else Path(f"{args.name}-keys")
    copied, created = security.add_provider(key_dir, args.name, out)
    secret = out / f"{args.name}.key_secret"
    made = {"name": args.name, "key_dir": str(key_dir), "created": created, "files": [str(p) for p in copied],
            "allowed": str(key_dir / "allowed" / f"{args.name}.key")}
    lines = [
        f"{'created' if created else 'kept   '} provider {args.name}'s key pair; its public key "
        f"{'is now in' if created else 'was already made (allow-list unchanged) for'} {key_dir / 'allowed'}",
        *(f"wrote   {p}" for p in copied),
        "",
        f"Copy {out}/ to the provider's machine (its .key_secret to that machine only), and run there:",
        f"  dcf-provider --head HEAD_HOST --curve-server-key {out / 'head.key'} --curve-secret-key {secret}",
        f"Revoke: delete {key_dir / 'allowed' / (args.name + '.key')} (the head re-reads the allow-list).",
    ]
    emit(args, made, "\n".join(lines))
    return 0
