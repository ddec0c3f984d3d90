"""What operators and listings read and do on PostgreSQL, as :mod:`sqlbus.sqlite.admin`: dead
letters (list, requeue, purge), the sent archive, and an inbox's or the whole bus's rows
without claiming them (peek, tail). The registry and interests are in
:mod:`sqlbus.postgres.agents`. In progress (issue 15): not yet behind the engine."""

from __future__ import annotations

from typing import Any

import psycopg

from ..backend import (
    DeadLetterRow,
    LeaseRow,
    MessageRow,
    PeekRow,
    RequeueTarget,
    SentRow,
    TailRow,
    peek_start,
)
from .retention import add_counters, retire_rows
from .schema import BODY, BODY_LENGTH, LISTED, STATUS, statement

# ---------------------------------------------------------------------------------------------
# Dead letters

# %(max_body)s is the reader's limit on a body's stored length: a longer body is not read
# (NULL), and the message's own columns stand in for it.
_DEAD = (
    "SELECT d.id, m.agent, d.reason, d.error_name, d.error_message, d.traceback, d.context,"
    " d.failed_at, d.attempts, CASE WHEN " + BODY_LENGTH + " <= %(max_body)s THEN " + BODY
    + " END, m.message_id, m.sender, m.type, m.priority, m.sent_at, " + BODY_LENGTH
    + " FROM {s}.dead_letter AS d JOIN {s}.message AS m ON m.seq = d.seq"
)
_LIST_DEAD = (
    _DEAD + " WHERE (%(agent)s::text IS NULL OR m.agent = %(agent)s)"
    " AND (%(reason)s::text IS NULL OR d.reason = %(reason)s)"
    " AND (%(before)s::bigint IS NULL OR d.id < %(before)s) ORDER BY d.id DESC LIMIT %(limit)s"
)
_DEAD_BY_ID = _DEAD + " WHERE d.id = %(id)s"
_DEAD_BY_MESSAGE = _DEAD + " WHERE m.message_id = %(message_id)s ORDER BY d.id DESC LIMIT 1"


def _dead_row(row: Any) -> DeadLetterRow:
    values: Any = (*row[:9], None if row[9] is None else bytes(row[9]), *row[10:])
    return DeadLetterRow(*values)


def list_dead_letters(
    conn: psycopg.Connection, schema: str, agent: str | None, limit: int, max_body: int = 1 << 62,
    reason: str | None = None, before: int | None = None,
) -> list[DeadLetterRow]:
    """Dead letters, newest first, of one recipient or all (None), with ``reason`` (None:
    any), numbered below ``before`` (None: all); the body None when longer than ``max_body``
    bytes (not read)."""
    rows = conn.execute(statement(schema, _LIST_DEAD), {
        "agent": agent, "limit": limit, "max_body": max_body, "reason": reason, "before": before,
    }).fetchall()
    return [_dead_row(row) for row in rows]


def get_dead_letter(
    conn: psycopg.Connection, schema: str, dead_letter_id: int | None,
    message_id: str | None = None, max_body: int = 1 << 62,
) -> DeadLetterRow | None:
    """A dead letter by number, or the newest of message ``message_id``'s (as
    :func:`list_dead_letters`), or None."""
    query = _DEAD_BY_ID if dead_letter_id is not None else _DEAD_BY_MESSAGE
    row = conn.execute(statement(schema, query), {
        "id": dead_letter_id, "message_id": message_id, "max_body": max_body,
    }).fetchone()
    return None if row is None else _dead_row(row)


# A message's ttl, read in SQL by body_ttl() (NULL when the body is not JSON), so requeueing
# never loads a body into Python, which may be large or damaged.
_REQUEUE_TARGET = (
    "SELECT d.id, m.message_id, CASE WHEN m.body IS NOT NULL THEN {s}.body_ttl(m.body)"
    " ELSE (SELECT {s}.body_ttl(b.body) FROM {s}.message_body AS b WHERE b.id = m.body_id) END"
    " FROM {s}.dead_letter AS d JOIN {s}.message AS m ON m.seq = d.seq"
)
_TARGET_BY_ID = _REQUEUE_TARGET + " WHERE d.id = %(id)s"
_TARGETS_OF_MESSAGE = _REQUEUE_TARGET + " WHERE m.message_id = %(message_id)s ORDER BY d.id"
_TARGETS_OF = (
    _REQUEUE_TARGET + " WHERE (%(agent)s::text IS NULL OR m.agent = %(agent)s)"
    " AND (%(reason)s::text IS NULL OR d.reason = %(reason)s) ORDER BY d.id"
)


