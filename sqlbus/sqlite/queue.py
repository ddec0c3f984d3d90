"""The queue: publish, claim, and how a claimed row is settled (ack, extend, release, retry,
dead letter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from ..backend import ClaimedRow
from .connection import Connection
from .schema import ACKED, BINARY, BODY, BODY_LENGTH, QUEUED, SCHEDULED, WAITING

# ---------------------------------------------------------------------------------------------
# Publish

_INSERT_INTO = (
    "INSERT INTO message (seq, message_id, sender, agent, type, correlation_id, priority, state,"
    " visible_at, expires_at, sent_at, done_at, body) VALUES "
)
_COLUMNS = 12
_VALUES = ",".join("?" * _COLUMNS)  # no spaces: apsw hashes the whole text per execute
# Positions are never reused: an INSERT's first row takes the one after both the newest row and
# the high-water mark, and the rows after it follow on (NULL: the newest plus one). A one-row
# INSERT reads that inline; a multi-row one is given it (bound), because SQLite copies the rows
# of a VALUES list that reads the table it inserts into to a temporary table first.
_NEXT_SEQ = (
    "SELECT max(h.seq,(SELECT coalesce(max(seq),0) FROM message))+1 FROM message_high_water AS h"
)
_INSERT_ONE = f"{_INSERT_INTO}(({_NEXT_SEQ}),{_VALUES})"


def message_exists(conn: Connection, message_id: str) -> bool:
    """Whether a message with this id was published (and not pruned yet)."""
    return bool(
        conn.cur.execute("SELECT 1 FROM message WHERE message_id = ? LIMIT 1", (message_id,)).fetchall()
    )


def publish(
    conn: apsw.Connection, messages: Sequence[Any], visible_at: Sequence[int], now: int
) -> list[bool]:
    """Write messages (``messages.Outgoing``) to their recipients' inboxes, one row each
    (a message to many recipients with its body once, in ``message_body``).

    A message whose id was given by the caller and exists already is skipped (idempotent
    publish); the result says, per message, whether it was written. A ``visible_at`` later
    than ``now`` schedules the rows instead (a delayed publish); a ``delivered`` message (a
    direct reply) is written as acked, for its requester to read (:func:`find_response`).
    """
    if len(messages) == 1:  # the commonest write: one message to one inbox, its id ours
        message = messages[0]
        if not message.caller_id and not message.delivered and len(message.recipients) == 1:
            visible = visible_at[0]
            conn.cur.execute(_INSERT_ONE, (
                message.id, message.sender, message.recipients[0], message.type,
                message.correlation_id, message.priority, QUEUED if visible <= now else SCHEDULED,
                visible, visible + message.ttl if message.ttl else None, now, None, message.body))
            return [True]
    fresh: list[bool] = []
    values: list[Any] = []  # the rows' values, one after the other
    chosen: set[str] = set()  # caller-chosen ids of this batch: a repeat is skipped like one in the db
    for message, visible in zip(messages, visible_at, strict=True):
        if message.caller_id:
            if message.id in chosen or message_exists(conn, message.id):
                fresh.append(False)
                continue
            chosen.add(message.id)
        fresh.append(True)
        state = QUEUED if visible <= now else SCHEDULED
        done_at = None
        if message.delivered:  # a direct reply: its requester reads it from the archive
            state, done_at = ACKED, now
        # TTL counts from when the message can first be delivered, so a delay longer than the
        # ttl does not doom the message before anyone could see it.
        expires_at = visible + message.ttl if message.ttl else None
        if len(message.recipients) > 1:
            if values:
                _insert_values(conn, values)  # the rows before first: seq is publish order
                values = []
            _insert_fanout(conn, message, state, visible, expires_at, now, done_at)
            continue
        if not message.recipients:  # a broadcast that matched nobody: archive only
            values += (message.id, message.sender, None, message.type, message.correlation_id,
                       message.priority, ACKED, now, expires_at, now, now, message.body)
        for agent in message.recipients:
            values += (message.id, message.sender, agent, message.type, message.correlation_id,
                       message.priority, state, visible, expires_at, now, done_at, message.body)
    _insert_values(conn, values)
    return fresh


_INSERT_CHUNK = 64  # rows per multi-row INSERT


def _insert_values(conn: Connection, values: list[Any]) -> None:
    """INSERT rows given as one flat list of their twelve values each."""
    # A single publish, the commonest write: one statement that numbers its row itself.
    if len(values) == _COLUMNS:
        conn.cur.execute(_INSERT_ONE, values)
    else:
        _insert_chunks(conn, _INSERT_MANY, [], values, _COLUMNS, _next_seq(conn))


def _next_seq(conn: Connection) -> int:
    """The position of the next row written (see _NEXT_SEQ)."""
    seq: Any = conn.cur.execute(_NEXT_SEQ).fetchall()[0][0]
    return int(seq)


def _insert_chunks(
    conn: Connection, statements: dict[int, str], shared: list[Any], values: list[Any],
    width: int, seq: int | None,
) -> None:
    """Run ``statements[size]`` (a multi-row INSERT of ``size`` rows, ``width`` values each
    after the ``shared`` ones and the first row's ``seq``, None: the newest plus one) for
    chunks of 64, then 32, 16, ... 1 rows of ``values``: a handful of texts for apsw to cache,
    and cheaper per row than one statement per row (executemany)."""
    start, count = 0, len(values)
    while start < count:
        size = _INSERT_CHUNK
        while size * width > count - start:
            size //= 2
        end = start + size * width
        conn.cur.execute(statements[size], [*shared, seq, *values[start:end]])
        seq = None  # the rows after the first follow on
        start = end


def _insert_fanout(
    conn: Connection, message: Any, state: int, visible_at: int, expires_at: int | None,
    now: int, done_at: int | None,
) -> None:
    """Write a message to many recipients: its body once, then a row per recipient that
    references it, which differ in the recipient only (bound once per row)."""
    conn.cur.execute("INSERT INTO message_body (body) VALUES (?)", (message.body,))
    shared = [message.id, message.sender, message.type, message.correlation_id,
              message.priority, state, visible_at, expires_at, now, done_at,
              conn.last_insert_rowid()]
    _insert_chunks(conn, _INSERT_FANOUT, shared, message.recipients, 1, _next_seq(conn))


_INSERT_MANY = {
    size: _INSERT_INTO + ",".join([f"(?,{_VALUES})"] + [f"(NULL,{_VALUES})"] * (size - 1))
    for size in (1, 2, 4, 8, 16, 32, 64)
}
# publish_plain's rows: ?1-?6 are the values they share (sender, agent, type, priority, now,
# expires_at), ?7 the first row's seq, then each row's id and body.
_INSERT_SHARED = {
    size: _INSERT_INTO + ",".join(
        f"({'?7' if row == 0 else 'NULL'},?{8 + 2 * row},?1,?2,?3,NULL,?4,{QUEUED},?5,?6,?5,NULL,"
        f"?{9 + 2 * row})"
        for row in range(size)
    )
    for size in (1, 2, 4, 8, 16, 32, 64)
}


# _insert_fanout's rows: ?1-?11 are the values they share, ?12 the first row's seq, then
# each row's recipient.
_INSERT_REFERENCING = (
    "INSERT INTO message (seq, message_id, sender, agent, type, correlation_id, priority,"
    " state, visible_at, expires_at, sent_at, done_at, body, body_id) VALUES "
)
_INSERT_FANOUT = {
    size: _INSERT_REFERENCING + ",".join(
        f"({'?12' if row == 0 else 'NULL'},?1,?2,?{13 + row},?3,?4,?5,?6,?7,?8,?9,?10,X'',?11)"
        for row in range(size)
    )
    for size in (1, 2, 4, 8, 16, 32, 64)
}


def publish_plain(conn: Connection, sender: str, runs: Sequence[Any], now: int) -> None:
    """Write a plain batch (``messages.prepare_plain_batch``'s runs) to its recipients'
    inboxes, ready now: :func:`publish`'s rows without its per-message cases (caller ids,
    delays, broadcasts, direct replies).

    A fast path for ``publish_many``, the bulk ingest: the messages of a run share all their
    row's values but id and body, so those are bound once per statement instead of twelve
    values per row (docs/design.md, Storage notes)."""
    seq: int | None = _next_seq(conn)  # the first run's first row; the rest follow on
    for to, type, priority, ttl, ids, bodies in runs:
        values: list[Any] = [None] * (2 * len(ids))
        values[0::2], values[1::2] = ids, bodies
        shared = [sender, to, type, priority, now, now + ttl if ttl else None]
        _insert_chunks(conn, _INSERT_SHARED, shared, values, 2, seq)
        seq = None


# ---------------------------------------------------------------------------------------------
# Claim

# A claim picks its rows with one SELECT on message_claim and leases them by seq (one UPDATE,
# or one executemany for a batch): cheaper than ``UPDATE ... WHERE seq IN (SELECT ... LIMIT n)
# RETURNING`` for one row and for batches.
# It takes the first ready rows in delivery order from two places: queued rows (message_claim,
# in order already) and rows waiting for a time that has come, scheduled ones due and leases
# that ran out (message_wait). Usually there are none of the second kind, so the claim probes
# for them first (_ANY_DUE) and, when there are none, reads the queued rows alone: the UNION
# ALL that merges both sorts them in a temporary table, which costs far more than the probe.
# A queued row is ready whatever the reader's "now" says, so _QUEUED_READY has no visible_at
# test: a reader takes its "now" before its snapshot, so a row committed in between is in the
# snapshot with a visible_at (the writer's "now") later than the reader's; with the test the
# reader's look would see no work while its data_version already counted that commit, and it
# would sleep its whole wait with a message ready.
_QUEUED_READY = f" FROM message WHERE agent = ?1{BINARY} AND state = 0"
_WAITING_DUE = f" FROM message WHERE agent = ?1{BINARY} AND {WAITING} AND visible_at <= ?2"
_READY_TYPES = " AND type IN (SELECT value FROM json_each(?3))"
_READY_NOT_AWAITED = (
    " AND NOT (type = 'response' AND correlation_id IN (SELECT value FROM json_each(?4)))"
)
# The body is read only when its stored length (known without reading it) is at most ?5, the
# receiver's limit: a larger one is NULL here and never loaded.
_CLAIMED = (
    "SELECT seq, claims + 1, attempts + 1, priority, expires_at, sent_at,"
    f" CASE WHEN {BODY_LENGTH} <= ?5 THEN {BODY} END"
)


def _filters(types: bool, skip: bool) -> str:
    """The optional filters of a ready-row query: by type (?3), and responses awaited (?4)."""
    return (_READY_TYPES if types else "") + (_READY_NOT_AWAITED if skip else "")


# The LIMIT is written into the text, not bound: SQLite (3.54) plans with a bound LIMIT's
# value, so every new binding of it re-prepares the statement. apsw caches each text once; a
# receiver uses one or two limits.
_ORDER = " ORDER BY priority DESC, seq LIMIT "
_SELECT_QUEUED = {
    (types, skip): _CLAIMED + _QUEUED_READY + _filters(types, skip) + _ORDER
    for types in (False, True)
    for skip in (False, True)
}
_SELECT_READY = {
    (types, skip): _CLAIMED + _QUEUED_READY + _filters(types, skip) + " UNION ALL "
    + _CLAIMED + _WAITING_DUE + _filters(types, skip) + _ORDER
    for types in (False, True)
    for skip in (False, True)
}
_ANY_DUE = "SELECT EXISTS (SELECT 1" + _WAITING_DUE + ")"
_HAS_WORK = {
    (types, skip): "SELECT EXISTS (SELECT 1" + _QUEUED_READY + _filters(types, skip)
    + " LIMIT 1) OR EXISTS (SELECT 1" + _WAITING_DUE + _filters(types, skip) + ")"
    for types in (False, True)
    for skip in (False, True)
}
_DATA_VERSION = "(SELECT data_version FROM pragma_data_version())"
_NEXT_DUE = f"(SELECT min(visible_at) FROM message WHERE agent = ?1{BINARY} AND {WAITING})"
_LOOK = {
    key: f"SELECT {_DATA_VERSION}, ({sql[len('SELECT '):]}), {_NEXT_DUE}"
    for key, sql in _HAS_WORK.items()
}


def _ready_params(
    agent: str, now: int, types_json: str | None, skip_json: str | None, *, due: bool = True,
    max_body: int | None = None,
) -> tuple[Any, ...]:
    """Bindings for ?1..?4 of the ready-row queries (SQLite counts up to the highest used;
    ``due=False``: a query on queued rows only, which has no ?2), and ?5 when ``max_body`` is
    given (the claim's)."""
    if max_body is not None:
        return (agent, now, types_json, skip_json, max_body)
    if skip_json is not None:
        return (agent, now, types_json, skip_json)
    if types_json is not None:
        return (agent, now, types_json)
    return (agent, now) if due else (agent,)


# last_error is the error of the attempt before (a retry's, an interrupted handler's). A row
# claimed while leased (state 1) lost its last attempt to the lease running out: that clears
# it, so the lease is not blamed on an older attempt's error (see Agent._dead_letter_worn_out).
_LEASE = (
    "UPDATE message SET state = 1, visible_at = ?, attempts = attempts + 1, claims = claims + 1,"
    " last_error = CASE WHEN state = 1 THEN NULL ELSE last_error END WHERE seq = ?"
)
# A held lease: the row is leased, or its lease ran out and nobody claimed it again yet (a
# claim may have queued it, state 0, without taking it).
_HELD = " WHERE seq = ? AND claims = ? AND state <= 1"


def claim(
    conn: Connection,
    agent: str,
    now: int,
    lease_until: int,
    limit: int,
    types_json: str | None = None,
    skip_json: str | None = None,
    max_body: int = 1 << 62,
) -> tuple[list[ClaimedRow], bool]:
    """Lease up to ``limit`` ready rows of ``agent``, highest priority first, then FIFO.

    Returns the rows, (seq, claims, attempts, priority, expires_at, sent_at, body) in delivery
    order, ``body`` None when its stored length is above ``max_body`` (it is not read), and
    whether more ready rows wait behind them (the query reads one row past the
    limit, so a receiver that took the last one can look before it writes again). Ready rows
    are queued ones and rows whose time came: retries and delayed messages that are due,
    leases that ran out. ``types_json`` (a JSON list) keeps only those types;
    ``skip_json`` leaves alone the ``response`` rows whose correlation id it lists (responses a
    request of this process is waiting for).
    """
    key = (types_json is not None, skip_json is not None)
    # The probe: rows whose time came are rare, and without them the cheaper query serves.
    due = conn.cur.execute(_ANY_DUE, (agent, now)).fetchall()[0][0]
    select = _SELECT_READY[key] if due else _SELECT_QUEUED[key]
    rows = conn.cur.execute(
        select + str(min(limit, 1 << 62) + 1),
        _ready_params(agent, now, types_json, skip_json, due=bool(due), max_body=max_body),
    ).fetchall()
    more = len(rows) > limit
    if more:
        del rows[limit:]
    if len(rows) == 1:  # the commonest claim: one execute, no list of parameters
        conn.cur.execute(_LEASE, (lease_until, rows[0][0]))
    elif rows:
        conn.cur.executemany(_LEASE, [(lease_until, row[0]) for row in rows])
    return rows, more


def look(
    conn: Connection,
    agent: str,
    now: int,
    types_json: str | None = None,
    skip_json: str | None = None,
) -> tuple[int, bool, int | None]:
    """What a receiver that may wait reads before it claims, in one statement (no lock):
    (``data_version`` to wait on, whether a claim with the same arguments would find
    something, when the agent's next scheduled or leased row comes due, or None)."""
    select = _LOOK[(types_json is not None, skip_json is not None)]
    version, work, due = conn.cur.execute(
        select, _ready_params(agent, now, types_json, skip_json)
    ).fetchall()[0]
    return version, bool(work), due


def wait_point(conn: Connection, agent: str) -> tuple[int, int | None]:
    """What a wait needs, read by a claim that found nothing, in its transaction:
    (``data_version``, when the agent's next scheduled or leased row comes due, or None)."""
    version, due = conn.cur.execute(_WAIT_POINT, (agent,)).fetchall()[0]
    return version, due


_WAIT_POINT = f"SELECT {_DATA_VERSION}, {_NEXT_DUE}"


def next_due(conn: apsw.Connection, agent: str) -> int | None:
    """Earliest time (ms) at which one of ``agent``'s rows becomes ready: a retry, a delayed
    message or a lease running out (past: it is due now); None when nothing is pending."""
    rows = conn.execute(
        f"SELECT min(visible_at) FROM message WHERE agent = ?1{BINARY} AND {WAITING}",
        (agent,),
    ).fetchall()
    return rows[0][0] if rows else None

# ---------------------------------------------------------------------------------------------
# Settling a claimed row: ack, extend, release, retry, dead letter


def ack(conn: Connection, leases: Sequence[tuple[int, int]], now: int) -> bool:
    """Mark leased rows acked, given as (seq, claims); False when any of those leases is
    gone (the caller then rolls the whole transaction back: a batch ack is all or nothing)."""
    if len(leases) == 1:  # the commonest ack: one execute, no list of parameters
        conn.cur.execute(_ACK, (now, *leases[0]))
        return conn.changes() == 1
    before = conn.total_changes()
    conn.cur.executemany(_ACK, [(now, seq, claims) for seq, claims in leases])
    return conn.total_changes() - before == len(leases)


_ACK = "UPDATE message SET state = 2, done_at = ?" + _HELD


def acked_now(conn: Connection, seq: int, claims: int, now: int) -> bool:
    """Whether this transaction's ack took the lease (seq, claims): to name, after a failed
    batch ack, a delivery whose lease was lost. (seq, claims) names one lease for the life of
    the file (positions are never reused, claims only grow), so only this transaction can
    have acked it."""
    return bool(
        conn.cur.execute(
            "SELECT 1 FROM message WHERE seq = ? AND claims = ? AND state = 2 AND done_at = ?",
            (seq, claims, now),
        ).fetchall()
    )


def extend(conn: Connection, seq: int, claims: int, lease_until: int) -> bool:
    """Move a held lease's deadline; False when that lease is gone."""
    conn.cur.execute(_EXTEND, (lease_until, seq, claims))
    return conn.changes() == 1


_EXTEND = "UPDATE message SET state = 1, visible_at = ?" + _HELD


def release(
    conn: Connection, seq: int, claims: int, now: int, *, attempted: bool = True,
    last_error: str | None = None,
) -> bool:
    """Give a held lease back: the row is ready again now. ``attempted=False`` (no handler
    saw the message) takes back the attempt the claim counted, and keeps the error of the
    attempt before; ``claims`` stays, fencing. ``last_error`` ("Name: text") records why an
    attempt ended (e.g. KeyboardInterrupt)."""
    conn.cur.execute(_RELEASE, (now, 0 if attempted else 1, last_error, seq, claims))
    return conn.changes() == 1


_RELEASE = (
    "UPDATE message SET state = 0, visible_at = ?1, attempts = attempts - ?2,"
    " last_error = CASE WHEN ?2 = 1 THEN last_error ELSE ?3 END"
    " WHERE seq = ?4 AND claims = ?5 AND state <= 1"  # as _HELD
)


def last_error(conn: apsw.Connection, seq: int) -> str | None:
    """The recorded error of a row's last attempt ("Name: text"), or None."""
    rows = conn.execute("SELECT last_error FROM message WHERE seq = ?", (seq,)).fetchall()
    return rows[0][0] if rows else None


def body_length(conn: apsw.Connection, seq: int) -> int:
    """The stored length of a row's body in bytes (SQLite knows it without reading it)."""
    return conn.execute("SELECT length(body) FROM message WHERE seq = ?", (seq,)).fetchall()[0][0]


def retry(
    conn: Connection, seq: int, claims: int, due_at: int, last_error: str | None
) -> bool:
    """Schedule a leased row for another attempt at ``due_at``; False when the lease is gone."""
    conn.cur.execute(_RETRY, (due_at, last_error, seq, claims))
    return conn.changes() == 1


_RETRY = "UPDATE message SET state = 4, visible_at = ?, last_error = ?" + _HELD


def dead_letter(
    conn: Connection,
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

    ``claims=None`` retires the row whatever its lease (the bus's own decisions at claim
    time). ``attempts`` overrides the attempt count kept in the record, ``failed_at`` the
    time (default ``now``; an expired message failed when it expired, not when it was found).
    """
    rows = conn.cur.execute(
        "UPDATE message SET state = 3, done_at = ?1 WHERE seq = ?2 AND state <= 1"
        " AND (?3 IS NULL OR claims = ?3) RETURNING attempts",
        (now, seq, claims),
    ).fetchall()
    if not rows:
        return False
    conn.cur.execute(
        "INSERT INTO dead_letter (seq, reason, error_name, error_message, traceback, context,"
        " failed_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, reason, error_name, error_message, traceback, context_json,
         now if failed_at is None else failed_at, rows[0][0] if attempts is None else attempts),
    )
    return True


def count_error(conn: Connection, name: str) -> None:
    """Count one failure of exception ``name`` (kept for the life of the file)."""
    conn.cur.execute(
        "INSERT INTO error_counts (name, count) VALUES (?, 1) "
        "ON CONFLICT (name) DO UPDATE SET count = count + 1",
        (name,),
    )
