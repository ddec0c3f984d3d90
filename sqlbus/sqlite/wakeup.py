"""Wake-ups: a process waiting for work learns of another process's commit at once, idly.

How it works (figures in ``benchmarks/latency.py``):

- **Doorbells** (:mod:`sqlbus.sqlite.doorbell`). A process that waits binds one Unix datagram
  socket, its doorbell, in ``<db>.doorbells/``. After every commit the committing process
  rings (:mod:`sqlbus.sqlite.ringer`): one non-blocking ``sendto`` per doorbell. A ring
  carries 4-byte tags of the agents that got new work (:func:`agent_tag`, a hash of the id),
  or nothing for "anything may have changed", so a process waiting for bob goes straight back
  to sleep when alice gets a message.
- **Only processes that wait now are rung.** A doorbell's awake flag is up while one of its
  threads waits. A waiter raises it *before* it checks the database, a ringer reads it *after*
  its commit, so either the ringer sees the flag or the waiter sees the commit. A process that
  has used asyncio keeps its flag up (its waits start before they register).
- **One poller per process.** One waiting thread (the *leader*) polls the doorbell; the other
  threads (and asyncio waiters, see :meth:`Wakeup.wait_async`) wait on a Condition that the
  leader notifies. A commit by this process rings its own doorbell when it has waiters.
- **A commit rings whom its write marked** (:class:`sqlbus.engine.Tx`): the agents that got
  work; a write that marked nothing rings "anything may have changed", one marked quiet (a
  claim, a plain ack) rings nobody.
- **Nothing is ever stranded.** The caller's ``check`` (``PRAGMA data_version`` differs from
  the value read before the caller looked) runs before sleeping, so a commit that landed
  between the look and the wait is seen; a slow fallback poll (``FALLBACK`` seconds) covers a
  lost ring or a deleted doorbell (which is then made again); a doorbell left by a crashed
  process refuses rings (ECONNREFUSED) and the ringer removes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..waking import ANY, CHANGED, FALLBACK, MAX_TAGS, RUNG, agent_tag
from .doorbell import Doorbell, DoorbellDirectory, doorbell_dir
from .ringer import Ringer

__all__ = [
    "Wakeup", "ANY", "RUNG", "CHANGED", "FALLBACK", "MAX_TAGS", "agent_tag", "doorbell_dir",
]

log = logging.getLogger("sqlbus")

_NEVER = object()  # interest of the asyncio proxy: never wakes on a ring, only polls


def _poll_instead(problem: OSError) -> None:
    """Say (once per bus) that waiters poll because the doorbell directory cannot be trusted."""
    log.warning("sqlbus: not using the doorbell directory: %s; waiters poll every %s s",
                problem, FALLBACK)


class _AsyncWaiter:
    __slots__ = ("loop", "future", "tag", "snapshot")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool], tag: Any,
                 snapshot: tuple[int, int, int]) -> None:
        self.loop = loop
        self.future = future
        self.tag = tag
        self.snapshot = snapshot


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


class Wakeup:
    """The wake-up machinery of one :class:`~sqlbus.Bus` in one process.

    ``ring(tags)`` after a commit; ``wait(check, timeout, tag)`` to sleep until a ring for
    ``tag`` (an agent id; :data:`ANY` for every ring), until ``check()`` is true, or until
    ``timeout`` seconds pass.
    """

    def __init__(self, db_path: str) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the waiters' state below, and the awake flag
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._directory = DoorbellDirectory(db_path, _poll_instead)
        self._doorbell = Doorbell(self._directory, self._lock)
        self._ringer = Ringer(self._directory, self._doorbell)
        self._always_awake = False  # asyncio was used: its waits start before they register
        self._waiters = 0
        self._leading = False
        self._generic = 0  # rings that said "anything may have changed"
        self._any = 0  # every ring
        self._tag_counts: dict[bytes, int] = {}  # rings per tag some waiter is interested in
        self._interest: dict[bytes, int] = {}
        self._async: set[_AsyncWaiter] = set()
        self._proxy_running = False

    @property
    def directory(self) -> str:
        """The doorbell directory of this bus's database."""
        return self._directory.path

    @property
    def doorbell_path(self) -> str | None:
        """The file of this process's doorbell, or None before the first wait."""
        return self._doorbell.path

    # -- ringing -------------------------------------------------------------------------

    def ring(self, tags: set[bytes] | None = None) -> None:
        """After a commit: wake the waiters of every process. ``tags`` (from
        :func:`agent_tag`) names the agents that got work; None means anything may have
        changed; an empty collection (a claim, a plain ack) rings nobody. Never raises: the
        commit is done, and a lost ring only delays a waiter until its fallback poll."""
        try:
            self._ring(tags)
        except (OSError, ValueError):
            pass  # e.g. the directory vanished, or another thread is closing the bus

    def _ring(self, tags: set[bytes] | None) -> None:
        if tags is not None and not tags:
            return
        peers = self._ringer.listing()
        if peers is None:
            if not self._directory.open():
                if self._waiters or self._async:
                    self._kick(b"")
                return
            peers = self._ringer.listing()
            if peers is None:
                return  # closed meanwhile
        local = self._waiters or self._async
        if not peers and not local:
            return
        if tags is None:
            payload = b""  # an empty datagram: anything may have changed
        else:
            payload = b"".join(tags) if len(tags) <= MAX_TAGS else b""
        if local:
            self._kick(payload)
        if peers:
            self._ringer.ring(peers, tags, payload)

    def _kick(self, payload: bytes) -> None:
        """Wake this process's own waiters after its own commit."""
        if not self._doorbell.kick(payload):
            with self._cond:  # no doorbell (it could not be made): wake everyone directly
                self._count(None)

    # -- what woke whom ------------------------------------------------------------------

    def _snapshot(self, tag: Any) -> tuple[int, int, int]:
        count = self._tag_counts.get(tag, 0) if isinstance(tag, bytes) else 0
        return (self._generic, self._any, count)

    def _matches(self, tag: Any, snapshot: tuple[int, int, int]) -> int:
        """RUNG, CHANGED or 0 (nothing for this waiter since ``snapshot``)."""
        if self._tag_counts.get(tag, 0) != snapshot[2] and isinstance(tag, bytes):
            return RUNG
        if self._closed or self._generic != snapshot[0]:
            return CHANGED
        if tag is ANY:
            return CHANGED if self._any != snapshot[1] else 0
        return 0

    def _register(self, tag: Any) -> None:
        if isinstance(tag, bytes):
            self._interest[tag] = self._interest.get(tag, 0) + 1
            self._tag_counts.setdefault(tag, 0)

    def _unregister(self, tag: Any) -> None:
        if isinstance(tag, bytes):
            left = self._interest[tag] - 1
            if left:
                self._interest[tag] = left
            else:
                del self._interest[tag]
                del self._tag_counts[tag]

    def _count(self, tags: set[bytes] | None) -> None:
        """Record rings (under the lock) and wake whoever they concern."""
        self._any += 1
        if tags is None:
            self._generic += 1
        else:
            counts = self._tag_counts
            for tag in tags:
                if tag in counts:
                    counts[tag] += 1
        self._cond.notify_all()
        if self._async:
            for waiter in list(self._async):
                if self._matches(waiter.tag, waiter.snapshot):
                    self._async.discard(waiter)
                    try:
                        waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                    except RuntimeError:
                        pass  # its loop is closed

    # -- waiting -------------------------------------------------------------------------

    def _waited_on(self) -> bool:
        """Whether the awake flag should be up (under the lock)."""
        return self._waiters > 0 or self._always_awake or bool(self._async)

    def _bind(self, tag: Any) -> bool:
        """Make the doorbell ask for ``tag``, and bind it if needed; False when impossible."""
        if tag is not _NEVER:
            self._doorbell.advertise(tag)  # before binding: a new doorbell is named with it
        return self._doorbell.bind(self._waited_on)

    def token(self, tag: Any = ANY) -> tuple[int, int, int]:
        """Make the doorbell if needed and return a snapshot to pass to :meth:`wait_async`.
        Take it *before* looking at the database, so a commit after the look wakes you."""
        self._bind(tag)
        with self._lock:
            # Rings must reach the waits that follow this token, which register only later.
            self._always_awake = True
            self._doorbell.raise_flag(True)
            return self._snapshot(tag)

    def wait(self, check: Callable[[], bool], timeout: float, tag: Any = ANY) -> int:
        """Sleep until ``check()`` is true, a ring for ``tag`` arrives (an :func:`agent_tag`,
        or :data:`ANY`), or ``timeout`` seconds pass. Returns :data:`RUNG` when a ring named
        ``tag``, :data:`CHANGED` when woken otherwise, 0 on time-out.

        ``check`` must compare against a value read before the caller last looked at the
        database (``PRAGMA data_version``); it runs first, and then at least every
        ``FALLBACK`` seconds, so a lost ring delays a wake-up by FALLBACK at most.
        """
        end = time.monotonic() + timeout
        bound = self._bind(tag)
        with self._lock:
            self._waiters += 1
            self._register(tag)
            self._doorbell.raise_flag(True)  # before the check: a commit after it rings us
            snapshot = self._snapshot(tag)
        try:
            if check():
                return CHANGED
            next_check = time.monotonic() + FALLBACK
            while True:
                now = time.monotonic()
                if now >= end:
                    return 0
                if now >= next_check:
                    if check():
                        return CHANGED
                    if bound and not self._closed and not self._doorbell.intact():
                        self._rebind()
                    next_check = now + FALLBACK
                with self._lock:
                    woken = self._matches(tag, snapshot)
                    if woken:
                        return woken
                    lead = bound and not self._leading and self._doorbell.bound
                    if not lead:
                        self._cond.wait(min(end, next_check) - now)
                        continue
                    self._leading = True
                try:
                    self._lead(min(end, next_check) - now)
                finally:
                    with self._lock:
                        self._leading = False
                        self._cond.notify_all()  # hand over: a follower may lead now
        finally:
            self._leave(tag)

    def _leave(self, tag: Any) -> None:
        """A waiter is done; the last one out after close() lets go of the doorbell."""
        with self._lock:
            self._waiters -= 1
            self._unregister(tag)
            if not self._waiters and not self._always_awake:
                self._doorbell.raise_flag(False)
            last_out = self._closed and not self._leading and not self._waiters
            if last_out:
                self._doorbell.unbind()
        if last_out and self._pid == os.getpid():
            # close() left the shared descriptors to the last waiter out
            with self._directory.lock, self._lock:
                if not self._doorbell.bound:
                    self._release_directory()

    def _lead(self, timeout: float) -> None:
        """Poll the doorbell for up to ``timeout`` seconds (as the process's one poller)."""
        if not self._doorbell.poll(timeout):
            return
        got, tags = self._doorbell.drain()
        if got:
            with self._lock:
                self._count(tags)

    def _rebind(self) -> None:
        with self._lock:
            if self._leading:
                return  # the leader is polling the old socket; try again next time
            self._leading = True
        try:
            self._doorbell.unbind()
            self._doorbell.bind(self._waited_on)
        finally:
            with self._lock:
                self._leading = False

    async def wait_async(self, token: tuple[int, int, int], timeout: float, tag: Any = ANY) -> bool:
        """The asyncio form of :meth:`wait`, without a ``check``: wakes on a ring for ``tag``
        since ``token`` (from :meth:`token`) or after ``timeout`` seconds (the caller looks
        again, which is the fallback). Never blocks the event loop: a daemon thread polls the
        doorbell for the process while asyncio waiters exist."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = _AsyncWaiter(loop, future, tag, token)
        with self._lock:
            if self._matches(tag, token):
                return True
            self._register(tag)
            self._async.add(waiter)
            start = not self._proxy_running
            self._proxy_running = True
        try:
            if start:
                threading.Thread(target=self._proxy, name="sqlbus-doorbell", daemon=True).start()
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                return False
        finally:
            with self._lock:
                self._async.discard(waiter)
                self._unregister(tag)

    def _proxy(self) -> None:
        """Keep a poller on the doorbell while asyncio waiters exist (a thread waiter that
        wants no ring for itself: the leader's notifications reach the futures)."""
        try:
            while True:
                with self._lock:
                    if not self._async or self._closed:
                        return
                self.wait(lambda: False, FALLBACK, _NEVER)
        finally:
            with self._lock:
                self._proxy_running = False

    # -- closing ------------------------------------------------------------------------

    def _release_directory(self) -> None:
        """Let go of the directory (under its lock and ours): the listing goes with it."""
        self._ringer.reset()
        self._directory.release()

    def close(self) -> None:
        """Remove this process's doorbell and wake every waiter (they see the bus closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._directory.closed = True
            self._count(None)
            idle = not self._leading and not self._waiters
        if self._pid != os.getpid():
            return
        if idle:
            self._doorbell.unbind()
        else:
            self._kick(b"")  # the leader wakes, and the last waiter out removes the doorbell
            self._doorbell.remove_files()  # the socket closes with the last waiter
        with self._directory.lock, self._lock:  # not while a waiter's unbind uses them
            if not self._doorbell.bound:
                self._release_directory()

    def forget(self) -> None:
        """In a forked child: drop the parent's doorbell without touching it (not closed, not
        removed: the parent still uses it)."""
        self._doorbell.forget()
        self._closed = self._directory.closed = True