def requeue_targets(
    conn: psycopg.Connection, schema: str, dead_letter_id: int | None, message_id: str | None
) -> list[RequeueTarget]:
    """(id, message_id, ttl or None) of the dead letter numbered ``dead_letter_id``, or of
    every dead letter of message ``message_id``, oldest first."""
    query = _TARGET_BY_ID if dead_letter_id is not None else _TARGETS_OF_MESSAGE
    rows = conn.execute(statement(schema, query),
                        {"id": dead_letter_id, "message_id": message_id}).fetchall()
    return [RequeueTarget(*row) for row in rows]


def dead_letter_ids(
    conn: psycopg.Connection, schema: str, agent: str | None, reason: str | None
) -> list[RequeueTarget]:
    """(id, message_id, ttl or None) of the dead letters of ``agent`` with ``reason`` (None:
    any), oldest first (see :func:`requeue_targets`)."""
    rows = conn.execute(statement(schema, _TARGETS_OF), {"agent": agent, "reason": reason})
    return [RequeueTarget(*row) for row in rows.fetchall()]


def requeue(conn: psycopg.Connection, schema: str, dead_letter_id: int, now: int, ttl_ms: int) -> bool:
    """Queue a dead letter's row again, attempts reset and TTL counted from now (``ttl_ms``
    0 = never expires), and drop the dead-letter record, keeping the move to dead letters in
    the counters. False when there is no such record."""
    gone = conn.execute(statement(
        schema, "DELETE FROM {s}.dead_letter WHERE id = %s RETURNING seq, reason"
    ), (dead_letter_id,)).fetchone()
    if gone is None:
        return False
    requeued = conn.execute(statement(
        schema,
        "UPDATE {s}.message SET state = 0, attempts = 0, visible_at = %(now)s, done_at = NULL,"
        " expires_at = CASE WHEN %(ttl)s > 0 THEN %(now)s + %(ttl)s END WHERE seq = %(seq)s"
        " RETURNING agent",
    ), {"now": now, "ttl": ttl_ms, "seq": gone[0]}).fetchone()
    agent = None if requeued is None else requeued[0]
    if agent is not None:
        add_counters(conn, schema, [("dead", agent, 1)]
                     + ([("expired", agent, 1)] if gone[1] == "expired" else []))
    return True


def purge_dead_letters(conn: psycopg.Connection, schema: str, older_than: int | None) -> int:
    """Delete dead letters (and their rows) that failed before ``older_than`` ms (None: all),
    keeping their counts in the counters; how many."""
    dead = conn.execute(statement(
        schema,
        "DELETE FROM {s}.dead_letter WHERE %(older)s::bigint IS NULL OR failed_at < %(older)s"
        " RETURNING seq, reason",
    ), {"older": older_than}).fetchall()
    retire_rows(conn, schema, [(row[0], row[1]) for row in dead])
    return len(dead)


# ---------------------------------------------------------------------------------------------
# The sent archive, peek and tail

# The newest ``limit`` messages by their newest row that ``agent`` sent or received (all:
# NULL), then each one's recipients (every row, by seq) and its first row's listed columns.
_SENT = (
    "WITH picked AS (SELECT message_id AS mid, max(seq) AS newest FROM {s}.message"
    " WHERE %(agent)s::text IS NULL OR sender = %(agent)s OR agent = %(agent)s"
    " GROUP BY message_id ORDER BY newest DESC LIMIT %(limit)s)"
    " SELECT f.recipients, " + LISTED + " FROM picked AS p CROSS JOIN LATERAL"
    " (SELECT array_agg(r.agent ORDER BY r.seq) FILTER (WHERE r.agent IS NOT NULL) AS recipients,"
    " min(r.seq) AS first FROM {s}.message AS r WHERE r.message_id = p.mid) AS f"
    " JOIN {s}.message AS m ON m.seq = f.first ORDER BY p.newest DESC"
)


def list_sent(
    conn: psycopg.Connection, schema: str, agent: str | None, limit: int, max_body: int = 1 << 62
) -> list[SentRow]:
    """Archived messages, newest first: (recipients, and ``LISTED``'s columns with the body
    None when longer than ``max_body``); ``agent`` keeps those sent by or to it."""
    rows = conn.execute(statement(schema, _SENT),
                        {"agent": agent, "limit": limit, "max_body": max_body}).fetchall()
    result = []
    for row in rows:
        values: Any = (row[0] or [], *row[1:7], None if row[7] is None else bytes(row[7]))
        result.append(SentRow(*values))
    return result


_LIVE = " AND (expires_at IS NULL OR expires_at >= %(now)s)"
# As the SQLite twin's: %(k)s and %(q)s are where the page starts within the query's group
# (sqlbus.backend.peek_start), %(priority)s keeps one priority.
_PEEK_INBOX = (" FROM {s}.message WHERE agent = %(agent)s"
               " AND (%(priority)s::int IS NULL OR priority = %(priority)s) AND ")
