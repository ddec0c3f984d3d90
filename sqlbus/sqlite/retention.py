"""Retention and upkeep: the stored policy, pruning the archive, dead letters and the state
log, moving expired messages to dead letters, and the counters that keep the totals of what
is deleted.

Metrics are read from the rows themselves (no counter is touched by publish, claim or ack);
what retention deletes is folded into ``counters`` in the same transaction, so totals never
go down when the archive is pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from ..backend import Pruned, RetentionRow, retired_counts
from .schema import WAITING

# ---------------------------------------------------------------------------------------------
# Counters

_RETIRED = " RETURNING message_id, sender, agent, state, sent_at, done_at"


def add_counters(conn: apsw.Connection, deltas: Sequence[tuple[str, str, int]]) -> None:
    """Add ``(name, agent, delta)`` to the counters (agent ``''``: the whole bus)."""
    conn.executemany(
        "INSERT INTO counters (name, agent, value) VALUES (?, ?, ?)"
        " ON CONFLICT (name, agent) DO UPDATE SET value = value + excluded.value",
        [d for d in deltas if d[2]],
    )


def fold_retired(conn: apsw.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Fold deleted message rows into the counters (:func:`sqlbus.backend.retired_counts`):
    a message with no row left counts as sent, its sender's."""
    deltas, senders = retired_counts(rows)
    for message_id, sender in senders:
        if not conn.execute(
            "SELECT 1 FROM message WHERE message_id = ? AND sender = ? LIMIT 1",
            (message_id, sender),
        ).fetchall():
            deltas["sent", sender] = deltas.get(("sent", sender), 0) + 1
    add_counters(conn, [(name, agent, value) for (name, agent), value in deltas.items()])


def retire_rows(conn: apsw.Connection, dead: Sequence[tuple[int, str]]) -> None:
    """Delete the message rows of dead-letter records already deleted (``(seq, reason)``)
    and fold them into the counters."""
    rows: list[tuple[Any, ...]] = []
    for seq, reason in dead:
        for row in conn.execute("DELETE FROM message WHERE seq = ?" + _RETIRED, (seq,)):
            rows.append((*row, reason))
    fold_retired(conn, rows)


# ---------------------------------------------------------------------------------------------
# The policy


def get_retention(conn: apsw.Connection) -> RetentionRow:
    """The stored retention policy: (archive ms, dead-letter ms, archive max messages); None
    keeps them for ever (no bound)."""
    row: tuple[Any, ...] = conn.execute(
        "SELECT archive_ms, dead_ms, archive_max_messages FROM retention"
    ).fetchall()[0]
    return RetentionRow(row[0], row[1], row[2])


def set_retention(
    conn: apsw.Connection, archive_ms: int | None, dead_ms: int | None, max_messages: int | None
) -> None:
    """Store a new retention policy (as :func:`get_retention` reads it)."""
    conn.execute(
        "UPDATE retention SET archive_ms = ?, dead_ms = ?, archive_max_messages = ?",
        (archive_ms, dead_ms, max_messages),
    )


# ---------------------------------------------------------------------------------------------
# Pruning


def archive_bound(conn: apsw.Connection, cutoff: int) -> int:
    """A seq below which every row acked before ``cutoff`` lies: the first row sent at or
    after it (a row is acked after it is sent). Walks only the rows older than the cutoff,
    which retention keeps few, instead of the whole table: no index on done_at, because an
    index the ack must update would cost every ack an extra page. Compute it once for a long
    prune of many batches (:func:`prune_acked`) instead of once per batch."""
    rows = conn.execute(
        "SELECT seq FROM message WHERE sent_at >= ? ORDER BY seq LIMIT 1", (cutoff,)
    ).fetchall()
    return rows[0][0] if rows else 1 << 62


def prune_acked(
    conn: apsw.Connection, cutoff: int, limit: int, after: int = 0, bound: int | None = None
) -> Pruned:
    """Delete up to ``limit`` acked rows (the sent archive) acked before ``cutoff`` ms, oldest
    first, with seq in (``after``, ``bound``), folding them into the counters. Returns (how
    many, the last seq looked at): pass it as ``after`` to the next batch so that rows kept
    at the front (pending, dead) are not walked again."""
    if bound is None:
        bound = archive_bound(conn, cutoff)
    seqs = conn.execute(
        "SELECT seq FROM message WHERE seq > ?1 AND seq < ?2 AND state = 2 AND done_at < ?3"
        " ORDER BY seq LIMIT ?4",
        (after, bound, cutoff, limit),
    ).fetchall()
    if not seqs:
        return Pruned(0, after)
    rows = conn.execute(
        "DELETE FROM message WHERE seq BETWEEN ?1 AND ?2 AND state = 2 AND done_at < ?3"
        + _RETIRED,
        (seqs[0][0], seqs[-1][0], cutoff),
    ).fetchall()
    fold_retired(conn, [(*row, None) for row in rows])
    return Pruned(len(rows), seqs[-1][0])


_NO_CUTOFF = 1 << 62  # later than any time (ms) and any seq


