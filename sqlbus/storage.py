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
  ``state``: 0 queued (ready), 1 leased, 2 acked, 3 dead, 4 scheduled (retry backoff or
  delayed publish). ``visible_at`` is when a queued row became ready, when a lease runs out
  and when a scheduled row comes due. A claim leases a row (state 1, ``visible_at`` the
  deadline, one more ``attempts`` and ``claims``), which takes it out of the claim index: a
  claim never walks over rows other receivers hold, however many. Scheduled rows that came
  due and leases that ran out are ready as they are: a claim takes them in their place in
  the order, beside the queued ones. ``(seq, claims)`` names one lease (``claims`` never
  resets, unlike ``attempts``): ack, fail and extend are guarded by it. 0 and 1 are the
  values SQLite stores in no bytes at all, so a claim (0 to 1) leaves the row's size alone
  and SQLite rewrites it in place, never touching the overflow pages of a large body.
  A broadcast that matched nobody is archived as one row with ``agent`` NULL.
  ``seq`` is the row's position: never reused for the life of the file, so a lease (``seq``,
  ``claims``), a tail and a watch never mistake a new row for an old one. A publish numbers
  its rows after both the newest row and ``message_high_water``, which a trigger raises when
  the newest row is deleted (prune, purge): AUTOINCREMENT would do the same, but it writes
  ``sqlite_sequence`` in every publish's commit, one more page, where this costs a read.
- ``message_body``: the body of a message to more than one recipient, stored once; each of
  its rows holds an empty ``body`` and the shared one's id (``body_id``), so a fan-out costs
  one body plus a small row per recipient. A message to one recipient keeps its body in its
  row (``body_id`` NULL) and never touches this table or its index.
- ``dead_letter``: why a row ended dead (reason, error, traceback, context).
- ``agents``: the registry.
- ``interest``: what each agent subscribed to (SPEC 5): the recipients of state changes and
  events sent without explicit ones.
- ``state`` and ``state_log``: versioned shared state and its change history (for watch).
  Pruning the log keeps its newest entry, so its positions never go back either.
- ``retention``: the retention policy, one row shared by every process (SPEC 2.2).
- ``error_counts``: failures by exception name.
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

import apsw

from . import connections
from .errors import DatabaseError

SCHEMA_VERSION = 5
APPLICATION_ID = 0x5153_4255  # "QSBU": marks a file as a sqlbus database
SQLITE_HEADER = b"SQLite format 3\x00"

# ---------------------------------------------------------------------------------------------
# Schema

MESSAGE_TABLE = """
CREATE TABLE message (
    seq INTEGER PRIMARY KEY,           -- publish order
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    agent TEXT,                        -- recipient; NULL: a broadcast that matched nobody
    type TEXT NOT NULL,
    correlation_id TEXT,               -- headers.correlation_id, for requests and responses
    priority INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 5),
    state INTEGER NOT NULL CHECK (state BETWEEN 0 AND 4),
    visible_at INTEGER NOT NULL,       -- queued: ready at; leased: until; scheduled: due at
    expires_at INTEGER,                -- NULL: never expires
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims INTEGER NOT NULL DEFAULT 0,
    sent_at INTEGER NOT NULL,
    done_at INTEGER,                   -- acked or dead-lettered at
    last_error TEXT,
    body BLOB NOT NULL
) STRICT;
"""

MESSAGE_INDEXES = """
-- The claim walks this index in delivery order and reads visible_at from it (covering), so a
-- claim touches only the head of one agent's queue whatever the backlog or archive size.
CREATE INDEX message_claim ON message (agent, priority DESC, seq, visible_at) WHERE state = 0;
-- Rows waiting for a time: leased ones (until) and scheduled ones (due at).
CREATE INDEX message_wait ON message (agent, visible_at) WHERE (state = 1 OR state = 4);
CREATE INDEX message_id ON message (message_id);
-- A requester finds its response by correlation id (sqlbus.worker). Partial on responses
-- only, so no other publish touches a page of it; an ack does not either (state is not in it).
CREATE INDEX message_response ON message (agent, correlation_id) WHERE type = 'response';
"""

# Positions of message rows are never reused (see the module docstring): the highest position
# deleted from the top of the table, and the trigger that records it. A delete of any other row
# (most of them) costs the trigger one look at the newest row.
MESSAGE_HIGH_WATER = """
CREATE TABLE message_high_water (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;
INSERT INTO message_high_water (id, seq) VALUES (1, 0);
CREATE TRIGGER message_keep_position AFTER DELETE ON message
WHEN old.seq > (SELECT coalesce(max(seq), 0) FROM message)
BEGIN
    UPDATE message_high_water SET seq = old.seq WHERE seq < old.seq;
END;
"""

# A dead letter's number is what people requeue by (``sqlbus dead-letters requeue 7``): never
# reused, or a stale listing would name another message. Dead-lettering is rare enough for
# AUTOINCREMENT's extra page.
DEAD_LETTER_TABLE = """
CREATE TABLE dead_letter (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
"""

# What a new file (or one upgraded from schema 2) keeps: acked messages 7 days, dead letters
# 30 days, at most 1,000,000 acked messages. ms and a count; NULL keeps them for ever.
DEFAULT_RETENTION = (7 * 86_400_000, 30 * 86_400_000, 1_000_000)

# The retention policy lives in the file, not in each connection's defaults, so that every
# process (the CLI included) applies the same one (SPEC 2.2).
RETENTION_TABLE = """
CREATE TABLE retention (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    archive_ms INTEGER CHECK (archive_ms >= 0),            -- acked rows, after their ack
    dead_ms INTEGER CHECK (dead_ms >= 0),                  -- dead letters, after they failed
    archive_max_messages INTEGER CHECK (archive_max_messages >= 0)
) STRICT;
"""


def _add_default_retention(conn: apsw.Connection) -> None:
    """The retention table's one row, with the default policy (after RETENTION_TABLE)."""
    conn.execute(
        "INSERT INTO retention (id, archive_ms, dead_ms, archive_max_messages) VALUES (1, ?, ?, ?)",
        DEFAULT_RETENTION,
    )


# Added by schema 4 (see :func:`_add_shared_bodies`). IF NOT EXISTS: after a rebuild of the
# message table (which drops its index and trigger, not message_body) it makes what is missing.
SHARED_BODIES = """
CREATE TABLE IF NOT EXISTS message_body (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
) STRICT;
ALTER TABLE message ADD COLUMN body_id INTEGER;  -- message_body.id; NULL: the body is in the row
-- Partial: rows with their body inline (every single-recipient message) are not in it.
CREATE INDEX IF NOT EXISTS message_body_id ON message (body_id) WHERE body_id IS NOT NULL;
-- A shared body goes with the last row that references it, whatever deletes the rows
-- (retention, purge, a caller's own SQL), so no delete path can leave one behind.
CREATE TRIGGER IF NOT EXISTS message_body_release AFTER DELETE ON message
WHEN old.body_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM message WHERE body_id = old.body_id)
BEGIN
    DELETE FROM message_body WHERE id = old.body_id;
END;
"""
# Added by schema 5 (see :func:`_add_interests`): an agent's recorded interests, kind 'type'
# (a message type or '*') or 'event' (an event-name pattern). Keyed by kind and pattern
# first: the lookup every state change and event without explicit recipients makes is
# "who is interested in this", while one agent's list is read only by listings.
INTERESTS = """
CREATE TABLE IF NOT EXISTS interest (
    kind TEXT NOT NULL CHECK (kind IN ('type', 'event')),
    pattern TEXT NOT NULL,
    agent TEXT NOT NULL,
    subscribed_at INTEGER NOT NULL,
    PRIMARY KEY (kind, pattern, agent)
) STRICT, WITHOUT ROWID;
"""

