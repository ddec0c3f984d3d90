"""The schema of a sqlbus file: its tables and indexes, the upgrades from older schema
versions, the SQL fragments several modules share, and the check of a file's bytes before
SQLite opens it.

Tables (all STRICT):

- ``message``: one row per (message, recipient), from publish until pruned. It is the inbox,
  the retry queue and the sent archive at once, so a publish writes one row (per recipient)
  and an ack updates it: every extra B-tree page a commit touches is a large share of a small
  commit's cost, so state moves inside one row instead of between tables, and partial indexes
  keep only the rows each query needs.
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
import stat

import apsw

from ..backend import ACKED, DEAD, LEASED, QUEUED, SCHEDULED  # noqa: F401 - re-exported
from ..errors import DatabaseError
from .connection import begin, commit, rollback

SCHEMA_VERSION = 5
APPLICATION_ID = 0x5153_4255  # "QSBU": marks a file as a sqlbus database
SQLITE_HEADER = b"SQLite format 3\x00"


# ---------------------------------------------------------------------------------------------
# Tables

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
# Fragments of SQL that more than one module's statements are made of

# The row's body and the row's body length, as every statement that reads a message row
# must take them: from the row, or shared (the row's body is empty then; a message's JSON
# never is). The test is length(body), which SQLite answers from the record header, so an
# inline body's overflow pages are not read to learn which case it is (body_id, stored
# after the body, would need them). A shared body that is missing (a damaged file) reads
# as empty, which no decoder accepts.
BODY = (
    "CASE WHEN length(body) THEN body"
    " ELSE coalesce((SELECT s.body FROM message_body AS s WHERE s.id = body_id), X'') END"
)
BODY_LENGTH = (
    "CASE WHEN length(body) THEN length(body)"
    " ELSE coalesce((SELECT length(s.body) FROM message_body AS s WHERE s.id = body_id), 0) END"
)

# What a listing reads of a message row (?1 its seq, ?2 the reader's limit on a body's
# length): the columns that stand in for a body too long to load, the body's length, and the
# body itself only when it is within the limit (else NULL, never read).
LISTED = (
    "message_id, sender, type, priority, sent_at, " + BODY_LENGTH
    + " AS length, CASE WHEN " + BODY_LENGTH + " <= ?2 THEN " + BODY + " END"
)

# ``column = ?N COLLATE BINARY`` (the column's own collation, so the same comparison) where
# a bound value meets an indexed column in a statement with an ORDER BY or a min() over that
# index: with a plain ``= ?N``, SQLite (3.54) re-prepares such a statement at every execution,
# because each new binding voids its plan.
BINARY = " COLLATE BINARY"

# Rows waiting for a time (leased or scheduled), written exactly as message_wait's WHERE:
# SQLite uses a partial index only when the query's WHERE holds the index's WHERE term as
# written, so ``state = 1`` alone, or ``state IN (1, 4)``, would not use it.
WAITING = "(state = 1 OR state = 4)"

# How stats and peek name a row of an inbox at ``now`` (?1), as a claim would treat it: an
# expired message is never delivered again (a running lease stays leased: its holder may still
# ack it); a queued row, a due retry and a lease that ran out are ready; a waiting row that
# was delivered before is retrying, one that never was is a delayed publish (scheduled).
STATUS = (
    "CASE WHEN expires_at < ?1 AND NOT (state = 1 AND visible_at > ?1) THEN 'expired'"
    " WHEN state = 0 OR visible_at <= ?1 THEN 'ready' WHEN state = 1 THEN 'leased'"
    " WHEN claims > 0 THEN 'retrying' ELSE 'scheduled' END"
)

# ---------------------------------------------------------------------------------------------
# Making and upgrading the schema


def initialize(conn: apsw.Connection, path: str, now: int) -> None:
    """Create the schema in an empty file, or check that an existing file is ours and current
    (upgrading an older schema in one transaction: see ``_MIGRATIONS``). Begins and ends its
    own transaction."""
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

# ---------------------------------------------------------------------------------------------
# Checking a file before SQLite opens it

_PAGE_ONE_HEAD = 108  # the 100-byte file header and the header of the schema table's root page
_WAL_MAGIC = (0x377F0682, 0x377F0683)


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
