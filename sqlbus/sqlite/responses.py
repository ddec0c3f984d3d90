"""Request/response: a requester takes its own response by correlation id (index
message_response), and a run loop of the same agent in the same process skips responses that
a local request awaits, so the loop never steals them. Requests that timed out are remembered
in request_timeout so that their late responses are discarded and counted instead of reaching
a handler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw
import msgspec

from ..backend import ResponseLook
from .connection import Connection
from .schema import BINARY, BODY

_encode_ids = msgspec.json.Encoder().encode
_RESPONSE_OF = f"agent = ?1{BINARY} AND type = 'response' AND correlation_id = ?2{BINARY}"
_RESPONSE_WHERE = _RESPONSE_OF + " AND state = 0"  # queued is ready (as in a claim: queue.py)


def find_response(conn: Connection, agent: str, correlation_id: str) -> ResponseLook:
    """A requester's look for its response, in one read: (``data_version`` to wait on, the
    body of a direct reply or None, 1 when a response waits in the inbox instead).

    A direct reply (the request had ``direct_reply``) was written as delivered by the
    responder's ack, so the requester only reads it; one sent otherwise waits in the inbox
    and is taken with :func:`take_response`. ``data_version`` comes from the same snapshot,
    so a reply committed after this look changes it.
    """
    rows: list[Any] = conn.cur.execute(
        "SELECT (SELECT data_version FROM pragma_data_version()),"
        f" (SELECT {BODY} FROM message WHERE {_RESPONSE_OF} AND state = 2 AND claims = 0"
        " ORDER BY seq LIMIT 1),"
        f" EXISTS (SELECT 1 FROM message WHERE {_RESPONSE_WHERE})",
        (agent, correlation_id),
    ).fetchall()
    return ResponseLook(*rows[0])


# find_responses: the two looks of find_response for each correlation id of a JSON list (?2),
# in one statement.
_FOUND_OF = f"agent = ?1{BINARY} AND type = 'response' AND correlation_id = j.value{BINARY}"
_FIND_MANY = (
    "SELECT j.value,"
    f" (SELECT {BODY} FROM message WHERE {_FOUND_OF} AND state = 2 AND claims = 0"
    " ORDER BY seq LIMIT 1),"
    f" EXISTS (SELECT 1 FROM message WHERE {_FOUND_OF} AND state = 0)"
    " FROM json_each(?2) AS j"
)


def find_responses(
    conn: Connection, agent: str, correlation_ids: Sequence[str]
) -> list[tuple[str, bytes | None, int]]:
    """:func:`find_response` for many requests of ``agent`` at once, in one read:
    (correlation id, the body of a direct reply or None, 1 when a response waits in the inbox
    instead) for each of ``correlation_ids`` that has one."""
    rows = conn.cur.execute(_FIND_MANY, (agent, _encode_ids(list(correlation_ids)).decode()))
    # the ids with nothing are left out here: a WHERE on the subqueries' columns would run them twice
    return [(cid, body, waiting) for cid, body, waiting in rows if body is not None or waiting]


def take_response(
    conn: Connection, agent: str, correlation_id: str, now: int
) -> tuple[int, bytes] | None:
    """Claim and ack in one step the oldest ready response with ``correlation_id`` in
    ``agent``'s inbox; returns (seq, body) or None. An expired one is left for the claim,
    which dead-letters it."""
    rows = conn.cur.execute(
        "UPDATE message SET state = 2, done_at = ?3, attempts = attempts + 1,"
        f" claims = claims + 1 WHERE seq = (SELECT seq FROM message WHERE {_RESPONSE_WHERE}"
        " AND (expires_at IS NULL OR expires_at >= ?3) ORDER BY seq LIMIT 1)"
        f" RETURNING seq, {BODY}",
        (agent, correlation_id, now),
    ).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None


def record_request_timeout(
    conn: apsw.Connection, agent: str, correlation_id: str, now: int, keep_ms: int
) -> None:
    """Remember that ``agent``'s request ``correlation_id`` timed out, and forget records
    older than ``keep_ms`` (their responses, if any ever come, count as unknown ones)."""
    conn.execute("DELETE FROM request_timeout WHERE timed_out_at < ?", (now - keep_ms,))
    conn.execute(
        "INSERT OR REPLACE INTO request_timeout (agent, correlation_id, timed_out_at)"
        " VALUES (?, ?, ?)",
        (agent, correlation_id, now),
    )


def request_timed_out(conn: Connection, agent: str, correlation_id: str) -> bool:
    """Whether ``agent``'s request ``correlation_id`` timed out (its response is late)."""
    return bool(
        conn.cur.execute(
            "SELECT 1 FROM request_timeout WHERE agent = ? AND correlation_id = ?",
            (agent, correlation_id),
        ).fetchall()
    )


def forget_request_timeout(conn: apsw.Connection, agent: str, correlation_id: str) -> None:
    """Forget that ``agent``'s request ``correlation_id`` timed out."""
    conn.execute(
        "DELETE FROM request_timeout WHERE agent = ? AND correlation_id = ?",
        (agent, correlation_id),
    )


def take_late_responses(conn: apsw.Connection, agent: str, now: int) -> tuple[int, int]:
    """Ack (discard) the ready responses in ``agent``'s inbox whose request timed out, forget
    those timeouts and return how many were discarded and their total publish-to-ack time in
    ms (the caller counts them)."""
    rows = conn.execute(
        "UPDATE message SET state = 2, done_at = ?2, attempts = attempts + 1,"
        " claims = claims + 1 WHERE seq IN (SELECT seq FROM message WHERE agent = ?1"
        " AND state = 0 AND type = 'response' AND correlation_id IN"
        " (SELECT correlation_id FROM request_timeout WHERE agent = ?1))"
        " RETURNING correlation_id, done_at - sent_at",
        (agent, now),
    ).fetchall()
    conn.executemany(
        "DELETE FROM request_timeout WHERE agent = ? AND correlation_id = ?",
        [(agent, row[0]) for row in rows],
    )
    return len(rows), sum(row[1] for row in rows)


def delivery_ms(conn: apsw.Connection, seq: int) -> int:
    """The publish-to-ack time (ms) of the acked row ``seq``."""
    rows = conn.execute("SELECT done_at - sent_at FROM message WHERE seq = ?", (seq,)).fetchall()
    return rows[0][0] if rows and rows[0][0] is not None else 0