_PEEK_READY = (  # (-priority, seq): receive's order; k a priority, q a seq within it
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state = 0 AND priority = %(k)s"
    " AND seq > %(q)s" + _LIVE + " ORDER BY seq LIMIT %(room)s",
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state = 0 AND priority < %(k)s" + _LIVE
    + " ORDER BY priority DESC, seq LIMIT %(room)s",
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state IN (1, 4) AND visible_at <= %(now)s"
    + _LIVE + " AND (priority < %(k)s OR (priority = %(k)s AND seq > %(q)s))"
    " ORDER BY priority DESC, seq LIMIT %(room)s",
)
_PEEK_WAITING = (  # by when they become claimable; after (k, q) = (visible_at, seq)
    "SELECT visible_at, seq, " + STATUS + _PEEK_INBOX + "state IN (1, 4) AND visible_at > %(now)s"
    " AND (state = 1 OR expires_at IS NULL OR expires_at >= %(now)s)"
    " AND (visible_at, seq) > (%(k)s, %(q)s) ORDER BY visible_at, seq LIMIT %(room)s",
)
_PEEK_EXPIRED = (  # by when they expired; after (k, q) = (expires_at, seq)
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + "state = 0 AND expires_at < %(now)s"
    " AND (expires_at, seq) > (%(k)s, %(q)s) ORDER BY expires_at, seq LIMIT %(room)s",
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + "state IN (1, 4) AND expires_at < %(now)s"
    " AND NOT (state = 1 AND visible_at > %(now)s) AND (expires_at, seq) > (%(k)s, %(q)s)"
    " ORDER BY expires_at, seq LIMIT %(room)s",
)
_PEEK_LISTED = "SELECT seq, visible_at, attempts, " + LISTED + " FROM {s}.message WHERE seq = ANY(%(seqs)s)"


def peek_rows(
    conn: psycopg.Connection, schema: str, agent: str, now: int, limit: int,
    max_body: int = 1 << 62, after: tuple[int, int, int] | None = None,
    priority: int | None = None,
) -> list[PeekRow]:
    """An agent's inbox without claiming, as the SQLite twin: ready rows first in the order a
    claim takes them, then the others by when they become claimable (lease end, due time),
    expired ones last; each with its status at ``now``, the body None when longer than
    ``max_body``, and its position; ``after`` and ``priority`` as the twin's. Call it inside
    one read transaction (its queries must see one snapshot)."""
    chosen: list[tuple[tuple[int, int, int], str]] = []
    for group, queries in enumerate((_PEEK_READY, _PEEK_WAITING, _PEEK_EXPIRED)):
        room = limit - len(chosen)
        if room <= 0:
            break
        if after is not None and group < after[0]:
            continue
        k, q = peek_start(group, after)
        params = {"agent": agent, "now": now, "room": room, "k": k, "q": q,
                  "priority": priority}
        found = sorted(row for query in queries
                       for row in conn.execute(statement(schema, query), params).fetchall())
        chosen += [((group, key, seq), status) for key, seq, status in found[:room]]
    if not chosen:
        return []
    listed = {row[0]: row[1:] for row in conn.execute(statement(schema, _PEEK_LISTED), {
        "seqs": [position[2] for position, _ in chosen], "max_body": max_body}).fetchall()}
    rows = []
    for position, status in chosen:
        *columns, body = listed[position[2]]
        values: Any = (status, *columns, None if body is None else bytes(body), position)
        rows.append(PeekRow(*values))
    return rows


_LEASES = (
    "SELECT agent, visible_at, attempts, " + LISTED + " FROM {s}.message"
    " WHERE state = 1 AND visible_at > %(now)s"
    " AND (%(agent)s::text IS NULL OR agent = %(agent)s) ORDER BY visible_at, seq LIMIT %(limit)s"
)


def lease_rows(
    conn: psycopg.Connection, schema: str, now: int, limit: int, agent: str | None = None,
    max_body: int = 1 << 62,
) -> list[LeaseRow]:
    """Leases running at ``now``, the soonest to end first, as the SQLite twin's."""
    rows = conn.execute(statement(schema, _LEASES), {
        "now": now, "limit": limit, "agent": agent, "max_body": max_body}).fetchall()
    values: list[Any] = [(*row[:-1], None if row[-1] is None else bytes(row[-1])) for row in rows]
    return [LeaseRow(*v) for v in values]


_MESSAGE_ROWS = (
    "SELECT agent, CASE state WHEN 2 THEN 'acked' WHEN 3 THEN 'dead' ELSE " + STATUS + " END,"
    " attempts, visible_at, done_at, last_error,"
    " (SELECT d.id FROM {s}.dead_letter AS d WHERE d.seq = m.seq), " + LISTED
    + " FROM {s}.message AS m WHERE message_id = %(message_id)s ORDER BY seq"
)


