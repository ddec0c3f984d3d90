"""Request/response on PostgreSQL, as :mod:`sqlbus.sqlite.responses`: a requester takes its own
response by correlation id (index ``message_response``); requests that timed out are kept in
``request_timeout`` so that their late responses are discarded and counted, never handed to a
handler. In progress (issue 15): not yet behind the engine."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from ..backend import ResponseLook
from .schema import BODY, TOKEN, statement

_RESPONSE_OF = "agent = %(agent)s AND type = 'response' AND correlation_id = %(cid)s"
_FIND = (
    "SELECT " + TOKEN + ", (SELECT " + BODY + " FROM {s}.message WHERE " + _RESPONSE_OF
    + " AND state = 2 AND claims = 0 ORDER BY seq LIMIT 1),"
    " EXISTS (SELECT 1 FROM {s}.message WHERE " + _RESPONSE_OF + " AND state = 0)"
)
_FOUND_OF = "agent = %(agent)s AND type = 'response' AND correlation_id = c.cid"
_FIND_MANY = (
    "SELECT cid, body, waiting FROM (SELECT c.cid, (SELECT " + BODY + " FROM {s}.message WHERE "
    + _FOUND_OF + " AND state = 2 AND claims = 0 ORDER BY seq LIMIT 1) AS body,"
    " EXISTS (SELECT 1 FROM {s}.message WHERE " + _FOUND_OF + " AND state = 0) AS waiting"
    " FROM unnest(%(cids)s::text[]) AS c(cid)) AS found WHERE body IS NOT NULL OR waiting"
)
# SKIP LOCKED: two takers never wait on each other; the outer state test keeps a row another
# taker acked between this one's pick and its update (READ COMMITTED rechecks the row) from
# being taken twice.
_TAKE = (
    "UPDATE {s}.message SET state = 2, done_at = %(now)s, attempts = attempts + 1,"
    " claims = claims + 1 WHERE state = 0 AND seq = (SELECT seq FROM {s}.message WHERE "
    + _RESPONSE_OF + " AND state = 0 AND (expires_at IS NULL OR expires_at >= %(now)s)"
    " ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING seq, " + BODY
)
_TAKE_LATE = (
    "UPDATE {s}.message SET state = 2, done_at = %(now)s, attempts = attempts + 1,"
    " claims = claims + 1 WHERE agent = %(agent)s AND state = 0 AND type = 'response'"
    " AND correlation_id IN (SELECT correlation_id FROM {s}.request_timeout"
    " WHERE agent = %(agent)s) RETURNING correlation_id, done_at - sent_at"
)


def find_response(
    conn: psycopg.Connection, schema: str, agent: str, correlation_id: str
) -> ResponseLook:
    """A requester's look for its response, in one statement (one snapshot): (the wake-up
    token, the body of a direct reply or None, 1 when a response waits in the inbox instead),
    as the SQLite twin: a direct reply was written acked and is only read; one sent
    otherwise is taken with :func:`take_response`."""
    row = conn.execute(
        statement(schema, _FIND), {"agent": agent, "cid": correlation_id}
    ).fetchone()
    assert row is not None
    return ResponseLook(row[0], None if row[1] is None else bytes(row[1]), int(row[2]))


def find_responses(
    conn: psycopg.Connection, schema: str, agent: str, correlation_ids: Sequence[str]
) -> list[tuple[str, bytes | None, int]]:
    """:func:`find_response` for many requests of ``agent`` at once, in one statement:
    (correlation id, the body of a direct reply or None, 1 when a response waits in the
    inbox) for each id that has one."""
    rows = conn.execute(
        statement(schema, _FIND_MANY), {"agent": agent, "cids": list(correlation_ids)}
    ).fetchall()
    return [(cid, None if body is None else bytes(body), int(waiting)) for cid, body, waiting in rows]


def take_response(
    conn: psycopg.Connection, schema: str, agent: str, correlation_id: str, now: int
) -> tuple[int, bytes] | None:
    """Claim and ack in one step the oldest ready response with ``correlation_id`` in
    ``agent``'s inbox: (seq, body) or None. An expired one is left for the claim, which
    dead-letters it."""
    row = conn.execute(
        statement(schema, _TAKE), {"agent": agent, "cid": correlation_id, "now": now}
    ).fetchone()
    return None if row is None else (row[0], bytes(row[1]))


def record_request_timeout(
    conn: psycopg.Connection, schema: str, agent: str, correlation_id: str, now: int,
    keep_ms: int,
) -> None:
    """Remember that ``agent``'s request ``correlation_id`` timed out, and forget records
    older than ``keep_ms`` (their responses, if any ever come, count as unknown ones)."""
    conn.execute(statement(schema, "DELETE FROM {s}.request_timeout WHERE timed_out_at < %s"),
                 (now - keep_ms,))
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.request_timeout (agent, correlation_id, timed_out_at) VALUES (%s, %s, %s)"
        " ON CONFLICT (agent, correlation_id) DO UPDATE SET timed_out_at = excluded.timed_out_at",
    ), (agent, correlation_id, now))


def request_timed_out(conn: psycopg.Connection, schema: str, agent: str, correlation_id: str) -> bool:
    """Whether ``agent``'s request ``correlation_id`` timed out (its response is late)."""
    return conn.execute(statement(
        schema, "SELECT 1 FROM {s}.request_timeout WHERE agent = %s AND correlation_id = %s"
    ), (agent, correlation_id)).fetchone() is not None


def forget_request_timeout(
    conn: psycopg.Connection, schema: str, agent: str, correlation_id: str
) -> None:
    """Forget that ``agent``'s request ``correlation_id`` timed out."""
    conn.execute(statement(
        schema, "DELETE FROM {s}.request_timeout WHERE agent = %s AND correlation_id = %s"
    ), (agent, correlation_id))


def take_late_responses(
    conn: psycopg.Connection, schema: str, agent: str, now: int
) -> tuple[int, int]:
    """Ack (discard) the ready responses in ``agent``'s inbox whose request timed out, forget
    those timeouts, and return how many were discarded and their summed publish-to-ack time
    in ms (the caller counts them)."""
    rows = conn.execute(statement(schema, _TAKE_LATE), {"agent": agent, "now": now}).fetchall()
    if rows:
        conn.execute(statement(
            schema,
            "DELETE FROM {s}.request_timeout WHERE agent = %s AND correlation_id = ANY(%s)",
        ), (agent, [row[0] for row in rows]))
    return len(rows), sum(row[1] for row in rows)


def delivery_ms(conn: psycopg.Connection, schema: str, seq: int) -> int:
    """The publish-to-ack time in ms of the acked row ``seq`` (0: no such row, or not done)."""
    row = conn.execute(
        statement(schema, "SELECT done_at - sent_at FROM {s}.message WHERE seq = %s"), (seq,)
    ).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])
