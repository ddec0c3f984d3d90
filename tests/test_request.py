"""SPEC 5.1: request/response across real processes: success, remote error, timeout, late
responses discarded and counted, and a requester whose own run() loop runs beside it."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
from probes import ACKED

import sqlbus

pytestmark = pytest.mark.backends

# spawn, not fork: a child forked from a process with an open SQLite connection shares that
# process's SQLite lock bookkeeping without holding its locks (see the report on fork).
ctx = multiprocessing.get_context("spawn")


def _responder(where, keywords: dict, ready, delay: float) -> None:
    """bob, in a child process: answers requests until told to stop with a `shutdown`."""
    bus = sqlbus.connect(where, **keywords)
    bob = bus.agent("bob")

    def answer(message):
        time.sleep(delay)
        q = message.payload.get("q")
        if q == "fail":
            raise ValueError("bob cannot do 'fail'")
        return {"doubled": q * 2}

    bob.subscribe("request", answer)
    bob.subscribe("shutdown", lambda m: bob.stop())
    ready.set()
    bob.run()
    bus.close()
    os._exit(0)


@pytest.fixture
def responder(database):
    """Start bob in another process; ``responder(delay=...)``; stopped at the end."""
    started = []

    def start(delay: float = 0.0):
        database.connect().close()
        ready = ctx.Event()
        child = ctx.Process(target=_responder, args=(*database.place(), ready, delay))
        child.start()
        assert ready.wait(10)
        started.append(child)
        return child

    yield start
    with database.connect() as bus:
        for child in started:
            if child.is_alive():
                bus.agent("stopper").publish("bob", "shutdown", {})
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
                child.join()
            assert child.exitcode == 0


@pytest.fixture
def alice(make_bus):
    return make_bus(clock=None).agent("alice")


def test_a_request_returns_the_data_of_the_handler_in_another_process(responder, alice, probe):
    responder()

    assert alice.request("bob", {"q": 21}, timeout=10) == {"doubled": 42}
    assert [alice.request("bob", {"q": n}, timeout=10)["doubled"] for n in range(5)] == [0, 2, 4, 6, 8]
    # The request and its response are both acked: nothing is left in any inbox.
    assert [(row.type, row.state) for row in probe.inbox_rows()
            if row.type in ("request", "response") and row.state != ACKED] == []


def test_the_response_carries_success_data_request_id_and_the_correlation_id(responder, alice, bus):
    responder()
    alice.request("bob", {"q": 1}, timeout=10)

    request, response = (record.message for record in reversed(bus.sent(limit=2)))
    assert (request.type, response.type) == ("request", "response")
    assert response.headers.correlation_id == request.headers.correlation_id
    assert isinstance(request.headers.correlation_id, str)
    assert response.payload == {"success": True, "data": {"doubled": 2}, "request_id": request.id}


def test_a_handler_exception_comes_back_as_a_remote_error_and_the_request_is_not_retried(
    responder, alice, probe
):
    responder()

    with pytest.raises(sqlbus.RemoteError, match="bob cannot do 'fail'"):
        alice.request("bob", {"q": "fail"}, timeout=10)

    assert [(row.state, row.attempts) for row in probe.inbox_rows(type="request")] == [(ACKED, 1)]
    assert probe.error_counts() == {"ValueError": 1}
    assert alice.request("bob", {"q": 2}, timeout=10) == {"doubled": 4}  # bob keeps serving


def test_a_request_nobody_answers_times_out_with_request_timeout_error(alice):
    alice.bus.agent("bob")
    started = time.monotonic()
    with pytest.raises(sqlbus.RequestTimeoutError, match="timeout=0.2s") as raised:
        alice.request("bob", {"q": 1}, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)
    assert time.monotonic() - started >= 0.2


@pytest.mark.slow
def test_a_late_response_is_discarded_and_counted_never_handed_to_a_handler(responder, alice, probe):
    responder(delay=0.6)
    with pytest.raises(sqlbus.RequestTimeoutError):
        alice.request("bob", {"q": 1}, timeout=0.1, ttl=30_000)
    handled = []
    alice.subscribe("response", lambda m: handled.append(m))
    alice.subscribe("*", lambda m: handled.append(m))

    deadline = time.monotonic() + 10
    while not probe.inbox_rows(type="response") and time.monotonic() < deadline:
        time.sleep(0.02)
    alice.run(until_idle=True)

    assert handled == []
    assert probe.counter("late_responses", "alice") == 1
    assert alice.bus.metrics().late_responses == 1
    assert [row.state for row in probe.inbox_rows(type="response")] == [ACKED]
    assert probe.request_timeout_count() == 0


@pytest.mark.slow
def test_a_requester_without_a_loop_sweeps_late_responses_on_its_next_request(responder, alice, probe):
    responder(delay=0.4)
    with pytest.raises(sqlbus.RequestTimeoutError):
        alice.request("bob", {"q": 1}, timeout=0.05, ttl=30_000)
    deadline = time.monotonic() + 10
    while not probe.inbox_rows(type="response") and time.monotonic() < deadline:
        time.sleep(0.02)

    assert alice.request("bob", {"q": 2}, timeout=10) == {"doubled": 4}

    assert probe.counter("late_responses", "alice") == 1
    assert {row.state for row in probe.inbox_rows(type="response")} <= {ACKED}


@pytest.mark.slow
def test_a_requester_works_while_its_own_run_loop_runs_in_another_thread(responder, alice, probe):
    responder()
    seen = []
    alice.subscribe("*", lambda m: seen.append(m.type))
    loop = threading.Thread(target=alice.run)
    loop.start()
    try:
        results = [alice.request("bob", {"q": n}, timeout=10) for n in range(20)]
        alice.bus.agent("carol").publish("alice", "notification", {})
        deadline = time.monotonic() + 10
        while "notification" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        alice.stop()
        loop.join(timeout=10)

    assert results == [{"doubled": 2 * n} for n in range(20)]
    assert seen == ["notification"]  # the loop never took a response meant for the requester
    assert probe.counter("unhandled", "alice") == 0


def test_concurrent_requests_from_threads_each_get_their_own_response(responder, alice):
    responder()
    results = {}

    def ask(n):
        results[n] = alice.request("bob", {"q": n}, timeout=10)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert results == {n: {"doubled": 2 * n} for n in range(6)}


def test_the_response_to_a_request_never_waits_in_the_requesters_inbox(make_bus, probe):
    bus = make_bus(clock=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bob.subscribe("request", lambda m: {"got": m.payload["q"]})
    loop = threading.Thread(target=bob.run)
    loop.start()
    try:
        assert alice.request("bob", {"q": 7}, timeout=10) == {"got": 7}
    finally:
        bob.stop()
        loop.join(10)
    # the requester read it where the responder's ack wrote it: delivered, in the archive
    assert alice.receive(limit=10) == []
    [record] = [r for r in bus.sent(agent="alice") if r.message.type == "response"]
    assert record.recipients == ["alice"] and record.message.payload["data"] == {"got": 7}
    assert [row.state for row in probe.inbox_rows(type="response")] == [ACKED]
    assert [s.ready for s in bus.stats() if s.agent == "alice"] == [0]


def test_respond_inside_a_request_handler_commits_with_the_ack(make_bus, probe):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    request_id = alice.publish("bob", "request", {"q": 1}, correlation_id="c-1")

    def handler(message):
        bob.respond(message, {"explicit": True})
        assert probe.inbox_rows(type="response") == []
        return {"ignored": True}  # a response was given already

    bob.subscribe("request", handler)
    bob.run(until_idle=True)

    [response] = alice.receive(limit=10)
    assert response.message.headers.correlation_id == "c-1"
    assert response.message.payload == {"success": True, "data": {"explicit": True},
                                        "request_id": request_id}


def test_respond_outside_a_handler_publishes_a_failure_at_once(make_bus):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "request", {"q": 1})
    [d] = bob.receive()
    bob.respond(d.message, None, success=False, error="no capacity")
    d.ack()

    [response] = alice.receive()
    assert response.message.payload["success"] is False
    assert response.message.payload["error"] == "no capacity"
    assert response.message.headers.correlation_id == d.message.id


def test_discard_in_a_request_handler_answers_with_a_failure(make_bus):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "request", {"q": 1}, correlation_id="c-2")

    def refuse(message):
        raise sqlbus.Discard("not allowed")

    bob.subscribe("request", refuse)
    bob.run(until_idle=True)

    [response] = alice.receive()
    assert response.message.payload["error"] == "discarded: not allowed"
    assert [d.reason for d in bus.dead_letters()] == ["not allowed"]


def test_request_checks_its_arguments(alice):
    with pytest.raises(ValueError, match="timeout"):
        alice.request("bob", {}, timeout=0)
    with pytest.raises(sqlbus.ValidationError, match="to"):
        alice.request("bob-*", {}, timeout=1)


def test_a_request_handler_returning_what_json_cannot_hold_answers_with_an_error(make_bus):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "request", {"q": 1}, correlation_id="c-3")
    alice.publish("bob", "request", {"q": 2}, correlation_id="c-4")
    bob.subscribe("request", lambda m: {1, 2, 3} if m.payload["q"] == 1 else "fine")

    assert bob.run(until_idle=True) == 2  # the loop goes on after the bad return value

    first, second = alice.receive(limit=10)
    assert first.message.payload["success"] is False
    assert "return value" in first.message.payload["error"]
    assert second.message.payload["data"] == "fine"


def test_a_request_nobody_took_before_its_timeout_expires_instead_of_being_answered(make_bus, clock):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    answered = []
    bob.subscribe("request", lambda m: answered.append(m) or "too late")
    with pytest.raises(sqlbus.RequestTimeoutError):
        alice.request("bob", {"q": 1}, timeout=0.05)  # ttl defaults to the timeout: 50 ms

    clock.advance(1)
    bob.run(until_idle=True)

    assert answered == []
    assert [d.reason for d in bus.dead_letters(agent="bob")] == ["expired"]


def test_a_response_to_a_request_sent_by_plain_publish_goes_to_the_response_handler(make_bus, probe):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "request", {"q": 1}, correlation_id="mine")
    bob.subscribe("request", lambda m: "ok")
    bob.run(until_idle=True)
    got = []
    alice.subscribe("response", lambda m: got.append((m.headers.correlation_id, m.payload["data"])))

    alice.run(until_idle=True)

    assert got == [("mine", "ok")]
    assert probe.counters("late_responses") == {}
