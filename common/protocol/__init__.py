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

Every other schema that crosses a socket or a queue is here too: the fields of a
``register`` (``parse_register`` -> ``ProviderHello``), the reply to a ``fetch``
(``blob_reply``), the RabbitMQ job message (``encode_job_message``/``decode_job_message``),
and ``check_fields``, with which a task type checks the nested ``params`` of its subtasks.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack
import numpy as np

from ..errors import ProtocolError, TooLarge, VersionMismatch
from ..ids import ID_RE as ID_RE  # re-exported (common/ids.py is light: the state-dir layout uses it)
from ..ids import check_id as check_id

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 16
MAX_NDIM = 8
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024**3

#: dtypes that may cross the wire, as numpy ``dtype.str`` (explicit byte order).
WIRE_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "|u1", "|i1", "|b1"})


_INT = (int,)
_NUM = (int, float)


@dataclass(frozen=True)
class Field:
    """One field of a schema. ``types`` are checked exactly (a bool is no int); an int must be
    >= 0 and a float finite, in the field and in the entries of a list. The other rules are
    optional: ``choices`` (the value is one of them), ``max_len`` (characters of a str, entries
    of a list or map), ``items`` (the types of a list's entries), ``fields`` (a map's own
    schema, checked the same way) and ``is_id`` (a str that is an id, ``ID_RE.fullmatch``)."""

    types: tuple[type, ...]
    required: bool = True
    choices: frozenset[Any] | None = None
    max_len: int | None = None
    items: tuple[type, ...] | None = None
    fields: Mapping[str, Field] | None = None
    is_id: bool = False


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
        "datasets": _f(list, required=False),  # the provider's local datasets (PROTOCOL.md 5.1): LOCAL_DATA
        "collectives": _f(list, required=False),  # torch.distributed backends it can join a group with
    },
    "heartbeat": {"provider_id": _f(str), "running": _f(list), "queued": _f(int),
                  "local_epoch": _f(str, required=False)},
    "unregister": {"provider_id": _f(str)},
    # max_bytes: the largest blob the provider's socket takes (PROTOCOL.md 5.1); larger -> too_large
    "fetch": {"provider_id": _f(str), "blob_id": _f(str), "max_bytes": _f(int, required=False)},
    # head -> provider, ROUTER -> REQ
    "registered": {"provider_id": _f(str), "epoch": _f(str), "heartbeat_interval_s": _f(*_NUM),
                   "state_dir": _f(str, required=False)},
    # reconnect: the head asks the provider to open its SUB and PUSH anew (its acks stopped coming, 5.1)
    "heartbeat_ack": {"epoch": _f(str), "subscribed": _f(bool, required=False),
                      "reconnect": _f(bool, required=False)},
    "ok": {},
    "blob": {"blob_id": _f(str)},
    "error": {"code": _f(str), "message": _f(str)},
    # head -> provider, XPUB -> SUB
    "subtask": {**_SUBTASK_KEY, "task_type": _f(str), "params": _f(dict), "shared": _f(dict, required=False),
                "cost": _f(*_NUM, required=False)},
    # stop a job's subtasks (all of them, or only ``subtask``): the job ended (PROTOCOL.md 5.2); optional
    "cancel": {"job_id": _f(str), "epoch": _f(str), "subtask": _f(int, required=False)},
    # provider -> head, PUSH -> PULL
    "ack": {**_SUBTASK_KEY, "provider_id": _f(str)},
    "result": {**_SUBTASK_KEY, "provider_id": _f(str), "elapsed_s": _f(*_NUM), "stats": _f(dict),
               "in_place": _f(bool, required=False)},
    "failed": {**_SUBTASK_KEY, "provider_id": _f(str), "error": _f(str), "retryable": _f(bool)},
    # optional: how far a long subtask has got (its own units, e.g. rows), and "stopped after a cancel"
    "progress": {**_SUBTASK_KEY, "provider_id": _f(str), "done": _f(int), "total": _f(int)},
    "cancelled": {**_SUBTASK_KEY, "provider_id": _f(str)},
}
#: what a provider receives on its SUB socket
TASK_CHANNEL_TYPES = ("subtask", "cancel")


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


def wire_dtype(dtype: np.dtype | str) -> str:
    """The wire name of a dtype (little-endian ``dtype.str``), or ProtocolError."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    name = dt.str
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"dtype {dt} cannot be sent; allowed: {sorted(WIRE_DTYPES)}")
    return name


def check_fields(what: str, data: Mapping[str, Any], schema: Mapping[str, Field]) -> dict[str, Any]:
    """Check the map ``data`` against ``schema``; return a copy of it (keys the schema does not
    name are kept, unchecked: forward compatible). ``what`` names the map in errors, e.g.
    ``"train subtask params"``. Raises ProtocolError."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what} must be a map, got {type(data).__name__}")
    for name, spec in schema.items():
        if name not in data:
            if spec.required:
                raise ProtocolError(f"{what}: missing field {name!r}")
            continue
        _check_value(what, name, data[name], spec)
    return dict(data)


