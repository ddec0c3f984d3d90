"""Group commit: concurrent writes of one bus (threads, asyncio calls on their threads) share
one SQLite transaction, the way PostgreSQL and Kafka producers batch their commits.

>>> engine.grouped(lambda tx: op.write(tx, now))                         # doctest: +SKIP

A caller that finds no write of this bus in progress writes at once, alone (no timer, no
linger, no savepoint): it is the *leader* of a group of one. Callers that arrive meanwhile
queue up. Those that queue while the leader is still writing join its transaction before the
commit (up to ``MAX_GROUP`` writes); those that queue during the commit wait, and the first
of them leads the next group, of everyone queued by then. The leader runs each member's
write function on its own connection inside one ``BEGIN IMMEDIATE ... COMMIT``, each member
(but a leader alone) inside a ``SAVEPOINT``:

- a member whose function raises (a lost lease, a version conflict, any exception) has only
  its savepoint rolled back and gets its own error; the others commit;
- an error of the database itself (disk full, I/O, busy timeout at ``BEGIN``, a failed
  ``COMMIT``, a transaction the database ended) fails every member of the group, and nothing
  of the group is written;
- every member returns only after the group's commit (at the bus's durability: with
  ``durability="full"`` one fsync covers the group), with its own result or error; the
  commit rings the waiters every member marked (once), before anyone returns.

Writes are library code only (validation happens before, in the caller's thread), so the
transaction never waits for user code. Members are written in the order they arrived, and a
thread has one call in flight at a time, so each thread's writes keep their order. A *solo*
write (a claim) takes its turn in the same queue but always alone, on its own thread and
connection; a group stops at it. A queued write's wait for another process's lock stays
within ``busy_timeout`` in all.

The bus's ``group_commit_delay`` (s) makes a leader wait that long before it begins, for
company; 0 (the default) never waits. No thread is started: the leader is one of
the callers. ``close()`` fails the queued callers at once ("the bus is closed"); a forked
child starts with an empty queue (:meth:`GroupCommit.forget`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import apsw

from .. import connections
from ..engine import Tx
from ..errors import DatabaseError
from . import storage

if TYPE_CHECKING:
    from .engine import SqliteEngine

__all__ = ["GroupCommit", "MODES", "mark_offload_thread", "offload_thread"]

# How grouped writes run: "auto" (the default: "on" where a commit is dear, with
# durability="full" (one fsync each) or a group_commit_delay, and for asyncio calls; else
# "off"), "on" (a caller
# alone writes alone, concurrent ones share a transaction), "off" (every write its own
# transaction), "always" (every write goes through the group, inside a savepoint, even
# alone: for running the behaviour tests on the group's path). Measured on 2 cores
# (docs/benchmarks.md, group commit): at durability="normal" a commit costs about what handing
# a write to another thread costs, and grouping made 8 publishing threads 0.71x of one thread
# (0.78x without) and 4 acking threads 0.54x (0.82x without); at "full" it made them 3.2x.
MODES = ("auto", "on", "off", "always")

# The threads of an asyncio bus's pool (``sqlbus.aio``): their writes come from concurrent
# tasks that each hand a call to a thread anyway, so joining a group costs them no more; at
# durability="normal" grouping made 8 asyncio publishing tasks 1.27x one task's rate, against
# 0.70x without (benchmarks/group_commit.py --modes off,on,auto).
_offload = threading.local()


def mark_offload_thread() -> None:
    """Make this thread's grouped writes group at any durability (an asyncio pool thread)."""
    _offload.marked = True


def offload_thread() -> bool:
    """Whether this thread is an asyncio bus's pool thread (:func:`mark_offload_thread`)."""
    return getattr(_offload, "marked", False)

_WAITING, _LEAD, _DONE = 0, 1, 2
# The most writes one transaction takes: writers that arrive while a group is written join it
# before its commit, up to this many (so the first of them waits a bounded time).
MAX_GROUP = 64


class _Member:
    """One caller's write: its function, its outcome, and the lock it sleeps on. (Class
    attributes are the defaults: a caller that leads at once sets only two.)"""

    result: Any = None
    error: BaseException | None = None
    state = _WAITING
    group: list[_Member] = []  # (never mutated: a leader's own list replaces it)
    wake: Any = None  # a queued member's lock, released once: to lead, or when done
    interrupted: BaseException | None = None
    queued_at = 0.0  # time.monotonic() when it queued (0: it led at once)

    def __init__(self, fn: Callable[[Tx], Any], solo: bool) -> None:
        self.fn = fn
        self.solo = solo

    def outcome(self) -> Any:
        """Its result, or raise its error; an interrupt of its thread comes after (see
        GroupCommit._wait)."""
        interrupted, error = self.interrupted, self.error
        if interrupted is not None:
            self.interrupted = None
            raise interrupted
        if error is not None:
            self.error = None  # no reference cycle through the traceback
            try:
                raise error
            finally:
                error = None
        return self.result


