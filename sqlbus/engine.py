"""The engine under every bus: connections, transactions, error translation, fork handling,
the clock, wake-ups and waiting. Everything above (agents, deliveries, state, the run loop,
operations) talks to the :class:`Engine`, never to another module's internals.

>>> engine = Engine("/tmp/team.db", synchronous="NORMAL", busy_timeout=5.0,
...                 clock=time.time, mode=0o600)                        # doctest: +SKIP
>>> with engine.write() as tx:                                          # doctest: +SKIP
...     tx.storage.register_agent(tx.conn, "alice", engine.now_ms())

The backend's verbs are ``engine.storage`` (a :class:`sqlbus.backend.Storage`; for SQLite the
module :mod:`sqlbus.sqlite.storage`): the modules above reach storage and wake-ups only
through the engine. Each thread has its own connection, closed when the thread ends. Every
write is one short ``BEGIN IMMEDIATE`` transaction (:meth:`Engine.write`) with a :class:`Tx`
handle that marks whom it makes work for; after its commit the waiters it marked are woken,
in this process and others (:mod:`sqlbus.sqlite.wakeup`).
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import apsw
import msgspec

from . import connections
from .backend import Storage
from .errors import DatabaseError
from .sqlite import checkpoint, storage
from .sqlite.checkpoint import Checkpointer
from .sqlite.files import check_paths, create_file, database_error
from .sqlite.wakeup import ANY, FALLBACK, MAX_TAGS, RUNG, Wakeup, agent_tag

if TYPE_CHECKING:
    from .delivery import Transaction

T = TypeVar("T")

# The latest time an id's 13 digits can hold: 2286-11-20T17:46:39.999Z, in epoch ms.
MAX_CLOCK_MS = 9_999_999_999_999
UPKEEP_CHECK_EVERY = 0.1  # s: how often a writing process looks whether upkeep is due

# The outbox block open in this thread (asyncio: this task), if any: a write of its own there
# would wait for the block's own write lock (see Write).
open_block: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "sqlbus_open_block", default=None
)

_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for engine in list(_all_engines):
        engine.forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)

# sqlbus stores only valid UTF-8 text and bodies it encoded itself: a read that fails to decode
# one met damage SQLite did not notice.
_DAMAGE = (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError)


def check_clock(clock: Callable[[], float]) -> int:
    """``clock()`` in epoch ms; ValueError when it is outside what ids can hold."""
    now = clock()
    try:
        ms = int(now * 1000)
    except (TypeError, ValueError, OverflowError):  # not a number, NaN, infinity
        ms = -1
    if not 0 <= ms <= MAX_CLOCK_MS:
        # Ids hold the time as 13 digits: a time outside them would write ids that do not
        # match the id pattern, which every later read would take for damage.
        raise ValueError(
            f"clock() returned {now!r}: expected epoch seconds from 0 "
            "(1970-01-01T00:00:00Z) to 9999999999.999 (2286-11-20T17:46:39.999Z)"
        )
    return ms


class Looked(NamedTuple):
    """What one look of :meth:`Engine.wait_until` found: ``found`` (falsy: nothing yet), the
    change token read no later than the look, and the longest wait (s) before looking again
    even without a change (something comes due then)."""

    found: Any
    token: int
    wait_at_most: float = float("inf")


class Tx:
    """The handle of one write transaction: its connection, the backend's verbs, and whom its
    commit rings. Writes call ``tx.storage.verb(tx.conn, ...)`` and mark the agents they make
    work for (``tx.mark``); a write that marks nothing rings "anything may have changed"
    (always correct, just less targeted), one marked quiet (a claim, a plain ack) rings
    nobody unless agents get marked too."""

    __slots__ = ("conn", "storage", "tags")

    def __init__(self, conn: Any, storage: Storage[Any]) -> None:
        self.conn = conn
        self.storage = storage
        self.tags: set[bytes] | None = None  # None: ring "anything may have changed"

    def mark(self, agents: Iterable[str]) -> None:
        """Mark agents that got work (a message, a retry coming due) in this transaction."""
        tags = self.tags
        if tags is None:
            tags = self.tags = set()
        for agent in agents:
            if len(tags) > MAX_TAGS:
                break  # the commit rings "anything may have changed": more tags change nothing
            tags.add(agent_tag(agent))

    def mark_quiet(self) -> None:
        """Mark this transaction as making no work for anyone (unless agents get marked)."""
        if self.tags is None:
            self.tags = set()


class Write:
    """``with engine.write() as tx``: one BEGIN IMMEDIATE transaction on this thread's
    connection, with its :class:`Tx` handle; apsw errors become :class:`DatabaseError`; the
    waiters it marked are woken after commit. The thread is inside
    :data:`sqlbus.connections.inside` from BEGIN to COMMIT."""

    __slots__ = ("engine", "conn", "tx")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> Tx:
        block = open_block.get()
        if block is not None and block.holds_lock():
            # Its BEGIN would wait out busy_timeout for the write lock the block holds.
            raise RuntimeError(
                f"{block.agent.id}'s transaction() block is open in this thread or task: "
                "write through its tx (tx.publish, tx.state.set, ...) or after the block"
            )
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

    def __init__(self, engine: Engine, conn: storage.Connection | None) -> None:
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

    def __init__(self, engine: Engine, conn: storage.Connection) -> None:
        self.engine = weakref.ref(engine)
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        # In a forked child the other threads' storage goes before any at-fork handler runs:
        # their connections are the parent's, parked by forget_connections, never closed.
        engine = self.engine()
        if engine is not None and os.getpid() == self.pid:
            engine.release(self.conn)


class Engine:
    """Connections, transactions, the clock and wake-ups of one database file.

    ``synchronous`` is SQLite's (``"NORMAL"`` or ``"FULL"``), ``busy_timeout`` seconds,
    ``clock`` returns epoch seconds, ``mode`` the permissions of a file it creates.
    ``upkeep`` (set by the bus) runs after some writes, at most every
    ``UPKEEP_CHECK_EVERY`` seconds, and must never raise.
    """

    def __init__(
        self, path: str, *, synchronous: str, busy_timeout: float,
        clock: Callable[[], float], mode: int,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.closed = False
        self.storage: Storage[storage.Connection] = storage  # the backend's verbs
        self.max_body = 0  # the longest stored body reads load (set by the bus; messages.fits)
        self.upkeep: Callable[[], None] = lambda: None
        # Correlation ids that requests of this process await, per agent id (sqlbus.request):
        # receive() and run() of that agent skip those responses. Replaced, never mutated.
        self.awaiting: dict[str, frozenset[str]] = {}
        self._upkeep_due = 0.0  # time.monotonic() of the next upkeep
        self._local = threading.local()
        self._connections: set[storage.Connection] = set()
        self._lock = threading.Lock()
        self.wakeup = Wakeup(path)
        self._checkpointer = Checkpointer(self.open_connection)
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
        self.wakeup.forget()  # the parent's doorbell stays the parent's
        self.wakeup = Wakeup(self.path)
        self._checkpointer = Checkpointer(self.open_connection)  # the parent's thread is not here
        self.awaiting = {}  # the parent's waiting requests are not the child's

    def database_error(self, exc: apsw.Error) -> DatabaseError:
        """Say in one line what an apsw error means for the user."""
        return database_error(self.path, self.busy_timeout, exc)

    def close(self) -> None:
        """Close every connection; a thread waiting in the engine wakes at once with
        :class:`DatabaseError`, as does every later call. Safe to call twice."""
        self.closed = True
        self.wakeup.close()  # removes this process's doorbell and wakes its waiters
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

    # -- time, transactions, wake-ups ------------------------------------------------------

    def now_ms(self) -> int:
        """The clock's time in epoch ms (ValueError when it is outside what ids can hold)."""
        return check_clock(self.clock)

    def write(self) -> Write:
        """``with engine.write() as tx:`` one write transaction (:class:`Write`, :class:`Tx`)."""
        return Write(self)

    def reading(self, conn: storage.Connection | None = None) -> Read:
        """``with engine.reading() as conn:`` reads, errors translated (see :class:`Read`)."""
        return Read(self, conn)

    def committed(self, tags: set[bytes] | None = None) -> None:
        """After a commit: ring the waiters of every process that ``tags`` (a :class:`Tx`'s
        marks) concern; None wakes every waiter."""
        self.wakeup.ring(tags)
        if time.monotonic() >= self._upkeep_due:
            self._upkeep_due = time.monotonic() + UPKEEP_CHECK_EVERY
            self.upkeep()

    def ring(self, agents: Iterable[str]) -> None:
        """Wake the waiters for ``agents`` in every process, without a commit."""
        self.wakeup.ring({agent_tag(agent) for agent in agents})

    def _wal_hook(self, frames: int) -> None:
        self._checkpointer.wal_hook(frames)  # through the engine: a forked child has a new one

    def change_token(self) -> int:
        """A number that changes when any process commits (read it before a look, then
        :meth:`wait_for_change` never misses a commit after the look)."""
        conn = self.connection()
        with self.reading(conn):
            return storage.data_version(conn)

    def wait_for_change(self, token: int, timeout: float, agent: str | None = None) -> int:
        """Block up to ``timeout`` seconds until a commit may have made work for ``agent``
        (None: any commit) since ``token`` (:meth:`change_token`) was read. Rings of any
        process wake the wait at once; the token is re-checked at least every
        ``wakeup.FALLBACK`` seconds in case a ring was lost. Returns what woke it
        (``wakeup.RUNG``: a commit for ``agent``; ``wakeup.CHANGED``; 0: the time ran out)."""
        conn = self.connection()

        def changed() -> bool:
            with self.reading(conn):
                return storage.data_version(conn) != token

        return self.wakeup.wait(changed, timeout, ANY if agent is None else agent_tag(agent))

    def wait_until(
        self, look: Callable[[bool], Looked], timeout: float, agent: str | None = None
    ) -> Any:
        """Look, and while nothing is found wait for a commit (or what comes due) and look
        again, for up to ``timeout`` seconds; returns the last look's ``found``.

        ``look(rung)`` is told whether a ring naming ``agent`` woke the wait (work for it was
        committed: it may act at once instead of reading first)."""
        deadline = time.monotonic() + timeout
        rung = False
        while True:
            looked = look(rung)
            if looked.found:
                return looked.found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return looked.found
            woken = self.wait_for_change(looked.token, min(remaining, looked.wait_at_most), agent)
            rung = woken == RUNG

    async def wait_until_async(
        self, look: Callable[[], Awaitable[Looked]], timeout: float, agent: str | None = None
    ) -> Any:
        """The asyncio twin of :meth:`wait_until`: ``await look()`` (which runs its reads off
        the event loop) and, while nothing is found, wait for a ring naming ``agent`` (or any
        ring) without blocking the loop; the change token is the wake-up's own, taken before
        each look, so a commit after the look is never missed (``looked.token`` is unused)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tag = ANY if agent is None else agent_tag(agent)
        while True:
            token = self.wakeup.token(tag)  # before the look: a commit after it rings
            looked = await look()
            if looked.found:
                return looked.found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return looked.found
            await self.wakeup.wait_async(token, min(remaining, looked.wait_at_most, FALLBACK), tag)
