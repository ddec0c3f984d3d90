"""Retention and upkeep on PostgreSQL, as :mod:`sqlbus.sqlite.retention`: the stored policy,
pruning the archive, dead letters and the state log, moving expired messages to dead letters,
and the counters that keep the totals of what is deleted (folded in the same transaction, so
totals never go down when the archive is pruned). In progress (issue 15): not yet behind the
engine.

Sums are cast to ``bigint``: PostgreSQL's ``sum(bigint)`` is ``numeric``, which psycopg reads
as ``Decimal``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..backend import Pruned, RetentionRow, retired_counts
from .schema import statement

# ---------------------------------------------------------------------------------------------
# Counters

_RETIRED = " RETURNING message_id, sender, agent, state, sent_at, done_at"


def add_counters(conn: psycopg.Connection, schema: str, deltas: Sequence[tuple[str, str, int]]) -> None:
    """Add ``(name, agent, delta)`` to the counters (agent ``''``: the whole bus)."""
    kept = [d for d in deltas if d[2]]
    if not kept:
        return
    # One statement, the deltas summed per key first: ON CONFLICT may not touch a row twice.
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.counters (name, agent, value) SELECT name, agent, sum(value)::bigint"
        " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS d(name, agent, value)"
        " GROUP BY name, agent ORDER BY name, agent"
        " ON CONFLICT (name, agent) DO UPDATE SET value = {s}.counters.value + excluded.value",
    ), ([d[0] for d in kept], [d[1] for d in kept], [d[2] for d in kept]))


def fold_retired(conn: psycopg.Connection, schema: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Fold deleted message rows into the counters (:func:`sqlbus.backend.retired_counts`):
    a message with no row left counts as sent, its sender's."""
    deltas, senders = retired_counts(rows)
    if senders:
        gone = conn.execute(statement(
            schema,
            "SELECT r.sender FROM unnest(%s::text[], %s::text[]) AS r(message_id, sender)"
            " WHERE NOT EXISTS (SELECT 1 FROM {s}.message AS m"
            " WHERE m.message_id = r.message_id AND m.sender = r.sender)",
        ), ([m for m, _ in senders], [s for _, s in senders])).fetchall()
        for (sender,) in gone:
            deltas["sent", sender] = deltas.get(("sent", sender), 0) + 1
    add_counters(conn, schema, [(name, agent, value) for (name, agent), value in deltas.items()])


def retire_rows(conn: psycopg.Connection, schema: str, dead: Sequence[tuple[int, str]]) -> None:
    """Delete the message rows of dead-letter records already deleted (``(seq, reason)``)
    and fold them into the counters."""
    if not dead:
        return
    reasons = dict(dead)
    rows = conn.execute(
        statement(schema, "DELETE FROM {s}.message WHERE seq = ANY(%s)" + _RETIRED + ", seq"),
        (list(reasons),),
    ).fetchall()
    fold_retired(conn, schema, [(*row[:6], reasons[row[6]]) for row in rows])


# ---------------------------------------------------------------------------------------------
# The policy


def get_retention(conn: psycopg.Connection, schema: str) -> RetentionRow:
    """The stored retention policy: (archive ms, dead-letter ms, archive max messages); None
    keeps them for ever (no bound)."""
    row = conn.execute(statement(
        schema, "SELECT archive_ms, dead_ms, archive_max_messages FROM {s}.retention"
    )).fetchone()
    assert row is not None  # made with the schema
    return RetentionRow(row[0], row[1], row[2])


def set_retention(
    conn: psycopg.Connection, schema: str, archive_ms: int | None, dead_ms: int | None,
    max_messages: int | None,
) -> None:
    """Store a new retention policy (as :func:`get_retention` reads it)."""
    conn.execute(statement(
        schema, "UPDATE {s}.retention SET archive_ms = %s, dead_ms = %s, archive_max_messages = %s"
    ), (archive_ms, dead_ms, max_messages))


