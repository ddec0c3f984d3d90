"""SPEC 1.1 and 3: publish, publish_many, broadcast, the sent archive; bad input writes nothing."""

from __future__ import annotations

import json
import math
import random

import msgspec
import pytest
from probes import QUEUED

import sqlbus

pytestmark = pytest.mark.backends


@pytest.fixture
def alice(bus):
    bus.agent("bob")
    bus.agent("carol")
    return bus.agent("alice")


def recipients(probe, message_id):
    """The recipient of each row of a message, in publish order."""
    return [row.agent for row in probe.inbox_rows(message_id)]


# ---------------------------------------------------------------------------------------------
# Bad input: the typed error, naming the field, and nothing written


class Opaque:
    def __repr__(self) -> str:  # the same test id in every process (pytest-xdist)
        return "Opaque()"


BAD_PUBLISH = [
    # (keyword arguments of publish, error class, text the message starts with)
    (dict(type="telegram"), sqlbus.ValidationError, "type: expected one of"),
    (dict(type=None), sqlbus.ValidationError, "type"),
    (dict(priority=0), sqlbus.ValidationError, "headers.priority: expected int >= 1 and <= 5, got 0"),
    (dict(priority=6), sqlbus.ValidationError, "headers.priority: expected int >= 1 and <= 5, got 6"),
    (dict(priority="3"), sqlbus.ValidationError, "headers.priority: expected int, got str"),
    (dict(priority=True), sqlbus.ValidationError, "headers.priority: expected int, got bool"),
    (dict(priority=3.0), sqlbus.ValidationError, "headers.priority: expected int, got float"),
    (dict(ttl=-1), sqlbus.ValidationError, "headers.ttl: expected int >= 0"),
    (dict(ttl=1.5), sqlbus.ValidationError, "headers.ttl"),
    (dict(requires_ack="yes"), sqlbus.ValidationError, "headers.requires_ack"),
    (dict(correlation_id=7), sqlbus.ValidationError, "headers.correlation_id"),
    (dict(payload=[1, 2]), sqlbus.ValidationError, "payload: expected a JSON object"),
    (dict(payload="text"), sqlbus.ValidationError, "payload: expected a JSON object"),
    (dict(payload=42), sqlbus.ValidationError, "payload: expected a JSON object"),
    (dict(payload={"x": math.nan}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"x": math.inf}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"x": [1, -math.inf]}), sqlbus.ValidationError, "payload.x[1]"),
    (dict(payload={"x": b"bytes"}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"x": (1, 2)}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"x": {1, 2}}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"x": Opaque()}), sqlbus.ValidationError, "payload.x"),
    (dict(payload={"deep": {"er": [{"x": math.nan}]}}), sqlbus.ValidationError,
     "payload.deep.er[0].x"),
    (dict(payload={1: "int key"}), sqlbus.ValidationError, "payload"),
    (dict(payload={"x": ["ok", "\ud800"]}), sqlbus.ValidationError, "payload.x[1]"),
    (dict(payload={"\udfff": 1}), sqlbus.ValidationError, "payload: key"),
    (dict(correlation_id="\ud800"), sqlbus.ValidationError, "headers.correlation_id"),
    (dict(to=""), sqlbus.ValidationError, "to: expected 1..200 characters, got 0"),
    (dict(to="a" * 201), sqlbus.ValidationError, "to: expected 1..200 characters, got 201"),
    (dict(to="bo\nb"), sqlbus.ValidationError, "to: expected printable text"),
    (dict(to="bob\x00"), sqlbus.ValidationError, "to: expected printable text"),
    (dict(to="worker-*"), sqlbus.ValidationError, "to: 'worker-*' contains a pattern character"),
    (dict(to="worker-?"), sqlbus.ValidationError, "to:"),
    (dict(to="worker-[12]"), sqlbus.ValidationError, "to:"),
    (dict(to=["bob", "c*"]), sqlbus.ValidationError, "to[1]:"),
    (dict(to=[]), sqlbus.ValidationError, "to: expected at least one agent id"),
    (dict(to=42), sqlbus.ValidationError, "to: expected str or list of str"),
    (dict(to=type("Name", (str,), {})("bob")), sqlbus.ValidationError, "to: expected str"),
    (dict(id="my-own-id"), sqlbus.ValidationError, "id: expected msg-"),
    (dict(delay=-1.0), ValueError, "delay must be >= 0 seconds"),
    (dict(delay=math.nan), ValueError, "delay"),
    (dict(delay=math.inf), ValueError, "delay"),
    (dict(ttl=2**63), sqlbus.ValidationError, "headers.ttl"),  # would overflow SQLite's int64
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_PUBLISH,
                         ids=[repr(case[0])[:60] for case in BAD_PUBLISH])
