"""What operators and listings read and do: the agents registry and their interests, dead
letters (list, requeue, purge), the sent archive, and an inbox's or the whole bus's rows
without claiming them (peek, tail)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from ..backend import (
    AgentRow,
    DeadLetterRow,
    InterestRow,
    LeaseRow,
    MessageRow,
    PeekRow,
    RequeueTarget,
    SentRow,
    TailRow,
    peek_start,
)
from ..errors import DatabaseError
from .connection import Connection
from .retention import add_counters, retire_rows
from .schema import BODY, BODY_LENGTH, LISTED, STATUS, WAITING

# ---------------------------------------------------------------------------------------------
# Agents


def register_agent(conn: apsw.Connection, agent: str, now: int) -> None:
    """Add ``agent`` to the registry, or mark it active and seen now."""
    conn.execute(
        "INSERT INTO agents (id, registered_at, last_seen, status) VALUES (?, ?, ?, 'active') "
        "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, status = 'active'",
        (agent, now, now),
    )


def touch_agent(conn: Connection, agent: str, now: int, status: str | None = None) -> None:
    """Record that ``agent`` was seen at ``now`` (never earlier than already recorded)."""
    conn.cur.execute(
        "UPDATE agents SET last_seen = max(last_seen, ?), status = coalesce(?, status) WHERE id = ?",
        (now, status, agent),
    )


def list_agents(conn: apsw.Connection) -> list[AgentRow]:
    """(id, registered_at, last_seen, status) of every agent, by id."""
    return [AgentRow(*row) for row in conn.execute(
        "SELECT id, registered_at, last_seen, status FROM agents ORDER BY id"
    )]


def agent_ids(conn: apsw.Connection) -> list[str]:
    """The ids of every registered agent, sorted."""
    return [row[0] for row in conn.execute("SELECT id FROM agents ORDER BY id")]


# ---------------------------------------------------------------------------------------------
# Interests (subscriptions)


def add_interest(conn: apsw.Connection, agent: str, kind: str, pattern: str, now: int) -> None:
    """Record ``agent``'s interest; one already recorded keeps its ``subscribed_at``."""
    conn.execute(
        "INSERT INTO interest (kind, pattern, agent, subscribed_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (kind, pattern, agent, now),
    )


def drop_interest(conn: apsw.Connection, agent: str, kind: str, pattern: str) -> None:
    """Forget one of ``agent``'s interests."""
    conn.execute(
        "DELETE FROM interest WHERE kind = ? AND pattern = ? AND agent = ?", (kind, pattern, agent)
    )


def list_interests(conn: apsw.Connection, agent: str | None = None) -> list[InterestRow]:
    """(agent, kind, pattern, subscribed_at) of ``agent``'s interests, or of every agent's
    (None), by agent, kind and pattern."""
    return [InterestRow(*row) for row in conn.execute(
        "SELECT agent, kind, pattern, subscribed_at FROM interest"
        " WHERE ?1 IS NULL OR agent = ?1 ORDER BY agent, kind, pattern",
        (agent,),
    )]


def interested_in_type(conn: Connection, type: str, sender: str) -> list[str]:
    """The agents but ``sender`` interested in messages of ``type`` (or ``*``), by id."""
    return [row[0] for row in conn.cur.execute(
        "SELECT DISTINCT agent FROM interest WHERE kind = 'type' AND pattern IN (?1, '*')"
        " AND agent <> ?2 ORDER BY agent",
        (type, sender),
    )]


def event_interests(conn: Connection, sender: str) -> list[tuple[str, str | None]]:
    """(agent, pattern) of every interest in events of the agents but ``sender``: each
    event-name pattern (for the caller to match), grouped by pattern, then (pattern None)
    each interest in the types ``event`` and ``*``. An agent may come more than once.

    Two range reads of the primary key and no sort: grouped by pattern, the caller matches
    each pattern once, however many agents share it."""
    return conn.cur.execute(
        "SELECT agent, pattern FROM interest WHERE kind = 'event' AND agent <> ?1"
        " UNION ALL SELECT agent, NULL FROM interest WHERE kind = 'type'"
        " AND pattern IN ('event', '*') AND agent <> ?1",
        (sender,),
    ).fetchall()


# ---------------------------------------------------------------------------------------------
# Dead letters

# ?3 is the reader's limit on a body's stored length: a longer body is not read (NULL), and the
# message's own columns stand in for it.
_DEAD = (
    "SELECT d.id, m.agent, d.reason, d.error_name, d.error_message, d.traceback, d.context,"
    f" d.failed_at, d.attempts, CASE WHEN {BODY_LENGTH} <= ?3 THEN {BODY} END, m.message_id,"
    f" m.sender, m.type, m.priority, m.sent_at, {BODY_LENGTH}"
    " FROM dead_letter AS d JOIN message AS m ON m.seq = d.seq"
)