# The row's body and the row's body length, as every statement that reads a message row
# must take them: from the row, or shared (the row's body is empty then; a message's JSON
# never is). The test is length(body), which SQLite answers from the record header, so an
# inline body's overflow pages are not read to learn which case it is (body_id, stored
# after the body, would need them). A shared body that is missing (a damaged file) reads
# as empty, which no decoder accepts.
_BODY = (
    "CASE WHEN length(body) THEN body"
    " ELSE coalesce((SELECT s.body FROM message_body AS s WHERE s.id = body_id), X'') END"
)
_BODY_LENGTH = (
    "CASE WHEN length(body) THEN length(body)"
    " ELSE coalesce((SELECT length(s.body) FROM message_body AS s WHERE s.id = body_id), 0) END"
)


# What a listing reads of a message row (?1 its seq, ?2 the reader's limit on a body's
# length): the columns that stand in for a body too long to load, the body's length, and the
# body itself only when it is within the limit (else NULL, never read).
_LISTED = (
    "message_id, sender, type, priority, sent_at, " + _BODY_LENGTH
    + " AS length, CASE WHEN " + _BODY_LENGTH + " <= ?2 THEN " + _BODY + " END"
)


SCHEMA = (
    """
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'active'
) STRICT, WITHOUT ROWID;

"""
    + MESSAGE_TABLE
    + MESSAGE_INDEXES
    + MESSAGE_HIGH_WATER
    + DEAD_LETTER_TABLE
    + RETENTION_TABLE
    + """
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

-- Totals that outlive the rows they count: prune, purge and requeue fold what they remove
-- into these (per agent; '' = the whole bus), never the hot publish/ack path. Names used:
-- sent, received, delivery_ms, dead, expired; other modules may add their own (e.g.
-- unhandled, late_responses) with add_counters().
CREATE TABLE counters (
    name TEXT NOT NULL,
    agent TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (name, agent)
) STRICT, WITHOUT ROWID;

-- Requests that timed out (sqlbus.worker): a response that arrives for one later is
-- discarded and counted as late_responses, never handed to a handler. Written only when a
-- request times out.
CREATE TABLE request_timeout (
    agent TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    timed_out_at INTEGER NOT NULL,
    PRIMARY KEY (agent, correlation_id)
) STRICT, WITHOUT ROWID;
"""
    + SHARED_BODIES
    + INTERESTS
)

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
        # A write transaction here holds the lock for tens of microseconds (a few ms with
        # fsync), so the first waits are short: a sleeping waiter leaves the lock idle.
        pause = min(0.002, 0.00002 * (2 ** min(retries, 7))) * random.uniform(0.5, 1.5)
        with connections.step_out():  # no SQLite mutex is held here: a fork need not wait
            time.sleep(min(pause, timeout - elapsed))
        return True

    return handler