def test_bad_publish_raises_the_typed_error_naming_the_field_and_writes_nothing(
    alice, probe, kwargs, error, text
):
    call = dict(to="bob", type="notification", payload={"ok": 1})
    call.update(kwargs)
    before = probe.row_counts()
    with pytest.raises(error) as info:
        alice.publish(call.pop("to"), call.pop("type"), call.pop("payload"), **call)
    assert str(info.value).startswith(text), str(info.value)
    assert probe.row_counts() == before


def test_a_payload_over_max_payload_bytes_raises_payload_too_large_and_writes_nothing(
    make_bus, probe
):
    bus = make_bus(max_payload_bytes=1000)
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.PayloadTooLargeError, match=r"payload: .*1000"):
        alice.publish("bob", "notification", {"blob": "x" * 1000})
    assert isinstance(sqlbus.PayloadTooLargeError("x"), sqlbus.ValidationError)
    assert probe.row_counts() == before
    alice.publish("bob", "notification", {"blob": "x" * 900})  # just under the limit is fine


def test_the_default_payload_limit_is_one_mebibyte(alice, probe):
    before = probe.row_counts()
    with pytest.raises(sqlbus.PayloadTooLargeError):
        alice.publish("bob", "notification", {"blob": "x" * 1_048_576})
    assert probe.row_counts() == before


@pytest.mark.parametrize(
    ("agent_id", "text"),
    [("", "agent id: expected 1..200"), ("a" * 201, "agent id: expected 1..200"),
     ("tab\there", "agent id: expected printable"), ("bell\x07", "agent id: expected printable"),
     ("w*", "agent id: 'w*' contains a pattern character"), ("w?", "agent id:"),
     ("w[1]", "agent id:"), (None, "agent id: expected str"), (7, "agent id: expected str")],
)
def test_bad_agent_ids_are_refused_at_registration_and_write_nothing(bus, probe, agent_id, text):
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError) as info:
        bus.agent(agent_id)
    assert str(info.value).startswith(text), str(info.value)
    assert probe.row_counts() == before


def test_an_agent_id_of_exactly_200_printable_characters_is_accepted(bus):
    long_id = "é" * 200
    bus.agent(long_id)
    assert [a.id for a in bus.agents()] == [long_id]


@pytest.mark.parametrize(
    "evil",
    ["x'); DROP TABLE message; --", "bob' OR '1'='1", 'a"; DELETE FROM agents; --',
     "Robert'); DROP TABLE students;--"],
)
def test_ids_with_sql_in_them_are_stored_and_delivered_verbatim(bus, probe, evil):
    sender = bus.agent(evil)
    receiver = bus.agent(evil + " 2")
    message_id = sender.publish(evil + " 2", "notification", {"text": evil},
                                correlation_id=evil)
    (d,) = receiver.receive()
    assert (d.message.sender, d.message.to, d.message.payload["text"]) == (
        evil, evil + " 2", evil)
    assert d.message.headers.correlation_id == evil
    d.ack()
    assert sorted(a.id for a in bus.agents()) == sorted([evil, evil + " 2"])
    assert [(row.sender, row.agent) for row in probe.inbox_rows(message_id)] == [
        (evil, evil + " 2")]
    assert {"message", "agents"} <= set(probe.row_counts())  # no table was dropped


