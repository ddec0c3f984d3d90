"""Events (SPEC 7): named notifications sent to explicit targets or to every agent whose
recorded interest (a shell-style pattern) matches the name.

>>> alice.events.emit("build.done", {"sha": "abc"})                # doctest: +SKIP
>>> bob.events.on("build.*", lambda event: print(event.name, event.data))   # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec

from .errors import ValidationError
from .messages import Message, iso_ms
from .writes import prepare_interested

if TYPE_CHECKING:
    from .agent import Agent
    from .engine import Engine

log = logging.getLogger("sqlbus")

EventHandler = Callable[["Event"], Any]


class Event(msgspec.Struct, kw_only=True):
    """An event as an ``events.on`` handler receives it (the payload of an ``event`` message).

    ``emitted_at`` is ISO 8601 UTC; ``correlation_id`` is the emitter's, or None.
    """

    name: str
    data: Any = None
    emitted_at: str = ""
    emitted_by: str = ""
    correlation_id: str | None = None


class Subscriber(Protocol):
    """What :class:`Events` needs of the run loop that owns it (:class:`sqlbus.worker.Dispatcher`)."""

    agent: Agent
    engine: Engine

    def on(self, pattern: str, handler: EventHandler | None) -> None: ...

    def off(self, pattern: str, handler: EventHandler | None) -> None: ...


def event_handlers(
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


PATTERN_CHARACTERS = frozenset("*?[")


def check_event_name(name: object, what: str = "event name") -> str:
    """An event name (``what`` "event name": no pattern characters, which would make it
    match other patterns than its own) or pattern (``what`` "event pattern")."""
    # isprintable() also refuses NUL and lone surrogates
    if type(name) is not str or not 1 <= len(name) <= 200 or not name.isprintable():
        got = name[:50] if type(name) is str else name
        raise ValidationError(f"{what}: expected 1..200 printable characters, got {got!r}",
                              field=what)
    if what == "event name" and not PATTERN_CHARACTERS.isdisjoint(name):
        raise ValidationError(
            f"{what}: expected no pattern characters (*?[), got {name[:50]!r}", field=what)
    return name


def event_of(message: Message) -> Event | None:
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

    def __init__(self, owner: Subscriber) -> None:
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
        check_event_name(name)
        agent = self._owner.agent
        engine = self._owner.engine
        now = engine.now_ms()
        payload = {
            "name": name,
            "data": data,
            "emitted_at": iso_ms(now),
            "emitted_by": agent.id,
            "correlation_id": correlation_id,
        }
        if targets is None:
            headers = {"priority": priority, "ttl": ttl, "correlation_id": correlation_id}
            op = prepare_interested(agent.bus.max_payload_bytes, agent.id, "event", payload,
                                    headers, now, event=name)
            return cast(str, engine.grouped(lambda tx: op.write(tx, now)))
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
