"""The run loop: subscriptions, handlers, ``run()`` and the lease keeper (SPEC 5, 7).


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

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .arguments import check_limit, seconds
from .delivery import (
    Delivery,
    add_effect,
    current,
    effects,
    exception_text,
    give_back,
    outcome,
    row_of,
    settled,
)
from .engine import Engine, Tx
from .errors import (
    DatabaseError,
    Discard,
    LeaseLostError,
    Retry,
    ValidationError,
    VersionConflictError,
)
from .events import EventHandler, Events, check_event_name, event_of
from .events import event_handlers as matching_event_handlers
from .inbox import Inbox
from .messages import MESSAGE_TYPES, Message
from .request import respond
from .responses import count_late_responses
from .waking import RUNG

if TYPE_CHECKING:
    from .agent import Agent
    from .bus import Bus

__all__ = ["Dispatcher", "UNHANDLED", "MAX_CONCURRENCY", "check_concurrency"]

log = logging.getLogger("sqlbus")

Handler = Callable[[Message], Any]

# Counter name (table ``counters``, per agent), written only on this rare path.
UNHANDLED = "unhandled"

# How long an idle run() waits before it looks at its stop flag again (seconds): the longest
# a signal can take to end an idle loop (stop() rings the loop awake at once). Each look is a
# claim transaction, so a longer slice costs less CPU while idle.
_IDLE_SLICE = 1.0


# ---------------------------------------------------------------------------------------------
# Effects written with an ack (a delivery's buffered effects: anything with write(tx, now))


class _Count:
    """Add one to an agent's counter, in the ack's transaction."""

    __slots__ = ("name", "agent")

    def __init__(self, name: str, agent: str) -> None:
        self.name = name
        self.agent = agent

    def write(self, tx: Tx, now: int) -> None:
        tx.storage.add_counters(tx.conn, [(self.name, self.agent, 1)])


class _DiscardLate:
    """A late response: forget its request's timeout and count it, in the ack's transaction."""

    __slots__ = ("agent", "correlation_id", "seq")

    def __init__(self, agent: str, correlation_id: str, seq: int) -> None:
        self.agent = agent
        self.correlation_id = correlation_id
        self.seq = seq

    def write(self, tx: Tx, now: int) -> None:
        tx.storage.forget_request_timeout(tx.conn, self.agent, self.correlation_id)
        count_late_responses(tx, self.agent, 1, tx.storage.delivery_ms(tx.conn, self.seq))


class _CountError:
    """Count a request handler's exception in the error rates (the request is acked)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, tx: Tx, now: int) -> None:
        tx.storage.count_error(tx.conn, self.name)



