"""The one exception tree of dcf.

Every error carries a short machine-readable ``code`` and an HTTP status, so the
same exception can be logged on the head, sent back to a provider as an
``error`` message, or returned to an HTTP client as a 4xx JSON body.
"""

from __future__ import annotations


class DcfError(Exception):
    """Base class of every error dcf raises on purpose."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(DcfError):
    """A flag or DCF_* variable is missing, malformed or out of range."""

    code = "bad_config"


class ProtocolError(DcfError):
    """A frame or message does not follow docs/PROTOCOL.md."""

    code = "bad_message"


class VersionMismatch(ProtocolError):
    code = "bad_version"


class ValidationError(DcfError):
    """Input (array, job spec, file) is well-formed but not acceptable."""

    code = "invalid"
    http_status = 422


class TooLarge(ValidationError):
    code = "too_large"
    http_status = 413


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


class QueueUnavailable(HeadUnreachable):
    """The head is up but its durable job queue (RabbitMQ) is not: the job was not accepted."""

    code = "queue_unavailable"


class TaskError(DcfError):
    """A subtask failed on a provider or its result could not be used."""

    code = "task_failed"
    http_status = 500


class DeviceError(DcfError):
    """The requested compute device is not available on this machine."""

    code = "bad_device"


def error_from_dict(data: object, http_status: int | None = None) -> DcfError:
    """Rebuild an error sent by a peer (``{"code": ..., "message": ...}``)."""
    if not isinstance(data, dict):
        return DcfError(f"unexpected error reply: {data!r:.200}")
    code = str(data.get("code", "error"))
    message = str(data.get("message", code))
    for cls in (NotFound, Conflict, Unauthorized, TooLarge, ValidationError, VersionMismatch,
                ProtocolError, ConfigError, TaskError, HeadUnreachable, QueueUnavailable):
        if cls.code == code:
            return cls(message)
    err = DcfError(message, code=code)
    if http_status:
        err.http_status = http_status
    return err
