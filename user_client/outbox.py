"""``Client.submit_async``'s outbox: submissions made one by one travel to the head together.

Each call queues its job and returns a future. A few sender threads (``senders``) take what is queued, up
to ``batch`` jobs, and submit it as one batch request: a job submitted while the head is idle goes at once,
alone; jobs submitted while requests are in flight wait only for a free sender, then share its request (as
a database's group commit shares a flush, or a Kafka producer's batch a send). Each future is set once the
head accepted its job durably, as before.

A batch request is accepted whole or not at all. When it is refused for one job's own fault (its params,
an input that does not exist, a size past a limit: ``OWN_FAULT``), its jobs are submitted again one by one,
so that each future gets its own answer and no job fails for another's mistake. Their idempotency keys,
kept on the specs, make any resubmission safe.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from common.errors import Conflict, NotFound, ValidationError

#: errors a batch request gets for one of its jobs (``jobs[i]: ...``), not for the request or the head
OWN_FAULT = (ValidationError, NotFound, Conflict)

Send = Callable[[Sequence[dict[str, Any]]], list[str]]


class Outbox:
    def __init__(self, send: Send, senders: int, batch: int) -> None:
        self._send = send
        self._senders = senders
        self._batch = batch
        self._lock = threading.Lock()
        self._queued: deque[tuple[dict[str, Any], Future[str]]] = deque()
        self._draining = 0  # senders at work (each drains the queue, then stops)
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="dcf-submit")

    def put(self, spec: dict[str, Any]) -> Future[str]:
        """Queue a job spec (with its idempotency key); a future of its id."""
        future: Future[str] = Future()
        with self._lock:
            self._queued.append((spec, future))
            if self._draining < self._senders:
                self._draining += 1
                self._pool.submit(self._drain)
        return future

    def close(self) -> None:
        """Wait until what was queued is submitted (or failed)."""
        self._pool.shutdown(wait=True)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queued:
                    self._draining -= 1
                    return
                taken = [self._queued.popleft() for _ in range(min(self._batch, len(self._queued)))]
            self._submit(taken)

    def _submit(self, taken: list[tuple[dict[str, Any], Future[str]]]) -> None:
        try:
            ids = self._send([spec for spec, _ in taken])
        except OWN_FAULT as exc:
            if len(taken) == 1:
                taken[0][1].set_exception(exc)
                return
            for item in taken:  # one job's fault: each on its own, each future its own answer
                self._submit([item])
            return
        except Exception as exc:  # the head unreachable, the queue away past the wait: every job of it
            for _, future in taken:
                future.set_exception(exc)
            return
        for (_, future), job_id in zip(taken, ids, strict=True):
            future.set_result(job_id)
