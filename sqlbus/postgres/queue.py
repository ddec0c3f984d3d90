"""The queue on PostgreSQL: publish, claim, and how a claimed row is settled (ack, extend,
release, retry, dead letter), with the same rows, states and ``(seq, claims)`` fencing as the
SQLite backend (:mod:`sqlbus.sqlite.queue`). In progress (issue 15): not yet behind the engine.

Every function takes a psycopg connection inside the caller's transaction, the schema's name
and ``now`` in epoch ms; none reads the clock or begins a transaction. Claims lock their rows
with ``FOR UPDATE SKIP LOCKED``, so receivers of one inbox never wait on each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..backend import ACKED, DEAD, LEASED, QUEUED, SCHEDULED  # noqa: F401 - re-exported
from .schema import BODY_LENGTH, TOKEN, statement

# A held lease: the row is leased, or its lease ran out and nobody claimed it again yet.
_HELD = " WHERE seq = %(seq)s AND claims = %(claims)s AND state <= 1"


# ---------------------------------------------------------------------------------------------
# Publish

_INSERT = (
    "INSERT INTO {s}.message (message_id, sender, agent, type, correlation_id, priority, state,"
    " visible_at, expires_at, sent_at, done_at, body, body_id)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def publish(
    conn: psycopg.Connection, schema: str, messages: Sequence[Any], visible_at: Sequence[int],
    now: int,
) -> list[bool]:
    """Write messages (``encoding.Outgoing``) to their recipients' inboxes, one row each (a
    message to many recipients with its body once, in ``message_body``); as
    :func:`sqlbus.sqlite.queue.publish`, whose rules this follows: a caller-chosen id that
    exists is skipped (the result says per message whether it was written), a later
    ``visible_at`` schedules, a ``delivered`` message is written acked, TTL counts from when
    the message can first be delivered."""
    fresh: list[bool] = []
    rows: list[tuple[Any, ...]] = []
    chosen: set[str] = set()
    for message, visible in zip(messages, visible_at, strict=True):
        if message.caller_id:
            if message.id in chosen or _exists(conn, schema, message.id):
                fresh.append(False)
                continue
            chosen.add(message.id)
        fresh.append(True)
        state, done_at = (QUEUED if visible <= now else SCHEDULED), None
        if message.delivered:
            state, done_at = ACKED, now
        expires_at = visible + message.ttl if message.ttl else None
        head = (message.id, message.sender)
        tail = (message.type, message.correlation_id, message.priority)
        if not message.recipients:  # a broadcast that matched nobody: archive only
            rows.append((*head, None, *tail, ACKED, now, expires_at, now, now, message.body, None))
            continue
        body, body_id = message.body, None
        if len(message.recipients) > 1:
            body_id = conn.execute(
                statement(schema, "INSERT INTO {s}.message_body (body) VALUES (%s) RETURNING id"),
                (message.body,),
            ).fetchone()[0]  # type: ignore[index]
            body = None
        for agent in message.recipients:
            rows.append((*head, agent, *tail, state, visible, expires_at, now, done_at, body,
                         body_id))
    if len(rows) == 1:  # the commonest publish: executemany would enter and leave pipeline mode
        conn.execute(statement(schema, _INSERT), rows[0])
    elif rows:
        with conn.cursor() as cur:
            cur.executemany(statement(schema, _INSERT), rows)
    return fresh


# publish_plain's rows: one statement per run, the values the run shares bound once and each
# row's id and body from two arrays, numbered in the arrays' order.
_INSERT_RUN = (
    "INSERT INTO {s}.message (message_id, sender, agent, type, priority, state, visible_at,"
    " expires_at, sent_at, body) SELECT r.id, %(sender)s, %(agent)s, %(type)s, %(priority)s, 0,"
    " %(now)s, %(expires_at)s, %(now)s, r.body"
    " FROM unnest(%(ids)s::text[], %(bodies)s::bytea[]) WITH ORDINALITY AS r(id, body, n)"
    " ORDER BY r.n"
)


def publish_plain(
    conn: psycopg.Connection, schema: str, sender: str, runs: Sequence[Any], now: int
) -> None:
    """Write a plain batch (``messages.prepare_plain_batch``'s runs: (to, type, priority, ttl
    ms, ids, bodies)) to its recipients' inboxes, ready now: :func:`publish`'s rows without its
    per-message cases (caller ids, delays, broadcasts, direct replies), as the SQLite twin."""
    for to, type, priority, ttl, ids, bodies in runs:
        conn.execute(statement(schema, _INSERT_RUN), {
            "sender": sender, "agent": to, "type": type, "priority": priority, "now": now,
            "expires_at": now + ttl if ttl else None, "ids": list(ids), "bodies": list(bodies),
        })


def _exists(conn: psycopg.Connection, schema: str, message_id: str) -> bool:
    """Whether a caller-chosen id was published. The id is held until the transaction ends
    (an advisory lock), so two publishers of one id cannot both find it absent and both
    write it (SQLite's write lock does this for the whole file)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 (f"sqlbus id {schema} {message_id}",))
    found = conn.execute(
        statement(schema, "SELECT 1 FROM {s}.message WHERE message_id = %s LIMIT 1"), (message_id,)
    ).fetchone()
    return found is not None


# ---------------------------------------------------------------------------------------------
# Claim

# Ready rows come from two places: queued rows (message_claim, in delivery order) and rows
# whose time came (message_wait: retries and delayed messages due, leases that ran out). Each
# branch locks at most ``limit`` rows it can have (SKIP LOCKED: never waits on another
# receiver); the best ``limit`` of both are leased, the others unlocked at commit.
_CLAIM = """
WITH queued AS (
    SELECT seq, priority FROM {s}.message
    WHERE agent = %(agent)s AND state = 0{filters}
    ORDER BY priority DESC, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), due AS (
    SELECT seq, priority FROM {s}.message
    WHERE agent = %(agent)s AND state IN (1, 4) AND visible_at <= %(now)s{filters}
    ORDER BY priority DESC, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT seq FROM (SELECT * FROM queued UNION ALL SELECT * FROM due) AS ready
    ORDER BY priority DESC, seq LIMIT %(limit)s
)
UPDATE {s}.message AS m
SET state = 1, visible_at = %(lease_until)s, attempts = m.attempts + 1, claims = m.claims + 1,
    last_error = CASE WHEN m.state = 1 THEN NULL ELSE m.last_error END
FROM picked WHERE m.seq = picked.seq
RETURNING m.seq, m.claims, m.attempts, m.priority, m.expires_at, m.sent_at,
    CASE WHEN octet_length(coalesce(m.body, (SELECT body FROM {s}.message_body
                                             WHERE id = m.body_id))) <= %(max_body)s
         THEN coalesce(m.body, (SELECT body FROM {s}.message_body WHERE id = m.body_id)) END
"""
_TYPES = " AND type = ANY(%(types)s)"
_NOT_AWAITED = " AND NOT (type = 'response' AND correlation_id = ANY(%(skip)s))"


def claim(
    conn: psycopg.Connection,
    schema: str,
    agent: str,
    now: int,
    lease_until: int,
    limit: int,
    types: Sequence[str] | None = None,
    skip: Sequence[str] | None = None,
    max_body: int = 1 << 62,
) -> tuple[list[tuple[Any, ...]], bool]:
    """Lease up to ``limit`` ready rows of ``agent``, highest priority first, then FIFO, as
    :func:`sqlbus.sqlite.queue.claim`: rows (seq, claims, attempts, priority, expires_at,
    sent_at, body) in delivery order, ``body`` None above ``max_body`` bytes. The second
    value says more rows may be ready (a full batch: a hint, not a promise, as on SQLite's
    side a receiver uses it only to skip a read before its next claim)."""
    filters = (_TYPES if types is not None else "") + (_NOT_AWAITED if skip is not None else "")
    params = {"agent": agent, "now": now, "lease_until": lease_until, "limit": limit,
              "max_body": max_body, "types": list(types or ()), "skip": list(skip or ())}
    rows = conn.execute(statement(schema, _CLAIM.replace("{filters}", filters)), params).fetchall()
    rows.sort(key=lambda row: (-row[3], row[0]))  # RETURNING keeps no order
    return rows, len(rows) == limit


def next_due(conn: psycopg.Connection, schema: str, agent: str) -> int | None:
    """Earliest time (ms) one of ``agent``'s leased or scheduled rows becomes ready; None."""
    row = conn.execute(
        statement(schema, "SELECT min(visible_at) FROM {s}.message WHERE agent = %s AND state IN (1, 4)"),
        (agent,),
    ).fetchone()
    return None if row is None else row[0]


_NEXT_DUE = "(SELECT min(visible_at) FROM {s}.message WHERE agent = %(agent)s AND state IN (1, 4))"
_LOOK = (
    "SELECT " + TOKEN + ", EXISTS (SELECT 1 FROM {s}.message WHERE agent = %(agent)s AND state = 0"
    "{filters}) OR EXISTS (SELECT 1 FROM {s}.message WHERE agent = %(agent)s AND state IN (1, 4)"
    " AND visible_at <= %(now)s{filters}), " + _NEXT_DUE
)
_WAIT_POINT = "SELECT " + TOKEN + ", " + _NEXT_DUE


def look(
    conn: psycopg.Connection, schema: str, agent: str, now: int,
    types: Sequence[str] | None = None, skip: Sequence[str] | None = None,
) -> tuple[int, bool, int | None]:
    """What a receiver that may wait reads before it claims, in one statement (one snapshot,
    no lock): (the wake-up token, whether a claim with the same arguments would find
    something, when the agent's next scheduled or leased row comes due in ms, or None). The
    token (``schema.TOKEN``) changes when a writing transaction commits after this read."""
    filters = (_TYPES if types is not None else "") + (_NOT_AWAITED if skip is not None else "")
    row = conn.execute(statement(schema, _LOOK.replace("{filters}", filters)), {
        "agent": agent, "now": now, "types": list(types or ()), "skip": list(skip or ()),
    }).fetchone()
    assert row is not None
    return row[0], bool(row[1]), row[2]


def wait_point(conn: psycopg.Connection, schema: str, agent: str) -> tuple[int, int | None]:
    """What a wait needs, read by a claim that found nothing, in its transaction: (the wake-up
    token, when the agent's next scheduled or leased row comes due in ms, or None)."""
    row = conn.execute(statement(schema, _WAIT_POINT), {"agent": agent}).fetchone()
    assert row is not None
    return row[0], row[1]


# ---------------------------------------------------------------------------------------------
# Settling a claimed row


def ack(conn: psycopg.Connection, schema: str, leases: Sequence[tuple[int, int]], now: int) -> bool:
    """Mark leased rows acked, given as (seq, claims); False when any lease is gone (the
    caller rolls the whole transaction back: a batch ack is all or nothing)."""
    done = conn.execute(
        statement(schema, "UPDATE {s}.message AS m SET state = 2, done_at = %s"
                      " FROM unnest(%s::bigint[], %s::integer[]) AS l(seq, claims)"
                      " WHERE m.seq = l.seq AND m.claims = l.claims AND m.state <= 1"),
        (now, [seq for seq, _ in leases], [claims for _, claims in leases]),
    )
    return done.rowcount == len(leases)


def acked_now(conn: psycopg.Connection, schema: str, seq: int, claims: int, now: int) -> bool:
    """Whether this transaction's ack took the lease (seq, claims) (see the SQLite twin)."""
    return conn.execute(
        statement(schema, "SELECT 1 FROM {s}.message WHERE seq = %s AND claims = %s AND state = 2"
                      " AND done_at = %s"), (seq, claims, now),
    ).fetchone() is not None


def extend(conn: psycopg.Connection, schema: str, seq: int, claims: int, lease_until: int) -> bool:
    """Move a held lease's deadline; False when that lease is gone."""
    done = conn.execute(
        statement(schema, "UPDATE {s}.message SET state = 1, visible_at = %(until)s" + _HELD),
        {"until": lease_until, "seq": seq, "claims": claims},
    )
    return done.rowcount == 1


def release(
    conn: psycopg.Connection, schema: str, seq: int, claims: int, now: int, *,
    attempted: bool = True, last_error: str | None = None,
) -> bool:
    """Give a held lease back, ready now (``attempted=False`` takes back the claim's attempt
    and keeps the error of the attempt before); as the SQLite twin."""
    done = conn.execute(
        statement(schema, "UPDATE {s}.message SET state = 0, visible_at = %(now)s,"
                      " attempts = attempts - %(back)s,"
                      " last_error = CASE WHEN %(back)s = 1 THEN last_error ELSE %(error)s END"
                      + _HELD),
        {"now": now, "back": 0 if attempted else 1, "error": last_error, "seq": seq,
         "claims": claims},
    )
    return done.rowcount == 1


def retry(
    conn: psycopg.Connection, schema: str, seq: int, claims: int, due_at: int,
    last_error: str | None,
) -> bool:
    """Schedule a leased row for another attempt at ``due_at``; False when the lease is gone."""
    done = conn.execute(
        statement(schema, "UPDATE {s}.message SET state = 4, visible_at = %(due)s,"
                      " last_error = %(error)s" + _HELD),
        {"due": due_at, "error": last_error, "seq": seq, "claims": claims},
    )
    return done.rowcount == 1


def dead_letter(
    conn: psycopg.Connection,
    schema: str,
    seq: int,
    claims: int | None,
    now: int,
    reason: str,
    error_name: str | None = None,
    error_message: str | None = None,
    traceback: str | None = None,
    context_json: str | None = None,
    attempts: int | None = None,
    failed_at: int | None = None,
) -> bool:
    """Move a queued or leased row to dead letters; False when that lease (or row) is gone.
    ``claims=None`` retires the row whatever its lease; as the SQLite twin."""
    row = conn.execute(
        statement(schema, "UPDATE {s}.message SET state = 3, done_at = %(now)s WHERE seq = %(seq)s"
                      " AND state <= 1 AND (%(claims)s::integer IS NULL OR claims = %(claims)s)"
                      " RETURNING attempts"),
        {"now": now, "seq": seq, "claims": claims},
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        statement(schema, "INSERT INTO {s}.dead_letter (seq, reason, error_name, error_message,"
                      " traceback, context, failed_at, attempts)"
                      " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"),
        (seq, reason, error_name, error_message, traceback, context_json,
         now if failed_at is None else failed_at, row[0] if attempts is None else attempts),
    )
    return True


def count_error(conn: psycopg.Connection, schema: str, name: str) -> None:
    """Count one failure of exception ``name``."""
    conn.execute(
        statement(schema, "INSERT INTO {s}.error_counts (name, count) VALUES (%s, 1)"
                      " ON CONFLICT (name) DO UPDATE SET count = {s}.error_counts.count + 1"),
        (name,),
    )


def last_error(conn: psycopg.Connection, schema: str, seq: int) -> str | None:
    """The recorded error of a row's last attempt ("Name: text"), or None."""
    row = conn.execute(
        statement(schema, "SELECT last_error FROM {s}.message WHERE seq = %s"), (seq,)
    ).fetchone()
    return None if row is None else row[0]


def body_length(conn: psycopg.Connection, schema: str, seq: int) -> int:
    """The stored length of a row's body in bytes (0: no such row), without reading it out."""
    row = conn.execute(
        statement(schema, "SELECT " + BODY_LENGTH + " FROM {s}.message WHERE seq = %s"), (seq,)
    ).fetchone()
    return 0 if row is None else int(row[0])
