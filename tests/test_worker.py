"""SPEC 5: subscriptions and the run loop (dispatch, ack/fail, Retry/Discard, unhandled,
buffered effects, lease keeping, stop and graceful SIGTERM)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
from conftest import sqlite_only
from probes import ACKED, QUEUED, SCHEDULED

import sqlbus

pytestmark = pytest.mark.backends


@pytest.fixture
def pair(bus):
    return bus.agent("alice"), bus.agent("bob")


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_run_until_idle_hands_every_ready_message_to_its_handler_and_acks_it(pair, probe):
    alice, bob = pair
    seen = []
    bob.subscribe("notification", lambda m: seen.append(m.payload["n"]))
    for n in range(5):
        alice.publish("bob", "notification", {"n": n})

    assert bob.run(until_idle=True) == 5

    assert seen == [0, 1, 2, 3, 4]
    assert probe.states_of("bob") == {ACKED: 5}


def test_a_message_goes_to_every_handler_of_its_type_and_to_the_wildcard_handlers(pair):
    alice, bob = pair
    calls = []
    bob.subscribe("notification", lambda m: calls.append(("first", m.type)))
    bob.subscribe("notification", lambda m: calls.append(("second", m.type)))
    bob.subscribe("*", lambda m: calls.append(("wildcard", m.type)))
    alice.publish("bob", "notification", {})
    alice.publish("bob", "heartbeat", {})

    bob.run(until_idle=True)

    assert calls == [("first", "notification"), ("second", "notification"),
                     ("wildcard", "notification"), ("wildcard", "heartbeat")]


def test_unsubscribe_stops_calls_and_subscribing_twice_calls_once(pair):
    alice, bob = pair
    calls = []

    def handler(message):
        calls.append(message.payload["n"])

    bob.subscribe("notification", handler)
    bob.subscribe("notification", handler)
    alice.publish("bob", "notification", {"n": 1})
    bob.run(until_idle=True)
    bob.unsubscribe("notification", handler)
    bob.subscribe("*", lambda m: None)  # keeps the next one from counting as unhandled
    alice.publish("bob", "notification", {"n": 2})
    bob.run(until_idle=True)

    assert calls == [1]


def test_subscribe_rejects_an_unknown_type_and_a_non_callable(pair):
    _, bob = pair
    with pytest.raises(sqlbus.ValidationError, match="type"):
        bob.subscribe("nonsense", lambda m: None)
    with pytest.raises(TypeError, match="callable"):
        bob.subscribe("notification", "not a function")


def test_a_message_without_handler_is_acked_and_counted_as_unhandled(pair, bus, probe):
    alice, bob = pair
    bob.subscribe("task_result", lambda m: None)
    alice.publish("bob", "notification", {"text": "nobody listens"})
    alice.publish("bob", "heartbeat", {})

    assert bob.run(until_idle=True) == 2

    assert probe.states_of("bob") == {ACKED: 2}
    assert probe.counter("unhandled", "bob") == 2
    assert bus.metrics().messages_unhandled == 2
    assert bob.receive(wait=0) == []


def test_run_until_idle_does_not_wait_for_retries_that_are_due_later(make_bus, probe, clock):
    bus = make_bus(backoff_base=5.0)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    attempts = []

    def flaky(message):
        attempts.append(message.headers.retry_count)
        if len(attempts) == 1:
            raise ConnectionError("first try fails")

    bob.subscribe("notification", flaky)
    alice.publish("bob", "notification", {}, ttl=0)

    bob.run(until_idle=True)
    assert attempts == [0]  # the retry is due in 5 s: not ready now
    assert probe.states_of("bob") == {SCHEDULED: 1}

    clock.advance(5.0)
    bob.run(until_idle=True)
    assert attempts == [0, 1]
    assert probe.states_of("bob") == {ACKED: 1}


def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(make_bus, clock, probe):
    bus = make_bus(backoff_base=1.0, max_attempts=3)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    tries = []

    def broken(message):
        tries.append(message.headers.retry_count)
        raise RuntimeError(f"broken on try {len(tries)}")

    bob.subscribe("task_assignment", broken)
    alice.publish("bob", "task_assignment", {"task": {"id": "t1", "type": "x"}}, ttl=0)

    for _ in range(3):
        bob.run(until_idle=True)
        clock.advance(10)

    assert tries == [0, 1, 2]
    dead = bus.dead_letters()
    assert [(d.reason, d.error_name, d.error_message, d.attempts) for d in dead] == [
        ("max_attempts", "RuntimeError", "broken on try 3", 3)
    ]
    assert probe.error_counts() == {"RuntimeError": 3}


def test_a_non_retryable_handler_error_dead_letters_at_once(pair, bus):
    alice, bob = pair

    def strict(message):
        raise sqlbus.ValidationError("payload.x: expected int")

    bob.subscribe("notification", strict)
    alice.publish("bob", "notification", {"x": "y"})
    bob.run(until_idle=True)

    assert [d.reason for d in bus.dead_letters()] == ["non_retryable"]


def test_retry_from_a_handler_redelivers_after_its_delay_without_counting_an_error(pair, clock, probe):
    alice, bob = pair
    tries = []

    def later(message):
        tries.append(message.headers.retry_count)
        if len(tries) == 1:
            raise sqlbus.Retry(delay=30)

    bob.subscribe("notification", later)
    alice.publish("bob", "notification", {}, ttl=0)
    bob.run(until_idle=True)
    clock.advance(29)
    bob.run(until_idle=True)
    assert tries == [0]
    clock.advance(1)
    bob.run(until_idle=True)

    assert tries == [0, 1]
    assert probe.states_of("bob") == {ACKED: 1}
    assert probe.error_counts() == {}


def test_discard_from_a_handler_dead_letters_with_its_reason(pair, bus):
    alice, bob = pair

    def refuse(message):
        raise sqlbus.Discard("poison: unknown schema")

    bob.subscribe("notification", refuse)
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)

    assert [(d.reason, d.agent) for d in bus.dead_letters()] == [("poison: unknown schema", "bob")]


# ---------------------------------------------------------------------------------------------
# Buffered effects and transactions


def test_effects_buffered_on_the_current_delivery_commit_with_the_ack(pair, bus, probe):
    alice, bob = pair
    bus.agent("carol")

    def handle(message):
        d = sqlbus.current_delivery()
        assert d is not None and d.message.id == message.id
        d.publish("carol", "notification", {"from_handler": True})
        d.state.set("job/1", {"status": "done"})
        assert bus.state.get("job/1") is None  # not before the ack

    bob.subscribe("task_assignment", handle)
    alice.publish("bob", "task_assignment", {"task": {"id": "1", "type": "x"}})
    bob.run(until_idle=True)

    assert bus.state.get("job/1").value == {"status": "done"}
    assert [d.message.payload for d in bus.agent("carol").receive(limit=10, types=["notification"])] == [
        {"from_handler": True}
    ]
    assert sqlbus.current_delivery() is None


def test_effects_buffered_by_a_failing_handler_are_dropped(pair, bus):
    alice, bob = pair
    bus.agent("carol")

    def handle(message):
        sqlbus.current_delivery().publish("carol", "notification", {"x": 1})
        sqlbus.current_delivery().state.set("job/2", 1)
        raise RuntimeError("fails after buffering")

    bob.subscribe("notification", handle)
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)

    assert bus.agent("carol").receive(limit=10) == []
    assert bus.state.get("job/2") is None


@sqlite_only("one write lock for the whole database is SQLite's; PostgreSQL locks rows")
def test_no_write_transaction_is_open_while_a_handler_runs(pair, probe):
    alice, bob = pair
    outcome = []

    def handle(message):
        outcome.append("write lock was free" if probe.write_lock_is_free() else "write lock was held")

    bob.subscribe("notification", handle)
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)

    assert outcome == ["write lock was free"]


@pytest.mark.slow
def test_a_long_handler_keeps_its_lease_and_no_one_else_gets_the_message(make_bus, database, probe):
    bus = make_bus(clock=None, lease=0.3)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    stolen = []

    def slow(message):
        other = database.connect()  # another receiver of bob's inbox, on its own connection
        try:
            for _ in range(6):
                time.sleep(0.15)
                stolen.extend(other.agent("bob").receive(limit=1))
        finally:
            other.close()

    bob.subscribe("notification", slow)
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)

    assert stolen == []
    assert [(row.state, row.attempts) for row in probe.inbox_rows(agent="bob")] == [(ACKED, 1)]


# ---------------------------------------------------------------------------------------------
# Stopping


def test_stop_from_another_thread_ends_a_waiting_run(make_bus):
    bus = make_bus(clock=None)
    bob = bus.agent("bob")
    result = []
    thread = threading.Thread(target=lambda: result.append(bob.run()))
    thread.start()
    time.sleep(0.1)
    bob.stop()
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert result == [0]


def test_a_run_loop_acks_a_message_and_claims_the_next_in_one_transaction(
    pair, probe, monkeypatch
):
    alice, bob = pair
    alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}}
                        for n in range(5)])
    seen = []
    bob.subscribe("notification", lambda m: seen.append(m.payload["n"]))
    writes = probe.count_write_transactions(monkeypatch)

    assert bob.run(until_idle=True) == 5

    assert seen == [0, 1, 2, 3, 4]
    assert len(writes) == 6  # the first claim, then five acks each claiming the next


def test_a_run_loop_that_stops_gives_back_the_messages_no_handler_saw(pair, probe):
    alice, bob = pair
    ids = alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}}
                              for n in range(3)])
    bob.subscribe("notification", lambda m: bob.stop())

    assert bob.run(limit=3) == 1

    assert probe.states_of("bob") == {ACKED: 1, QUEUED: 2}
    again = bob.receive(limit=10)
    assert [(d.message.id, d.attempts) for d in again] == [(ids[1], 1), (ids[2], 1)]


def test_run_refuses_a_second_loop_on_the_same_agent_object(make_bus):
    bus = make_bus(clock=None)
    bob = bus.agent("bob")
    thread = threading.Thread(target=bob.run)
    thread.start()
    try:
        time.sleep(0.05)
        with pytest.raises(RuntimeError, match="already running"):
            bob.run(until_idle=True)
    finally:
        bob.stop()
        thread.join(timeout=5)


def _sigterm_worker(where, keywords: dict, log_path: str, ready) -> None:
    bus = sqlbus.connect(where, **keywords)
    bob = bus.agent("bob")

    def handle(message):
        with open(log_path, "a") as log:
            log.write(message.id + "\n")
        time.sleep(0.005)

    bob.subscribe("notification", handle)
    ready.set()
    bob.run(limit=5)
    bus.close()
    os._exit(0)  # exited normally: run() returned after the signal


@pytest.mark.slow
def test_a_sigtermed_run_in_a_child_process_loses_nothing(make_bus, database, tmp_path, probe):
    bus = make_bus(clock=None)
    alice = bus.agent("alice")
    bus.agent("bob")
    ids = alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}, "ttl": 0}
                              for n in range(200)])
    log_path = tmp_path / "handled.log"
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as in production
    ready = ctx.Event()
    child = ctx.Process(target=_sigterm_worker, args=(*database.place(), str(log_path), ready))
    child.start()
    assert ready.wait(10)
    deadline = time.monotonic() + 10
    while (not log_path.exists() or len(log_path.read_text().split()) < 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=10)
    assert child.exitcode == 0

    handled = log_path.read_text().split()
    acked = probe.message_ids(agent="bob", state=ACKED)
    assert 20 <= len(handled) < 200
    assert sorted(handled) == sorted(acked)  # every handled message was acked, exactly once
    # The rest were released: ready now, for the next receiver, with nothing lost.
    now_ms = int(time.time() * 1000) + 1
    waiting = len([row for row in probe.inbox_rows(agent="bob", state=QUEUED)
                   if row.visible_at <= now_ms])
    assert waiting == 200 - len(handled)

    bob = bus.agent("bob")
    later = []
    bob.subscribe("notification", lambda m: later.append(m.id))
    bob.run(until_idle=True)
    assert sorted(handled + later) == sorted(ids)


def test_run_in_the_main_thread_restores_the_previous_signal_handlers(make_bus):
    bus = make_bus(clock=None)
    bob = bus.agent("bob")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    bob.run(until_idle=True)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before



def test_a_buffered_state_write_that_conflicts_at_the_ack_fails_the_message_for_a_retry(pair, bus, clock):
    alice, bob = pair
    bus.state.set("plan", {"v": 1})
    tries = []

    def handle(message):
        tries.append(message.headers.retry_count)
        entry = bus.state.get("plan")
        if len(tries) == 1:
            bus.state.set("plan", {"v": "changed meanwhile"})  # another writer wins the race
        sqlbus.current_delivery().state.set("plan", {"v": 2}, expected_version=entry.version)

    bob.subscribe("notification", handle)
    alice.publish("bob", "notification", {}, ttl=0)
    bob.run(until_idle=True)  # the loop goes on: no VersionConflictError escapes run()
    assert bus.state.get("plan").value == {"v": "changed meanwhile"}
    clock.advance(2)
    bob.run(until_idle=True)

    assert tries == [0, 1]
    assert bus.state.get("plan").value == {"v": 2}