def _check_value(what: str, name: str, value: Any, spec: Field) -> None:
    label = f"{what}: field {name!r}"
    _check_scalar(label, value, spec.types)
    if spec.is_id and not (isinstance(value, str) and ID_RE.fullmatch(value)):
        raise ProtocolError(f"{label} must be 32 lowercase hex digits, got {value!r:.60}")
    if spec.choices is not None and value not in spec.choices:
        raise ProtocolError(f"{label} must be one of {sorted(map(str, spec.choices))}, got {value!r:.40}")
    if spec.max_len is not None and isinstance(value, str | list | dict) and len(value) > spec.max_len:
        raise ProtocolError(f"{label} has {len(value)} entries or characters, at most {spec.max_len} allowed")
    if spec.items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            _check_scalar(f"{label}[{i}]", item, spec.items)
    if spec.fields is not None and isinstance(value, dict):
        check_fields(f"{what}.{name}", value, spec.fields)


def _check_scalar(label: str, value: Any, types: tuple[type, ...]) -> None:
    if isinstance(value, bool) and bool not in types:
        raise ProtocolError(f"{label} must be {_names(types)}, got bool")
    if not isinstance(value, types):
        raise ProtocolError(f"{label} must be {_names(types)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{label} must be finite")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ProtocolError(f"{label} must not be negative")


def _check_fields(mtype: str, header: Mapping[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"unknown message type {mtype!r:.40}")
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "arrays")}
    return check_fields(mtype, fields, schema)


def _names(types: tuple[type, ...]) -> str:
    return "|".join("null" if t is type(None) else t.__name__ for t in types)