def archive_excess(conn: apsw.Connection, max_messages: int) -> int:
    """How many acked rows (the sent archive) there are above ``max_messages``.

    Counts index entries, never the archive's rows: every row but the queued, waiting and
    dead ones (two partial indexes, each counted by its own WHERE, and the dead-letter table)
    is acked. It counts only when the table spans more positions than ``max_messages``
    (otherwise it holds fewer rows)."""
    span: tuple[Any, ...] = conn.execute(
        "SELECT (SELECT max(seq) FROM message) - (SELECT min(seq) FROM message) + 1"
    ).fetchall()[0]
    if span[0] is None or span[0] <= max_messages:
        return 0
    acked: Any = conn.execute(
        "SELECT (SELECT count(*) FROM message) - (SELECT count(*) FROM message WHERE state = 0)"
        f" - (SELECT count(*) FROM message WHERE {WAITING})"
        " - (SELECT count(*) FROM dead_letter)"
    ).fetchall()[0][0]
    return max(0, acked - max_messages)


def prune_oldest_acked(conn: apsw.Connection, limit: int, after: int = 0) -> Pruned:
    """Delete up to ``limit`` of the oldest acked rows whatever their age (the archive is over
    its ``archive_max_messages``), folding them into the counters; returns as
    :func:`prune_acked`."""
    return prune_acked(conn, _NO_CUTOFF, limit, after, _NO_CUTOFF)


def prune_dead(conn: apsw.Connection, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` dead letters (record and row) that failed before ``cutoff`` ms,
    oldest first, folding them into the counters; returns how many."""
    dead = conn.execute(
        "DELETE FROM dead_letter WHERE id IN (SELECT id FROM dead_letter WHERE failed_at < ?"
        " ORDER BY failed_at LIMIT ?) RETURNING seq, reason",
        (cutoff, limit),
    ).fetchall()
    retire_rows(conn, dead)
    return len(dead)


def prune_state_log(conn: apsw.Connection, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` of the oldest state changes logged before ``cutoff`` (ms).

    Only the log (what ``watch`` replays) shrinks; ``state`` keeps every key's latest version.
    Looks at the ``limit`` oldest entries only, so a pass with nothing to delete is cheap. The
    newest entry stays, however old: the next change is numbered after it, so a watch that
    stands there sees it (positions never go back; a watch replays only what follows it).
    """
    conn.execute(
        "DELETE FROM state_log WHERE seq IN (SELECT seq FROM state_log ORDER BY seq LIMIT ?)"
        " AND updated_at < ? AND seq < (SELECT max(seq) FROM state_log)",
        (limit, cutoff),
    )
    return conn.changes()


def count_prunable(
    conn: apsw.Connection, acked_cutoff: int | None, dead_cutoff: int | None
) -> tuple[int, int]:
    """How many acked rows and dead letters the cutoffs would prune (None: none)."""
    acked = dead = 0
    if acked_cutoff is not None:
        acked = conn.execute(
            "SELECT count(*) FROM message WHERE seq < ? AND state = 2 AND done_at < ?",
            (archive_bound(conn, acked_cutoff), acked_cutoff),
        ).fetchall()[0][0]
    if dead_cutoff is not None:
        dead = conn.execute(
            "SELECT count(*) FROM dead_letter WHERE failed_at < ?", (dead_cutoff,)
        ).fetchall()[0][0]
    return acked, dead


# ---------------------------------------------------------------------------------------------
# Expired messages

# Expired rows as STATUS names them (a running lease stays leased), one query per partial
# index (message_claim, message_wait), each with that index's WHERE, so the archive is never
# read.
_EXPIRED_QUEUED = " FROM message WHERE state = 0 AND expires_at < ?1"
_EXPIRED_WAITING = (
    f" FROM message WHERE {WAITING} AND expires_at < ?1"
    " AND NOT (state = 1 AND visible_at > ?1)"
)
_SELECT_EXPIRED = ("SELECT seq" + _EXPIRED_QUEUED + " LIMIT ?2",
                   "SELECT seq" + _EXPIRED_WAITING + " LIMIT ?2")
_COUNT_EXPIRED = ("SELECT count(*)" + _EXPIRED_QUEUED, "SELECT count(*)" + _EXPIRED_WAITING)


def expired_rows(conn: apsw.Connection, now: int, limit: int) -> list[int]:
    """Up to ``limit`` expired messages still in an inbox (never delivered again; the next
    claim on that inbox or background upkeep moves them to dead letters): their seqs."""
    seqs: list[int] = []
    for select in _SELECT_EXPIRED:
        seqs += [row[0] for row in conn.execute(select, (now, limit - len(seqs)))]
        if len(seqs) >= limit:
            break
    return seqs


def count_expired(conn: apsw.Connection, now: int) -> int:
    """Expired messages not yet moved to dead letters."""
    total = 0
    for count in _COUNT_EXPIRED:
        rows = conn.execute(count, (now,)).fetchall()
        total += int(rows[0][0] or 0)
    return total


def dead_letter_expired(conn: apsw.Connection, seqs: Sequence[int], now: int) -> int:
    """Move the rows ``seqs`` that are still expired at ``now`` to dead letters, reason
    ``expired``, failed at their expiry time, attempts as they stand; returns how many."""
    moved = []
    for seq in seqs:
        moved += conn.execute(
            "UPDATE message SET state = 3, done_at = ?1 WHERE seq = ?2"
            " AND state IN (0, 1, 4) AND expires_at < ?1 AND NOT (state = 1 AND visible_at > ?1)"
            " RETURNING seq, expires_at, attempts",
            (now, seq),
        ).fetchall()
    if moved:
        conn.executemany(
            "INSERT INTO dead_letter (seq, reason, failed_at, attempts) VALUES (?, 'expired', ?, ?)",
            moved,
        )
    return len(moved)
