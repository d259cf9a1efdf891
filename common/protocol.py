"""The dcf wire format. This module alone encodes and decodes frames (docs/PROTOCOL.md).

A message is a ZeroMQ multipart message::

    [topic]        PUB-SUB only: the 32-hex-digit provider id, ASCII
    header         msgpack map, at most MAX_HEADER_BYTES
    buffer ...     one raw, C-ordered buffer per entry of header["arrays"]

The header always holds ``v`` (protocol version), ``type`` (message type) and
``arrays`` (a list of ``{"dtype": "<f8", "shape": [rows, cols]}``); every other key
is a field of that message type, checked against SCHEMAS. Arrays are sent with
``copy=False`` and decoded with ``numpy.frombuffer``: no copy on either side.
Nothing is ever pickled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError, TooLarge, VersionMismatch

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 16
MAX_NDIM = 8
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024**3

#: dtypes that may cross the wire, as numpy ``dtype.str`` (explicit byte order).
WIRE_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "|u1", "|i1", "|b1"})

ID_RE = re.compile(r"[0-9a-f]{32}")  # use with fullmatch

_INT = (int,)
_NUM = (int, float)


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    required: bool = True


def _f(*types: type, required: bool = True) -> Field:
    return Field(tuple(types), required)


_SUBTASK_KEY = {"job_id": _f(str), "subtask": _f(int), "attempt": _f(int), "epoch": _f(str)}

#: message type -> field -> Field. Unknown fields are ignored (forward compatible);
#: missing required fields or wrong types are errors.
SCHEMAS: dict[str, dict[str, Field]] = {
    # provider -> head, REQ -> ROUTER
    "register": {
        "provider_id": _f(str), "name": _f(str), "host": _f(str), "os": _f(str),
        "device_kind": _f(str), "device_name": _f(str), "memory_bytes": _f(int),
        "cores": _f(int), "task_types": _f(list), "dtypes": _f(list),
        "version": _f(str), "gflops": _f(*_NUM),
    },
    "heartbeat": {"provider_id": _f(str), "running": _f(list), "queued": _f(int),
                  "local_epoch": _f(str, required=False)},
    "unregister": {"provider_id": _f(str)},
    "fetch": {"provider_id": _f(str), "blob_id": _f(str)},
    # head -> provider, ROUTER -> REQ
    "registered": {"provider_id": _f(str), "epoch": _f(str), "heartbeat_interval_s": _f(*_NUM),
                   "state_dir": _f(str, required=False)},
    "heartbeat_ack": {"epoch": _f(str), "subscribed": _f(bool, required=False)},
    "ok": {},
    "blob": {"blob_id": _f(str)},
    "error": {"code": _f(str), "message": _f(str)},
    # head -> provider, XPUB -> SUB
    "subtask": {**_SUBTASK_KEY, "task_type": _f(str), "params": _f(dict), "shared": _f(dict, required=False),
                "cost": _f(*_NUM, required=False)},
    # provider -> head, PUSH -> PULL
    "ack": {**_SUBTASK_KEY, "provider_id": _f(str)},
    "result": {**_SUBTASK_KEY, "provider_id": _f(str), "elapsed_s": _f(*_NUM), "stats": _f(dict),
               "in_place": _f(bool, required=False)},
    "failed": {**_SUBTASK_KEY, "provider_id": _f(str), "error": _f(str), "retryable": _f(bool)},
}


@dataclass(frozen=True)
class Message:
    """A decoded message: its type, its header fields and its arrays (read-only views)."""

    type: str
    fields: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def check_id(value: object, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ProtocolError(f"{what} must be 32 lowercase hex digits, got {value!r:.60}")
    return value


def wire_dtype(dtype: np.dtype | str) -> str:
    """The wire name of a dtype (little-endian ``dtype.str``), or ProtocolError."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    name = dt.str
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"dtype {dt} cannot be sent; allowed: {sorted(WIRE_DTYPES)}")
    return name


