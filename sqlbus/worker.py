"""The dispatch loop: subscriptions, ``run()``, request/response and events (SPEC 5, 5.1, 7).

>>> bob.subscribe("task_assignment", lambda message: do(message.payload))   # doctest: +SKIP
>>> bob.subscribe("request", lambda message: {"answer": 42})   # the return value is the response
>>> bob.run()                      # until bob.stop(), SIGINT or SIGTERM      # doctest: +SKIP
>>> alice.request("bob", {"q": 1}, timeout=5.0)                              # doctest: +SKIP
{'answer': 42}

How a message goes through the loop:

1. ``receive`` claims it (one short write transaction) with a lease.
2. Every handler for its type, then every wildcard (``"*"``) handler, is called with the
   :class:`~sqlbus.Message`, with no transaction open. A background keeper extends the lease
   (at half the lease) while handlers run, so a long handler does not lose its message.
3. All succeed: the message is acked, together with what the handlers buffered on the
   current delivery (``sqlbus.current_delivery().publish/reply/state``), in one transaction.
   One raises: the delivery fails (retry with backoff, or dead letter), the buffered effects
   are dropped. ``Retry``/``Discard`` retry or dead-letter without counting a failure.
4. A message nobody handles is acked and counted (counter ``unhandled``).

Buffered effects: a handler reaches its delivery through :func:`current_delivery` (a context
variable, set while a handler runs). ``agent.publish`` inside a handler commits at once;
``current_delivery().publish`` commits with the ack, so a handler's outputs exist if and only
if its input was consumed.

Request/response: ``request`` publishes a ``request`` whose ``correlation_id`` is fresh, then
takes the ``response`` with that id straight from its inbox (an index on it, by correlation
id). While it waits, ``receive``/``run`` of the same agent in this process skip that
response, so a requester may run its own loop in another thread (a loop of the same agent id
in *another process* does not know of the request: give each process its own agent id). A
request that times out is recorded in the database; its response, if it comes later, is
discarded and counted (counter ``late_responses``) rather than handed to any handler: by the
agent's run loop, or by its next request. A ``request`` handler's return value becomes the
response; if it raises, the response says ``success: false`` with ``error: str(exc)`` and the
request is acked, not retried (the requester is told at once; the error is still counted in
the error rates). ``Discard`` dead-letters the request and answers with a failure; ``Retry``
retries it without answering.

Subscriptions are recorded interests (SPEC 5): ``subscribe`` and ``events.on`` write the
agent's interest (a type, an event-name pattern) to the database, where the state changes and
events sent without explicit recipients find their recipients; the handlers stay in this
process's agent object. The interest goes when its last handler does (or at once with
``unsubscribe(type)`` / ``events.off(pattern)``).

Events: ``agent.events.on(pattern, handler)`` calls ``handler(event)`` with an :class:`Event`
(name, data, emitted_at, emitted_by, correlation_id) for events whose name matches the
shell-style ``pattern`` (``fnmatch.fnmatchcase``, as the emitter matches recipients), after
the ``subscribe("event")`` and wildcard handlers, which get the message as usual.
"""

from __future__ import annotations

import contextvars
import fnmatch
import logging
import math
import secrets
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import apsw
import msgspec

from . import storage
from .bus import LATE_RESPONSES, _check_limit, _error_text, _seconds, count_late_responses
from .encoding import check_agent_id
from .errors import (
    DatabaseError,
    Discard,
    LeaseLostError,
    RemoteError,
    RequestTimeoutError,
    Retry,
    ValidationError,
    VersionConflictError,
)
from .messages import MESSAGE_TYPES, Message, decode_message, iso_ms
from .wakeup import RUNG, agent_tag, mark_quiet

if TYPE_CHECKING:
    from .bus import Agent, Bus, Delivery

__all__ = [
    "Event",
    "Events",
    "Dispatcher",
    "current_delivery",
    "request",
    "respond",
    "UNHANDLED",
    "LATE_RESPONSES",
]

log = logging.getLogger("sqlbus")

Handler = Callable[[Message], Any]
EventHandler = Callable[["Event"], Any]

# Counter names (table ``counters``, per agent), written only on these rare paths
# (LATE_RESPONSES, from sqlbus.bus, too).
UNHANDLED = "unhandled"

