"""Operating a bus: retention (the stored policy, prune, background upkeep), integrity checks,
online backup, vacuum, and looking into inboxes and the archive without claiming (peek, tail).

>>> bus.set_retention(archive_retention=86_400.0)     # doctest: +SKIP
>>> bus.check().ok, bus.backup("copy.db").pages       # doctest: +SKIP

The :class:`sqlbus.Bus` methods of the same names are the public entry points; the CLI prints
what they return. What retention deletes is folded into the ``counters`` table in the same
transaction, so metrics totals survive pruning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import apsw
import msgspec

from . import connections
from .arguments import STORED, Stored, seconds
from .backend import PeekRow, TailRow
from .engine import Engine
from .errors import DatabaseError
from .messages import Message, iso_ms, listed_message
from .metrics import snapshot
from .records import Lease, MessageTrace, RecipientRecord, SentRecord, dead_letter_from_row
from .sqlite import storage as sqlite_storage
from .sqlite.checkpoint import WAL_WAIT, truncate_wal
from .sqlite.engine import SqliteEngine
from .sqlite.files import file_sizes

UPKEEP_EVERY = 60.0  # s: how often each process runs a background retention pass
UPKEEP_CATCH_UP = 1.0  # s: ... or this soon again when the last pass was a full batch
UPKEEP_BATCH = 2000  # rows per background pass: a few ms of write lock
UPKEEP_EXCESS = 10 * UPKEEP_BATCH  # rows above archive_max_messages one pass may prune


class InboxEntry(msgspec.Struct, kw_only=True):
    """A message in an inbox, seen without claiming it: ``status`` is one of the states of
    :class:`QueueDepth` but ``dead``; ``visible_at`` (ISO 8601 UTC) is when a lease ends or a
    retry or delayed message comes due; ``attempts`` deliveries so far."""

    message: Message
    status: str
    attempts: int
    visible_at: str
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


class PeekPage(msgspec.Struct, kw_only=True):
    """A page of an inbox (:meth:`sqlbus.Bus.peek_page`): ``entries`` in peek's order, and
    ``after``, the position to ask for the next page with (None: this page reached the end)."""

    entries: list[InboxEntry]
    after: str | None


class PruneResult(msgspec.Struct, kw_only=True):
    """What a prune deleted: acked rows of the sent archive and dead letters."""

    acked: int
    dead_letters: int


class Retention(msgspec.Struct, kw_only=True):
    """The retention policy stored in the database, the same for every process (SPEC 2.2).

    Acked messages (the sent archive, and the state change log ``watch`` replays) are deleted
    ``archive_retention`` seconds after their ack or write, dead letters ``dead_retention``
    seconds after they failed; above ``archive_max_messages`` acked messages the oldest go
    first. None keeps them for ever (no bound)."""

    archive_retention: float | None
    dead_retention: float | None
    archive_max_messages: int | None


class CheckReport(msgspec.Struct, kw_only=True):
    """The health of a database file (``sqlbus check``). ``ok`` is False when ``problems``
    is not empty; ``wal_pinned`` says a reader holds an old snapshot, so the WAL cannot be
    checkpointed past it and grows."""

    ok: bool
    problems: list[str]
    integrity: list[str]
    schema_version: int
    supported_schema_version: int
    db_bytes: int
    wal_bytes: int
    wal_frames: int
    wal_frames_checkpointed: int
    wal_pinned: bool
    expired_leases: int
    # Expired messages still in an inbox: normal (the next claim or upkeep moves them to dead
    # letters), so information, not a problem.
    expired_messages: int = 0
    backend: str = "sqlite"  # or "postgresql" (no WAL figures; pool figures instead)
    pool: dict[str, int] | None = None


class BackupResult(msgspec.Struct, kw_only=True):
    """A finished backup: where, how many pages and bytes, how long it took (seconds)."""

    dest: str
    pages: int
    bytes: int
    seconds: float


class VacuumResult(msgspec.Struct, kw_only=True):
    """File sizes (database plus WAL, bytes) before and after a vacuum. ``shrunk`` is True
    when the file was rebuilt without its free pages and the WAL truncated; else False, and
    ``reason`` says why."""

    bytes_before: int
    bytes_after: int
    shrunk: bool
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Retention


def _retention_ms(value: float | None, name: str) -> int | None:
    """A retention duration (seconds, None: for ever) as stored: ms."""
    return None if value is None else round(seconds(value, name) * 1000)


def _max_messages(value: int | None) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError(f"archive_max_messages must be an int or None, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"archive_max_messages must be >= 0 (or None: no bound), got {value!r}")
    return value


def retention_changes(
    archive_retention: float | None | Stored,
    dead_retention: float | None | Stored,
    archive_max_messages: int | None | Stored,
) -> dict[int, int | None]:
    """The given retention keywords, checked, as stored (by their place in the policy row)."""
    changes: dict[int, int | None] = {}
    if archive_retention is not STORED:
        changes[0] = _retention_ms(archive_retention, "archive_retention")
    if dead_retention is not STORED:
        changes[1] = _retention_ms(dead_retention, "dead_retention")
    if archive_max_messages is not STORED:
        changes[2] = _max_messages(archive_max_messages)
    return changes


def retention_from_row(row: tuple[int | None, int | None, int | None]) -> Retention:
    archive_ms, dead_ms, max_messages = row
    return Retention(
        archive_retention=None if archive_ms is None else archive_ms / 1000,
        dead_retention=None if dead_ms is None else dead_ms / 1000,
        archive_max_messages=max_messages,
    )


def store_retention(engine: Engine, changes: dict[int, int | None]) -> Retention:
    """Write checked ``changes`` (see retention_changes) into the stored policy; a policy
    that already holds them is not written again (a connect with keywords takes no lock)."""
    with engine.reading() as conn:
        stored = engine.storage.get_retention(conn)
    if all(stored[place] == value for place, value in changes.items()):
        return retention_from_row(stored)
    with engine.write() as tx:
        tx.mark_quiet()  # a policy makes no work for anyone
        policy = list(tx.storage.get_retention(tx.conn))
        for place, value in changes.items():
            policy[place] = value
        tx.storage.set_retention(tx.conn, policy[0], policy[1], policy[2])
    return retention_from_row((policy[0], policy[1], policy[2]))


def prune(
    engine: Engine,
    sent_older_than: float | None,
    dead_older_than: float | None,
    max_messages: int | None = None,
    *,
    batch: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Delete acked rows acked more than ``sent_older_than`` seconds ago and dead letters
    older than ``dead_older_than`` seconds (None: keep them), then the oldest acked rows above
    ``max_messages`` (None: no bound), in short transactions of ``batch`` rows so writers are
    never held up for long. ``progress(done, total)``."""
    storage = engine.storage
    now = engine.now_ms()
    acked_cutoff = None if sent_older_than is None else now - int(sent_older_than * 1000)
    dead_cutoff = None if dead_older_than is None else now - int(dead_older_than * 1000)
    total = 0
    if progress is not None:
        with engine.reading() as conn:
            total = sum(storage.count_prunable(conn, acked_cutoff, dead_cutoff))
        progress(0, total)
    result = PruneResult(acked=0, dead_letters=0)
    bound = after = 0
    if acked_cutoff is not None:
        with engine.reading() as conn:
            bound = storage.archive_bound(conn, acked_cutoff)
    for kind, cutoff in (("acked", acked_cutoff), ("dead", dead_cutoff)):
        if cutoff is None:
            continue
        while True:
            with engine.write() as tx:
                if kind == "acked":
                    n, after = tx.storage.prune_acked(tx.conn, cutoff, batch, after, bound)
                    result.acked += n
                    # the state change log ages with the archive (watch replays only recent)
                    n = max(n, tx.storage.prune_state_log(tx.conn, cutoff, batch))
                else:
                    n = tx.storage.prune_dead(tx.conn, cutoff, batch)
                    result.dead_letters += n
            if progress is not None:
                done = result.acked + result.dead_letters
                progress(done, max(total, done))
            if n < batch:
                break
    if max_messages is not None:
        # Counted once, outside the write lock (it reads whole indexes); the batches delete
        # that excess and no more.
        with engine.reading() as conn:
            excess = storage.archive_excess(conn, max_messages)
        total += excess
        after = 0
        while excess > 0:
            with engine.write() as tx:
                n, after = tx.storage.prune_oldest_acked(tx.conn, min(excess, batch), after)
            result.acked += n
            excess -= n
            if progress is not None:
                done = result.acked + result.dead_letters
                progress(done, max(total, done))
            if n == 0:
                break
    return result


