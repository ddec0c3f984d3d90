"""SPEC 4: fail, retry with backoff, non-retryable errors, Retry/Discard, dead-letter records,
TTL expiry, requeue and purge. Time is a fake clock: nothing here sleeps."""

from __future__ import annotations

import msgspec
import pytest
from probes import LEASED, SCHEDULED

import sqlbus

pytestmark = pytest.mark.backends


def receive_at(agent, clock, at):
    """Receive with the clock at ``at`` seconds after its start, after checking that 1 ms
    earlier nothing was ready."""
    clock.now = clock.start + at - 0.001
    assert agent.receive() == [], f"delivered before {at} s"
    clock.now = clock.start + at
    got = agent.receive()
    assert len(got) == 1, f"nothing delivered at {at} s"
    return got[0]


@pytest.fixture
def pair(bus):
    return bus.agent("alice"), bus.agent("bob")


# ---------------------------------------------------------------------------------------------
# Backoff


def test_failures_are_retried_after_1_2_4_8_seconds_and_dead_lettered_on_the_fifth(
    bus, pair, clock
):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {}, ttl=0)
    (d,) = bob.receive()
    at = 0.0
    for attempt, backoff in enumerate([1, 2, 4, 8], start=1):
        assert d.attempts == attempt
        assert d.message.headers.retry_count == attempt - 1
        clock.now += 0.25  # the handler took a while: backoff counts from the failure
        at += 0.25
        d.fail(RuntimeError(f"failure {attempt}"))
        at += backoff
        d = receive_at(bob, clock, at)
    assert d.attempts == 5
    d.fail(RuntimeError("failure 5"))
    assert bus.dead_letters() != []
    clock.advance(3600)
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert (dead.message.id, dead.reason, dead.attempts) == (message_id, "max_attempts", 5)
    assert dead.error_message == "failure 5"


def test_backoff_base_is_configurable(make_bus, clock):
    bus = make_bus(backoff_base=0.25)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {}, ttl=0)
    (d,) = bob.receive()
    at = 0.0
    for backoff in (0.25, 0.5, 1.0, 2.0):
        d.fail(RuntimeError())
        at += backoff
        d = receive_at(bob, clock, at)
    assert d.attempts == 5


def test_backoff_is_capped_at_16_seconds_when_max_attempts_is_raised(make_bus, clock):
    bus = make_bus(max_attempts=8)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {}, ttl=0)
    (d,) = bob.receive()
    at = 0.0
    for backoff in (1, 2, 4, 8, 16, 16, 16):
        d.fail(RuntimeError())
        at += backoff
        d = receive_at(bob, clock, at)
    assert d.attempts == 8
    d.fail(RuntimeError())
    (dead,) = bus.dead_letters()
    assert (dead.reason, dead.attempts) == ("max_attempts", 8)


def test_a_retry_comes_back_at_its_original_priority(bus, pair, clock):
    alice, bob = pair
    urgent = alice.publish("bob", "notification", {}, priority=5)
    (d,) = bob.receive()
    d.fail(RuntimeError())
    normal = alice.publish("bob", "notification", {})
    clock.advance(1)
    assert [x.message.id for x in bob.receive(limit=2)] == [urgent, normal]


def test_fail_records_the_last_error_on_the_message(bus, pair, probe):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.fail(KeyError("missing"))
    assert [(row.last_error, row.attempts) for row in probe.inbox_rows(message_id)] == [
        ("KeyError: 'missing'", 1)]


def test_a_lease_that_runs_out_max_attempts_times_ends_in_dead_letters(bus, pair, clock):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {}, ttl=0)
    for attempt in range(1, 6):
        (d,) = bob.receive(lease=1.0)
        assert d.attempts == attempt
        clock.advance(1)
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert (dead.message.id, dead.reason, dead.attempts) == (message_id, "max_attempts", 5)


# ---------------------------------------------------------------------------------------------
# Non-retryable errors


class NotWorthRetrying(Exception):
    pass


class AlsoNotWorthIt(NotWorthRetrying):
    pass