class GroupCommit:
    """The queue of one engine's grouped writes (see the module's docstring)."""

    mode = "auto"  # one of MODES (a class default tests may change; benchmarks set it per bus)

    def __init__(self, engine: SqliteEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._busy = False  # a leader is writing a group; newcomers queue
        self._queue: list[_Member] = []
        self.commits = 0  # transactions committed, and the writes they held (for benchmarks)
        self.writes = 0

    def forget(self) -> None:
        """In a forked child: the parent's queue and leader are not here."""
        self._lock = threading.Lock()
        self._busy = False
        self._queue = []

    def close(self) -> None:
        """Fail every queued caller at once with "the bus is closed" (a group being written
        finishes; the next leader finds the bus closed)."""
        with self._lock:
            queued, self._queue = self._queue, []
        for member in queued:
            member.error = self.engine.closed_error()
            member.state = _DONE
            member.wake.release()

    # -- the caller's side ---------------------------------------------------------------------

    def takes(self, solo: bool = False) -> bool:
        """Whether a write of this thread goes through the group (see ``MODES``): in "auto",
        where a commit is dear (durability="full", a group_commit_delay) or, for a write that
        may share, on an asyncio bus's pool thread."""
        if self.mode != "auto":
            return self.mode != "off"
        engine = self.engine
        return (engine.synchronous == "FULL" or bool(engine.group_commit_delay)
                or (not solo and offload_thread()))

    def write(self, fn: Callable[[Tx], Any], solo: bool = False) -> Any:
        """Run ``fn(tx)`` in a write transaction that concurrent callers may share; returns
        its result (or raises its error) once the transaction has committed. ``solo``: takes
        its turn like the others but always in a transaction of its own, on its own thread
        and connection (a claim, which reads its connection's change counter)."""
        engine = self.engine
        if engine.closed:
            raise engine.closed_error()
        member = _Member(fn, solo)
        with self._lock:
            lead = not self._busy
            if lead:
                self._busy = True
            else:
                member.wake = wake = threading.Lock()
                wake.acquire()
                member.queued_at = time.monotonic()
                self._queue.append(member)
        if lead:
            group = [member]
        else:
            self._wait(member)
            if member.state == _DONE:
                return member.outcome()
            group = member.group
        self._lead(group)
        return member.outcome()

    def _wait(self, member: _Member) -> None:
        """Sleep until ``member`` leads a group or is done. An interrupt (KeyboardInterrupt in
        the main thread) while it is still queued takes it out, nothing written; once a
        leader has taken it, it waits for the outcome (or leads) and raises the interrupt
        after."""
        while True:
            try:
                member.wake.acquire()
                return
            except BaseException as exc:
                with self._lock:
                    queued = member in self._queue
                    if queued:
                        self._queue.remove(member)
                if queued:
                    raise
                member.interrupted = exc

    # -- the leader's side ---------------------------------------------------------------------

    def _lead(self, group: list[_Member]) -> None:
        """Write ``group`` in one transaction, then hand the queue to its next leader (or mark
        the bus idle) and wake the members."""
        engine = self.engine
        tags: set[bytes] | None = set()
        committed = False
        try:
            delay = engine.group_commit_delay  # the bus's group_commit_delay
            if delay > 0 and not group[0].solo:
                time.sleep(delay)
                group.extend(self._take(MAX_GROUP - len(group)))
            committed, tags = self._write_group(group)
        except BaseException as exc:  # an interrupt outside the members' functions
            committed = False
            try:  # this thread's connection, to roll back whatever it may hold
                conn: storage.Connection | None = engine.connection()
            except Exception:
                conn = None  # the bus is closed
            with connections.inside:
                self._fail(group, exc, conn)
        with self._lock:
            queue = self._queue
            if not queue:
                following: list[_Member] = []
            elif queue[0].solo:
                following, self._queue = queue[:1], queue[1:]
            else:
                following = self._take_locked(MAX_GROUP)
            self._busy = bool(following)  # the rest of the queue waits behind that group
        if following:  # the next group begins while this one's members wake
            head = following[0]
            head.group = following
            head.state = _LEAD
            head.wake.release()
        try:
            if committed:
                engine.wakeup.ring(tags)  # before any member returns, as a write alone does
        finally:
            for member in group[1:]:
                member.state = _DONE
                member.wake.release()
        if committed:
            engine.after_commit()  # upkeep, on the leader's time

    def _take(self, most: int) -> list[_Member]:
        with self._lock:
            return self._take_locked(most)

    def _take_locked(self, most: int) -> list[_Member]:
        """Take up to ``most`` queued writers from the front, up to the first solo one."""
        queue = self._queue
        count = 0
        for member in queue:
            if member.solo or count >= most:
                break
            count += 1
        taken, self._queue = queue[:count], queue[count:]
        return taken

    def _write_group(self, group: list[_Member]) -> tuple[bool, set[bytes] | None]:
        """Write the members' functions in one transaction; each member gets its result or
        error. Returns (whether anything was committed, whom the commit rings)."""
        engine = self.engine
        try:
            conn = engine.connection()
        except BaseException as exc:
            return self._fail(group, exc)
        tags: set[bytes] | None = set()
        written = 0
        with connections.inside:
            try:
                queued_at = group[0].queued_at
                if queued_at:
                    self._begin_late(conn, queued_at)
                else:
                    storage.begin(conn)
            except BaseException as exc:
                return self._fail(group, exc)
            cur = conn.cur
            index = 0
            while index < len(group):
                member = group[index]
                index += 1
                # The first member alone needs no savepoint: its failure undoes only itself.
                alone = len(group) == 1 and (self.mode != "always" or member.solo)
                tx = Tx(conn, engine.storage)
                try:
                    if not alone:
                        cur.execute("SAVEPOINT sqlbus_member")
                    member.result = member.fn(tx)
                    if not alone:
                        cur.execute("RELEASE sqlbus_member")
                except BaseException as exc:
                    if alone or not self._own_error(conn, exc):
                        return self._fail(group, exc, conn, member)
                    try:  # undo this member's writes only
                        cur.execute("ROLLBACK TO sqlbus_member")
                        cur.execute("RELEASE sqlbus_member")
                    except BaseException as undo:
                        return self._fail(group, undo, conn)
                    member.error = self._translated(exc)
                    continue
                written += 1
                if written == 1:
                    tags = tx.tags  # (a set of this write's own)
                elif tags is not None:
                    tags = None if tx.tags is None else tags | tx.tags
                if (index == len(group) and self._queue and index < MAX_GROUP
                        and not group[0].solo):
                    # Writers that came while these were written join before the commit.
                    group.extend(self._take(MAX_GROUP - index))
            if not written:
                self._rollback(conn)
                return False, tags
            try:
                storage.commit(conn)
            except BaseException as exc:
                return self._fail(group, exc, conn)
        self.commits += 1
        self.writes += written
        return True, tags

    def _begin_late(self, conn: storage.Connection, queued_at: float) -> None:
        """BEGIN IMMEDIATE, waiting for another process's lock no longer than what is left of
        ``busy_timeout`` for the member that queued first, at ``queued_at``: a write's whole
        wait for the lock stays bounded by it (SPEC 2)."""
        waited = time.monotonic() - queued_at
        if waited < 0.01:
            storage.begin(conn)
            return
        busy_timeout = self.engine.busy_timeout
        storage.set_busy_timeout(conn, max(0.0, busy_timeout - waited))
        try:
            storage.begin(conn)
        finally:
            storage.set_busy_timeout(conn, busy_timeout)

    def _own_error(self, conn: storage.Connection, exc: BaseException) -> bool:
        """Whether ``exc``, raised by one member's function, is that member's alone (its
        savepoint can be undone and the group go on): any exception but the database's own
        failures (a constraint error is a statement's own) and interrupts, while the
        transaction is still open."""
        if conn.get_autocommit():
            return False  # the database ended the transaction
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: stop the group
        return not isinstance(exc, apsw.Error) or isinstance(exc, apsw.ConstraintError)

    def _translated(self, exc: BaseException) -> BaseException:
        if isinstance(exc, apsw.Error):
            error = self.engine.database_error(exc)
            error.__cause__ = exc
            return error
        return exc

    def _fail(
        self, group: list[_Member], exc: BaseException, conn: storage.Connection | None = None,
        culprit: _Member | None = None,
    ) -> tuple[bool, None]:
        """The group failed as a whole: roll back, and every member gets an error of its own.
        The member whose write raised gets that error, the leader an interrupt (it came to
        its thread); the others a :class:`DatabaseError` saying why nothing was written."""
        if conn is not None:
            self._rollback(conn)
        interrupt = not isinstance(exc, Exception)
        if interrupt:
            culprit = group[0]  # KeyboardInterrupt, SystemExit: the leader's thread's own
        error = self._translated(exc)
        for member in group:
            member.result = None
            if member is culprit or len(group) == 1:
                member.error = error
            elif isinstance(error, DatabaseError):  # the database's failure: everyone's
                member.error = DatabaseError(str(error))
                member.error.__cause__ = exc
            else:
                member.error = DatabaseError(
                    f"{self.engine.path}: the transaction this write shared with others was "
                    f"{'interrupted' if interrupt else 'ended by the database'} "
                    f"({type(exc).__name__}: {exc}); nothing was written"
                )
                member.error.__cause__ = exc
        return False, None

    @staticmethod
    def _rollback(conn: storage.Connection) -> None:
        try:
            storage.rollback(conn)
        except apsw.Error:
            pass  # the connection already ended the transaction
