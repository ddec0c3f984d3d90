"""SPEC 3, the transactional outbox: the application's own SQL, messages and state writes commit
together or not at all."""

from __future__ import annotations

import pytest

import sqlbus

pytestmark = pytest.mark.backends


@pytest.fixture
def shop(bus, database, own_sql):
    """A bus whose database also holds the application's own table."""
    alice = bus.agent("alice")
    bus.agent("bob")
    # A key that numbers rows by itself: each dialect spells it its own way.
    key = "id bigserial PRIMARY KEY" if database.postgres else "id INTEGER PRIMARY KEY"
    with alice.transaction() as tx:
        tx.execute(own_sql("CREATE TABLE {db}.orders (" + key + ", item TEXT NOT NULL)"))
    return bus, alice


def test_own_sql_messages_and_state_commit_together(shop, probe, own_sql):
    bus, alice = shop
    with alice.transaction() as tx:
        tx.execute(own_sql("INSERT INTO {db}.orders (item) VALUES (?)"), ("book",))
        rows = tx.execute(own_sql("SELECT id FROM {db}.orders"))
        message_id = tx.publish("bob", "task_assignment",
                                {"task": {"id": f"order-{rows[0][0]}", "type": "ship"}})
        ids = tx.publish_many([{"to": "bob", "type": "notification", "payload": {"n": 1}}])
        version = tx.state.set("orders/count", 1)
    assert probe.sql("SELECT item FROM orders") == [("book",)]
    assert version == 1
    entry = bus.state.get("orders/count")
    assert (entry.value, entry.updated_by) == (1, "alice")
    got = [d.message.id for d in bus.agent("bob").receive(limit=10, types=["task_assignment",
                                                                          "notification"])]
    assert got == [message_id, *ids]


def test_an_exception_in_the_block_rolls_everything_back(shop, probe, own_sql):
    bus, alice = shop
    before = probe.row_counts()
    with pytest.raises(RuntimeError, match="payment failed"):
        with alice.transaction() as tx:
            tx.execute(own_sql("INSERT INTO {db}.orders (item) VALUES (?)"), ("book",))
            tx.publish("bob", "notification", {"order": "book"})
            tx.broadcast("broadcast", {"order": "book"})
            tx.state.set("orders/count", 1)
            raise RuntimeError("payment failed")
    assert probe.row_counts() == before
    assert probe.sql("SELECT count(*) FROM orders") == [(0,)]
    assert bus.state.get("orders/count") is None
    assert bus.agent("bob").receive(limit=10) == []


def test_a_bad_message_inside_the_block_rolls_back_the_own_sql_too(shop, probe, own_sql):
    _, alice = shop
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match="headers.priority"):
        with alice.transaction() as tx:
            tx.execute(own_sql("INSERT INTO {db}.orders (item) VALUES (?)"), ("book",))
            tx.publish("bob", "notification", {}, priority=9)
    assert probe.row_counts() == before


def test_a_failing_statement_becomes_a_database_error_and_rolls_back(shop, probe, own_sql):
    _, alice = shop
    before = probe.row_counts()
    with pytest.raises(sqlbus.DatabaseError):
        with alice.transaction() as tx:
            tx.publish("bob", "notification", {})
            tx.execute(own_sql("INSERT INTO {db}.orders (item) VALUES (NULL)"))  # NOT NULL
    assert probe.row_counts() == before


def test_a_version_conflict_inside_the_block_rolls_back_everything(shop, probe):
    bus, alice = shop
    bus.state.set("k", 1, notify=False)
    before = probe.row_counts()
    with pytest.raises(sqlbus.VersionConflictError):
        with alice.transaction() as tx:
            tx.publish("bob", "notification", {})
            tx.state.set("k", 2, expected_version=0)
    assert probe.row_counts() == before


def test_the_transaction_cannot_be_used_outside_its_block(shop):
    _, alice = shop
    tx = alice.transaction()
    with pytest.raises(RuntimeError):
        tx.publish("bob", "notification", {})
    with tx:
        pass
    with pytest.raises(RuntimeError):
        tx.execute("SELECT 1")
