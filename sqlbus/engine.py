"""The engine under every bus: connections, transactions, error translation, fork handling,
the clock, wake-ups and waiting. Everything above (agents, deliveries, state, the run loop,
operations) talks to an :class:`Engine`, never to another module's internals.

>>> with engine.write() as tx:                                          # doctest: +SKIP
...     tx.storage.register_agent(tx.conn, "alice", engine.now_ms())

This module holds what both backends share: the :class:`Tx` handle of a write, the clock
check, and waiting (:meth:`Engine.wait_until`). Each backend subclasses :class:`Engine` with
its connections and wake-up: :class:`sqlbus.sqlite.engine.SqliteEngine` (one database file,
a connection per thread, doorbells) and :class:`sqlbus.postgres.engine.PostgresEngine` (a
pool per bus, LISTEN/NOTIFY, the server's clock). The backend's verbs are ``engine.storage``
(a :class:`sqlbus.backend.Storage`): the modules above reach storage and wake-ups only
through the engine.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .backend import Storage
from .errors import DatabaseError
from .waking import ANY, FALLBACK, MAX_TAGS, RUNG, agent_tag

if TYPE_CHECKING:
    from .transaction import Transaction

__all__ = ["Engine", "Tx", "Looked", "check_clock", "open_block", "RUNG", "MAX_CLOCK_MS"]

T = TypeVar("T")

# The latest time an id's 13 digits can hold: 2286-11-20T17:46:39.999Z, in epoch ms.
MAX_CLOCK_MS = 9_999_999_999_999
UPKEEP_CHECK_EVERY = 0.1  # s: how often a writing process looks whether upkeep is due

# The outbox block open in this thread (asyncio: this task), if any: a write of its own there
# would wait for the block's own write lock (see the backends' Write).
open_block: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "sqlbus_open_block", default=None
)


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


def refuse_inside_block() -> None:
    """Refuse a write of its own while this thread's (task's) outbox block is open: its BEGIN
    would wait for the write lock, or the row locks, the block holds."""
    block = open_block.get()
    if block is not None and block.holds_lock():
        raise RuntimeError(
            f"{block.agent.id}'s transaction() block is open in this thread or task: "
            "write through its tx (tx.publish, tx.state.set, ...) or after the block"
        )


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


class WriteContext(AbstractContextManager[Tx]):
    """What :meth:`Engine.write` returns: ``with engine.write() as tx``; ``conn`` is the
    transaction's connection once entered."""

    conn: Any