def test_publish_many_with_one_bad_element_names_it_and_writes_nothing(alice, probe):
    before = probe.row_counts()
    items = [{"to": "bob", "type": "notification", "payload": {"i": i}} for i in range(5)]
    items[3]["priority"] = 9
    with pytest.raises(sqlbus.ValidationError, match=r"^\[3\]\.headers\.priority: "):
        alice.publish_many(items)
    items[3] = {"to": "bob", "type": "notification", "payload": {"x": math.nan}}
    with pytest.raises(sqlbus.ValidationError, match=r"^\[3\]\.payload\.x"):
        alice.publish_many(items)
    items[3] = {"to": "bob", "type": "notification", "payload": {}, "delay": -1}
    with pytest.raises(ValueError, match=r"\[3\]\.delay"):
        alice.publish_many(items)
    items[3] = {"to": "bob", "type": "notification", "payload": {}, "colour": "red"}
    with pytest.raises(sqlbus.ValidationError, match=r"^\[3\].*colour"):
        alice.publish_many(items)
    items[3] = {"type": "notification", "payload": {}}
    with pytest.raises(sqlbus.ValidationError, match=r"^\[3\]\.to"):
        alice.publish_many(items)
    items[3] = "not a dict"
    with pytest.raises(sqlbus.ValidationError, match=r"^\[3\]"):
        alice.publish_many(items)
    assert probe.row_counts() == before


def test_publish_many_of_nothing_writes_nothing_and_returns_an_empty_list(alice, probe):
    before = probe.row_counts()
    assert alice.publish_many([]) == []
    assert probe.row_counts() == before


def test_publish_many_writes_every_message_in_order_and_returns_their_ids(bus, alice, probe):
    ids = alice.publish_many(
        [{"to": "bob", "type": "notification", "payload": {"i": i}} for i in range(50)]
        + [{"to": ["bob", "carol"], "type": "request", "payload": {}, "priority": 4}]
    )
    assert len(ids) == len(set(ids)) == 51
    got = bus.agent("bob").receive(limit=100)
    assert [d.message.id for d in got] == [ids[50]] + ids[:50]
    assert len(probe.inbox_rows(ids[50])) == 2


def test_a_plain_batch_writes_the_rows_single_publishes_write(bus, alice, probe):
    # publish_many's fast path binds the values consecutive messages share once per statement:
    # runs of 1, 70 (more than one statement), 3 and 4, with every shared value changing.
    bus.agent("carol")
    items = (
        [{"to": "bob", "type": "notification", "payload": {"n": 0}}]
        + [{"to": "carol", "type": "event", "payload": {"n": n}, "priority": 5,
            "ttl": 0, "requires_ack": True} for n in range(1, 71)]
        + [{"to": "bob", "type": "notification", "payload": {"n": n}, "ttl": 5} for n in range(71, 74)]
        # requires_ack is in the body only: one run, each body with its own flag
        + [{"to": "bob", "type": "notification", "payload": {"n": n}, "requires_ack": n % 2 == 0}
           for n in range(74, 78)]
    )
    batch_ids = alice.publish_many(items)
    single_ids = [alice.publish(item["to"], item["type"], item["payload"],
                                **{k: v for k, v in item.items() if k not in ("to", "type", "payload")})
                  for item in items]

    def rows(ids):
        return [[(r.sender, r.agent, r.type, r.correlation_id, r.priority, r.state,
                  r.visible_at - r.sent_at, None if r.expires_at is None else r.expires_at - r.sent_at,
                  r.attempts, r.claims, r.done_at, r.last_error) for r in probe.inbox_rows(id)]
                for id in ids]

    assert rows(batch_ids) == rows(single_ids)
    assert rows(batch_ids)[1] == [("alice", "carol", "event", None, 5, QUEUED, 0, None, 0, 0,
                                   None, None)]
    bodies = [row.body for row in probe.inbox_rows()]
    batch_messages = [msgspec.json.decode(body) for body in bodies[: len(items)]]
    single_messages = [msgspec.json.decode(body) for body in bodies[len(items):]]
    for batch, single in zip(batch_messages, single_messages, strict=True):
        assert batch.pop("id") != single.pop("id")
        batch.pop("timestamp"), single.pop("timestamp")
        assert batch == single
    assert [d.message.id for d in bus.agent("carol").receive(limit=100)] == batch_ids[1:71] + single_ids[1:31]


