"""Shared state verbs of the PostgreSQL backend on the real server (issue 15, in progress)."""

from __future__ import annotations

import threading

from postgres_server import connect, pg_bus, pg_schema

from sqlbus.postgres import state

__all__ = ["pg_bus", "pg_schema"]  # fixtures



def test_a_key_keeps_its_latest_version_and_every_change_is_logged(pg_bus) -> None:
    conn, schema = pg_bus
    assert state.get_state(conn, schema, "plan") is None
    with conn.transaction():
        state.put_state(conn, schema, "plan", b'{"steps":3}', 1, False, "alice", 1_000)
        state.put_state(conn, schema, "plan", b'{"steps":4}', 2, False, "bob", 2_000)
    row = state.get_state(conn, schema, "plan")
    assert row == ("plan", b'{"steps":4}', 2, 0, "bob", 2_000)
    log = conn.execute(f'SELECT key, version FROM "{schema}".state_log ORDER BY seq').fetchall()
    assert log == [("plan", 1), ("plan", 2)]


def test_prefixes_are_compared_not_matched_and_deleted_keys_are_not_listed(pg_bus) -> None:
    conn, schema = pg_bus
    with conn.transaction():
        for key in ("job/b", "job/A", "job%x", "jobs", "job/c"):
            state.put_state(conn, schema, key, b"1", 1, False, None, 1)
        state.put_state(conn, schema, "job/c", b"null", 2, True, None, 2)
    assert state.state_keys(conn, schema, "job/") == ["job/A", "job/b"]  # byte order
    assert state.state_keys(conn, schema, "job%") == ["job%x"]  # % is not a wildcard
    assert [e.key for e in state.state_entries(conn, schema, "")] == [
        "job%x", "job/A", "job/b", "jobs"]
    assert state.get_state(conn, schema, "job/c").deleted == 1  # type: ignore[union-attr]


def test_the_log_is_read_in_commit_order_when_commits_cross_their_inserts(pg_bus) -> None:
    conn, schema = pg_bus
    _entries, head = state.state_snapshot(conn, schema, "")
    assert head == 0
    first, second = connect(), connect()
    try:
        first.execute("BEGIN")
        state.put_state(first, schema, "a", b"1", 1, False, "first", 1)  # inserted first
        second.execute("BEGIN")
        state.put_state(second, schema, "b", b"2", 1, False, "second", 2)
        second.execute("COMMIT")  # ... but committed first
        # A watch reading now sees the second's change and stands after it.
        seen = state.state_log_after(conn, schema, "", head)
        assert [c.key for c in seen] == ["b"]
        cursor = seen[-1].seq
        first.execute("COMMIT")
        # The first's change, committed later, comes after the cursor: nothing is skipped.
        later = state.state_log_after(conn, schema, "", cursor)
        assert [c.key for c in later] == ["a"] and later[0].seq > cursor
        assert [c.key for c in state.state_log_after(conn, schema, "", 0)] == ["b", "a"]
        # The identity (insert order) says the opposite: it is not what the log is read by.
        by_insert = conn.execute(f'SELECT key FROM "{schema}".state_log ORDER BY seq').fetchall()
        assert by_insert == [("a",), ("b",)]
    finally:
        first.close()
        second.close()


def test_a_writer_waiting_for_its_position_does_not_block_other_writes_before_commit(pg_bus) -> None:
    conn, schema = pg_bus
    first, second = connect(), connect()
    try:
        second.execute("SET lock_timeout = '2s'")
        first.execute("BEGIN")
        state.put_state(first, schema, "a", b"1", 1, False, None, 1)
        second.execute("BEGIN")  # the lock is taken at commit, not at the insert
        state.put_state(second, schema, "b", b"1", 1, False, None, 1)
        second.execute("COMMIT")
        first.execute("COMMIT")
    finally:
        first.close()
        second.close()
    assert len(state.state_log_after(conn, schema, "", 0)) == 2


def test_a_rolled_back_change_takes_no_position(pg_bus) -> None:
    conn, schema = pg_bus
    conn.execute("BEGIN")
    state.put_state(conn, schema, "gone", b"1", 1, False, None, 1)
    conn.execute("ROLLBACK")
    with conn.transaction():
        state.put_state(conn, schema, "kept", b"1", 1, False, None, 2)
    [change] = state.state_log_after(conn, schema, "", 0)
    assert change.key == "kept" and change.seq == 1


def test_the_snapshot_and_the_log_after_its_head_hold_every_change_once(pg_bus) -> None:
    conn, schema = pg_bus
    with conn.transaction():
        state.put_state(conn, schema, "job/1", b'"a"', 1, False, "x", 10)
        state.put_state(conn, schema, "other", b'"b"', 1, False, "x", 10)
    entries, head = state.state_snapshot(conn, schema, "job/")
    assert [(e.key, e.value) for e in entries] == [("job/1", b'"a"')] and head == 2
    with conn.transaction():
        state.put_state(conn, schema, "job/1", b"null", 2, True, "y", 20)
        state.put_state(conn, schema, "job/2", b'"c"', 1, False, "y", 20)
        state.put_state(conn, schema, "other", b'"d"', 2, False, "y", 20)
    changes = state.state_log_after(conn, schema, "job/", head)
    assert [(c.key, c.version, c.deleted) for c in changes] == [("job/1", 2, 1), ("job/2", 1, 0)]
    assert [c.seq for c in changes] == [3, 4]
    assert len(state.state_log_after(conn, schema, "", head, limit=1)) == 1
    assert state.state_snapshot(conn, schema, "nothing/") == ([], 5)


def test_a_watcher_reading_while_writers_race_sees_every_change_once(pg_bus) -> None:
    conn, schema = pg_bus
    writers, each = 3, 60
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        with connect() as mine:
            start.wait()
            for i in range(each):
                with mine.transaction():
                    state.put_state(mine, schema, f"w{w}/{i}", b"1", 1, False, None, i)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    seen: list[str] = []
    cursor = 0
    while True:
        running = any(thread.is_alive() for thread in threads)
        changes = state.state_log_after(conn, schema, "", cursor)
        for change in changes:
            assert change.seq > cursor
            cursor = change.seq
            seen.append(change.key)
        if not changes and not running:
            break
    for thread in threads:
        thread.join()
    assert len(seen) == len(set(seen)) == writers * each
