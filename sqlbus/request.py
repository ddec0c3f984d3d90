"""Request/response (SPEC 5.1): ``request`` publishes a request with a fresh correlation id
and waits for its response; responses to a ``request()`` are direct replies, written as
delivered, which the requester reads from the archive. While it waits, the same agent's
receivers in this process leave that response alone. A request that times out is recorded in
the database; its response, if it comes later, is discarded and counted (``late_responses``).

>>> alice.request("bob", {"q": 1}, timeout=5.0)                           # doctest: +SKIP
"""

from __future__ import annotations

import math
import secrets
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .arguments import seconds
from .delivery import current, settled
from .encoding import check_agent_id
from .engine import Engine, Looked, Tx
from .errors import RemoteError, RequestTimeoutError
from .messages import Message, decode_message
from .responses import count_late_responses, prepare_response
from .writes import prepare_publish

if TYPE_CHECKING:
    from .agent import Agent

# How long a timed-out request is remembered, so that its late response is recognised (ms).
REMEMBER_TIMEOUTS_MS = 24 * 3600 * 1000


# Agents of each bus that had a request time out in this process: their next request sweeps
# late responses out of the inbox in its publish transaction (for requesters without a loop).
_registry_lock = threading.Lock()
_had_timeouts: weakref.WeakKeyDictionary[Engine, set[str]] = weakref.WeakKeyDictionary()


def await_response(engine: Engine, agent_id: str, correlation_id: str) -> None:
    """From now on, ``agent_id``'s receivers in this process leave that response alone."""
    with _registry_lock:
        engine.awaiting = {
            **engine.awaiting,
            agent_id: engine.awaiting.get(agent_id, frozenset()) | {correlation_id},
        }


def stop_awaiting(engine: Engine, agent_id: str, correlation_id: str) -> None:
    with _registry_lock:
        rest = engine.awaiting.get(agent_id, frozenset()) - {correlation_id}
        awaiting = dict(engine.awaiting)
        if rest:
            awaiting[agent_id] = rest
        else:
            awaiting.pop(agent_id, None)
        engine.awaiting = awaiting


def request(
    agent: Agent,
    engine: Engine,
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
    timeout = seconds(timeout, "timeout", allow_zero=False)
    correlation_id = new_correlation_id()
    await_response(engine, agent.id, correlation_id)  # before the request exists: it is ours
    try:
        sent_token: int | None = send_request(
            agent, engine, to, payload, timeout, priority, ttl, correlation_id)

        def look(rung: bool) -> Looked:
            nonlocal sent_token
            if sent_token is not None:  # read in the request's own write: nothing to take yet
                token, sent_token = sent_token, None
                return Looked(None, token)
            token, message = take_response(agent, engine, correlation_id)
            return Looked(message, token)

        message = engine.wait_until(look, timeout, agent.id)
        if message is not None:
            return result_of(message)
        return end_request(agent, engine, to, correlation_id, timeout)
    finally:
        stop_awaiting(engine, agent.id, correlation_id)


def new_correlation_id() -> str:
    return f"req-{secrets.token_hex(10)}"


def send_request(
    agent: Agent, engine: Engine, to: str, payload: Any, timeout: float, priority: int, ttl: int | None,
    correlation_id: str,
) -> int:
    """Validate and publish the request (its response awaited already, :func:`await_response`);
    returns the ``data_version`` to wait on for the response."""
    check_agent_id(to, "to")
    ttl_ms = max(1, math.ceil(timeout * 1000)) if ttl is None else ttl
    now = engine.now_ms()
    op = prepare_publish(agent.bus.max_payload_bytes, agent.id, to, "request", payload,
                         priority=priority, ttl=ttl_ms, correlation_id=correlation_id,
                         direct_reply=True, now=now)
    with _registry_lock:
        sweep = agent.id in _had_timeouts.get(engine, ())
    with engine.write() as tx:
        op.write(tx, now)
        if sweep:
            sweep_late_responses(tx, agent.id, now)
        # Read in our own write (whose commit does not move it): a response committed at
        # any time after the request then changes it, so there is no need to look at once.
        return engine.change_token_in(tx)


def end_request(agent: Agent, engine: Engine, to: str, correlation_id: str, timeout: float) -> Any:
    """Out of time: one last look and the record of the timeout, in one transaction, so a
    response is either returned now or recognised as late when it comes."""
    now = engine.now_ms()
    with engine.write() as tx:
        tx.mark_quiet()
        taken = tx.storage.take_response(tx.conn, agent.id, correlation_id, now)
        if taken is None:  # a direct reply?
            direct = tx.storage.find_response(tx.conn, agent.id, correlation_id).body
            taken = None if direct is None else (0, direct)
        if taken is None:
            tx.storage.record_request_timeout(
                tx.conn, agent.id, correlation_id, now, REMEMBER_TIMEOUTS_MS
            )
            sweep_late_responses(tx, agent.id, now)
    if taken is not None:
        return result_of(decode_message(taken[1]))
    with _registry_lock:
        _had_timeouts.setdefault(engine, set()).add(agent.id)
    raise RequestTimeoutError(
        f"request {correlation_id} from {agent.id!r} to {to!r}: no response within "
        f"timeout={timeout:g}s"
    )


def sweep_late_responses(tx: Tx, agent_id: str, now: int) -> None:
    count, delivery_ms = tx.storage.take_late_responses(tx.conn, agent_id, now)
    if count:
        count_late_responses(tx, agent_id, count, delivery_ms)


def take_response(agent: Agent, engine: Engine, correlation_id: str) -> tuple[int, Message | None]:
    """Look for the response (one read): a direct reply is only read; one that waits in the
    inbox (sent without ``direct_reply``) is taken in a write. Returns (``data_version`` of
    the look, to wait on next, the response or None)."""
    before = engine.token_before_look()
    with engine.reading() as conn:
        baseline, body, waiting = engine.storage.find_response(conn, agent.id, correlation_id)
        if before is not None:
            baseline = before
        if body is not None:
            return baseline, decode_message(body)
    if not waiting:
        return baseline, None
    now = engine.now_ms()
    with engine.write() as tx:
        tx.mark_quiet()  # taking a response makes work for nobody: ring no one
        taken = tx.storage.take_response(tx.conn, agent.id, correlation_id, now)
    return baseline, None if taken is None else decode_message(taken[1])


def find_responses(
    agent: Agent, engine: Engine, correlation_ids: list[str]
) -> list[tuple[str, Message | None]]:
    """Look for the responses of many requests of ``agent`` (one read): (correlation id, the
    response, or None when it waits in the inbox and must be taken with
    :func:`take_response`) for each id that has one."""
    with engine.reading() as conn:
        rows = engine.storage.find_responses(conn, agent.id, correlation_ids)
    return [(cid, None if body is None else decode_message(body)) for cid, body, _ in rows]


def result_of(response: Message) -> Any:
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
    agent: Agent, engine: Engine, message: Message, data: Any = None, success: bool = True,
    *, error: str | None = None, error_type: str | None = None,
) -> str:
    """Answer the request ``message``; returns the response's id.

    Inside a handler of that request the response is buffered and commits with the ack;
    elsewhere it is published at once.
    """
    d = current.get()
    if d is not None and settled(d) is None and d.message.id == message.id and d.agent.id == agent.id:
        return d.reply(data, success=success, error=error, error_type=error_type)
    now = engine.now_ms()
    op = prepare_response(agent.bus.max_payload_bytes, agent.id, message, data, success, error,
                          now, error_type)
    with engine.write() as tx:
        return op.write(tx, now)