# ---------------------------------------------------------------------------------------------
# Fan-out and atomicity


def test_one_message_to_n_recipients_is_n_inbox_rows_of_the_same_message(bus, alice, probe):
    names = [f"worker-{i}" for i in range(8)]
    for name in names:
        bus.agent(name)
    message_id = alice.publish(names + [names[0]], "notification", {"x": 1})  # duplicate kept once
    assert recipients(probe, message_id) == names
    for name in names:
        (d,) = bus.agent(name).receive()
        assert d.message.id == message_id and d.message.to == names


def test_fan_out_is_all_or_nothing_when_one_recipient_row_fails(bus, alice, probe):
    bus.agent("dave")
    probe.refuse_inserts_for("carol")
    before = probe.row_counts()
    with pytest.raises(sqlbus.DatabaseError, match="refused for the test"):
        alice.publish(["bob", "carol", "dave"], "notification", {})
    assert probe.row_counts() == before
    assert bus.agent("bob").receive() == []


def test_publish_many_is_all_or_nothing_when_one_row_fails(alice, probe):
    probe.refuse_inserts_for("carol")
    before = probe.row_counts()
    with pytest.raises(sqlbus.DatabaseError):
        alice.publish_many([{"to": "bob", "type": "notification"},
                            {"to": "carol", "type": "notification"}])
    assert probe.row_counts() == before


# ---------------------------------------------------------------------------------------------
# Order


def test_delivery_order_is_priority_then_publish_order_over_random_messages(bus, alice):
    rng = random.Random(20261124)
    bob = bus.agent("bob")
    published = []
    for i in range(300):
        priority = rng.randint(1, 5)
        if rng.random() < 0.3:
            ids = alice.publish_many([
                {"to": "bob", "type": "notification", "payload": {"i": i, "j": j},
                 "priority": p}
                for j, p in enumerate(rng.randint(1, 5) for _ in range(3))
            ])
            published += [(mid, json.dumps([i, j])) for j, mid in enumerate(ids)]
        else:
            published.append((alice.publish("bob", "notification", {"i": i, "j": 0},
                                            priority=priority), json.dumps([i, 0])))
    order = {mid: n for n, (mid, _) in enumerate(published)}
    got = []
    while True:
        batch = bob.receive(limit=rng.randint(1, 17))
        if not batch:
            break
        bob.ack(batch)
        got += [d.message for d in batch]
    assert len(got) == len(published)
    expected = sorted(got, key=lambda m: (-m.headers.priority, order[m.id]))
    assert [m.id for m in got] == [m.id for m in expected]


def test_a_higher_priority_message_published_later_is_delivered_first(bus, alice):
    bob = bus.agent("bob")
    low = alice.publish("bob", "notification", {}, priority=1)
    mid = alice.publish("bob", "notification", {})
    high = alice.publish("bob", "notification", {}, priority=5)
    assert [d.message.id for d in bob.receive(limit=3)] == [high, mid, low]


# ---------------------------------------------------------------------------------------------
# Idempotent publish


def test_publishing_a_caller_chosen_id_twice_delivers_it_once(bus, alice, probe):
    chosen = "msg-1800000000000-abcdefghi"
    assert alice.publish(["bob", "carol"], "notification", {"n": 1}, id=chosen) == chosen
    assert alice.publish(["bob", "carol"], "notification", {"n": 2}, id=chosen) == chosen
    assert len(probe.inbox_rows(chosen)) == 2
    (d,) = bus.agent("bob").receive(limit=5)
    assert d.message.payload == {"n": 1}


