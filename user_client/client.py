"""Python API of dcf::

    from user_client import Client
    c = Client("http://127.0.0.1:8080")
    C = c.matmul(A, B)              # submit, wait, fetch
    job = c.submit_matmul(A, B)     # or step by step
    c.wait(job); C = c.result(job)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common import config, layout
from common.config import ClientSettings
from common.errors import (
    ConfigError,
    DcfError,
    HeadUnreachable,
    HttpError,
    InternalError,
    ProtocolError,
    QueueUnavailable,
    TaskError,
    ValidationError,
    WaitTimeout,
    error_from_dict,
)
from common.jobs import TERMINAL_NAMES, JobState

from .channel import Channel, Reply
from .outbox import Outbox

if TYPE_CHECKING:  # numpy, the batch codec, the array helpers and httpx load when first needed
    import httpx
    import numpy as np

    from .arrays import Progress

CHUNK = 4 * 1024 * 1024
#: jobs per batch request of ``submit_many``/``map``/``gather``
BATCH_JOBS = 1000
MSGPACK = "application/msgpack"
#: requests of ``submit_async`` in flight at once
SUBMIT_THREADS = 4
Results = dict[str, "np.ndarray"]  # a job's outputs by name
TERMINAL = TERMINAL_NAMES  # the states a job ends in
#: longest pause between two reconnection attempts (the first comes after 0.25 s, then doubling)
RECONNECT_MAX_DELAY = 2.0
T = TypeVar("T")


class Client:
    """A client of one head. Each setting not given here (None, or an empty ``url`` or
    ``shared_files``) comes from ``settings`` when given, else from its DCF_* variable, else from
    the client option table (``common.config.CLIENT_OPTIONS``): ``url`` (DCF_HEAD_URL), ``token``
    (DCF_API_TOKEN), ``shared_files`` (DCF_SHARED_FILES; "auto": when this client runs on the head's
    machine and can use its state dir, arrays are exchanged as files there instead of over HTTP)
    ``queue_wait`` (DCF_QUEUE_WAIT) and ``reconnect_wait`` (DCF_RECONNECT_WAIT: seconds ``watch``,
    ``wait``, ``result`` and ``download`` keep reconnecting to a head that went away, e.g. while it
    restarts; a head never reached fails at once). A ``url`` without a scheme (``HOST:PORT``) means
    ``http://HOST:PORT``. Bad values raise ConfigError."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 shared_files: str | None = None, queue_wait: float | None = None, *,
                 reconnect_wait: float | None = None, settings: ClientSettings | None = None) -> None:
        given = {"head_url": config.head_urls(url) if url else None, "api_token": token,
                 "shared_files": shared_files or None, "queue_wait": queue_wait, "reconnect_wait": reconnect_wait}
        self.settings = _settings(given, settings)
        self._shared: Path | None | bool = None if self.settings.shared_files == "auto" else False
        token = self.settings.api_token
        #: seconds ``submit`` keeps retrying while the head's job queue (RabbitMQ) is unreachable
        self.queue_wait = self.settings.queue_wait
        #: called as on_queue_wait(message, seconds_left) before each retry of a refused submission
        self.on_queue_wait: Callable[[str, float], None] | None = None
        #: seconds ``watch``, ``wait``, ``result`` and ``download`` keep reconnecting to an unreachable head
        self.reconnect_wait = self.settings.reconnect_wait
        #: called as on_reconnect(message, seconds_left) before each reconnection attempt
        self.on_reconnect: Callable[[str, float], None] | None = None
        #: called as on_reconnected(seconds_away) when the head answers again
        self.on_reconnected: Callable[[float], None] | None = None
        #: whether the head answered a streamed transfer of this client (``channel.connected``: whether
        #: it was ever connected to): a head never reached (a wrong URL) is not waited for
        self.reached = False
        self.timeout = timeout
        #: every request but streamed transfers; with several heads, it finds the active one
        self.channel = Channel(self.settings.head_url, token, timeout)
        self._http: httpx.Client | None = None  # streamed uploads and downloads, built on first use
        self._http_url = ""  # the head ``_http`` talks to
        self._outbox = Outbox(self.submit_many, SUBMIT_THREADS, BATCH_JOBS)  # submit_async's (threads at first use)

    @property
    def url(self) -> str:
        """The URL of the head this client talks to (of several: the one that last served)."""
        return self.channel.url

    @property
    def http(self) -> httpx.Client:
        """An httpx client of the head (streamed transfers of large arrays), built on first use, and again
        when the channel moved to another head."""
        if self._http is not None and self._http_url != self.url:
            self._http.close()
            self._http = None
        if self._http is None:
            import httpx

            self._http_url = self.url
            token = self.settings.api_token
            # no TLS context for an http:// head (redirects are not followed): it costs ~0.1 s to build
            self._http = httpx.Client(base_url=self.url, verify=self.url.startswith("https://"),
                                      headers={"authorization": f"Bearer {token}"} if token else {},
                                      timeout=httpx.Timeout(self.timeout, connect=5.0), trust_env=False)
        return self._http

    def close(self) -> None:
        self._outbox.close()
        self.channel.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, json_body: Any = None, params: Mapping[str, Any] | None = None,
                 timeout: float | None = None, body: bytes | None = None, content_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> Reply:
        """One request (a GET, or one with an idempotency key, is sent again once if a kept-alive
        connection went stale); raises the error the head answered with."""
        if params:
            path += "?" + urllib.parse.urlencode(params)
        if json_body is not None:
            body, content_type = json.dumps(json_body).encode(), "application/json"
        extra: dict[str, Any] = {"headers": headers} if headers else {}
        reply = self.channel.request(method, path, body, content_type, timeout, **extra)
        raise_for_status(reply.status, reply.body)
        return reply

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """The JSON object a successful request answers with."""
        body = self._json_any(method, path, **kw)
        if not isinstance(body, dict):
            raise ProtocolError(f"{method} {path}: the head's reply is not a JSON object: {str(body)[:200]}")
        return body

    def _json_list(self, method: str, path: str, **kw: Any) -> list[dict[str, Any]]:
        """The JSON list a successful request answers with."""
        body = self._json_any(method, path, **kw)
        if not isinstance(body, list):
            raise ProtocolError(f"{method} {path}: the head's reply is not a JSON list: {str(body)[:200]}")
        return body

    def _json_any(self, method: str, path: str, **kw: Any) -> Any:
        reply = self._request(method, path, **kw)
        try:
            return json.loads(reply.body)
        except ValueError:
            raise ProtocolError(f"{method} {path}: the head's reply is not JSON: {reply.body[:200]!r}") from None

    def riding_out(self, call: Callable[[], T]) -> T:
        """``call()``, tried again with back-off while the head is unreachable (e.g. restarting), for
        up to ``reconnect_wait`` seconds from the first failure; only for requests that are safe to
        repeat (reads). A head that never answered this client (a wrong URL, a head not started)
        fails at once."""
        away = _Reconnecting(self)
        while True:
            url = self.url
            try:
                result = call()
            except QueueUnavailable:
                raise
            except HeadUnreachable as exc:
                self.channel.move_on(url)  # several heads: a streamed call's head gone or a standby, the next
                away.pause(exc)
            else:
                away.back()
                return result

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        """The error a streamed reply carries, if any (its body read)."""
        raise_for_status(resp.status_code, resp.read())

    # ---- API --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def shared_dir(self) -> Path | None:
        """The head's state dir if this client shares it (same machine, readable marker), else None."""
        if self._shared is None:
            self._shared = False
            try:
                info = self._json("GET", "/v1/info")
                root = Path(info["state_dir"])
                if layout.read_marker(root) == info["epoch"] and os.access(root / "incoming", os.W_OK):
                    self._shared = root
            except (DcfError, KeyError, TypeError, ValueError, OSError):
                pass
        return self._shared if isinstance(self._shared, Path) else None

    def upload(self, arr: np.ndarray, progress: Progress | None = None) -> dict[str, Any]:
        """Send one array to the head's store; returns ``{"blob_id", "dtype", "shape", ...}``."""
        from .arrays import wire_array

        reply = self._upload(wire_array(arr), progress)
        _field(reply, "blob_id")
        return reply

    def _upload(self, arr: np.ndarray, progress: Progress | None) -> dict[str, Any]:
        from common.npyfmt import npy_header

        root = self.shared_dir()
        if root is not None:
            upload_id = uuid.uuid4().hex
            path = layout.incoming_path(root, upload_id)
            try:
                _write_npy(path, npy_header(arr), arr, progress)
            except OSError:
                path.unlink(missing_ok=True)
            else:
                return self._json("POST", "/v1/blobs/adopt", json_body={"upload_id": upload_id})
        header = npy_header(arr)
        body = arr.reshape(-1).data.cast("B")
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

        return self._streamed_upload(chunks(), total)

    def _streamed_upload(self, chunks: Iterator[bytes], total: int) -> dict[str, Any]:
        import httpx

        try:
            resp = self.http.put("/v1/blobs", content=chunks, headers={"content-type": "application/octet-stream",
                                                                       "content-length": str(total)}, timeout=300)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ProtocolError(f"bad reply from the head at {self.url}: {type(exc).__name__}: {exc}") from None
        self._raise_for(resp)
        info = resp.json()
        if not isinstance(info, dict):
            raise ProtocolError(f"PUT /v1/blobs: the head's reply is not a JSON object: {str(info)[:200]}")
        return info

    def upload_file(self, path: str | os.PathLike[str], progress: Progress | None = None) -> dict[str, Any]:
        from .arrays import load_npy

        return self.upload(load_npy(path), progress)

    def submit(self, task_type: str, inputs: dict[str, str], params: dict[str, Any] | None = None,
               nodes: int | None = None) -> str:
        """Submit a job; its id once the head accepted it durably. While the head's job queue is
        unreachable (503 queue_unavailable) it retries with backoff for ``queue_wait`` seconds; while
        the head is (its reply lost, the head restarting), for ``reconnect_wait`` seconds: every try
        carries the same idempotency key, so a retry returns the job the first try made, never a second."""
        body = {"type": task_type, "inputs": inputs, "params": params or {}, "nodes": nodes}
        key = {"idempotency-key": new_idempotency_key()}
        return self._submitting(lambda: str(_field(self._json("POST", "/v1/jobs", json_body=body, headers=key),
                                                   "job_id")))

    def _submitting(self, call: Callable[[], T]) -> T:
        """``call()``, a submission whose jobs carry idempotency keys, tried again while the head's job
        queue is unreachable (nothing was recorded; up to ``queue_wait`` seconds) and while the head is
        (it may have accepted the jobs and lost the reply: the same keys then answer with the same jobs;
        up to ``reconnect_wait`` seconds, as ``riding_out``; a head never reached fails at once)."""
        queue_end = time.monotonic() + self.queue_wait
        away = _Reconnecting(self)
        delay = 0.5
        while True:
            try:
                result = call()
            except QueueUnavailable as exc:  # not accepted: nothing was recorded, trying again is safe
                left = queue_end - time.monotonic()
                if left <= 0:
                    raise
                if self.on_queue_wait is not None:
                    self.on_queue_wait(exc.message, left)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
            except HeadUnreachable as exc:  # maybe accepted, its reply lost: the keys make a retry safe
                away.pause(exc)
            else:
                away.back()
                return result

    def submit_matmul(self, a: np.ndarray, b: np.ndarray, nodes: int | None = None,
                      progress: Progress | None = None) -> str:
        from .arrays import matmul_operands

        return self._submit_operands(*matmul_operands(a, b), nodes, progress)

    def _submit_operands(self, a: np.ndarray, b: np.ndarray, nodes: int | None, progress: Progress | None) -> str:
        """Submit checked operands: small ones inline in one request, larger ones uploaded first."""
        from common.protocol import batch

        if a.nbytes + b.nbytes <= batch.MAX_INLINE_BYTES:
            return self.submit_many([{"type": "matmul", "inputs": {"a": a, "b": b}, "nodes": nodes}])[0]
        blob_a = self.upload(a, progress)["blob_id"]
        blob_b = self.upload(b, progress)["blob_id"]
        return self.submit("matmul", {"a": blob_a, "b": blob_b}, nodes=nodes)

    def matmul(self, a: np.ndarray, b: np.ndarray, nodes: int | None = None,
               timeout: float | None = None) -> np.ndarray:
        from common.protocol import batch

        from .arrays import matmul_operands

        a, b = matmul_operands(a, b)
        if a.nbytes + b.nbytes <= batch.MAX_INLINE_BYTES:  # one request: submit, wait, result inline
            return self.run("matmul", {"a": a, "b": b}, nodes=nodes, timeout=timeout)["c"]
        job = self._submit_operands(a, b, nodes, None)
        self.wait(job, timeout)
        return self.result(job)

    # ---- many jobs at once (small operands inline, msgpack) --------------------------------------
    def run(self, task_type: str, inputs: dict[str, Any], params: dict[str, Any] | None = None,
            nodes: int | None = None, timeout: float | None = None) -> Results:
        """One job, submitted, waited for and its outputs returned, in as few requests as it takes
        (one when its operands and results are small)."""
        from common.protocol import batch

        wait = batch.MAX_WAIT_S if timeout is None else min(timeout, batch.MAX_WAIT_S)
        spec = {"type": task_type, "inputs": inputs, "params": params or {}, "nodes": nodes,
                "idempotency_key": new_idempotency_key()}
        body = batch.encode_batch_request([self._inline(spec)], wait)
        outcome = self._submitting(lambda: self._batch("/v1/jobs/batch", body, timeout=wait + 30))[0]
        return self.gather([outcome["job_id"]], timeout, first=[outcome])[0]

    def submit_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Submit jobs ``{"type", "inputs": {name: array | blob id}, "params", "nodes"}``, 1000 to a
        request; small arrays go inline, larger ones are uploaded first. Each request is accepted
        whole or not at all (ValidationError naming ``jobs[i]``); their ids, in order. Each job gets
        an idempotency key (or keeps its ``"idempotency_key"``), so a retried request makes no second jobs."""
        from common.protocol import batch

        ids: list[str] = []
        specs = [{**self._inline(j), "idempotency_key": j.get("idempotency_key") or new_idempotency_key()}
                 for j in jobs]  # a retry of a request whose reply was lost makes no second jobs
        for start in range(0, len(specs), BATCH_JOBS):
            body = batch.encode_batch_request(specs[start:start + BATCH_JOBS])
            ids += [o["job_id"] for o in self._submitting(partial(self._batch, "/v1/jobs/batch", body))]
        return ids

    def submit_async(self, task_type: str, inputs: dict[str, Any], params: dict[str, Any] | None = None,
                     nodes: int | None = None) -> Future[str]:
        """Submit one job without waiting for the head: a future of its id, set once the head accepted
        it durably (or of the error). Submissions overlap on a few connections, as Ray's ``.remote``
        calls do, and those made while others are in flight share a request (outbox.py); ``gather``
        takes the futures."""
        return self._outbox.put({"type": task_type, "inputs": inputs, "params": params or {}, "nodes": nodes,
                                 "idempotency_key": new_idempotency_key()})

    def gather(self, job_ids: Sequence[str | Future[str]], timeout: float | None = None, forget: bool = False,
               first: Sequence[dict[str, Any]] = ()) -> list[Results]:
        """The outputs of jobs (ids, or futures of ``submit_async``), in order, once each is done
        (TaskError when one failed or was cancelled, WaitTimeout after ``timeout`` seconds).
        ``forget``: delete them once read."""
        from common.protocol import batch

        ids = [j if isinstance(j, str) else j.result() for j in job_ids]
        end = None if timeout is None else time.monotonic() + timeout
        known = {o["job_id"]: o for o in first if o["state"] in TERMINAL}
        pending = [j for j in dict.fromkeys(ids) if j not in known]
        while pending:
            left = batch.MAX_WAIT_S if end is None else max(0.0, end - time.monotonic())
            chunk = pending[:BATCH_JOBS]
            body = batch.encode_gather_request(chunk, min(left, 20.0), forget)
            for o in self._batch("/v1/jobs/gather", body, timeout=min(left, 20.0) + 30):
                if o["state"] in TERMINAL:
                    known[o["job_id"]] = o
            pending = [j for j in pending if j not in known]
            if pending and end is not None and time.monotonic() >= end:
                raise WaitTimeout(f"{len(pending)} of {len(ids)} jobs still running after {timeout}s")
        return [self._outputs(known[j], forget) for j in ids]

    def map(self, task_type: str, inputs: Iterable[dict[str, Any]], params: dict[str, Any] | None = None,
            timeout: float | None = None, forget: bool = True) -> list[Results]:
        """One job of ``task_type`` per entry of ``inputs`` (name -> array); their outputs, in order.
        They are submitted in batches, then gathered; ``forget``: deleted on the head once read."""
        job_ids = self.submit_many([{"type": task_type, "inputs": i, "params": params or {}} for i in inputs])
        return self.gather(job_ids, timeout, forget=forget)

    def _inline(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """A job spec for the batch API: small arrays inline, larger ones uploaded (blob ids)."""
        from common.protocol import batch

        from .arrays import wire_array

        inputs: dict[str, Any] = {}
        room = batch.MAX_INLINE_BYTES
        for name, value in (spec.get("inputs") or {}).items():
            if isinstance(value, str):
                inputs[name] = value
                continue
            arr = wire_array(value)
            if arr.nbytes <= room:
                inputs[name], room = arr, room - arr.nbytes
            else:
                inputs[name] = self.upload(arr)["blob_id"]
        return {**spec, "inputs": inputs}

    def _outputs(self, outcome: dict[str, Any], forget: bool) -> Results:
        """A done job's arrays: inline, or fetched (and then, with ``forget``, the job deleted: the
        head forgets only jobs whose results it sent)."""
        import numpy as np

        if outcome["state"] != JobState.DONE:
            raise TaskError(f"job {outcome['job_id']} {outcome['state']}: {outcome.get('error') or ''}".rstrip(": "))
        if "results" in outcome:
            return {name: np.array(arr) for name, arr in outcome["results"].items()}
        fetched = {name: np.array(self.result(outcome["job_id"], name)) for name in outcome.get("outputs", [])
                   if not name.endswith((".pt", ".json"))}
        if forget:
            self.delete(outcome["job_id"])
        return fetched

    def _batch(self, path: str, body: bytes, timeout: float | None = None) -> list[dict[str, Any]]:
        from common.protocol import batch

        reply = self._request("POST", path, body=body, content_type=MSGPACK, timeout=timeout)
        return batch.decode_outcomes(reply.body)

    def status(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """The job's view (one request; ``wait``: seconds the head may hold it until the job changes)."""
        view = self._json("GET", f"/v1/jobs/{job_id}", params={"wait": wait} if wait else None,
                          timeout=wait + 30)
        _field(view, "state")
        return view

    def watch(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """``status``, riding out a head that is unreachable for up to ``reconnect_wait`` seconds."""
        return self.riding_out(lambda: self.status(job_id, wait))

    def wait(self, job_id: str, timeout: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None, poll: float = 20.0) -> dict[str, Any]:
        """Block until the job ends; raise TaskError if it failed or was cancelled, WaitTimeout (also a
        TimeoutError) if it is still going after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = poll if end is None else min(poll, max(0.0, end - time.monotonic()))
            view = self.watch(job_id, wait=left)
            if on_update:
                on_update(view)
            if view["state"] in TERMINAL:
                break
            if end is not None and time.monotonic() >= end:
                raise WaitTimeout(f"job {job_id} still {view['state']} after {timeout}s")
        if view["state"] != JobState.DONE:
            raise TaskError(f"job {job_id} {view['state']}: {view.get('error') or ''}".rstrip(": "))
        return view

    def result(self, job_id: str, name: str | None = None, out: str | os.PathLike[str] | None = None,
               progress: Progress | None = None) -> np.ndarray:
        """Download a finished job's result; also write it to ``out`` (.npy, exactly that path) if given.
        A head that is unreachable is ridden out (``reconnect_wait``). ``progress`` is called as bytes
        arrive over HTTP, never for a result read from the shared state dir (nothing is transferred)."""
        from .arrays import save_npy

        arr = self.riding_out(lambda: self._fetch_result(job_id, name, progress))
        if out is not None:
            save_npy(out, arr)
        return arr

    def _fetch_result(self, job_id: str, name: str | None, progress: Progress | None) -> np.ndarray:
        import httpx

        from .arrays import receive_npy

        arr = self._shared_result(job_id, name)
        if arr is not None:
            return arr
        params = {"name": name} if name else None
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result", params=params, timeout=120) as resp:
                self.reached = True
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                arr = receive_npy(resp.iter_raw(CHUNK), _content_length(resp), progress)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"head at {self.url} unreachable: {exc}") from None
        except httpx.HTTPError as exc:
            raise ProtocolError(f"bad result download from {self.url}: {type(exc).__name__}: {exc}") from None
        return arr

    def _shared_result(self, job_id: str, name: str | None) -> np.ndarray | None:
        """The result file mapped copy-on-write: no copy, writable, private to this process.
        It stays valid even if the job is deleted later (POSIX keeps the mapped file)."""
        import numpy as np

        from common.npyfmt import parse_npy_header

        root = self.shared_dir()
        if root is None:
            return None
        view = self.status(job_id)
        if view["state"] != JobState.DONE or not view["outputs"]:
            return None  # the HTTP path gives the proper error
        try:
            path = layout.output_path(root, job_id, name or next(iter(view["outputs"])))
            with open(path, "rb") as f:
                if parse_npy_header(f.read(4096)) is None:
                    return None
            arr = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, DcfError):
            return None
        _verify_shared(path, f"result {path.stem} of job {job_id}")
        return arr

    def download(self, job_id: str, name: str, path: str | os.PathLike[str]) -> Path:
        """Save one output file of a finished job (e.g. model.pt, model.json) to ``path``, riding out
        a head that is unreachable (``reconnect_wait``)."""
        return self.riding_out(lambda: self._download(job_id, name, Path(path)))

    def _download(self, job_id: str, name: str, path: Path) -> Path:
        import httpx

        tmp = path.with_name(f".{path.name}.part")
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/result", params={"name": name}, timeout=300) as resp:
                self.reached = True
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp)
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_raw(CHUNK):
                        f.write(chunk)
            os.replace(tmp, path)
        except httpx.TransportError as exc:
            raise HeadUnreachable(f"head at {self.url} unreachable: {exc}") from None
        except httpx.HTTPError as exc:
            raise ProtocolError(f"bad download from {self.url}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ValidationError(f"{path}: cannot write: {exc.strerror or exc}") from None
        return path

    # ---- training ---------------------------------------------------------------------------
    def submit_train(self, dataset: Any, nodes: int | None = None, **params: Any) -> str:
        """Upload a ``common.tasks.train.datasets.Dataset`` (or name ``"provider:NAME"``, data the providers hold:
        nothing is uploaded) and start training on it; see common/tasks/train/
        TRAIN_DEFAULTS for ``params`` (model, epochs, batch_size, optimizer, lr, sync, ...; ``min_providers=K``
        and ``start_timeout=S``: the start barrier, docs/TRAINING.md)."""
        need = params.get("min_providers", 1)
        if nodes is not None and isinstance(need, int) and need > nodes:
            raise ValidationError(f"min_providers {need} is more than nodes {nodes}: the job could never start")
        if isinstance(dataset, str):  # "provider:NAME": the providers' own data, nothing to upload
            if not dataset.startswith("provider:"):
                raise ValidationError(f"dataset {dataset!r}: a Dataset, or 'provider:NAME' for data the providers "
                                      "hold (dcf-provider --data NAME=PATH.npz)")
            return self.submit("train", {}, {"dataset": dataset, **params}, nodes=nodes)
        arrays = {"x": "x_train", "y": "y_train", "x_test": "x_test", "y_test": "y_test"}
        missing = [attr for attr in (*arrays.values(), "name") if not hasattr(dataset, attr)]
        if missing:
            raise ValidationError(f"not a Dataset: it has no {', '.join(missing)}")
        blobs = {name: self.upload(getattr(dataset, attr))["blob_id"] for name, attr in arrays.items()}
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
        try:
            meta = json.loads(meta_path.read_text())
        except OSError as exc:
            raise ValidationError(f"{meta_path}: unreadable: {exc.strerror or exc}") from None
        except ValueError:
            raise ProtocolError(f"job {job_id}: model.json is not JSON") from None
        if not isinstance(meta, dict):
            raise ProtocolError(f"job {job_id}: model.json is not an object")
        return meta

    def submit_predict(self, model_path: str | os.PathLike[str], x: np.ndarray, nodes: int | None = None) -> str:
        """Inference across providers with a model saved by ``train`` (its .json beside it)."""
        import numpy as np

        try:
            from common.tasks.train.inference import load_model_file

            meta, weights = load_model_file(model_path)  # imports torch when called
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "torch":
                raise
            raise ConfigError("predict needs PyTorch here to read the model: pip install 'dcf[torch]' "
                              "(a torch build for your platform)") from None
        try:
            shape = tuple(int(n) for n in meta["input_shape"])
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{model_path} or the data: {exc}") from None
        if x.ndim >= 1 and x.shape[1:] != shape and x.size and x[0].size == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)
        if x.ndim < 2 or x.shape[1:] != shape:
            raise ValidationError(f"the model takes samples of shape {list(shape)}, the data has {list(x.shape[1:])}")
        blobs = {"x": self.upload(x)["blob_id"], "weights": self.upload(weights)["blob_id"]}
        params = {"model": meta["model"], "model_args": meta.get("model_args", {}), "input_shape": list(shape),
                  "classes": meta["classes"]}
        return self.submit("predict", blobs, params, nodes=nodes)

    def predict(self, model_path: str | os.PathLike[str], x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        import numpy as np

        job = self.submit_predict(model_path, x)
        self.wait(job, timeout)
        return np.array(self.result(job))

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._json_list("GET", "/v1/jobs", params=params)

    def nodes(self) -> list[dict[str, Any]]:
        return self._json_list("GET", "/v1/nodes")

    def clear_quarantine(self, provider_id: str) -> dict[str, Any]:
        """Trust a quarantined provider again (one caught sending a wrong result): it gets work again."""
        return self._json("POST", f"/v1/nodes/{provider_id}/clear")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")


def new_idempotency_key() -> str:
    """A fresh idempotency key for one submission (32 hex digits: docs/PROTOCOL.md §14.1)."""
    return uuid.uuid4().hex


def raise_for_status(status: int, body: bytes) -> None:
    """The error a reply of ``status`` >= 400 carries (its JSON ``error``), rebuilt and raised."""
    if status < 400:
        return
    try:
        error = json.loads(body).get("error")
    except Exception:
        error = None
    if not isinstance(error, dict):
        err = HttpError(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        err.http_status = status
        raise err from None
    raise error_from_dict(error, status)


def _settings(given: dict[str, Any], base: ClientSettings | None) -> ClientSettings:
    """``given`` (None: not given) over ``base``, or over DCF_* variables and defaults."""
    if base is None:
        return ClientSettings.from_values(given)
    return dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})


def _verify_shared(path: Path, what: str) -> None:
    """A result file read from the head's state dir has the digest the head recorded beside it
    (common/digests.py) when it published it; InternalError if not, as over HTTP. The file is hashed
    through a mapping (no copy); no digest file (a result stored before checksums existed): taken as it is."""
    from common import digests

    why = digests.mismatch(path)
    if why is not None:
        raise InternalError(f"{what} is corrupt: checksum mismatch ({why}); its bytes are not used")


def _write_npy(path: Path, header: bytes, arr: np.ndarray, progress: Progress | None) -> None:
    """The array as a .npy file, ``progress`` called as its bytes are written (a true rate)."""
    body = arr.reshape(-1).data.cast("B")
    total = len(header) + body.nbytes
    with open(path, "wb") as f:
        f.write(header)
        for start in range(0, body.nbytes, CHUNK):
            f.write(body[start:start + CHUNK])
            if progress:
                progress(len(header) + min(body.nbytes, start + CHUNK), total)


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` of a JSON object the head sent; ProtocolError when it is not there."""
    if not isinstance(obj, dict) or key not in obj:
        raise ProtocolError(f"the head's reply has no {key!r}: {str(obj)[:200]}")
    return obj[key]


def _content_length(resp: httpx.Response) -> int:
    try:
        return int(resp.headers.get("content-length", 0))
    except ValueError:
        return 0  # only the progress bar's total


class _Reconnecting:
    """Back-off while the head is unreachable, for up to the client's ``reconnect_wait`` seconds from the first
    failure; a head that never answered this client (a wrong URL, a head not started) fails at once."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lost: float | None = None  # when the head was first found gone
        self.delay = 0.25

    def pause(self, exc: HeadUnreachable) -> None:
        """Wait before the next try, or raise ``exc`` when there is none."""
        c = self.client
        if not (c.reached or c.channel.connected):
            raise exc
        self.lost = time.monotonic() if self.lost is None else self.lost
        left = self.lost + c.reconnect_wait - time.monotonic()
        if left <= 0:
            raise exc
        if c.on_reconnect is not None:
            c.on_reconnect(exc.message, left)
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, RECONNECT_MAX_DELAY)

    def back(self) -> None:
        """The try worked: say so if the head had been away."""
        if self.lost is not None and self.client.on_reconnected is not None:
            self.client.on_reconnected(time.monotonic() - self.lost)
