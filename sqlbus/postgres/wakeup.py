"""Wake-ups on PostgreSQL: ``NOTIFY`` with the commit on a channel per schema, ``LISTEN`` on a
connection of its own.

- **Ringing.** A commit that made work for agents sends one ``NOTIFY`` naming them (their
  4-byte tags, hex; empty: anything may have changed) in the same round trip as its
  ``COMMIT`` (:meth:`Wakeup.notify_statement`), and wakes this process's own waiters at once.
  A notifying commit takes a cluster-wide lock (FIELD-NOTES 1.2), so a bus sends at most one
  notify per ``THROTTLE`` seconds: a ring inside that window is merged into the next notify,
  which a timer sends at the window's end (on a pooled connection). Two rings go out at once
  all the same: the first after a quiet spell, and an answer: the first after another process
  rang an agent this process waits for (a reply to a request, the next request of a
  conversation), so request/response pays no window while a stream of publishes does.
- **Listening.** One daemon thread per bus holds the listener connection (psycopg's
  ``notifies()`` holds its connection's lock) and records what arrives. When the connection
  breaks it records a ring for "anything may have changed" and reconnects.
- **Precise, and nothing stranded.** Every ring (local or received) gets a number and is kept
  in a short history; the change token is the newest number. A waiter reads it *before* it
  looks at the database, then sleeps until a ring after it names its agent (or says anything
  may have changed), or ``FALLBACK`` seconds pass (the caller looks again: that covers a
  notify lost while the listener reconnected). Rings for other agents do not wake it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from ..waking import ANY, CHANGED, FALLBACK, MAX_TAGS, RUNG

log = logging.getLogger("sqlbus")

THROTTLE = 0.02  # s: the shortest time between two notifies of one bus, but for an answer
HISTORY = 1024  # rings remembered; a waiter whose token is older wakes at once (CHANGED)
LISTEN_SLICE = 0.5  # s: how often an idle listener looks whether the bus closed


def channel_name(schema: str) -> str:
    """The notify channel of the bus in ``schema``."""
    return f"sqlbus_{schema}"


def _payload(tags: set[bytes] | None) -> str:
    if tags is None or len(tags) > MAX_TAGS:
        return ""
    return "".join(sorted(tag.hex() for tag in tags))


def _tags(payload: str) -> frozenset[bytes] | None:
    if not payload:
        return None
    try:
        return frozenset(bytes.fromhex(payload[i:i + 8]) for i in range(0, len(payload), 8))
    except ValueError:
        return None  # not ours: treat as "anything may have changed"


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


class Wakeup:
    """The wake-up of one PostgreSQL bus in one process.

    ``connect()`` opens the listener's connection (autocommit); ``notify(channel, payload)``
    sends one NOTIFY outside a transaction (a pooled connection); ``reconnected()`` runs after
    the listener lost its connection and got a new one. All may raise the driver's errors.
    """

    def __init__(self, channel: str, connect: Callable[[], psycopg.Connection],
                 notify: Callable[[str, str], None], reconnected: Callable[[], None]) -> None:
        self._channel = channel
        # The channel is "sqlbus_" and a checked schema name ([a-z_][a-z0-9_]*): quoting it
        # is all it needs, and the payload is hex.
        self._quoted = f'"{channel}"'.encode()
        # A channel of this listener alone: close() notifies it to stop the listener at once.
        self._own_channel = f"sqlbus_close_{os.getpid()}_{id(self)}"
        self._connect = connect
        self._notify = notify
        self._reconnected = reconnected
        self.reconnects = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._rings = 0  # the newest ring's number: the change token
        self._history: collections.deque[tuple[int, frozenset[bytes] | None]] = (
            collections.deque(maxlen=HISTORY))
        self._async: dict[asyncio.Future[bool], tuple[asyncio.AbstractEventLoop, int, Any]] = {}
        self._ours: set[Any] = set()  # tags some thread of this process has waited on
        # Another process rang an agent this one waits for since our last notify: our next
        # notify is likely its answer (a reply, the next request), and goes out at once.
        self._answer_due = False
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        # Throttled notifies: when the last went out, and what waits for the next.
        self._notify_lock = threading.Lock()
        self._last_notify = 0.0
        self._pending: set[bytes] | None = set()  # None: anything may have changed
        self._pending_any = False
        self._timer: threading.Timer | None = None

    # -- ringing -------------------------------------------------------------------------

    def notify_statement(self, tags: set[bytes] | None) -> bytes | None:
        """For a commit about to be sent: the ``NOTIFY`` statement to send in its round trip,
        or None (nobody to ring, or inside the throttle window: then the ring waits for the
        next notify, which a timer sends at the window's end)."""
        if tags is not None and not tags:
            return None
        with self._notify_lock:
            if self._closed:
                return None
            now = time.monotonic()
            if (now >= self._last_notify + THROTTLE or self._answer_due) and not self._pending_any:
                self._last_notify = now
                self._answer_due = False
                return b"NOTIFY " + self._quoted + b", '" + _payload(tags).encode() + b"'"
            self._merge(tags)
            self._schedule(self._last_notify + THROTTLE - now)
        return None

    def rang(self, tags: set[bytes] | None) -> None:
        """After a commit of this process: wake its own waiters (the notify tells the rest)."""
        if tags is not None and not tags:
            return
        with self._lock:
            self._count(None if tags is None else frozenset(tags))

    def ring(self, tags: set[bytes] | None = None) -> None:
        """Wake the waiters ``tags`` names in every process, without a commit. Never raises:
        a lost ring only delays a waiter until its fallback look."""
        if tags is not None and not tags:
            return
        self.rang(tags)
        with self._notify_lock:
            if self._closed:
                return
            self._merge(tags)
            self._schedule(max(0.0, self._last_notify + THROTTLE - time.monotonic()))

    def _merge(self, tags: set[bytes] | None) -> None:
        self._pending_any = True
        if tags is None or self._pending is None:
            self._pending = None
        else:
            self._pending |= tags

    def _schedule(self, delay: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(delay, self._flush)
            self._timer.daemon = True
            self._timer.start()

    def _flush(self) -> None:
        with self._notify_lock:
            self._timer = None
            if not self._pending_any or self._closed:
                return
            payload = _payload(self._pending)
            self._pending, self._pending_any = set(), False
            self._last_notify = time.monotonic()
        try:
            self._notify(self._channel, payload)
        except Exception as exc:  # the server is away: waiters fall back to looking
            log.debug("sqlbus: notify failed: %s", exc)

    # -- what woke whom ------------------------------------------------------------------

    def _count(self, tags: frozenset[bytes] | None) -> None:
        """Record a ring (under the lock) and wake whoever it concerns."""
        self._rings += 1
        self._history.append((self._rings, tags))
        self._cond.notify_all()
        for future, (loop, token, tag) in list(self._async.items()):
            if self._since(token, tag):
                del self._async[future]
                try:
                    loop.call_soon_threadsafe(_resolve, future)
                except RuntimeError:
                    pass  # its loop is closed

    def _since(self, token: int, tag: Any) -> int:
        """What rang for ``tag`` since the change token ``token``: RUNG (a ring named it),
        CHANGED (anything may have changed) or 0 (under the lock)."""
        if self._closed:
            return CHANGED
        if self._rings == token:
            return 0
        if not self._history or self._history[0][0] > token + 1:
            return CHANGED  # older than the history: take it as a change
        woken = 0
        for number, tags in reversed(self._history):
            if number <= token:
                break
            if tags is None or tag is ANY:
                woken = CHANGED
            elif tag in tags:
                return RUNG
        return woken

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
        statement = b"LISTEN " + self._quoted + f'; LISTEN "{self._own_channel}"'.encode()
        lost = False
        while not self._closed:
            try:
                conn = self._connect()
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
                        for note in conn.notifies(timeout=LISTEN_SLICE):
                            if note.channel == self._own_channel:
                                break  # close() wants the listener gone
                            tags = _tags(note.payload)
                            with self._lock:
                                self._count(tags)
                                if tags is not None and not self._ours.isdisjoint(tags):
                                    self._answer_due = True
                finally:
                    self._listening.clear()
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
        """The newest ring's number (moves on every ring)."""
        return self._rings

    def token(self, tag: Any = ANY) -> int:
        """The change token for :meth:`wait_async`, taken *before* looking at the database."""
        self.start()
        return self._rings

    def wait_since(self, token: int, timeout: float, tag: Any = ANY) -> int:
        """Sleep until a ring after ``token`` names ``tag`` (an agent's tag; ANY: any ring) or
        says anything may have changed, or ``timeout`` seconds pass (at most ``FALLBACK``:
        then the caller looks again). Returns RUNG, CHANGED or 0."""
        self.start(wait=FALLBACK)
        end = time.monotonic() + min(timeout, FALLBACK)
        with self._lock:
            self._remember(tag)
            while True:
                woken = self._since(token, tag)
                if woken:
                    return woken
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return 0
                self._cond.wait(remaining)

    def _remember(self, tag: Any) -> None:
        if isinstance(tag, bytes) and tag not in self._ours:
            if len(self._ours) > 10_000:
                self._ours.clear()
            self._ours.add(tag)

    async def wait_async(self, token: int, timeout: float, tag: Any = ANY) -> bool:
        """The asyncio form of :meth:`wait_since`, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            if self._since(token, tag):
                return True
            self._async[future] = (loop, token, tag)
            self._remember(tag)
        try:
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                return False
        finally:
            with self._lock:
                self._async.pop(future, None)

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
            if self._listening.is_set():
                try:
                    self._notify(self._own_channel, "")
                except Exception:
                    pass  # the server is away: the listener stops within LISTEN_SLICE
            listener.join(LISTEN_SLICE * 3)

    def forget(self) -> None:
        """In a forked child: drop the parent's listener without touching its connection
        (closing it would end the parent's session)."""
        self._closed = True
        self._pid = -1  # the listener thread is not in the child; its connection is the parent's
