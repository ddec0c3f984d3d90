"""Storage: every line of SQL in sqlbus lives here.

Functions take an open ``apsw.Connection`` and times as epoch milliseconds (``now``); they
neither read the clock nor begin transactions, so the same function runs alone or inside a
caller's bigger transaction (the outbox). The bus brackets them with :func:`begin` and
:func:`commit`.

Tables (all STRICT):

- ``message``: one row per (message, recipient), from publish until pruned. It is the inbox,
  the retry queue and the sent archive at once, so a publish writes one row (per recipient)
  and an ack updates it: measured here, every extra B-tree page a commit touches costs about
  a third of single-message throughput, so state moves inside one row instead of between
  tables, and partial indexes keep only the rows each query needs.
  ``state``: 0 queued, 1 scheduled (retry backoff or delayed publish), 2 acked, 3 dead.
  A queued row is *ready* when ``visible_at <= now``; a claim leases it by moving
  ``visible_at`` to the lease deadline and adding one to ``attempts`` and ``claims``, so a
  lease that runs out makes the row ready again by itself. ``(seq, claims)`` names one lease
  (``claims`` never resets, unlike ``attempts``): ack, fail and extend are guarded by it.
  A broadcast that matched nobody is archived as one row with ``agent`` NULL.
- ``dead_letter``: why a row ended dead (reason, error, traceback, context).
- ``agents``: the registry.
- ``state`` and ``state_log``: versioned shared state and its change history (for watch).
- ``error_counts``: failures by exception name.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from typing import Any

import apsw

from .errors import DatabaseError

SCHEMA_VERSION = 1
APPLICATION_ID = 0x5153_4255  # "QSBU": marks a file as a sqlbus database
SQLITE_HEADER = b"SQLite format 3\x00"

# ---------------------------------------------------------------------------------------------
# Schema

SCHEMA = """
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'active'
) STRICT, WITHOUT ROWID;

CREATE TABLE message (
    seq INTEGER PRIMARY KEY,           -- publish order
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    agent TEXT,                        -- recipient; NULL: a broadcast that matched nobody
    type TEXT NOT NULL,
    priority INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 5),
    state INTEGER NOT NULL CHECK (state IN (0, 1, 2, 3)),
    visible_at INTEGER NOT NULL,       -- queued: ready at / leased until; scheduled: due at
    expires_at INTEGER,                -- NULL: never expires
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims INTEGER NOT NULL DEFAULT 0,
    sent_at INTEGER NOT NULL,
    done_at INTEGER,                   -- acked or dead-lettered at
    last_error TEXT,
    body BLOB NOT NULL
) STRICT;
-- The claim walks this index in delivery order and reads visible_at from it (covering), so a
-- claim touches only the head of one agent's queue whatever the backlog or archive size.
CREATE INDEX message_claim ON message (agent, priority DESC, seq, visible_at) WHERE state = 0;
CREATE INDEX message_due ON message (agent, visible_at) WHERE state = 1;
CREATE INDEX message_id ON message (message_id);

CREATE TABLE dead_letter (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,       -- the message row, kept with state 3
    reason TEXT NOT NULL,
    error_name TEXT,
    error_message TEXT,
    traceback TEXT,
    context TEXT,                      -- JSON object
    failed_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL
) STRICT;
CREATE INDEX dead_letter_failed_at ON dead_letter (failed_at);

