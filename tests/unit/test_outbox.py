"""submit_async's outbox (user_client/outbox.py): submissions made while a request is in flight share the
next one; a job refused for its own fault fails alone; an unreachable head fails every job of its request."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from common.errors import HeadUnreachable, ValidationError
from user_client.outbox import Outbox


class Head:
    """Takes batch requests: holds the first until released, refuses any that holds a spec marked bad."""

    def __init__(self, down: bool = False) -> None:
        self.requests: list[list[int]] = []
        self.release = threading.Event()
        self.in_flight = threading.Event()  # the first request arrived (and is held)
        self.down = down

    def send(self, specs: Sequence[dict[str, Any]]) -> list[str]:
        self.requests.append([s["n"] for s in specs])
        if len(self.requests) == 1:
            self.in_flight.set()
            self.release.wait(10)
        if self.down:
            raise HeadUnreachable("no head")
        bad = [i for i, s in enumerate(specs) if s.get("bad")]
        if bad:
            raise ValidationError(f"jobs[{bad[0]}]: bad params" if len(specs) > 1 else "bad params")
        return [f"job-{s['n']}" for s in specs]


def test_jobs_submitted_while_a_request_is_in_flight_share_the_next() -> None:
    head = Head()
    box = Outbox(head.send, senders=1, batch=1000)
    first = box.put({"n": 0})
    assert head.in_flight.wait(10)
    rest = [box.put({"n": i}) for i in range(1, 6)]  # queued while the first request is held
    head.release.set()
    assert first.result(10) == "job-0" and [f.result(10) for f in rest] == [f"job-{i}" for i in range(1, 6)]
    box.close()
    assert head.requests == [[0], [1, 2, 3, 4, 5]]


def test_a_batch_takes_at_most_batch_jobs() -> None:
    head = Head()
    box = Outbox(head.send, senders=1, batch=2)
    futures = [box.put({"n": 0})]
    assert head.in_flight.wait(10)
    futures += [box.put({"n": i}) for i in range(1, 5)]
    head.release.set()
    assert [f.result(10) for f in futures] == [f"job-{i}" for i in range(5)]
    box.close()
    assert head.requests == [[0], [1, 2], [3, 4]]


def test_a_job_refused_for_its_own_fault_fails_alone() -> None:
    head = Head()
    box = Outbox(head.send, senders=1, batch=1000)
    first = box.put({"n": 0})
    assert head.in_flight.wait(10)
    good = [box.put({"n": i}) for i in (1, 2)]
    bad = box.put({"n": 3, "bad": True})
    head.release.set()
    assert first.result(10) == "job-0" and [f.result(10) for f in good] == ["job-1", "job-2"]
    with pytest.raises(ValidationError, match="^bad params$"):
        bad.result(10)
    box.close()
    assert head.requests == [[0], [1, 2, 3], [1], [2], [3]]  # refused whole, then each on its own


def test_an_unreachable_head_fails_every_job_of_the_request() -> None:
    head = Head(down=True)
    box = Outbox(head.send, senders=1, batch=1000)
    futures = [box.put({"n": i}) for i in range(3)]
    head.release.set()
    for f in futures:
        with pytest.raises(HeadUnreachable):
            f.result(10)
    box.close()