def list_dead_letters(
    conn: apsw.Connection, agent: str | None, limit: int, max_body: int = 1 << 62,
    reason: str | None = None, before: int | None = None,
) -> list[DeadLetterRow]:
    """Dead letters, newest first, the body None when longer than ``max_body``; ``agent``
    and ``reason`` keep those (None: any), ``before`` those numbered below it (a page after
    the one that ended there: the walk goes down the primary key, never an OFFSET)."""
    return [DeadLetterRow(*row) for row in conn.execute(
        f"{_DEAD} WHERE (?1 IS NULL OR m.agent = ?1) AND (?4 IS NULL OR d.reason = ?4)"
        " AND (?5 IS NULL OR d.id < ?5) ORDER BY d.id DESC LIMIT ?2",
        (agent, limit, max_body, reason, before),
    )]


def get_dead_letter(
    conn: apsw.Connection, dead_letter_id: int | None, message_id: str | None = None,
    max_body: int = 1 << 62,
) -> DeadLetterRow | None:
    """A dead letter by number, or the newest of message ``message_id``'s (as
    :func:`list_dead_letters`), or None."""
    rows: list[Any] = conn.execute(
        f"{_DEAD} WHERE d.id = ?1 AND ?2 IS NULL"
        if dead_letter_id is not None else
        f"{_DEAD} WHERE m.message_id = ?2 ORDER BY d.id DESC LIMIT 1",
        (dead_letter_id, message_id, max_body),
    ).fetchall()
    return DeadLetterRow(*rows[0]) if rows else None


# A message's ttl, read in SQL so that requeueing never loads a body (which may be large or
# damaged): None when the body is not valid JSON.
# A shared body's ttl is read once per message (_with_ttls), not once per recipient's row.
_REQUEUE_TARGET = (
    "SELECT d.id, m.message_id, m.body_id, CASE WHEN length(m.body) THEN"
    " CASE WHEN json_valid(CAST(m.body AS TEXT))"
    " THEN json_extract(CAST(m.body AS TEXT), '$.headers.ttl') END END"
    " FROM dead_letter AS d JOIN message AS m ON m.seq = d.seq"
)
_SHARED_TTL = (
    "SELECT CASE WHEN json_valid(CAST(body AS TEXT))"
    " THEN json_extract(CAST(body AS TEXT), '$.headers.ttl') END FROM message_body WHERE id = ?"
)


def _with_ttls(conn: apsw.Connection, rows: Sequence[tuple[Any, ...]]) -> list[RequeueTarget]:
    """``_REQUEUE_TARGET``'s rows as (id, message_id, ttl or None)."""
    shared: dict[int, Any] = {}
    result = []
    for dead_letter_id, message_id, body_id, ttl in rows:
        if body_id is not None:
            if body_id not in shared:
                found = conn.execute(_SHARED_TTL, (body_id,)).fetchall()
                shared[body_id] = found[0][0] if found else None
            ttl = shared[body_id]
        result.append(RequeueTarget(dead_letter_id, message_id, ttl))
    return result


def requeue_targets(
    conn: apsw.Connection, dead_letter_id: int | None, message_id: str | None
) -> list[RequeueTarget]:
    """(id, message_id, ttl or None) of the dead letter numbered ``dead_letter_id``, or of
    every dead letter of message ``message_id``, oldest first."""
    if dead_letter_id is not None:
        rows = conn.execute(f"{_REQUEUE_TARGET} WHERE d.id = ?", (dead_letter_id,)).fetchall()
    else:
        rows = conn.execute(
            f"{_REQUEUE_TARGET} WHERE m.message_id = ? ORDER BY d.id", (message_id,)
        ).fetchall()
    return _with_ttls(conn, rows)


def dead_letter_ids(
    conn: apsw.Connection, agent: str | None, reason: str | None
) -> list[RequeueTarget]:
    """(id, message_id, ttl or None) of the dead letters of ``agent`` with ``reason`` (None:
    any), oldest first (see :func:`requeue_targets`)."""
    return _with_ttls(conn, conn.execute(
        f"{_REQUEUE_TARGET} WHERE (?1 IS NULL OR m.agent = ?1) AND (?2 IS NULL OR d.reason = ?2)"
        " ORDER BY d.id",
        (agent, reason),
    ).fetchall())