CREATE TABLE state (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,               -- JSON
    version INTEGER NOT NULL CHECK (version >= 1),
    deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
    updated_by TEXT,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE state_log (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    updated_by TEXT,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE error_counts (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"""

# ---------------------------------------------------------------------------------------------
# Opening a database


def _busy_handler(timeout: float):
    """A busy handler that sleeps short jittered intervals up to ``timeout`` seconds.

    SQLite's own handler sleeps up to 100 ms between tries, so a writer that keeps losing the
    race can starve for seconds behind others that hold the lock for a few ms each (fsync at
    ``synchronous=FULL``). Short sleeps with jitter keep the waiters taking turns.
    """
    started = [0.0]

    def handler(retries: int) -> bool:
        now = time.monotonic()
        if retries == 0:
            started[0] = now
        elapsed = now - started[0]
        if elapsed >= timeout:
            return False
        pause = min(0.004, 0.0001 * (1.6 ** min(retries, 20))) * random.uniform(0.5, 1.5)
        time.sleep(min(pause, timeout - elapsed))
        return True

    return handler


def check_file(path: str) -> bool:
    """Refuse a file that cannot be a healthy SQLite database; return True when it is empty.

    Reads the 100-byte header only: a file that is not SQLite, has a bad page size, or is
    shorter than its header says (truncated) raises :class:`DatabaseError` and is left as is.
    """
    size = os.path.getsize(path)
    if size == 0:
        return True
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise DatabaseError(f"{path} is not a SQLite database (no SQLite header); refusing to open it")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise DatabaseError(f"{path} is corrupt: bad page size {page_size} in the header")
    header_pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    if size % page_size:
        raise DatabaseError(
            f"{path} is corrupt or truncated: size {size} is not a multiple of the page size "
            f"{page_size}; run 'sqlbus check' or restore from a 'sqlbus backup'"
        )
    if header_valid and header_pages * page_size > size:
        raise DatabaseError(
            f"{path} is truncated: the header counts {header_pages} pages but the file holds "
            f"{size // page_size}; restore it from a 'sqlbus backup'"
        )
    return False


def open_connection(path: str, *, synchronous: str, busy_timeout: float) -> apsw.Connection:
    """Open a connection to an existing file with our per-connection settings."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOMUTEX)
    conn.set_busy_handler(_busy_handler(busy_timeout))
    assert synchronous in ("NORMAL", "FULL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-16000")
    # Autocheckpoint stays on as a backstop, with a threshold large enough that few commits
    # pay for one; the bus checkpoints when idle (see checkpoint()).
    conn.execute("PRAGMA wal_autocheckpoint=4000")
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


def initialize(conn: apsw.Connection, path: str) -> None:
    """Create the schema in an empty file, or check that an existing file is ours and current."""
    application_id = conn.execute("PRAGMA application_id").fetchall()[0][0]
    user_version = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if application_id == APPLICATION_ID:
        if user_version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{path} was made by a newer sqlbus (schema version {user_version}, this one "
                f"reads up to {SCHEMA_VERSION}); upgrade sqlbus"
            )
        if user_version == SCHEMA_VERSION:
            return
    elif application_id != 0:
        raise DatabaseError(
            f"{path} is not a sqlbus database (application_id {application_id:#x}); "
            "refusing to change it"
        )
    begin(conn)
    try:
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()[0][0]
        application_id = conn.execute("PRAGMA application_id").fetchall()[0][0]
        user_version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        if application_id == APPLICATION_ID and user_version == SCHEMA_VERSION:
            commit(conn)  # another process initialised it while we waited
            return
        if application_id != APPLICATION_ID and tables:
            raise DatabaseError(
                f"{path} is a SQLite database of another application ({tables} schema objects, "
                "no sqlbus mark); refusing to change it"
            )
        if application_id == APPLICATION_ID:
            raise DatabaseError(
                f"{path} has sqlbus schema version {user_version}, which this version cannot migrate"
            )
        conn.execute(SCHEMA)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        commit(conn)
    except BaseException:
        rollback(conn)
        raise


def set_wal_mode(conn: apsw.Connection, path: str) -> None:
    """Switch the file to WAL (persistent in the file, so only a new file needs it)."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    if str(mode).lower() != "wal":
        raise DatabaseError(f"{path}: could not switch to WAL journal mode (got {mode!r})")


def begin(conn: apsw.Connection) -> None:
    """Start a write transaction.

    IMMEDIATE takes the write lock up front, through the busy handler; a deferred transaction
    that reads and then writes in WAL mode can fail with BUSY without waiting at all.
    """
    conn.execute("BEGIN IMMEDIATE")


def commit(conn: apsw.Connection) -> None:
    conn.execute("COMMIT")


def rollback(conn: apsw.Connection) -> None:
    """Roll back the open transaction, if any (a failed COMMIT may already have ended it)."""
    if not conn.get_autocommit():
        conn.execute("ROLLBACK")


def checkpoint(conn: apsw.Connection, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """Run a WAL checkpoint; returns (busy, wal frames, frames checkpointed)."""
    assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
    row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
    return int(row[0]), int(row[1]), int(row[2])


def data_version(conn: apsw.Connection) -> int:
    """A number that changes when another connection commits (cheap, takes no lock)."""
    return conn.execute("PRAGMA data_version").fetchall()[0][0]


# ---------------------------------------------------------------------------------------------
# Agents


def register_agent(conn: apsw.Connection, agent: str, now: int) -> None:
    conn.execute(
        "INSERT INTO agents (id, registered_at, last_seen, status) VALUES (?, ?, ?, 'active') "
        "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, status = 'active'",
        (agent, now, now),
    )


def touch_agent(conn: apsw.Connection, agent: str, now: int, status: str | None = None) -> None:
    conn.execute(
        "UPDATE agents SET last_seen = max(last_seen, ?), status = coalesce(?, status) WHERE id = ?",
        (now, status, agent),
    )


def list_agents(conn: apsw.Connection) -> list[tuple[Any, ...]]:
    """(id, registered_at, last_seen, status) of every agent, by id."""
    return conn.execute(
        "SELECT id, registered_at, last_seen, status FROM agents ORDER BY id"
    ).fetchall()


def agent_ids(conn: apsw.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT id FROM agents ORDER BY id")]


# ---------------------------------------------------------------------------------------------
# Publish

QUEUED, SCHEDULED, ACKED, DEAD = 0, 1, 2, 3

_INSERT = (
    "INSERT INTO message (message_id, sender, agent, type, priority, state, visible_at,"
    " expires_at, sent_at, done_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def message_exists(conn: apsw.Connection, message_id: str) -> bool:
    return bool(
        conn.execute("SELECT 1 FROM message WHERE message_id = ? LIMIT 1", (message_id,)).fetchall()
    )


def publish(
    conn: apsw.Connection, messages: Sequence[Any], visible_at: Sequence[int], now: int
) -> list[bool]:
    """Write messages (``messages.Outgoing``) to their recipients' inboxes, one row each.

    A message whose id was given by the caller and exists already is skipped (idempotent
    publish); the result says, per message, whether it was written. A ``visible_at`` later
    than ``now`` schedules the rows instead (a delayed publish).
    """
    fresh: list[bool] = []
    rows: list[tuple[Any, ...]] = []
    for message, visible in zip(messages, visible_at, strict=True):
        if message.caller_id and message_exists(conn, message.id):
            fresh.append(False)
            continue
        fresh.append(True)
        state = QUEUED if visible <= now else SCHEDULED
        expires_at = now + message.ttl if message.ttl else None
        if not message.recipients:  # a broadcast that matched nobody: archive only
            rows.append((message.id, message.sender, None, message.type, message.priority,
                         ACKED, now, expires_at, now, now, message.body))
        for agent in message.recipients:
            rows.append((message.id, message.sender, agent, message.type, message.priority,
                         state, visible, expires_at, now, None, message.body))
    if len(rows) == 1:
        conn.execute(_INSERT, rows[0])
    elif rows:
        conn.executemany(_INSERT, rows)
    return fresh


# ---------------------------------------------------------------------------------------------
# Claim, ack, fail, extend, dead letter

_CLAIM = (
    "UPDATE message SET visible_at = ?1, attempts = attempts + 1, claims = claims + 1"
    " WHERE seq IN (SELECT seq FROM message WHERE agent = ?2 AND state = 0 AND visible_at <= ?3"
    " ORDER BY priority DESC, seq LIMIT ?4)"
    " RETURNING seq, claims, attempts, priority, expires_at, sent_at, body"
)
_CLAIM_TYPES = (
    "UPDATE message SET visible_at = ?1, attempts = attempts + 1, claims = claims + 1"
    " WHERE seq IN (SELECT seq FROM message WHERE agent = ?2 AND state = 0 AND visible_at <= ?3"
    " AND type IN (SELECT value FROM json_each(?5)) ORDER BY priority DESC, seq LIMIT ?4)"
    " RETURNING seq, claims, attempts, priority, expires_at, sent_at, body"
)


def promote_due(conn: apsw.Connection, agent: str, now: int) -> int:
    """Queue this agent's scheduled rows (retries, delayed messages) that are due."""
    conn.execute(
        "UPDATE message SET state = 0 WHERE agent = ? AND state = 1 AND visible_at <= ?",
        (agent, now),
    )
    return conn.changes()


def claim(
    conn: apsw.Connection,
    agent: str,
    now: int,
    lease_until: int,
    limit: int,
    types_json: str | None = None,
) -> list[tuple[int, int, int, int, int | None, int, bytes]]:
    """Lease up to ``limit`` ready rows of ``agent``, highest priority first, then FIFO.

    Returns (seq, claims, attempts, priority, expires_at, sent_at, body) in delivery order.
    Rows whose lease ran out are ready again and are claimed like any other.
    """
    if types_json is None:
        rows = conn.execute(_CLAIM, (lease_until, agent, now, limit)).fetchall()
    else:
        rows = conn.execute(_CLAIM_TYPES, (lease_until, agent, now, limit, types_json)).fetchall()
    if len(rows) > 1:
        rows.sort(key=lambda row: (-row[3], row[0]))
    return rows


def ack(conn: apsw.Connection, seq: int, claims: int, now: int) -> int | None:
    """Mark a leased row acked; returns its ``sent_at``, or None when that lease is gone."""
    rows = conn.execute(
        "UPDATE message SET state = 2, done_at = ? WHERE seq = ? AND claims = ? AND state = 0"
        " RETURNING sent_at",
        (now, seq, claims),
    ).fetchall()
    return rows[0][0] if rows else None


def extend(conn: apsw.Connection, seq: int, claims: int, lease_until: int) -> bool:
    """Move a held lease's deadline (to now: release it); False when that lease is gone."""
    conn.execute(
        "UPDATE message SET visible_at = ? WHERE seq = ? AND claims = ? AND state = 0",
        (lease_until, seq, claims),
    )
    return conn.changes() == 1


def retry(
    conn: apsw.Connection, seq: int, claims: int, due_at: int, last_error: str | None
) -> bool:
    """Schedule a leased row for another attempt at ``due_at``; False when the lease is gone."""
    conn.execute(
        "UPDATE message SET state = 1, visible_at = ?, last_error = ?"
        " WHERE seq = ? AND claims = ? AND state = 0",
        (due_at, last_error, seq, claims),
    )
    return conn.changes() == 1


def dead_letter(
    conn: apsw.Connection,
    seq: int,
    claims: int | None,
    now: int,
    reason: str,
    error_name: str | None = None,
    error_message: str | None = None,
    traceback: str | None = None,
    context_json: str | None = None,
    attempts: int | None = None,
) -> bool:
    """Move a queued row to dead letters; False when that lease (or row) is gone.

    ``claims=None`` retires the row whatever its lease (the bus's own decisions at claim
    time). ``attempts`` overrides the attempt count kept in the record.
    """
    rows = conn.execute(
        "UPDATE message SET state = 3, done_at = ?1 WHERE seq = ?2 AND state = 0"
        " AND (?3 IS NULL OR claims = ?3) RETURNING attempts",
        (now, seq, claims),
    ).fetchall()
    if not rows:
        return False
    conn.execute(
        "INSERT INTO dead_letter (seq, reason, error_name, error_message, traceback, context,"
        " failed_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, reason, error_name, error_message, traceback, context_json, now,
         rows[0][0] if attempts is None else attempts),
    )
    return True


def count_error(conn: apsw.Connection, name: str) -> None:
    conn.execute(
        "INSERT INTO error_counts (name, count) VALUES (?, 1) "
        "ON CONFLICT (name) DO UPDATE SET count = count + 1",
        (name,),
    )


def next_due(conn: apsw.Connection, agent: str) -> int | None:
    """Earliest time (ms) at which one of ``agent``'s rows becomes ready: a retry, a delayed
    message or a lease running out; None when nothing is pending."""
    rows = conn.execute(
        "SELECT min(t) FROM (SELECT min(visible_at) AS t FROM message WHERE agent = ?1 AND state = 1"
        " UNION ALL SELECT min(visible_at) FROM message WHERE agent = ?1 AND state = 0)",
        (agent,),
    ).fetchall()
    return rows[0][0] if rows else None


# ---------------------------------------------------------------------------------------------
# Dead letters and the archive

_DEAD = (
    "SELECT d.id, m.agent, d.reason, d.error_name, d.error_message, d.traceback, d.context,"
    " d.failed_at, d.attempts, m.body FROM dead_letter AS d JOIN message AS m ON m.seq = d.seq"
)


def list_dead_letters(
    conn: apsw.Connection, agent: str | None, limit: int
) -> list[tuple[Any, ...]]:
    """Dead letters, newest first: (id, agent, reason, error_name, error_message, traceback,
    context, failed_at, attempts, body)."""
    return conn.execute(
        f"{_DEAD} WHERE ?1 IS NULL OR m.agent = ?1 ORDER BY d.id DESC LIMIT ?2", (agent, limit)
    ).fetchall()


def get_dead_letter(conn: apsw.Connection, dead_letter_id: int) -> tuple[Any, ...] | None:
    rows = conn.execute(f"{_DEAD} WHERE d.id = ?", (dead_letter_id,)).fetchall()
    return rows[0] if rows else None


def requeue(conn: apsw.Connection, dead_letter_id: int, now: int, ttl_ms: int) -> bool:
    """Queue a dead letter's row again, attempts reset and TTL counted from now (``ttl_ms``
    0 = never expires), and drop the dead-letter record. False when there is no such record."""
    rows = conn.execute(
        "DELETE FROM dead_letter WHERE id = ? RETURNING seq", (dead_letter_id,)
    ).fetchall()
    if not rows:
        return False
    conn.execute(
        "UPDATE message SET state = 0, attempts = 0, visible_at = ?1, done_at = NULL,"
        " expires_at = CASE WHEN ?2 > 0 THEN ?1 + ?2 END WHERE seq = ?3",
        (now, ttl_ms, rows[0][0]),
    )
    return True


def purge_dead_letters(conn: apsw.Connection, older_than: int | None) -> int:
    """Delete dead letters (and their rows) that failed before ``older_than`` ms (None = all)."""
    seqs = conn.execute(
        "DELETE FROM dead_letter WHERE ?1 IS NULL OR failed_at < ?1 RETURNING seq", (older_than,)
    ).fetchall()
    conn.executemany("DELETE FROM message WHERE seq = ?", seqs)
    return len(seqs)


def list_sent(
    conn: apsw.Connection, agent: str | None, limit: int
) -> list[tuple[bytes, list[str], int]]:
    """(body, recipients, sent_at) of archived messages, newest first; ``agent`` keeps those
    sent by or to it."""
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
        rows = conn.execute(
            "SELECT agent, sent_at, body FROM message WHERE message_id = ? ORDER BY seq",
            (message_id,),
        ).fetchall()
        recipients = [row[0] for row in rows if row[0] is not None]
        result.append((rows[0][2], recipients, rows[0][1]))
    return result


# ---------------------------------------------------------------------------------------------
# Shared state


def get_state(conn: apsw.Connection, key: str) -> tuple[Any, ...] | None:
    """(key, value, version, deleted, updated_by, updated_at) or None."""
    rows = conn.execute(
        "SELECT key, value, version, deleted, updated_by, updated_at FROM state WHERE key = ?",
        (key,),
    ).fetchall()
    return rows[0] if rows else None


def put_state(
    conn: apsw.Connection,
    key: str,
    value_json: bytes,
    version: int,
    deleted: bool,
    updated_by: str | None,
    now: int,
) -> None:
    """Write a key's new version and log the change (the caller checked the version)."""
    conn.execute(
        "INSERT INTO state (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (key) DO UPDATE SET value = ?2,"
        " version = ?3, deleted = ?4, updated_by = ?5, updated_at = ?6",
        (key, value_json, version, int(deleted), updated_by, now),
    )
    conn.execute(
        "INSERT INTO state_log (key, value, version, deleted, updated_by, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (key, value_json, version, int(deleted), updated_by, now),
    )


_PREFIX = "substr(key, 1, length(?1)) = ?1"


def state_keys(conn: apsw.Connection, prefix: str) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            f"SELECT key FROM state WHERE deleted = 0 AND {_PREFIX} ORDER BY key", (prefix,)
        )
    ]


def state_entries(conn: apsw.Connection, prefix: str) -> list[tuple[Any, ...]]:
    """Live entries under a key prefix, by key: (key, value, version, deleted, updated_by,
    updated_at)."""
    return conn.execute(
        "SELECT key, value, version, deleted, updated_by, updated_at FROM state"
        f" WHERE deleted = 0 AND {_PREFIX} ORDER BY key",
        (prefix,),
    ).fetchall()


def state_log_after(
    conn: apsw.Connection, prefix: str, after_seq: int, limit: int = 1000
) -> list[tuple[Any, ...]]:
    """Changes logged after ``after_seq``: (seq, key, value, version, deleted, updated_by,
    updated_at), in commit order."""
    return conn.execute(
        "SELECT seq, key, value, version, deleted, updated_by, updated_at FROM state_log"
        f" WHERE seq > ?2 AND {_PREFIX} ORDER BY seq LIMIT ?3",
        (prefix, after_seq, limit),
    ).fetchall()


def state_log_head(conn: apsw.Connection) -> int:
    return conn.execute("SELECT coalesce(max(seq), 0) FROM state_log").fetchall()[0][0]