def check_file(path: str) -> str:
    """Refuse a file that is not ours to open; say what it is: ``"empty"`` (0 bytes),
    ``"blank"`` (SQLite without a schema, user_version or application_id: a new database
    another process is still making) or ``"sqlbus"``.

    Decides from the bytes alone, before SQLite ever opens the file: SQLite replays, checkpoints
    and deletes a WAL when it opens and closes a file, so a foreign file opened only to refuse
    it would already be changed. A file that is not SQLite, has a bad page size, is shorter than
    its header says, belongs to another application (tables, a user_version or an
    application_id of its own) or to a newer sqlbus raises :class:`DatabaseError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    except OSError as exc:
        raise DatabaseError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatabaseError(f"{path} is not a regular file; refusing to open it")
        size = info.st_size
        if size == 0:
            return "empty"
        header = os.pread(fd, _PAGE_ONE_HEAD, 0)
    finally:
        os.close(fd)
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise DatabaseError(f"{path} is not a SQLite database (no SQLite header); refusing to open it")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise DatabaseError(f"{path} is corrupt: bad page size {page_size} in the header")
    header_pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]
    try:
        wal_size = os.path.getsize(path + "-wal")
    except OSError:
        wal_size = 0
    kind = _kind_of_page_one(path, header)
    if wal_size > 32:
        # A new database's schema may still be in the WAL only (page 1 of the file is blank).
        if kind == "blank":
            newest = _committed_page_one(path + "-wal")
            if newest is not None:
                kind = _kind_of_page_one(path, newest)
        # A WAL with frames may hold pages a checkpoint has not copied yet: a checkpoint writes
        # page 1 (the header, with the new page count) before the pages after the end of the
        # file, so mid-checkpoint (or after a process was killed there) the file is shorter
        # than its header says and is healthy: SQLite finishes the copy from the WAL.
        return kind
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
    return kind


_PAGE_ONE_HEAD = 108  # the 100-byte file header and the header of the schema table's root page
_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _kind_of_page_one(path: str, page: bytes) -> str:
    """``"sqlbus"`` or ``"blank"`` from the start of page 1; DatabaseError for a file of another
    application or of a newer sqlbus."""
    application_id = int.from_bytes(page[68:72], "big")
    user_version = int.from_bytes(page[60:64], "big", signed=True)
    if application_id == APPLICATION_ID:
        if user_version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{path} was made by a newer sqlbus (schema version {user_version}, this one "
                f"reads up to {SCHEMA_VERSION}); upgrade sqlbus"
            )
        return "sqlbus"
    if application_id:
        raise DatabaseError(
            f"{path} is not a sqlbus database (application_id {application_id:#x}); "
            "refusing to open it"
        )
    if user_version:
        raise DatabaseError(
            f"{path} is not a sqlbus database (user_version {user_version} of another "
            "application, no sqlbus application_id); refusing to open it"
        )
    # Page 1 is the root of sqlite_schema: an empty leaf (type 13, no cells) means no tables.
    if len(page) < _PAGE_ONE_HEAD or page[100] != 13 or page[103:105] != b"\0\0":
        raise DatabaseError(
            f"{path} is a SQLite database of another application (it has tables, no sqlbus "
            "application_id); refusing to open it"
        )
    return "blank"


def _committed_page_one(wal_path: str) -> bytes | None:
    """The start of page 1 as the WAL's last commit left it; None when the WAL holds none.

    Frames count from the WAL header's salts on (older frames carry other salts) up to the
    last commit frame. Checksums are not verified: a torn frame exists only after a power
    loss, and then at worst a file is misjudged as foreign (refused, left unchanged) or the
    SQLite-level check in :func:`initialize` refuses it.
    """
    try:
        fd = os.open(wal_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        header = os.pread(fd, 32, 0)
        if len(header) < 32 or int.from_bytes(header[:4], "big") not in _WAL_MAGIC:
            return None
        page_size = int.from_bytes(header[8:12], "big")
        page_size = 65536 if page_size == 1 else page_size
        salts = header[16:24]
        offset, page_one, committed = 32, -1, -1
        while True:
            frame = os.pread(fd, 24, offset)
            if len(frame) < 24 or frame[8:16] != salts:
                break
            if int.from_bytes(frame[:4], "big") == 1:
                page_one = offset + 24
            if frame[4:8] != b"\0\0\0\0":  # a commit frame: the database size after it
                committed = page_one
            offset += 24 + page_size
        return os.pread(fd, _PAGE_ONE_HEAD, committed) if committed >= 0 else None
    finally:
        os.close(fd)


class Connection(apsw.Connection):
    """An apsw connection with a cursor of its own, ``cur``, that the frequent statements
    reuse: ``Connection.execute`` makes and frees a cursor each time, 0.4 us of a 1 us
    statement (measured). Only for statements whose rows are read to the end at once (a
    cursor runs one statement at a time)."""

    cur: apsw.Cursor
    file: int  # its sqlite3_file*, and the fork generation it was opened in (sqlbus.connections)
    generation: int


def open_connection(
    path: str,
    *,
    synchronous: str,
    busy_timeout: float,
    wal_hook: Callable[[int], None] | None = None,
) -> Connection:
    """Open a connection to an existing file with our per-connection settings.

    ``wal_hook(frames)`` is called after each commit with the WAL's length in frames, and
    replaces SQLite's automatic checkpoint (see ``sqlbus.metrics.Checkpointer``).
    """
    conn = Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOMUTEX)
    conn.cur = conn.cursor()
    conn.set_busy_handler(_busy_handler(busy_timeout))
    assert synchronous in ("NORMAL", "FULL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-16000")
    conn.execute("PRAGMA journal_size_limit=67108864")
    if wal_hook is None:
        conn.execute("PRAGMA wal_autocheckpoint=4000")  # few commits pay for a checkpoint
    else:
        def hook(_conn: apsw.Connection, _name: str, frames: int) -> int:
            wal_hook(frames)
            return apsw.SQLITE_OK

        conn.set_wal_hook(hook)
    return conn


def initialize(conn: apsw.Connection, path: str, now: int) -> None:
    """Create the schema in an empty file, or check that an existing file is ours and current
    (upgrading an older schema in one transaction: see :func:`_migrate`)."""
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
        if application_id != APPLICATION_ID and (tables or user_version):
            raise DatabaseError(
                f"{path} is a SQLite database of another application ({tables} schema objects, "
                "no sqlbus mark); refusing to change it"
            )
        if application_id == APPLICATION_ID:
            if user_version not in _MIGRATIONS:
                raise DatabaseError(
                    f"{path} has sqlbus schema version {user_version}, which this version "
                    "cannot migrate"
                )
            for version in range(user_version, SCHEMA_VERSION):
                _MIGRATIONS[version](conn, now)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            commit(conn)
            return
        conn.execute(SCHEMA)
        _add_default_retention(conn)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        commit(conn)
    except BaseException:
        rollback(conn)
        raise


def _migrate_1_to_2(conn: apsw.Connection, now: int) -> None:
    """Schema 1 kept leased rows queued (state 0, ``visible_at`` the lease deadline), so a
    claim walked over every lease other receivers held. Schema 2 gives them a state of their
    own (1; scheduled rows move from 1 to 4); the state CHECK changes with it, which SQLite
    can only do by copying the table; the copy also gives the correlation id a column of its
    own, for the response index (instead of JSON parsed out of every response's body)."""
    conn.execute("ALTER TABLE message RENAME TO message_v1")
    conn.execute(MESSAGE_TABLE)
    conn.execute(
        "INSERT INTO message SELECT seq, message_id, sender, agent, type,"
        " json_extract(CAST(body AS TEXT), '$.headers.correlation_id'), priority,"
        " CASE WHEN state = 0 AND visible_at > ? THEN 1 WHEN state = 1 THEN 4 ELSE state END,"
        " visible_at, expires_at, attempts, claims, sent_at, done_at, last_error, body"
        " FROM message_v1",
        (now,),
    )
    conn.execute("DROP TABLE message_v1")  # and its indexes
    conn.execute(MESSAGE_INDEXES)


def _migrate_2_to_3(conn: apsw.Connection, now: int) -> None:
    """Schema 3 never reuses positions (message rows, dead-letter numbers) and keeps the
    retention policy in the file, starting from the defaults (schema 2 had it per connection).
    AUTOINCREMENT on dead_letter needs a copy of that table (the message table stays as it is);
    the high-water mark starts at the newest message row."""
    conn.execute("ALTER TABLE dead_letter RENAME TO dead_letter_v2")
    conn.execute("DROP INDEX dead_letter_failed_at")
    conn.execute(DEAD_LETTER_TABLE)
    conn.execute("INSERT INTO dead_letter SELECT * FROM dead_letter_v2")
    conn.execute("DROP TABLE dead_letter_v2")
    conn.execute(MESSAGE_HIGH_WATER)
    conn.execute(
        "UPDATE message_high_water SET seq = (SELECT coalesce(max(seq), 0) FROM message)"
    )
    conn.execute(RETENTION_TABLE)
    _add_default_retention(conn)


def _add_shared_bodies(conn: apsw.Connection, now: int) -> None:
    """Schema 4 stores the body of a message to many recipients once (``message_body``);
    rows written before keep their bodies in the row, which reads them as before."""
    conn.execute(SHARED_BODIES)


def _add_interests(conn: apsw.Connection, now: int) -> None:
    """Schema 5 records agents' interests (``interest``); a file upgraded to it starts with
    none, so state changes and events without explicit recipients reach nobody until agents
    subscribe again."""
    conn.execute(INTERESTS)


# from schema version N to N + 1, in the caller's transaction
_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _add_shared_bodies, 4: _add_interests}

PAGE_SIZE = 2048


def set_wal_mode(conn: apsw.Connection, path: str, new_file: bool = False) -> None:
    """Switch the file to WAL (persistent in the file, so only a new file needs it).

    A new file gets 2 KiB pages first (it cannot change once in WAL mode): a commit writes
    every page it touched to the WAL, and with ~300-byte messages, 2 KiB pages measured 35-50%
    more single-message publishes and acks per second here than the default 4 KiB.
    """
    if new_file:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op if someone made tables first
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    if str(mode).lower() != "wal":
        raise DatabaseError(f"{path}: could not switch to WAL journal mode (got {mode!r})")


def begin(conn: Connection) -> None:
    """Start a write transaction.

    IMMEDIATE takes the write lock up front, through the busy handler; a deferred transaction
    that reads and then writes in WAL mode can fail with BUSY without waiting at all.
    """
    conn.cur.execute("BEGIN IMMEDIATE")


