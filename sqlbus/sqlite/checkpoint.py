"""WAL checkpoints: the thread that copies the WAL back into the database so that no commit
pays for it, and the passes that keep the WAL a few MB long and truncate it for vacuum."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import apsw

from .. import connections
from ..errors import DatabaseError
from . import storage

log = logging.getLogger("sqlbus")

WAL_LIMIT = 64 * 1024 * 1024  # bytes of WAL frames before a restart waits for readers
WAL_WAIT = 0.05  # s: how long that checkpoint may wait for readers (writers wait meanwhile)
WAL_BACKOFF = 5.0  # s: after a restart that readers kept from finishing, before the next
# A commit that leaves at least this many frames (8 MB of 2 KiB pages) in the WAL wakes the
# process's checkpointer thread (0: no checkpointer; SQLite's automatic checkpoint inside
# commits instead). Fewer, larger passes cost less: each copies the distinct pages, fsyncs
# twice, and holds writers back for about a millisecond in its RESTART step.
CHECKPOINT_FRAMES = 4000
CHECKPOINT_GAP = 0.01  # s: the least time between two checkpoints of one process


class Checkpointer:
    """Copies the WAL back into the database from a thread of its own, so that no commit
    pays for a checkpoint, and makes the WAL start over so it stays a few MB long.

    SQLite's automatic checkpoint runs inside whichever commit takes the WAL past its
    threshold, and a checkpoint ends with an fsync of the database file, which would land on
    one unlucky caller's latency (docs/design.md has the measurements). Every connection of the bus reports the WAL's
    length after each of its commits (:meth:`wal_hook`, SQLite's WAL hook, which replaces the
    automatic checkpoint); past ``CHECKPOINT_FRAMES`` the thread (started on first need) runs
    :func:`fold_wal` on a connection of its own, at most once per ``CHECKPOINT_GAP``, and
    otherwise sleeps on an event.
    """

    def __init__(self, open_connection: Callable[[float], apsw.Connection]) -> None:
        self._open_connection = open_connection  # (busy_timeout in s) -> a new connection
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._frames = 0  # the WAL's length after this process's last commit
        self._restart_after = 0.0  # no RESTART pass before (a reader pinned the WAL)

    def wal_hook(self, frames: int) -> None:
        """After a commit of this process that left ``frames`` frames in the WAL."""
        self._frames = frames
        if frames >= CHECKPOINT_FRAMES and not self._wanted.is_set():
            self._wake()

    def _wake(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is not None or self._closed or self._pid != os.getpid():
                    return
                thread = threading.Thread(target=self._run, name="sqlbus-checkpoint", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    return  # interpreter shutting down
                self._thread = thread
        self._wanted.set()

    def _run(self) -> None:
        wanted = self._wanted
        conn = None
        while True:
            wanted.wait()
            if self._closed or self._pid != os.getpid():
                return
            wanted.clear()
            if self._frames < CHECKPOINT_FRAMES:
                continue  # another process's checkpointer made it start over meanwhile
            try:
                with connections.inside:  # a fork waits for the checkpoint in progress
                    if conn is None:  # its own, waiting at most WAL_WAIT for others
                        conn = self._open_connection(WAL_WAIT)
                    restart = time.monotonic() >= self._restart_after
                    if fold_wal(conn, restart=restart) is False:
                        self._restart_after = time.monotonic() + WAL_BACKOFF
            except (apsw.Error, DatabaseError):
                pass  # busy, closed, read-only: an optimisation only, the next one retries
            except Exception:  # noqa: BLE001 - a bug here must not end checkpoints for good
                log.exception("sqlbus: the checkpointer failed; it will try again")
            time.sleep(CHECKPOINT_GAP)

    def close(self) -> None:
        """End the thread, after the checkpoint it may be running (the bus then closes its
        connection: a connection is never used by two threads at once)."""
        self._closed = True
        self._wanted.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and (
            self._pid == os.getpid()
        ):
            thread.join(5.0)


def fold_wal(conn: apsw.Connection, *, restart: bool = True) -> bool | None:
    """Copy the WAL back into the database and make it start over. Returns False when a
    reader kept the RESTART pass from finishing (try it again later, not at once), else None.

    A PASSIVE pass copies what it can without holding anyone up. The WAL itself starts over
    only at a commit made while it is wholly copied and no reader is using it, which under
    steady load never happens by itself (commits land during every copy). So when the copy is
    complete and the WAL still long, a RESTART pass copies what came meanwhile, holding writers
    back (for about an fsync), and waits up to the connection's busy timeout for readers to
    leave the WAL; the next commit then writes at its start again. When the copy is not
    complete, a reader holds an older snapshot, and a RESTART would hold every writer back
    while it waits for that reader: it is tried only once the WAL holds ``WAL_LIMIT`` bytes of
    frames (under sustained load from several processes readers overlap, so the copy is never
    complete). Frames are counted, never the file's size: ``journal_size_limit`` keeps a WAL
    file that once grew that long at its limit after it starts over. ``restart=False`` skips
    RESTART.
    """
    busy, frames, done = storage.checkpoint(conn, "PASSIVE")
    if not restart or busy or frames < CHECKPOINT_FRAMES:
        return None
    if done < frames and frames * (storage.page_size(conn) + 24) < WAL_LIMIT:
        return None
    busy, frames, _done = storage.checkpoint(conn, "RESTART")
    # Busy with no frame counts: another process holds the checkpoint lock (SQLite does not
    # wait for it), so it is copying now and the next pass tries again; with counts, the
    # wait for readers ran out.
    return False if busy and frames >= 0 else None


def truncate_wal(conn: apsw.Connection, patience: float) -> bool:
    """Copy the whole WAL into the database and truncate it; False when a reader (or a long
    transaction) kept it in use for ``WAL_WAIT``, the connection's busy timeout.

    A TRUNCATE checkpoint holds writers back while it waits for readers, so that wait stays
    short. Another process's checkpoint copying the same frames is no reader: (busy, -1, -1)
    says the checkpoint lock was taken, and it is worth waiting for, up to ``patience`` s,
    without holding anyone back."""
    deadline = time.monotonic() + patience
    while True:
        busy, frames, _done = storage.checkpoint(conn, "TRUNCATE")
        if not busy:
            return True
        if frames >= 0 or time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