def requeue(conn: apsw.Connection, dead_letter_id: int, now: int, ttl_ms: int) -> bool:
    """Queue a dead letter's row again, attempts reset and TTL counted from now (``ttl_ms``
    0 = never expires), and drop the dead-letter record. False when there is no such record."""
    rows = conn.execute(
        "DELETE FROM dead_letter WHERE id = ? RETURNING seq, reason", (dead_letter_id,)
    ).fetchall()
    if not rows:
        return False
    requeued = conn.execute(
        "UPDATE message SET state = 0, attempts = 0, visible_at = ?1, done_at = NULL,"
        " expires_at = CASE WHEN ?2 > 0 THEN ?1 + ?2 END WHERE seq = ?3 RETURNING agent",
        (now, ttl_ms, rows[0][0]),
    ).fetchall()
    # The move to dead letters still happened: keep it in the totals (metrics).
    agent = requeued[0][0] if requeued else None
    if agent is not None:
        add_counters(conn, [("dead", agent, 1)] + ([("expired", agent, 1)] if rows[0][1] == "expired" else []))
    return True


def purge_dead_letters(conn: apsw.Connection, older_than: int | None) -> int:
    """Delete dead letters (and their rows) that failed before ``older_than`` ms (None = all)."""
    dead = conn.execute(
        "DELETE FROM dead_letter WHERE ?1 IS NULL OR failed_at < ?1 RETURNING seq, reason",
        (older_than,),
    ).fetchall()
    retire_rows(conn, dead)  # keeps their counts in the metrics' totals
    return len(dead)


# ---------------------------------------------------------------------------------------------
# The sent archive, peek and tail


def list_sent(
    conn: apsw.Connection, agent: str | None, limit: int, max_body: int = 1 << 62
) -> list[SentRow]:
    """Archived messages, newest first: (recipients, and :data:`LISTED`'s columns with the
    body None when longer than ``max_body``); ``agent`` keeps those sent by or to it."""
    if agent is None:
        cursor = conn.execute("SELECT message_id FROM message ORDER BY seq DESC")
    else:
        cursor = conn.execute(
            "SELECT message_id FROM message WHERE sender = ?1 OR agent = ?1 ORDER BY seq DESC",
            (agent,),
        )
    ids: list[str] = []
    for (message_id,) in cursor:
        if not ids or ids[-1] != message_id:
            if message_id in ids:
                continue
            if len(ids) == limit:
                break
            ids.append(message_id)
    result = []
    for message_id in ids:
        rows: list[Any] = conn.execute(
            "SELECT agent, sent_at, seq FROM message WHERE message_id = ? ORDER BY seq",
            (message_id,),
        ).fetchall()
        if not rows:  # the message_id index names a row the table lacks
            raise DatabaseError(
                f"the file is corrupt: message {message_id!r} is in an index but not in its table; "
                "run 'sqlbus check' and restore from a 'sqlbus backup'"
            )
        recipients = [row[0] for row in rows if row[0] is not None]
        listed: Any = conn.execute(
            f"SELECT {LISTED} FROM message WHERE seq = ?1", (rows[0][2], max_body)
        ).fetchall()[0]
        result.append(SentRow(recipients, *listed))
    return result


_LIVE = " AND (expires_at IS NULL OR expires_at >= ?1)"
# Every peek query takes (now, agent, room, ?4, ?5, priority or None): ?4 and ?5 are where
# the page starts within the query's group (see peek_rows), ?6 keeps one priority.
_PEEK_INBOX = " FROM message WHERE agent = ?2 AND (?6 IS NULL OR priority = ?6) AND "
_PEEK_READY = (  # (-priority, seq): receive's order; ?4 a priority, ?5 a seq within it
    # the rest of priority ?4, then the lower priorities: each a seek in message_claim
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state = 0 AND priority = ?4 AND seq > ?5"
    + _LIVE + " ORDER BY seq LIMIT ?3",
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state = 0 AND priority < ?4" + _LIVE
    + " ORDER BY priority DESC, seq LIMIT ?3",
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + WAITING + " AND visible_at <= ?1"
    + _LIVE + " AND (priority < ?4 OR (priority = ?4 AND seq > ?5))"
    " ORDER BY priority DESC, seq LIMIT ?3",
)
_PEEK_WAITING = (  # by when they become claimable; after (?4, ?5) = (visible_at, seq)
    f"SELECT visible_at, seq, {STATUS}" + _PEEK_INBOX + WAITING + " AND visible_at > ?1"
    " AND (state = 1 OR expires_at IS NULL OR expires_at >= ?1) AND (visible_at, seq) > (?4, ?5)"
    " ORDER BY visible_at, seq LIMIT ?3",
)
_PEEK_EXPIRED = (  # by when they expired; after (?4, ?5) = (expires_at, seq)
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + "state = 0 AND expires_at < ?1"
    " AND (expires_at, seq) > (?4, ?5) ORDER BY expires_at, seq LIMIT ?3",
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + WAITING + " AND expires_at < ?1"
    " AND NOT (state = 1 AND visible_at > ?1) AND (expires_at, seq) > (?4, ?5)"
    " ORDER BY expires_at, seq LIMIT ?3",
)
PEEK_GROUPS = (_PEEK_READY, _PEEK_WAITING, _PEEK_EXPIRED)


