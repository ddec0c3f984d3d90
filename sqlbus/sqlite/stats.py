"""The figures metrics, stats and check report, read from the rows themselves: depths of
inboxes, what was acked and sent, dead letters by reason, failures by exception, the
counters, and the checks of a damaged file."""

from __future__ import annotations

from typing import Any

import apsw

from ..backend import AckedRow, CounterRow, DepthRow
from .schema import BODY_LENGTH, STATUS, WAITING

_INBOX_STATES = ("ready", "leased", "retrying", "scheduled", "expired")
_DEPTH = f"SELECT agent, {STATUS} AS status, count(*), min(sent_at) FROM message WHERE agent IS NOT NULL"
# the WHERE of each partial index (message_claim, message_wait), so each is read alone
_DEPTH_QUEUED = " AND state = 0 GROUP BY agent, status"
_DEPTH_WAITING = f" AND {WAITING} GROUP BY agent, status"


def depth_rows(conn: apsw.Connection, now: int) -> list[DepthRow]:
    """Per recipient: (agent, ready, leased, retrying, scheduled, expired, dead, sent_at of the
    oldest ready row or None), every row counted once, in the state ``STATUS`` gives it.

    Walks the partial indexes of queued, leased and scheduled rows (and those rows) plus the
    dead-letter table, never the archive, so it costs the size of the backlog, not of the
    file. Call it inside one read transaction: its queries must see the same commit."""
    depths: dict[str, list[Any]] = {}

    def entry(agent: str) -> list[Any]:
        return depths.setdefault(agent, [0, 0, 0, 0, 0, 0, None])

    for where in (_DEPTH_QUEUED, _DEPTH_WAITING):
        for agent, status, count, oldest in conn.execute(_DEPTH + where, (now,)):
            e = entry(agent)
            e[_INBOX_STATES.index(status)] += count
            if status == "ready":
                e[6] = oldest if e[6] is None else min(e[6], oldest)
    # From the dead letters to their rows (CROSS JOIN keeps that order): left to itself the
    # planner may walk the whole message table instead.
    for agent, dead in conn.execute(
        "SELECT m.agent, count(*) FROM dead_letter AS d CROSS JOIN message AS m ON m.seq = d.seq"
        " WHERE m.agent IS NOT NULL GROUP BY m.agent"
    ):
        entry(agent)[5] = dead
    return [DepthRow(agent, *depths[agent]) for agent in sorted(depths)]


def acked_rows(conn: apsw.Connection, now: int) -> list[AckedRow]:
    """Per recipient: (agent, acked, sum of done_at - sent_at in ms, acked in the last
    second, acked in the last minute). A scan of the whole table: the price of keeping the
    ack path free of counter updates."""
    return [AckedRow(*row) for row in conn.execute(
        "SELECT agent, count(*), sum(done_at - sent_at), sum(done_at > ?1 - 1000),"
        " sum(done_at > ?1 - 60000) FROM message WHERE state = 2 AND agent IS NOT NULL"
        " GROUP BY agent",
        (now,),
    )]


def sent_rows(conn: apsw.Connection) -> list[tuple[str, int]]:
    """Per sender: (sender, messages sent), one per message id however many recipients."""
    return conn.execute(
        "SELECT sender, count(DISTINCT message_id) FROM message GROUP BY sender"
    ).fetchall()


def dead_reason_rows(conn: apsw.Connection) -> list[tuple[str, int]]:
    """(reason, dead letters) for the dead letters kept now."""
    return conn.execute("SELECT reason, count(*) FROM dead_letter GROUP BY reason").fetchall()


def error_count_rows(conn: apsw.Connection) -> list[tuple[str, int]]:
    """(exception name, failures) since the file was made."""
    return conn.execute("SELECT name, count FROM error_counts ORDER BY name").fetchall()


def read_counters(conn: apsw.Connection) -> list[CounterRow]:
    """Every counter: (name, agent, value)."""
    return [CounterRow(*row) for row in conn.execute(
        "SELECT name, agent, value FROM counters ORDER BY name, agent"
    )]


def expired_leases(conn: apsw.Connection, now: int) -> int:
    """Deliveries whose lease ran out without an ack or a fail (a receiver crashed, hung or
    released them) and that nobody has claimed again yet."""
    # ``{WAITING} AND state = 1`` says ``state = 1`` the long way: with message_wait's WHERE
    # written out, SQLite reads the leased rows from that partial index, not the whole table.
    return conn.execute(
        "SELECT (SELECT count(*) FROM message WHERE state = 0 AND attempts > 0 AND"
        f" visible_at <= ?1) + (SELECT count(*) FROM message WHERE {WAITING} AND"
        " state = 1 AND visible_at <= ?1)",
        (now,),
    ).fetchall()[0][0]


def rows_without_body(conn: apsw.Connection) -> int:
    """Message rows whose shared body is missing (a damaged file): a scan of the table."""
    rows = conn.execute(f"SELECT count(*) FROM message WHERE {BODY_LENGTH} = 0").fetchall()
    return int(rows[0][0] or 0)