# ---------------------------------------------------------------------------------------------
# Subscriptions and the run loop


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

    def __init__(self, agent: Agent, inbox: Inbox, engine: Engine) -> None:
        self.agent = agent
        self.inbox = inbox
        self.engine = engine
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
        check_event_name(pattern, "event pattern")
        if handler is not None:
            _check_callable(handler)
        with self._lock:
            self._record("event", pattern)
            if handler is not None:
                self._event_handlers = _added(self._event_handlers, pattern, handler)

    def off(self, pattern: str, handler: EventHandler | None) -> None:
        check_event_name(pattern, "event pattern")
        with self._lock:
            self._event_handlers = self._unrecord("event", self._event_handlers, pattern, handler)

    def _record(self, kind: str, pattern: str) -> None:
        now = self.engine.now_ms()
        with self.engine.write() as tx:
            tx.mark_quiet()  # an interest is no work for anyone
            tx.storage.add_interest(tx.conn, self.agent.id, kind, pattern, now)

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
            with self.engine.write() as tx:
                tx.mark_quiet()
                tx.storage.drop_interest(tx.conn, self.agent.id, kind, pattern)
        return rest

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        try:  # wake the loop now, wherever it waits (only this agent's waiters wake)
            self.engine.ring([self.agent.id])
        except OSError:
            pass  # it notices within _IDLE_SLICE anyway

    def run(
        self, until_idle: bool = False, *, limit: int = 1, lease: float | None = None,
        concurrency: int = 1,
    ) -> int:
        check_limit(limit)
        check_concurrency(concurrency)
        agent = self.agent
        inbox = self.inbox
        bus = agent.bus
        lease_s = seconds(bus.lease if lease is None else lease, "lease", allow_zero=False)
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
                    if look and not inbox.more:
                        baseline, work, due = inbox.look()
                        if work:
                            claimed = inbox.claim(limit, lease_ms)
                    else:
                        claimed = inbox.claim(limit, lease_ms)
                if claimed is not None and claimed.deliveries:
                    done, claimed = self._process(claimed.deliveries, keeper, limit, lease_ms)
                    processed += done
                    look = True
                    continue
                if claimed is not None:  # an empty claim read what the wait needs
                    baseline, due, claimed = claimed.baseline, claimed.due, None
                if until_idle or self._stop.is_set():
                    break
                woken = self.engine.wait_for_change(
                    baseline, min(_IDLE_SLICE, inbox.seconds_until(due)), agent.id
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
        inbox = self.inbox
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
                baseline, work, due = inbox.look()
                claimed = inbox.claim(free, lease_ms) if work else None
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
                self.engine.wait_for_change(
                    baseline, min(_IDLE_SLICE, inbox.seconds_until(due)), agent.id
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
        acking = [] if settled(d) is not None else [d]  # a handler may have settled it itself
        try:
            if claim:
                return self.inbox.claim(claim, lease_ms, acking=acking)
            if acking:
                d.ack()
        except (VersionConflictError, ValidationError) as exc:
            d.fail(exc)
            _log_failure(d, exc, outcome(d))
        return None

    def _dispatch(self, d: Delivery) -> bool:
        """Run the handlers of ``d``. True when it is to be acked (with what the handlers
        buffered); otherwise it was settled here (retry, dead letter, failure)."""
        message = d.message
        agent = self.agent
        if message.type == "response" and self._is_late(message):
            add_effect(d, _DiscardLate(agent.id, message.headers.correlation_id, row_of(d)))  # type: ignore[arg-type]
            return True
        handlers = self._handlers.get(message.type, ()) + self._handlers.get("*", ())
        event_handlers: tuple[EventHandler, ...] = ()
        event = None
        if message.type == "event":
            if message.sender == agent.id:
                return True  # an agent never handles its own events: acked
            event = event_of(message)
            if event is not None:
                event.emitted_by = message.sender  # the payload's claim is not evidence
                event_handlers = matching_event_handlers(self._event_handlers, event.name)
        if not handlers and not event_handlers:
            log.debug("sqlbus: no handler for %s message %s; acked", message.type, message.id)
            add_effect(d, _Count(UNHANDLED, agent.id))
            return True
        token = current.set(d)
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
                if settled(d) is not None:
                    return _settled_then_raised(d, signal_)
                try:
                    d.retry(signal_.delay)
                except (TypeError, ValueError) as bad:  # a delay changed after construction
                    d.fail(bad)
                    _log_failure(d, bad, outcome(d))
                return False
            except Discard as signal_:
                if settled(d) is not None:
                    return _settled_then_raised(d, signal_)
                try:
                    d.dead_letter(signal_.reason)
                except (TypeError, ValueError) as bad:  # a reason changed after construction
                    d.fail(bad)
                    _log_failure(d, bad, outcome(d))
                    return False
                if message.type == "request":  # tell the requester now, not at its timeout
                    respond(agent, self.engine, message, None, success=False,
                            error=f"discarded: {signal_.reason}", error_type="Discard")
                return False
            except Exception as exc:
                if settled(d) is not None:
                    return _settled_then_raised(d, exc)
                if message.type != "request":
                    d.fail(exc)
                    _log_failure(d, exc, outcome(d))
                    return False
                # The requester is waiting: answer with the error and consume the request (a
                # retry would answer late or twice). Counted in the error rates.
                effects(d).clear()
                add_effect(d, _CountError(type(exc).__name__))
                d.reply(None, success=False, error=exception_text(exc) or type(exc).__name__,
                        error_type=type(exc).__name__)
                _log_failure(d, exc, "answered success: false")
                return True
            if message.type == "request" and settled(d) is None and not _has_response(d):
                try:  # the handlers' result is the response
                    d.reply(result)
                except ValidationError as exc:  # the return value cannot be sent as JSON
                    add_effect(d, _CountError(type(exc).__name__))
                    d.reply(None, success=False, error=f"the handler's return value: {exc}",
                            error_type=type(exc).__name__)
                    _log_failure(d, exc, "answered success: false")
            return True
        finally:
            current.reset(token)

    def _is_late(self, message: Message) -> bool:
        correlation_id = message.headers.correlation_id
        if not isinstance(correlation_id, str):
            return False
        with self.engine.reading() as conn:
            return self.engine.storage.request_timed_out(conn, self.agent.id, correlation_id)


MAX_CONCURRENCY = 1024  # handler threads of one run loop


def check_concurrency(concurrency: object) -> int:
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
        d.message.id, d.attempts, type(exc).__name__, exception_text(exc), outcome, exc_info=exc,
    )


def _settled_then_raised(d: Delivery, exc: Exception) -> bool:
    """A handler settled its delivery itself, then raised: that outcome stands (a delivery is
    settled once); the exception is only logged."""
    log.warning(
        "sqlbus: agent %s, %s message %s, attempt %d: the handler raised %s after settling the "
        "message itself (%s); that stands", d.agent.id, d.message.type, d.message.id,
        d.attempts, type(exc).__name__, settled(d), exc_info=exc,
    )
    return False


def _has_response(d: Delivery) -> bool:
    """Whether the handler already buffered a response (``respond``/``reply``)."""
    for effect in effects(d):
        outgoing = getattr(effect, "outgoing", None)
        if outgoing is not None and outgoing.type == "response":
            return True
    return False


def _release(
    deliveries: Sequence[Delivery], *, attempted: bool, error: BaseException | None = None
) -> None:
    """Give back at once the deliveries a loop holds but will not finish (``attempted``:
    whether a handler saw them, ``error`` what interrupted it, see :func:`sqlbus.delivery.give_back`)."""
    for d in deliveries:
        if settled(d) is None:
            try:
                give_back(d, attempted=attempted, error=error)
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
                if settled(d) is not None:
                    continue
                if d.lease_until - self.bus.engine.now_ms() / 1000 > self.lease / 2:
                    continue
                try:
                    d.extend(self.lease)
                except (LeaseLostError, ValueError):
                    pass  # settled meanwhile, or really lost: the ack will say so
                except DatabaseError as exc:
                    log.warning("sqlbus: could not extend the lease of %r: %s", d, exc)