# ---------------------------------------------------------------------------------------------
# Pruning

_NO_CUTOFF = 1 << 62  # later than any time (ms) and any seq


def archive_bound(conn: psycopg.Connection, schema: str, cutoff: int) -> int:
    """A seq below which every row acked before ``cutoff`` lies: the first row sent at or
    after it (a row is acked after it is sent); as the SQLite twin."""
    row = conn.execute(statement(
        schema, "SELECT seq FROM {s}.message WHERE sent_at >= %s ORDER BY seq LIMIT 1"
    ), (cutoff,)).fetchone()
    return _NO_CUTOFF if row is None else int(row[0])


def prune_acked(
    conn: psycopg.Connection, schema: str, cutoff: int, limit: int, after: int = 0,
    bound: int | None = None,
) -> Pruned:
    """Delete up to ``limit`` acked rows (the sent archive) acked before ``cutoff`` ms, oldest
    first, with seq in (``after``, ``bound``), folding them into the counters. Returns (how
    many, the last seq looked at): pass it as ``after`` to the next batch."""
    if bound is None:
        bound = archive_bound(conn, schema, cutoff)
    seqs = [row[0] for row in conn.execute(statement(
        schema,
        "SELECT seq FROM {s}.message WHERE seq > %s AND seq < %s AND state = 2 AND done_at < %s"
        " ORDER BY seq LIMIT %s",
    ), (after, bound, cutoff, limit)).fetchall()]
    if not seqs:
        return Pruned(0, after)
    rows = conn.execute(statement(
        schema, "DELETE FROM {s}.message WHERE seq = ANY(%s) AND state = 2 AND done_at < %s" + _RETIRED
    ), (seqs, cutoff)).fetchall()
    fold_retired(conn, schema, [(*row, None) for row in rows])
    return Pruned(len(rows), seqs[-1])


def archive_excess(conn: psycopg.Connection, schema: str, max_messages: int) -> int:
    """How many acked rows (the sent archive) there are above ``max_messages``. Counts only
    when the table spans more positions than ``max_messages`` (two reads of the primary key;
    otherwise it holds fewer rows)."""
    span = conn.execute(statement(
        schema, "SELECT (SELECT max(seq) FROM {s}.message) - (SELECT min(seq) FROM {s}.message) + 1"
    )).fetchone()
    if span is None or span[0] is None or span[0] <= max_messages:
        return 0
    acked = conn.execute(
        statement(schema, "SELECT count(*) FROM {s}.message WHERE state = 2")
    ).fetchone()
    return max(0, (acked[0] if acked else 0) - max_messages)


def prune_oldest_acked(conn: psycopg.Connection, schema: str, limit: int, after: int = 0) -> Pruned:
    """Delete up to ``limit`` of the oldest acked rows whatever their age, folding them into
    the counters; returns as :func:`prune_acked`."""
    return prune_acked(conn, schema, _NO_CUTOFF, limit, after, _NO_CUTOFF)