class Engine:
    """What the layers above use of a backend: transactions, reads, the clock, wake-ups.

    ``path`` names the database in messages (a file path, or a URL without its password and
    the schema). ``clock`` returns epoch seconds. ``upkeep`` (set by the bus) runs after some
    writes, at most every ``UPKEEP_CHECK_EVERY`` seconds, and must never raise.
    """

    kind = ""  # "sqlite" or "postgresql"
    storage: Storage[Any]  # the backend's verbs
    backend_errors: tuple[type[BaseException], ...] = ()  # the driver's error classes
    wakeup: Any  # the backend's wake-up: ring, wait, token, wait_async, close

    def __init__(self, path: str, *, busy_timeout: float, clock: Callable[[], float]) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.closed = False
        self.max_body = 0  # the longest stored body reads load (set by the bus; messages.fits)
        self.upkeep: Callable[[], None] = lambda: None
        # Correlation ids that requests of this process await, per agent id (sqlbus.request):
        # receive() and run() of that agent skip those responses. Replaced, never mutated.
        self.awaiting: dict[str, frozenset[str]] = {}
        self._upkeep_due = 0.0  # time.monotonic() of the next upkeep
        self.group_commit_delay = 0.0  # s a group's leader waits for company (SQLite)

    # -- what each backend provides -----------------------------------------------------------

    def write(self) -> WriteContext:
        """``with engine.write() as tx:`` one write transaction (a :class:`Tx`)."""
        raise NotImplementedError

    def grouped(self, fn: Callable[[Tx], T], solo: bool = False) -> T:
        """``fn(tx)`` in a write transaction that concurrent writes of this bus may share
        (group commit, where the backend has it); returns ``fn``'s result, or raises its
        error, once the write is committed. ``fn`` is library code that only writes (no user
        code, no waiting): it may run on another caller's thread. ``solo``: never shared,
        always on the caller's thread and connection, but in turn with the others (a claim).
        This default gives each call its own transaction (PostgreSQL: a pool of connections
        commits in parallel)."""
        refuse_inside_block()
        with self.write() as tx:
            return fn(tx)

    def reading(self, conn: Any = None) -> AbstractContextManager[Any]:
        """``with engine.reading() as conn:`` reads (no transaction unless the caller begins a
        read one), the driver's errors translated to :class:`DatabaseError`."""
        raise NotImplementedError

    def change_token(self) -> int:
        """A number that changes when any process commits (read it before a look, then
        :meth:`wait_for_change` never misses a commit after the look)."""
        raise NotImplementedError

    def token_before_look(self) -> int | None:
        """The change token to wait on after a look (a ``look``, a claim, ``find_response``),
        read before it; None when the storage's look reads it itself, in the same statement
        (SQLite's ``data_version``): then the look's own value is the one to wait on."""
        return None

    def change_token_in(self, tx: Tx) -> int:
        """The change token, read inside the write ``tx`` (its own commit does not move it)."""
        raise NotImplementedError

    def check_usable(self, conn: Any) -> None:
        """Refuse a connection of a closed bus, or one a forked child inherited."""
        raise NotImplementedError

    def database_error(self, exc: BaseException) -> DatabaseError:
        """Say in one line what a driver error means for the user."""
        raise NotImplementedError

    def tx_ended(self, conn: Any) -> bool:
        """Whether the database ended the transaction open on ``conn`` (rolled it back)."""
        raise NotImplementedError

    def execute_user_sql(self, conn: Any, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """Run the application's own SQL in the open transaction (``tx.execute``); a failing
        statement undoes only itself, as SQLite does."""
        raise NotImplementedError

    def sizes(self) -> tuple[int, int]:
        """(database bytes, WAL bytes): what :meth:`sqlbus.Bus.metrics` reports."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every connection; a thread waiting in the engine wakes at once with
        :class:`DatabaseError`, as does every later call. Safe to call twice."""
        raise NotImplementedError

    def closed_error(self) -> DatabaseError:
        return DatabaseError(f"{self.path}: the bus is closed")

    # -- time, commits, wake-ups --------------------------------------------------------------

    def now_ms(self) -> int:
        """The clock's time in epoch ms (ValueError when it is outside what ids can hold)."""
        return check_clock(self.clock)

    def committed(self, tags: set[bytes] | None = None) -> None:
        """After a commit: ring the waiters of every process that ``tags`` (a :class:`Tx`'s
        marks) concern; None wakes every waiter."""
        self.wakeup.ring(tags)
        self.after_commit()

    def after_commit(self) -> None:
        """Run upkeep when it is due (after a commit of this process)."""
        if time.monotonic() >= self._upkeep_due:
            self._upkeep_due = time.monotonic() + UPKEEP_CHECK_EVERY
            self.upkeep()

    def ring(self, agents: Iterable[str]) -> None:
        """Wake the waiters for ``agents`` in every process, without a commit."""
        self.wakeup.ring({agent_tag(agent) for agent in agents})

    def wait_for_change(self, token: int, timeout: float, agent: str | None = None) -> int:
        """Block up to ``timeout`` seconds until a commit may have made work for ``agent``
        (None: any commit) since ``token`` (:meth:`change_token`) was read. Returns what woke
        it (``RUNG``: a commit for ``agent``; ``CHANGED``; 0: the time ran out)."""

        def changed() -> bool:
            return self.change_token() != token

        return int(self.wakeup.wait(changed, timeout, ANY if agent is None else agent_tag(agent)))

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