# How long an idle run() waits before it looks at its stop flag again (seconds): the longest
# a signal can take to end an idle loop (stop() rings the loop awake at once). Each look is a
# claim transaction, so a longer slice costs less CPU while idle.
_IDLE_SLICE = 1.0
# How long a timed-out request is remembered, so that its late response is recognised (ms).
_REMEMBER_TIMEOUTS_MS = 24 * 3600 * 1000

_current: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "sqlbus_current_delivery", default=None
)


def current_delivery() -> Delivery | None:
    """The :class:`~sqlbus.Delivery` the calling handler is processing (None outside one).

    Use it to buffer effects that must commit together with the ack::

        def handle(message):
            d = sqlbus.current_delivery()
            d.publish("carol", "notification", {"text": "done"})   # sent with the ack
            d.state.set("job/42", {"status": "done"})              # written with the ack
    """
    return _current.get()


class Event(msgspec.Struct, kw_only=True):
    """An event as an ``events.on`` handler receives it (the payload of an ``event`` message).

    ``emitted_at`` is ISO 8601 UTC; ``correlation_id`` is the emitter's, or None.
    """

    name: str
    data: Any = None
    emitted_at: str = ""
    emitted_by: str = ""
    correlation_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Effects written with an ack (the delivery's buffered effects take any object with write())


class _Count:
    """Add one to an agent's counter, in the ack's transaction."""

    __slots__ = ("name", "agent")

    def __init__(self, name: str, agent: str) -> None:
        self.name = name
        self.agent = agent

    def write(self, conn: apsw.Connection, now: int) -> None:
        storage.add_counters(conn, [(self.name, self.agent, 1)])


class _DiscardLate:
    """A late response: forget its request's timeout and count it, in the ack's transaction."""

    __slots__ = ("agent", "correlation_id", "seq")

    def __init__(self, agent: str, correlation_id: str, seq: int) -> None:
        self.agent = agent
        self.correlation_id = correlation_id
        self.seq = seq

    def write(self, conn: apsw.Connection, now: int) -> None:
        storage.forget_request_timeout(conn, self.agent, self.correlation_id)
        count_late_responses(conn, self.agent, 1, storage.delivery_ms(conn, self.seq))


class _CountError:
    """Count a request handler's exception in the error rates (the request is acked)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, conn: apsw.Connection, now: int) -> None:
        storage.count_error(conn, self.name)


# ---------------------------------------------------------------------------------------------
# Subscriptions and the run loop


def dispatcher(agent: Agent) -> Dispatcher:
    """The agent object's dispatcher (its subscriptions and run loop), made on first use."""
    found = agent.__dict__.get("_dispatcher")
    if found is None:
        found = agent.__dict__.setdefault("_dispatcher", Dispatcher(agent))
    return found


def _check_callable(handler: object) -> None:
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}")


def _check_type(type_: object) -> None:
    if type_ != "*" and type_ not in MESSAGE_TYPES:
        raise ValidationError(
            f"type: expected '*' or one of {', '.join(sorted(MESSAGE_TYPES))}, got {type_!r}"
        )


