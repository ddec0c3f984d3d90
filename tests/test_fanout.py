"""Fan-out: a message to many recipients stores its body once (SPEC 3), and every path that
reads, settles, lists or deletes a recipient's row sees the whole message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import sqlite_only
from probes import MAX_TAGS, SCHEMA_VERSION, SQLiteProbe, marks_of, tail_from_start

import sqlbus

pytestmark = pytest.mark.backends

MiB = 1024 * 1024


def agent_ids(n: int) -> list[str]:
    return [f"agent-{i:014d}" for i in range(n)]  # 20 characters


@pytest.mark.parametrize("how", ["broadcast", "publish"])
def test_one_message_to_1000_agents_grows_the_file_by_less_than_1_mib(make_bus, probe, how):
    bus = make_bus()
    ids = agent_ids(1000)
    for agent_id in ids:
        bus.agent(agent_id)
    sender = bus.agent("sender")
    before = probe.stored_bytes()
    if how == "broadcast":
        sender.broadcast("notification", {"n": 123456}, pattern="agent-*")
    else:
        sender.publish(ids, "notification", {"n": 123456})
    if isinstance(probe, SQLiteProbe):  # and its write-ahead log, which only SQLite has
        grown_with_wal = probe.size_with_log() - before
        assert grown_with_wal < 2 * MiB, grown_with_wal
    grown = probe.stored_bytes() - before
    # Each row's own copy of the body (its 1,000-id `to` list, ~23 KB) made this 22.5 MiB.
    assert grown < 1 * MiB, grown
    assert probe.shared_body_count() == 1
    assert [row.storage for row in probe.inbox_rows()] == ["shared"] * 1000


def test_every_recipient_receives_the_whole_message_with_every_recipient_in_to(make_bus):
    bus = make_bus()
    ids = agent_ids(50)
    agents = [bus.agent(agent_id) for agent_id in ids]
    sender = bus.agent("sender")
    listed = sender.publish(ids, "event", {"task": {"id": "t1"}}, priority=4)
    broadcast = sender.broadcast("notification", {"all": True}, pattern="agent-*")
    for agent in agents:
        first, second = agent.receive(limit=2)
        assert (first.message.id, first.message.to, first.message.payload) == (
            listed, ids, {"task": {"id": "t1"}})
        assert (second.message.id, second.message.to, second.message.payload) == (
            broadcast, ids, {"all": True})
        assert second.message.headers.broadcast_pattern == "agent-*"
        agent.ack([first, second])
    assert bus.metrics().messages_received == 100
    records = bus.sent()
    assert [(r.message.id, r.recipients, r.message.to) for r in records] == [
        (broadcast, ids, ids), (listed, ids, ids)]
    assert [r.message.id for r in bus.sent(agent=ids[7])] == [broadcast, listed]


def test_a_message_to_one_recipient_keeps_its_body_in_its_row(make_bus, probe):
    bus = make_bus()
    alice = bus.agent("alice")
    bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1})
    alice.publish(["bob"], "notification", {"n": 2})
    alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": 3}}] * 3)
    assert probe.shared_body_count() == 0
    assert [row.storage for row in probe.inbox_rows()] == ["inline"] * 5


def test_a_batch_mixing_single_and_fanout_messages_keeps_publish_order(make_bus):
    bus = make_bus()
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    ids = alice.publish_many([
        {"to": "bob", "type": "notification", "payload": {"i": 0}},
        {"to": ["bob", "carol"], "type": "notification", "payload": {"i": 1}},
        {"to": "bob", "type": "notification", "payload": {"i": 2}, "delay": 0.0, "id": None},
        {"to": ["carol", "bob"], "type": "event", "payload": {"i": 3}},
    ])
    assert [d.message.id for d in bob.receive(limit=10)] == ids
    assert [(d.message.id, d.message.to) for d in carol.receive(limit=10)] == [
        (ids[1], ["bob", "carol"]), (ids[3], ["carol", "bob"])]


def test_ack_fail_dead_letter_requeue_and_peek_work_per_recipient(make_bus, clock):
    bus = make_bus(backoff_base=10.0)
    alice = bus.agent("alice")
    bob, carol, dave = bus.agent("bob"), bus.agent("carol"), bus.agent("dave")
    message_id = alice.publish(["bob", "carol", "dave"], "event", {"x": 1}, ttl=0)

    (b,) = bob.receive()
    b.ack()
    (c,) = carol.receive()
    c.fail(RuntimeError("later"))  # scheduled again in 10 s
    (d,) = dave.receive()
    d.dead_letter("by hand")

    assert bus.peek("bob") == []
    (entry,) = bus.peek("carol")
    assert (entry.status, entry.message.id, entry.message.to) == (
        "retrying", message_id, ["bob", "carol", "dave"])
    (dead,) = bus.dead_letters()
    assert (dead.agent, dead.reason, dead.message.id, dead.message.to) == (
        "dave", "by hand", message_id, ["bob", "carol", "dave"])
    assert bus.dead_letter(dead.id).message.payload == {"x": 1}

    assert bus.requeue(dead.id) == message_id
    (d,) = dave.receive()
    assert (d.message.id, d.message.to, d.attempts) == (message_id, ["bob", "carol", "dave"], 1)
    d.dead_letter("again")
    assert bus.requeue_dead_letters(agent="dave") == [message_id]
    (d,) = dave.receive()
    d.ack()

    clock.advance(11)
    (c,) = carol.receive()
    assert (c.message.id, c.message.payload, c.attempts) == (message_id, {"x": 1}, 2)
    c.ack()
    metrics = bus.metrics()
    assert (metrics.messages_sent, metrics.messages_received, metrics.messages_dead_lettered) == (
        1, 3, 2)


def test_a_dead_letter_fanout_requeued_for_every_recipient_shares_one_body(make_bus):
    bus = make_bus()
    alice = bus.agent("alice")
    ids = agent_ids(30)
    agents = [bus.agent(agent_id) for agent_id in ids]
    message_id = alice.broadcast("notification", {"n": 1}, pattern="agent-*")
    for agent in agents:
        (d,) = agent.receive()
        d.dead_letter("nobody wanted it")
    assert bus.requeue_dead_letters(reason="nobody wanted it") == [message_id] * 30
    for agent in agents:
        (d,) = agent.receive()
        assert (d.message.id, d.message.to) == (message_id, ids)


def test_pruning_deletes_the_shared_body_only_with_its_last_row(make_bus, clock, probe):
    bus = make_bus()
    alice = bus.agent("alice")
    bob, carol, dave = bus.agent("bob"), bus.agent("carol"), bus.agent("dave")
    message_id = alice.publish(["bob", "carol", "dave"], "notification", {"x": 1}, ttl=0)
    bob.receive()[0].ack()
    clock.advance(10)
    assert bus.prune(sent_older_than=5).acked == 1
    assert [row.agent for row in probe.inbox_rows()] == ["carol", "dave"]
    assert probe.shared_body_count() == 1

    (c,) = carol.receive()
    assert (c.message.id, c.message.to) == (message_id, ["bob", "carol", "dave"])
    c.ack()
    (d,) = dave.receive()
    d.dead_letter("no")
    clock.advance(10)
    assert bus.prune(sent_older_than=5, dead_older_than=None).acked == 1
    assert probe.shared_body_count() == 1  # dave's dead letter keeps it
    (dead,) = bus.dead_letters()
    assert dead.message.to == ["bob", "carol", "dave"]
    assert bus.purge_dead_letters() == 1
    assert probe.inbox_rows() == []
    assert probe.shared_body_count() == 0
    metrics = bus.metrics()
    assert (metrics.messages_sent, metrics.messages_received, metrics.messages_dead_lettered) == (
        1, 2, 1)


def test_tail_yields_a_fanout_once_with_all_its_recipients(make_bus):
    bus = make_bus()
    alice = bus.agent("alice")
    ids = agent_ids(600)  # more rows than one read of the tail
    for agent_id in ids:
        bus.agent(agent_id)
    message_id = alice.broadcast("notification", {"n": 1}, pattern="agent-*")
    single = alice.publish(ids[0], "notification", {"n": 2})
    records = tail_from_start(bus, until=single)
    seen = [(r.message.id, r.message.to) for r in records]
    assert seen[-1] == (single, ids[0])
    assert {m for m, _ in seen[:-1]} == {message_id}
    assert all(to == ids for _, to in seen[:-1])


def test_tail_is_not_held_back_by_a_transaction_open_on_another_database(make_bus, database):
    bus = make_bus()
    alice = bus.agent("alice")
    bus.agent("bob")
    with database.transaction_elsewhere():
        message_id = alice.publish("bob", "notification", {"n": 1})
        assert [r.message.id for r in tail_from_start(bus, until=message_id)] == [message_id]


@sqlite_only("PostgreSQL's foreign key keeps a shared body while a row refers to it: only "
             "switching the key off loses one (SQLite keeps no page checksums: damage can)")
def test_a_row_whose_shared_body_is_gone_is_reported_as_corrupt(make_bus, probe):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bus.agent("carol")
    alice.publish(["bob", "carol"], "notification", {"x": 1})
    probe.lose_shared_bodies()
    report = bus.check()
    assert not report.ok
    assert any("2 message rows have lost their shared body" in p for p in report.problems)
    assert bob.receive() == []  # a claim dead-letters the row it cannot read (SPEC 4)
    [dead] = bus.dead_letters(agent="bob")
    assert dead.reason == "corrupt"


def test_marking_more_agents_than_a_ring_names_keeps_only_enough_tags_to_ring_everyone():
    tags = marks_of(agent_ids(10_000))
    assert tags is not None and len(tags) == MAX_TAGS + 1


# ---------------------------------------------------------------------------------------------
# Migration from schema 3 (bodies always in the row)


def downgrade_to_schema_3(path: Path) -> None:
    """Rewrite the file as schema 3 kept it: every row with its own body, no message_body."""
    SQLiteProbe(path).write(
        "BEGIN",
        "UPDATE message SET body = (SELECT b.body FROM message_body AS b"
        " WHERE b.id = body_id) WHERE body_id IS NOT NULL",
        "DROP TRIGGER message_body_release",
        "DROP INDEX message_body_id",
        "ALTER TABLE message DROP COLUMN body_id",
        "DROP TABLE message_body",
        "PRAGMA user_version = 3",
        "COMMIT",
    )


def schema_of(path: Path) -> list[tuple]:
    return SQLiteProbe(path).sql("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name")


@sqlite_only("an upgrade of a SQLite file written by schema 3; PostgreSQL starts at its own version 1")
def test_a_schema_3_file_is_upgraded_and_its_fanout_rows_stay_deliverable(
    make_bus, db_path, probe, tmp_path, clock
):
    with sqlbus.connect(db_path, clock=clock) as bus:
        alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
        old_single = alice.publish("bob", "notification", {"n": 0}, ttl=0)
        old_fanout = alice.publish(["bob", "carol"], "notification", {"n": 1}, ttl=0)
        bob.receive()[0].ack()
    downgrade_to_schema_3(db_path)
    assert probe.sql("SELECT count(*) FROM message WHERE length(body) = 0") == [(0,)]

    bus = make_bus()
    assert probe.schema_version() == SCHEMA_VERSION
    fresh = tmp_path / "fresh.db"
    make_bus(fresh)
    assert schema_of(db_path) == schema_of(fresh)
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    new_fanout = alice.publish(["bob", "carol"], "notification", {"n": 2}, ttl=0)
    for agent in (bob, carol):
        deliveries = agent.receive(limit=10)
        assert [(d.message.id, d.message.to) for d in deliveries][-2:] == [
            (old_fanout, ["bob", "carol"]), (new_fanout, ["bob", "carol"])]
        agent.ack(deliveries)
    assert [r.message.id for r in bus.sent()] == [new_fanout, old_fanout, old_single]
    clock.advance(10)
    assert bus.prune(sent_older_than=5).acked == 5
    assert probe.shared_body_count() == 0
    assert bus.metrics().messages_sent == 3
    assert probe.integrity() == ["ok"]
