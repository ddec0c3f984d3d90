"""sqlbus for asyncio: the same API, with coroutines wherever the database is touched.

>>> import sqlbus.aio
>>> async def main():                                             # doctest: +SKIP
...     bus = await sqlbus.aio.connect("team.db")
...     alice, bob = await bus.agent("alice"), await bus.agent("bob")
...     await alice.publish("bob", "notification", {"text": "hi"})
...     for d in await bob.receive(limit=10, wait=5.0):
...         async with d:                     # clean exit acks; an exception fails it
...             print(d.message.payload)
...     async for entry in bus.state.watch("job/"):
...         ...
...     await bus.close()

How it stays off the event loop:

- Every call that touches SQLite runs on a small thread pool of the bus (each thread has its
  own connection, like any thread of a :class:`sqlbus.Bus`); the caller's contextvars go with
  it.
- Waiting (``receive(wait=...)``, ``watch``) never occupies a thread: the coroutine awaits a
  future that the process's doorbell resolves when a commit concerns it (sqlbus.sqlite.wakeup), and
  looks again at least every ``wakeup.FALLBACK`` seconds.
- ``request`` publishes on the pool, then waits for its response as ``receive`` waits (the
  doorbell's future, a short look on the pool after each ring): however many requests await,
  none holds a thread, and each keeps its own timeout.
- ``run`` is the blocking loop of sqlbus.worker on a thread of its own; it calls plain
  handlers on its thread and schedules ``async def`` handlers on the event loop
  (``run_coroutine_threadsafe``), waiting for their result before it acks.

``subscribe``, ``unsubscribe``, ``subscriptions`` and ``events.on/off`` are coroutines (they
record interests in the database); ``stop`` is a plain call, and so are ``reply``, ``publish``
and state writes of a delivery (they only buffer).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import request as requests
from .agent import Agent, inbox_of
from .arguments import STORED, Stored, seconds
from .bus import DEFAULT_MODE, Bus
from .bus import connect as _connect
from .delivery import Delivery, current, current_delivery, give_back
from .encoding import encode_json_value
from .engine import Looked, open_block
from .errors import DatabaseError, VersionConflictError
from .messages import Message
from .sqlite.group import mark_offload_thread
from .state import StateEntry, StateStore, Watch, check_key, check_poll, check_prefix
from .transaction import Transaction, begin_block, end_block
from .waking import ANY, FALLBACK, agent_tag
from .worker import check_concurrency

__all__ = [
    "connect",
    "AsyncBus",
    "AsyncAgent",
    "AsyncDelivery",
    "AsyncStateStore",
    "AsyncEvents",
    "AsyncTransaction",
]

T = TypeVar("T")

_POOL_THREADS = 8  # threads for short database calls (one connection each)


async def connect(
    path: str | os.PathLike[str],
    *,
    durability: str = "normal",
    lease: float = 30.0,
    max_attempts: int = 5,
    backoff_base: float = 1.0,
    backoff_cap: float = 16.0,
    max_payload_bytes: int = 1_048_576,
    busy_timeout: float = 5.0,
    clock: Callable[[], float] | None = None,
    mode: int = DEFAULT_MODE,
    non_retryable: Iterable[type[BaseException]] = (),
    archive_retention: float | None | Stored = STORED,
    dead_retention: float | None | Stored = STORED,
    archive_max_messages: int | None | Stored = STORED,
    schema: str | None = None,
    pool_size: int | None = None,
    connect_timeout: float | None = None,
    group_commit_delay: float = 0.0,
) -> AsyncBus:
    """Open the database at ``path``: the keywords, their defaults and units are those of
    :func:`sqlbus.connect` (spelled out here so editors and type checkers see them).

    >>> bus = await sqlbus.aio.connect("team.db", durability="full")   # doctest: +SKIP
    """
    policy: dict[str, Any] = dict(
        durability=durability, lease=lease, max_attempts=max_attempts, backoff_base=backoff_base,
        backoff_cap=backoff_cap, max_payload_bytes=max_payload_bytes, busy_timeout=busy_timeout,
        clock=clock, mode=mode, non_retryable=non_retryable, archive_retention=archive_retention,
        dead_retention=dead_retention, archive_max_messages=archive_max_messages,
        schema=schema, pool_size=pool_size, connect_timeout=connect_timeout,
        group_commit_delay=group_commit_delay,
    )
    pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="sqlbus-aio",
                              initializer=mark_offload_thread)
    try:
        bus = await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(_connect, path, **policy)
        )
    except BaseException:
        pool.shutdown(wait=False)
        raise
    return AsyncBus(bus, pool)


def _call(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
    """Run ``fn`` on ``pool`` with the caller's contextvars (e.g. the current delivery)."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args, **kwargs)
    try:
        return asyncio.get_running_loop().run_in_executor(pool, call)
    except RuntimeError as exc:  # the pool was shut down: AsyncBus.close()
        raise DatabaseError("the bus is closed") from exc