def upkeep(engine: Engine) -> int:
    """One background retention pass (see :func:`upkeep_pass`); returns rows deleted or moved."""
    return upkeep_pass(engine)[0]


def upkeep_pass(engine: Engine) -> tuple[int, bool]:
    """One background retention pass under the policy stored in the file: at most
    ``UPKEEP_BATCH`` acked rows past ``archive_retention`` (and as many state changes), as many
    dead letters past ``dead_retention`` and as many of the oldest acked rows above
    ``archive_max_messages``, in one short transaction; in the same one it moves up to
    ``UPKEEP_BATCH`` expired messages to dead letters (SPEC 4: not only a claim on their inbox
    does, so an inbox nobody reads does not keep them). Returns (rows deleted or moved,
    whether the archive was within 10% of its ``archive_max_messages`` or above it: the next
    pass should come soon)."""
    storage = engine.storage
    now = engine.now_ms()
    # Read before the write lock: the archive's bound walks every row older than the cutoff,
    # its excess counts whole indexes, and finding expired rows walks the backlog.
    with engine.reading() as conn:
        archive_ms, dead_ms, max_messages = storage.get_retention(conn)
        bound = 0 if archive_ms is None else storage.archive_bound(conn, now - archive_ms)
        # Counted against a bound 10% below the cap: an archive that close to its cap is
        # looked at every UPKEEP_CATCH_UP seconds (below), not every UPKEEP_EVERY, so that at
        # full speed it never runs a minute of traffic past the cap (issue 21).
        margin = 0 if max_messages is None else max_messages // 10
        near = 0 if max_messages is None else storage.archive_excess(conn, max_messages - margin)
        excess = max(0, near - margin)
        expired = storage.expired_rows(conn, now, UPKEEP_BATCH)
    if archive_ms is None and dead_ms is None and not excess and not expired:
        return 0, near > 0
    acked = deleted = 0
    with engine.write() as tx:
        conn = tx.conn
        if expired:
            deleted += storage.dead_letter_expired(conn, expired, now)
        if archive_ms is not None:
            acked = storage.prune_acked(conn, now - archive_ms, UPKEEP_BATCH, bound=bound).deleted
            deleted += storage.prune_state_log(conn, now - archive_ms, UPKEEP_BATCH)
        after = 0
        if excess > acked:  # the rows just pruned by age count against the excess
            acked_now, after = storage.prune_oldest_acked(conn, min(excess - acked, UPKEEP_BATCH))
            acked += acked_now
        if dead_ms is not None:
            deleted += storage.prune_dead(conn, now - dead_ms, UPKEEP_BATCH)
    # The rest of the excess counted above, in more transactions of a batch each (writers go
    # in between), up to UPKEEP_EXCESS rows a pass: at full speed an archive at its cap gains
    # thousands of rows a second, and one batch a pass let it grow past the cap (issue 21).
    while acked < min(excess, UPKEEP_EXCESS) and after:
        with engine.write() as tx:
            pruned, after = tx.storage.prune_oldest_acked(
                tx.conn, min(excess - acked, UPKEEP_BATCH), after)
        if not pruned:
            break
        acked += pruned
    return deleted + acked, near > 0