def message_rows(
    conn: psycopg.Connection, schema: str, message_id: str, now: int, max_body: int = 1 << 62
) -> list[MessageRow]:
    """Every recipient's row of message ``message_id`` in publish order, as the SQLite twin's."""
    rows = conn.execute(statement(schema, _MESSAGE_ROWS), {
        "message_id": message_id, "now": now, "max_body": max_body}).fetchall()
    values: list[Any] = [(*row[:-1], None if row[-1] is None else bytes(row[-1])) for row in rows]
    return [MessageRow(*v) for v in values]


def last_seq(conn: psycopg.Connection, schema: str) -> int:
    """Where a tail starts: the position (a transaction id, see :func:`rows_after`) below the
    oldest transaction still running; the tail then shows what they and later ones commit."""
    row = conn.execute(_HORIZON).fetchone()
    return int(row[0]) - 1 if row else 0


# The oldest transaction that was running when the statement's snapshot was taken and may be
# this database's, or the next id to be given when there is none: every transaction of this
# database below it has ended. The snapshot lists running ids server-wide; one that pg_locks
# shows held by a session of another database (or prepared there) cannot write our tables
# and is left out. pg_locks shows 32-bit ids, compared with the low half of the snapshot's.
_HORIZON_OF = (
    "(SELECT coalesce((SELECT min(x::text::bigint) FROM pg_snapshot_xip(c.s) AS x"
    " WHERE NOT EXISTS ("
    "SELECT 1 FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
    " WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock'"
    " AND l.transactionid::text::bigint = (x::text::bigint & 4294967295)"
    " AND a.datname <> current_database()"
    " UNION ALL SELECT 1 FROM pg_prepared_xacts AS p"
    " WHERE p.transaction::text::bigint = (x::text::bigint & 4294967295)"
    " AND p.database <> current_database())), pg_snapshot_xmax(c.s)::text::bigint)"
    " FROM (SELECT pg_current_snapshot() AS s) AS c)"
)
_HORIZON = "SELECT " + _HORIZON_OF

_AFTER = (
    "SELECT seq, agent, message_id, xact_id FROM {s}.message"
    " WHERE xact_id > %(after)s AND xact_id < " + _HORIZON_OF +
    " ORDER BY xact_id, seq LIMIT %(limit)s"
)
_OF_XACT = (
    "SELECT seq, agent, message_id, xact_id FROM {s}.message"
    " WHERE xact_id = %(xact)s ORDER BY seq"
)
_TAIL_LISTED = "SELECT seq, " + LISTED + " FROM {s}.message WHERE seq = ANY(%(seqs)s)"


def rows_after(
    conn: psycopg.Connection, schema: str, after_seq: int, limit: int, max_body: int = 1 << 62
) -> list[TailRow]:
    """Rows committed after the position ``after_seq``, by transaction then publish order:
    (position, agent, and ``LISTED``'s columns with the body None when longer than
    ``max_body``). A message's rows come together; its columns and body are read once.

    Commit order: a seq is drawn at insert, so a transaction still running may yet commit a
    row below one already visible, and a tail that followed seqs would step over it. So a
    tail's position is a transaction id (``xact_id``, which every row keeps): a call returns
    the rows of the transactions after the position and below the oldest transaction still
    running in this database, every one of which has ended, and each row's ``seq`` is the
    position to continue from (its transaction's id). A transaction's rows are never split
    between calls (one alone may exceed ``limit``). Nothing is passed over; rows of a
    transaction that ends late come late: a transaction of this database that holds an id
    (another bus's, the application's) holds the tail back until it ends.

    A tail shows; it does not deliver: receivers claim rows by state and never miss one."""
    rows = conn.execute(statement(schema, _AFTER), {"after": after_seq, "limit": limit + 1}).fetchall()
    if len(rows) > limit:  # keep the last transaction whole: leave it for the next call
        last = rows[-1][3]
        rows = [row for row in rows if row[3] != last]
        if not rows:  # one transaction alone fills the limit: all of it now
            rows = conn.execute(statement(schema, _OF_XACT), {"xact": last}).fetchall()
    firsts = [row[0] for i, row in enumerate(rows) if i == 0 or rows[i - 1][2] != row[2]]
    listed: dict[int, Any] = {}
    if firsts:
        listed = {row[0]: row[1:] for row in conn.execute(statement(schema, _TAIL_LISTED), {
            "seqs": firsts, "max_body": max_body}).fetchall()}
    result: list[TailRow] = []
    for seq, agent, message_id, xact in rows:
        if result and result[-1].message_id == message_id:
            columns = result[-1][2:]  # the columns of the message's first row
        else:
            *head, body = listed[seq]
            columns = (*head, None if body is None else bytes(body))
        result.append(TailRow(int(xact), agent, *columns))
    return result