@pytest.mark.parametrize(
    "error",
    [
        sqlbus.ValidationError("payload.x: bad"),
        sqlbus.PayloadTooLargeError("too big"),
        msgspec.ValidationError("Expected `int`"),
        sqlbus.AuthenticationError("who are you"),
        PermissionError("no"),
        NotWorthRetrying("caller says so"),
        AlsoNotWorthIt("a subclass too"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_non_retryable_errors_dead_letter_at_once(make_bus, clock, error):
    bus = make_bus(non_retryable=(NotWorthRetrying,))
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with pytest.raises(type(error)):
        with d:
            raise error
    clock.advance(60)
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert (dead.reason, dead.attempts, dead.error_name) == (
        "non_retryable", 1, type(error).__name__)


def test_an_ordinary_error_is_retried_not_dead_lettered(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with pytest.raises(ValueError):
        with d:
            raise ValueError("plain ValueError is retryable")
    assert bus.dead_letters() == []
    clock.advance(1)
    assert bob.receive()[0].attempts == 2


def test_fail_with_retryable_false_dead_letters_at_once(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.fail(RuntimeError("give up"), retryable=False, context={"step": 3})
    (dead,) = bus.dead_letters()
    assert (dead.reason, dead.context) == ("non_retryable", {"step": 3})


# ---------------------------------------------------------------------------------------------
# Retry and Discard signals


def test_retry_with_a_delay_inside_with_is_handled_and_redelivers_after_that_delay(
    bus, pair, clock, probe
):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with d:
        raise sqlbus.Retry(delay=3.0)
    d = receive_at(bob, clock, 3.0)
    assert d.attempts == 2
    assert probe.error_counts() == {}  # a Retry is not a failure


def test_retry_without_a_delay_uses_the_backoff(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with d:
        raise sqlbus.Retry()
    d = receive_at(bob, clock, 1.0)
    with d:
        raise sqlbus.Retry()
    receive_at(bob, clock, 3.0)


def test_retry_on_the_last_attempt_ends_in_dead_letters(make_bus, clock):
    bus = make_bus(max_attempts=2)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with d:
        raise sqlbus.Retry(0)
    (d,) = bob.receive()
    with d:
        raise sqlbus.Retry(0)
    assert bob.receive() == []
    assert [x.reason for x in bus.dead_letters()] == ["max_attempts"]


def test_discard_inside_with_dead_letters_now_with_its_reason(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {"n": 1})
    alice.publish("bob", "notification", {"n": 2})
    first, second = bob.receive(limit=2)
    with first:
        raise sqlbus.Discard("malformed order")
    with second:
        raise sqlbus.Discard()
    reasons = {x.message.payload["n"]: x.reason for x in bus.dead_letters()}
    assert reasons == {1: "malformed order", 2: "discarded"}


def test_with_reraises_the_handlers_exception_after_recording_the_failure(bus, pair, probe):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with pytest.raises(ZeroDivisionError):
        with d:
            1 / 0  # noqa: B018
    assert [(row.state, row.last_error) for row in probe.inbox_rows(message_id)] == [
        (SCHEDULED, "ZeroDivisionError: division by zero")]


def test_retry_refuses_a_negative_delay():
    with pytest.raises(ValueError):
        sqlbus.Retry(-1)


# ---------------------------------------------------------------------------------------------
# The dead-letter record


def _handler_that_breaks():
    raise LookupError("order 17 not found")


def test_a_dead_letter_record_keeps_the_message_error_traceback_and_counts(make_bus, clock):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    message_id = alice.publish("bob", "request", {"order": 17}, priority=4,
                               correlation_id="c-17")
    (d,) = bob.receive()
    clock.advance(0.5)
    with pytest.raises(LookupError):
        with d:
            _handler_that_breaks()
    (dead,) = bus.dead_letters()
    assert isinstance(dead, sqlbus.DeadLetter)
    assert dead.agent == "bob"
    assert dead.message.id == message_id
    assert dead.message.sender == "alice"
    assert dead.message.payload == {"order": 17}
    assert dead.message.headers.priority == 4
    assert dead.message.headers.correlation_id == "c-17"
    assert dead.reason == "max_attempts"
    assert dead.error_name == "LookupError"
    assert dead.error_message == "order 17 not found"
    assert "_handler_that_breaks" in dead.traceback
    assert "LookupError: order 17 not found" in dead.traceback
    assert dead.failed_at == "2027-01-15T08:00:00.500Z"
    assert dead.attempts == 1
    assert dead.context == {}
    assert bus.dead_letter(dead.id) == dead


def test_dead_letter_with_the_callers_reason_and_context(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.dead_letter("operator said no", context={"ticket": "OPS-1"})
    (dead,) = bus.dead_letters()
    assert (dead.reason, dead.context, dead.error_name, dead.attempts) == (
        "operator said no", {"ticket": "OPS-1"}, None, 1)


def test_dead_letter_refuses_an_empty_reason(bus, pair, probe):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    with pytest.raises(ValueError, match="reason"):
        d.dead_letter("")
    assert probe.message_states(message_id) == [LEASED]
    d.ack()  # the lease is still held


def test_dead_letters_filters_by_agent_newest_first(bus, pair):
    alice, bob = pair
    carol = bus.agent("carol")
    alice.publish("bob", "notification", {"n": 1})
    alice.publish("carol", "notification", {"n": 2})
    alice.publish("bob", "notification", {"n": 3})
    for d in bob.receive(limit=5) + carol.receive(limit=5):
        d.dead_letter("x")
    assert [x.message.payload["n"] for x in bus.dead_letters(agent="bob")] == [3, 1]
    assert [x.message.payload["n"] for x in bus.dead_letters(agent="carol")] == [2]
    assert len(bus.dead_letters(limit=2)) == 2


# ---------------------------------------------------------------------------------------------
# TTL


def test_a_message_older_than_its_ttl_is_never_delivered_and_is_dead_lettered_as_expired(
    bus, pair, clock
):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {"stale": True}, ttl=1_000)
    fresh = alice.publish("bob", "notification", {"stale": False}, ttl=0)
    clock.advance(1.001)
    assert [d.message.id for d in bob.receive(limit=5)] == [fresh]
    (dead,) = bus.dead_letters()
    assert (dead.message.id, dead.reason, dead.attempts) == (message_id, "expired", 0)


def test_a_message_exactly_ttl_old_is_still_delivered(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {}, ttl=1_000)
    clock.advance(1.0)
    assert len(bob.receive()) == 1


def test_ttl_zero_never_expires(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {}, ttl=0)
    clock.advance(365 * 24 * 3600)
    assert len(bob.receive()) == 1
    assert bus.dead_letters() == []


def test_a_message_that_expires_while_waiting_for_a_retry_is_dead_lettered_as_expired(
    bus, pair, clock
):
    alice, bob = pair
    alice.publish("bob", "notification", {}, ttl=3_000)
    (d,) = bob.receive()
    d.fail(RuntimeError())
    clock.advance(3.5)
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert (dead.reason, dead.attempts) == ("expired", 1)


# ---------------------------------------------------------------------------------------------
# Requeue and purge


def test_requeue_puts_a_dead_letter_back_with_attempts_reset_and_a_fresh_ttl(
    bus, pair, clock, probe
):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {"n": 1}, ttl=1_000)
    (d,) = bob.receive()
    d.fail(RuntimeError("first"))
    clock.advance(600)  # long past the original ttl
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert dead.reason == "expired"
    assert bus.requeue(dead.id) == message_id
    assert bus.dead_letters() == []
    assert bus.dead_letter(dead.id) is None
    (again,) = bob.receive()
    assert again.message.id == message_id
    assert again.attempts == 1
    assert again.message.payload == {"n": 1}
    again.fail(RuntimeError("second"))
    clock.advance(1.0)  # the fresh ttl (1 s from the requeue) still allows the retry at 1 s
    (third,) = bob.receive()
    assert third.attempts == 2


def test_requeue_of_an_unknown_dead_letter_raises_key_error(bus, probe):
    before = probe.row_counts()
    with pytest.raises(KeyError):
        bus.requeue(12345)
    assert probe.row_counts() == before


def test_purge_dead_letters_removes_only_those_older_than_the_cutoff(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {"n": 1}, ttl=0)
    (d,) = bob.receive()
    d.dead_letter("old")
    clock.advance(100)
    alice.publish("bob", "notification", {"n": 2}, ttl=0)
    (d,) = bob.receive()
    d.dead_letter("new")
    clock.advance(10)
    assert bus.purge_dead_letters(older_than=60) == 1
    assert [x.reason for x in bus.dead_letters()] == ["new"]
    assert bus.purge_dead_letters() == 1
    assert bus.dead_letters() == []
    assert bus.purge_dead_letters() == 0
    with pytest.raises(ValueError):
        bus.purge_dead_letters(older_than=-1)