class RetentionUpkeep:
    """What a process does after some of its writes (the engine calls :meth:`after_write`):
    about once a minute, run a retention pass (:func:`upkeep`); WAL upkeep is the
    checkpointer thread's. Errors are swallowed: upkeep must never fail the write that
    triggered it, and the next pass tries again."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.due = 0.0  # time.monotonic() of the next pass

    def after_write(self) -> None:
        now = time.monotonic()
        if now < self.due:
            return
        self.due = now + UPKEEP_EVERY
        try:
            done, capped = upkeep_pass(self.engine)
            # An archive at its cap gains rows as fast as the bus writes them: passes a
            # minute apart let it overshoot by a minute of traffic (issue 21).
            if done >= UPKEEP_BATCH or capped:
                self.due = time.monotonic() + UPKEEP_CATCH_UP
        except DatabaseError:
            pass


# ---------------------------------------------------------------------------------------------
# Checks, backup, vacuum


def check(engine: Engine) -> CheckReport:
    """Integrity, schema version, file sizes, WAL pinning, expired leases and expired messages
    not yet moved to dead letters of the bus's file (PostgreSQL: schema version, damaged
    rows, the schema's size, the pool and lease health)."""
    if engine.kind == "postgresql":
        return _check_postgres(engine)
    storage = sqlite_storage  # integrity, marks and checkpoints are the file's
    conn = _sqlite(engine).connection()
    now = engine.now_ms()
    problems: list[str] = []
    with engine.reading(conn):
        integrity = storage.integrity_check(conn)
        application_id, version = storage.schema_marks(conn)
    try:
        with engine.reading(conn):
            leases = storage.expired_leases(conn, now)
            expired = storage.count_expired(conn, now)
            bodiless = storage.rows_without_body(conn)
    except DatabaseError:
        if integrity == ["ok"]:
            raise
        leases = expired = bodiless = 0  # the rows cannot be read: the damage is the problem to report
    with engine.reading(conn):
        # A passive checkpoint copies what it can and says how far it got: frames it could not
        # copy belong to snapshots that some reader still holds. Ask twice, a moment apart, so
        # a transaction that was merely running does not count as pinning.
        busy, frames, done = storage.checkpoint(conn, "PASSIVE")
        if frames > 0 and done < frames:
            time.sleep(0.05)
            busy, frames, done = storage.checkpoint(conn, "PASSIVE")
    pinned = frames > 0 and done < frames
    if integrity != ["ok"]:
        found = "; ".join(integrity[:3]).replace("\n", "; ")
        problems.append(f"integrity check failed: {found}; the file is damaged: restore a backup")
    if bodiless:
        problems.append(f"{bodiless} message rows have lost their shared body (message_body)")
    if application_id != storage.APPLICATION_ID:
        problems.append(f"not marked as a sqlbus database (application_id {application_id:#x})")
    if version != storage.SCHEMA_VERSION:
        problems.append(f"schema version {version}, this sqlbus reads {storage.SCHEMA_VERSION}")
    if pinned:
        problems.append(
            f"WAL pinned: {frames - done} of {frames} frames cannot be checkpointed because a "
            "reader holds an old snapshot (a long read transaction); the WAL grows until it ends"
        )
    db_bytes, wal_bytes = file_sizes(engine.path)
    return CheckReport(
        ok=not problems, problems=problems, integrity=integrity, schema_version=version,
        supported_schema_version=storage.SCHEMA_VERSION, db_bytes=db_bytes, wal_bytes=wal_bytes,
        wal_frames=max(frames, 0), wal_frames_checkpointed=max(done, 0), wal_pinned=pinned,
        expired_leases=leases, expired_messages=expired,
    )


