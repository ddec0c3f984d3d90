"""SPEC 1: the message model, its JSON form, ids, timestamps, validation and typed payloads."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import jsonschema
import msgspec
import pytest

import sqlbus
from sqlbus.messages import iso_ms, new_message_id

pytestmark = pytest.mark.backends

# The seed's base message schema (seed/000_4d7715b093882ae7.txt), copied verbatim except for the
# type enum, which SPEC 1.2 extends with the three types the seed's own classes send.
SEED_BASE_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["id", "from", "to", "type", "timestamp", "payload"],
    "properties": {
        "id": {
            "type": "string",
            "pattern": "^msg-[0-9]{13}-[a-z0-9]{9}$",
            "description": "Unique message identifier",
        },
        "from": {"type": "string", "description": "Source agent identifier"},
        "to": {
            "type": ["string", "array"],
            "description": "Destination agent(s) or broadcast pattern",
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        },
        "type": {
            "type": "string",
            "enum": [
                "request", "response", "notification", "error",
                "task_assignment", "task_result", "status_update",
                "heartbeat", "shutdown", "broadcast",
                # SPEC 1.2 extension
                "event", "state_change", "state_sync_request",
            ],
        },
        "timestamp": {"type": "string", "format": "date-time", "description": "ISO 8601 timestamp"},
        "payload": {"type": "object", "description": "Message content specific to type"},
        "headers": {
            "type": "object",
            "properties": {
                "priority": {"type": "integer", "minimum": 1, "maximum": 5, "default": 3},
                "ttl": {"type": "integer", "description": "Time to live in milliseconds",
                        "default": 30000},
                "requires_ack": {"type": "boolean", "default": False},
                "correlation_id": {"type": "string",
                                   "description": "Request-response correlation"},
                "retry_count": {"type": "integer", "default": 0},
            },
        },
    },
}

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ID_RE = re.compile(r"^msg-(\d{13})-([a-z0-9]{9})$")

# jsonschema only checks "date-time" with an optional extra installed; check it ourselves, to
# the stricter rule of SPEC 1 (UTC, milliseconds, trailing Z).
_formats = jsonschema.FormatChecker()


@_formats.checks("date-time", raises=ValueError)
def _is_iso_ms(value: object) -> bool:
    if not isinstance(value, str) or not ISO_MS.match(value):
        raise ValueError(f"{value!r} is not ISO 8601 UTC with milliseconds")
    datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")
    return True


VALIDATOR = jsonschema.Draft7Validator(SEED_BASE_SCHEMA, format_checker=_formats)


def assert_valid(document: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(document), key=str)
    assert not errors, f"{document} does not match the seed schema: {errors[0].message}"


def stored_bodies(probe) -> list[dict]:
    return [json.loads(row.body) for row in probe.inbox_rows()]


# ---------------------------------------------------------------------------------------------
# The JSON form of everything the library writes


def test_the_seed_schema_itself_is_valid_draft_07():
    jsonschema.Draft7Validator.check_schema(SEED_BASE_SCHEMA)


def test_every_message_the_library_writes_validates_against_the_seed_schema(bus, probe, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bus.agent("carol").subscribe("state_change")
    alice.publish("bob", "task_assignment", {"task": {"id": "t1", "type": "build"}},
                  priority=5, ttl=60_000, requires_ack=True, correlation_id="c-1")
    alice.publish(["bob", "carol"], "notification", {"text": "hi"})
    alice.publish("bob", "status_update", sqlbus.StatusUpdate(agent_status="busy"))
    alice.publish("bob", "heartbeat", {}, delay=5.0)
    alice.publish_many([{"to": "carol", "type": "event", "payload": {"name": "x"}},
                        {"to": "bob", "type": "state_sync_request", "payload": {}}])
    alice.broadcast("broadcast", {"text": "all"})
    alice.broadcast("shutdown", {}, pattern="nobody-*")
    bus.state.set("plan", {"steps": 3})
    alice.state.set("plan", {"steps": 4}, include_value=True)
    alice.state.delete("plan")
    for d in bob.receive(limit=10):
        with d:
            d.reply({"ok": True})
            d.publish("carol", "task_result", {"task_id": "t1", "status": "completed"})
    failing = alice.publish("bob", "request", {"q": 1}, requires_ack=True)
    (d,) = bob.receive(limit=1)
    d.reply({"ignored": True}, success=False, error="nope")
    d.fail(RuntimeError("boom"))
    clock.advance(2)
    (d,) = bob.receive(limit=1)
    assert d.message.id == failing and d.message.headers.retry_count == 1
    assert_valid(msgspec.to_builtins(d.message))  # retry_count set on delivery
    d.ack()

    bodies = stored_bodies(probe)
    types = {b["type"] for b in bodies}
    assert types >= {"task_assignment", "notification", "status_update", "heartbeat", "event",
                     "state_sync_request", "broadcast", "shutdown", "state_change", "response",
                     "task_result", "request"}
    ack_notices = [b for b in bodies if b["payload"].get("acknowledgment") is True]
    assert len(ack_notices) == 2  # the task_assignment and the retried request asked for one
    for body in bodies:
        assert_valid(body)
    for record in bus.sent(limit=1000):
        assert_valid(json.loads(msgspec.json.encode(record.message)))


def test_a_message_that_breaks_the_seed_schema_is_caught_by_the_check():
    good = {"id": "msg-1800000000000-abcdefghi", "from": "a", "to": "b", "type": "request",
            "timestamp": "2027-01-15T08:00:00.000Z", "payload": {}}
    assert_valid(good)
    for broken in (dict(good, type="telegram"), dict(good, id="m-1"),
                   dict(good, timestamp="2027-01-15 08:00:00"), dict(good, payload=[1])):
        with pytest.raises(AssertionError):
            assert_valid(broken)


# ---------------------------------------------------------------------------------------------
# Ids and timestamps


def test_message_ids_carry_the_13_digit_publish_time_and_9_random_characters(bus, clock):
    alice = bus.agent("alice")
    bus.agent("bob")
    ids = [alice.publish("bob", "notification", {}) for _ in range(200)]
    for message_id in ids:
        match = ID_RE.match(message_id)
        assert match, message_id
        assert int(match.group(1)) == clock.ms
    assert len(set(ids)) == len(ids)
    assert len({ID_RE.match(i).group(2) for i in ids}) == len(ids)


def test_new_message_id_pads_the_time_to_13_digits():
    assert re.match(r"^msg-0000000001234-[a-z0-9]{9}$", new_message_id(1234))


def test_timestamps_are_iso_8601_utc_with_milliseconds(bus, clock):
    clock.now = 1_800_000_000.123
    alice = bus.agent("alice")
    bus.agent("bob")
    alice.publish("bob", "notification", {})
    (record,) = bus.sent()
    assert record.message.timestamp == "2027-01-15T08:00:00.123Z"
    assert record.sent_at == "2027-01-15T08:00:00.123Z"
    expected = datetime(2027, 1, 15, 8, 0, 0, 123000, tzinfo=timezone.utc)
    assert iso_ms(int(expected.timestamp() * 1000)) == "2027-01-15T08:00:00.123Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1_800_000_000_007) == "2027-01-15T08:00:00.007Z"


# ---------------------------------------------------------------------------------------------
# The sender cannot be forged


def test_publish_has_no_way_to_set_the_sender(bus):
    alice = bus.agent("alice")
    bus.agent("bob")
    with pytest.raises(TypeError):
        alice.publish("bob", "notification", {}, sender="mallory")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        alice.publish("bob", "notification", {}, **{"from": "mallory"})


def test_publish_many_rejects_a_from_or_sender_key_and_writes_nothing(bus, probe):
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    for key in ("from", "sender"):
        with pytest.raises(sqlbus.ValidationError, match=rf"\[0\].*{key}"):
            alice.publish_many([{"to": "bob", "type": "notification", key: "mallory"}])
    assert probe.row_counts() == before


def test_the_receiver_sees_the_publishing_agent_as_from_whatever_the_payload_says(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"from": "mallory", "sender": "mallory"})
    (d,) = bob.receive()
    assert d.message.sender == "alice"
    assert json.loads(msgspec.json.encode(d.message))["from"] == "alice"
    assert d.message.payload == {"from": "mallory", "sender": "mallory"}


# ---------------------------------------------------------------------------------------------
# Typed payloads


def test_typed_payloads_may_be_given_as_a_dict_or_as_the_struct(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    task = sqlbus.TaskAssignment(
        task=sqlbus.Task(id="t1", type="build", priority=4,
                         resources=sqlbus.TaskResources(timeout=60))
    )
    alice.publish("bob", "task_assignment", task)
    alice.publish("bob", "task_assignment", {"task": {"id": "t2", "type": "test"}})
    first, second = bob.receive(limit=2)
    assert first.message.payload == {"task": {"id": "t1", "type": "build", "priority": 4,
                                              "resources": {"timeout": 60}}}
    assert sqlbus.decode_payload(first.message, sqlbus.TaskAssignment) == task
    decoded = sqlbus.decode_payload(second.message, sqlbus.TaskAssignment)
    assert isinstance(decoded, sqlbus.TaskAssignment) and decoded.task.id == "t2"


@pytest.mark.parametrize(
    ("type_", "payload", "field"),
    [
        ("task_assignment", {}, "payload"),
        ("task_assignment", {"task": {"id": "t1"}}, "payload.task"),
        ("task_assignment", {"task": {"id": "t1", "type": "x", "priority": 7}},
         "payload.task.priority"),
        ("task_result", {"task_id": "t1", "status": "exploded"}, "payload.status"),
        ("task_result", {"task_id": "t1", "status": "failed", "error": {"code": "E"}},
         "payload.error"),
        ("status_update", {"agent_status": "busy", "progress": {"percentage": 101}},
         "payload.progress.percentage"),
        ("status_update", {"agent_status": 3}, "payload.agent_status"),
    ],
)
def test_a_typed_payload_that_does_not_match_its_struct_is_rejected_naming_the_field(
    bus, probe, type_, payload, field
):
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError) as info:
        alice.publish("bob", type_, payload)
    assert str(info.value).startswith(field), str(info.value)
    assert probe.row_counts() == before


def test_untyped_kinds_accept_any_json_object(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    payload = {"nested": {"list": [1, 2.5, "x", None, True]}, "empty": {}}
    alice.publish("bob", "notification", payload)
    (d,) = bob.receive()
    assert d.message.payload == payload


def test_decode_payload_raises_a_validation_error_for_a_payload_of_another_kind(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"text": "hi"})
    (d,) = bob.receive()
    with pytest.raises(sqlbus.ValidationError, match="payload"):
        sqlbus.decode_payload(d.message, sqlbus.TaskResult)


def test_headers_default_as_the_seed_says(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    headers = d.message.headers
    assert (headers.priority, headers.ttl, headers.requires_ack, headers.retry_count) == (
        3, 30_000, False, 0)
    assert "correlation_id" not in json.loads(msgspec.json.encode(d.message))["headers"]


# ---------------------------------------------------------------------------------------------
# SPEC 11: the error tree


ERRORS = [sqlbus.ValidationError, sqlbus.PayloadTooLargeError, sqlbus.DatabaseError,
          sqlbus.LeaseLostError, sqlbus.VersionConflictError, sqlbus.RequestTimeoutError,
          sqlbus.RemoteError, sqlbus.AuthenticationError]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_a_sqlbus_error_with_a_one_line_docstring(error):
    assert issubclass(error, sqlbus.SqlbusError)
    assert error.__doc__ and "\n" not in error.__doc__.strip()


def test_request_timeout_is_also_a_timeout_error_and_signals_are_not_errors():
    assert issubclass(sqlbus.RequestTimeoutError, TimeoutError)
    assert issubclass(sqlbus.PayloadTooLargeError, sqlbus.ValidationError)
    for signal in (sqlbus.Retry, sqlbus.Discard):
        assert not issubclass(signal, sqlbus.SqlbusError)
    assert sqlbus.Retry(2.5).delay == 2.5 and sqlbus.Retry().delay is None
    assert sqlbus.Discard("why").reason == "why"


def test_a_typed_payload_error_chains_the_msgspec_cause(bus):
    alice = bus.agent("alice")
    with pytest.raises(sqlbus.ValidationError) as info:
        alice.publish("alice", "task_result", {"task_id": "t", "status": "?"})
    assert isinstance(info.value.__cause__, msgspec.ValidationError)


# ---------------------------------------------------------------------------------------------
# The body a publish writes is exactly the JSON msgspec writes for its Message (publish builds
# the common bodies from pieces made once, a faster path than two structs and an encode).

_ODD_IDS = ["bob", 'qu"ote', "back\\slash", "ünïcödé", "a space", "日本語"]


@pytest.mark.parametrize("sender", ["alice", *_ODD_IDS])
@pytest.mark.parametrize("headers", [(3, 30_000, False), (5, 0, True), (1, 123, False)])
def test_a_plain_body_is_the_json_msgspec_writes_for_its_message(sender, headers):
    from sqlbus.encoding import check_agent_id, prepare, prepare_plain_batch
    from sqlbus.messages import Headers, Message

    priority, ttl, requires_ack = headers
    for to in _ODD_IDS:
        check_agent_id(sender), check_agent_id(to)
        payload = {"n": 1, "text": "x\u2028y\"z", "nested": {"a": [1, 2.5, None, True]}}
        out = prepare(sender, to, "notification", payload, now_ms=1_800_000_000_123,
                      priority=priority, ttl=ttl, requires_ack=requires_ack)
        expected = msgspec.json.encode(Message(
            id=out.id, sender=sender, to=to, type="notification",
            timestamp="2027-01-15T08:00:00.123Z", payload=payload,
            headers=Headers(priority=priority, ttl=ttl, requires_ack=requires_ack),
        ))
        assert out.body == expected
        item = {"to": to, "type": "notification", "payload": payload, "priority": priority,
                "ttl": ttl, "requires_ack": requires_ack}
        batch = prepare_plain_batch(sender, [item], 1_800_000_000_123, 1 << 20)
        assert batch is not None
        [(plain_to, plain_type, plain_priority, plain_ttl, [id], [body])] = batch
        assert body == expected.replace(out.id.encode(), id.encode())
        assert (plain_to, plain_type, plain_priority, plain_ttl) == (
            to, "notification", priority, ttl)


def test_a_plain_batch_leaves_to_prepare_what_it_does_not_check():
    from sqlbus.encoding import check_agent_id, prepare_plain_batch

    check_agent_id("alice"), check_agent_id("bob")
    now = 1_800_000_000_000
    plain = {"to": "bob", "type": "notification", "payload": {}}
    assert prepare_plain_batch("alice", [plain], now, 100) is not None
    for other in [
        {"type": "task_assignment"},  # a typed payload
        {"to": "nobody-known"},
        {"payload": {"x": float("nan")}},  # JSON would change it
        {"payload": {1: "x"}},
        {"payload": {"x": (1, 2)}},
        {"payload": {"x": "y" * 200}},  # too large: prepare() says so
        {"priority": 9},
        {"priority": True},
        {"ttl": -1},
        {"requires_ack": 1},
        {"payload": []},
        {"correlation_id": "c-1"},  # a key for prepare()
        {"delay": 1.0},
        {"unknown": 1},
    ]:
        # One such item sends the whole batch to prepare(), whatever its place.
        assert prepare_plain_batch("alice", [plain, {**plain, **other}], now, 100) is None, other
        assert prepare_plain_batch("alice", [{**plain, **other}, plain], now, 100) is None, other
    assert prepare_plain_batch("alice", [plain, "not a dict"], now, 100) is None
    nones = dict.fromkeys(["to", "type", "payload", "priority", "ttl", "requires_ack"])
    assert prepare_plain_batch("alice", [nones], now, 100) is None
    assert prepare_plain_batch("alice", [plain, nones], now, 100) is None
    # Items that share their headers skip the checks; equal is not enough (1 == True == 1.0).
    for good, bad in [({"priority": 1}, {"priority": True}), ({"ttl": 1}, {"ttl": True}),
                      ({"ttl": 1}, {"ttl": 1.0}), ({"requires_ack": True}, {"requires_ack": 1})]:
        assert prepare_plain_batch("alice", [{**plain, **good}] * 2, now, 100) is not None
        assert prepare_plain_batch("alice", [{**plain, **good}, {**plain, **bad}], now, 100) is None
    assert prepare_plain_batch("alice", [], now, 100) == []


def test_the_ids_of_a_plain_batch_are_unique_and_well_formed():
    from sqlbus.encoding import check_agent_id, prepare_plain_batch
    from sqlbus.messages import MESSAGE_ID_RE

    check_agent_id("alice"), check_agent_id("bob")
    batch = prepare_plain_batch(
        "alice", [{"to": "bob", "type": "notification", "payload": {"n": n}} for n in range(500)],
        1_800_000_000_000, 1 << 20,
    )
    [run] = batch
    ids = run.ids
    assert len(set(ids)) == 500 and len(run.bodies) == 500
    assert all(MESSAGE_ID_RE.match(id) for id in ids)


def test_publish_many_mixes_plain_and_other_messages_in_order(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    ids = alice.publish_many([
        {"to": "bob", "type": "notification", "payload": {"n": 0}},
        {"to": "bob", "type": "task_assignment", "payload": {"task": {"id": "t", "type": "x"}}},
        {"to": "bob", "type": "notification", "payload": {"n": 2}, "correlation_id": "c"},
        {"to": ["bob"], "type": "notification", "payload": {"n": 3}, "priority": 3},
    ])
    got = bob.receive(limit=10)
    assert [d.message.id for d in got] == ids
    assert got[2].message.headers.correlation_id == "c"
    assert got[1].message.payload == {"task": {"id": "t", "type": "x"}}