def _offloaded(name: str, doc: str) -> Callable[..., Awaitable[Any]]:
    """A coroutine method that runs the sync object's method ``name`` on the pool."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await _call(self._pool, getattr(self.sync, name), *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    return method


class AsyncBus:
    """An asyncio handle on a :class:`sqlbus.Bus` (``bus.sync``); get one from :func:`connect`.
    ``async with`` closes it."""

    def __init__(self, bus: Bus, pool: ThreadPoolExecutor) -> None:
        self.sync = bus
        self._pool = pool
        self.state = AsyncStateStore(self, bus.state)

    @property
    def path(self) -> str:
        return self.sync.path

    def __repr__(self) -> str:
        return f"<sqlbus.aio.AsyncBus {self.sync.path!r}>"

    async def agent(self, agent_id: str) -> AsyncAgent:
        """Register (or re-register) ``agent_id`` and return its asyncio handle."""
        return AsyncAgent(self, await _call(self._pool, self.sync.agent, agent_id))

    agents = _offloaded("agents", "The registry (see :meth:`sqlbus.Bus.agents`).")
    sent = _offloaded("sent", "The sent archive, newest first (see :meth:`sqlbus.Bus.sent`).")
    dead_letters = _offloaded("dead_letters", "Dead letters, newest first.")
    dead_letter = _offloaded("dead_letter", "One dead letter by id, or None.")
    requeue = _offloaded("requeue", "Put a dead letter back in its agent's inbox.")
    requeue_dead_letters = _offloaded("requeue_dead_letters", "Requeue many dead letters.")
    purge_dead_letters = _offloaded("purge_dead_letters", "Delete dead letters (seconds).")
    metrics = _offloaded("metrics", "Metrics shared by every process (SPEC 8).")
    stats = _offloaded("stats", "Per-agent queue depths.")
    peek = _offloaded("peek", "Look at an inbox without claiming.")
    peek_page = _offloaded("peek_page", "A page of an inbox, for browsing a large one.")
    leases = _offloaded("leases", "Deliveries in flight, the soonest to end first.")
    trace = _offloaded("trace", "A message and what became of it in each inbox.")
    retention = _offloaded("retention", "The stored retention policy (see :meth:`sqlbus.Bus.retention`).")
    set_retention = _offloaded(
        "set_retention", "Store a new retention policy (see :meth:`sqlbus.Bus.set_retention`)."
    )
    prune = _offloaded("prune", "Apply the retention policy now (see :meth:`sqlbus.Bus.prune`).")
    check = _offloaded("check", "Integrity and schema check.")
    backup = _offloaded("backup", "Online, consistent copy of the database.")
    vacuum = _offloaded("vacuum", "Rebuild the file to reclaim space.")

    async def close(self) -> None:
        """Close the bus: its connections, its doorbell and its threads."""
        try:
            await _call(self._pool, self.sync.close)
        finally:
            self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncAgent:
    """An asyncio handle on a :class:`sqlbus.Agent` (``agent.sync``)."""

    def __init__(self, bus: AsyncBus, agent: Agent) -> None:
        self.bus = bus
        self.sync = agent
        self.id = agent.id
        self._pool = bus._pool
        self.state = AsyncStateStore(bus, agent.state)
        self.events = AsyncEvents(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wrapped: dict[Any, Callable[..., Any]] = {}
        self._responses: _Responses | None = None

    def __repr__(self) -> str:
        return f"<sqlbus.aio.AsyncAgent {self.id!r}>"

    publish = _offloaded("publish", "Publish one message (see :meth:`sqlbus.Agent.publish`); returns its id.")
    publish_many = _offloaded("publish_many", "Publish many messages in one transaction.")
    broadcast = _offloaded("broadcast", "Send to every registered agent matching ``pattern``.")
    respond = _offloaded("respond", "Answer a request message (buffered inside its handler).")

    def transaction(self) -> AsyncTransaction:
        """``async with agent.transaction() as tx:`` (see :class:`AsyncTransaction`)."""
        return AsyncTransaction(self)

    # -- receiving -------------------------------------------------------------------------

    async def receive(
        self,
        limit: int = 1,
        wait: float = 0.0,
        lease: float | None = None,
        types: Iterable[str] | None = None,
    ) -> list[AsyncDelivery]:
        """Claim up to ``limit`` messages (see :meth:`sqlbus.Agent.receive`); ``wait``
        (seconds) waits for one without blocking the event loop."""
        wait = seconds(wait, "wait")
        types = [types] if isinstance(types, str) else (None if types is None else list(types))
        if wait <= 0:
            deliveries, _ = await self._look(limit, lease, types, False)
            return [AsyncDelivery(self, d) for d in deliveries]

        async def look() -> Looked:
            deliveries, until_due = await self._look(limit, lease, types, True)
            return Looked(deliveries, 0, until_due)

        found = await self.bus.sync.engine.wait_until_async(look, wait, self.id)
        return [AsyncDelivery(self, d) for d in found]

    async def _look(
        self, limit: int, lease: float | None, types: list[str] | None, waiting: bool
    ) -> tuple[list[Delivery], float]:
        agent = self.sync

        def look() -> tuple[list[Delivery], float]:
            found = agent.receive(limit=limit, wait=0.0, lease=lease, types=types)
            return found, (inbox_of(agent).until_due() if waiting and not found else 0.0)

        future = asyncio.ensure_future(_call(self._pool, look))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Cancelled while the claim ran: give back whatever it leased, at once, on the
            # pool (no write on the event loop).
            future.add_done_callback(functools.partial(_release_claimed, self._pool))
            raise

    async def ack(self, deliveries: Sequence[AsyncDelivery | Delivery]) -> None:
        """Ack many deliveries in one transaction, all or none (see :meth:`sqlbus.Agent.ack`)."""
        plain = [d.sync if isinstance(d, AsyncDelivery) else d for d in deliveries]
        await _call(self._pool, self.sync.ack, plain)

    # -- handlers, the run loop, requests ----------------------------------------------------

    async def subscribe(self, type: str, handler: Callable[[Message], Any] | None = None) -> None:
        """Record the interest in ``type`` (``"*"``: all) and, with ``handler``, call
        ``handler(message)`` from :meth:`run` for each such message (see
        :meth:`sqlbus.Agent.subscribe`). ``async def`` handlers run on the event loop that
        runs :meth:`run`."""
        wrapped = None if handler is None else self._wrap(handler)
        await _call(self._pool, self.sync.subscribe, type, wrapped)

    async def unsubscribe(
        self, type: str, handler: Callable[[Message], Any] | None = None
    ) -> None:
        """Stop calling ``handler`` for ``type`` (see :meth:`sqlbus.Agent.unsubscribe`)."""
        wrapped = None if handler is None else self._wrapped.get(handler, handler)
        await _call(self._pool, self.sync.unsubscribe, type, wrapped)

    subscriptions = _offloaded("subscriptions", "This agent's recorded interests (Subscription list).")

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand."""
        self.sync.stop()

    async def run(
        self, until_idle: bool = False, *, limit: int = 1, lease: float | None = None,
        concurrency: int = 1,
    ) -> int:
        """Claim and dispatch until :meth:`stop`, SIGINT/SIGTERM (when the loop runs in the
        main thread) or cancellation; returns how many messages were processed.

        The claim loop runs on a thread of its own; cancelling this coroutine stops it
        gracefully (the message in hand finishes, the others go back) before re-raising.
        ``concurrency``: up to that many messages in handlers at once (async handlers run as
        that many tasks on this event loop).
        """
        check_concurrency(concurrency)  # here: a bad value raises before the loop starts
        loop = asyncio.get_running_loop()
        self._loop = loop
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or not supported here: stop() still works
        future: asyncio.Future[int] = loop.create_future()

        def target() -> None:
            try:
                result = self.sync.run(until_idle, limit=limit, lease=lease,
                                       concurrency=concurrency)
            except BaseException as exc:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        thread = threading.Thread(target=target, name=f"sqlbus-run-{self.id}", daemon=True)
        thread.start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.stop()
            await asyncio.wait([future])  # in-flight work finishes or goes back first
            raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def request(
        self, to: str, payload: Any = None, timeout: float = 30.0, *, priority: int = 3,
        ttl: int | None = None,
    ) -> Any:
        """Send a ``request`` and await the ``data`` of its response (see
        :meth:`sqlbus.Agent.request`): raises :class:`sqlbus.RemoteError` or
        :class:`sqlbus.RequestTimeoutError` (after ``timeout`` seconds)."""
        timeout = seconds(timeout, "timeout", allow_zero=False)
        agent = self.sync
        engine = agent.bus.engine
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        correlation_id = requests.new_correlation_id()
        requests.await_response(engine, agent.id, correlation_id)  # before the request exists
        responses = self._responses
        if responses is None or responses.loop is not loop:
            responses = self._responses = _Responses(self, loop)
        try:
            found = responses.expect(correlation_id)  # before the request: its reply is seen
            await _call(self._pool, requests.send_request, agent, engine, to, payload, timeout,
                        priority, ttl, correlation_id)
            while True:
                remaining = deadline - loop.time()
                if remaining > 0 and not found.done():
                    await asyncio.wait([found], timeout=remaining)
                if not found.done():
                    responses.forget(correlation_id)
                    if not found.done():  # out of time: the last look and the record
                        return await _call(self._pool, requests.end_request, agent, engine, to,
                                           correlation_id, timeout)
                message = found.result()
                if message is None:  # it waits in the inbox (no direct reply): take it
                    _, message = await _call(self._pool, requests.take_response, agent, engine,
                                             correlation_id)
                if message is not None:
                    return requests.result_of(message)
                found = responses.expect(correlation_id)  # another taker had it: wait on
        finally:
            responses.forget(correlation_id)
            requests.stop_awaiting(engine, agent.id, correlation_id)

    def _wrap(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """A plain callable for the sync dispatcher; ``async def`` handlers run on the loop."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if not _is_async(handler):
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is not None:
            return wrapped

        def call_on_loop(*args: Any) -> Any:
            loop = self._loop
            if loop is None or loop.is_closed():
                raise RuntimeError("async handlers run only from sqlbus.aio's agent.run()")
            delivery = current_delivery()

            async def with_delivery() -> Any:
                token = current.set(delivery)  # current_delivery() inside the handler
                try:
                    return await handler(*args)
                finally:
                    current.reset(token)

            return asyncio.run_coroutine_threadsafe(with_delivery(), loop).result()

        functools.update_wrapper(call_on_loop, handler)
        self._wrapped[handler] = call_on_loop
        return call_on_loop


class _Responses:
    """The responses an agent's asyncio requests await, found for all of them by one look
    per wake-up: one task waits for rings naming the agent and reads, in one statement on
    the pool, which of the awaited correlation ids have a response, and resolves their
    futures (the message; None when it waits in the inbox, for its request to take). With
    one look per request instead, N requests in flight made N looks per response, so N
    squared in all (issue 21)."""

    def __init__(self, agent: AsyncAgent, loop: asyncio.AbstractEventLoop) -> None:
        self.agent = agent
        self.loop = loop
        self.waiting: dict[str, asyncio.Future[Message | None]] = {}
        self.task: asyncio.Task[None] | None = None

    def expect(self, correlation_id: str) -> asyncio.Future[Message | None]:
        """A future for the response to ``correlation_id``, looked for from now on."""
        found: asyncio.Future[Message | None] = self.loop.create_future()
        self.waiting[correlation_id] = found
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._gather())
        return found

    def forget(self, correlation_id: str) -> None:
        found = self.waiting.pop(correlation_id, None)
        if found is not None and found.done() and not found.cancelled():
            found.exception()  # retrieved: a failure its request did not wait for is not logged

    async def _gather(self) -> None:
        try:
            await self._look_while_awaited()
        except Exception as exc:  # the bus closed, the database failed: tell every request
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(exc)

    async def _look_while_awaited(self) -> None:
        agent = self.agent.sync
        engine = agent.bus.engine
        tag = agent_tag(agent.id)
        while True:
            ids = [cid for cid, found in self.waiting.items() if not found.done()]
            if not ids:
                return  # expect() starts another task when a request comes
            token = engine.wakeup.token(tag)  # before the look: a commit after it rings
            found = await _call(self.agent._pool, requests.find_responses, agent, engine, ids)
            for cid, message in found:
                future = self.waiting.get(cid)
                if future is not None and not future.done():
                    future.set_result(message)
            # Any ring since the token, not only one naming the agent: a ring for a tag that
            # no wait is registered for yet is not counted as that tag's, only as a ring.
            await engine.wakeup.wait_async(token, FALLBACK, ANY)


def _is_async(fn: Callable[..., Any]) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        type(fn).__call__ if not inspect.isroutine(fn) else None
    )


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _release_claimed(
    pool: ThreadPoolExecutor, future: asyncio.Future[tuple[list[Delivery], float]]
) -> None:
    """Give back what a cancelled receive claimed. Nobody saw it, so no attempt counts (SPEC
    9): a receive cancelled again and again never dead-letters a message."""
    if future.cancelled() or future.exception() is not None:
        return
    for d in future.result()[0]:
        try:
            pool.submit(_give_back, d)
        except RuntimeError:  # the bus is closed: the lease runs out by itself
            return


def _give_back(d: Delivery) -> None:
    try:
        give_back(d, attempted=False)
    except Exception:
        pass  # its lease runs out by itself: nothing is lost


class AsyncEvents:
    """``agent.events`` for asyncio: ``await emit(...)``, ``await on(...)``, ``await off(...)``;
    handlers may be plain or ``async def``."""

    def __init__(self, agent: AsyncAgent) -> None:
        self._agent = agent

    async def emit(self, name: str, data: Any = None, targets: str | list[str] | None = None,
                   **options: Any) -> str:
        """Send event ``name`` (see :meth:`sqlbus.Events.emit`); returns the message id."""
        agent = self._agent
        return await _call(agent._pool, agent.sync.events.emit, name, data, targets, **options)

    async def on(self, pattern: str, handler: Callable[..., Any] | None = None) -> None:
        """Record the interest in events matching ``pattern`` (``"*"``: all) and, with
        ``handler``, call ``handler(event)`` from ``run()`` for them."""
        agent = self._agent
        wrapped = None if handler is None else agent._wrap(handler)
        await _call(agent._pool, agent.sync.events.on, pattern, wrapped)

    async def off(self, pattern: str, handler: Callable[..., Any] | None = None) -> None:
        """Stop calling ``handler`` for ``pattern`` (see :meth:`sqlbus.Events.off`)."""
        agent = self._agent
        wrapped = None if handler is None else agent._wrapped.get(handler, handler)
        await _call(agent._pool, agent.sync.events.off, pattern, wrapped)


class AsyncDelivery:
    """A leased message (see :class:`sqlbus.Delivery`, ``d.sync``): ``await d.ack()``,
    ``fail``, ``retry``, ``dead_letter``, ``extend``, ``release``; ``async with d:`` acks on a
    clean exit and fails on an exception. ``reply``/``publish``/``state.set`` only buffer."""

    def __init__(self, agent: AsyncAgent, delivery: Delivery) -> None:
        self.agent = agent
        self.sync = delivery
        self._pool = agent._pool
        self.message: Message = delivery.message
        self.state = _AsyncBufferedState(self)

    def __repr__(self) -> str:
        return f"<sqlbus.aio.AsyncDelivery of {self.sync!r}>"

    @property
    def attempts(self) -> int:
        return self.sync.attempts

    @property
    def lease_until(self) -> float:
        return self.sync.lease_until

    ack = _offloaded("ack", "Ack, with the buffered effects, in one transaction.")
    fail = _offloaded("fail", "Record a failure: retry after backoff or dead-letter.")
    retry = _offloaded("retry", "Retry after ``delay`` seconds (None = backoff), not counted as a failure.")
    dead_letter = _offloaded("dead_letter", "Move to dead letters now with ``reason``.")
    extend = _offloaded("extend", "Keep the lease ``lease`` more seconds.")
    release = _offloaded("release", "Give the message back now.")

    def reply(
        self, data: Any = None, *, success: bool = True, error: str | None = None,
        error_type: str | None = None,
    ) -> str:
        """Buffer a ``response`` to the sender (committed with the ack)."""
        return self.sync.reply(data, success=success, error=error, error_type=error_type)

    def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Buffer a message (committed with the ack)."""
        return self.sync.publish(to, type, payload, **headers)

    async def __aenter__(self) -> AsyncDelivery:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return await _call(self._pool, self.sync.__exit__, exc_type, exc, tb)


class _AsyncBufferedState:
    """``d.state`` for asyncio: ``await get``; ``set``/``delete`` buffer until the ack."""

    def __init__(self, delivery: AsyncDelivery) -> None:
        self._delivery = delivery

    async def get(self, key: str) -> StateEntry | None:
        d = self._delivery
        return await _call(d._pool, d.sync.state.get, key)

    def set(self, key: str, value: Any, **options: Any) -> None:
        self._delivery.sync.state.set(key, value, **options)

    def delete(self, key: str, **options: Any) -> None:
        self._delivery.sync.state.delete(key, **options)


class AsyncStateStore:
    """Versioned shared state for asyncio (see :class:`sqlbus.StateStore`)."""

    def __init__(self, bus: AsyncBus, store: StateStore) -> None:
        self._bus = bus
        self.sync = store

    async def get(self, key: str) -> StateEntry | None:
        """The latest version of ``key``, or None."""
        return await _call(self._bus._pool, self.sync.get, key)

    async def keys(self, prefix: str = "") -> list[str]:
        """Live keys under ``prefix``, sorted."""
        return await _call(self._bus._pool, self.sync.keys, prefix)

    async def items(self, prefix: str = "") -> list[StateEntry]:
        """Live entries under ``prefix``, sorted by key."""
        return await _call(self._bus._pool, self.sync.items, prefix)

    async def history(self, key: str, limit: int = 20) -> list[StateEntry]:
        """``key``'s recent versions, newest first (see :meth:`sqlbus.StateStore.history`)."""
        return await _call(self._bus._pool, self.sync.history, key, limit)

    async def set(self, key: str, value: Any, **options: Any) -> int:
        """Write the next version of ``key``; returns it (``expected_version=`` for CAS)."""
        return await _call(self._bus._pool, self.sync.set, key, value, **options)

    async def delete(self, key: str, **options: Any) -> int:
        """Delete ``key``; returns the version of the deletion (0 when absent)."""
        return await _call(self._bus._pool, self.sync.delete, key, **options)

    async def update(
        self, key: str, fn: Callable[[Any], Any], *, max_tries: int = 1000, **options: Any
    ) -> int:
        """Atomically replace the value with ``fn(old)`` (plain or ``async def``; may run more
        than once): a compare-and-set that retries when another writer got in first."""
        if not _is_async(fn):
            return await _call(self._bus._pool, self.sync.update, key, fn,
                               max_tries=max_tries, **options)
        check_key(key)
        for _ in range(max_tries):
            entry = await self.get(key)
            version = 0 if entry is None else entry.version
            new_value = await fn(None if entry is None else entry.value)
            encode_json_value(new_value, self._bus.sync.max_payload_bytes, "value")
            try:
                return await self.set(key, new_value, expected_version=version, **options)
            except VersionConflictError:
                continue
        raise VersionConflictError(f"state {key!r}: update lost the race {max_tries} times")

    def watch(self, prefix: str = "", *, poll: float = 1.0) -> AsyncIterator[StateEntry]:
        """``async for entry in bus.state.watch("job/")``: the entries under ``prefix`` (by
        key), then every later change in commit order (see :func:`sqlbus.state.watch_state`); the snapshot
        is taken when iteration starts. ``poll``: seconds between looks at most."""
        check_prefix(prefix)
        return _watch(self._bus, prefix, check_poll(poll))


async def _watch(bus: AsyncBus, prefix: str, poll: float) -> AsyncIterator[StateEntry]:
    engine = bus.sync.engine
    watch = Watch(engine, prefix)
    for entry in await _call(bus._pool, watch.snapshot):
        yield entry

    async def look() -> Looked:
        return Looked(await _call(bus._pool, watch.changes), 0, poll)

    while True:
        for entry in await engine.wait_until_async(look, poll):
            yield entry


class AsyncTransaction:
    """``async with agent.transaction() as tx:`` one write transaction (see
    :class:`sqlbus.Transaction`): ``await tx.publish(...)``, ``publish_many``, ``broadcast``,
    ``execute``, and ``tx.state`` (``await tx.state.set(...)``). Every call runs on one thread
    of its own (a transaction belongs to one connection); it holds the database's write lock
    until the block ends, so keep the block short and await nothing slow inside it."""

    def __init__(self, agent: AsyncAgent) -> None:
        self.agent = agent
        self.sync = Transaction(agent.sync)
        self._thread: ThreadPoolExecutor | None = None
        self._token: Any = None
        self.state: _AsyncTxState = _AsyncTxState(self)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._thread is None:
            raise RuntimeError("use the transaction in an async with block")
        return await _call(self._thread, fn, *args, **kwargs)

    async def __aenter__(self) -> AsyncTransaction:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlbus-aio-tx")
        try:
            await self._run(begin_block, self.sync)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise
        # In this task's context: its own writes then fail at once (see sqlbus.engine.Write)
        self._token = open_block.set(self.sync)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._token is not None:
                open_block.reset(self._token)
                self._token = None
            # shielded: a cancelled block still ends its transaction on its own thread
            await asyncio.shield(self._run(end_block, self.sync, exc_type, exc, tb))
        finally:
            thread, self._thread = self._thread, None
            if thread is not None:
                thread.shutdown(wait=False)

    async def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Publish, committed with the transaction; returns the id."""
        return await self._run(self.sync.publish, to, type, payload, **headers)

    async def publish_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Publish many, committed with the transaction."""
        return await self._run(self.sync.publish_many, items)

    async def broadcast(self, type: str, payload: Any = None, **options: Any) -> str:
        """Broadcast, committed with the transaction."""
        return await self._run(self.sync.broadcast, type, payload, **options)

    async def execute(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Run your own SQL in the transaction; returns the rows."""
        return await self._run(self.sync.execute, sql, params)


class _AsyncTxState:
    def __init__(self, tx: AsyncTransaction) -> None:
        self._tx = tx

    async def get(self, key: str) -> StateEntry | None:
        return await self._tx._run(lambda: self._tx.sync.state.get(key))

    async def set(self, key: str, value: Any, **options: Any) -> int:
        return await self._tx._run(lambda: self._tx.sync.state.set(key, value, **options))

    async def delete(self, key: str, **options: Any) -> int:
        return await self._tx._run(lambda: self._tx.sync.state.delete(key, **options))
