"""Deliveries: a message leased to one receiver, settled once (ack, fail, retry, dead letter,
release), with the writes a handler buffers on it (replies, publishes, state) committed in the
transaction of its ack.

>>> for d in bob.receive(limit=10):                                       # doctest: +SKIP
...     with d:                          # a clean exit acks; an exception fails (retry)
...         d.reply({"ok": True})        # written with the ack, or not at all
"""

from __future__ import annotations

import contextvars
import threading
import traceback as traceback_module
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from .arguments import ceil_ms, seconds
from .encoding import encode_json_value, escape_strings
from .errors import Discard, LeaseLostError, Retry, ValidationError
from .messages import Message, escape_text, iso_ms
from .responses import prepare_response
from .state import StateWrite, check_key
from .writes import Publish, prepare_publish

if TYPE_CHECKING:
    from .agent import Agent
    from .engine import Tx

type_of = type  # the name `type` is a parameter of some methods below

# The delivery whose handler runs in this thread or task (set by the run loop).
current: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
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
    return current.get()


class Effect(Protocol):
    """A write buffered on a delivery and made in the transaction of its ack."""

    def write(self, tx: Tx, now: int) -> Any: ...


class Delivery:
    """A message leased to one receiver: ack it, fail it, extend it or dead-letter it.

    ``with d:`` acks on a clean exit and fails on an exception (which it re-raises);
    :class:`sqlbus.Retry` and :class:`sqlbus.Discard` raised inside are handled, not re-raised.
    ``reply``, ``publish`` and ``state`` writes are buffered and committed with the ack.
    ``attempts`` is 1 on the first delivery; ``lease_until`` is in epoch seconds.
    """

    __slots__ = ("agent", "message", "attempts", "lease_until", "_seq", "_claims", "_effects",
                 "_settled", "_lock", "state", "_outcome")

    def __init__(
        self, agent: Agent, message: Message, seq: int, claims: int, attempts: int,
        lease_until: float,
    ) -> None:
        self.agent = agent
        self.message = message
        self.attempts = attempts
        self.lease_until = lease_until
        self._seq = seq
        self._claims = claims
        self._effects: list[Effect] = []
        self._settled: str | None = None
        self._outcome = ""  # after a failure, what happens next, for the run loop's log
        # Held from the check that a delivery is unsettled to the write that settles it, so of
        # two threads settling it one writes and the other is told it is settled already.
        self._lock = threading.Lock()
        self.state = BufferedState(self)

    def __repr__(self) -> str:
        return (f"<sqlbus.Delivery {self.message.type} {self.message.id} to {self.agent.id!r} "
                f"attempt {self.attempts}>")

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._settled is not None:
            return False
        if exc_type is None:
            self.ack()
            return False
        if isinstance(exc, Retry):
            self.retry(exc.delay)
            return True
        if isinstance(exc, Discard):
            self.dead_letter(exc.reason)
            return True
        if not isinstance(exc, Exception):
            # KeyboardInterrupt, SystemExit: give the message back, untouched, saying why
            self._release(attempted=True, error=exc)
            return False
        self.fail(exc)
        return False

    # -- settling --------------------------------------------------------------------------

    def ack(self) -> None:
        """Remove the message from the inbox and commit the buffered effects, in one
        transaction. Raises :class:`LeaseLostError` if the lease was lost."""
        self.agent.ack([self])

    def fail(
        self,
        exc: BaseException | None = None,
        *,
        retryable: bool | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        """Record a failure: retry after backoff, or dead-letter when this was the last
        attempt or the error is non-retryable. Buffered effects are discarded."""
        self._settle_failure(exc, retryable=retryable, context=context, delay=None, counted=True)

    def retry(self, delay: float | None = None) -> None:
        """Put the message back for another attempt after ``delay`` seconds (None = backoff),
        without counting a failure. The last attempt still ends in dead letters."""
        self._settle_failure(None, retryable=True, context=None, delay=delay, counted=False)

    def dead_letter(
        self, reason: str = "discarded", *, context: dict[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Move the message to dead letters now with ``reason`` (and ``error``'s name and
        text as the record's error, when given)."""
        if type_of(reason) is not str or not reason:
            raise ValueError(f"reason must be a non-empty str, got {reason!r}")
        bus = self.agent.bus
        reason = escape_text(reason)  # recorded text: a lone surrogate is kept escaped
        context_json = encode_context(context, bus.max_payload_bytes)
        with self._lock:
            self._check_open()
            now = bus.engine.now_ms()
            error_name = None if error is None else exception_name(error)
            error_text = None if error is None else exception_text(error)

            def write(tx: Tx) -> None:
                if not tx.storage.dead_letter(
                    tx.conn, self._seq, self._claims, now, reason, error_name, error_text,
                    context_json=context_json,
                ):
                    raise self._lease_lost()

            bus.engine.grouped(write)
            self._settled = "dead"

    def extend(self, lease: float | None = None) -> None:
        """Keep the message ``lease`` more seconds from now (default: the bus's lease)."""
        bus = self.agent.bus
        lease_s = seconds(bus.lease if lease is None else lease, "lease", allow_zero=False)
        with self._lock:
            self._check_open()
            now = bus.engine.now_ms()
            lease_until = now + int(lease_s * 1000)

            def write(tx: Tx) -> None:
                tx.mark_quiet()  # a later deadline makes no work for anyone
                if not tx.storage.extend(tx.conn, self._seq, self._claims, lease_until):
                    raise self._lease_lost()

            bus.engine.grouped(write)
            self.lease_until = lease_until / 1000

    def release(self) -> None:
        """Give the message back now, for anyone to claim (the attempt still counts)."""
        if not self._release(attempted=True):
            self._check_open()  # raises: settled already

    def _release(self, *, attempted: bool, error: BaseException | None = None) -> bool:
        """``attempted=False``: no handler saw it (a run loop that stops with messages in
        hand, a cancelled asyncio receive), so the claim does not count as an attempt.
        ``error``: what ended the attempt (a KeyboardInterrupt in the handler), kept as the
        last attempt's error. False, doing nothing, when it was settled already."""
        bus = self.agent.bus
        last_error = None if error is None else (
            f"{exception_name(error)}: {exception_text(error)}")
        with self._lock:
            if self._settled is not None:
                return False
            now = bus.engine.now_ms()

            def write(tx: Tx) -> None:
                tx.storage.release(tx.conn, self._seq, self._claims, now,
                                   attempted=attempted, last_error=last_error)
                tx.mark([self.agent.id])  # ready again: wake the agent's other receivers

            bus.engine.grouped(write)
            self._settled = "released"
        return True

    # -- buffered effects ------------------------------------------------------------------

    def reply(
        self, data: Any = None, *, success: bool = True, error: str | None = None,
        error_type: str | None = None,
    ) -> str:
        """Buffer a ``response`` to the sender: ``{"success", "data", "request_id"}`` (and
        ``"error"``, ``"error_type"`` (default ``"Error"``) on failure) with the request's
        correlation id. Returns its id."""
        self._check_open()
        bus = self.agent.bus
        op = prepare_response(bus.max_payload_bytes, self.agent.id, self.message, data, success,
                              error, bus.engine.now_ms(), error_type)
        self._effects.append(op)
        return op.outgoing.id

    def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Buffer a message from this agent, published with the ack (validated now)."""
        self._check_open()
        bus = self.agent.bus
        op = prepare_publish(bus.max_payload_bytes, self.agent.id, to, type, payload,
                             now=bus.engine.now_ms(), **headers)
        self._effects.append(op)
        return op.outgoing.id

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._settled is not None:
            raise ValueError(f"{self!r} was already settled ({self._settled})")

    def _lease_lost(self) -> LeaseLostError:
        return LeaseLostError(
            f"message {self.message.id} to {self.agent.id!r}: the lease of attempt "
            f"{self.attempts} was lost (it ran out and the message was claimed again, or is gone)"
        )

    def _ack_notice(self, now: int) -> Publish:
        message = self.message
        return prepare_publish(
            self.agent.bus.max_payload_bytes, self.agent.id, message.sender, "notification",
            {"acknowledgment": True, "original_message_id": message.id,
             "processed_at": iso_ms(now)},
            correlation_id=message.id, now=now,
        )

    def _settle_failure(
        self,
        exc: BaseException | None,
        *,
        retryable: bool | None,
        context: dict[str, Any] | None,
        delay: float | None,
        counted: bool,
    ) -> None:
        with self._lock:
            self._check_open()
            self._settle_failure_locked(exc, retryable, context, delay, counted)

    def _settle_failure_locked(
        self,
        exc: BaseException | None,
        retryable: bool | None,
        context: dict[str, Any] | None,
        delay: float | None,
        counted: bool,
    ) -> None:
        bus = self.agent.bus
        if delay is not None:
            delay = seconds(delay, "delay")
        # Recorded text never fails the recording: lone surrogates (file names from
        # os.listdir carry them) are kept escaped, and an exception whose str() raises is named.
        error_name = exception_name(exc) if exc is not None else None
        error_message = exception_text(exc) if exc is not None else None
        tb = traceback_text(exc) if exc is not None else None
        context_json = encode_context(context, bus.max_payload_bytes)
        if retryable is None:
            retryable = not isinstance(exc, bus.non_retryable)
        now = bus.engine.now_ms()
        if not retryable:
            reason = "non_retryable"
        elif self.attempts >= bus.max_attempts:
            reason = "max_attempts"
        else:
            reason = None
        if delay is None:
            backoff = bus.backoff_base * (2 ** (self.attempts - 1))
            delay = min(bus.backoff_cap, backoff)
        last_error = f"{error_name}: {error_message}" if exc is not None else None
        due_at = now + ceil_ms(delay)  # never early, like a publish delay

        def write(tx: Tx) -> None:
            if reason is None:
                ok = tx.storage.retry(tx.conn, self._seq, self._claims, due_at, last_error)
                tx.mark([self.agent.id])  # its waiters re-read the next due time
            else:
                ok = tx.storage.dead_letter(
                    tx.conn, self._seq, self._claims, now, reason, error_name, error_message, tb,
                    context_json,
                )
            if not ok:
                raise self._lease_lost()
            if counted:  # messages_failed and error_rates both come from these counts
                tx.storage.count_error(tx.conn, error_name or "UnknownError")

        bus.engine.grouped(write)
        self._settled = "retrying" if reason is None else "dead"
        self._outcome = f"retry in {delay:g} s" if reason is None else f"dead letter ({reason})"


def encode_context(context: dict[str, Any] | None, max_bytes: int) -> str | None:
    """A failure's ``context`` as JSON text. It is recorded text, so lone surrogates in its
    strings are kept escaped; otherwise it follows the rules of every JSON value the bus
    stores (exact round trip: no NaN; nesting; size): a ValidationError, raised before
    anything is written, leaves the delivery unsettled for the caller to settle again."""
    if context is None:
        return None
    if type_of(context) is not dict:
        raise TypeError(f"context must be a dict, got {type_of(context).__name__}")
    try:
        return encode_json_value(context, max_bytes, "context").decode()
    except ValidationError:
        escaped = escape_strings(context)
        if escaped is context:
            raise
        return encode_json_value(escaped, max_bytes, "context").decode()


def exception_name(exc: BaseException) -> str:
    return escape_text(type_of(exc).__name__)


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, escaped for recording; never raises (a run loop records any exception)."""
    try:
        return escape_text(str(exc))
    except Exception:  # a broken __str__
        return f"<{exception_name(exc)} whose str() failed>"


def traceback_text(exc: BaseException) -> str:
    try:
        return escape_text(
            "".join(traceback_module.format_exception(type_of(exc), exc, exc.__traceback__)))
    except Exception:
        return f"<the traceback of {exception_name(exc)} could not be formatted>"


@contextmanager
def settling(deliveries: Sequence[Delivery]) -> Iterator[None]:
    """Hold the locks of ``deliveries`` (in one order, so two batches cannot deadlock) while
    they are settled; raises ``ValueError`` when one was settled already."""
    held = sorted(deliveries, key=id)
    taken = 0
    try:
        for d in held:
            d._lock.acquire()
            taken += 1
        for d in held:
            d._check_open()
        yield
    finally:
        for d in held[:taken]:
            d._lock.release()


class BufferedState:
    """``d.state``: state writes buffered and committed with the delivery's ack."""

    __slots__ = ("_delivery",)

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    def get(self, key: str) -> Any:
        """The latest committed entry (buffered writes are not visible before the ack)."""
        return self._delivery.agent.state.get(key)

    def set(
        self, key: str, value: Any, *, expected_version: int | None = None, notify: bool = True,
        subscribers: list[str] | None = None, include_value: bool = False,
    ) -> None:
        """Buffer a write of ``key``; the version check happens at the ack."""
        d = self._delivery
        d._check_open()
        check_key(key)
        value_json = encode_json_value(value, d.agent.bus.max_payload_bytes, "value")
        d._effects.append(
            StateWrite(d.agent.bus, d.agent.id, key, value_json, expected_version, notify,
                       subscribers, include_value)
        )

    def delete(self, key: str, *, expected_version: int | None = None, notify: bool = True,
               subscribers: list[str] | None = None) -> None:
        """Buffer a delete of ``key``."""
        d = self._delivery
        d._check_open()
        check_key(key)
        d._effects.append(
            StateWrite(d.agent.bus, d.agent.id, key, None, expected_version, notify, subscribers,
                       False)
        )


def unsettled(agent: Agent, deliveries: Sequence[Delivery]) -> list[Delivery]:
    """Check that ``deliveries`` are this agent's and not settled yet; each once."""
    deliveries = list(deliveries)
    for d in deliveries:
        if not isinstance(d, Delivery) or d.agent is not agent and d.agent.id != agent.id:
            raise ValueError(f"{d!r} was not received by agent {agent.id!r}")
        d._check_open()
    # dict.fromkeys: a delivery listed twice is acked once (a second UPDATE would find the
    # row acked and wrongly report the lease lost).
    return list(dict.fromkeys(deliveries))


def ack_in(
    tx: Tx, agent_id: str, pending: Sequence[Delivery], notices: Sequence[Publish],
    now: int,
) -> None:
    """Inside a write: ack ``pending`` with their buffered effects and ack notices, or raise
    :class:`LeaseLostError` (the caller's transaction then rolls back: all or nothing)."""
    if not any(type(e) is StateWrite for d in pending for e in d._effects):
        tx.mark_quiet()  # rings only the agents its buffered publishes reach
    storage, conn = tx.storage, tx.conn
    if not storage.ack(conn, [(d._seq, d._claims) for d in pending], now):
        lost = next(  # always found; the default only keeps StopIteration from the caller
            (d for d in pending if not storage.acked_now(conn, d._seq, d._claims, now)),
            pending[0],
        )
        raise LeaseLostError(
            f"message {lost.message.id} to {agent_id!r}: the lease of attempt "
            f"{lost.attempts} was lost (it ran out and the message was claimed again, "
            "or is gone); nothing was acked"
        )
    for d in pending:
        for effect in d._effects:
            effect.write(tx, now)
    for notice in notices:
        notice.write(tx, now)


# ---------------------------------------------------------------------------------------------
# What the agent's claims and acks and the run loop do with deliveries


def ack_notices(pending: Sequence[Delivery], now: int) -> list[Publish]:
    """The ack notices (SPEC 3: ``requires_ack``) that acking ``pending`` sends."""
    return [d._ack_notice(now) for d in pending if d.message.headers.requires_ack]


def mark_settled(deliveries: Sequence[Delivery], how: str) -> None:
    """Record that ``deliveries`` were settled (``"acked"``) by a write that committed."""
    for d in deliveries:
        d._settled = how


def settled(d: Delivery) -> str | None:
    """How ``d`` was settled (``"acked"``, ``"retrying"``, ``"dead"``, ``"released"``) or None."""
    return d._settled


def outcome(d: Delivery) -> str:
    """After a failure: what happens next to ``d``'s message, for a log line."""
    return d._outcome


def add_effect(d: Delivery, effect: Effect) -> None:
    """Buffer ``effect`` to be written in the transaction that acks ``d``."""
    d._effects.append(effect)


def effects(d: Delivery) -> list[Effect]:
    """The effects buffered on ``d`` (the list itself: the run loop may clear it)."""
    return d._effects


def row_of(d: Delivery) -> int:
    """The stored row (its position) ``d`` leases."""
    return d._seq


def give_back(d: Delivery, *, attempted: bool, error: BaseException | None = None) -> bool:
    """Release ``d`` (see :meth:`Delivery._release`); False when it was settled already."""
    return d._release(attempted=attempted, error=error)
