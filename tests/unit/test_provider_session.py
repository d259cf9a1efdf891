"""Unit tests of provider_node/session.py: the provider's pure session core (no sockets, no clock).

Replies are built with ``protocol.encode`` and decoded again, so each one is a message the head
could really send (checked against the wire schemas of common/protocol.py).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from common import protocol
from provider_node.session import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    RESUBSCRIBE_AFTER,
    Reconnect,
    Registered,
    RenewIdentity,
    SendHeartbeat,
    SendRegister,
    Session,
    WaitToRegister,
)

PID = "a" * 32
HEAD = "1" * 32
RESTARTED_HEAD = "2" * 32


def reply(msg_type: str, **fields: Any) -> protocol.Message:
    return protocol.decode(protocol.encode(msg_type, fields), max_bytes=0)


def registered(interval: float = 2.0, incarnation: str = HEAD, **extra: Any) -> protocol.Message:
    return reply("registered", provider_id=PID, epoch=incarnation, heartbeat_interval_s=interval, **extra)


def ack(incarnation: str = HEAD, subscribed: bool | None = None) -> protocol.Message:
    fields: dict[str, Any] = {"epoch": incarnation}
    if subscribed is not None:
        fields["subscribed"] = subscribed
    return reply("heartbeat_ack", **fields)


def error(code: str, message: str = "no") -> protocol.Message:
    return reply("error", code=code, message=message)


def new_session(share_files: bool = False) -> Session:
    ids = (f"{n:032x}" for n in itertools.count(1))
    return Session(PID, share_files=share_files, new_id=lambda: next(ids))


def registered_session(now: float = 0.0, interval: float = 2.0) -> Session:
    session = new_session()
    assert session.start() == [SendRegister()]
    session.on_reply(registered(interval), now)
    return session


# ---- registration ---------------------------------------------------------------------------
def test_start_registers_at_once_and_waits_for_the_reply() -> None:
    session = new_session()
    assert session.start() == [SendRegister()]
    assert not session.registered
    assert session.due(100.0) == []  # nothing more while the register is unanswered
    assert session.seconds_until_due(0.0) is None


def test_registered_reply_sets_the_head_and_its_heartbeat_interval() -> None:
    session = new_session()
    session.start()
    commands = session.on_reply(registered(interval=2.5), now=10.0)
    assert commands == [Registered(HEAD, None)]
    assert session.registered and session.incarnation == HEAD
    assert session.heartbeat_interval_s == 2.5
    assert session.seconds_until_due(10.0) == pytest.approx(2.5)


def test_state_dir_is_probed_only_when_files_may_be_shared() -> None:
    for share, expected in ((True, "/srv/dcf"), (False, None)):
        session = new_session(share_files=share)
        session.start()
        assert session.on_reply(registered(state_dir="/srv/dcf"), 0.0) == [Registered(HEAD, expected)]


def test_shared_files_found_make_the_next_heartbeat_due_at_once() -> None:
    session = registered_session(now=5.0, interval=3.0)
    assert session.due(5.0) == []
    session.on_shared_files(5.0)
    assert session.due(5.0) == [SendHeartbeat()]


# ---- heartbeats -----------------------------------------------------------------------------
def test_heartbeats_every_interval_one_at_a_time() -> None:
    session = registered_session(now=0.0, interval=2.0)
    assert session.due(1.99) == []
    assert session.seconds_until_due(1.5) == pytest.approx(0.5)
    assert session.due(2.0) == [SendHeartbeat()]
    assert session.due(10.0) == []  # the ack has not come: no second heartbeat
    assert session.on_reply(ack(), 2.1) == []
    assert session.due(3.9) == []
    assert session.due(4.0) == [SendHeartbeat()]


def test_a_late_reply_does_not_move_the_heartbeat_schedule() -> None:
    session = registered_session(now=0.0, interval=2.0)
    assert session.due(2.0) == [SendHeartbeat()]
    session.on_reply(ack(), 3.5)  # slow head
    assert session.due(3.9) == []
    assert session.due(4.0) == [SendHeartbeat()]


def test_unregistered_session_sends_no_heartbeat() -> None:
    session = new_session()
    session.start()
    session.on_reply(error("bad_version"), 0.0)
    assert session.seconds_until_due(0.0) == pytest.approx(FIRST_BACKOFF_S)
    assert session.due(FIRST_BACKOFF_S) == [SendRegister()]  # a register, not a heartbeat


# ---- refusals and back-off ------------------------------------------------------------------
def test_refused_registration_backs_off_doubling_up_to_the_cap() -> None:
    session = new_session()
    session.start()
    now, waits = 0.0, []
    for _ in range(9):
        (wait,) = session.on_reply(error("bad_version", "too old"), now)
        assert isinstance(wait, WaitToRegister)
        assert (wait.code, wait.message) == ("bad_version", "too old")
        assert wait.until == pytest.approx(now + wait.retry_in_s)
        waits.append(wait.retry_in_s)
        assert session.due(wait.until - 0.01) == []
        now = wait.until
        assert session.due(now) == [SendRegister()]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert max(waits) == MAX_BACKOFF_S


def test_backoff_starts_over_after_a_registration() -> None:
    session = new_session()
    session.start()
    for now in (0.0, 1.0, 3.0):
        session.on_reply(error("bad_version"), now)
        session.due(100.0)
    session.on_reply(registered(), 100.0)
    session.due(102.0)  # heartbeat
    (wait,) = session.on_reply(error("bad_message"), 102.5)
    assert isinstance(wait, WaitToRegister) and wait.retry_in_s == FIRST_BACKOFF_S


# ---- head restart ---------------------------------------------------------------------------
def test_unknown_provider_registers_again_at_once() -> None:
    session = registered_session(now=0.0)
    assert session.due(2.0) == [SendHeartbeat()]
    commands = session.on_reply(error("unknown_provider", "register again"), 2.1)
    assert commands == [SendRegister(again=True)]
    assert not session.registered
    assert session.due(2.1) == []  # the register is in flight
    assert session.on_reply(registered(incarnation=RESTARTED_HEAD), 2.2) == [Registered(RESTARTED_HEAD, None)]
    assert session.registered and session.incarnation == RESTARTED_HEAD
    assert session.provider_id == PID  # the same identity


def test_unknown_provider_resets_the_backoff() -> None:
    session = new_session()
    session.start()
    for now in (0.0, 1.0, 3.0):
        session.on_reply(error("bad_version"), now)
        session.due(100.0)
    session.on_reply(error("unknown_provider"), 100.0)
    (wait,) = session.on_reply(error("bad_version"), 100.5)
    assert isinstance(wait, WaitToRegister) and wait.retry_in_s == FIRST_BACKOFF_S


def test_heartbeat_ack_follows_the_heads_incarnation() -> None:
    session = registered_session()
    session.due(2.0)
    session.on_reply(ack(incarnation=RESTARTED_HEAD), 2.1)
    assert session.incarnation == RESTARTED_HEAD and session.registered


# ---- identity renewal (CURVE) ---------------------------------------------------------------
def test_unauthorized_takes_a_new_id_and_registers_with_it() -> None:
    session = registered_session()
    session.due(2.0)
    commands = session.on_reply(error("unauthorized", "bound to another key"), 2.1)
    assert commands == [RenewIdentity(PID, f"{1:032x}")]
    assert session.provider_id == f"{1:032x}" and not session.registered
    assert session.due(2.1) == [SendRegister()]
    session.on_reply(error("unauthorized"), 2.2)
    assert session.provider_id == f"{2:032x}"  # a fresh one each time


# ---- re-opening SUB and PUSH ----------------------------------------------------------------
def beat(session: Session, now: float, subscribed: bool | None) -> list[Any]:
    assert session.due(now) == [SendHeartbeat()]
    return session.on_reply(ack(subscribed=subscribed), now)


def test_reconnect_after_n_acks_in_a_row_without_our_subscription() -> None:
    session = registered_session(interval=1.0)
    now = 1.0
    for _ in range(RESUBSCRIBE_AFTER - 1):
        assert beat(session, now, subscribed=False) == []
        now += 1.0
    assert beat(session, now, subscribed=False) == [Reconnect()]
    for _ in range(RESUBSCRIBE_AFTER - 1):  # the count starts over
        now += 1.0
        assert beat(session, now, subscribed=False) == []


def test_an_ack_with_our_subscription_resets_the_count() -> None:
    session = registered_session(interval=1.0)
    now = 1.0
    for subscribed in [False] * (RESUBSCRIBE_AFTER - 1) + [True] + [False] * (RESUBSCRIBE_AFTER - 1):
        assert beat(session, now, subscribed) == []
        now += 1.0
    assert beat(session, now, subscribed=None) == []  # a head that does not say counts as subscribed


def test_refused_handshake_reconnects_once_registered() -> None:
    session = new_session()
    session.start()
    session.on_handshake_refused()  # the head did not allow our key yet; the register timed out
    assert session.on_reply(error("bad_version"), 0.0) == [WaitToRegister(1.0, 1.0, "bad_version", "no")]
    session.due(1.0)
    assert session.on_reply(registered(), 1.0) == [Registered(HEAD, None), Reconnect()]
    session.due(3.0)
    assert session.on_reply(ack(), 3.0) == []  # once


def test_refused_handshake_while_registered_reconnects_after_the_next_ack() -> None:
    session = registered_session()
    assert session.due(2.0) == [SendHeartbeat()]
    session.on_handshake_refused()
    assert session.on_reply(ack(), 2.5) == [Reconnect()]


# ---- the device a subtask runs on: progress at most every 0.25 s, a stop between blocks ------------
def test_subtask_device_reports_progress_sparingly_and_stops_when_told() -> None:
    from common.tasks.base import SubtaskCancelled
    from provider_node.device import REPORT_EVERY_S, SubtaskDevice

    class Base:
        kind = "cpu"
        head_host = "127.0.0.1"
        cache: dict = {}

    clock = [0.0]
    stop = [False]
    sent: list[tuple[int, int]] = []
    dev = SubtaskDevice(Base(), lambda: stop[0], lambda d, t: sent.append((d, t)),  # type: ignore[arg-type]
                        now=lambda: clock[0])
    dev.checkpoint(1, 10)
    assert sent == []  # a subtask shorter than REPORT_EVERY_S reports nothing
    clock[0] = REPORT_EVERY_S
    dev.checkpoint(2, 10)
    clock[0] += REPORT_EVERY_S / 2
    dev.checkpoint(3, 10)
    clock[0] += REPORT_EVERY_S
    dev.checkpoint(10, 10)  # the end is told by the result
    assert sent == [(2, 10)]
    stop[0] = True
    with pytest.raises(SubtaskCancelled):
        dev.checkpoint(4, 10)
