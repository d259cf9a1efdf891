"""The batch API's bodies (docs/PROTOCOL.md §14): many jobs in one HTTP request, their outcomes and
small results in one reply, as msgpack with arrays as raw bytes (no base64, no pickle)::

    POST /v1/jobs/batch   {"v": 1, "jobs": [spec, ...], "wait": s}
    POST /v1/jobs/gather  {"v": 1, "job_ids": [id, ...], "wait": s, "forget": bool}
    reply to both         {"v": 1, "jobs": [outcome, ...]}         (in request order)

    spec     {"type": str, "inputs": {name: blob id | array}, "params": map, "nodes": int | nil,
              "idempotency_key": str}                                 (params, nodes, key: optional)
    array    {"dtype": "float64", "shape": [r, c], "data": bin}      (C order, little-endian)
    outcome  {"job_id", "state", "error": str | nil[, "results": {name: array}][, "outputs": [name]]}

A done job has ``results`` when its outputs are inline (at most ``MAX_INLINE_BYTES`` in all), else
``outputs``, the names to fetch with GET /v1/jobs/{id}/result?name=NAME. A batch is accepted
whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from ..arrays import dtype_name
from ..errors import ProtocolError, TooLarge, ValidationError, VersionMismatch
from ..npyfmt import ACCEPTED_DTYPES

BATCH_VERSION = 1
#: the most jobs one batch request submits or gathers
MAX_BATCH_JOBS = 10_000
#: the largest batch request body
MAX_BATCH_BYTES = 64 * 1024 * 1024
#: the most bytes of inline arrays one job carries (inputs in a spec; results in an outcome)
MAX_INLINE_BYTES = 256 * 1024
#: the longest a batch or gather request waits for its jobs to end
MAX_WAIT_S = 60.0
MAX_PARAMS_DEPTH = 32
MAX_PARAMS_BYTES = 64 * 1024
_MAX_NDIM = 8
_NAME_CHARS = 64
#: an idempotency key (the ``Idempotency-Key`` header of POST /v1/jobs, a batch spec's
#: ``idempotency_key``): 1 to 128 ASCII letters, digits and ``. _ : -`` (a UUID fits)
MAX_IDEMPOTENCY_KEY = 128
IDEMPOTENCY_KEY_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_IDEMPOTENCY_KEY}}}")


@dataclass(frozen=True)
class JobSpec:
    """One job of a batch, checked: blob inputs by id, inline inputs as read-only arrays."""

    type: str
    blobs: dict[str, str]
    inline: dict[str, np.ndarray]
    params: dict[str, Any]
    nodes: int | None
    #: the client's key for this submission: a retry with the same key is the same job, not a new one
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """What a retry under the same idempotency key must repeat: the task type, params, nodes and
        inputs (blob ids; inline arrays' dtype, shape and bytes), as a SHA-256 hex digest."""
        h = hashlib.sha256(json.dumps([self.type, self.params, self.nodes, sorted(self.blobs.items())],
                                      sort_keys=True, separators=(",", ":")).encode())
        for name in sorted(self.inline):
            arr = self.inline[name]
            h.update(f"|{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def check_idempotency_key(what: str, key: Any) -> str:
    """An idempotency key as sent, checked (ValidationError naming ``what`` and the rule)."""
    if not isinstance(key, str) or not IDEMPOTENCY_KEY_RE.fullmatch(key):
        shown = repr(key)[:40] if isinstance(key, str) else type(key).__name__
        raise ValidationError(f"{what}: an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} ASCII letters, digits "
                              f"and . _ : - (got {shown})")
    return key


@dataclass(frozen=True)
class BatchRequest:
    jobs: list[JobSpec]
    wait: float


@dataclass(frozen=True)
class GatherRequest:
    job_ids: list[str]
    wait: float
    forget: bool


# ---- arrays ------------------------------------------------------------------------------------
def pack_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as a msgpack map; its buffer goes as bin without a copy when it is C-ordered."""
    arr = np.ascontiguousarray(arr)
    if dtype_name(arr.dtype) not in ACCEPTED_DTYPES:
        raise ValidationError(f"dtype {arr.dtype} cannot travel inline; use one of {', '.join(ACCEPTED_DTYPES)}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data": arr.reshape(-1).data.cast("B")}


def unpack_array(what: str, obj: Any, max_bytes: int = MAX_INLINE_BYTES) -> np.ndarray:
    """The array a map holds, checked (dtype, shape, exact length); a read-only view of its bytes."""
    if not isinstance(obj, Mapping) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{what}: an inline array is a map of dtype, shape and data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in ACCEPTED_DTYPES:
        raise ProtocolError(f"{what}: dtype {dtype!r:.20} is not one of {', '.join(ACCEPTED_DTYPES)}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_NDIM
            or not all(type(d) is int and 0 < d < 2**40 for d in shape)):
        raise ProtocolError(f"{what}: shape must be 1 to {_MAX_NDIM} positive ints")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what}: data must be bin")
    if len(data) > max_bytes:
        raise TooLarge(f"{what}: {len(data)} bytes inline exceed the {max_bytes} byte limit; upload it "
                       "(PUT /v1/blobs) and pass its blob id")
    item = np.dtype(dtype).newbyteorder("<")
    need = math.prod(shape) * item.itemsize
    if len(data) != need:
        raise ProtocolError(f"{what}: {len(data)} bytes of data, the shape {shape} needs {need}")
    return np.frombuffer(data, dtype=item).reshape(shape)


# ---- requests ----------------------------------------------------------------------------------
def _unpack(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_BATCH_BYTES:
        raise TooLarge(f"{what} of {len(body)} bytes exceeds the {MAX_BATCH_BYTES} byte limit")
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types for garbage
        raise ProtocolError(f"{what} is not msgpack") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} must be a msgpack map")
    if doc.get("v") != BATCH_VERSION or type(doc.get("v")) is not int:
        raise VersionMismatch(f"{what} has no version {BATCH_VERSION} header (v = {doc.get('v')!r:.20})")
    return doc


def _wait(doc: Mapping[str, Any], what: str) -> float:
    wait = doc.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT_S:
        raise ValidationError(f"{what}: wait must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    return float(wait)


def _list(doc: Mapping[str, Any], key: str, what: str) -> list[Any]:
    items = doc.get(key)
    if not isinstance(items, list) or not items:
        raise ProtocolError(f"{what}: {key} must be a non-empty list")
    if len(items) > MAX_BATCH_JOBS:
        raise TooLarge(f"{what}: {len(items)} jobs exceed the limit of {MAX_BATCH_JOBS} per request")
    return items


def decode_batch_request(body: bytes) -> BatchRequest:
    """POST /v1/jobs/batch; raises TooLarge (413), ValidationError (422) or ProtocolError (400),
    naming the job (``jobs[i]``) and the limit."""
    doc = _unpack(body, "batch request")
    specs = [decode_spec(f"jobs[{i}]", spec) for i, spec in enumerate(_list(doc, "jobs", "batch request"))]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.idempotency_key is not None:
            first = seen.setdefault(spec.idempotency_key, i)
            if first != i:
                raise ValidationError(f"jobs[{i}]: idempotency key {spec.idempotency_key!r} is also jobs[{first}]'s")
    return BatchRequest(specs, _wait(doc, "batch request"))


def decode_gather_request(body: bytes) -> GatherRequest:
    doc = _unpack(body, "gather request")
    ids = _list(doc, "job_ids", "gather request")
    if not all(isinstance(i, str) and len(i) == 32 for i in ids):
        raise ProtocolError("gather request: job_ids must be job ids (32 hex digits)")
    forget = doc.get("forget", False)
    if not isinstance(forget, bool):
        raise ProtocolError("gather request: forget must be true or false")
    return GatherRequest(ids, _wait(doc, "gather request"), forget)


def decode_spec(what: str, spec: Any) -> JobSpec:
    if not isinstance(spec, dict):
        raise ProtocolError(f"{what} must be a map")
    unknown = set(spec) - {"type", "inputs", "params", "nodes", "idempotency_key"}
    if unknown:
        raise ProtocolError(f"{what}: unknown fields {sorted(unknown)}")
    task_type, inputs = spec.get("type"), spec.get("inputs", {})
    params, nodes = spec.get("params", {}), spec.get("nodes")
    if not isinstance(task_type, str) or not 0 < len(task_type) <= _NAME_CHARS:
        raise ProtocolError(f"{what}: type must be a task type name")
    if not isinstance(inputs, dict) or len(inputs) > _NAME_CHARS:
        raise ProtocolError(f"{what}: inputs must be a map of at most {_NAME_CHARS} names")
    if nodes is not None and (type(nodes) is not int or not 1 <= nodes <= 100_000):
        raise ValidationError(f"{what}: nodes must be an int from 1 to 100000, or nil")
    blobs: dict[str, str] = {}
    inline: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        if not isinstance(name, str) or not 0 < len(name) <= _NAME_CHARS:
            raise ProtocolError(f"{what}: bad input name {name!r:.80}")
        if isinstance(value, str):
            blobs[name] = value
        else:
            inline[name] = unpack_array(f"{what}.inputs.{name}", value)
    if sum(a.nbytes for a in inline.values()) > MAX_INLINE_BYTES:
        raise TooLarge(f"{what}: its inline inputs exceed {MAX_INLINE_BYTES} bytes in all; upload the larger ones")
    key = spec.get("idempotency_key")
    if key is not None:
        key = check_idempotency_key(what, key)
    return JobSpec(task_type, blobs, inline, check_params(what, params), nodes, key)


def check_params(what: str, params: Any) -> dict[str, Any]:
    """Job params are stored and echoed as JSON: a JSON object, shallow and small."""
    if not isinstance(params, dict):
        raise ValidationError(f"{what}: params must be a map")
    try:
        text = json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what}: params must be plain JSON data ({exc})") from None
    if len(text) > MAX_PARAMS_BYTES:
        raise ValidationError(f"{what}: params exceed {MAX_PARAMS_BYTES} bytes as JSON")
    if json_depth(params) > MAX_PARAMS_DEPTH:
        raise ValidationError(f"{what}: params nest deeper than {MAX_PARAMS_DEPTH} levels")
    return params


def json_depth(value: Any) -> int:
    """Nesting depth of JSON-like data, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def encode_batch_request(jobs: Sequence[Mapping[str, Any]], wait: float = 0.0) -> bytes:
    """A client's batch body; each job ``{"type", "inputs": {name: blob id | ndarray}, "params", "nodes"}``,
    and ``"idempotency_key"`` if it has one."""
    packed = [{"type": j["type"], "params": j.get("params") or {}, "nodes": j.get("nodes"),
               "inputs": {n: v if isinstance(v, str) else pack_array(v) for n, v in (j.get("inputs") or {}).items()},
               **({"idempotency_key": j["idempotency_key"]} if j.get("idempotency_key") else {})}
              for j in jobs]
    return _pack({"v": BATCH_VERSION, "jobs": packed, "wait": wait})


def encode_gather_request(job_ids: Sequence[str], wait: float = 0.0, forget: bool = False) -> bytes:
    return _pack({"v": BATCH_VERSION, "job_ids": list(job_ids), "wait": wait, "forget": forget})


# ---- the reply ---------------------------------------------------------------------------------
def encode_outcomes(outcomes: Sequence[Mapping[str, Any]]) -> bytes:
    """The head's reply: each outcome ``{"job_id", "state", "error"[, "results": {name: ndarray}]}``."""
    jobs = []
    for o in outcomes:
        item = {"job_id": o["job_id"], "state": o["state"], "error": o.get("error")}
        if o.get("results") is not None:
            item["results"] = {n: pack_array(a) for n, a in o["results"].items()}
        if o.get("outputs") is not None:
            item["outputs"] = list(o["outputs"])
        jobs.append(item)
    return _pack({"v": BATCH_VERSION, "jobs": jobs})


def decode_outcomes(body: bytes) -> list[dict[str, Any]]:
    """The client's side: outcomes with their results as read-only arrays; ProtocolError if malformed."""
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_BATCH_BYTES * 4)
    except Exception:
        raise ProtocolError("the head's batch reply is not msgpack") from None
    if not isinstance(doc, dict) or doc.get("v") != BATCH_VERSION or not isinstance(doc.get("jobs"), list):
        raise ProtocolError("the head's batch reply has no version 1 header or no jobs")
    out = []
    for i, o in enumerate(doc["jobs"]):
        if not isinstance(o, dict) or not isinstance(o.get("job_id"), str) or not isinstance(o.get("state"), str):
            raise ProtocolError(f"the head's batch reply: jobs[{i}] is malformed")
        results = o.get("results")
        if results is not None:
            if not isinstance(results, dict):
                raise ProtocolError(f"the head's batch reply: jobs[{i}].results is not a map")
            o["results"] = {n: unpack_array(f"jobs[{i}].results.{n}", a, MAX_BATCH_BYTES) for n, a in results.items()}
        out.append(o)
    return out


def _pack(doc: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(doc, use_bin_type=True)
    return body
