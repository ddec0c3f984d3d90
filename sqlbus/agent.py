"""Agents: publish, receive and ack, subscribe and run handlers.

>>> alice, bob = bus.agent("alice"), bus.agent("bob")                     # doctest: +SKIP
>>> alice.publish("bob", "notification", {"text": "hi"})                  # doctest: +SKIP
>>> for d in bob.receive(limit=10, wait=1.0):                             # doctest: +SKIP
...     with d:
...         print(d.message.payload)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .arguments import MAX_SECONDS, check_limit, check_types, seconds
from .delivery import Delivery, ack_in, ack_notices, mark_settled, settling, unsettled
from .encoding import encode_json
from .engine import Looked
from .inbox import Inbox
from .messages import Message, iso_ms
from .records import Subscription
from .request import request, respond
from .state import StateStore
from .transaction import Transaction
from .worker import Dispatcher, Events
from .writes import prepare_broadcast, prepare_many, prepare_publish, write_all

if TYPE_CHECKING:
    from .bus import Bus


class Agent:
    """One agent on the bus: publishes, receives and owns its inbox. Get one from
    :meth:`Bus.agent`. Thread-safe like the bus."""

    def __init__(self, bus: Bus, agent_id: str) -> None:
        self.bus = bus
        self.id = agent_id
        self.state = StateStore(bus, agent_id)
        self._engine = bus.engine
        self._inbox = Inbox(self, bus.engine, max_attempts=bus.max_attempts,
                            max_payload_bytes=bus.max_payload_bytes)
        self._dispatcher: Dispatcher | None = None

    def __repr__(self) -> str:
        return f"<sqlbus.Agent {self.id!r}>"

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        to: str | list[str],
        type: str,
        payload: Any = None,
        *,
        priority: int = 3,
        ttl: int = 30_000,
        requires_ack: bool = False,
        correlation_id: str | None = None,
        delay: float = 0.0,
        id: str | None = None,
    ) -> str:
        """Publish one message to one agent or a list (one message, N inboxes, all or none).

        ``ttl`` is in milliseconds (0 = never expires), ``delay`` in seconds. Returns the id;
        publishing an ``id`` that exists already writes nothing and returns it (idempotent).
        """
        now = self._engine.now_ms()
        op = prepare_publish(
            self.bus.max_payload_bytes, self.id, to, type, payload, priority=priority, ttl=ttl, requires_ack=requires_ack,
            correlation_id=correlation_id, delay=delay, id=id, now=now,
        )
        self._engine.grouped(lambda tx: op.write(tx, now))
        return op.outgoing.id

    def publish_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Publish many messages in one transaction: another process sees all or none.

        Each item is a dict with the keyword names of :meth:`publish`; every item is validated
        first, and an error names the item (``[3].priority: ...``).
        """
        now = self._engine.now_ms()
        ops = prepare_many(self.bus.max_payload_bytes, self.id, items, now)
        if not ops:
            return []
        return self._engine.grouped(lambda tx: write_all(tx, self.id, ops, now))

    def broadcast(self, type: str, payload: Any = None, *, pattern: str = "*", **headers: Any) -> str:
        """Send one message to every registered agent matching ``pattern`` (``*``, ``?``,
        ``[...]``) except the sender; returns its id (a pattern that matches nobody delivers
        nothing). ``headers``: ``priority``, ``ttl``, ``requires_ack``, ``correlation_id``,
        ``delay``, ``id``."""
        now = self._engine.now_ms()
        op = prepare_broadcast(self.bus.max_payload_bytes, self.id, type, payload, pattern,
                               dict(headers), now)
        return self._engine.grouped(lambda tx: op.write(tx, now))

    def transaction(self) -> Transaction:
        """``with alice.transaction() as tx:`` publish, write state and run your own SQL
        (``tx.execute``) in one transaction: all of it commits, or none of it."""
        return Transaction(self)

    # -- receiving -------------------------------------------------------------------------

    def receive(
        self,
        limit: int = 1,
        wait: float = 0.0,
        lease: float | None = None,
        types: Iterable[str] | None = None,
    ) -> list[Delivery]:
        """Claim up to ``limit`` messages, highest priority first, then in publish order.

        Each is leased to this caller for ``lease`` seconds (default: the bus's). ``wait``
        (seconds) blocks until a message arrives or the time runs out. ``types`` keeps only
        those message types. Expired messages move to dead letters and are never returned.
        """
        check_limit(limit)
        wait = seconds(min(wait, MAX_SECONDS) if wait == float("inf") else wait, "wait")
        lease_ms = int(seconds(self.bus.lease if lease is None else lease, "lease", allow_zero=False) * 1000)
        types_json = None if types is None else encode_json(check_types(types)).decode()
        inbox = self._inbox
        if wait <= 0:
            return inbox.claim(limit, lease_ms, types_json).deliveries
        # A receiver that may wait reads before it claims, unless its last claim left more
        # behind or a ring said work came for it: an empty claim would take the write lock
        # that the writers it waits for need.
        claim_first = inbox.more

        def look(rung: bool) -> Looked:
            nonlocal claim_first
            if not (rung or claim_first):
                token, work, due = inbox.look(types_json)
                if not work:
                    return Looked([], token, inbox.seconds_until(due))
            claim_first = False
            claimed = inbox.claim(limit, lease_ms, types_json)
            return Looked(claimed.deliveries, claimed.baseline or 0,
                          inbox.seconds_until(claimed.due))

        return self._engine.wait_until(look, wait, self.id)  # type: ignore[no-any-return]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack many deliveries (with their buffered effects) in one transaction, all or none.

        Raises :class:`LeaseLostError` (and commits nothing) if any lease was lost, and
        ``ValueError`` if a delivery is not this agent's or is settled already.
        """
        pending = unsettled(self, deliveries)
        if not pending:
            return
        with settling(pending):
            now = self._engine.now_ms()
            notices = ack_notices(pending, now)
            self._engine.grouped(lambda tx: ack_in(tx, self.id, pending, notices, now))
            mark_settled(pending, "acked")

    # -- handlers, the run loop, request/response, events (sqlbus.worker, sqlbus.request) ----

    def subscribe(self, type: str, handler: Callable[[Message], Any] | None = None) -> None:
        """Record this agent's interest in messages of ``type`` (``"*"``: every type) in the
        database and, with ``handler``, call ``handler(message)`` for them in :meth:`run`.
        Recording is idempotent; subscribing the same handler twice has no further effect.

        Interests pick the recipients of state changes and events sent without explicit
        ones (``subscribe("state_change")`` alone suits a :meth:`receive` consumer); they
        outlive the process until dropped. A handler reaches its :class:`Delivery` with
        :func:`sqlbus.current_delivery` to buffer publishes, replies and state writes that
        commit with the ack.
        """
        self._run_loop().subscribe(type, handler)

    def unsubscribe(self, type: str, handler: Callable[[Message], Any] | None = None) -> None:
        """Stop calling ``handler`` for ``type``, and drop the interest once this agent object
        has no handler left for it (a handler not subscribed changes nothing); without
        ``handler``, drop the interest and every handler of ``type``."""
        self._run_loop().unsubscribe(type, handler)

    def subscriptions(self) -> list[Subscription]:
        """This agent's recorded interests, by kind and pattern."""
        with self._engine.reading() as conn:
            rows = self._engine.storage.list_interests(conn, self.id)
        return [Subscription(kind, pattern, iso_ms(at)) for _, kind, pattern, at in rows]

    def run(
        self, until_idle: bool = False, *, limit: int = 1, lease: float | None = None,
        concurrency: int = 1,
    ) -> int:
        """Claim messages and dispatch them to the handlers until :meth:`stop`, SIGINT or
        SIGTERM; returns how many messages it processed.

        ``until_idle=True`` drains what is ready now (not retries due later) and returns.
        Messages are acked when every handler succeeds and failed (retry or dead letter) when
        one raises; a message without handler is acked and counted as ``unhandled``. A signal
        (handled only when run() is in the main thread) lets the message in hand finish; the
        other claimed ones go back at once. ``limit``: messages claimed at a time; ``lease``
        (seconds, default the bus's) is extended in the background while a handler runs.
        ``concurrency`` (int 1..1024): up to that many messages in handlers at once, each on a
        thread of its own with its own lease; order holds only with 1 (then ``limit`` applies).
        On stop the handlers in flight finish; claimed messages no handler saw go back
        without counting an attempt.
        """
        return self._run_loop().run(until_idle, limit=limit, lease=lease, concurrency=concurrency)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand (safe from any thread)."""
        self._run_loop().stop()

    def request(
        self, to: str, payload: Any = None, timeout: float = 30.0, *, priority: int = 3,
        ttl: int | None = None,
    ) -> Any:
        """Send a ``request`` to agent ``to`` and wait up to ``timeout`` seconds for the
        ``data`` of its response.

        >>> alice.request("bob", {"q": 1}, timeout=5.0)          # doctest: +SKIP

        Raises :class:`sqlbus.RemoteError` (the remote error text) when the response says
        ``success: false``, :class:`sqlbus.RequestTimeoutError` when none comes in time (a
        response arriving later is discarded and counted as ``late_responses``). ``ttl`` (ms)
        defaults to the timeout. Works while this agent's :meth:`run` runs in another thread.
        """
        return request(self, self._engine, to, payload, timeout, priority=priority, ttl=ttl)

    def respond(
        self, message: Message, data: Any = None, success: bool = True, *, error: str | None = None,
        error_type: str | None = None,
    ) -> str:
        """Answer the request ``message`` with ``data`` (or a failure with ``error`` and
        ``error_type``, default ``"Error"``); returns the response's id. Inside that request's
        handler it commits with the ack."""
        return respond(self, self._engine, message, data, success, error=error, error_type=error_type)

    @property
    def events(self) -> Events:
        """Events (SPEC 7): ``agent.events.emit(name, data, targets=None)``, ``.on(name,
        handler)``, ``.off(name, handler)``; see :class:`sqlbus.Events`."""
        return self._run_loop().events

    def _run_loop(self) -> Dispatcher:
        """This agent object's handlers and run loop, made on first use."""
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self, self._inbox, self._engine)
        return self._dispatcher


def inbox_of(agent: Agent) -> Inbox:
    """The claims of ``agent`` (the asyncio API waits on them)."""
    return agent._inbox
