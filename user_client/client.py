"""Python API of dcf::

    from user_client import Client
    c = Client("http://127.0.0.1:8080")
    C = c.matmul(A, B)              # submit, wait, fetch
    job = c.submit_matmul(A, B)     # or step by step
    c.wait(job); C = c.result(job)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common import layout
from common.errors import (
    DcfError,
    HeadUnreachable,
    QueueUnavailable,
    TaskError,
    ValidationError,
    error_from_dict,
)
from common.npyfmt import ACCEPTED_DTYPES, npy_header, parse_npy_header

Progress = Callable[[int, int], None]  # (done, total)
CHUNK = 4 * 1024 * 1024
TERMINAL = ("done", "failed", "cancelled")


def check_operand(arr: Any, name: str) -> np.ndarray:
    """The array as it will be sent: 2-D, non-empty, C-ordered float32/float64. Ints are cast."""
    arr = np.asarray(arr)
    if arr.dtype.hasobject or arr.dtype.kind not in "fiub":
        raise ValidationError(f"{name}: dtype {arr.dtype} is not numeric")
    if arr.dtype.kind in "iub" or arr.dtype.name not in ("float32", "float64"):
        arr = arr.astype(np.float64)
    if arr.ndim == 0:
        raise ValidationError(f"{name}: 0-d arrays cannot be multiplied")
    if arr.size == 0:
        raise ValidationError(f"{name}: empty array (shape {list(arr.shape)})")
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))


def wire_array(arr: Any) -> np.ndarray:
    """Any array as the head stores it: non-empty, C-ordered, little-endian float32/float64/int64/int32."""
    arr = np.asarray(arr)
    if arr.dtype.name not in ACCEPTED_DTYPES:
        raise ValidationError(f"dtype {arr.dtype} cannot be uploaded; use one of {', '.join(ACCEPTED_DTYPES)}")
    if arr.ndim == 0 or arr.size == 0:
        raise ValidationError(f"cannot upload an empty or 0-d array (shape {list(arr.shape)})")
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))


class Client:
    """``shared_files="auto"`` (default, env DCF_SHARED_FILES): when this client runs on the head's
    machine and can use its state dir, arrays are exchanged as files there instead of over HTTP."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 shared_files: str | None = None, queue_wait: float | None = None) -> None:
        self.url = (url or os.environ.get("DCF_HEAD_URL") or "http://127.0.0.1:8080").rstrip("/")
        mode = shared_files or os.environ.get("DCF_SHARED_FILES", "auto")
        if mode not in ("auto", "off"):
            raise ValidationError(f"shared_files must be auto or off, got {mode!r}")
        self._shared: Path | None | bool = None if mode == "auto" else False
        token = token if token is not None else os.environ.get("DCF_API_TOKEN", "")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        #: seconds ``submit`` keeps retrying while the head's job queue (RabbitMQ) is unreachable
        try:
            self.queue_wait = float(queue_wait if queue_wait is not None else os.environ.get("DCF_QUEUE_WAIT", 60.0))
        except (TypeError, ValueError):
            raise ValidationError(f"queue_wait (DCF_QUEUE_WAIT) must be a number of seconds, got "
                                  f"{queue_wait or os.environ.get('DCF_QUEUE_WAIT')!r}") from None
        if not (self.queue_wait >= 0 and self.queue_wait != float("inf")):
            raise ValidationError(f"queue_wait must be >= 0 seconds, got {self.queue_wait!r}")
        #: called as on_queue_wait(message, seconds_left) before each retry of a refused submission
        self.on_queue_wait: Callable[[str, float], None] | None = None
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0), trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        tries = 2 if method == "GET" else 1  # a pooled connection the server closed: GET again
        for attempt in range(tries):
            try:
                resp = self.http.request(method, path, **kw)
                break
            except httpx.TransportError as exc:
                if attempt + 1 == tries:
                    raise HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        self._raise_for(resp)
        return resp

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            body = resp.json().get("error")
        except Exception:
            body = {"code": "http_error", "message": f"HTTP {resp.status_code}: {resp.text[:200]}"}
        raise error_from_dict(body, resp.status_code)

    # ---- API --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health").json()

    def shared_dir(self) -> Path | None:
        """The head's state dir if this client shares it (same machine, readable marker), else None."""
        if self._shared is None:
            self._shared = False
            try:
                info = self._request("GET", "/v1/info").json()
                root = Path(info["state_dir"])
                if layout.read_marker(root) == info["epoch"] and os.access(root / "incoming", os.W_OK):
                    self._shared = root
            except (DcfError, KeyError, TypeError, ValueError, OSError):
                pass
        return self._shared or None

    def upload(self, arr: np.ndarray, progress: Progress | None = None) -> dict[str, Any]:
        """Send one array to the head's store; returns ``{"blob_id", "dtype", "shape", ...}``."""
        arr = wire_array(arr)
        root = self.shared_dir()
        if root is not None:
            upload_id = uuid.uuid4().hex
            path = layout.incoming_path(root, upload_id)
            try:
                with open(path, "wb") as f:
                    f.write(npy_header(arr))
                    f.write(memoryview(arr.reshape(-1)).cast("B"))
            except OSError:
                path.unlink(missing_ok=True)
            else:
                if progress:
                    progress(arr.nbytes, arr.nbytes)
                return self._request("POST", "/v1/blobs/adopt", json={"upload_id": upload_id}).json()
        header = npy_header(arr)
        body = memoryview(arr.reshape(-1)).cast("B")
        total = len(header) + body.nbytes

        def chunks() -> Iterator[bytes]:
            yield header
            sent = len(header)
            for start in range(0, body.nbytes, CHUNK):
                piece = body[start:start + CHUNK]
                yield piece  # type: ignore[misc]
                sent += piece.nbytes
                if progress:
                    progress(sent, total)

        return self._request("PUT", "/v1/blobs", content=chunks(),
                             headers={"content-type": "application/octet-stream",
                                      "content-length": str(total)}).json()

    def upload_file(self, path: str | os.PathLike[str], progress: Progress | None = None) -> dict[str, Any]:
        return self.upload(load_npy(path), progress)

    def submit(self, task_type: str, inputs: dict[str, str], params: dict[str, Any] | None = None,
               nodes: int | None = None) -> str:
        """Submit a job; its id once the head accepted it durably. While the head's job queue is
        unreachable (503 queue_unavailable) it retries with backoff for ``queue_wait`` seconds."""
        body = {"type": task_type, "inputs": inputs, "params": params or {}, "nodes": nodes}
        end = time.monotonic() + self.queue_wait
        delay = 0.5
        while True:
            try:
                return self._request("POST", "/v1/jobs", json=body).json()["job_id"]
            except QueueUnavailable as exc:  # not accepted: nothing was recorded, trying again is safe
                left = end - time.monotonic()
                if left <= 0:
                    raise
                if self.on_queue_wait is not None:
                    self.on_queue_wait(exc.message, left)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)

    def submit_matmul(self, a: np.ndarray, b: np.ndarray, nodes: int | None = None,
                      progress: Progress | None = None) -> str:
        a = check_operand(a, "a")
        b = check_operand(b, "b")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValidationError(f"shapes {list(a.shape)} and {list(b.shape)} cannot be multiplied")
        if a.dtype != b.dtype:
            a, b = a.astype(np.result_type(a, b)), b.astype(np.result_type(a, b))
        blob_a = self.upload(a, progress)["blob_id"]
        blob_b = self.upload(b, progress)["blob_id"]
        return self.submit("matmul", {"a": blob_a, "b": blob_b}, nodes=nodes)

    def matmul(self, a: np.ndarray, b: np.ndarray, nodes: int | None = None,
               timeout: float | None = None) -> np.ndarray:
        job = self.submit_matmul(a, b, nodes)
        self.wait(job, timeout)
        return self.result(job)

    def status(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}", params={"wait": wait} if wait else None,
                             timeout=wait + 30).json()

    def wait(self, job_id: str, timeout: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None, poll: float = 20.0) -> dict[str, Any]:
        """Block until the job ends; raise TaskError if it failed or was cancelled."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = poll if end is None else min(poll, max(0.0, end - time.monotonic()))
            view = self.status(job_id, wait=left)
            if on_update:
                on_update(view)
            if view["state"] in TERMINAL:
                break
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"job {job_id} still {view['state']} after {timeout}s")
        if view["state"] != "done":
            raise TaskError(f"job {job_id} {view['state']}: {view.get('error') or ''}".rstrip(": "))
        return view

    def result(self, job_id: str, name: str | None = None, out: str | os.PathLike[str] | None = None,
               progress: Progress | None = None) -> np.ndarray:
        """Download a finished job's result; also write it to ``out`` (.npy) if given."""
        arr = self._shared_result(job_id, name)
        if arr is not None:
            if progress:
                progress(arr.nbytes, arr.nbytes)
            if out is not None:
                np.save(out, arr, allow_pickle=False)
            return arr
        params = {"name": name} if name else None
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result", params=params, timeout=120) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                total = int(resp.headers.get("content-length", 0))
                arr = _receive_npy(resp.iter_raw(CHUNK), total, progress)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"head at {self.url} unreachable: {exc}") from None
        if out is not None:
            np.save(out, arr, allow_pickle=False)
        return arr

    def _shared_result(self, job_id: str, name: str | None) -> np.ndarray | None:
        """The result file mapped copy-on-write: no copy, writable, private to this process.
        It stays valid even if the job is deleted later (POSIX keeps the mapped file)."""
        root = self.shared_dir()
        if root is None:
            return None
        view = self.status(job_id)
        if view["state"] != "done" or not view["outputs"]:
            return None  # the HTTP path gives the proper error
        try:
            path = layout.output_path(root, job_id, name or next(iter(view["outputs"])))
            with open(path, "rb") as f:
                if parse_npy_header(f.read(4096)) is None:
                    return None
            return np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, DcfError):
            return None

    def download(self, job_id: str, name: str, path: str | os.PathLike[str]) -> Path:
        """Save one output file of a finished job (e.g. model.pt, model.json) to ``path``."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result", params={"name": name}, timeout=300) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_raw(CHUNK):
                        f.write(chunk)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"head at {self.url} unreachable: {exc}") from None
        os.replace(tmp, path)
        return path

    # ---- training ---------------------------------------------------------------------------
    def submit_train(self, dataset: Any, nodes: int | None = None, **params: Any) -> str:
        """Upload a ``common.tasks.train.datasets.Dataset`` and start training on it; see common/tasks/train/
        TRAIN_DEFAULTS for ``params`` (model, epochs, batch_size, optimizer, lr, sync, ...)."""
        blobs = {name: self.upload(arr)["blob_id"] for name, arr in (
            ("x", dataset.x_train), ("y", dataset.y_train), ("x_test", dataset.x_test), ("y_test", dataset.y_test))}
        return self.submit("train", blobs, {"dataset": dataset.name, **params}, nodes=nodes)

    def train(self, dataset: Any, out: str | os.PathLike[str], timeout: float | None = None,
              **params: Any) -> dict[str, Any]:
        """Train, wait, save ``out`` (state_dict) and its metadata next to it (.json); returns the metadata."""
        job = self.submit_train(dataset, **params)
        self.wait(job, timeout)
        return self.save_model(job, out)

    def save_model(self, job_id: str, out: str | os.PathLike[str]) -> dict[str, Any]:
        out = Path(out)
        self.download(job_id, "model.pt", out)
        meta_path = self.download(job_id, "model.json", out.with_suffix(".json"))
        return json.loads(meta_path.read_text())

    def submit_predict(self, model_path: str | os.PathLike[str], x: np.ndarray, nodes: int | None = None) -> str:
        """Inference across providers with a model saved by ``train`` (its .json beside it)."""
        from common.tasks.train.inference import load_model_file

        meta, weights = load_model_file(model_path)
        shape = tuple(meta["input_shape"])
        x = np.asarray(x, dtype=np.float32)
        if x.ndim >= 1 and x.shape[1:] != shape and x.size and x[0].size == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)
        if x.ndim < 2 or x.shape[1:] != shape:
            raise ValidationError(f"the model takes samples of shape {list(shape)}, the data has {list(x.shape[1:])}")
        blobs = {"x": self.upload(x)["blob_id"], "weights": self.upload(weights)["blob_id"]}
        params = {"model": meta["model"], "model_args": meta.get("model_args", {}), "input_shape": list(shape),
                  "classes": meta["classes"]}
        return self.submit("predict", blobs, params, nodes=nodes)

    def predict(self, model_path: str | os.PathLike[str], x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        job = self.submit_predict(model_path, x)
        self.wait(job, timeout)
        return np.array(self.result(job))

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._request("GET", "/v1/jobs", params=params).json()

    def nodes(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/nodes").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")


def _receive_npy(chunks: Iterator[bytes], total: int, progress: Progress | None) -> np.ndarray:
    head = b""
    arr: np.ndarray | None = None
    view: memoryview | None = None
    pos = 0
    got = 0
    for chunk in chunks:
        got += len(chunk)
        if arr is None:
            head += chunk
            parsed = parse_npy_header(head)
            if parsed is None:
                continue
            meta, hlen = parsed
            arr = np.empty(meta.shape, dtype=meta.dtype)
            view = memoryview(arr.reshape(-1)).cast("B")
            chunk = head[hlen:]
        assert view is not None
        end = pos + len(chunk)
        if end > view.nbytes:
            raise DcfError("result is longer than its header declares")
        view[pos:end] = chunk
        pos = end
        if progress:
            progress(got, total)
    if arr is None or view is None or pos != view.nbytes:
        raise DcfError("result download was cut short")
    return arr


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A matmul operand from a user's .npy file (see ``load_npy_any``), checked and cast."""
    return check_operand(load_npy_any(path), str(path))


def load_npy_any(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a user's .npy file safely (no pickles) with clear errors."""
    p = Path(path)
    if not p.exists():
        raise ValidationError(f"{p}: no such file")
    if p.is_dir():
        raise ValidationError(f"{p}: is a directory, not a .npy file")
    try:
        with open(p, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValidationError(f"{p}: not a .npy file")
        arr = np.load(p, allow_pickle=False, mmap_mode="r")
    except PermissionError:
        raise ValidationError(f"{p}: permission denied") from None
    except ValueError as exc:  # object arrays need pickles, which we refuse
        raise ValidationError(f"{p}: cannot be read without pickle ({exc}); save a numeric array") from None
    except OSError as exc:
        raise ValidationError(f"{p}: unreadable: {exc}") from None
    if arr.dtype.hasobject or arr.dtype.kind not in "fiub":
        raise ValidationError(f"{p}: dtype {arr.dtype} is not numeric")
    return arr