def prune_dead(conn: psycopg.Connection, schema: str, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` dead letters (record and row) that failed before ``cutoff`` ms,
    oldest first, folding them into the counters; returns how many."""
    dead = conn.execute(statement(
        schema,
        "DELETE FROM {s}.dead_letter WHERE id IN (SELECT id FROM {s}.dead_letter"
        " WHERE failed_at < %s ORDER BY failed_at LIMIT %s) RETURNING seq, reason",
    ), (cutoff, limit)).fetchall()
    retire_rows(conn, schema, [(row[0], row[1]) for row in dead])
    return len(dead)


def prune_state_log(conn: psycopg.Connection, schema: str, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` of the oldest state changes (by commit position) logged before
    ``cutoff`` ms. ``state`` keeps every key's latest version; the newest entry of the log
    stays however old, so the head a watch stands on never goes back (as the SQLite twin)."""
    done = conn.execute(statement(
        schema,
        "DELETE FROM {s}.state_log WHERE seq IN (SELECT seq FROM {s}.state_log"
        " WHERE pos IS NOT NULL ORDER BY pos LIMIT %s) AND updated_at < %s"
        " AND pos < (SELECT max(pos) FROM {s}.state_log)",
    ), (limit, cutoff))
    return done.rowcount


def count_prunable(
    conn: psycopg.Connection, schema: str, acked_cutoff: int | None, dead_cutoff: int | None
) -> tuple[int, int]:
    """How many acked rows and dead letters the cutoffs would prune (None: none)."""
    acked = dead = 0
    if acked_cutoff is not None:
        row = conn.execute(statement(
            schema, "SELECT count(*) FROM {s}.message WHERE seq < %s AND state = 2 AND done_at < %s"
        ), (archive_bound(conn, schema, acked_cutoff), acked_cutoff)).fetchone()
        acked = row[0] if row else 0
    if dead_cutoff is not None:
        row = conn.execute(statement(
            schema, "SELECT count(*) FROM {s}.dead_letter WHERE failed_at < %s"
        ), (dead_cutoff,)).fetchone()
        dead = row[0] if row else 0
    return acked, dead


# ---------------------------------------------------------------------------------------------
# Expired messages

# Expired rows as STATUS names them (a running lease stays leased), one query per partial index
# (message_claim, message_wait), so the archive is never read.
_EXPIRED_QUEUED = " FROM {s}.message WHERE state = 0 AND expires_at < %(now)s"
_EXPIRED_WAITING = (
    " FROM {s}.message WHERE state IN (1, 4) AND expires_at < %(now)s"
    " AND NOT (state = 1 AND visible_at > %(now)s)"
)
_SELECT_EXPIRED = ("SELECT seq" + _EXPIRED_QUEUED + " LIMIT %(limit)s",
                   "SELECT seq" + _EXPIRED_WAITING + " LIMIT %(limit)s")
_COUNT_EXPIRED = (
    "SELECT (SELECT count(*)" + _EXPIRED_QUEUED + ") + (SELECT count(*)" + _EXPIRED_WAITING + ")"
)


def expired_rows(conn: psycopg.Connection, schema: str, now: int, limit: int) -> list[int]:
    """Up to ``limit`` expired messages still in an inbox (never delivered again; the next
    claim on that inbox or background upkeep moves them to dead letters): their seqs."""
    seqs: list[int] = []
    for select in _SELECT_EXPIRED:
        rows = conn.execute(statement(schema, select), {"now": now, "limit": limit - len(seqs)})
        seqs += [row[0] for row in rows.fetchall()]
        if len(seqs) >= limit:
            break
    return seqs


def count_expired(conn: psycopg.Connection, schema: str, now: int) -> int:
    """Expired messages not yet moved to dead letters."""
    row = conn.execute(statement(schema, _COUNT_EXPIRED), {"now": now}).fetchone()
    return int(row[0]) if row else 0


def dead_letter_expired(conn: psycopg.Connection, schema: str, seqs: Sequence[int], now: int) -> int:
    """Move the rows ``seqs`` that are still expired at ``now`` to dead letters, reason
    ``expired``, failed at their expiry time, attempts as they stand; returns how many."""
    if not seqs:
        return 0
    moved = conn.execute(statement(
        schema,
        "WITH moved AS (UPDATE {s}.message SET state = 3, done_at = %(now)s"
        " WHERE seq = ANY(%(seqs)s) AND state IN (0, 1, 4) AND expires_at < %(now)s"
        " AND NOT (state = 1 AND visible_at > %(now)s) RETURNING seq, expires_at, attempts)"
        " INSERT INTO {s}.dead_letter (seq, reason, failed_at, attempts)"
        " SELECT seq, 'expired', expires_at, attempts FROM moved ORDER BY seq",
    ), {"now": now, "seqs": list(seqs)})
    return moved.rowcount