def test_republishing_an_id_the_library_returned_delivers_nothing_new(bus, alice, probe):
    bob = bus.agent("bob")
    first = alice.publish("bob", "notification", {"n": 1})
    (d,) = bob.receive()
    d.ack()
    assert alice.publish("bob", "notification", {"n": 1}, id=first) == first
    assert bob.receive() == []
    assert len(probe.inbox_rows(first)) == 1


def test_publish_many_with_an_existing_id_skips_only_that_message(bus, alice, probe):
    existing = alice.publish("bob", "notification", {"n": 0})
    ids = alice.publish_many([
        {"to": "bob", "type": "notification", "payload": {"n": 1}, "id": existing},
        {"to": "bob", "type": "notification", "payload": {"n": 2}},
    ])
    assert ids[0] == existing
    assert len(probe.inbox_rows(existing)) == 1
    assert [d.message.payload["n"] for d in bus.agent("bob").receive(limit=5)] == [0, 2]


def test_the_same_caller_chosen_id_twice_in_one_publish_many_is_written_once(bus, alice, probe):
    chosen = "msg-1800000000000-zzzzzzzzz"
    ids = alice.publish_many([
        {"to": "bob", "type": "notification", "payload": {"n": 1}, "id": chosen},
        {"to": "bob", "type": "notification", "payload": {"n": 2}, "id": chosen},
    ])
    assert ids == [chosen, chosen]
    assert len(probe.inbox_rows(chosen)) == 1
    assert [d.message.payload for d in bus.agent("bob").receive(limit=5)] == [{"n": 1}]


# ---------------------------------------------------------------------------------------------
# Delay


def test_a_delayed_message_is_invisible_until_its_time_under_the_injected_clock(bus, alice, clock):
    bob = bus.agent("bob")
    delayed = alice.publish("bob", "notification", {"later": True}, delay=10.0, priority=5)
    now = alice.publish("bob", "notification", {"later": False})
    assert [d.message.id for d in bob.receive(limit=5)] == [now]
    clock.advance(9.999)
    assert bob.receive(limit=5) == []
    clock.advance(0.001)
    (d,) = bob.receive(limit=5)
    assert d.message.id == delayed and d.attempts == 1


def test_a_delayed_message_keeps_its_priority_once_due(bus, alice, clock):
    bob = bus.agent("bob")
    delayed = alice.publish("bob", "notification", {}, delay=1.0, priority=5)
    queued = alice.publish("bob", "notification", {}, priority=1)
    clock.advance(1)
    assert [d.message.id for d in bob.receive(limit=5)] == [delayed, queued]

def test_a_delay_longer_than_the_ttl_does_not_expire_the_message_before_it_is_visible(
    bus, alice, clock
):
    bob = bus.agent("bob")
    delayed = alice.publish("bob", "notification", {}, delay=60.0, ttl=30_000)
    clock.advance(60)
    (d,) = bob.receive()
    assert d.message.id == delayed
    d.release()
    clock.advance(30.001)  # now older than its ttl, counted from when it became visible
    assert bob.receive() == []
    assert [dl.reason for dl in bus.dead_letters()] == ["expired"]



# ---------------------------------------------------------------------------------------------
# Broadcast


def test_broadcast_reaches_every_matching_agent_but_the_sender(bus, probe):
    for name in ("worker-1", "worker-2", "worker-10", "boss"):
        bus.agent(name)
    sender = bus.agent("worker-0")
    message_id = sender.broadcast("event", {"name": "go"}, pattern="worker-*", priority=4)
    assert sorted(recipients(probe, message_id)) == ["worker-1", "worker-10", "worker-2"]
    (d,) = bus.agent("worker-1").receive()
    assert d.message.type == "event"
    assert d.message.headers.broadcast_pattern == "worker-*"
    assert d.message.headers.priority == 4
    assert sorted(d.message.to) == ["worker-1", "worker-10", "worker-2"]
    assert bus.agent("boss").receive() == []
    assert sender.receive() == []


