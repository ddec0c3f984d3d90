"""Wake-ups on PostgreSQL: ``NOTIFY`` after commit on a channel per schema, ``LISTEN`` on a
connection of its own.

- **Ringing.** After a commit the bus wakes this process's own waiters at once and sends one
  ``NOTIFY`` naming the agents that got work (their 4-byte tags, hex; empty: anything may
  have changed). A notifying commit takes a cluster-wide lock (FIELD-NOTES 1.2), so a bus
  sends at most one notify per ``THROTTLE`` seconds: a ring inside that window is merged into
  the next notify, which a timer sends at the window's end. The first ring after a quiet
  spell goes out at once, so a request/response pair pays no window.
- **Listening.** One daemon thread per bus holds the listener connection (psycopg's
  ``notifies()`` holds its connection's lock) and counts what arrives; waiters sleep on a
  Condition (threads) or a future (asyncio) that it wakes. When the connection breaks it
  counts a ring for "anything may have changed" and reconnects, every ``FALLBACK`` s at most.
- **Nothing is stranded.** The change token is the count of rings seen: a waiter reads it
  before it looks at the database, and any ring after the look moves it. Waiters also look
  again at least every ``FALLBACK`` seconds, which covers a notify lost while the listener
  reconnected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from ..waking import ANY, CHANGED, FALLBACK, MAX_TAGS, RUNG

log = logging.getLogger("sqlbus")

THROTTLE = 0.005  # s: the shortest time between two notifies of one bus


def channel_name(schema: str) -> str:
    """The notify channel of the bus in ``schema``."""
    return f"sqlbus_{schema}"


def _payload(tags: set[bytes] | None) -> str:
    if tags is None or len(tags) > MAX_TAGS:
        return ""
    return "".join(sorted(tag.hex() for tag in tags))


def _tags(payload: str) -> set[bytes] | None:
    if not payload:
        return None
    try:
        return {bytes.fromhex(payload[i:i + 8]) for i in range(0, len(payload), 8)}
    except ValueError:
        return None  # not ours: treat as "anything may have changed"


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
    """The wake-up of one PostgreSQL bus in one process.

    ``connect()`` opens the listener's connection (autocommit); ``notify(payload)`` sends one
    NOTIFY on the bus's channel (on a pooled connection); both raise the driver's errors.
    """

    def __init__(self, channel: str, connect: Callable[[], psycopg.Connection],
                 notify: Callable[[str, str], None], reconnected: Callable[[], None]) -> None:
        self._channel = channel
        self._connect = connect
        self._notify = notify
        self._reconnected = reconnected  # after the listener lost its connection and got one
        self.reconnects = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._generic = 0  # rings that said "anything may have changed"
        self._any = 0  # every ring: the change token
        self._tag_counts: dict[bytes, int] = {}
        self._interest: dict[bytes, int] = {}
        self._async: set[_AsyncWaiter] = set()
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._conn: psycopg.Connection | None = None
        # Throttled notifies: when the last went out, and what waits for the next.
        self._notify_lock = threading.Lock()
        self._last_notify = 0.0
        self._pending: set[bytes] | None = set()  # None: anything may have changed
        self._pending_any = False
        self._timer: threading.Timer | None = None

    # -- ringing -------------------------------------------------------------------------

    def ring(self, tags: set[bytes] | None = None) -> None:
        """After a commit: wake this process's waiters and (throttled) every other process's.
        Never raises: the commit is done, and a lost ring only delays a waiter until its
        fallback look."""
        if tags is not None and not tags:
            return
        with self._lock:
            self._count(tags)  # this process's waiters, and its change token
        self._send(tags)

    def _send(self, tags: set[bytes] | None) -> None:
        with self._notify_lock:
            if self._closed:
                return
            self._merge(tags)
            now = time.monotonic()
            wait = self._last_notify + THROTTLE - now
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            payload = self._take()
            self._last_notify = now
        self._deliver(payload)

    def _merge(self, tags: set[bytes] | None) -> None:
        self._pending_any = True
        if tags is None or self._pending is None:
            self._pending = None
        else:
            self._pending |= tags

    def _take(self) -> str:
        payload = _payload(self._pending)
        self._pending, self._pending_any = set(), False
        return payload

    def _flush(self) -> None:
        with self._notify_lock:
            self._timer = None
            if not self._pending_any or self._closed:
                return
            payload = self._take()
            self._last_notify = time.monotonic()
        self._deliver(payload)

    def _deliver(self, payload: str) -> None:
        try:
            self._notify(self._channel, payload)
        except Exception as exc:  # the server is away: waiters fall back to looking
            log.debug("sqlbus: notify failed: %s", exc)

    # -- what woke whom ------------------------------------------------------------------

    def _snapshot(self, tag: Any) -> tuple[int, int, int]:
        count = self._tag_counts.get(tag, 0) if isinstance(tag, bytes) else 0
        return (self._generic, self._any, count)

    def _matches(self, tag: Any, snapshot: tuple[int, int, int]) -> int:
        if isinstance(tag, bytes) and self._tag_counts.get(tag, 0) != snapshot[2]:
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
        """Record a ring (under the lock) and wake whoever it concerns."""
        self._any += 1
        if tags is None:
            self._generic += 1
        else:
            counts = self._tag_counts
            for tag in tags:
                if tag in counts:
                    counts[tag] += 1
        self._cond.notify_all()
        for waiter in list(self._async):
            if self._matches(waiter.tag, waiter.snapshot):
                self._async.discard(waiter)
                try:
                    waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                except RuntimeError:
                    pass  # its loop is closed

    # -- listening -----------------------------------------------------------------------

    def start(self, wait: float = 0.0) -> None:
        """Start the listener if it is not running, and then wait up to ``wait`` seconds for
        its first LISTEN (a commit after that wakes this process). Later calls never wait:
        while the listener reconnects, waiters fall back to looking every ``FALLBACK`` s."""
        if self._listener is not None:
            return
        with self._lock:
            if self._listener is not None or self._closed:
                return
            self._listener = threading.Thread(
                target=self._listen, name="sqlbus-listener", daemon=True)
            self._listener.start()
        if wait > 0:
            self._listening.wait(wait)

    def _listen(self) -> None:
        statement = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
        lost = False
        while not self._closed:
            try:
                conn = self._conn = self._connect()
                try:
                    conn.execute(statement)
                    self._listening.set()
                    with self._lock:
                        self._count(None)  # what was committed while nobody listened
                    if lost:
                        self.reconnects += 1
                        lost = False
                        self._reconnected()
                    while not self._closed:
                        for note in conn.notifies(timeout=FALLBACK):
                            with self._lock:
                                self._count(_tags(note.payload))
                finally:
                    self._listening.clear()
                    self._conn = None
                    if os.getpid() == self._pid:
                        conn.close()
            except Exception as exc:
                if self._closed:
                    return
                log.debug("sqlbus: listener lost its connection: %s", exc)
                lost = True
                with self._lock:
                    self._count(None)
                time.sleep(FALLBACK)

    # -- waiting -------------------------------------------------------------------------

    @property
    def change_token(self) -> int:
        """The count of rings this process has seen (moves on every ring)."""
        return self._any

    def token(self, tag: Any = ANY) -> tuple[int, int, int]:
        """A snapshot for :meth:`wait_async`, taken *before* looking at the database."""
        self.start()
        with self._lock:
            return self._snapshot(tag)

    def wait(self, check: Callable[[], bool], timeout: float, tag: Any = ANY) -> int:
        """Sleep until ``check()`` is true, a ring for ``tag`` arrives, or ``timeout`` seconds
        pass (at most ``FALLBACK``: then the caller looks again). Returns RUNG, CHANGED or 0."""
        self.start(wait=FALLBACK)
        end = time.monotonic() + min(timeout, FALLBACK)
        with self._lock:
            self._register(tag)
            snapshot = self._snapshot(tag)
        try:
            if check():
                return CHANGED
            with self._lock:
                while True:
                    woken = self._matches(tag, snapshot)
                    if woken:
                        return woken
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        return 0
                    self._cond.wait(remaining)
        finally:
            with self._lock:
                self._unregister(tag)

    async def wait_async(self, token: tuple[int, int, int], timeout: float, tag: Any = ANY) -> bool:
        """The asyncio form of :meth:`wait`: wakes on a ring for ``tag`` since ``token`` (from
        :meth:`token`) or after ``timeout`` seconds, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = _AsyncWaiter(loop, future, tag, token)
        with self._lock:
            if self._matches(tag, token):
                return True
            self._register(tag)
            self._async.add(waiter)
        try:
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                return False
        finally:
            with self._lock:
                self._async.discard(waiter)
                self._unregister(tag)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and wake every waiter (they see the bus closed)."""
        with self._notify_lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        with self._lock:
            self._count(None)
        listener = self._listener
        if listener is not None and listener is not threading.current_thread():
            listener.join(FALLBACK * 2 + 1)

    def forget(self) -> None:
        """In a forked child: drop the parent's listener without touching its connection
        (closing it would end the parent's session)."""
        self._closed = True
        self._pid = -1  # the listener thread is not in the child; its connection is the parent's