def schema_version(engine: Engine) -> int:
    """The schema version the database holds (SQLite's user_version, PostgreSQL's
    sqlbus_meta), read in one small query."""
    with engine.reading() as conn:
        return int(engine.storage.schema_marks(conn)[1])


def _check_postgres(engine: Engine) -> CheckReport:
    from .postgres.engine import PostgresEngine  # only here: it needs the extra

    assert isinstance(engine, PostgresEngine)
    storage = engine.storage
    now = engine.now_ms()
    with engine.reading() as conn:
        storage.begin_read(conn)
        try:
            integrity = storage.integrity_check(conn)
            _, version = storage.schema_marks(conn)
            leases = storage.expired_leases(conn, now)
            expired = storage.count_expired(conn, now)
            bodiless = storage.rows_without_body(conn)
        finally:
            storage.end_read(conn)
    problems: list[str] = []
    if integrity != ["ok"]:
        problems.append("damaged rows: " + "; ".join(integrity[:3]))
    if bodiless:
        problems.append(f"{bodiless} message rows have lost their shared body (message_body)")
    pool = engine.pool_stats()
    if pool["requests_waiting"]:
        problems.append(f"{pool['requests_waiting']} calls wait for a pooled connection "
                        f"(pool_size {pool['pool_max']}): raise pool_size")
    db_bytes, wal_bytes = engine.sizes()
    return CheckReport(
        ok=not problems, problems=problems, integrity=integrity, schema_version=version,
        supported_schema_version=storage.SCHEMA_VERSION, db_bytes=db_bytes, wal_bytes=wal_bytes,
        wal_frames=0, wal_frames_checkpointed=0, wal_pinned=False,
        expired_leases=leases, expired_messages=expired, backend="postgresql", pool=pool,
    )


