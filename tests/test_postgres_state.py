"""Shared state verbs of the PostgreSQL backend on the real server (issue 15, in progress)."""

from __future__ import annotations

from postgres_server import pg_bus, pg_schema

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
