"""PostgresStorage, the PostgreSQL backend as one object, on the real server (issue 15, in
progress): every verb of the Storage Protocol but the SQLite-only ones, called as the engine
calls them, and the transactions the engine brackets them with."""

from __future__ import annotations

import inspect
import json
import time

import psycopg
import pytest
from postgres_server import connect, pg_bus, pg_schema

from sqlbus.backend import Storage
from sqlbus.encoding import prepare
from sqlbus.postgres.storage import PostgresStorage
from sqlbus.sqlite import storage as sqlite_storage

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
SQLITE_ONLY = {"check_file", "open_connection", "initialize", "set_wal_mode", "checkpoint",
               "page_size", "vacuum", "data_version"}


def protocol_verbs() -> list[str]:
    return [name for name, value in vars(Storage).items()
            if inspect.isfunction(value) and not name.startswith("_")]


def test_every_protocol_verb_but_the_sqlite_only_ones_is_a_method_with_its_parameters() -> None:
    storage = PostgresStorage("sqlbus")
    verbs = [v for v in protocol_verbs() if v not in SQLITE_ONLY]
    assert len(verbs) >= 70
    for verb in verbs:
        wanted = inspect.signature(getattr(Storage, verb))
        got = inspect.signature(getattr(PostgresStorage, verb))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in wanted.parameters.values()], verb
        assert callable(getattr(storage, verb))
    for verb in SQLITE_ONLY:
        assert not hasattr(storage, verb), verb
    assert (storage.SCHEMA_VERSION, storage.DEFAULT_RETENTION) == (1, sqlite_storage.DEFAULT_RETENTION)
    assert storage.APPLICATION_ID == sqlite_storage.APPLICATION_ID
    assert (storage.QUEUED, storage.LEASED, storage.ACKED, storage.DEAD, storage.SCHEDULED) == (
        0, 1, 2, 3, 4)


def test_a_schema_name_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError):
        PostgresStorage('x"; DROP TABLE message; --')


def test_a_message_goes_through_the_storage_as_the_engine_calls_it(pg_bus) -> None:
    conn, schema = pg_bus
    storage = PostgresStorage(schema)
    storage.set_busy_timeout(conn, 2.0)
    out = prepare("alice", "bob", "notification", {"n": 1}, now_ms=NOW)
    storage.begin(conn)
    storage.register_agent(conn, "bob", NOW)
    assert storage.publish(conn, [out], [NOW], NOW) == [True]
    storage.commit(conn)
    assert storage.look(conn, "bob", NOW, json.dumps(["notification"]))[1] is True
    assert storage.look(conn, "bob", NOW, json.dumps(["heartbeat"]))[1] is False
    storage.begin(conn)
    rows, _more = storage.claim(conn, "bob", NOW, NOW + 1_000, 10, json.dumps(["notification"]),
                                json.dumps([]))
    [(seq, claims, attempts, priority, expires_at, sent_at, body)] = rows
    assert (attempts, body, type(body)) == (1, out.body, bytes)
    assert storage.ack(conn, [(seq, claims)], NOW + 10)
    storage.commit(conn)
    assert storage.delivery_ms(conn, seq) == 10
    assert [s.message_id for s in storage.list_sent(conn, "bob", 10)] == [out.id]
    assert storage.agent_ids(conn) == ["bob"]


def test_rollback_undoes_the_transaction_and_is_harmless_without_one(pg_bus) -> None:
    conn, schema = pg_bus
    storage = PostgresStorage(schema)
    storage.rollback(conn)  # none open
    storage.begin(conn)
    storage.register_agent(conn, "bob", NOW)
    storage.rollback(conn)
    assert storage.agent_ids(conn) == []
    storage.begin(conn)
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    storage.rollback(conn)  # a failed transaction
    storage.register_agent(conn, "carol", NOW)
    assert storage.agent_ids(conn) == ["carol"]


def test_a_read_transaction_holds_one_snapshot_until_it_ends(pg_bus) -> None:
    conn, schema = pg_bus
    storage = PostgresStorage(schema)
    other = connect()
    try:
        storage.begin_read(conn)
        storage.register_agent(other, "bob", NOW)  # committed after the snapshot
        assert storage.agent_ids(conn) == []
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            storage.register_agent(conn, "carol", NOW)
        storage.end_read(conn)
        storage.end_read(conn)  # none open: nothing to end
        assert storage.agent_ids(conn) == ["bob"]
    finally:
        other.close()


def test_a_lock_wait_gives_up_after_the_busy_timeout(pg_bus) -> None:
    conn, schema = pg_bus
    storage = PostgresStorage(schema)
    storage.register_agent(conn, "bob", NOW)
    other = connect()
    try:
        storage.begin(other)
        storage.touch_agent(other, "bob", NOW + 1)  # holds bob's row
        storage.set_busy_timeout(conn, 0.2)
        started = time.monotonic()
        storage.begin(conn)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            storage.touch_agent(conn, "bob", NOW + 2)
        assert 0.15 < time.monotonic() - started < 5
        storage.rollback(conn)
        storage.rollback(other)
    finally:
        other.close()


def test_the_state_snapshot_and_log_through_the_storage(pg_bus) -> None:
    conn, schema = pg_bus
    storage = PostgresStorage(schema)
    storage.begin(conn)
    storage.put_state(conn, "k", b"1", 1, False, "a", NOW)
    storage.commit(conn)
    entries, head = storage.state_snapshot(conn, "")
    assert [e.key for e in entries] == ["k"] and head == 1
    storage.begin(conn)
    storage.put_state(conn, "k", b"2", 2, False, "a", NOW)
    storage.commit(conn)
    assert [(c.seq, c.value) for c in storage.state_log_after(conn, "", head)] == [(2, b"2")]
    assert storage.integrity_check(conn) == ["ok"]
    assert storage.schema_marks(conn) == (storage.APPLICATION_ID, storage.SCHEMA_VERSION)