def peek_rows(
    conn: apsw.Connection, agent: str, now: int, limit: int, max_body: int = 1 << 62,
    after: tuple[int, int, int] | None = None, priority: int | None = None,
) -> list[PeekRow]:
    """An agent's inbox without claiming: (status, visible_at, attempts, and
    :data:`LISTED`'s columns with the body None when longer than ``max_body``, then the row's
    position), the status as ``STATUS`` names it at ``now``. Ready rows come first in the
    order a claim takes them, then the others by when they become claimable (lease end, due
    time), expired ones last. A position is (group, key in the group's order, seq): with
    ``after``, the rows after that one (each group a seek in its index, never an OFFSET);
    ``priority`` keeps one priority. A group is read only while ``limit`` is not reached (the
    ready rows of a long queue from the head of its index), and bodies only of the rows
    listed. Call it inside one read transaction."""
    chosen: list[tuple[tuple[int, int, int], str]] = []
    for group, queries in enumerate(PEEK_GROUPS):
        room = limit - len(chosen)
        if room <= 0:
            break
        if after is not None and group < after[0]:
            continue
        params = (now, agent, room, *peek_start(group, after), priority)
        found = sorted(row for sql in queries for row in conn.execute(sql, params))
        chosen += [((group, key, seq), status) for key, seq, status in found[:room]]
    rows = []
    for position, status in chosen:
        listed: Any = conn.execute(
            f"SELECT visible_at, attempts, {LISTED} FROM message WHERE seq = ?1",
            (position[2], max_body),
        ).fetchall()[0]
        values: Any = (status, *listed, position)
        rows.append(PeekRow(*values))
    return rows


def lease_rows(
    conn: apsw.Connection, now: int, limit: int, agent: str | None = None,
    max_body: int = 1 << 62,
) -> list[LeaseRow]:
    """Leases running at ``now``, the soonest to end first (of ``agent``'s inbox, or all):
    read from message_wait, which holds only leased and scheduled rows."""
    return [LeaseRow(*row) for row in conn.execute(
        f"SELECT agent, visible_at, attempts, {LISTED} FROM message WHERE {WAITING}"
        " AND state = 1 AND visible_at > ?1 AND (?3 IS NULL OR agent = ?3)"
        " ORDER BY visible_at, seq LIMIT ?4",
        (now, max_body, agent, limit),
    )]


def message_rows(
    conn: apsw.Connection, message_id: str, now: int, max_body: int = 1 << 62
) -> list[MessageRow]:
    """Every recipient's row of message ``message_id`` in publish order (by its index): the
    status at ``now`` as ``STATUS`` names it, or acked or dead, and the dead letter's number."""
    return [MessageRow(*row) for row in conn.execute(
        f"SELECT agent, CASE state WHEN 2 THEN 'acked' WHEN 3 THEN 'dead' ELSE {STATUS} END,"
        " attempts, visible_at, done_at, last_error,"
        f" (SELECT id FROM dead_letter WHERE dead_letter.seq = message.seq), {LISTED}"
        " FROM message WHERE message_id = ?3 ORDER BY seq",
        (now, max_body, message_id),
    )]


def last_seq(conn: apsw.Connection) -> int:
    """The newest row's seq (0 when empty): where a tail starts."""
    return conn.execute("SELECT coalesce(max(seq), 0) FROM message").fetchall()[0][0]


def rows_after(
    conn: apsw.Connection, after_seq: int, limit: int, max_body: int = 1 << 62
) -> list[TailRow]:
    """Rows published after ``after_seq``, in publish order: (seq, agent, and
    :data:`LISTED`'s columns with the body None when longer than ``max_body``). A message's
    rows come together (the last message is left for the next call rather than cut, unless it
    alone fills ``limit``); its columns and body are read once, for the first of them."""
    rows: list[Any] = conn.execute(
        "SELECT seq, agent, message_id FROM message WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    if len(rows) == limit:
        # Rows of one message are written together; keep the last message whole.
        last_id = rows[-1][2]
        trimmed = [row for row in rows if row[2] != last_id]
        if trimmed:
            rows = trimmed
    result: list[TailRow] = []
    listed: Any
    for seq, agent, message_id in rows:
        if result and result[-1].message_id == message_id:
            listed = result[-1][2:]  # the columns of the message's first row
        else:
            listed = conn.execute(
                f"SELECT {LISTED} FROM message WHERE seq = ?1", (seq, max_body)
            ).fetchall()[0]
        result.append(TailRow(seq, agent, *listed))
    return result
