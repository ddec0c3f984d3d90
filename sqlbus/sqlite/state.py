"""Shared state: versioned keys (``state``) and the log of their changes (``state_log``),
which ``watch`` replays from a snapshot's position on."""

from __future__ import annotations

from typing import Any

import apsw

from ..backend import StateChange, StateRow
from .connection import begin_read, end_read


def get_state(conn: apsw.Connection, key: str) -> StateRow | None:
    """(key, value, version, deleted, updated_by, updated_at) or None."""
    rows: list[Any] = conn.execute(
        "SELECT key, value, version, deleted, updated_by, updated_at FROM state WHERE key = ?",
        (key,),
    ).fetchall()
    return StateRow(*rows[0]) if rows else None


# The write transaction holds the file's write lock: no other writer can get in between.
lock_state = get_state


def put_state(
    conn: apsw.Connection,
    key: str,
    value_json: bytes,
    version: int,
    deleted: bool,
    updated_by: str | None,
    now: int,
) -> None:
    """Write a key's new version and log the change (the caller checked the version)."""
    conn.execute(
        "INSERT INTO state (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (key) DO UPDATE SET value = ?2,"
        " version = ?3, deleted = ?4, updated_by = ?5, updated_at = ?6",
        (key, value_json, version, int(deleted), updated_by, now),
    )
    conn.execute(
        "INSERT INTO state_log (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (key, value_json, version, int(deleted), updated_by, now),
    )


# Keys under the prefix ?1, by comparison rather than LIKE, whose wildcards the prefix may hold.
_PREFIX = "substr(key, 1, length(?1)) = ?1"


def state_keys(conn: apsw.Connection, prefix: str) -> list[str]:
    """The live keys under ``prefix``, sorted."""
    return [
        row[0]
        for row in conn.execute(
            f"SELECT key FROM state WHERE deleted = 0 AND {_PREFIX} ORDER BY key", (prefix,)
        )
    ]


def state_entries(conn: apsw.Connection, prefix: str) -> list[StateRow]:
    """Live entries under a key prefix, by key: (key, value, version, deleted, updated_by,
    updated_at)."""
    return [StateRow(*row) for row in conn.execute(
        "SELECT key, value, version, deleted, updated_by, updated_at FROM state"
        f" WHERE deleted = 0 AND {_PREFIX} ORDER BY key",
        (prefix,),
    )]


def state_log_after(
    conn: apsw.Connection, prefix: str, after_seq: int, limit: int = 1000
) -> list[StateChange]:
    """Changes logged after ``after_seq``: (seq, key, value, version, deleted, updated_by,
    updated_at), in commit order."""
    return [StateChange(*row) for row in conn.execute(
        "SELECT seq, key, value, version, deleted, updated_by, updated_at FROM state_log"
        f" WHERE seq > ?2 AND {_PREFIX} ORDER BY seq LIMIT ?3",
        (prefix, after_seq, limit),
    )]


def state_history(conn: apsw.Connection, key: str, limit: int) -> list[StateChange]:
    """``key``'s logged changes, newest first (a walk of the log from its end: the log holds
    what retention keeps, so a key written long ago costs a longer walk)."""
    return [StateChange(*row) for row in conn.execute(
        "SELECT seq, key, value, version, deleted, updated_by, updated_at FROM state_log"
        " WHERE key = ?1 ORDER BY seq DESC LIMIT ?2",
        (key, limit),
    )]


def state_log_head(conn: apsw.Connection) -> int:
    """The position of the newest logged change (0: none)."""
    return conn.execute("SELECT coalesce(max(seq), 0) FROM state_log").fetchall()[0][0]


def state_snapshot(conn: apsw.Connection, prefix: str) -> tuple[list[StateRow], int]:
    """Live entries under ``prefix`` (as :func:`state_entries`) and the state_log head, read
    in one read transaction so that the log after that head holds exactly the later changes
    (for ``watch``). Inside a caller's open transaction, reads there (already one snapshot)."""
    if not conn.get_autocommit():
        return state_entries(conn, prefix), state_log_head(conn)
    begin_read(conn)
    try:
        entries = state_entries(conn, prefix)
        head = state_log_head(conn)
    finally:
        end_read(conn)
    return entries, head
