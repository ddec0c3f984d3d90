"""The run loop, settlement and request/response at their edges: a delivery settled once
whatever the threads (SPEC 4), a handler that settles its own delivery and then raises (5),
events judged by their sender (7), late responses counted only as late (5.1), and the
positions that `tail` and a delayed publish take (3, 4.2)."""

from __future__ import annotations

import logging
import threading

import pytest
from probes import ACKED, DEAD, LEASED, SCHEDULED

import sqlbus

pytestmark = pytest.mark.backends

# ---------------------------------------------------------------------------------------------
# Settled once, from any thread (SPEC 4)


def _race(first, second):
    """Run ``first`` and ``second`` in two threads released together; their outcomes (None
    or the exception)."""
    barrier = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def call(index, fn):
        barrier.wait()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


SETTLED_AS = {"ack": "acked", "batch_ack": "acked", "fail": "retrying", "dead_letter": "dead",
              "release": "released", "retry": "retrying"}


@pytest.mark.slow
@pytest.mark.parametrize("second", ["ack", "batch_ack", "fail", "dead_letter", "release", "retry"])
def test_of_two_threads_settling_one_delivery_one_wins_and_the_other_gets_already_settled(
    bus, probe, second
):
    # The clock stands still: an ack that lost the race once found its own ack's row and
    # raised a raw StopIteration.
    alice, bob = bus.agent("alice"), bus.agent("bob")
    rounds = 200
    for _ in range(rounds):
        message_id = alice.publish("bob", "notification", {})
        (d,) = bob.receive()
        settle = {
            "ack": d.ack,
            "batch_ack": lambda d=d: bob.ack([d]),
            "fail": lambda d=d: d.fail(RuntimeError("boom")),
            "dead_letter": d.dead_letter,
            "release": d.release,
            "retry": d.retry,
        }[second]
        outcomes = _race(d.ack, settle)

        errors = [o for o in outcomes if o is not None]
        assert len(errors) == 1, outcomes
        (error,) = errors
        assert type(error) is ValueError and "already settled" in str(error), repr(error)
        won = "acked" if outcomes[0] is None else SETTLED_AS[second]
        assert probe.settled_as(d) == won and f"already settled ({won})" in str(error)
        assert (probe.message_states(message_id) == [ACKED]) == (won == "acked")
        assert LEASED not in probe.message_states(message_id)  # settled: not left leased
        for again in bob.receive(limit=10):  # released or retried (backoff 0 s: not yet) back
            again.ack()


def test_a_second_settle_of_an_acked_delivery_raises_value_error_saying_how(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.ack()
    for settle in (d.ack, lambda: bob.ack([d]), d.release, d.retry, d.dead_letter, d.extend):
        with pytest.raises(ValueError, match=r"already settled \(acked\)"):
            settle()


# ---------------------------------------------------------------------------------------------
# A handler that settles its own delivery and then raises (SPEC 5)


def _settle_then_raise(settle, raised):
    def handler(message):
        d = sqlbus.current_delivery()
        getattr(d, settle)()
        raise raised

    return handler


@pytest.mark.parametrize("type_", ["notification", "request"])
@pytest.mark.parametrize(
    "settle, raised, state",
    [
        ("ack", RuntimeError("after the ack"), ACKED),
        ("ack", sqlbus.Discard("too late"), ACKED),
        ("ack", sqlbus.Retry(0.0), ACKED),
        ("dead_letter", RuntimeError("after the dead letter"), DEAD),
        ("retry", sqlbus.Discard("too late"), SCHEDULED),
    ],
)
def test_a_handler_that_settles_its_delivery_and_then_raises_leaves_the_outcome_and_the_loop_goes_on(
    bus, probe, caplog, type_, settle, raised, state
):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    first = alice.publish("bob", type_, {"n": 1}, correlation_id="c-1")
    second = alice.publish("bob", type_, {"n": 2}, correlation_id="c-2")
    seen = []

    def handler(message):
        seen.append(message.payload["n"])
        if message.payload["n"] == 1:
            _settle_then_raise(settle, raised)(message)
        return "fine"

    bob.subscribe(type_, handler)
    with caplog.at_level(logging.WARNING, logger="sqlbus"):
        assert bob.run(until_idle=True) == 2

    assert seen == [1, 2]
    assert probe.message_states(first) == [state]
    assert probe.message_states(second) == [ACKED]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and first in r.getMessage()]
    assert warnings and type(raised).__name__ in warnings[0].getMessage()
    # Only the second request was answered; nothing answered the settled one afterwards.
    responses = [d.message.payload for d in alice.receive(limit=10)]
    assert [p.get("data") for p in responses if p.get("request_id") == first] == []


# ---------------------------------------------------------------------------------------------
# Events: "own event" is judged by the message's sender (SPEC 7)


def _event_payload(name, emitted_by):
    return {"name": name, "data": {"x": 1}, "emitted_at": "2027-01-15T08:00:00.000Z",
            "emitted_by": emitted_by, "correlation_id": None}


