"""One SQLite connection: opening it with our settings, its transactions, and the pragmas the
bus reads and runs (WAL mode, checkpoints, vacuum, integrity check)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import apsw

from .. import connections
from ..backend import CheckpointResult
from ..errors import DatabaseError


class Connection(apsw.Connection):
    """An apsw connection with a cursor of its own, ``cur``, that the frequent statements
    reuse: ``Connection.execute`` makes and frees a cursor each time, a large share of a
    short statement's cost. Only for statements whose rows are read to the end at once (a
    cursor runs one statement at a time)."""

    cur: apsw.Cursor
    file: int  # its sqlite3_file*, and the fork generation it was opened in (sqlbus.connections)
    generation: int


def _busy_handler(timeout: float) -> Callable[[int], bool]:
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


def set_busy_timeout(conn: apsw.Connection, timeout: float) -> None:
    """Make ``conn`` wait up to ``timeout`` seconds for a lock another connection holds."""
    conn.set_busy_handler(_busy_handler(timeout))


# A commit writes every page it touched to the WAL, and a message row is a few hundred bytes:
# smaller pages mean fewer bytes per commit (docs/design.md, Storage notes).
PAGE_SIZE = 2048


def set_wal_mode(conn: apsw.Connection, path: str, new_file: bool = False) -> None:
    """Switch the file to WAL (persistent in the file, so only a new file needs it).

    A new file gets :data:`PAGE_SIZE` pages first (it cannot change once in WAL mode).
    """
    if new_file:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op if someone made tables first
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
    if str(mode).lower() != "wal":
        raise DatabaseError(f"{path}: could not switch to WAL journal mode (got {mode!r})")


# ---------------------------------------------------------------------------------------------
# Transactions


def begin(conn: Connection) -> None:
    """Start a write transaction.

    IMMEDIATE takes the write lock up front, through the busy handler; a deferred transaction
    that reads and then writes in WAL mode can fail with BUSY without waiting at all.
    """
    conn.cur.execute("BEGIN IMMEDIATE")


def commit(conn: Connection) -> None:
    """Commit the open transaction."""
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


def in_transaction(conn: apsw.Connection) -> bool:
    """Whether ``conn`` has a transaction open."""
    return not conn.get_autocommit()


def data_version(conn: Connection) -> int:
    """A number that changes when another connection commits (cheap, takes no lock)."""
    return conn.cur.execute("SELECT data_version FROM pragma_data_version()").fetchall()[0][0]


# ---------------------------------------------------------------------------------------------
# Upkeep and checks of the file


def vacuum(conn: apsw.Connection) -> None:
    """Rebuild the file without its free pages (holds the write lock while it runs).

    VACUUM builds the new file in a temporary database first: in a file, so that memory does
    not grow with the database (our connections keep temporary tables in memory otherwise).
    Meant for a connection of its own: the setting stays on it.
    """
    conn.execute("PRAGMA temp_store=FILE")
    conn.execute("VACUUM")


def page_size(conn: apsw.Connection) -> int:
    """The file's page size in bytes."""
    return int(conn.execute("PRAGMA page_size").fetchall()[0][0])


def checkpoint(conn: apsw.Connection, mode: str = "PASSIVE") -> CheckpointResult:
    """Run a WAL checkpoint; returns (busy, wal frames, frames checkpointed)."""
    assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
    row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
    return CheckpointResult(int(row[0]), int(row[1]), int(row[2]))


def integrity_check(conn: apsw.Connection, max_errors: int = 20) -> list[str]:
    """SQLite's integrity check: ``['ok']`` or up to ``max_errors`` problems."""
    return [row[0] for row in conn.execute(f"PRAGMA integrity_check({int(max_errors)})")]


def schema_marks(conn: apsw.Connection) -> tuple[int, int]:
    """(application_id, user_version) of the file."""
    return (
        conn.execute("PRAGMA application_id").fetchall()[0][0],
        conn.execute("PRAGMA user_version").fetchall()[0][0],
    )
