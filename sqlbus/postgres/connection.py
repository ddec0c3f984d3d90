"""Transactions, lock waits and the checks of a bus on PostgreSQL, the twins of
:mod:`sqlbus.sqlite.connection`'s. In progress (issue 15): not yet behind the engine.

Connections are in autocommit mode; the engine brackets a transaction with :func:`begin` and
:func:`commit` (plain SQL, so psycopg's own transaction blocks stay out of the way)."""

from __future__ import annotations

import psycopg
from psycopg.pq import TransactionStatus

from .schema import APPLICATION, statement

# The mark a bus's sqlbus_meta stands for, as SQLite's application_id (the same number, so
# callers compare one constant whichever backend they hold).
APPLICATION_ID = 0x5153_4255


def set_busy_timeout(conn: psycopg.Connection, timeout: float) -> None:
    """Make ``conn`` wait up to ``timeout`` seconds for a lock another transaction holds
    (``lock_timeout``, in ms; 0 would wait for ever, so it is at least 1 ms)."""
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (str(max(1, round(timeout * 1000))),))


def begin(conn: psycopg.Connection) -> None:
    """Start a transaction. PostgreSQL locks rows, not the database: a writer takes its locks
    as it writes, and a claim skips rows another claim holds."""
    conn.execute("BEGIN")


def commit(conn: psycopg.Connection) -> None:
    """Commit the open transaction."""
    conn.execute("COMMIT")


def rollback(conn: psycopg.Connection) -> None:
    """Roll back the open transaction, if any (a failed COMMIT has already ended it)."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        conn.execute("ROLLBACK")


def begin_read(conn: psycopg.Connection) -> None:
    """Start a read transaction that holds one snapshot until :func:`end_read` (PostgreSQL
    takes it at the first statement, so read once now)."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    conn.execute("SELECT 1")


def end_read(conn: psycopg.Connection) -> None:
    """End a read transaction."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        conn.execute("COMMIT")


def in_transaction(conn: psycopg.Connection) -> bool:
    """Whether ``conn`` has a transaction open (its statements already share one snapshot
    when that transaction is REPEATABLE READ)."""
    return conn.info.transaction_status != TransactionStatus.IDLE


def schema_marks(conn: psycopg.Connection, schema: str) -> tuple[int, int]:
    """(application id, schema version) as the bus's ``sqlbus_meta`` holds them: SQLite's
    (application_id, user_version). The id is :data:`APPLICATION_ID` when the table says
    ``application = sqlbus``, else 0; the version 0 when it is missing or not a number."""
    rows = conn.execute(statement(schema, "SELECT key, value FROM {s}.sqlbus_meta")).fetchall()
    marks: dict[str, str] = {row[0]: row[1] for row in rows}
    version = str(marks.get("schema_version", ""))
    return (APPLICATION_ID if marks.get("application") == APPLICATION else 0,
            int(version) if version.isdigit() else 0)


# PostgreSQL keeps its own pages whole (checksums, WAL); what can go wrong is in the rows,
# written by a caller's own SQL or with triggers or foreign keys turned off. Each check is
# (the problem it names, a query counting the rows that have it).
_CHECKS = (
    ("message rows whose shared body is missing (message_body)",
     "SELECT count(*) FROM {s}.message AS m WHERE m.body_id IS NOT NULL"
     " AND NOT EXISTS (SELECT 1 FROM {s}.message_body AS b WHERE b.id = m.body_id)"),
    ("message rows with neither or both of body and body_id",
     "SELECT count(*) FROM {s}.message WHERE (body IS NULL) = (body_id IS NULL)"),
    ("dead letters whose message row is missing or not dead",
     "SELECT count(*) FROM {s}.dead_letter AS d WHERE NOT EXISTS"
     " (SELECT 1 FROM {s}.message AS m WHERE m.seq = d.seq AND m.state = 3)"),
    ("dead message rows without a dead-letter record",
     "SELECT count(*) FROM {s}.message AS m WHERE m.state = 3 AND NOT EXISTS"
     " (SELECT 1 FROM {s}.dead_letter AS d WHERE d.seq = m.seq)"),
    ("acked or dead message rows without done_at",
     "SELECT count(*) FROM {s}.message WHERE state IN (2, 3) AND done_at IS NULL"),
    ("committed state changes without a commit position (state_log.pos; its trigger is off)",
     "SELECT count(*) FROM {s}.state_log WHERE pos IS NULL"),
    ("shared bodies no message row references (message_body; its release trigger is off)",
     "SELECT count(*) FROM {s}.message_body AS b WHERE NOT EXISTS"
     " (SELECT 1 FROM {s}.message AS m WHERE m.body_id = b.id)"),
    ("retention rows other than the one policy row",
     "SELECT abs(count(*) - 1) FROM {s}.retention"),
    ("invalid indexes (a failed CREATE INDEX CONCURRENTLY or REINDEX; rebuild them)",
     "SELECT count(*) FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indrelid"
     " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
     " WHERE n.nspname = %(schema)s AND NOT (i.indisvalid AND i.indisready)"),
    ("disabled triggers (the body release or the state log's commit position)",
     "SELECT count(*) FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid"
     " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
     " WHERE n.nspname = %(schema)s AND NOT t.tgisinternal AND t.tgenabled = 'D'"),
)


def integrity_check(conn: psycopg.Connection, schema: str, max_errors: int = 20) -> list[str]:
    """``['ok']``, as SQLite's, or up to ``max_errors`` problems found in the bus's rows (each
    says how many rows have it). Scans the tables: run it in one read transaction, off the
    hot path. A body that does not decode is the caller's to find, as on SQLite."""
    problems: list[str] = []
    for problem, query in _CHECKS:
        row = conn.execute(statement(schema, query), {"schema": schema}).fetchone()
        if row is not None and row[0]:
            problems.append(f"{row[0]} {problem}")
    return problems[:max_errors] or ["ok"]