def test_broadcast_supports_question_mark_and_bracket_patterns(bus, probe):
    for name in ("w1", "w2", "w3", "w10"):
        bus.agent(name)
    sender = bus.agent("boss")
    one_char = sender.broadcast("broadcast", {}, pattern="w?")
    bracket = sender.broadcast("broadcast", {}, pattern="w[13]")
    assert sorted(recipients(probe, one_char)) == ["w1", "w2", "w3"]
    assert sorted(recipients(probe, bracket)) == ["w1", "w3"]


def test_the_default_broadcast_pattern_reaches_every_other_agent(bus, alice, probe):
    message_id = alice.broadcast("broadcast", {"text": "all"})
    assert sorted(recipients(probe, message_id)) == ["bob", "carol"]


def test_a_broadcast_that_matches_nobody_returns_an_id_and_archives_zero_recipients(
    bus, alice
):
    bob = bus.agent("bob")
    message_id = alice.broadcast("broadcast", {"text": "anyone?"}, pattern="ghost-*")
    assert message_id.startswith("msg-")
    (record,) = bus.sent(limit=1)
    assert record.message.id == message_id
    assert record.recipients == []
    assert record.message.to == []
    assert bob.receive() == []


def test_a_broadcast_with_an_unknown_header_is_a_type_error_and_writes_nothing(alice, probe):
    before = probe.row_counts()
    with pytest.raises(TypeError, match="colour"):
        alice.broadcast("broadcast", {}, colour="red")
    with pytest.raises(sqlbus.ValidationError, match="pattern"):
        alice.broadcast("broadcast", {}, pattern="")
    assert probe.row_counts() == before


# ---------------------------------------------------------------------------------------------
# The sent archive


def test_sent_lists_newest_first_with_recipients_and_filters_by_agent(bus, alice, clock):
    bob = bus.agent("bob")
    first = alice.publish("bob", "notification", {})
    clock.advance(1)
    second = alice.publish(["bob", "carol"], "request", {})
    clock.advance(1)
    third = bob.publish("carol", "notification", {})
    clock.advance(1)
    fourth = bus.agent("carol").publish("alice", "notification", {})
    records = bus.sent()
    assert [r.message.id for r in records] == [fourth, third, second, first]
    assert [r.recipients for r in records] == [["alice"], ["carol"], ["bob", "carol"], ["bob"]]
    assert records[2].sent_at == "2027-01-15T08:00:01.000Z"
    assert [r.message.id for r in bus.sent(agent="bob")] == [third, second, first]
    assert [r.message.id for r in bus.sent(agent="alice")] == [fourth, second, first]
    assert [r.message.id for r in bus.sent(limit=2)] == [fourth, third]


def test_sent_keeps_messages_after_they_are_acked(bus, alice):
    bob = bus.agent("bob")
    message_id = alice.publish("bob", "notification", {})
    bob.receive()[0].ack()
    assert [r.message.id for r in bus.sent(agent="alice")] == [message_id]


# ---------------------------------------------------------------------------------------------
# The agents registry


def test_the_registry_records_registration_last_seen_and_liveness(bus, clock):
    bus.agent("alice")
    clock.advance(30)
    bob = bus.agent("bob")
    clock.advance(40)
    bob.receive()  # receiving counts as being seen
    info = {a.id: a for a in bus.agents()}
    assert isinstance(info["alice"], sqlbus.AgentInfo)
    assert info["alice"].registered_at == "2027-01-15T08:00:00.000Z"
    assert info["alice"].last_seen == "2027-01-15T08:00:00.000Z"
    assert info["alice"].alive is False
    assert info["bob"].registered_at == "2027-01-15T08:00:30.000Z"
    assert info["bob"].last_seen == "2027-01-15T08:01:10.000Z"
    assert info["bob"].alive is True
    assert info["bob"].status == "active"
    bus.agent("alice")  # re-registering refreshes last_seen, keeps registered_at
    again = {a.id: a for a in bus.agents()}["alice"]
    assert (again.registered_at, again.last_seen, again.alive) == (
        "2027-01-15T08:00:00.000Z", "2027-01-15T08:01:10.000Z", True)
