"""ZeroMQ CURVE keys in the Ironhouse pattern.

The head has a key pair and an allow-list: a directory of provider public keys
(``*.key`` files). Every provider has its own key pair and knows the head's public
key. With keys configured, the head's three sockets (ROUTER, XPUB, PULL) are CURVE
servers: traffic is encrypted, the provider checks it talks to the real head, and
the head's ZAP handler (head_node/zap.py) lets in only keys on the allow-list, so a
provider without an allowed key cannot register, receive subtasks or send results.

Key files are pyzmq's certificate format (``zmq.auth``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both. ``dcf keys generate`` writes this layout::

    keys/head.key               head public key: give it to every provider
    keys/head.key_secret        head secret key: only the head reads it
    keys/allowed/NAME.key       the head's allow-list: one public key per provider
    keys/providers/NAME.key_secret   provider NAME's key pair: only that provider reads it
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.auth

from .errors import ConfigError

ZAP_DOMAIN = b"dcf"
Z85_KEY_LENGTH = 40


class HeadCurveSettings(Protocol):
    """The head's CURVE options (``config.HeadSettings`` has them)."""

    @property
    def curve_secret_key(self) -> str: ...

    @property
    def curve_allow(self) -> str: ...


class ProviderCurveSettings(Protocol):
    """A provider's CURVE options (``config.ProviderSettings`` has them)."""

    @property
    def curve_secret_key(self) -> str: ...

    @property
    def curve_server_key(self) -> str: ...


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    allow_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def _check_key(key: bytes | None, path: Path, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != Z85_KEY_LENGTH:
        raise ConfigError(f"{path}: no valid CURVE {what} key in it")
    try:
        zmq.utils.z85.decode(key)
    except Exception:
        raise ConfigError(f"{path}: the CURVE {what} key is not Z85 text") from None
    return key


def _load(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key file {path}: {exc}") from None


def load_public(path: str | os.PathLike[str]) -> bytes:
    path = Path(path)
    public, _ = _load(path)
    return _check_key(public, path, "public")


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    path = Path(path)
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (give the .key_secret file)")
    return _check_key(public, path, "public"), _check_key(secret, path, "secret")


def read_allow_list(allow_dir: Path) -> dict[bytes, str]:
    """Allowed public keys (Z85) -> the name of the file they came from. Unreadable files are
    reported, not fatal: one bad file must not lock every provider out."""
    allowed: dict[bytes, str] = {}
    for path in sorted(allow_dir.glob("*.key")):
        try:
            allowed.setdefault(load_public(path), path.stem)
        except ConfigError:
            continue
    return allowed


def server_keys(cfg: HeadCurveSettings) -> ServerKeys | None:
    """The head's CURVE configuration, checked at start-up; None when CURVE is off."""
    secret_file, allow = cfg.curve_secret_key, cfg.curve_allow
    if not secret_file and not allow:
        return None
    if not secret_file or not allow:
        raise ConfigError("CURVE needs both --curve-secret-key (the head's .key_secret) and --curve-allow "
                          "(the directory of allowed provider public keys)")
    public, secret = load_secret(secret_file)
    allow_dir = Path(allow)
    if not allow_dir.is_dir():
        raise ConfigError(f"--curve-allow {allow_dir}: not a directory")
    return ServerKeys(public, secret, allow_dir)


def client_keys(cfg: ProviderCurveSettings) -> ClientKeys | None:
    """A provider's CURVE configuration, checked at start-up; None when CURVE is off."""
    secret_file, server_file = cfg.curve_secret_key, cfg.curve_server_key
    if not secret_file and not server_file:
        return None
    if not secret_file or not server_file:
        raise ConfigError("CURVE needs both --curve-secret-key (this provider's .key_secret) and "
                          "--curve-server-key (the head's public .key)")
    public, secret = load_secret(secret_file)
    return ClientKeys(public, secret, load_public(server_file))


def secure_server(sock: zmq.Socket[Any], keys: ServerKeys | None) -> None:
    """Make a head socket a CURVE server that asks the ZAP handler about every client. Call before bind."""
    if keys is None:
        return
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = ZAP_DOMAIN
    # without a ZAP handler libzmq would let every client in: refuse instead
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket[Any], keys: ClientKeys | None) -> None:
    """Make a provider socket a CURVE client of the head. Call before connect."""
    if keys is None:
        return
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


# ---- generation (dcf keys generate) ---------------------------------------------------------
def _readable(public_file: Path) -> None:
    if os.name == "posix":
        public_file.chmod(0o644)  # a public key: anyone may read it


@contextlib.contextmanager
def _writing_keys(where: Path) -> Iterator[None]:
    """File errors while writing or copying key files, as a ConfigError naming ``where``."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"cannot write CURVE keys in {where}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _owner_only() -> Iterator[None]:
    """Files created inside are readable by their owner only from the start (no chmod window)."""
    old = os.umask(0o077) if os.name == "posix" else None
    try:
        yield
    finally:
        if old is not None:
            os.umask(old)


def generate_head(key_dir: Path) -> tuple[Path, bool]:
    """The head's key pair in ``key_dir``; (public file, created?). An existing pair is kept."""
    with _writing_keys(key_dir):
        key_dir.mkdir(parents=True, exist_ok=True)
        public = key_dir / "head.key"
        if public.exists() and (key_dir / "head.key_secret").exists():
            load_secret(key_dir / "head.key_secret")  # fail loudly on a damaged pair
            return public, False
        with _owner_only():
            pub_file, _ = zmq.auth.create_certificates(key_dir, "head")
        _readable(Path(pub_file))
    return Path(pub_file), True


def generate_provider(key_dir: Path, name: str) -> tuple[Path, bool]:
    """Provider ``name``'s key pair in ``key_dir/providers`` and its public key in the head's
    allow-list ``key_dir/allowed``; (secret file, created?). An existing pair is kept, and not put
    on the allow-list again (it may have been revoked)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"provider key name {name!r}: use letters, digits, '-', '_' and '.'")
    with _writing_keys(key_dir):
        return _generate_provider(key_dir, name)


def _generate_provider(key_dir: Path, name: str) -> tuple[Path, bool]:
    providers, allowed = key_dir / "providers", key_dir / "allowed"
    providers.mkdir(parents=True, exist_ok=True)
    allowed.mkdir(parents=True, exist_ok=True)
    secret = providers / f"{name}.key_secret"
    if secret.exists():
        load_secret(secret)  # fail loudly on a damaged pair
        return secret, False
    with _owner_only():
        zmq.auth.create_certificates(providers, name)
    _readable(providers / f"{name}.key")
    shutil.copyfile(providers / f"{name}.key", allowed / f"{name}.key")
    return secret, True


def copy_for_provider(key_dir: Path, name: str, dest: Path) -> list[Path]:
    """Copy what provider ``name``'s machine needs into ``dest``: ``head.key`` and its key pair
    (``--curve-server-key DEST/head.key --curve-secret-key DEST/NAME.key_secret``)."""
    out = []
    providers = key_dir / "providers"
    with _writing_keys(dest):
        dest.mkdir(parents=True, exist_ok=True)
        for src in (key_dir / "head.key", providers / f"{name}.key", providers / f"{name}.key_secret"):
            target = dest / src.name
            with _owner_only():
                shutil.copyfile(src, target)
            if target.suffix == ".key_secret" and os.name == "posix":
                target.chmod(0o600)  # an existing file keeps its mode through copyfile
            out.append(target)
    return out


# ---- secure by default: what a head started without keys or token creates ------------------------
@dataclass(frozen=True)
class Defaults:
    """What ``secure_defaults`` found or created in a head's state dir (None: given explicitly, or
    ``--insecure``)."""

    token_file: Path | None
    token_created: bool
    key_dir: Path | None
    keys_created: bool
    api_token: str = field(repr=False, default="")  # the token file's ("" without one); never logged


def ensure_api_token(path: Path) -> tuple[str, bool]:
    """The API token in ``path``, created (random, 256 bits, owner-only 0600) when there is none;
    (token, created?). An empty, malformed or unreadable file is a ConfigError naming it."""
    return _ensure_secret(path, "API token", "or give --api-token")


def queue_key(state_dir: Path) -> bytes:
    """The key that signs the head's job messages on RabbitMQ (``STATE_DIR/queue.key``, created on
    first use like the API token): every head of this state dir (a standby too) signs and checks
    with it, and a message without its signature is never run (PROTOCOL.md section 13)."""
    from .config import QUEUE_KEY_FILE

    return _ensure_secret(state_dir / QUEUE_KEY_FILE, "queue key", "but the jobs queued under the old one "
                                                                   "are then dropped")[0].encode("ascii")


def _ensure_secret(path: Path, what: str, hint: str) -> tuple[str, bool]:
    import secrets

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            st = path.stat()
            if os.name == "posix" and st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)  # a copy made readable to others: its owner's only again
            token = path.read_text(encoding="ascii", errors="replace").strip()
        else:
            token = secrets.token_urlsafe(32)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(token + "\n")
            return token, True
    except OSError as exc:
        raise ConfigError(f"cannot create or read the {what} file {path}: {exc.strerror or exc}") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{path}: not a {what} (16 or more printable characters, no spaces); delete it "
                          f"and the head creates a new one, {hint}")
    return token, False


def secure_defaults(state_dir: Path, *, token: bool, curve: bool) -> Defaults:
    """Secure by default: the API token file (``token``) and the CURVE key pair with an (empty)
    allow-list (``curve``) in ``state_dir``, created on first start and reused afterwards."""
    from .config import API_TOKEN_FILE, KEY_DIR

    private_dir(state_dir)
    token_file = key_dir = None
    token_created = keys_created = False
    api_token = ""
    if token:
        token_file = state_dir / API_TOKEN_FILE
        api_token, token_created = ensure_api_token(token_file)
    if curve:
        key_dir = state_dir / KEY_DIR
        with _writing_keys(key_dir):
            private_dir(key_dir)
            _, keys_created = generate_head(key_dir)
            private_dir(key_dir / "allowed")
    return Defaults(token_file, token_created, key_dir, keys_created, api_token)


def add_provider(key_dir: Path, name: str, out: Path) -> tuple[list[Path], bool]:
    """``dcf keys add-provider``: provider ``name``'s key pair made in the head's ``key_dir`` (its
    public key on the allow-list, ``key_dir/allowed``) and what its machine needs copied into ``out``;
    (copied files, created?). A head that has no key pair there yet is a ConfigError."""
    if not (key_dir / "head.key").is_file() or not (key_dir / "head.key_secret").is_file():
        raise ConfigError(f"no head key pair in {key_dir}: start the head once (it creates it in STATE_DIR/keys), "
                          "or give the key directory with --dir")
    _, created = generate_provider(key_dir, name)
    return copy_for_provider(key_dir, name, out), created


# ---- the head's files: owner only ---------------------------------------------------------------
#: the mode of every file the head creates (blobs, results, the job database, keys), from its umask
OWNER_ONLY_UMASK = 0o077


def owner_only_files() -> None:
    """Every file and folder this process creates from now on is its owner's only (0600 / 0700):
    the head sets it first thing, so no blob, result or database file is ever world-readable.
    A client or provider on the head's machine must run as the same user (it does: it maps the
    head's files)."""
    if os.name == "posix":
        os.umask(OWNER_ONLY_UMASK)