def _check_fields(mtype: str, header: Mapping[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"unknown message type {mtype!r:.40}")
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "arrays")}
    for name, spec in schema.items():
        if name not in fields:
            if spec.required:
                raise ProtocolError(f"{mtype}: missing field {name!r}")
            continue
        value = fields[name]
        if isinstance(value, bool) and bool not in spec.types:
            raise ProtocolError(f"{mtype}: field {name!r} must be {_names(spec.types)}, got bool")
        if not isinstance(value, spec.types):
            raise ProtocolError(
                f"{mtype}: field {name!r} must be {_names(spec.types)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{mtype}: field {name!r} must be finite")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ProtocolError(f"{mtype}: field {name!r} must not be negative")
    return fields


def _names(types: tuple[type, ...]) -> str:
    return "|".join(t.__name__ for t in types)


def _array_meta(arr: np.ndarray) -> dict[str, Any]:
    return {"dtype": wire_dtype(arr.dtype), "shape": list(arr.shape)}


def encode(mtype: str, fields: Mapping[str, Any] | None = None,
           arrays: Sequence[np.ndarray] = (), topic: bytes | None = None) -> list[Any]:
    """Build the frames of one message. Arrays are passed as buffers, not copied
    (unless they are not C-contiguous or not little-endian)."""
    fields = dict(fields or {})
    _check_fields(mtype, fields)
    if len(arrays) > MAX_ARRAYS:
        raise ProtocolError(f"at most {MAX_ARRAYS} arrays per message")
    bufs = []
    metas = []
    for arr in arrays:
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        metas.append(_array_meta(arr))
        bufs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": mtype, **fields, "arrays": metas},
                           use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    frames: list[Any] = [topic] if topic is not None else []
    frames.append(header)
    frames.extend(bufs)
    return frames


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return buf if buf is not None else memoryview(frame)


def decode(frames: Sequence[Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
           expect: Iterable[str] | None = None) -> Message:
    """Parse and validate one message (without topic frame). Raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ProtocolError(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version!r:.20} not supported (this peer speaks "
                              f"{PROTOCOL_VERSION})")
    mtype = header.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError("header field 'type' must be a string")
    if expect is not None and mtype not in expect:
        raise ProtocolError(f"message type {mtype!r:.40} not accepted on this socket")
    fields = _check_fields(mtype, header)
    arrays = _decode_arrays(header.get("arrays", []), frames[1:], max_bytes)
    return Message(mtype, fields, arrays)


def _decode_arrays(metas: Any, buffers: Sequence[Any], max_bytes: int) -> list[np.ndarray]:
    if not isinstance(metas, list) or len(metas) > MAX_ARRAYS:
        raise ProtocolError(f"'arrays' must be a list of at most {MAX_ARRAYS} entries")
    if len(metas) != len(buffers):
        raise ProtocolError(f"header declares {len(metas)} arrays but {len(buffers)} buffer frames follow")
    total = 0
    arrays = []
    for i, (meta, frame) in enumerate(zip(metas, buffers, strict=True)):
        dtype, shape = _check_array_meta(i, meta)
        nbytes = dtype.itemsize * math.prod(shape)
        total += nbytes
        if total > max_bytes:
            raise TooLarge(f"arrays declare {total} bytes, limit is {max_bytes}")
        buf = _buffer(frame)
        if buf.nbytes != nbytes:
            raise ProtocolError(f"array {i}: {shape} {dtype} needs {nbytes} bytes, frame has {buf.nbytes}")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return arrays


def _check_array_meta(i: int, meta: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if not isinstance(meta, dict):
        raise ProtocolError(f"array {i}: descriptor must be a map")
    dtype = meta.get("dtype")
    shape = meta.get("shape")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ProtocolError(f"array {i}: dtype {dtype!r:.20} not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise ProtocolError(f"array {i}: shape must be a list of at most {MAX_NDIM} non-negative ints")
    return np.dtype(dtype), tuple(shape)


def error_frames(code: str, message: str) -> list[Any]:
    return encode("error", {"code": code, "message": message[:500]})
