"""The SQLite half of the engine (:class:`sqlbus.engine.Engine`): one database file.

>>> engine = SqliteEngine("/tmp/team.db", synchronous="NORMAL", busy_timeout=5.0,
...                       clock=time.time, mode=0o600)                  # doctest: +SKIP
>>> with engine.write() as tx:                                          # doctest: +SKIP
...     tx.storage.register_agent(tx.conn, "alice", engine.now_ms())

The backend's verbs are the module :mod:`sqlbus.sqlite.storage`. Each thread has its own connection, closed when the thread ends. Every
write is one short ``BEGIN IMMEDIATE`` transaction (:meth:`Engine.write`) with a :class:`Tx`
handle that marks whom it makes work for; after its commit the waiters it marked are woken,
in this process and others (:mod:`sqlbus.sqlite.wakeup`).
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import msgspec

from .. import connections
from ..backend import Storage
from ..engine import Engine, Tx, WriteContext, refuse_inside_block
from ..errors import DatabaseError
from . import checkpoint, storage
from .checkpoint import Checkpointer
from .files import check_paths, create_file, database_error, file_sizes
from .group import GroupCommit
from .wakeup import Wakeup

T = TypeVar("T")

_all_engines: weakref.WeakSet[SqliteEngine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_all_engines):
        engine.forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)

# sqlbus stores only valid UTF-8 text and bodies it encoded itself: a read that fails to decode
# one met damage SQLite did not notice.
_DAMAGE = (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError)


class Write(WriteContext):
    """``with engine.write() as tx``: one BEGIN IMMEDIATE transaction on this thread's
    connection, with its :class:`Tx` handle; apsw errors become :class:`DatabaseError`; the
    waiters it marked are woken after commit. The thread is inside
    :data:`sqlbus.connections.inside` from BEGIN to COMMIT."""

    __slots__ = ("engine", "conn", "tx")

    def __init__(self, engine: SqliteEngine) -> None:
        self.engine = engine

    def __enter__(self) -> Tx:
        refuse_inside_block()
        connections.inside.__enter__()
        try:
            conn = self.conn = self.engine.connection()
            storage.begin(conn)
        except BaseException as exc:
            connections.inside.__exit__()
            if isinstance(exc, apsw.Error):
                raise self.engine.database_error(exc) from exc
            raise
        tx = self.tx = Tx(conn, self.engine.storage)
        return tx

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn = self.conn
        try:
            if exc_type is None:
                try:
                    storage.commit(conn)
                except apsw.Error as error:
                    self._rollback()
                    raise self.engine.database_error(error) from error
            else:
                self._rollback()
        finally:
            connections.inside.__exit__()
        if exc_type is None:
            self.engine.committed(self.tx.tags)
            return
        if isinstance(exc, apsw.Error):
            raise self.engine.database_error(exc) from exc

    def _rollback(self) -> None:
        try:
            storage.rollback(self.conn)
        except apsw.Error:
            pass  # the connection already ended the transaction


class Read:
    """``with engine.reading() as conn``: translate apsw errors for a read (no transaction)."""

    __slots__ = ("engine", "conn")

    def __init__(self, engine: SqliteEngine, conn: storage.Connection | None) -> None:
        self.engine = engine
        self.conn = conn

    def __enter__(self) -> storage.Connection:
        connections.inside.__enter__()
        try:
            if self.conn is None:
                self.conn = self.engine.connection()
            else:
                self.engine.check_usable(self.conn)
        except BaseException:
            connections.inside.__exit__()
            raise
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        connections.inside.__exit__()
        if isinstance(exc, apsw.Error):
            raise self.engine.database_error(exc) from exc
        if isinstance(exc, _DAMAGE):
            raise DatabaseError(
                f"{self.engine.path} is corrupt ({type(exc).__name__}: {exc}); "
                "run 'sqlbus check' and restore from a 'sqlbus backup'"
            ) from exc


class _ClosedWithThread:
    """Kept in a thread's thread-local storage beside its connection: when the thread ends,
    that storage goes and this closes the connection (a thread that ends leaves nothing)."""

    __slots__ = ("engine", "conn", "pid")

    def __init__(self, engine: SqliteEngine, conn: storage.Connection) -> None:
        self.engine = weakref.ref(engine)
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        # In a forked child the other threads' storage goes before any at-fork handler runs:
        # their connections are the parent's, parked by forget_connections, never closed.
        engine = self.engine()
        if engine is not None and os.getpid() == self.pid:
            engine.release(self.conn)


class SqliteEngine(Engine):
    """Connections, transactions, the clock and wake-ups of one database file.

    ``synchronous`` is SQLite's (``"NORMAL"`` or ``"FULL"``), ``busy_timeout`` seconds,
    ``clock`` returns epoch seconds, ``mode`` the permissions of a file it creates.
    ``upkeep`` (set by the bus) runs after some writes, at most every
    ``UPKEEP_CHECK_EVERY`` seconds, and must never raise.
    """

    kind = "sqlite"
    backend_errors = (apsw.Error,)

    def __init__(
        self, path: str, *, synchronous: str, busy_timeout: float,
        clock: Callable[[], float], mode: int,
    ) -> None:
        super().__init__(path, busy_timeout=busy_timeout, clock=clock)
        self.synchronous = synchronous
        self.storage: Storage[storage.Connection] = storage  # the backend's verbs
        self._local = threading.local()
        self._connections: set[storage.Connection] = set()
        self._lock = threading.Lock()
        self.wakeup = Wakeup(path)
        self._checkpointer = Checkpointer(self.open_connection)
        self.group = GroupCommit(self)  # concurrent grouped() writes share a transaction
        self._file_id: tuple[int, int] | None = None
        self._open_file(mode)
        _all_engines.add(self)

    # -- opening ---------------------------------------------------------------------------

    def _open_file(self, mode: int) -> None:
        path = self.path
        if path == ":memory:" or os.path.basename(path) == ":memory:":
            raise ValueError("sqlbus needs a database file path that several processes can open")
        try:
            created = create_file(path, mode)
            check_paths(path)
            stat = os.stat(path)
            self._file_id = (stat.st_dev, stat.st_ino)
            # Reading the header opens and closes the file, and closing any descriptor of a file
            # drops every POSIX lock this process holds on it, SQLite's included: so only a file
            # that no bus of this process has open yet is read (one that is open was checked).
            in_use_here = any(
                other._file_id == self._file_id and not other.closed for other in list(_all_engines)
            )
            empty = False if in_use_here else storage.check_file(path) == "empty"
            if empty or created:
                self._initialize_new_file(path)
            else:
                conn = self.connection()
                with connections.inside:
                    storage.initialize(conn, path, self.now_ms())
                    storage.set_wal_mode(conn, path)
        except apsw.Error as exc:
            self.close()
            raise self.database_error(exc) from exc
        except BaseException:
            self.close()
            raise

    def _initialize_new_file(self, path: str) -> None:
        """Switch an empty file to WAL and create the schema, one process at a time.

        Two processes switching the same empty file to WAL at once can lock each other out
        (one waits out its whole busy timeout), so they take turns on an flock of the
        directory; the file itself is not opened for that (see _open_file).
        """
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            still_empty = storage.check_file(path) == "empty"  # before our connection reads it
            conn = self.connection()
            with connections.inside:
                if still_empty:  # nobody initialised it while we waited
                    storage.set_wal_mode(conn, path, new_file=True)
                storage.initialize(conn, path, self.now_ms())
                storage.set_wal_mode(conn, path)
        finally:
            os.close(directory)  # releases the flock

    # -- connections -----------------------------------------------------------------------

    def connection(self) -> storage.Connection:
        """This thread's connection (each thread has its own; it closes when the thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.closed:
                raise self.closed_error()
            conn = self.open_connection(self.busy_timeout)
            self._local.conn = conn
            self._local.closer = _ClosedWithThread(self, conn)
        elif self.closed:
            raise self.closed_error()
        return conn

    def check_usable(self, conn: storage.Connection) -> None:
        """Refuse a connection of a closed bus, or one a forked child inherited."""
        if self.closed:
            raise self.closed_error()
        if conn.generation != connections.generation:
            raise DatabaseError(
                f"{self.path}: this transaction or connection was opened before os.fork() and "
                "belongs to the parent process; open a new one in the child"
            )

    def closed_error(self) -> DatabaseError:
        return DatabaseError(f"{self.path}: the bus is closed")

    def open_connection(self, busy_timeout: float) -> storage.Connection:
        """A new connection, closed with the bus (and handled at a fork like the others)."""
        if self.closed:
            raise self.closed_error()
        try:
            with connections.inside:
                conn = storage.open_connection(
                    self.path, synchronous=self.synchronous, busy_timeout=busy_timeout,
                    wal_hook=self._wal_hook if checkpoint.CHECKPOINT_FRAMES else None,
                )
                conn.file = connections.file_pointer(conn)
            conn.generation = connections.generation
        except apsw.Error as exc:
            raise self.database_error(exc) from exc
        with self._lock:
            self._connections.add(conn)
        return conn

    def open_private_connection(self, busy_timeout: float) -> storage.Connection:
        """A connection none of the bus's calls use (backup, vacuum): the caller closes it, and
        holds :data:`sqlbus.connections.inside` while it is open."""
        try:
            return storage.open_connection(
                self.path, synchronous=self.synchronous, busy_timeout=busy_timeout
            )
        except apsw.Error as exc:
            raise self.database_error(exc) from exc

    def release(self, conn: storage.Connection) -> None:
        """Close the connection of a thread that ended (unless close() or a fork took it)."""
        with self._lock:
            if conn not in self._connections:
                return
            self._connections.discard(conn)
        connections.close(conn)

    def forget_connections(self) -> None:
        """In a forked child: drop the parent's connections; open new ones on demand.

        The inherited connections are taken out of SQLite's per-process books and parked for
        ever, never called, rolled back or closed (see :mod:`sqlbus.connections`): the
        child's own connections then take real locks, and the parent's transactions and WAL
        are left alone.
        """
        inherited, self._connections = self._connections, set()
        self._lock = threading.Lock()
        for conn in inherited:
            connections.release_inherited(conn.file)
            connections.park(conn)
        self._local = threading.local()
        self.group.forget()  # the parent's queued writers are not here
        self.wakeup.forget()  # the parent's doorbell stays the parent's
        self.wakeup = Wakeup(self.path)
        self._checkpointer = Checkpointer(self.open_connection)  # the parent's thread is not here
        self.awaiting = {}  # the parent's waiting requests are not the child's

    def database_error(self, exc: BaseException) -> DatabaseError:
        """Say in one line what an apsw error means for the user."""
        assert isinstance(exc, apsw.Error)
        return database_error(self.path, self.busy_timeout, exc)

    def close(self) -> None:
        """Close every connection; a thread waiting in the engine wakes at once with
        :class:`DatabaseError`, as does every later call. Safe to call twice."""
        self.closed = True
        self.wakeup.close()  # removes this process's doorbell and wakes its waiters
        self.group.close()  # fails the queued writers at once
        self._checkpointer.close()
        # Other threads may be using their connections: close them while none is inside SQLite
        # (their next call sees the bus closed).
        with connections.exclusive():
            with self._lock:
                opened, self._connections = self._connections, set()
            for conn in opened:
                try:
                    conn.close()
                except apsw.Error:
                    pass
        self._local = threading.local()

    # -- transactions and change tokens ---------------------------------------------------

    def write(self) -> Write:
        """``with engine.write() as tx:`` one write transaction (:class:`Write`, :class:`Tx`)."""
        return Write(self)

    def grouped(self, fn: Callable[[Tx], T], solo: bool = False) -> T:
        """``fn(tx)`` in a write transaction that concurrent grouped writes of this bus may
        share (:mod:`sqlbus.sqlite.group`); returns its result, or raises its error, once
        committed. A caller alone writes at once. ``solo``: in turn, never shared."""
        refuse_inside_block()
        group = self.group
        if not group.takes(solo):
            with Write(self) as tx:
                return fn(tx)
        return group.write(fn, solo)  # type: ignore[no-any-return]

    def reading(self, conn: storage.Connection | None = None) -> Read:
        """``with engine.reading() as conn:`` reads, errors translated (see :class:`Read`)."""
        return Read(self, conn)

    def _wal_hook(self, frames: int) -> None:
        self._checkpointer.wal_hook(frames)  # through the engine: a forked child has a new one

    def change_token(self) -> int:
        """SQLite's ``data_version`` on this thread's connection: it changes when another
        connection commits (the wake-up re-checks it every ``FALLBACK`` s: no ring is needed
        to see a commit)."""
        conn = self.connection()
        with self.reading(conn):
            return storage.data_version(conn)

    def change_token_in(self, tx: Tx) -> int:
        return storage.data_version(tx.conn)

    def sizes(self) -> tuple[int, int]:
        """(database bytes, WAL bytes) of the file."""
        return file_sizes(self.path)

    def tx_ended(self, conn: storage.Connection) -> bool:
        return bool(conn.get_autocommit())

    def execute_user_sql(self, conn: storage.Connection, sql: str, params: Any) -> list[tuple[Any, ...]]:
        return conn.execute(sql, params).fetchall()