def commit(conn: Connection) -> None:
    conn.cur.execute("COMMIT")


def rollback(conn: Connection) -> None:
    """Roll back the open transaction, if any (a failed COMMIT may already have ended it)."""
    if not conn.get_autocommit():
        conn.cur.execute("ROLLBACK")


def begin_read(conn: apsw.Connection) -> None:
    """Start a read transaction that holds one snapshot until :func:`end_read` (a deferred
    BEGIN takes its snapshot at the first read, so read once now)."""
    conn.execute("BEGIN DEFERRED")
    conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()


def end_read(conn: apsw.Connection) -> None:
    """End a read transaction (COMMIT of a read-only transaction only releases the snapshot)."""
    if not conn.get_autocommit():
        conn.execute("COMMIT")


def set_busy_timeout(conn: apsw.Connection, timeout: float) -> None:
    """Make ``conn`` wait up to ``timeout`` seconds for a lock another connection holds."""
    conn.set_busy_handler(_busy_handler(timeout))


def vacuum(conn: apsw.Connection) -> None:
    """Rebuild the file without its free pages (holds the write lock while it runs).

    VACUUM builds the new file in a temporary database first: in a file, so that memory does
    not grow with the database (our connections keep temporary tables in memory otherwise).
    Meant for a connection of its own: the setting stays on it.
    """
    conn.execute("PRAGMA temp_store=FILE")
    conn.execute("VACUUM")


def page_size(conn: apsw.Connection) -> int:
    return int(conn.execute("PRAGMA page_size").fetchall()[0][0])