class Dispatcher:
    """One agent object's handlers and run loop (used through :class:`~sqlbus.Agent`)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        # Replaced, never mutated: the loop reads them without the lock.
        self._handlers: dict[str, tuple[Handler, ...]] = {}
        self._event_handlers: dict[str, tuple[EventHandler, ...]] = {}
        self._stop = threading.Event()
        self._running = False
        self.events = Events(self)

    # -- subscriptions ---------------------------------------------------------------------
    # The interest is written before the handler is added and dropped before the last handler
    # goes, under the lock, so a failed write changes nothing and the two never disagree.

    def subscribe(self, type: str, handler: Handler | None) -> None:
        _check_type(type)
        if handler is not None:
            _check_callable(handler)
        with self._lock:
            self._record("type", type)
            if handler is not None:
                self._handlers = _added(self._handlers, type, handler)

    def unsubscribe(self, type: str, handler: Handler | None) -> None:
        _check_type(type)
        with self._lock:
            self._handlers = self._unrecord("type", self._handlers, type, handler)

    def on(self, pattern: str, handler: EventHandler | None) -> None:
        _check_event_name(pattern, "event pattern")
        if handler is not None:
            _check_callable(handler)
        with self._lock:
            self._record("event", pattern)
            if handler is not None:
                self._event_handlers = _added(self._event_handlers, pattern, handler)

    def off(self, pattern: str, handler: EventHandler | None) -> None:
        _check_event_name(pattern, "event pattern")
        with self._lock:
            self._event_handlers = self._unrecord("event", self._event_handlers, pattern, handler)

    def _record(self, kind: str, pattern: str) -> None:
        bus = self.agent.bus
        now = bus._now_ms()
        with bus._write() as conn:
            mark_quiet()  # an interest is no work for anyone
            storage.add_interest(conn, self.agent.id, kind, pattern, now)

    def _unrecord(
        self, kind: str, table: dict[str, tuple[Any, ...]], pattern: str, handler: Any
    ) -> dict[str, tuple[Any, ...]]:
        """``table`` without ``handler`` (None: every handler) for ``pattern``; drops the
        interest when no handler is left. A handler that was not there changes nothing."""
        if handler is None:
            rest = {key: value for key, value in table.items() if key != pattern}
        elif handler in table.get(pattern, ()):
            rest = _removed(table, pattern, handler)
        else:
            return table
        if pattern not in rest:
            bus = self.agent.bus
            with bus._write() as conn:
                mark_quiet()
                storage.drop_interest(conn, self.agent.id, kind, pattern)
        return rest

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the loop now, wherever it waits (only this agent's waiters wake)
            self.agent.bus._wakeup.ring({agent_tag(self.agent.id)})
        except OSError:
            pass  # it notices within _IDLE_SLICE anyway

    def run(
        self, until_idle: bool = False, *, limit: int = 1, lease: float | None = None,
        concurrency: int = 1,
    ) -> int:
        _check_limit(limit)
        _check_concurrency(concurrency)
        agent = self.agent
        bus = agent.bus
        lease_s = _seconds(bus.lease if lease is None else lease, "lease", allow_zero=False)
        with self._lock:
            if self._running:
                raise RuntimeError(f"run() is already running for agent {agent.id!r}")
            self._running = True
        lease_ms = int(lease_s * 1000)
        keeper = _LeaseKeeper(bus, lease_s)
        restore = self._install_signal_handlers()
        processed = 0
        claimed = None  # what the ack of the last message claimed, for the next round
        look = True  # read before claiming (receive()'s wait, unrolled so stop() can end it)
        try:
            if concurrency > 1:
                return self._run_concurrently(until_idle, concurrency, keeper, lease_ms)
            while not self._stop.is_set():
                if claimed is None:
                    if look and not agent._more:
                        baseline, work, due = agent._look()
                        if work:
                            claimed = agent._claim(limit, lease_ms)
                    else:
                        claimed = agent._claim(limit, lease_ms)
                if claimed is not None and claimed.deliveries:
                    done, claimed = self._process(claimed.deliveries, keeper, limit, lease_ms)
                    processed += done
                    look = True
                    continue
                if claimed is not None:  # an empty claim read what the wait needs
                    baseline, due, claimed = claimed.baseline, claimed.due, None
                if until_idle or self._stop.is_set():
                    break
                woken = bus._wait_for_change(
                    baseline, min(_IDLE_SLICE, agent._seconds_until(due)), agent.id
                )
                look = woken != RUNG  # a ring that named this agent: claim straight away
        finally:
            if claimed is not None:  # claimed for a round that will not come
                _release(claimed.deliveries, attempted=False)
            keeper.close()
            restore()
            with self._lock:
                self._running = False
            self._stop.clear()  # a later run() starts afresh
        return processed

    def _run_concurrently(
        self, until_idle: bool, concurrency: int, keeper: _LeaseKeeper, lease_ms: int
    ) -> int:
        """The loop of ``run(concurrency=N)``: up to N messages in handlers at once, each on a
        thread of its own with its own lease (kept by ``keeper``). It claims only as many
        messages as there are idle threads, so every message claimed goes to a handler at
        once and none waits behind another; on stop the handlers in flight finish."""
        agent = self.agent
        bus = agent.bus
        slots = threading.Condition()
        in_flight = 0
        processed = 0
        failure: list[BaseException] = []  # what broke a handler thread (not a handler)

        def handle(d: Delivery) -> None:
            nonlocal in_flight, processed
            attempted = False
            error: BaseException | None = None
            try:
                if not self._stop.is_set():  # stopped meanwhile: back without an attempt
                    attempted = True
                    try:
                        if self._dispatch(d):
                            self._ack(d, 0, lease_ms)
                    except LeaseLostError as exc:
                        log.warning("sqlbus: %s; another receiver has it now", exc)
            except BaseException as exc:  # a database error: the loop stops and raises it
                error = exc
                failure.append(exc)
                self._stop.set()
            finally:
                _release([d], attempted=attempted, error=error)
                keeper.drop(d)
                with slots:
                    in_flight -= 1
                    processed += attempted
                    slots.notify_all()

        pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"sqlbus-handler-{agent.id}")
        try:
            while not self._stop.is_set():
                with slots:
                    while in_flight >= concurrency and not self._stop.is_set():
                        slots.wait(_IDLE_SLICE)
                    free = concurrency - in_flight
                if self._stop.is_set():
                    break
                baseline, work, due = agent._look()
                claimed = agent._claim(free, lease_ms) if work else None
                if claimed is not None and claimed.deliveries:
                    keeper.hold(claimed.deliveries)
                    for d in claimed.deliveries:
                        with slots:
                            in_flight += 1
                        pool.submit(handle, d)
                    continue
                if claimed is not None:
                    baseline = claimed.baseline if claimed.baseline is not None else baseline
                    due = claimed.due
                if until_idle:
                    with slots:
                        if in_flight == 0:
                            break
                        slots.wait(_IDLE_SLICE)  # what they ack or publish may be more work
                    continue
                bus._wait_for_change(
                    baseline, min(_IDLE_SLICE, agent._seconds_until(due)), agent.id
                )
        finally:
            pool.shutdown(wait=True)  # in-flight handlers finish, however run() ends
        if failure:
            raise failure[0]
        return processed

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT/SIGTERM stop the loop gracefully (a second one interrupts the handler);
        only in the main thread, where Python lets us install them."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        stop = self._stop

        def on_signal(signum: int, frame: Any) -> None:
            if stop.is_set():
                raise KeyboardInterrupt(f"second signal {signum}: stopping now")
            log.info("sqlbus: signal %d: finishing the message in hand, then stopping", signum)
            stop.set()

        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except (ValueError, OSError):
                pass

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _process(
        self, deliveries: Sequence[Delivery], keeper: _LeaseKeeper, limit: int, lease_ms: int
    ) -> tuple[int, Any]:
        """Dispatch ``deliveries`` in order; the ack of the last one also claims the next
        messages (one transaction instead of two), unless it carries a response: its
        requester waits for that commit, so it goes first. Returns (messages processed, what
        that claim found, or None)."""
        done = 0
        claimed = None
        interrupted: BaseException | None = None
        keeper.hold(deliveries)
        try:
            for index, d in enumerate(deliveries):
                if self._stop.is_set():
                    break  # the rest go back below, untouched
                done = index + 1
                try:
                    if self._dispatch(d):
                        last = index == len(deliveries) - 1 and not self._stop.is_set()
                        claim = limit if last and not _has_response(d) else 0
                        claimed = self._ack(d, claim, lease_ms)
                except LeaseLostError as exc:
                    log.warning("sqlbus: %s; another receiver has it now", exc)
                keeper.drop(d)
        except BaseException as exc:  # KeyboardInterrupt in a handler: kept as its error
            interrupted = exc
            raise
        finally:
            # a handler saw them: interrupted
            _release(deliveries[:done], attempted=True, error=interrupted)
            _release(deliveries[done:], attempted=False)
            keeper.drop_all(deliveries)
        return done, claimed

    def _ack(self, d: Delivery, claim: int, lease_ms: int) -> Any:
        """Ack ``d`` after its handlers succeeded, claiming up to ``claim`` next messages in
        the same transaction (0: none); returns that claim, or None. When a buffered effect
        cannot be written (a state write's version check fails at the ack, a value cannot be
        encoded), the delivery fails instead: retried, or dead-lettered for a non-retryable
        error, and the loop goes on."""
        acking = [] if d._settled is not None else [d]  # a handler may have settled it itself
        try:
            if claim:
                return self.agent._claim(claim, lease_ms, acking=acking)
            if acking:
                d.ack()
        except (VersionConflictError, ValidationError) as exc:
            d.fail(exc)
            _log_failure(d, exc, d._outcome)
        return None

    def _dispatch(self, d: Delivery) -> bool:
        """Run the handlers of ``d``. True when it is to be acked (with what the handlers
        buffered); otherwise it was settled here (retry, dead letter, failure)."""
        message = d.message
        agent = self.agent
        if message.type == "response" and self._is_late(message):
            d._effects.append(_DiscardLate(agent.id, message.headers.correlation_id, d._seq))  # type: ignore[arg-type]
            return True
        handlers = self._handlers.get(message.type, ()) + self._handlers.get("*", ())
        event_handlers: tuple[EventHandler, ...] = ()
        event = None
        if message.type == "event":
            if message.sender == agent.id:
                return True  # an agent never handles its own events: acked
            event = _event_of(message)
            if event is not None:
                event.emitted_by = message.sender  # the payload's claim is not evidence
                event_handlers = _event_handlers(self._event_handlers, event.name)
        if not handlers and not event_handlers:
            log.debug("sqlbus: no handler for %s message %s; acked", message.type, message.id)
            d._effects.append(_Count(UNHANDLED, agent.id))
            return True
        token = _current.set(d)
        try:
            result = None
            try:
                for handler in handlers:
                    value = handler(message)
                    if result is None:
                        result = value
                for event_handler in event_handlers:
                    event_handler(event)  # type: ignore[arg-type]
            except Retry as signal_:
                if d._settled is not None:
                    return _settled_then_raised(d, signal_)
                try:
                    d.retry(signal_.delay)
                except (TypeError, ValueError) as bad:  # a delay changed after construction
                    d.fail(bad)
                    _log_failure(d, bad, d._outcome)
                return False
            except Discard as signal_:
                if d._settled is not None:
                    return _settled_then_raised(d, signal_)
                try:
                    d.dead_letter(signal_.reason)
                except (TypeError, ValueError) as bad:  # a reason changed after construction
                    d.fail(bad)
                    _log_failure(d, bad, d._outcome)
                    return False
                if message.type == "request":  # tell the requester now, not at its timeout
                    respond(agent, message, None, success=False,
                            error=f"discarded: {signal_.reason}", error_type="Discard")
                return False
            except Exception as exc:
                if d._settled is not None:
                    return _settled_then_raised(d, exc)
                if message.type != "request":
                    d.fail(exc)
                    _log_failure(d, exc, d._outcome)
                    return False
                # The requester is waiting: answer with the error and consume the request (a
                # retry would answer late or twice). Counted in the error rates.
                d._effects.clear()
                d._effects.append(_CountError(type(exc).__name__))
                d.reply(None, success=False, error=_error_text(exc) or type(exc).__name__,
                        error_type=type(exc).__name__)
                _log_failure(d, exc, "answered success: false")
                return True
            if message.type == "request" and d._settled is None and not _has_response(d):
                try:  # the handlers' result is the response
                    d.reply(result)
                except ValidationError as exc:  # the return value cannot be sent as JSON
                    d._effects.append(_CountError(type(exc).__name__))
                    d.reply(None, success=False, error=f"the handler's return value: {exc}",
                            error_type=type(exc).__name__)
                    _log_failure(d, exc, "answered success: false")
            return True
        finally:
            _current.reset(token)

    def _is_late(self, message: Message) -> bool:
        correlation_id = message.headers.correlation_id
        if not isinstance(correlation_id, str):
            return False
        bus = self.agent.bus
        with bus._reading() as conn:
            return storage.request_timed_out(conn, self.agent.id, correlation_id)


MAX_CONCURRENCY = 1024  # handler threads of one run loop


def _check_concurrency(concurrency: object) -> int:
    if type(concurrency) is not int or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(
            f"concurrency must be an int 1..{MAX_CONCURRENCY}, got {concurrency!r}"
        )
    return concurrency


def _added(table: dict[str, tuple[Any, ...]], key: str, handler: Any) -> dict[str, tuple[Any, ...]]:
    current = table.get(key, ())
    if handler in current:
        return table  # subscribing twice does not call the handler twice
    return {**table, key: current + (handler,)}


def _removed(table: dict[str, tuple[Any, ...]], key: str, handler: Any) -> dict[str, tuple[Any, ...]]:
    current = table.get(key, ())
    if handler not in current:
        return table
    rest = tuple(h for h in current if h != handler)
    new = dict(table)
    if rest:
        new[key] = rest
    else:
        del new[key]
    return new


def _log_failure(d: Delivery, exc: BaseException, outcome: str) -> None:
    """One WARNING per failed delivery: whose, which message and attempt, what happens next,
    and the traceback (SPEC 5)."""
    log.warning(
        "sqlbus: agent %s, %s message %s, attempt %d: %s: %s; %s", d.agent.id, d.message.type,
        d.message.id, d.attempts, type(exc).__name__, _error_text(exc), outcome, exc_info=exc,
    )


def _event_handlers(
    table: dict[str, tuple[EventHandler, ...]], name: str
) -> tuple[EventHandler, ...]:
    """The handlers of the patterns ``name`` matches: those of the name itself first, then
    those of other patterns in the order they were registered, ``*``'s last."""
    handlers = table.get(name, ())
    for pattern, more in table.items():
        if pattern != name and pattern != "*" and fnmatch.fnmatchcase(name, pattern):
            handlers += more
    if name != "*":
        handlers += table.get("*", ())
    return handlers


