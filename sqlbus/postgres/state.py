"""Shared state on PostgreSQL: versioned keys (``state``) and the log of their changes
(``state_log``), as :mod:`sqlbus.sqlite.state` keeps them. In progress (issue 15): not yet
behind the engine; reading the log after a position (``watch``) waits for the commit-order
rule docs/postgres.md names as the open question.

Keys sort byte by byte (``COLLATE "C"``), as on SQLite; a prefix is compared, not matched with
LIKE, whose wildcards it may hold."""

from __future__ import annotations

from typing import Any

import psycopg

from ..backend import StateRow
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
