"""The figures metrics, stats and check report on PostgreSQL, read from the rows themselves, as
:mod:`sqlbus.sqlite.stats`: depths of inboxes, what was acked and sent, dead letters by
reason, failures by exception, the counters, and the checks of a damaged bus. In progress
(issue 15): not yet behind the engine.

Sums are cast to ``bigint`` (``sum(bigint)`` is ``numeric``, read as ``Decimal``)."""

from __future__ import annotations

from typing import Any

import psycopg

from ..backend import AckedRow, CounterRow, DepthRow
from .schema import BODY_LENGTH, STATUS, statement

_INBOX_STATES = ("ready", "leased", "retrying", "scheduled", "expired")
# Queued rows (message_claim) and waiting ones (message_wait), each by its partial index's
# WHERE, never the archive.
_DEPTH = (
    "SELECT agent, " + STATUS + " AS status, count(*), min(sent_at) FROM {s}.message"
    " WHERE agent IS NOT NULL AND (state = 0 OR state IN (1, 4)) GROUP BY agent, status"
)
_DEAD_BY_AGENT = (
    "SELECT m.agent, count(*) FROM {s}.dead_letter AS d JOIN {s}.message AS m ON m.seq = d.seq"
    " WHERE m.agent IS NOT NULL GROUP BY m.agent"
)
_ACKED = (
    "SELECT agent, count(*), sum(done_at - sent_at)::bigint,"
    " count(*) FILTER (WHERE done_at > %(now)s - 1000),"
    " count(*) FILTER (WHERE done_at > %(now)s - 60000)"
    ' FROM {s}.message WHERE state = 2 AND agent IS NOT NULL GROUP BY agent ORDER BY agent COLLATE "C"'
)


def depth_rows(conn: psycopg.Connection, schema: str, now: int) -> list[DepthRow]:
    """Per recipient: (agent, ready, leased, retrying, scheduled, expired, dead, sent_at of the
    oldest ready row or None), every row counted once, in the state ``STATUS`` gives it.
    Call it inside one read transaction: its two queries must see one snapshot."""
    depths: dict[str, list[Any]] = {}

    def entry(agent: str) -> list[Any]:
        return depths.setdefault(agent, [0, 0, 0, 0, 0, 0, None])

    for agent, status, count, oldest in conn.execute(statement(schema, _DEPTH), {"now": now}):
        e = entry(agent)
        e[_INBOX_STATES.index(status)] += count
        if status == "ready":
            e[6] = oldest if e[6] is None else min(e[6], oldest)
    for agent, dead in conn.execute(statement(schema, _DEAD_BY_AGENT)):
        entry(agent)[5] = dead
    return [DepthRow(agent, *depths[agent]) for agent in sorted(depths)]


def acked_rows(conn: psycopg.Connection, schema: str, now: int) -> list[AckedRow]:
    """Per recipient: (agent, acked, sum of done_at - sent_at in ms, acked in the last
    second, acked in the last minute), by agent."""
    rows = conn.execute(statement(schema, _ACKED), {"now": now}).fetchall()
    return [AckedRow(*row) for row in rows]


def sent_rows(conn: psycopg.Connection, schema: str) -> list[tuple[str, int]]:
    """Per sender: (sender, messages sent), one per message id however many recipients."""
    rows = conn.execute(statement(
        schema, "SELECT sender, count(DISTINCT message_id) FROM {s}.message GROUP BY sender"
    )).fetchall()
    return [(row[0], row[1]) for row in rows]


def dead_reason_rows(conn: psycopg.Connection, schema: str) -> list[tuple[str, int]]:
    """(reason, dead letters) for the dead letters kept now."""
    rows = conn.execute(statement(
        schema, "SELECT reason, count(*) FROM {s}.dead_letter GROUP BY reason"
    )).fetchall()
    return [(row[0], row[1]) for row in rows]


def error_count_rows(conn: psycopg.Connection, schema: str) -> list[tuple[str, int]]:
    """(exception name, failures) since the bus was made, by name."""
    rows = conn.execute(statement(
        schema, 'SELECT name, count FROM {s}.error_counts ORDER BY name COLLATE "C"'
    )).fetchall()
    return [(row[0], row[1]) for row in rows]


def read_counters(conn: psycopg.Connection, schema: str) -> list[CounterRow]:
    """Every counter: (name, agent, value), by name and agent."""
    rows = conn.execute(statement(
        schema, 'SELECT name, agent, value FROM {s}.counters ORDER BY name COLLATE "C", agent COLLATE "C"'
    )).fetchall()
    return [CounterRow(*row) for row in rows]


def expired_leases(conn: psycopg.Connection, schema: str, now: int) -> int:
    """Deliveries whose lease ran out without an ack or a fail (a receiver crashed, hung or
    released them) and that nobody has claimed again yet."""
    row = conn.execute(statement(
        schema,
        "SELECT (SELECT count(*) FROM {s}.message WHERE state = 0 AND attempts > 0"
        " AND visible_at <= %(now)s) + (SELECT count(*) FROM {s}.message WHERE state = 1"
        " AND visible_at <= %(now)s)",
    ), {"now": now}).fetchone()
    return int(row[0]) if row else 0


def rows_without_body(conn: psycopg.Connection, schema: str) -> int:
    """Message rows whose body is empty or whose shared body is missing (a damaged bus: the
    foreign key to ``message_body`` was bypassed): a scan of the table."""
    row = conn.execute(statement(
        schema, "SELECT count(*) FROM {s}.message WHERE " + BODY_LENGTH + " = 0"
    )).fetchone()
    return int(row[0]) if row else 0