def _settled_then_raised(d: Delivery, exc: Exception) -> bool:
    """A handler settled its delivery itself, then raised: that outcome stands (a delivery is
    settled once); the exception is only logged."""
    log.warning(
        "sqlbus: agent %s, %s message %s, attempt %d: the handler raised %s after settling the "
        "message itself (%s); that stands", d.agent.id, d.message.type, d.message.id,
        d.attempts, type(exc).__name__, d._settled, exc_info=exc,
    )
    return False


def _has_response(d: Delivery) -> bool:
    """Whether the handler already buffered a response (``respond``/``reply``)."""
    for effect in d._effects:
        outgoing = getattr(effect, "outgoing", None)
        if outgoing is not None and outgoing.type == "response":
            return True
    return False


def _release(
    deliveries: Sequence[Delivery], *, attempted: bool, error: BaseException | None = None
) -> None:
    """Give back at once the deliveries a loop holds but will not finish (``attempted``:
    whether a handler saw them, ``error`` what interrupted it, see :meth:`Delivery._release`)."""
    for d in deliveries:
        if d._settled is None:
            try:
                d._release(attempted=attempted, error=error)
            except DatabaseError:  # the lease runs out by itself: nothing is lost
                log.warning("sqlbus: could not release %r", d)


class _LeaseKeeper:
    """Extends the leases of the deliveries a loop holds, from a background thread, when less
    than half the lease is left (checked every quarter lease), so long handlers keep them."""

    def __init__(self, bus: Bus, lease: float) -> None:
        self.bus = bus
        self.lease = lease
        self._held: dict[int, Delivery] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                self._held[id(d)] = d
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._keep, name="sqlbus-lease-keeper", daemon=True
                )
                self._thread.start()

    def drop(self, d: Delivery) -> None:
        with self._lock:
            self._held.pop(id(d), None)

    def drop_all(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                self._held.pop(id(d), None)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _keep(self) -> None:
        interval = min(max(self.lease / 4, 0.01), 5.0)
        while not self._closed.wait(interval):
            with self._lock:
                held = list(self._held.values())
            for d in held:
                if d._settled is not None:
                    continue
                if d.lease_until - self.bus.clock() > self.lease / 2:
                    continue
                try:
                    d.extend(self.lease)
                except (LeaseLostError, ValueError):
                    pass  # settled meanwhile, or really lost: the ack will say so
                except DatabaseError as exc:
                    log.warning("sqlbus: could not extend the lease of %r: %s", d, exc)


# ---------------------------------------------------------------------------------------------
# Request / response


# Agents of each bus that had a request time out in this process: their next request sweeps
# late responses out of the inbox in its publish transaction (for requesters without a loop).
_registry_lock = threading.Lock()
_had_timeouts: weakref.WeakKeyDictionary[Bus, set[str]] = weakref.WeakKeyDictionary()


def _await(bus: Bus, agent_id: str, correlation_id: str) -> None:
    with _registry_lock:
        bus._awaiting = {
            **bus._awaiting,
            agent_id: bus._awaiting.get(agent_id, frozenset()) | {correlation_id},
        }


def _unawait(bus: Bus, agent_id: str, correlation_id: str) -> None:
    with _registry_lock:
        rest = bus._awaiting.get(agent_id, frozenset()) - {correlation_id}
        awaiting = dict(bus._awaiting)
        if rest:
            awaiting[agent_id] = rest
        else:
            awaiting.pop(agent_id, None)
        bus._awaiting = awaiting


def request(
    agent: Agent,
    to: str,
    payload: Any = None,
    timeout: float = 30.0,
    *,
    priority: int = 3,
    ttl: int | None = None,
) -> Any:
    """Send a ``request`` to ``to`` and return the ``data`` of its response.

    ``timeout`` is in seconds; ``ttl`` (ms) defaults to the timeout, so a request nobody
    picked up in time expires (dead letter ``expired``) instead of being answered uselessly.
    Raises :class:`RemoteError` with the remote error text when the response says
    ``success: false``, and :class:`RequestTimeoutError` when none comes in time.
    """
    timeout = _seconds(timeout, "timeout", allow_zero=False)
    deadline = time.monotonic() + timeout
    bus = agent.bus
    correlation_id = _new_correlation_id()
    _await(bus, agent.id, correlation_id)  # before the request exists: its response is ours
    try:
        baseline = _send_request(agent, to, payload, timeout, priority, ttl, correlation_id)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            bus._wait_for_change(baseline, remaining, agent.id)
            baseline, message = _take_response(agent, correlation_id)
            if message is not None:
                return _result_of(message)
        return _end_request(agent, to, correlation_id, timeout)
    finally:
        _unawait(bus, agent.id, correlation_id)


def _new_correlation_id() -> str:
    return f"req-{secrets.token_hex(10)}"


def _send_request(
    agent: Agent, to: str, payload: Any, timeout: float, priority: int, ttl: int | None,
    correlation_id: str,
) -> int:
    """Validate and publish the request (its response awaited already, :func:`_await`);
    returns the ``data_version`` to wait on for the response."""
    check_agent_id(to, "to")
    bus = agent.bus
    ttl_ms = max(1, math.ceil(timeout * 1000)) if ttl is None else ttl
    now = bus._now_ms()
    op = bus._prepare(agent.id, to, "request", payload, priority=priority, ttl=ttl_ms,
                      correlation_id=correlation_id, direct_reply=True, now=now)
    with _registry_lock:
        sweep = agent.id in _had_timeouts.get(bus, ())
    with bus._write() as conn:
        op.write(conn, now)
        if sweep:
            _sweep_late_responses(conn, agent.id, now)
        # Read in our own write (whose commit does not move it): a response committed at
        # any time after the request then changes it, so there is no need to look at once.
        return storage.data_version(conn)


def _end_request(agent: Agent, to: str, correlation_id: str, timeout: float) -> Any:
    """Out of time: one last look and the record of the timeout, in one transaction, so a
    response is either returned now or recognised as late when it comes."""
    bus = agent.bus
    now = bus._now_ms()
    with bus._write() as conn:
        mark_quiet()
        taken = storage.take_response(conn, agent.id, correlation_id, now)
        if taken is None:  # a direct reply?
            direct = storage.find_response(conn, agent.id, correlation_id)[1]
            taken = None if direct is None else (0, direct)
        if taken is None:
            storage.record_request_timeout(
                conn, agent.id, correlation_id, now, _REMEMBER_TIMEOUTS_MS
            )
            _sweep_late_responses(conn, agent.id, now)
    if taken is not None:
        return _result_of(decode_message(taken[1]))
    with _registry_lock:
        _had_timeouts.setdefault(bus, set()).add(agent.id)
    raise RequestTimeoutError(
        f"request {correlation_id} from {agent.id!r} to {to!r}: no response within "
        f"timeout={timeout:g}s"
    )


def _sweep_late_responses(conn: apsw.Connection, agent_id: str, now: int) -> None:
    count, delivery_ms = storage.take_late_responses(conn, agent_id, now)
    if count:
        count_late_responses(conn, agent_id, count, delivery_ms)


def _take_response(agent: Agent, correlation_id: str) -> tuple[int, Message | None]:
    """Look for the response (one read): a direct reply is only read; one that waits in the
    inbox (sent without ``direct_reply``) is taken in a write. Returns (``data_version`` of
    the look, to wait on next, the response or None)."""
    bus = agent.bus
    with bus._reading() as conn:
        baseline, body, waiting = storage.find_response(conn, agent.id, correlation_id)
        if body is not None:
            return baseline, decode_message(body)
    if not waiting:
        return baseline, None
    now = bus._now_ms()
    with bus._write() as conn:
        mark_quiet()  # taking a response makes work for nobody: ring no one
        taken = storage.take_response(conn, agent.id, correlation_id, now)
    return baseline, None if taken is None else decode_message(taken[1])


def _result_of(response: Message) -> Any:
    payload = response.payload
    if payload.get("success") is True:
        return payload.get("data")
    error = payload.get("error")
    error_type = payload.get("error_type")
    raise RemoteError(
        response.sender, error_type if type(error_type) is str and error_type else "Error",
        str(error) if error else f"request failed (response {response.id})",
    )


def respond(
    agent: Agent, message: Message, data: Any = None, success: bool = True,
    *, error: str | None = None, error_type: str | None = None,
) -> str:
    """Answer the request ``message``; returns the response's id.

    Inside a handler of that request the response is buffered and commits with the ack;
    elsewhere it is published at once.
    """
    d = _current.get()
    if d is not None and d._settled is None and d.message.id == message.id and d.agent.id == agent.id:
        return d.reply(data, success=success, error=error, error_type=error_type)
    bus = agent.bus
    now = bus._now_ms()
    op = bus._prepare_response(agent.id, message, data, success, error, now, error_type)
    with bus._write() as conn:
        return op.write(conn, now)


# ---------------------------------------------------------------------------------------------
# Events


_PATTERN_CHARACTERS = frozenset("*?[")


def _check_event_name(name: object, what: str = "event name") -> str:
    """An event name (``what`` "event name": no pattern characters, which would make it
    match other patterns than its own) or pattern (``what`` "event pattern")."""
    # isprintable() also refuses NUL and lone surrogates
    if type(name) is not str or not 1 <= len(name) <= 200 or not name.isprintable():
        got = name[:50] if type(name) is str else name
        raise ValidationError(f"{what}: expected 1..200 printable characters, got {got!r}",
                              field=what)
    if what == "event name" and not _PATTERN_CHARACTERS.isdisjoint(name):
        raise ValidationError(
            f"{what}: expected no pattern characters (*?[), got {name[:50]!r}", field=what)
    return name


def _event_of(message: Message) -> Event | None:
    """The event in an ``event`` message, or None when its payload is not one."""
    try:
        return msgspec.convert(message.payload, Event)
    except msgspec.ValidationError:
        log.warning("sqlbus: event message %s has no valid event payload", message.id)
        return None


class Events:
    """``agent.events``: emit events, and handle other agents' events by name.

    >>> alice.events.emit("build.done", {"sha": "abc"})            # doctest: +SKIP
    >>> bob.events.on("build.done", lambda event: print(event.data))   # doctest: +SKIP

    ``on`` records the agent's interest in the shell-style pattern (``"*"``: every event);
    handlers receive an :class:`Event` and run in the agent's ``run()`` loop. An agent never
    handles its own events.
    """

    def __init__(self, owner: Dispatcher) -> None:
        self._owner = owner

    def emit(
        self,
        name: str,
        data: Any = None,
        targets: str | list[str] | None = None,
        *,
        correlation_id: str | None = None,
        priority: int = 3,
        ttl: int = 30_000,
    ) -> str:
        """Send event ``name`` (no pattern characters) with ``data`` to ``targets`` (agent
        ids), or, when ``targets`` is None, to every other agent with a matching interest (an
        event pattern that matches ``name``, or the type ``event`` or ``*``); returns the
        message id (archived even when nobody matched). ``ttl`` in ms."""
        _check_event_name(name)
        agent = self._owner.agent
        bus = agent.bus
        now = bus._now_ms()
        payload = {
            "name": name,
            "data": data,
            "emitted_at": iso_ms(now),
            "emitted_by": agent.id,
            "correlation_id": correlation_id,
        }
        if targets is None:
            headers = {"priority": priority, "ttl": ttl, "correlation_id": correlation_id}
            op = bus._prepare_interested(agent.id, "event", payload, headers, now, event=name)
            with bus._write() as conn:
                return cast(str, op.write(conn, now))
        return agent.publish(targets, "event", payload, priority=priority, ttl=ttl,
                             correlation_id=correlation_id)

    def on(self, pattern: str, handler: EventHandler | None = None) -> None:
        """Record this agent's interest in events whose name matches the shell-style
        ``pattern`` (``"*"``: every event) and, with ``handler``, call ``handler(event)`` for
        them in ``run()``. Recording is idempotent."""
        self._owner.on(pattern, handler)

    def off(self, pattern: str, handler: EventHandler | None = None) -> None:
        """Stop calling ``handler`` for ``pattern``, and drop the interest once no handler
        of this agent object is left for it; without ``handler``, drop the interest and
        every handler of ``pattern``."""
        self._owner.off(pattern, handler)
