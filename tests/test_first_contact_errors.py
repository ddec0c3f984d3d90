"""Issue 13, sections 2 and 3: queue states that tell the truth and failures you can see
(expired messages, CLI warnings, handler failure logs, RemoteError, ValidationError.field,
aio.connect's keywords, enum errors that list the valid values)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import threading

import pytest
from click.testing import CliRunner
from probes import SQLiteProbe, run_upkeep

import sqlbus
import sqlbus.aio
from sqlbus.cli import cli


def iso(ms: int) -> str:
    return sqlbus.messages.iso_ms(ms)


# ---------------------------------------------------------------------------------------------
# Expired messages


def test_an_expired_message_claimed_later_is_dead_lettered_at_its_expiry_time(make_bus, clock):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1}, ttl=1000)
    expires_at = clock.ms + 1000
    clock.advance(3600)
    assert bob.receive() == []
    (dead,) = bus.dead_letters()
    assert dead.reason == "expired"
    assert dead.failed_at == iso(expires_at)


def test_background_upkeep_moves_expired_messages_of_an_inbox_nobody_reads(make_bus, clock, db_path):
    bus = make_bus()
    alice = bus.agent("alice")
    bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1}, ttl=1000)
    alice.publish("bob", "notification", {"n": 2}, ttl=0)  # never expires: stays
    alice.publish("bob", "notification", {"n": 3}, ttl=2000, delay=5.0)
    expiries = {clock.ms + 1000, clock.ms + 7000}
    clock.advance(60)
    (stats,) = [s for s in bus.stats() if s.agent == "bob"]
    assert (stats.expired, stats.ready, stats.dead) == (2, 1, 0)
    assert [e.status for e in bus.peek("bob")] == ["ready", "expired", "expired"]
    assert bus.metrics().messages_expired == 2
    assert bus.check().expired_messages == 2
    other = make_bus()  # another process's first write runs its background upkeep pass
    other.agent("carol").publish("carol", "notification", {})
    dead = bus.dead_letters(agent="bob")
    assert sorted(d.reason for d in dead) == ["expired", "expired"]
    assert {d.failed_at for d in dead} == {iso(ms) for ms in expiries}
    assert [d.attempts for d in dead] == [0, 0]
    (stats,) = [s for s in bus.stats() if s.agent == "bob"]
    assert (stats.expired, stats.ready, stats.dead) == (0, 1, 2)
    assert bus.metrics().messages_expired == 2  # counted once, before and after the move
    report = bus.check()
    assert report.expired_messages == 0 and report.ok


def test_upkeep_moves_an_expired_retrying_message_and_leaves_a_running_lease(make_bus, clock, probe):
    bus = make_bus(backoff_base=100.0, backoff_cap=100.0)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1}, ttl=10_000)
    alice.publish("bob", "notification", {"n": 2}, ttl=10_000)
    expires_at = clock.ms + 10_000
    first, second = bob.receive(limit=2, lease=3600)
    first.fail(RuntimeError("boom"))  # retrying for 100 s, expires meanwhile
    clock.advance(20)
    assert bus.check().expired_messages == 1  # the lease held is not expired: its holder may ack
    assert run_upkeep(bus) == 1
    (dead,) = bus.dead_letters()
    assert (dead.message.payload, dead.reason, dead.attempts) == ({"n": 1}, "expired", 1)
    assert dead.failed_at == iso(expires_at)
    second.ack()
    assert probe.dead_letter_count() == 1


def test_check_reports_expired_messages_as_information_not_a_problem(make_bus, clock):
    bus = make_bus()
    bus.agent("alice").publish("alice", "notification", {}, ttl=1)
    clock.advance(1)
    report = bus.check()
    assert report.expired_messages == 1
    assert report.ok and report.problems == []


# ---------------------------------------------------------------------------------------------
# CLI warnings


def run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def test_peek_of_an_unregistered_agent_warns_on_stderr_and_succeeds(make_bus, db_path):
    make_bus().agent("bob")
    result = run(db_path, "peek", "nobody")
    assert result.exit_code == 0
    (line,) = result.stderr.splitlines()
    assert "warning" in line and "'nobody'" in line
    assert run(db_path, "peek", "bob").stderr == ""


def test_send_to_an_unregistered_agent_warns_on_stderr_and_succeeds(make_bus, db_path):
    make_bus().agent("bob")
    result = run(db_path, "send", "--from", "ops", "--to", "ghost", "--to", "bob",
                 "--type", "notification")
    assert result.exit_code == 0
    assert result.stdout.startswith("msg-")
    (line,) = result.stderr.splitlines()
    assert "warning" in line and "'ghost'" in line and "bob" not in line
    result = run(db_path, "send", "--from", "ops", "--to", "bob", "--type", "notification")
    assert result.exit_code == 0 and result.stderr == ""


# ---------------------------------------------------------------------------------------------
# Handler failures under run() are logged


def _failure_records(caplog):
    return [r for r in caplog.records if r.name == "sqlbus" and r.levelno == logging.WARNING]


def test_a_handler_that_raises_logs_one_warning_saying_it_retries(make_bus, caplog):
    bus = make_bus()
    bob = bus.agent("bob")
    mid = bus.agent("alice").publish("bob", "notification", {})
    bob.subscribe("notification", lambda m: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="sqlbus"):
        assert bob.run(until_idle=True) == 1
    (record,) = _failure_records(caplog)
    text = record.getMessage()
    for part in ("bob", mid, "notification", "attempt 1", "ZeroDivisionError",
                 "division by zero", "retry in 1 s"):
        assert part in text, (part, text)
    assert record.exc_info and record.exc_info[0] is ZeroDivisionError


def test_a_handler_failure_that_dead_letters_logs_the_reason(make_bus, caplog, clock):
    bus = make_bus(max_attempts=2)
    bob = bus.agent("bob")
    alice = bus.agent("alice")
    alice.publish("bob", "notification", {"n": 1})
    alice.publish("bob", "notification", {"n": 2})

    def handler(message):
        if message.payload["n"] == 1:
            raise RuntimeError("worn out")
        raise sqlbus.ValidationError("payload.n: expected 1, got 2")

    bob.subscribe("notification", handler)
    with caplog.at_level(logging.WARNING, logger="sqlbus"):
        bob.run(until_idle=True)
        clock.advance(10)
        bob.run(until_idle=True)
    texts = [r.getMessage() for r in _failure_records(caplog)]
    assert len(texts) == 3, texts
    assert "attempt 1" in texts[0] and "retry in 1 s" in texts[0]
    assert "dead letter (non_retryable)" in texts[1] and "ValidationError" in texts[1]
    assert "attempt 2" in texts[2] and "dead letter (max_attempts)" in texts[2]


def test_a_request_handler_that_raises_logs_that_it_answered_a_failure(make_bus, caplog):
    bus = make_bus()
    bob = bus.agent("bob")
    mid = bus.agent("alice").publish("bob", "request", {"q": 1})
    bob.subscribe("request", lambda m: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="sqlbus"):
        bob.run(until_idle=True)
    (record,) = _failure_records(caplog)
    assert mid in record.getMessage() and "answered success: false" in record.getMessage()
    assert record.exc_info[0] is ZeroDivisionError


# ---------------------------------------------------------------------------------------------
# RemoteError


@pytest.fixture
def served(tmp_path):
    """A real-time bus with bob answering requests in a thread: ``served(handler)`` -> alice."""
    bus = sqlbus.connect(tmp_path / "served.db")
    bob = bus.agent("bob")
    threads = []

    def serve(handler):
        bob.subscribe("request", handler)
        thread = threading.Thread(target=bob.run)
        thread.start()
        threads.append(thread)
        return bus.agent("alice")

    yield serve
    bob.stop()
    for thread in threads:
        thread.join(10)
    bus.close()


def test_a_remote_error_names_the_agent_the_error_type_and_the_error(served):
    alice = served(lambda m: 1 / 0)
    with pytest.raises(sqlbus.RemoteError) as caught:
        alice.request("bob", {"q": 1}, timeout=10)
    error = caught.value
    assert str(error) == "bob: ZeroDivisionError: division by zero"
    assert (error.agent, error.error_type, error.error) == ("bob", "ZeroDivisionError",
                                                            "division by zero")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.agent, copy.error_type) == (str(error), "bob", "ZeroDivisionError")


def test_a_failure_answered_without_a_type_has_error_type_error(served):
    def handler(message):
        sqlbus.current_delivery().agent.respond(message, None, success=False, error="no stock")

    alice = served(handler)
    with pytest.raises(sqlbus.RemoteError) as caught:
        alice.request("bob", {"q": 1}, timeout=10)
    assert str(caught.value) == "bob: Error: no stock"
    assert caught.value.error_type == "Error"
    (response,) = [r.message for r in alice.bus.sent(limit=5) if r.message.type == "response"]
    assert response.payload["error_type"] == "Error"


# ---------------------------------------------------------------------------------------------
# sqlbus.aio.connect spells out sqlbus.connect's keywords


def test_aio_connect_takes_exactly_the_keywords_of_connect_with_the_same_defaults():
    sync = inspect.signature(sqlbus.connect).parameters
    aio = inspect.signature(sqlbus.aio.connect).parameters
    assert list(aio) == list(sync)
    for name, parameter in sync.items():
        assert aio[name] == parameter, name  # kind, default and annotation
    assert inspect.signature(sqlbus.aio.connect).return_annotation == "AsyncBus"


def test_aio_connect_passes_every_keyword_on(tmp_path, clock):
    async def main():
        bus = await sqlbus.aio.connect(tmp_path / "a.db", lease=7.0, max_attempts=2, clock=clock,
                                       dead_retention=None)
        try:
            assert (bus.sync.lease, bus.sync.max_attempts) == (7.0, 2)
            assert bus.sync.retention().dead_retention is None
            assert SQLiteProbe.now_ms(bus.sync) == clock.ms
        finally:
            await bus.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# ValidationError.field and enum errors


def _refused(call):
    with pytest.raises(sqlbus.ValidationError) as caught:
        call()
    error = caught.value
    assert str(error).startswith(error.field + ": "), (error.field, str(error))
    return error


def test_a_validation_error_names_the_path_of_its_field(make_bus):
    bus = make_bus()
    alice = bus.agent("alice")
    good = {"to": "bob", "type": "notification"}
    cases = {
        "headers.priority": lambda: alice.publish("bob", "notification", {}, priority=9),
        "headers.ttl": lambda: alice.publish("bob", "notification", {}, ttl=-1),
        "headers.requires_ack": lambda: alice.publish("bob", "notification", {}, requires_ack=1),
        "headers.correlation_id": lambda: alice.publish("bob", "notification", {},
                                                        correlation_id=5),
        "type": lambda: alice.publish("bob", "nonsense", {}),
        "to": lambda: alice.publish("b*", "notification", {}),
        "to[1]": lambda: alice.publish(["bob", ""], "notification", {}),
        "id": lambda: alice.publish("bob", "notification", {}, id="msg-1"),
        "payload": lambda: alice.publish("bob", "notification", [1]),
        "payload.items[2]": lambda: alice.publish("bob", "notification",
                                                  {"items": [1, 2, float("nan")]}),
        "payload.k": lambda: alice.publish("bob", "notification", {"k": {"a\x00": 1}}),
        "payload.task.id": lambda: alice.publish("bob", "task_assignment",
                                                 {"task": {"id": 1, "type": "t"}}),
        "[3].to": lambda: alice.publish_many([good] * 3 + [dict(good, to="x?")]),
        "[1].headers.priority":
            lambda: alice.publish_many([good, dict(good, priority=0)]),
        "[0]": lambda: alice.publish_many([dict(good, colour="red")]),
        "[0].type": lambda: alice.publish_many([{"to": "bob"}]),
        "pattern": lambda: alice.broadcast("notification", {}, pattern=""),
        "types": lambda: alice.receive(types=["nonsense"]),
        "state key": lambda: bus.state.set("", 1),
        "subscribers": lambda: bus.state.set("k", 1, subscribers="bob"),
        "subscribers[0]": lambda: bus.state.set("k", 1, subscribers=["b*"]),
        "event name": lambda: alice.events.emit("", {}),
    }
    for field, call in cases.items():
        assert _refused(call).field == field


def test_a_path_whose_key_holds_a_colon_is_still_the_field(make_bus):
    alice = make_bus().agent("alice")
    error = _refused(lambda: alice.publish("bob", "notification", {"a: b": [1, float("inf")]}))
    assert error.field == "payload.a: b[1]"


def test_a_too_large_payload_names_the_payload(make_bus):
    alice = make_bus(max_payload_bytes=100).agent("alice")
    with pytest.raises(sqlbus.PayloadTooLargeError) as caught:
        alice.publish("bob", "notification", {"text": "x" * 200})
    assert caught.value.field == "payload"


def test_a_validation_error_raised_without_a_field_takes_it_from_its_text():
    assert sqlbus.ValidationError("payload.n: expected 1, got 2").field == "payload.n"
    assert sqlbus.ValidationError("no field named").field == ""
    error = sqlbus.ValidationError("a: b: c", field="a: b")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.field) == (sqlbus.ValidationError, "a: b: c", "a: b")


def test_an_invalid_status_lists_the_valid_values(make_bus):
    alice = make_bus().agent("alice")
    error = _refused(lambda: alice.publish("bob", "status_update", {"agent_status": "sleepy"}))
    assert error.field == "payload.agent_status"
    assert str(error) == ("payload.agent_status: invalid enum value 'sleepy', expected one of "
                          "idle, busy, error, shutting_down")
    error = _refused(lambda: alice.publish("bob", "task_result", {"task_id": "t", "status": "meh"}))
    assert str(error).endswith("expected one of completed, failed, timeout")
    message = sqlbus.Message(id="msg-1800000000000-abcdefghi", sender="a", to="b",
                             type="status_update", timestamp="2027-01-15T08:00:00.000Z",
                             payload={"agent_status": "sleepy"})
    error = _refused(lambda: sqlbus.decode_payload(message, sqlbus.StatusUpdate))
    assert str(error).endswith("expected one of idle, busy, error, shutting_down")


def test_an_unknown_message_type_lists_the_types_in_their_order(make_bus):
    alice = make_bus().agent("alice")
    order = ("request, response, notification, error, task_assignment, task_result, "
             "status_update, heartbeat, shutdown, broadcast, event, state_change, "
             "state_sync_request")
    assert str(_refused(lambda: alice.publish("bob", "nonsense", {}))).endswith(
        f"expected one of {order}, got 'nonsense'")
    assert str(_refused(lambda: alice.receive(types=["nonsense"]))).endswith(
        f"expected one of {order}")


def test_handler_failures_under_concurrency_are_logged_once_each(make_bus, caplog):
    bus = make_bus()
    bob = bus.agent("bob")
    ids = {bus.agent("alice").publish("bob", "notification", {"n": n}) for n in range(6)}
    bob.subscribe("notification", lambda m: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="sqlbus"):
        assert bob.run(until_idle=True, concurrency=3) == 6
    texts = [r.getMessage() for r in _failure_records(caplog)]
    assert len(texts) == 6, texts
    assert {next(i for i in ids if i in t) for t in texts} == ids
