"""SPEC 2: opening a bus; refusing foreign, corrupt, truncated and newer files without touching
them; policy keywords; file mode; the busy timeout."""

from __future__ import annotations

import os
import stat
import threading

import apsw
import pytest
from conftest import file_sha256, query, table_counts
from probes import SCHEMA_VERSION, connection

import sqlbus


def make_sqlbus_file(path, messages: int = 0) -> None:
    with sqlbus.connect(path) as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        if messages:
            alice.publish_many([{"to": "bob", "type": "notification",
                                 "payload": {"pad": "x" * 500, "i": i}}
                                for i in range(messages)])


def assert_refused(path, *texts: str) -> None:
    """connect() raises DatabaseError whose text contains each of ``texts``, and neither the file
    nor its directory changes."""
    before = file_sha256(path)
    listing = sorted(os.listdir(os.path.dirname(path)))
    with pytest.raises(sqlbus.DatabaseError) as info:
        sqlbus.connect(path)
    for text in texts:
        assert text in str(info.value), str(info.value)
    assert file_sha256(path) == before
    assert sorted(os.listdir(os.path.dirname(path))) == listing


# ---------------------------------------------------------------------------------------------
# Creating and reopening


def test_connect_creates_a_wal_database_marked_as_sqlbus(db_path):
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice")
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert query(db_path, "PRAGMA application_id")[0][0] != 0
    assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_connect_is_idempotent_and_keeps_the_data(db_path):
    make_sqlbus_file(db_path, messages=3)
    with sqlbus.connect(db_path) as bus:
        assert [a.id for a in bus.agents()] == ["alice", "bob"]
        assert len(bus.agent("bob").receive(limit=10)) == 3


def test_a_new_database_file_has_mode_0600(db_path):
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice").publish("alice", "notification", {})
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        wal = f"{db_path}-wal"
        if os.path.exists(wal):
            assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600


def test_the_caller_may_ask_for_another_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with sqlbus.connect(tmp_path / "shared.db", mode=0o640):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "shared.db").st_mode) == 0o640


def test_an_empty_file_becomes_a_database(db_path):
    db_path.write_bytes(b"")
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice")
    assert table_counts(db_path)["agents"] == 1


def test_with_closes_the_bus(db_path):
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
    with pytest.raises(sqlbus.DatabaseError, match="closed"):
        alice.publish("alice", "notification", {})
    bus.close()  # a second close is harmless


def test_connect_in_a_missing_directory_raises_database_error(tmp_path):
    with pytest.raises(sqlbus.DatabaseError, match="does not exist"):
        sqlbus.connect(tmp_path / "nowhere" / "bus.db")


def test_connect_on_a_directory_raises_database_error(tmp_path):
    with pytest.raises(sqlbus.DatabaseError, match="directory"):
        sqlbus.connect(tmp_path)


# ---------------------------------------------------------------------------------------------
# Files that are not ours or are damaged: DatabaseError, and the file is left byte for byte


def test_random_bytes_are_refused_and_left_unchanged(db_path):
    db_path.write_bytes(os.urandom(8192))
    assert_refused(db_path, "not a SQLite database")


def test_a_plain_text_file_is_refused_and_left_unchanged(db_path):
    db_path.write_text("name,amount\nalice,3\n" * 200)
    assert_refused(db_path, "not a SQLite database")


def test_a_short_file_is_refused_and_left_unchanged(db_path):
    db_path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 20)
    assert_refused(db_path, "not a SQLite database")


def test_a_truncated_database_is_refused_and_left_unchanged(db_path):
    make_sqlbus_file(db_path, messages=200)
    data = db_path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) > 8 * page_size
    db_path.write_bytes(data[: 4 * page_size])  # whole pages, but far fewer than the header says
    assert_refused(db_path, "truncated")


def test_a_database_cut_in_the_middle_of_a_page_is_refused_and_left_unchanged(db_path):
    make_sqlbus_file(db_path, messages=50)
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 2 + 123])
    assert_refused(db_path, "truncated")


def test_a_database_with_a_corrupt_header_is_refused(db_path):
    make_sqlbus_file(db_path)
    data = bytearray(db_path.read_bytes())
    data[16:18] = (1000).to_bytes(2, "big")  # not a power of two
    db_path.write_bytes(bytes(data))
    assert_refused(db_path, "corrupt")


def test_a_foreign_sqlite_database_is_refused_and_left_unchanged(db_path):
    conn = apsw.Connection(str(db_path))
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);"
                 "INSERT INTO invoices (total) VALUES (9.5)")
    conn.close()
    assert_refused(db_path, "another application")
    assert query(db_path, "SELECT total FROM invoices") == [(9.5,)]


def test_a_sqlite_database_with_another_application_id_is_refused(db_path):
    conn = apsw.Connection(str(db_path))
    conn.execute("PRAGMA application_id = 1234")
    conn.close()
    assert_refused(db_path, "not a sqlbus database")


def test_a_database_from_a_newer_sqlbus_is_refused_and_left_unchanged(db_path):
    make_sqlbus_file(db_path, messages=2)
    conn = apsw.Connection(str(db_path))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert_refused(db_path, "newer", "99")


