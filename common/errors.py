"""The one exception tree of dcf.

Every error carries a short machine-readable ``code`` and an HTTP status, so the
same exception can be logged on the head, sent back to a provider as an
``error`` message, or returned to an HTTP client as a 4xx JSON body.

Each code is one class: a subclass that states its own ``code`` is entered in a
code-to-class registry when it is defined (``error_class``, ``error_codes``), and
``error_from_dict`` rebuilds the class a peer sent from that registry. The code
strings are on the wire and in HTTP bodies: they never change.
"""

from __future__ import annotations

_BY_CODE: dict[str, type[DcfError]] = {}


class DcfError(Exception):
    """Base class of every error dcf raises on purpose."""

    code: str = "error"
    http_status: int = 400

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _register(cls)

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _register(cls: type[DcfError]) -> None:
    owner = _BY_CODE.get(cls.code)
    if owner is not None and owner.__qualname__ != cls.__qualname__:
        raise TypeError(f"error code {cls.code!r} of {cls.__qualname__} is already {owner.__qualname__}'s")
    _BY_CODE[cls.code] = cls


_BY_CODE[DcfError.code] = DcfError


class PeerError(DcfError):
    """An error a peer sent with a code this version does not know: it keeps the peer's code and
    HTTP status. It states no code of its own (dcf never raises it for an error of its own)."""

    def __init__(self, message: str, code: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        if http_status:
            self.http_status = http_status


class ConfigError(DcfError):
    """A flag or DCF_* variable is missing, malformed or out of range."""

    code = "bad_config"


class ProtocolError(DcfError):
    """A frame or message does not follow docs/PROTOCOL.md."""

    code = "bad_message"


class VersionMismatch(ProtocolError):
    code = "bad_version"


class BadRequest(DcfError):
    """An HTTP request the API cannot read (e.g. a malformed body)."""

    code = "bad_request"


class MethodNotAllowed(DcfError):
    """An HTTP method the route does not take."""

    code = "method_not_allowed"
    http_status = 405


class HttpError(DcfError):
    """An HTTP error reply without dcf's JSON error body (e.g. from a proxy in front of the head);
    ``http_status`` is the reply's status."""

    code = "http_error"


class ValidationError(DcfError):
    """Input (array, job spec, file) is well-formed but not acceptable."""

    code = "invalid"
    http_status = 422


class TooLarge(ValidationError):
    code = "too_large"
    http_status = 413


class NoSpace(DcfError):
    """The head's state dir has no room for an upload, an array or a job's output files (its file system is
    full, or would leave less than the head's reserve free): that one request or job fails, the head goes on."""

    code = "no_space"
    http_status = 507


class WrongResult(ValidationError):
    """A provider's result is the right shape but the wrong numbers: it failed the head's check of its values
    (Freivalds' for matmul). The provider that sent it is quarantined."""

    code = "wrong_result"


class NotFound(DcfError):
    code = "not_found"
    http_status = 404


class Conflict(DcfError):
    """The request does not fit the object's current state (e.g. result of a running job)."""

    code = "conflict"
    http_status = 409


class Unauthorized(DcfError):
    code = "unauthorized"
    http_status = 401


class UnknownProvider(DcfError):
    """The head does not know this provider id (it restarted, or the provider was declared dead)."""

    code = "unknown_provider"


class InternalError(DcfError):
    """A bug: the request could not be handled (the process goes on)."""

    code = "internal"
    http_status = 500


class HeadUnreachable(DcfError):
    code = "head_unreachable"
    http_status = 503


class StandbyHead(HeadUnreachable):
    """The head asked is a standby (``--standby``): another head is active, or none is yet; nothing was done.
    A client given several heads tries the next; with one, it waits as for a head that is away."""

    code = "standby"


class QueueUnavailable(HeadUnreachable):
    """The head is up but its durable job queue (RabbitMQ) is not: the job was not accepted."""

    code = "queue_unavailable"


class TooManyJobs(QueueUnavailable):
    """The head holds as many unfinished jobs as it may (``--max-jobs``): the job was not accepted.
    A queue that is full for now, so a client waits and tries again as for ``QueueUnavailable``."""

    code = "too_many_jobs"


class WaitTimeout(DcfError, TimeoutError):
    """Waiting (for a job to end, a local cluster to come up) took longer than allowed. Also a
    ``TimeoutError``, so ``except TimeoutError`` catches it."""

    code = "timeout"
    http_status = 504


class TaskError(DcfError):
    """A subtask failed on a provider or its result could not be used."""

    code = "task_failed"
    http_status = 500


class DeviceError(DcfError):
    """The requested compute device is not available on this machine."""

    code = "bad_device"


def error_class(code: str) -> type[DcfError] | None:
    """The class of an error code, None for a code no class states."""
    return _BY_CODE.get(code)


def error_codes() -> dict[str, type[DcfError]]:
    """Every error code and its class (a copy)."""
    return dict(_BY_CODE)


def error_from_dict(data: object, http_status: int | None = None) -> DcfError:
    """Rebuild an error sent by a peer (``{"code": ..., "message": ...}``): the class of its code,
    a ``PeerError`` keeping an unknown code and ``http_status``, or an ``HttpError`` when ``data``
    is not an error object."""
    if not isinstance(data, dict):
        err = HttpError(f"unexpected error reply: {data!r:.200}")
        if http_status:
            err.http_status = http_status
        return err
    code = str(data.get("code", DcfError.code))
    message = str(data.get("message", code))
    cls = _BY_CODE.get(code)
    if cls is None:
        return PeerError(message, code, http_status)
    return cls(message)
