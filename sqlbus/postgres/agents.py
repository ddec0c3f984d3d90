"""The agents registry and their recorded interests (subscriptions) on PostgreSQL, as
:mod:`sqlbus.sqlite.admin` keeps them. In progress (issue 15): not yet behind the engine.

Listings sort ids byte by byte (``COLLATE "C"``), as SQLite does, whatever the database's
collation."""

from __future__ import annotations

import psycopg

from ..backend import AgentRow, InterestRow
from .schema import statement


def register_agent(conn: psycopg.Connection, schema: str, agent: str, now: int) -> None:
    """Add ``agent`` to the registry, or mark it active and seen now."""
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.agents (id, registered_at, last_seen, status) VALUES (%s, %s, %s, 'active')"
        " ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, status = 'active'",
    ), (agent, now, now))


def touch_agent(
    conn: psycopg.Connection, schema: str, agent: str, now: int, status: str | None = None
) -> None:
    """Record that ``agent`` was seen at ``now`` (never earlier than already recorded)."""
    conn.execute(statement(
        schema,
        "UPDATE {s}.agents SET last_seen = greatest(last_seen, %s),"
        " status = coalesce(%s, status) WHERE id = %s",
    ), (now, status, agent))


def list_agents(conn: psycopg.Connection, schema: str) -> list[AgentRow]:
    """(id, registered_at, last_seen, status) of every agent, by id."""
    rows = conn.execute(statement(
        schema, 'SELECT id, registered_at, last_seen, status FROM {s}.agents ORDER BY id COLLATE "C"'
    )).fetchall()
    return [AgentRow(*row) for row in rows]


def agent_ids(conn: psycopg.Connection, schema: str) -> list[str]:
    """The ids of every registered agent, sorted."""
    rows = conn.execute(statement(schema, 'SELECT id FROM {s}.agents ORDER BY id COLLATE "C"'))
    return [row[0] for row in rows.fetchall()]


def add_interest(
    conn: psycopg.Connection, schema: str, agent: str, kind: str, pattern: str, now: int
) -> None:
    """Record ``agent``'s interest; one already recorded keeps its ``subscribed_at``."""
    conn.execute(statement(
        schema,
        "INSERT INTO {s}.interest (kind, pattern, agent, subscribed_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
    ), (kind, pattern, agent, now))


def drop_interest(conn: psycopg.Connection, schema: str, agent: str, kind: str, pattern: str) -> None:
    """Forget one of ``agent``'s interests."""
    conn.execute(statement(
        schema, "DELETE FROM {s}.interest WHERE kind = %s AND pattern = %s AND agent = %s"
    ), (kind, pattern, agent))


def list_interests(
    conn: psycopg.Connection, schema: str, agent: str | None = None
) -> list[InterestRow]:
    """(agent, kind, pattern, subscribed_at) of ``agent``'s interests, or of every agent's
    (None), by agent, kind and pattern."""
    rows = conn.execute(statement(
        schema,
        "SELECT agent, kind, pattern, subscribed_at FROM {s}.interest"
        ' WHERE %(agent)s::text IS NULL OR agent = %(agent)s'
        ' ORDER BY agent COLLATE "C", kind, pattern COLLATE "C"',
    ), {"agent": agent}).fetchall()
    return [InterestRow(*row) for row in rows]


def interested_in_type(conn: psycopg.Connection, schema: str, type: str, sender: str) -> list[str]:
    """The agents but ``sender`` interested in messages of ``type`` (or ``*``), by id."""
    rows = conn.execute(statement(
        schema,
        "SELECT DISTINCT agent COLLATE \"C\" AS agent FROM {s}.interest WHERE kind = 'type'"
        " AND pattern IN (%(type)s, '*') AND agent <> %(sender)s ORDER BY 1",
    ), {"type": type, "sender": sender}).fetchall()
    return [row[0] for row in rows]


def event_interests(
    conn: psycopg.Connection, schema: str, sender: str
) -> list[tuple[str, str | None]]:
    """(agent, pattern) of every interest in events of the agents but ``sender``, grouped by
    pattern, then (pattern None) each interest in the types ``event`` and ``*`` (the caller
    matches each pattern once; as the SQLite twin)."""
    rows = conn.execute(statement(
        schema,
        "SELECT agent, pattern FROM {s}.interest WHERE kind = 'event' AND agent <> %(sender)s"
        " UNION ALL SELECT agent, NULL FROM {s}.interest WHERE kind = 'type'"
        " AND pattern IN ('event', '*') AND agent <> %(sender)s ORDER BY 2 NULLS LAST",
    ), {"sender": sender}).fetchall()
    return [(row[0], row[1]) for row in rows]