# The message table and its indexes as schema version 1 made them (sqlbus before leases had
# a state of their own): a lease was a queued row (0) whose visible_at lay ahead, 1 scheduled.
SCHEMA_1_TABLE = """
CREATE TABLE message (
    seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL, sender TEXT NOT NULL, agent TEXT,
    type TEXT NOT NULL, priority INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 5),
    state INTEGER NOT NULL CHECK (state IN (0, 1, 2, 3)), visible_at INTEGER NOT NULL,
    expires_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims INTEGER NOT NULL DEFAULT 0, sent_at INTEGER NOT NULL, done_at INTEGER,
    last_error TEXT, body BLOB NOT NULL
) STRICT;
"""
SCHEMA_1_INDEXES = """
CREATE INDEX message_claim ON message (agent, priority DESC, seq, visible_at) WHERE state = 0;
CREATE INDEX message_due ON message (agent, visible_at) WHERE state = 1;
CREATE INDEX message_id ON message (message_id);
CREATE INDEX message_response ON message (agent, json_extract(CAST(body AS TEXT), '$.headers.correlation_id'))
    WHERE state = 0 AND type = 'response';
"""


def test_a_database_of_schema_version_1_is_upgraded_and_keeps_every_message(db_path, clock):
    with sqlbus.connect(db_path, clock=clock, backoff_base=10.0) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        ids = alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": i}, "ttl": 0}
                                  for i in range(5)])
        acked, leased, failing, dead = bob.receive(limit=4, lease=60.0)
        acked.ack()
        failing.fail(RuntimeError("try again"))  # scheduled 10 s from now
        dead.dead_letter("by hand")
    # Write the rows back as schema version 1 kept them.
    conn = apsw.Connection(str(db_path))
    conn.execute("BEGIN")
    conn.execute("ALTER TABLE message RENAME TO message_v2")
    conn.execute(SCHEMA_1_TABLE)
    conn.execute("INSERT INTO message SELECT seq, message_id, sender, agent, type, priority,"
                 " CASE state WHEN 1 THEN 0 WHEN 4 THEN 1 ELSE state END, visible_at, expires_at,"
                 " attempts, claims, sent_at, done_at, last_error, body FROM message_v2")
    conn.execute("DROP TABLE message_v2")
    conn.execute(SCHEMA_1_INDEXES)
    conn.execute("DROP TABLE message_high_water")  # tables of later schema versions
    conn.execute("DROP TABLE retention")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    conn.close()

    with sqlbus.connect(db_path, clock=clock, backoff_base=10.0) as bus:
        assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        bob = bus.agent("bob")
        (ready,) = bob.receive(limit=10)  # the lease and the retry are not due yet
        assert ready.message.id == ids[4]
        assert {e.message.id: e.status for e in bus.peek("bob")} == {
            ids[1]: "leased", ids[4]: "leased", ids[2]: "retrying"}
        (d,) = bus.dead_letters()
        assert (d.message.id, d.reason) == (ids[3], "by hand")
        clock.advance(61)
        again = bob.receive(limit=10)
        assert [(x.message.id, x.attempts) for x in again] == [(ids[1], 2), (ids[2], 2), (ids[4], 2)]
        bob.ack(again)
        assert bus.metrics().messages_received == 4
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


def test_database_error_is_a_sqlbus_error():
    assert issubclass(sqlbus.DatabaseError, sqlbus.SqlbusError)


# ---------------------------------------------------------------------------------------------
# Policy keywords


def test_unknown_durability_raises_value_error_and_creates_no_file(db_path):
    with pytest.raises(ValueError, match="durability"):
        sqlbus.connect(db_path, durability="paranoid")
    assert not db_path.exists()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(lease=0), ValueError),
        (dict(lease=-1), ValueError),
        (dict(max_attempts=0), ValueError),
        (dict(max_attempts=2.5), ValueError),
        (dict(backoff_base=-1), ValueError),
        (dict(max_payload_bytes=0), ValueError),
        (dict(busy_timeout="5"), TypeError),
        (dict(clock=42), TypeError),
        (dict(non_retryable=[42]), TypeError),
    ],
)
def test_bad_policy_keywords_raise_at_once(db_path, kwargs, error):
    with pytest.raises(error):
        sqlbus.connect(db_path, **kwargs)


def test_policy_keywords_must_be_given_by_name(db_path):
    with pytest.raises(TypeError):
        sqlbus.connect(db_path, "full")  # type: ignore[misc]


@pytest.mark.parametrize(("durability", "level"), [("normal", 1), ("full", 2)])
def test_durability_sets_synchronous_on_every_connection(db_path, durability, level):
    with sqlbus.connect(db_path, durability=durability) as bus:
        levels = []

        def look() -> None:
            levels.append(connection(bus).execute("PRAGMA synchronous").fetchall()[0][0])

        look()
        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
        assert levels == [level, level]


# ---------------------------------------------------------------------------------------------
# Busy timeout


def test_a_writer_that_cannot_get_the_lock_within_busy_timeout_raises_and_writes_nothing(
    db_path,
):
    make_sqlbus_file(db_path)
    with sqlbus.connect(db_path, busy_timeout=0.2) as bus:
        alice = bus.agent("alice")
        before = table_counts(db_path)
        holder = apsw.Connection(str(db_path))
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlbus.DatabaseError, match="locked.*busy_timeout=0.2") as info:
                alice.publish("bob", "notification", {})
            assert isinstance(info.value.__cause__, apsw.Error)  # the cause is chained
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert table_counts(db_path) == before
        alice.publish("bob", "notification", {})  # and the bus works once the lock is free
        assert table_counts(db_path)["message"] == before["message"] + 1


def test_a_writer_waits_for_a_lock_held_briefly_by_another_connection(db_path):
    make_sqlbus_file(db_path)
    with sqlbus.connect(db_path, busy_timeout=5.0) as bus:
        alice = bus.agent("alice")
        holder = apsw.Connection(str(db_path))
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.3, holder.execute, ("ROLLBACK",))
        release.start()
        try:
            message_id = alice.publish("bob", "notification", {})
        finally:
            release.join()
            holder.close()
        assert message_id.startswith("msg-")
