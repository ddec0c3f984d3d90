"""Shared state on PostgreSQL: versioned keys (``state``) and the log of their changes
(``state_log``), as :mod:`sqlbus.sqlite.state` keeps them. In progress (issue 15): not yet
behind the engine.

A change's position in the log (what ``watch`` reads after) is ``pos``, given at commit in
commit order (see :mod:`sqlbus.postgres.schema`), not the identity ``seq`` given at insert: a
watch standing at position N never steps over a change that commits after it read N.

Keys sort byte by byte (``COLLATE "C"``), as on SQLite; a prefix is compared, not matched with
LIKE, whose wildcards it may hold."""

from __future__ import annotations

from typing import Any

import psycopg

from ..backend import StateChange, StateRow
from .schema import statement

_COLUMNS = "key, value, version, deleted::int, updated_by, updated_at"
_PREFIX = "left(key, length(%(prefix)s)) = %(prefix)s"


def _row(row: Any) -> StateRow:
    key, value, version, deleted, updated_by, updated_at = row
    return StateRow(key, bytes(value), version, deleted, updated_by, updated_at)


def get_state(conn: psycopg.Connection, schema: str, key: str) -> StateRow | None:
    """(key, value, version, deleted, updated_by, updated_at) or None."""
    row = conn.execute(
        statement(schema, f"SELECT {_COLUMNS} FROM {{s}}.state WHERE key = %s"), (key,)
    ).fetchone()
    return None if row is None else _row(row)


def lock_state(conn: psycopg.Connection, schema: str, key: str) -> StateRow | None:
    """:func:`get_state` for a write: the key is held against other writers of this bus (a
    transaction-level advisory lock, which holds an absent key too) until the transaction
    ends, and the read that follows sees what they committed. SQLite's write lock does that
    for the whole file; here two writers of one key would both read version N and write N+1."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 (f"sqlbus state {schema} {key}",))
    return get_state(conn, schema, key)


def put_state(
    conn: psycopg.Connection, schema: str, key: str, value_json: bytes, version: int,
    deleted: bool, updated_by: str | None, now: int,
) -> None:
    """Write a key's new version and log the change (the caller checked the version)."""
    values = {"key": key, "value": value_json, "version": version, "deleted": bool(deleted),
              "by": updated_by, "at": now}
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.state (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (%(key)s, %(value)s, %(version)s, %(deleted)s, %(by)s, %(at)s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,"
        " deleted = excluded.deleted, updated_by = excluded.updated_by,"
        " updated_at = excluded.updated_at",
    ), values)
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.state_log (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (%(key)s, %(value)s, %(version)s, %(deleted)s, %(by)s, %(at)s)",
    ), values)


def state_keys(conn: psycopg.Connection, schema: str, prefix: str) -> list[str]:
    """The live keys under ``prefix``, sorted."""
    rows = conn.execute(statement(
        schema, f'SELECT key FROM {{s}}.state WHERE NOT deleted AND {_PREFIX} ORDER BY key COLLATE "C"'
    ), {"prefix": prefix}).fetchall()
    return [row[0] for row in rows]


def state_entries(conn: psycopg.Connection, schema: str, prefix: str) -> list[StateRow]:
    """Live entries under a key prefix, by key."""
    rows = conn.execute(statement(
        schema,
        f'SELECT {_COLUMNS} FROM {{s}}.state WHERE NOT deleted AND {_PREFIX} ORDER BY key COLLATE "C"',
    ), {"prefix": prefix}).fetchall()
    return [_row(row) for row in rows]


_LOG_AFTER = (
    "SELECT pos, key, value, version, deleted::int, updated_by, updated_at FROM {s}.state_log"
    " WHERE pos > %(after)s AND " + _PREFIX + " ORDER BY pos LIMIT %(limit)s"
)


def state_log_after(
    conn: psycopg.Connection, schema: str, prefix: str, after_seq: int, limit: int = 1000
) -> list[StateChange]:
    """Changes under ``prefix`` committed after position ``after_seq``, in commit order:
    (position, key, value, version, deleted, updated_by, updated_at)."""
    rows = conn.execute(statement(schema, _LOG_AFTER),
                        {"prefix": prefix, "after": after_seq, "limit": limit}).fetchall()
    return [StateChange(row[0], row[1], bytes(row[2]), *row[3:]) for row in rows]


_HISTORY = (
    "SELECT pos, key, value, version, deleted::int, updated_by, updated_at FROM {s}.state_log"
    " WHERE key = %(key)s AND pos IS NOT NULL ORDER BY pos DESC LIMIT %(limit)s"
)


def state_history(
    conn: psycopg.Connection, schema: str, key: str, limit: int
) -> list[StateChange]:
    """``key``'s committed changes, newest first, as the SQLite twin's."""
    rows = conn.execute(statement(schema, _HISTORY), {"key": key, "limit": limit}).fetchall()
    return [StateChange(row[0], row[1], bytes(row[2]), *row[3:]) for row in rows]


def state_log_head(conn: psycopg.Connection, schema: str) -> int:
    """The position of the newest committed change (0: none)."""
    row = conn.execute(
        statement(schema, "SELECT coalesce(max(pos), 0) FROM {s}.state_log")
    ).fetchone()
    return int(row[0]) if row else 0


# The live entries under a prefix and the log's head in one statement, so one snapshot
# whatever the caller's isolation (a row with NULL columns when no key is live).
_SNAPSHOT = (
    "WITH head AS (SELECT coalesce(max(pos), 0) AS head FROM {s}.state_log)"
    " SELECT head.head, " + _COLUMNS + " FROM head LEFT JOIN {s}.state"
    " ON NOT deleted AND " + _PREFIX + ' ORDER BY key COLLATE "C"'
)


def state_snapshot(conn: psycopg.Connection, schema: str, prefix: str) -> tuple[list[StateRow], int]:
    """Live entries under ``prefix`` (as :func:`state_entries`) and the log's head, read in one
    statement (one snapshot) so that the log after that head holds exactly the later changes
    (for ``watch``), inside a caller's transaction or not."""
    rows = conn.execute(statement(schema, _SNAPSHOT), {"prefix": prefix}).fetchall()
    head = int(rows[0][0])
    return [_row(row[1:]) for row in rows if row[1] is not None], head
