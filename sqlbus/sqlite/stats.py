"""The figures metrics, stats and check report, read from the rows themselves: depths of
inboxes, what was acked and sent, dead letters by reason, failures by exception, the
counters, and the checks of a damaged file."""

from __future__ import annotations

import json
from array import array
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


# ---------------------------------------------------------------------------------------------
# Following the rows (sqlbus.metrics.MetricsFollower): what changed since an earlier read, by
# position. Positions are commit-ordered here: a publish numbers its rows after the newest row
# and the high-water mark, one after the other, under the write lock; so a row committed after
# a read lies above that read's top, and a missing position above it is a deleted row.

_TOP = "SELECT max(h.seq, (SELECT coalesce(max(seq), 0) FROM message)) FROM message_high_water AS h"


def follow_top(conn: apsw.Connection) -> int:
    """The highest position ever given to a row (the newest row's, or a deleted newer one's)."""
    return int(conn.execute(_TOP).fetchall()[0][0])


def acked_summary(conn: apsw.Connection, since: int) -> list[tuple[str, int, int, str]]:
    """Per recipient: (agent, acked rows, their summed done_at - sent_at in ms, a JSON array of
    ``[seq, done_at]`` of those acked after ``since``). A scan of the whole table, as
    :func:`acked_rows`."""
    return conn.execute(
        "SELECT agent, count(*), coalesce(sum(done_at - sent_at), 0),"
        " json_group_array(json_array(seq, done_at)) FILTER (WHERE done_at > ?1)"
        " FROM message WHERE state = 2 AND agent IS NOT NULL GROUP BY agent",
        (since,),
    ).fetchall()


def unacked_positions(conn: apsw.Connection) -> list[tuple[int, str | None]]:
    """(seq, agent) of every row not acked: queued, leased, scheduled (the two partial
    indexes, each with its own WHERE) and dead (the dead-letter table); never the archive."""
    return (
        conn.execute("SELECT seq, agent FROM message WHERE state = 0").fetchall()
        + conn.execute(f"SELECT seq, agent FROM message WHERE {WAITING}").fetchall()
        + conn.execute(
            "SELECT m.seq, m.agent FROM dead_letter AS d CROSS JOIN message AS m ON m.seq = d.seq"
        ).fetchall()
    )


def unacked_seqs(conn: apsw.Connection) -> set[int]:
    """The positions of :func:`unacked_positions`, from the indexes alone (queued rows' from
    message_claim, which holds seq; dead ones' from the dead-letter table)."""
    seqs = {row[0] for row in conn.execute("SELECT seq FROM message WHERE state = 0")}
    seqs.update(row[0] for row in conn.execute(f"SELECT seq FROM message WHERE {WAITING}"))
    seqs.update(row[0] for row in conn.execute("SELECT seq FROM dead_letter"))
    return seqs


def rows_since(
    conn: apsw.Connection, after_seq: int
) -> list[tuple[int, str | None, str, str, int, int, int | None]]:
    """(seq, agent, sender, message_id, state, sent_at, done_at) of the rows above
    ``after_seq``, by position (a seek on the primary key)."""
    return conn.execute(
        "SELECT seq, agent, sender, message_id, state, sent_at, done_at FROM message"
        " WHERE seq > ? ORDER BY seq",
        (after_seq,),
    ).fetchall()


def rows_at(
    conn: apsw.Connection, seqs: list[int]
) -> list[tuple[int, str | None, int, int, int | None]]:
    """(seq, agent, state, sent_at, done_at) of those of the rows ``seqs`` still there, each
    one look-up by primary key."""
    if not seqs:
        return []
    return conn.execute(
        "SELECT m.seq, m.agent, m.state, m.sent_at, m.done_at FROM carray(?1) AS p"
        " CROSS JOIN message AS m ON m.seq = p.value",
        (apsw.carray(array("q", seqs)),),
    ).fetchall()


def messages_before(conn: apsw.Connection, message_ids: list[str], seq: int) -> bool:
    """Whether any of ``message_ids`` has a row at or below position ``seq`` (one look-up in
    the message_id index each)."""
    return bool(conn.execute(
        "SELECT 1 FROM json_each(?1) AS j CROSS JOIN message AS m ON m.message_id = j.value"
        " WHERE m.seq <= ?2 LIMIT 1",
        (json.dumps(message_ids), seq),
    ).fetchall())