def checkpoint(conn: apsw.Connection, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """Run a WAL checkpoint; returns (busy, wal frames, frames checkpointed)."""
    assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
    row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
    return int(row[0]), int(row[1]), int(row[2])


def data_version(conn: Connection) -> int:
    """A number that changes when another connection commits (cheap, takes no lock)."""
    return conn.cur.execute("SELECT data_version FROM pragma_data_version()").fetchall()[0][0]


# ---------------------------------------------------------------------------------------------
# Agents


def register_agent(conn: apsw.Connection, agent: str, now: int) -> None:
    conn.execute(
        "INSERT INTO agents (id, registered_at, last_seen, status) VALUES (?, ?, ?, 'active') "
        "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, status = 'active'",
        (agent, now, now),
    )


def touch_agent(conn: Connection, agent: str, now: int, status: str | None = None) -> None:
    conn.cur.execute(
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
# Interests (subscriptions)


def add_interest(conn: apsw.Connection, agent: str, kind: str, pattern: str, now: int) -> None:
    """Record ``agent``'s interest; one already recorded keeps its ``subscribed_at``."""
    conn.execute(
        "INSERT INTO interest (kind, pattern, agent, subscribed_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (kind, pattern, agent, now),
    )


def drop_interest(conn: apsw.Connection, agent: str, kind: str, pattern: str) -> None:
    conn.execute(
        "DELETE FROM interest WHERE kind = ? AND pattern = ? AND agent = ?", (kind, pattern, agent)
    )


def list_interests(conn: apsw.Connection, agent: str | None = None) -> list[tuple[Any, ...]]:
    """(agent, kind, pattern, subscribed_at) of ``agent``'s interests, or of every agent's
    (None), by agent, kind and pattern."""
    return conn.execute(
        "SELECT agent, kind, pattern, subscribed_at FROM interest"
        " WHERE ?1 IS NULL OR agent = ?1 ORDER BY agent, kind, pattern",
        (agent,),
    ).fetchall()


def interested_in_type(conn: Connection, type: str, sender: str) -> list[str]:
    """The agents but ``sender`` interested in messages of ``type`` (or ``*``), by id."""
    return [row[0] for row in conn.cur.execute(
        "SELECT DISTINCT agent FROM interest WHERE kind = 'type' AND pattern IN (?1, '*')"
        " AND agent <> ?2 ORDER BY agent",
        (type, sender),
    )]


def event_interests(conn: Connection, sender: str) -> list[tuple[Any, ...]]:
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
# Publish

QUEUED, LEASED, ACKED, DEAD, SCHEDULED = 0, 1, 2, 3, 4

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
    if len(values) == _COLUMNS:  # one row (a single publish): no chunking
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
    and measured, 18% fewer instructions per row than one statement per row (executemany)."""
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

    The messages of a run share all their row's values but id and body, which are bound once
    per statement: measured, 28% fewer instructions per row than binding all twelve."""
    seq: int | None = _next_seq(conn)  # the first run's first row; the rest follow on
    for to, type, priority, ttl, ids, bodies in runs:
        values: list[Any] = [None] * (2 * len(ids))
        values[0::2], values[1::2] = ids, bodies
        shared = [sender, to, type, priority, now, now + ttl if ttl else None]
        _insert_chunks(conn, _INSERT_SHARED, shared, values, 2, seq)
        seq = None


# ---------------------------------------------------------------------------------------------
# Claim, ack, fail, extend, dead letter

# ``column = ?N COLLATE BINARY`` (the column's own collation, so the same comparison): with a
# plain ``= ?N`` on an indexed column, SQLite 3.54 recompiles a statement that has an ORDER BY
# or a min() over that index at every execution (each new binding voids the plan). Measured:
# a claim SELECT 10 us before, 3 us after; taking a response 15 us before, 4.5 after.
_BINARY = " COLLATE BINARY"
# A claim picks its rows with one SELECT on message_claim and leases them with one executemany
# by seq: measured here, a quarter of the cost of ``UPDATE ... WHERE seq IN (SELECT ... LIMIT
# n) RETURNING`` for n = 1, and cheaper per row for batches too.
# A claim takes the first ready rows in delivery order from two places: queued rows
# (message_claim, in order already) and rows waiting for a time that has come, scheduled
# ones due and leases that ran out (message_wait; few). Usually there are none of the second
# kind, and a probe for them costs far less than the UNION ALL that merges both (its sort
# builds a temporary table: measured 20k instructions a claim), so the claim probes first.
# A queued row is ready whatever the reader's "now" says. A reader takes its "now" before its
# snapshot, so a row committed in between is in the snapshot with a visible_at (the writer's
# "now") later than the reader's: with a visible_at test the look saw it as not ready, its
# data_version already counted the commit, and the reader slept its whole wait (caught with a
# trace: 2 stalls of 3 s in 300,000 ping-pong round trips; none in 150,000 without the test).
_QUEUED_READY = f" FROM message WHERE agent = ?1{_BINARY} AND state = 0"
_WAITING_DUE = f" FROM message WHERE agent = ?1{_BINARY} AND (state = 1 OR state = 4) AND visible_at <= ?2"
_READY_TYPES = " AND type IN (SELECT value FROM json_each(?3))"
_READY_NOT_AWAITED = (
    " AND NOT (type = 'response' AND correlation_id IN (SELECT value FROM json_each(?4)))"
)
# The body is read only when its stored length (known without reading it) is at most ?5, the
# receiver's limit: a larger one is NULL here and never loaded.
_CLAIMED = (
    "SELECT seq, claims + 1, attempts + 1, priority, expires_at, sent_at,"
    f" CASE WHEN {_BODY_LENGTH} <= ?5 THEN {_BODY} END"
)


def _filters(types: bool, skip: bool) -> str:
    return (_READY_TYPES if types else "") + (_READY_NOT_AWAITED if skip else "")


# The LIMIT is written into the text, not bound: SQLite (3.54) plans with a bound LIMIT's
# value, so every new binding of it recompiles the statement (measured: ~6 us of a ~10 us
# claim). apsw caches each text once; a receiver uses one or two limits.
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
_NEXT_DUE = f"(SELECT min(visible_at) FROM message WHERE agent = ?1{_BINARY} AND (state = 1 OR state = 4))"
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
) -> tuple[list[tuple[int, int, int, int, int | None, int, bytes | None]], bool]:
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
    due = conn.cur.execute(_ANY_DUE, (agent, now)).fetchall()[0][0]
    select = _SELECT_READY[key] if due else _SELECT_QUEUED[key]
    rows = conn.cur.execute(
        select + str(min(limit, 1 << 62) + 1),
        _ready_params(agent, now, types_json, skip_json, due=bool(due), max_body=max_body),
    ).fetchall()
    more = len(rows) > limit
    if more:
        del rows[limit:]
    if len(rows) == 1:
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


def ack(conn: Connection, leases: Sequence[tuple[int, int]], now: int) -> bool:
    """Mark leased rows acked, given as (seq, claims); False when any of those leases is
    gone (the caller then rolls the whole transaction back: a batch ack is all or nothing)."""
    if len(leases) == 1:
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
    conn.cur.execute(
        "INSERT INTO error_counts (name, count) VALUES (?, 1) "
        "ON CONFLICT (name) DO UPDATE SET count = count + 1",
        (name,),
    )


def next_due(conn: apsw.Connection, agent: str) -> int | None:
    """Earliest time (ms) at which one of ``agent``'s rows becomes ready: a retry, a delayed
    message or a lease running out (past: it is due now); None when nothing is pending."""
    rows = conn.execute(
        f"SELECT min(visible_at) FROM message WHERE agent = ?1{_BINARY} AND (state = 1 OR state = 4)",
        (agent,),
    ).fetchall()
    return rows[0][0] if rows else None


# ---------------------------------------------------------------------------------------------
# Dead letters and the archive

# ?3 is the reader's limit on a body's stored length: a longer body is not read (NULL), and the
# message's own columns stand in for it.
_DEAD = (
    "SELECT d.id, m.agent, d.reason, d.error_name, d.error_message, d.traceback, d.context,"
    f" d.failed_at, d.attempts, CASE WHEN {_BODY_LENGTH} <= ?3 THEN {_BODY} END, m.message_id,"
    f" m.sender, m.type, m.priority, m.sent_at, {_BODY_LENGTH}"
    " FROM dead_letter AS d JOIN message AS m ON m.seq = d.seq"
)


def list_dead_letters(
    conn: apsw.Connection, agent: str | None, limit: int, max_body: int = 1 << 62
) -> list[tuple[Any, ...]]:
    """Dead letters, newest first: (id, agent, reason, error_name, error_message, traceback,
    context, failed_at, attempts, body or None when longer than ``max_body``, message_id,
    sender, type, priority, sent_at, body length)."""
    return conn.execute(
        f"{_DEAD} WHERE ?1 IS NULL OR m.agent = ?1 ORDER BY d.id DESC LIMIT ?2",
        (agent, limit, max_body),
    ).fetchall()


def get_dead_letter(
    conn: apsw.Connection, dead_letter_id: int | None, message_id: str | None = None,
    max_body: int = 1 << 62,
) -> tuple[Any, ...] | None:
    """A dead letter by number, or the newest of message ``message_id``'s (as
    :func:`list_dead_letters`), or None."""
    rows = conn.execute(
        f"{_DEAD} WHERE d.id = ?1 AND ?2 IS NULL"
        if dead_letter_id is not None else
        f"{_DEAD} WHERE m.message_id = ?2 ORDER BY d.id DESC LIMIT 1",
        (dead_letter_id, message_id, max_body),
    ).fetchall()
    return rows[0] if rows else None


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


def _with_ttls(conn: apsw.Connection, rows: Sequence[tuple[Any, ...]]) -> list[tuple[int, str, Any]]:
    """``_REQUEUE_TARGET``'s rows as (id, message_id, ttl or None)."""
    shared: dict[int, Any] = {}
    result = []
    for dead_letter_id, message_id, body_id, ttl in rows:
        if body_id is not None:
            if body_id not in shared:
                found = conn.execute(_SHARED_TTL, (body_id,)).fetchall()
                shared[body_id] = found[0][0] if found else None
            ttl = shared[body_id]
        result.append((dead_letter_id, message_id, ttl))
    return result


def requeue_targets(
    conn: apsw.Connection, dead_letter_id: int | None, message_id: str | None
) -> list[tuple[int, str, Any]]:
    """(id, message_id, ttl or None) of the dead letter numbered ``dead_letter_id``, or of
    every dead letter of message ``message_id``, oldest first."""
    if dead_letter_id is not None:
        rows = conn.execute(f"{_REQUEUE_TARGET} WHERE d.id = ?", (dead_letter_id,)).fetchall()
    else:
        rows = conn.execute(
            f"{_REQUEUE_TARGET} WHERE m.message_id = ? ORDER BY d.id", (message_id,)
        ).fetchall()
    return _with_ttls(conn, rows)


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


def list_sent(
    conn: apsw.Connection, agent: str | None, limit: int, max_body: int = 1 << 62
) -> list[tuple[Any, ...]]:
    """Archived messages, newest first: (recipients, and :data:`_LISTED`'s columns with the
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
        rows = conn.execute(
            "SELECT agent, sent_at, seq FROM message WHERE message_id = ? ORDER BY seq",
            (message_id,),
        ).fetchall()
        if not rows:  # the message_id index names a row the table lacks
            raise DatabaseError(
                f"the file is corrupt: message {message_id!r} is in an index but not in its table; "
                "run 'sqlbus check' and restore from a 'sqlbus backup'"
            )
        recipients = [row[0] for row in rows if row[0] is not None]
        listed = conn.execute(f"SELECT {_LISTED} FROM message WHERE seq = ?1", (rows[0][2], max_body))
        result.append((recipients, *listed.fetchall()[0]))
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


# ---------------------------------------------------------------------------------------------
# Watch (sqlbus.watch): a snapshot of state and the log position it corresponds to


def state_snapshot(conn: apsw.Connection, prefix: str) -> tuple[list[tuple[Any, ...]], int]:
    """Live entries under ``prefix`` (as :func:`state_entries`) and the state_log head, read
    in one read transaction so that the log after that head holds exactly the later changes.
    Inside a caller's open transaction, reads there (already one snapshot)."""
    if not conn.get_autocommit():
        return state_entries(conn, prefix), state_log_head(conn)
    begin_read(conn)
    try:
        entries = state_entries(conn, prefix)
        head = state_log_head(conn)
    finally:
        end_read(conn)
    return entries, head


# ---------------------------------------------------------------------------------------------
# Metrics and upkeep: totals, depths, retention (prune), checks, peek and tail
#
# Metrics are read from the rows themselves (no counter is touched by publish, claim or ack);
# what retention deletes is folded into ``counters`` in the same transaction, so totals never
# go down when the archive is pruned.

_RETIRED = " RETURNING message_id, sender, agent, state, sent_at, done_at"


def add_counters(conn: apsw.Connection, deltas: Sequence[tuple[str, str, int]]) -> None:
    """Add ``(name, agent, delta)`` to the counters (agent ``''``: the whole bus)."""
    conn.executemany(
        "INSERT INTO counters (name, agent, value) VALUES (?, ?, ?)"
        " ON CONFLICT (name, agent) DO UPDATE SET value = value + excluded.value",
        [d for d in deltas if d[2]],
    )


def read_counters(conn: apsw.Connection) -> list[tuple[str, str, int]]:
    """Every counter: (name, agent, value)."""
    return conn.execute("SELECT name, agent, value FROM counters ORDER BY name, agent").fetchall()


def fold_retired(conn: apsw.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Fold deleted message rows (message_id, sender, agent, state, sent_at, done_at, reason)
    into the counters: acked rows into received/delivery_ms, dead rows into dead/expired, and
    a message whose last row went into sent (its sender's), so every total stays the same."""
    deltas: dict[tuple[str, str], int] = {}

    def add(name: str, agent: str, value: int = 1) -> None:
        deltas[name, agent] = deltas.get((name, agent), 0) + value

    # (id, sender) as sent_rows() counts them: one message per id and sender.
    senders: set[tuple[str, str]] = set()
    for message_id, sender, agent, state, sent_at, done_at, reason in rows:
        senders.add((message_id, sender))
        if agent is None:
            continue
        if state == ACKED:
            add("received", agent)
            add("delivery_ms", agent, done_at - sent_at)
        elif state == DEAD:
            add("dead", agent)
            if reason == "expired":
                add("expired", agent)
    for message_id, sender in senders:
        if not conn.execute(
            "SELECT 1 FROM message WHERE message_id = ? AND sender = ? LIMIT 1",
            (message_id, sender),
        ).fetchall():
            add("sent", sender)
    add_counters(conn, [(name, agent, value) for (name, agent), value in deltas.items()])


def retire_rows(conn: apsw.Connection, dead: Sequence[tuple[int, str]]) -> None:
    """Delete the message rows of dead-letter records already deleted (``(seq, reason)``)
    and fold them into the counters."""
    rows: list[tuple[Any, ...]] = []
    for seq, reason in dead:
        for row in conn.execute("DELETE FROM message WHERE seq = ?" + _RETIRED, (seq,)):
            rows.append((*row, reason))
    fold_retired(conn, rows)


def _archive_bound(conn: apsw.Connection, cutoff: int) -> int:
    """A seq below which every row acked before ``cutoff`` lies: the first row sent at or
    after it (a row is acked after it is sent). Walks only the rows older than the cutoff,
    which retention keeps few, instead of the whole table: no index on done_at, because an
    index the ack must update would cost every ack an extra page."""
    rows = conn.execute(
        "SELECT seq FROM message WHERE sent_at >= ? ORDER BY seq LIMIT 1", (cutoff,)
    ).fetchall()
    return rows[0][0] if rows else 1 << 62


def archive_bound(conn: apsw.Connection, cutoff: int) -> int:
    """The seq below which :func:`prune_acked` looks (see ``_archive_bound``); compute it once
    for a long prune of many batches instead of once per batch."""
    return _archive_bound(conn, cutoff)


def prune_acked(
    conn: apsw.Connection, cutoff: int, limit: int, after: int = 0, bound: int | None = None
) -> tuple[int, int]:
    """Delete up to ``limit`` acked rows (the sent archive) acked before ``cutoff`` ms, oldest
    first, with seq in (``after``, ``bound``), folding them into the counters. Returns (how
    many, the last seq looked at): pass it as ``after`` to the next batch so that rows kept
    at the front (pending, dead) are not walked again."""
    if bound is None:
        bound = _archive_bound(conn, cutoff)
    seqs = conn.execute(
        "SELECT seq FROM message WHERE seq > ?1 AND seq < ?2 AND state = 2 AND done_at < ?3"
        " ORDER BY seq LIMIT ?4",
        (after, bound, cutoff, limit),
    ).fetchall()
    if not seqs:
        return 0, after
    rows = conn.execute(
        "DELETE FROM message WHERE seq BETWEEN ?1 AND ?2 AND state = 2 AND done_at < ?3"
        + _RETIRED,
        (seqs[0][0], seqs[-1][0], cutoff),
    ).fetchall()
    fold_retired(conn, [(*row, None) for row in rows])
    return len(rows), seqs[-1][0]


_NO_CUTOFF = 1 << 62  # later than any time (ms) and any seq


def archive_excess(conn: apsw.Connection, max_messages: int) -> int:
    """How many acked rows (the sent archive) there are above ``max_messages``.

    Counts index entries, never the archive's rows: every row but the queued, waiting and
    dead ones (two partial indexes and the dead-letter table) is acked. It counts only when
    the table spans more positions than ``max_messages`` (otherwise it holds fewer rows)."""
    span: tuple[Any, ...] = conn.execute(
        "SELECT (SELECT max(seq) FROM message) - (SELECT min(seq) FROM message) + 1"
    ).fetchall()[0]
    if span[0] is None or span[0] <= max_messages:
        return 0
    acked: Any = conn.execute(
        "SELECT (SELECT count(*) FROM message) - (SELECT count(*) FROM message WHERE state = 0)"
        " - (SELECT count(*) FROM message WHERE (state = 1 OR state = 4))"
        " - (SELECT count(*) FROM dead_letter)"
    ).fetchall()[0][0]
    return max(0, acked - max_messages)


def prune_oldest_acked(conn: apsw.Connection, limit: int, after: int = 0) -> tuple[int, int]:
    """Delete up to ``limit`` of the oldest acked rows whatever their age (the archive is over
    its ``archive_max_messages``), folding them into the counters; returns as
    :func:`prune_acked`."""
    return prune_acked(conn, _NO_CUTOFF, limit, after, _NO_CUTOFF)


def get_retention(conn: apsw.Connection) -> tuple[int | None, int | None, int | None]:
    """The stored retention policy: (archive ms, dead-letter ms, archive max messages); None
    keeps them for ever (no bound)."""
    row: tuple[Any, ...] = conn.execute(
        "SELECT archive_ms, dead_ms, archive_max_messages FROM retention"
    ).fetchall()[0]
    return row[0], row[1], row[2]


def set_retention(
    conn: apsw.Connection, archive_ms: int | None, dead_ms: int | None, max_messages: int | None
) -> None:
    conn.execute(
        "UPDATE retention SET archive_ms = ?, dead_ms = ?, archive_max_messages = ?",
        (archive_ms, dead_ms, max_messages),
    )


def prune_dead(conn: apsw.Connection, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` dead letters (record and row) that failed before ``cutoff`` ms,
    oldest first, folding them into the counters; returns how many."""
    dead = conn.execute(
        "DELETE FROM dead_letter WHERE id IN (SELECT id FROM dead_letter WHERE failed_at < ?"
        " ORDER BY failed_at LIMIT ?) RETURNING seq, reason",
        (cutoff, limit),
    ).fetchall()
    retire_rows(conn, dead)
    return len(dead)


def prune_state_log(conn: apsw.Connection, cutoff: int, limit: int) -> int:
    """Delete up to ``limit`` of the oldest state changes logged before ``cutoff`` (ms).

    Only the log (what ``watch`` replays) shrinks; ``state`` keeps every key's latest version.
    Looks at the ``limit`` oldest entries only, so a pass with nothing to delete is cheap. The
    newest entry stays, however old: the next change is numbered after it, so a watch that
    stands there sees it (positions never go back; a watch replays only what follows it).
    """
    conn.execute(
        "DELETE FROM state_log WHERE seq IN (SELECT seq FROM state_log ORDER BY seq LIMIT ?)"
        " AND updated_at < ? AND seq < (SELECT max(seq) FROM state_log)",
        (limit, cutoff),
    )
    return conn.changes()


def count_prunable(
    conn: apsw.Connection, acked_cutoff: int | None, dead_cutoff: int | None
) -> tuple[int, int]:
    """How many acked rows and dead letters the cutoffs would prune (None: none)."""
    acked = dead = 0
    if acked_cutoff is not None:
        acked = conn.execute(
            "SELECT count(*) FROM message WHERE seq < ? AND state = 2 AND done_at < ?",
            (_archive_bound(conn, acked_cutoff), acked_cutoff),
        ).fetchall()[0][0]
    if dead_cutoff is not None:
        dead = conn.execute(
            "SELECT count(*) FROM dead_letter WHERE failed_at < ?", (dead_cutoff,)
        ).fetchall()[0][0]
    return acked, dead


# How stats and peek name a row of an inbox at ``now`` (?1), as a claim would treat it: an
# expired message is never delivered again (a running lease stays leased: its holder may still
# ack it); a queued row, a due retry and a lease that ran out are ready; a waiting row that
# was delivered before is retrying, one that never was is a delayed publish (scheduled).
_STATUS = (
    "CASE WHEN expires_at < ?1 AND NOT (state = 1 AND visible_at > ?1) THEN 'expired'"
    " WHEN state = 0 OR visible_at <= ?1 THEN 'ready' WHEN state = 1 THEN 'leased'"
    " WHEN claims > 0 THEN 'retrying' ELSE 'scheduled' END"
)
_INBOX_STATES = ("ready", "leased", "retrying", "scheduled", "expired")
_DEPTH = f"SELECT agent, {_STATUS} AS status, count(*), min(sent_at) FROM message WHERE agent IS NOT NULL"
# the predicates of the two indexes (message_claim, message_wait), so each is read alone
_DEPTH_QUEUED = " AND state = 0 GROUP BY agent, status"
_DEPTH_WAITING = " AND (state = 1 OR state = 4) GROUP BY agent, status"


def depth_rows(conn: apsw.Connection, now: int) -> list[tuple[Any, ...]]:
    """Per recipient: (agent, ready, leased, retrying, scheduled, expired, dead, sent_at of the
    oldest ready row or None), every row counted once, in the state ``_STATUS`` gives it.

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
    for agent, dead in conn.execute(
        "SELECT m.agent, count(*) FROM dead_letter AS d JOIN message AS m ON m.seq = d.seq"
        " WHERE m.agent IS NOT NULL GROUP BY m.agent"
    ):
        entry(agent)[5] = dead
    return [(agent, *depths[agent]) for agent in sorted(depths)]


def acked_rows(conn: apsw.Connection, now: int) -> list[tuple[str, int, int, int, int]]:
    """Per recipient: (agent, acked, sum of done_at - sent_at in ms, acked in the last
    second, acked in the last minute). A scan of the whole table: the price of keeping the
    ack path free of counter updates."""
    return conn.execute(
        "SELECT agent, count(*), sum(done_at - sent_at), sum(done_at > ?1 - 1000),"
        " sum(done_at > ?1 - 60000) FROM message WHERE state = 2 AND agent IS NOT NULL"
        " GROUP BY agent",
        (now,),
    ).fetchall()


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


# Expired rows as _STATUS names them (a running lease stays leased), one query per partial
# index (message_claim, message_wait) so the archive is never read.
_EXPIRED_QUEUED = " FROM message WHERE state = 0 AND expires_at < ?1"
_EXPIRED_WAITING = (
    " FROM message WHERE (state = 1 OR state = 4) AND expires_at < ?1"
    " AND NOT (state = 1 AND visible_at > ?1)"
)
_SELECT_EXPIRED = ("SELECT seq" + _EXPIRED_QUEUED + " LIMIT ?2",
                   "SELECT seq" + _EXPIRED_WAITING + " LIMIT ?2")
_COUNT_EXPIRED = ("SELECT count(*)" + _EXPIRED_QUEUED, "SELECT count(*)" + _EXPIRED_WAITING)


def expired_rows(conn: apsw.Connection, now: int, limit: int) -> list[int]:
    """Up to ``limit`` expired messages still in an inbox (never delivered again; the next
    claim on that inbox or background upkeep moves them to dead letters): their seqs."""
    seqs: list[int] = []
    for select in _SELECT_EXPIRED:
        seqs += [row[0] for row in conn.execute(select, (now, limit - len(seqs)))]
        if len(seqs) >= limit:
            break
    return seqs


def count_expired(conn: apsw.Connection, now: int) -> int:
    """Expired messages not yet moved to dead letters."""
    total = 0
    for count in _COUNT_EXPIRED:
        rows = conn.execute(count, (now,)).fetchall()
        total += int(rows[0][0] or 0)
    return total


def dead_letter_expired(conn: apsw.Connection, seqs: Sequence[int], now: int) -> int:
    """Move the rows ``seqs`` that are still expired at ``now`` to dead letters, reason
    ``expired``, failed at their expiry time, attempts as they stand; returns how many."""
    moved = []
    for seq in seqs:
        moved += conn.execute(
            "UPDATE message SET state = 3, done_at = ?1 WHERE seq = ?2"
            " AND state IN (0, 1, 4) AND expires_at < ?1 AND NOT (state = 1 AND visible_at > ?1)"
            " RETURNING seq, expires_at, attempts",
            (now, seq),
        ).fetchall()
    if moved:
        conn.executemany(
            "INSERT INTO dead_letter (seq, reason, failed_at, attempts) VALUES (?, 'expired', ?, ?)",
            moved,
        )
    return len(moved)


def expired_leases(conn: apsw.Connection, now: int) -> int:
    """Deliveries whose lease ran out without an ack or a fail (a receiver crashed, hung or
    released them) and that nobody has claimed again yet."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM message WHERE state = 0 AND attempts > 0 AND"
        " visible_at <= ?1) + (SELECT count(*) FROM message WHERE (state = 1 OR state = 4) AND"
        " state = 1 AND visible_at <= ?1)",
        (now,),
    ).fetchall()[0][0]


def rows_without_body(conn: apsw.Connection) -> int:
    """Message rows whose shared body is missing (a damaged file): a scan of the table."""
    rows = conn.execute(f"SELECT count(*) FROM message WHERE {_BODY_LENGTH} = 0").fetchall()
    return int(rows[0][0] or 0)


def integrity_check(conn: apsw.Connection, max_errors: int = 20) -> list[str]:
    """SQLite's integrity check: ``['ok']`` or up to ``max_errors`` problems."""
    return [row[0] for row in conn.execute(f"PRAGMA integrity_check({int(max_errors)})")]


def schema_marks(conn: apsw.Connection) -> tuple[int, int]:
    """(application_id, user_version) of the file."""
    return (
        conn.execute("PRAGMA application_id").fetchall()[0][0],
        conn.execute("PRAGMA user_version").fetchall()[0][0],
    )


_LIVE = " AND (expires_at IS NULL OR expires_at >= ?1)"
_PEEK_INBOX = " FROM message WHERE agent = ?2 AND "
_PEEK_READY = (  # (-priority, seq): receive's order
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "state = 0" + _LIVE
    + " ORDER BY priority DESC, seq LIMIT ?3",
    "SELECT -priority, seq, 'ready'" + _PEEK_INBOX + "(state = 1 OR state = 4) AND visible_at <= ?1"
    + _LIVE + " ORDER BY priority DESC, seq LIMIT ?3",
)
_PEEK_WAITING = (  # by when they become claimable
    f"SELECT visible_at, seq, {_STATUS}" + _PEEK_INBOX + "(state = 1 OR state = 4) AND visible_at > ?1"
    " AND (state = 1 OR expires_at IS NULL OR expires_at >= ?1) ORDER BY visible_at, seq LIMIT ?3",
)
_PEEK_EXPIRED = (  # by when they expired
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + "state = 0 AND expires_at < ?1"
    " ORDER BY expires_at, seq LIMIT ?3",
    "SELECT expires_at, seq, 'expired'" + _PEEK_INBOX + "(state = 1 OR state = 4) AND expires_at < ?1"
    " AND NOT (state = 1 AND visible_at > ?1) ORDER BY expires_at, seq LIMIT ?3",
)


def peek_rows(
    conn: apsw.Connection, agent: str, now: int, limit: int, max_body: int = 1 << 62
) -> list[tuple[Any, ...]]:
    """An agent's inbox without claiming: (status, visible_at, attempts, and
    :data:`_LISTED`'s columns with the body None when longer than ``max_body``), the
    status as ``_STATUS`` names it at ``now``. Ready rows come first in the order a claim
    takes them, then the others by when they become claimable (lease end, due time), expired
    ones last. A group is read only while ``limit`` is not reached (the ready rows of a long
    queue from the head of its index), and bodies only of the rows listed. Call it inside one
    read transaction."""
    chosen: list[tuple[int, str]] = []
    for queries in (_PEEK_READY, _PEEK_WAITING, _PEEK_EXPIRED):
        room = limit - len(chosen)
        if room <= 0:
            break
        group = [row for sql in queries for row in conn.execute(sql, (now, agent, room))]
        group.sort()
        chosen += [(seq, status) for _key, seq, status in group[:room]]
    rows = []
    for seq, status in chosen:
        listed = conn.execute(
            f"SELECT visible_at, attempts, {_LISTED} FROM message WHERE seq = ?1", (seq, max_body)
        ).fetchall()[0]
        rows.append((status, *listed))
    return rows


def last_seq(conn: apsw.Connection) -> int:
    """The newest row's seq (0 when empty): where a tail starts."""
    return conn.execute("SELECT coalesce(max(seq), 0) FROM message").fetchall()[0][0]


def rows_after(
    conn: apsw.Connection, after_seq: int, limit: int, max_body: int = 1 << 62
) -> list[tuple[Any, ...]]:
    """Rows published after ``after_seq``, in publish order: (seq, agent, and
    :data:`_LISTED`'s columns with the body None when longer than ``max_body``). A message's
    rows come together; only the first of each carries the body (the others None)."""
    rows = conn.execute(
        "SELECT seq, agent, message_id FROM message WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    result = []
    for index, (seq, agent, message_id) in enumerate(rows):
        if index and rows[index - 1][2] == message_id:
            result.append((seq, agent, message_id, None, None, None, None, None, None))
            continue
        listed = conn.execute(f"SELECT {_LISTED} FROM message WHERE seq = ?1", (seq, max_body))
        result.append((seq, agent, *listed.fetchall()[0]))
    return result


def dead_letter_ids(
    conn: apsw.Connection, agent: str | None, reason: str | None
) -> list[tuple[int, str, Any]]:
    """(id, message_id, ttl or None) of the dead letters of ``agent`` with ``reason`` (None:
    any), oldest first (see :func:`requeue_targets`)."""
    return _with_ttls(conn, conn.execute(
        f"{_REQUEUE_TARGET} WHERE (?1 IS NULL OR m.agent = ?1) AND (?2 IS NULL OR d.reason = ?2)"
        " ORDER BY d.id",
        (agent, reason),
    ).fetchall())


# ---------------------------------------------------------------------------------------------
# Run loop and request/response (sqlbus.worker)
#
# A requester takes its own response by correlation id (index message_response), and a run
# loop of the same agent in the same process skips responses that a local request awaits, so
# the loop never steals them. Requests that timed out are remembered in request_timeout so
# that their late responses are discarded and counted instead of reaching a handler.

_RESPONSE_OF = f"agent = ?1{_BINARY} AND type = 'response' AND correlation_id = ?2{_BINARY}"
_RESPONSE_WHERE = _RESPONSE_OF + " AND state = 0"  # queued = ready (see _QUEUED_READY)


def find_response(
    conn: Connection, agent: str, correlation_id: str
) -> tuple[int, bytes | None, int]:
    """A requester's look for its response, in one read: (``data_version`` to wait on, the
    body of a direct reply or None, 1 when a response waits in the inbox instead).

    A direct reply (the request had ``direct_reply``) was written as delivered by the
    responder's ack, so the requester only reads it; one sent otherwise waits in the inbox
    and is taken with :func:`take_response`. ``data_version`` comes from the same snapshot,
    so a reply committed after this look changes it.
    """
    rows = conn.cur.execute(
        "SELECT (SELECT data_version FROM pragma_data_version()),"
        f" (SELECT {_BODY} FROM message WHERE {_RESPONSE_OF} AND state = 2 AND claims = 0"
        " ORDER BY seq LIMIT 1),"
        f" EXISTS (SELECT 1 FROM message WHERE {_RESPONSE_WHERE})",
        (agent, correlation_id),
    ).fetchall()
    version, body, waiting = rows[0]
    return version, body, waiting


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
        f" RETURNING seq, {_BODY}",
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