def private_dir(path: Path) -> None:
    """``path`` exists and is its owner's only (0700), also where an older run created it 0755;
    left alone where this user does not own it (an operator's choice)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name != "posix":
        return
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        path.chmod(0o700)


#: the placeholder secrets of .env.example: a deployment that kept one is refused
PLACEHOLDER_SECRETS = frozenset({"change-me-api-token", "change-me-rabbitmq-password"})


def refuse_placeholders(api_token: str | None, amqp_url: str | None) -> None:
    """ConfigError when the API token or the RabbitMQ password is still a placeholder of
    .env.example (compose's ``${VAR:?}`` only checks that a value is set)."""
    from urllib.parse import unquote, urlsplit

    if api_token and (api_token in PLACEHOLDER_SECRETS or api_token.startswith("change-me")):
        raise ConfigError("the API token is the placeholder of .env.example: set DCF_API_TOKEN in .env "
                          "to a secret of your own (e.g. `openssl rand -hex 24`)")
    if amqp_url:
        try:
            password = urlsplit(amqp_url).password
        except ValueError:
            return  # the queue's own check names a malformed URL
        if password and (unquote(password) in PLACEHOLDER_SECRETS or unquote(password).startswith("change-me")):
            raise ConfigError("the RabbitMQ password in --amqp-url is the placeholder of .env.example: set "
                              "DCF_RABBITMQ_PASS in .env to a secret of your own (e.g. `openssl rand -hex 24`)")