def _sqlite(engine: Engine) -> SqliteEngine:
    """The engine of a SQLite file (checks, backups and vacuums of the file itself)."""
    assert isinstance(engine, SqliteEngine), "a SQLite file's operation on another backend"
    return engine


def _refuse_on_postgres(engine: Engine, what: str) -> None:
    if engine.kind == "postgresql":
        schema = getattr(engine, "schema", "sqlbus")
        tool = {"backup": f"pg_dump --schema {schema} (and pg_restore)",
                "vacuum": f"VACUUM (or autovacuum) on the tables of schema {schema}"}[what]
        raise DatabaseError(f"{what} is for a SQLite file; on PostgreSQL use {tool}")


def backup(
    engine: Engine,
    dest: str | os.PathLike[str],
    *,
    pages_per_step: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """Copy the database to the new file ``dest`` with SQLite's online backup API.

    The copy is one consistent snapshot, taken when the backup starts: a read transaction is
    held on the source for the whole copy, so writers in other processes keep going (WAL) and
    the copy never restarts. ``progress(pages_done, pages_total)``. ``dest`` must not exist.
    """
    _refuse_on_postgres(engine, "backup")
    dest_path = os.path.abspath(os.fspath(dest))
    # SQLite would use (or write through) whatever it found at these names.
    for name in (dest_path, *(dest_path + suffix for suffix in ("-journal", "-wal", "-shm"))):
        if os.path.lexists(name):
            raise DatabaseError(f"backup destination {name} exists; refusing to overwrite it")
    directory = os.path.dirname(dest_path)
    if not os.path.isdir(directory):
        raise DatabaseError(f"backup destination directory {directory} does not exist")
    started = time.monotonic()
    # Inside the fork gate for the whole copy: its connection is none of the bus's, so a child
    # forked meanwhile could not take it out of SQLite's books (sqlbus.connections).
    with connections.inside:
        return _backup(engine, dest_path, pages_per_step, progress, started)


def _backup(
    engine: Engine, dest_path: str, pages_per_step: int,
    progress: Callable[[int, int], None] | None, started: float,
) -> BackupResult:
    storage = sqlite_storage
    source = _sqlite(engine).open_private_connection(engine.busy_timeout)
    created = False
    try:
        fd = os.open(dest_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        created = True
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
        finally:
            os.close(fd)
        target = apsw.Connection(dest_path)
        try:
            storage.begin_read(source)  # one snapshot for the whole copy: consistent
            with target.backup("main", source, "main") as copy:
                while not copy.done:
                    copy.step(pages_per_step)
                    if progress is not None:
                        progress(copy.page_count - copy.remaining, copy.page_count)
                pages = copy.page_count
            storage.end_read(source)
        finally:
            target.close()
    except BaseException as exc:
        if created:
            for suffix in ("", "-journal", "-wal", "-shm"):
                try:
                    os.remove(dest_path + suffix)
                except OSError:
                    pass
        if isinstance(exc, apsw.Error):
            raise DatabaseError(f"backup to {dest_path} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise DatabaseError(f"cannot create {dest_path}: {exc.strerror}") from exc
        raise
    finally:
        source.close()
    return BackupResult(
        dest=dest_path, pages=pages, bytes=os.path.getsize(dest_path),
        seconds=round(time.monotonic() - started, 3),
    )


def vacuum(engine: Engine) -> VacuumResult:
    """Rebuild the file to give the space of deleted rows back to the file system, then
    truncate the WAL (SPEC 2.2).

    VACUUM writes the rebuilt file into the WAL; only a checkpoint that copies all of it
    back shrinks the database, and a reader holding an older snapshot prevents that, leaving
    the file larger than before. So the WAL must be free first: a reader that does not leave
    it within ``WAL_WAIT`` makes vacuum give up before rebuilding anything. The rebuild holds
    writers back while it copies; the copy back into the database is a PASSIVE checkpoint,
    which holds nobody back; the final truncation waits at most ``WAL_WAIT`` for readers.
    """
    _refuse_on_postgres(engine, "vacuum")
    before = sum(file_sizes(engine.path))
    reader = "a reader holding an old snapshot (or a long transaction)"
    if engine.closed:
        raise DatabaseError(f"the bus on {engine.path} is closed")
    with connections.inside:  # like backup: a connection that is none of the bus's
        return _vacuum(engine, before, reader)


def _vacuum(engine: Engine, before: int, reader: str) -> VacuumResult:
    storage = sqlite_storage
    conn = None
    try:
        # a connection of its own: its waits and temp_store differ from the bus's
        conn = _sqlite(engine).open_private_connection(WAL_WAIT)
        if not truncate_wal(conn, engine.busy_timeout):
            return VacuumResult(
                bytes_before=before, bytes_after=sum(file_sizes(engine.path)), shrunk=False,
                reason=f"not vacuumed: {reader} kept the WAL in use for more than "
                f"{WAL_WAIT * 1000:.0f} ms; run vacuum again when it has ended",
            )
        storage.set_busy_timeout(conn, engine.busy_timeout)  # for the write lock, like any writer
        storage.vacuum(conn)
        storage.checkpoint(conn, "PASSIVE")
        storage.set_busy_timeout(conn, WAL_WAIT)
        truncated = truncate_wal(conn, engine.busy_timeout)
    except apsw.Error as exc:
        raise engine.database_error(exc) from exc
    finally:
        if conn is not None:
            conn.close()
    after = sum(file_sizes(engine.path))
    if not truncated:
        return VacuumResult(
            bytes_before=before, bytes_after=after, shrunk=False,
            reason=f"rebuilt, but {reader} keeps the rebuilt pages in the WAL; the file shrinks "
            "at the first checkpoint after it ends",
        )
    return VacuumResult(bytes_before=before, bytes_after=after, shrunk=True)


# ---------------------------------------------------------------------------------------------
# Peek and tail


def peek(engine: Engine, agent: str, limit: int) -> list[InboxEntry]:
    """An agent's inbox without claiming anything, read in one snapshot: ready messages in
    the order receive takes them, then the others by when they become claimable, expired
    ones last (the first page of :func:`peek_page`, unfiltered)."""
    return peek_page(engine, agent, after=None, limit=limit, type=None, status=None,
                     priority=None, text=None, scan=limit).entries


PEEK_STATUSES = ("ready", "leased", "retrying", "scheduled", "expired")
# The peek groups (ready, waiting, expired) a status is found in; a position before a group.
_GROUP_OF = {"ready": 0, "leased": 1, "retrying": 1, "scheduled": 1, "expired": 2}
_GROUP_START = ((0, -6, 0), (1, -1, 0), (2, -1, 0))


def parse_position(after: str | None) -> tuple[int, int, int] | None:
    """A page position (``"group.key.seq"``, as :class:`PeekPage` gives it) as numbers."""
    if after is None:
        return None
    parts = after.split(".") if isinstance(after, str) else []
    try:
        position = tuple(int(part) for part in parts)
    except ValueError:
        position = ()
    if len(position) != 3 or position[0] not in (0, 1, 2):
        raise ValueError(f"after must be the position a page gave (like '0.-3.42'), got {after!r}")
    return position[0], position[1], position[2]


def peek_page(
    engine: Engine, agent: str, *, after: str | None, limit: int, type: str | None,
    status: str | None, priority: int | None, text: str | None, scan: int,
) -> PeekPage:
    """A page of ``agent``'s inbox in peek's order, after the position ``after``, keeping
    the messages that match every filter given; at most ``scan`` rows are looked at for one
    page, so a filter that matches little costs a bounded read and the page says where to go on."""
    now = engine.now_ms()
    position = parse_position(after)
    group = None if status is None else _GROUP_OF[status]
    if group is not None and (position is None or position < _GROUP_START[group]):
        position = _GROUP_START[group]
    needle = None if text is None else text.lower()
    chunk = 1 if type is None and status is None and text is None else PEEK_CHUNK
    entries: list[InboxEntry] = []
    looked = 0
    with engine.reading() as conn, snapshot(engine.storage, conn):
        while len(entries) < limit and looked < scan:
            room = min(scan - looked, max(limit - len(entries), chunk))
            rows = engine.storage.peek_rows(conn, agent, now, room, engine.max_body,
                                            position, priority)
            for r in rows:
                if group is not None and r.position[0] != group:
                    return PeekPage(entries=entries, after=None)  # past the status's group
                looked += 1
                position = r.position
                entry = _kept(agent, r, type, status, needle)
                if entry is not None:
                    entries.append(entry)
                    if len(entries) == limit:
                        break
            else:  # every row read was looked at: fewer than asked for is the end
                if len(rows) < room:
                    return PeekPage(entries=entries, after=None)
    assert position is not None
    return PeekPage(entries=entries, after="{}.{}.{}".format(*position))


PEEK_CHUNK = 100  # rows a filtered page reads at a time


def _kept(agent: str, r: PeekRow, type: str | None, status: str | None,
          needle: str | None) -> InboxEntry | None:
    """Row ``r`` as an inbox entry when it passes the filters (the columns first, then the
    stored JSON, and only then a decode), else None."""
    if (type is not None and r.type != type) or (status is not None and r.status != status):
        return None
    if needle is not None and r.body is not None and needle not in r.body.decode(
            "utf-8", "replace").lower():
        return None
    # a row that cannot be decoded shows as an error message (SPEC 4.2)
    message = listed_message(agent, r.message_id, r.sender, r.type, r.priority, r.sent_at, r.body)
    if needle is not None and needle not in json_text(message.payload):
        return None
    return InboxEntry(message=message, status=r.status, attempts=r.attempts,
                      visible_at=iso_ms(r.visible_at), payload_bytes=r.length)


def json_text(payload: Any) -> str:
    """A payload's JSON, lower-cased, for a text search."""
    return msgspec.json.encode(payload).decode().lower()


def leases(engine: Engine, agent: str | None, limit: int) -> list[Lease]:
    """Leases running now, the soonest to end first."""
    with engine.reading() as conn:
        rows = engine.storage.lease_rows(conn, engine.now_ms(), limit, agent, engine.max_body)
    return [Lease(agent=r.agent, attempts=r.attempts, lease_ends_at=iso_ms(r.lease_ends_at),
                  payload_bytes=r.length,
                  message=listed_message(r.agent, r.message_id, r.sender, r.type, r.priority,
                                         r.sent_at, r.body))
            for r in rows]


def trace(engine: Engine, message_id: str) -> MessageTrace | None:
    """Message ``message_id`` and its row in every recipient's inbox, read in one snapshot."""
    now = engine.now_ms()
    with engine.reading() as conn, snapshot(engine.storage, conn):
        rows = engine.storage.message_rows(conn, message_id, now, engine.max_body)
        dead = {r.dead_letter_id: engine.storage.get_dead_letter(
                    conn, r.dead_letter_id, max_body=engine.max_body)
                for r in rows if r.dead_letter_id is not None}
    if not rows:
        return None
    first = rows[0]
    recipients = [r.agent for r in rows if r.agent is not None]
    message = listed_message(recipients, first.message_id, first.sender, first.type,
                             first.priority, first.sent_at, first.body)
    records = []
    for r in rows:
        dead_row = None if r.dead_letter_id is None else dead.get(r.dead_letter_id)
        records.append(RecipientRecord(
            agent=r.agent, status=r.status, attempts=r.attempts, visible_at=iso_ms(r.visible_at),
            done_at=None if r.done_at is None else iso_ms(r.done_at), last_error=r.last_error,
            dead_letter=None if dead_row is None else dead_letter_from_row(dead_row)))
    return MessageTrace(message=message, sent_at=iso_ms(first.sent_at),
                        payload_bytes=first.length, recipients=records)


def tail(
    engine: Engine,
    agent: str | None,
    types: Iterable[str] | None,
    *,
    timeout: float | None,
    from_seq: int | None = None,
) -> Tail:
    """Yield messages as they are published (by any process), from now on (or from the
    position ``from_seq`` of an earlier tail), until ``timeout`` seconds pass (None: forever).
    ``agent`` keeps messages sent by or to it, ``types`` those types. The position and the
    timeout start at this call, not at the first ``next()``: a message published in between is
    yielded."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if from_seq is None:
        with engine.reading() as conn:
            from_seq = engine.storage.last_seq(conn)
    return Tail(engine, agent, None if types is None else set(types), deadline, from_seq)


class Tail(Iterator[SentRecord]):
    """The iterator :meth:`sqlbus.Bus.tail` returns. ``position`` says how far it has read:
    every message up to it was yielded (once the caller asked for the next one) or left out by
    the filters, so ``bus.tail(after=t.position)`` goes on where this one stopped, losing
    nothing and repeating nothing when this one ran out of time.

    >>> t = bus.tail(timeout=1.0); records = list(t)             # doctest: +SKIP
    >>> more = list(bus.tail(timeout=1.0, after=t.position))     # doctest: +SKIP
    """

    def __init__(self, engine: Engine, agent: str | None, wanted: set[str] | None,
                 deadline: float | None, position: int) -> None:
        self.position = position
        self._records = self._follow(engine, agent, wanted, deadline)

    def __next__(self) -> SentRecord:
        return next(self._records)

    def close(self) -> None:
        """Stop following (a tail with no timeout otherwise waits for the next message)."""
        self._records.close()

    def _follow(
        self, engine: Engine, agent: str | None, wanted: set[str] | None, deadline: float | None
    ) -> Generator[SentRecord, None, None]:
        while True:
            baseline = engine.change_token()
            with engine.reading() as conn:
                rows = engine.storage.rows_after(conn, self.position, 500, engine.max_body)
            groups: list[list[TailRow]] = []
            for row in rows:
                if groups and groups[-1][0].message_id == row.message_id:
                    groups[-1].append(row)
                else:
                    groups.append([row])
            for i, group in enumerate(groups):
                recipients = [row.agent for row in group if row.agent is not None]
                first = group[0]
                message = listed_message(recipients, first.message_id, first.sender, first.type,
                                         first.priority, first.sent_at, first.body)
                kept = (wanted is None or message.type in wanted) and (
                    agent is None or message.sender == agent or agent in recipients)
                if kept:
                    yield SentRecord(message=message, recipients=recipients,
                                     sent_at=iso_ms(first.sent_at), payload_bytes=first.length)
                # On PostgreSQL the rows of one transaction share their position (its id): it
                # is passed only once the whole transaction is (a batch never splits them).
                if i + 1 == len(groups) or groups[i + 1][-1].seq != group[-1].seq:
                    self.position = group[-1].seq
            if rows:
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            engine.wait_for_change(baseline, 1.0 if remaining is None else min(remaining, 1.0))