def test_an_event_whose_payload_forges_the_receiver_as_emitter_is_still_handled(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    got = []
    bob.events.on("build.done", got.append)
    alice.publish("bob", "event", _event_payload("build.done", "bob"))

    bob.run(until_idle=True)

    assert [(e.name, e.emitted_by) for e in got] == [("build.done", "alice")]


def test_an_agent_never_handles_its_own_event_whatever_its_payload_claims(bus, probe):
    bob = bus.agent("bob")
    got = []
    bob.events.on("*", got.append)
    bob.subscribe("event", got.append)
    message_id = bob.publish("bob", "event", _event_payload("build.done", "carol"))

    bob.run(until_idle=True)

    assert got == []
    assert probe.message_states(message_id) == [ACKED]


# ---------------------------------------------------------------------------------------------
# Late responses count only as late (SPEC 5.1)


def _time_out_a_request(alice, clock):
    with pytest.raises(sqlbus.RequestTimeoutError):
        alice.request("bob", {"q": 1}, timeout=0.05, ttl=60_000)


def _received(bus):
    m = bus.metrics()
    return (m.messages_received, m.average_delivery_ms, m.late_responses,
            m.agent_activity["alice"].received, m.agent_activity["bob"].received)


def test_a_late_direct_reply_is_counted_as_late_only_not_as_received(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    _time_out_a_request(alice, clock)
    bob.subscribe("request", lambda m: "too late")
    clock.advance(0.2)

    assert bob.run(until_idle=True) == 1

    # bob's ack of the request is the one delivery, 200 ms after its publish.
    assert _received(bus) == (1, 200.0, 1, 0, 1)
    bus.prune(sent_older_than=0)  # the totals outlive the rows
    assert _received(bus) == (1, 200.0, 1, 0, 1)


def test_a_late_response_in_the_inbox_discarded_by_the_run_loop_is_counted_as_late_only(bus, clock, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    _time_out_a_request(alice, clock)
    (request,) = bob.receive()
    clock.advance(0.2)
    bob.ack([request])
    # A response published like any message: it waits in alice's inbox.
    bob.publish("alice", "response", {"success": True, "data": 1},
                correlation_id=request.message.headers.correlation_id)
    clock.advance(0.3)
    handled = []
    alice.subscribe("*", handled.append)

    assert alice.run(until_idle=True) == 1

    assert handled == []
    assert _received(bus) == (1, 200.0, 1, 0, 1)
    bus.prune(sent_older_than=0)
    assert _received(bus) == (1, 200.0, 1, 0, 1)


def test_a_late_response_swept_by_the_next_request_is_counted_as_late_only(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    _time_out_a_request(alice, clock)
    (request,) = bob.receive()
    clock.advance(0.2)
    bob.ack([request])
    bob.publish("alice", "response", {"success": True, "data": 1},
                correlation_id=request.message.headers.correlation_id)
    clock.advance(0.3)

    _time_out_a_request(alice, clock)  # sweeps the late response in its publish transaction

    assert _received(bus) == (1, 200.0, 1, 0, 1)


# ---------------------------------------------------------------------------------------------
# Positions: tail starts when called; a delay is never early


@pytest.mark.slow
def test_tail_takes_its_position_when_called_not_at_the_first_next(bus):
    alice = bus.agent("alice")
    alice.publish("alice", "notification", {"n": 0})
    records = bus.tail(timeout=2.0)  # on PostgreSQL a busy neighbour may hold the horizon back a while
    message_id = alice.publish("alice", "notification", {"n": 1})

    assert [r.message.id for r in records] == [message_id]


def test_a_delay_is_rounded_up_to_the_millisecond_never_early(bus, clock, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    delays = {0.0015: 2, 0.0001: 1, 0.9999: 1000, 0.003: 3, 2: 2000}  # 0.003 s: 3.0000000000000004 ms
    ids = {alice.publish("bob", "notification", {}, delay=delay): ms for delay, ms in delays.items()}
    rows = probe.inbox_rows()
    assert {row.message_id: row.visible_at - row.sent_at for row in rows} == ids

    clock.advance(0.0015)  # 1.5 ms later: the 2 ms delay is not due, the 1 ms one is
    assert clock.ms - int(clock.start * 1000) == 1
    assert [d.message.id for d in bob.receive(limit=10)] == [m for m, ms in ids.items() if ms == 1]


def test_a_retry_delay_is_rounded_up_to_the_millisecond_never_early(bus, clock, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    [d] = bob.receive()
    d.retry(0.0015)  # 1.5 ms: due 2 ms later, not 1
    [row] = probe.inbox_rows()
    assert row.visible_at - clock.ms == 2
    clock.advance(0.0015)
    assert bob.receive() == []  # 1.5 ms later it is not due yet
    clock.advance(0.001)
    assert [d.message.id for d in bob.receive()] == [d.message.id]