def _header_too_large(size: int) -> NoReturn:
    raise TooLarge(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")


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
        bufs.append(arr.reshape(-1).data.cast("B") if arr.size else b"")
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": mtype, **fields, "arrays": metas},
                           use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        _header_too_large(len(header))
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
        _header_too_large(len(head))
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


def blob_reply(blob_id: str, array: np.ndarray, max_bytes: int | None = None) -> list[Any]:
    """The reply to a ``fetch``: ``blob`` with the array, or ``error{too_large}`` when the array
    is larger than the provider said its socket takes (``fetch.max_bytes``) or than any message
    may carry (DEFAULT_MAX_MESSAGE_BYTES): a frame over a receiver's ``ZMQ_MAXMSGSIZE`` would be
    dropped by libzmq with its connection, and the provider would only see a timeout."""
    limit = DEFAULT_MAX_MESSAGE_BYTES if max_bytes is None else min(max_bytes, DEFAULT_MAX_MESSAGE_BYTES)
    if array.nbytes > limit:
        return error_frames(TooLarge.code, f"blob {blob_id} has {array.nbytes} bytes; the limit is {limit}")
    return encode("blob", {"blob_id": blob_id}, [array])


# ---- register: what a provider says of itself ------------------------------------------------
DEVICE_KINDS = ("cpu", "cuda", "mps")
#: entries of each list of a register (task_types, dtypes)
MAX_REGISTER_LIST = 64
MAX_GFLOPS = 1e7
#: characters kept of each text field of a register (longer ones are cut, not refused)
REGISTER_TEXT_CHARS = {"name": 64, "host": 128, "os": 64, "device_name": 128, "version": 32}


@dataclass(frozen=True)
class LocalData:
    """One dataset a provider holds on its own disk (``--data NAME=PATH``): what it tells the head of it at
    registration. Its samples never leave the provider; ``key`` names its content (equal keys, equal data)."""

    name: str
    key: str  # 32 hex digits: common/tasks/train/datasets.py content_hash of x, y, x_test, y_test
    samples: int  # training samples
    test_samples: int
    shape: tuple[int, ...]  # the feature shape of one sample
    labels: tuple[int, int]  # the smallest and largest label (train and test)


#: the fields of one entry of ``register.datasets``
LOCAL_DATA = {"name": Field((str,), max_len=64), "key": Field((str,), max_len=32), "samples": Field((int,)),
              "test_samples": Field((int,)), "shape": Field((list,), items=(int,), max_len=8),
              "labels": Field((list,), items=(int,), max_len=2)}
#: the most datasets one provider may report
MAX_LOCAL_DATASETS = 16


@dataclass(frozen=True)
class ProviderHello:
    """A checked ``register``: the provider as the head knows it (texts cut to their limits)."""

    provider_id: str
    name: str
    host: str
    os: str
    device_kind: str
    device_name: str
    memory_bytes: int
    cores: int
    task_types: frozenset[str]
    dtypes: frozenset[str]
    version: str
    gflops: float
    datasets: tuple[LocalData, ...] = ()
    collectives: frozenset[str] = frozenset()  # "gloo", "nccl": the process groups it can join (allreduce)


def parse_register(msg: Message) -> ProviderHello:
    """The provider a ``register`` describes (PROTOCOL.md 5.1); ProtocolError if any field is out
    of its range: ``gflops`` in (0, 1e7), ``device_kind`` cpu/cuda/mps, at most 64 strings per list."""
    if msg.type != "register":
        raise ProtocolError(f"expected a register message, got {msg.type!r:.40}")
    fields = _check_fields("register", msg.fields)
    pid = check_id(fields["provider_id"], "provider_id")
    gflops = float(fields["gflops"])
    if not 0 < gflops < MAX_GFLOPS:
        raise ProtocolError("register: gflops must be positive")
    if fields["device_kind"] not in DEVICE_KINDS:
        raise ProtocolError("register: device_kind must be cpu, cuda or mps")
    text = {name: fields[name][:chars] for name, chars in REGISTER_TEXT_CHARS.items()}
    return ProviderHello(
        provider_id=pid, name=text["name"] or pid[:8], host=text["host"], os=text["os"],
        device_kind=fields["device_kind"], device_name=text["device_name"], memory_bytes=fields["memory_bytes"],
        cores=fields["cores"], task_types=_strings(fields, "task_types"), dtypes=_strings(fields, "dtypes"),
        version=text["version"], gflops=gflops, datasets=_local_data(fields.get("datasets", [])),
        collectives=_strings(fields, "collectives") if "collectives" in fields else frozenset())


def _local_data(entries: Any) -> tuple[LocalData, ...]:
    if len(entries) > MAX_LOCAL_DATASETS:
        raise ProtocolError(f"register: at most {MAX_LOCAL_DATASETS} datasets")
    out = []
    for i, entry in enumerate(entries):
        f = check_fields(f"register: datasets[{i}]", entry, LOCAL_DATA)
        if not ID_RE.fullmatch(f["key"]) or len(f["labels"]) != 2 or not f["name"] or f["samples"] < 1:
            raise ProtocolError(f"register: datasets[{i}] needs a name, a 32-hex key, samples >= 1 and "
                                "labels [smallest, largest]")
        out.append(LocalData(f["name"], f["key"], f["samples"], f["test_samples"], tuple(f["shape"]),
                             (f["labels"][0], f["labels"][1])))
    if len({d.name for d in out}) != len(out):
        raise ProtocolError("register: two datasets with the same name")
    return tuple(out)


def _strings(fields: Mapping[str, Any], name: str) -> frozenset[str]:
    values = fields[name]
    if not all(isinstance(v, str) for v in values) or len(values) > MAX_REGISTER_LIST:
        raise ProtocolError(f"register: {name} must be a list of strings")
    return frozenset(values)


# ---- the RabbitMQ job message ----------------------------------------------------------------
JOB_MESSAGE_VERSION = 1
#: the largest job message (it holds the job's spec and blob ids, never bulk data)
MAX_JOB_MESSAGE_BYTES = 1 << 20
#: numpy names of the dtypes a job's arrays may have: those that can cross the wire
JOB_DTYPES = frozenset(np.dtype(d).name for d in WIRE_DTYPES)
_NAME_CHARS = 64
_JOB_ARRAYS = 64  # inputs, outputs: at most this many each
_SHAPE = Field((list,), max_len=64, items=(int,))
_OUTPUT_META = {"dtype": Field((str,), choices=JOB_DTYPES), "shape": _SHAPE}
_INPUT_META = {"blob": Field((str,), is_id=True, required=False), **_OUTPUT_META}
JOB_MESSAGE: dict[str, Field] = {
    "job_id": Field((str,), is_id=True), "type": Field((str,), max_len=_NAME_CHARS), "params": _f(dict),
    "inputs": Field((dict,), max_len=_JOB_ARRAYS), "outputs": Field((dict,), max_len=_JOB_ARRAYS),
    "nodes": _f(int, type(None), required=False), "created_at": _f(int, float),
    "inline": Field((dict,), required=False, max_len=_JOB_ARRAYS),
}


def encode_job_message(record: Mapping[str, Any]) -> bytes:
    """A job's queue message (``JobRecord.message()``) as the bytes on the queue: a msgpack map,
    ``v`` first, then the record's fields in its order. Checked as ``decode_job_message`` checks it."""
    body: bytes = msgpack.packb({"v": JOB_MESSAGE_VERSION, **record}, use_bin_type=True)
    decode_job_message(body)
    return body


def job_message(record: Mapping[str, Any]) -> dict[str, Any]:
    """The job message's fields of a stored job row (which holds more: state, times, stats)."""
    return {name: record.get(name) for name in JOB_MESSAGE if name != "inline" or record.get("inline")}


#: the AMQP header that carries a job message's signature (PROTOCOL.md section 13)
JOB_SIGNATURE_HEADER = "dcf-signature"


def sign_job_message(body: bytes, key: bytes) -> str:
    """The signature of a job message's body: HMAC-SHA256 under the state dir's queue key, in hex."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def check_job_signature(body: bytes, signature: object, key: bytes) -> None:
    """ProtocolError unless ``signature`` (the message's ``dcf-signature`` header) is the body's, under
    ``key``: a message no head of this state dir published (injected by someone with broker
    credentials) never runs."""
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    if not isinstance(signature, str):
        raise ProtocolError(f"job message has no {JOB_SIGNATURE_HEADER} header: not published by a head")
    if not hmac.compare_digest(signature.encode("ascii", "replace"), sign_job_message(body, key).encode()):
        raise ProtocolError(f"job message has a wrong {JOB_SIGNATURE_HEADER}: not published by a head of this "
                            "state dir (another queue key), or changed on the way")


def decode_job_message(body: bytes) -> dict[str, Any]:
    """The job message's fields (job_id, type, params, inputs, outputs, nodes, created_at), every
    one checked; unknown fields are dropped. Raises TooLarge, VersionMismatch or ProtocolError."""
    if len(body) > MAX_JOB_MESSAGE_BYTES:
        raise TooLarge(f"job message of {len(body)} bytes exceeds {MAX_JOB_MESSAGE_BYTES}")
    try:
        record = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types for garbage
        raise ProtocolError("job message is not msgpack") from None
    if not isinstance(record, dict):
        raise ProtocolError("job message must be a msgpack map")
    version = record.get("v")
    if type(version) is not int or version != JOB_MESSAGE_VERSION:
        raise VersionMismatch(f"job message has no version {JOB_MESSAGE_VERSION} header (v = {version!r:.20})")
    check_fields("job message", record, JOB_MESSAGE)
    nodes = record.get("nodes")
    if nodes is not None and nodes < 1:
        raise ProtocolError("job message: field 'nodes' must be a positive int or null")
    if record["created_at"] < 0:
        raise ProtocolError("job message: field 'created_at' must not be negative")
    _array_metas("job message: inputs", record["inputs"], _INPUT_META)
    _array_metas("job message: outputs", record["outputs"], _OUTPUT_META, identifiers=True)
    _inline_inputs(record["inputs"], record.get("inline") or {})
    return job_message(record)


def _inline_inputs(inputs: Mapping[str, Any], inline: Mapping[Any, Any]) -> None:
    """Each input is a blob or inline bytes of exactly its dtype and shape, never both or neither."""
    for name, meta in inputs.items():
        data = inline.get(name)
        if ("blob" in meta) == (data is not None):
            raise ProtocolError(f"job message: input {name!r:.80} must have a blob id or inline bytes, not "
                                f"{'both' if data is not None else 'neither'}")
        if data is not None:
            if not isinstance(data, bytes):
                raise ProtocolError(f"job message: inline input {name!r:.80} must be bin")
            need = math.prod(meta["shape"]) * np.dtype(meta["dtype"]).itemsize
            if len(data) != need:
                raise ProtocolError(f"job message: inline input {name!r:.80} has {len(data)} bytes, its dtype "
                                    f"and shape need {need}")
    stray = set(inline) - set(inputs)
    if stray:
        raise ProtocolError(f"job message: inline bytes for unknown inputs {sorted(map(str, stray))[:5]}")


def _array_metas(what: str, metas: Mapping[Any, Any], schema: Mapping[str, Field], identifiers: bool = False) -> None:
    """Names (outputs: identifiers, they name files) -> ``{"dtype", "shape"[, "blob"]}``."""
    for name, meta in metas.items():
        if not isinstance(name, str) or not 0 < len(name) <= _NAME_CHARS or (identifiers and not name.isidentifier()):
            raise ProtocolError(f"{what}: bad name {name!r:.80}")
        check_fields(f"{what}.{name}", meta, schema)
        if any(d >= 2**40 for d in meta["shape"]):
            raise ProtocolError(f"{what}.{name}: every dimension must be below 2**40")
