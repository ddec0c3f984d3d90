"""Pending writes: a message validated before any transaction and written inside one (now,
or with a delivery's ack). Validation never needs the database; matching recipients
(broadcasts, interests) happens in the transaction that writes, so it sees the agents of that
moment.

>>> op = prepare_publish(1_048_576, "alice", "bob", "notification", {"text": "hi"},
...                      now=engine.now_ms())                              # doctest: +SKIP
>>> with engine.write() as tx:                                            # doctest: +SKIP
...     op.write(tx, engine.now_ms())
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .arguments import ceil_ms, seconds
from .encoding import Outgoing, PlainRun, prepare, prepare_plain_batch
from .errors import ValidationError

if TYPE_CHECKING:
    from .engine import Tx

type_of = type  # the name `type` is a parameter of many functions below

PUBLISH_KEYS = frozenset(
    ("to", "type", "payload", "priority", "ttl", "requires_ack", "correlation_id", "delay", "id")
)


class Publish:
    """A validated message waiting to be written (now, or with a delivery's ack)."""

    __slots__ = ("outgoing", "delay_ms")

    def __init__(self, outgoing: Outgoing, delay_ms: int) -> None:
        self.outgoing = outgoing
        self.delay_ms = delay_ms

    def write(self, tx: Tx, now: int) -> str:
        tx.storage.publish(tx.conn, [self.outgoing], [now + self.delay_ms], now)
        tx.mark(self.outgoing.recipients)  # the commit rings these agents' waiters
        return self.outgoing.id


class Broadcast:
    """A validated broadcast; its recipients are matched in the transaction that writes it."""

    __slots__ = ("max_payload_bytes", "sender", "type", "pattern", "kwargs", "delay_ms", "prepared_at")

    def __init__(
        self, max_payload_bytes: int, sender: str, type: str, pattern: str, kwargs: dict[str, Any],
        delay_ms: int, prepared_at: int,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.sender = sender
        self.type = type
        self.pattern = pattern
        self.kwargs = kwargs
        self.delay_ms = delay_ms
        self.prepared_at = prepared_at

    def write(self, tx: Tx, now: int) -> str:
        recipients = [
            agent
            for agent in tx.storage.agent_ids(tx.conn)
            if agent != self.sender and fnmatch.fnmatchcase(agent, self.pattern)
        ]
        kwargs = self.kwargs
        out = prepare(
            self.sender, recipients, self.type, kwargs["payload"], now_ms=self.prepared_at,
            priority=kwargs.get("priority", 3), ttl=kwargs.get("ttl", 30_000),
            requires_ack=kwargs.get("requires_ack", False),
            correlation_id=kwargs.get("correlation_id"), id=kwargs["id"],
            broadcast_pattern=self.pattern, max_payload_bytes=self.max_payload_bytes,
        )
        tx.storage.publish(tx.conn, [out], [now + self.delay_ms], now)
        if recipients:  # matched nobody: leave the ring untargeted (a state write may ride on it)
            tx.mark(recipients)
        return out.id


class Interested:
    """A state change or event sent without explicit recipients (SPEC 5-7): to every agent but
    the sender with a matching interest, matched in the transaction that writes it. A state
    change that interests nobody is not written (the state log has the change); such an event
    is archived like a broadcast that matched nobody, so the id ``emit`` returned is a message.

    Event patterns are matched here, with ``fnmatch.fnmatchcase`` over the (few) event
    interests, not with SQLite's GLOB (which negates with ``[^...]``, not ``[!...]``): the
    same function as the receivers' run loops, so an event goes to an agent exactly when one
    of its patterns would dispatch it."""

    __slots__ = ("max_payload_bytes", "sender", "type", "event", "headers", "payload", "prepared_at")

    def __init__(
        self, max_payload_bytes: int, sender: str, type: str, event: str | None, headers: dict[str, Any],
        payload: Any, prepared_at: int,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.sender = sender
        self.type = type
        self.event = event
        self.headers = headers
        self.payload = payload
        self.prepared_at = prepared_at

    def write(self, tx: Tx, now: int) -> str | None:
        if self.event is None:
            recipients = tx.storage.interested_in_type(tx.conn, self.type, self.sender)
            if not recipients:
                return None
        else:
            matched: set[str] = set()
            last, matches = "", False
            for agent, pattern in tx.storage.event_interests(tx.conn, self.sender):  # by pattern
                if pattern != last:
                    last, matches = pattern, pattern is None or fnmatch.fnmatchcase(
                        self.event, pattern)
                if matches:
                    matched.add(agent)
            recipients = sorted(matched)
        out = prepare(self.sender, recipients, self.type, self.payload, now_ms=self.prepared_at,
                      matched=True, max_payload_bytes=self.max_payload_bytes, **self.headers)
        tx.storage.publish(tx.conn, [out], [now], now)
        if recipients:  # matched nobody: leave the ring untargeted (a state write may ride on it)
            tx.mark(recipients)
        return out.id


def write_all(
    tx: Tx, sender: str, ops: list[PlainRun] | list[Publish], now: int
) -> list[str]:
    """Write a validated batch (:func:`prepare_many`); returns the message ids."""
    if type_of(ops[0]) is PlainRun:  # plain messages, ready now
        runs = cast("list[PlainRun]", ops)
        tx.storage.publish_plain(tx.conn, sender, runs, now)
        tx.mark({run.to for run in runs})
        return [id for run in runs for id in run.ids]
    publishes = cast("list[Publish]", ops)
    if all(type_of(op) is Publish for op in publishes):  # one statement batch
        tx.storage.publish(tx.conn, [op.outgoing for op in publishes],
                           [now + op.delay_ms for op in publishes], now)
        tx.mark({agent for op in publishes for agent in op.outgoing.recipients})
        return [op.outgoing.id for op in publishes]
    return [op.write(tx, now) for op in publishes]


def prepare_publish(
    max_payload_bytes: int,
    sender: str,
    to: Any,
    type: str,
    payload: Any,
    *,
    priority: int = 3,
    ttl: int = 30_000,
    requires_ack: bool = False,
    correlation_id: str | None = None,
    delay: float = 0.0,
    id: str | None = None,
    now: int,
    prefix: str = "",
    broadcast_pattern: str | None = None,
    direct_reply: bool = False,
) -> Publish:
    # the common delay=0 skips the checks of seconds() (still exact: 0 and 0.0 only)
    delay_ms = 0 if delay == 0 and type_of(delay) in (int, float) else (
        ceil_ms(seconds(delay, f"{prefix}delay")))
    outgoing = prepare(
        sender, to, type, payload, now_ms=now, priority=priority, ttl=ttl,
        requires_ack=requires_ack, correlation_id=correlation_id, id=id,
        max_payload_bytes=max_payload_bytes, prefix=prefix,
        broadcast_pattern=broadcast_pattern, direct_reply=direct_reply,
    )
    return Publish(outgoing, delay_ms)


def prepare_many(
    max_payload_bytes: int, sender: str, items: Sequence[dict[str, Any]], now: int
) -> list[PlainRun] | list[Publish]:
    """The batch validated: runs of plain messages (the fast path) or one Publish per
    item."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise TypeError("publish_many takes a list of dicts")
    plain = prepare_plain_batch(sender, items, now, max_payload_bytes)
    if plain is not None:
        return plain
    ops = []
    for index, item in enumerate(items):
        if type_of(item) is not dict:
            raise ValidationError(f"[{index}]: expected a dict, got {type_of(item).__name__}",
                                  field=f"[{index}]")
        if not PUBLISH_KEYS.issuperset(item):
            unknown = sorted(map(str, set(item) - PUBLISH_KEYS))
            raise ValidationError(f"[{index}]: unknown key(s) {', '.join(unknown)}",
                                  field=f"[{index}]")
        if "to" not in item or "type" not in item:
            missing = "to" if "to" not in item else "type"
            raise ValidationError(f"[{index}].{missing}: required", field=f"[{index}].{missing}")
        get = item.get
        ops.append(prepare_publish(
            max_payload_bytes, sender, item["to"], item["type"], get("payload"), priority=get("priority", 3),
            ttl=get("ttl", 30_000), requires_ack=get("requires_ack", False),
            correlation_id=get("correlation_id"), delay=get("delay", 0.0), id=get("id"),
            now=now, prefix=f"[{index}].",
        ))
    return ops


def prepare_broadcast(
    max_payload_bytes: int, sender: str, type: str, payload: Any, pattern: str, headers: dict[str, Any], now: int
) -> Broadcast:
    if type_of(pattern) is not str or not 1 <= len(pattern) <= 200 or not pattern.isprintable():
        # isprintable() refuses NUL and lone surrogates, which SQLite cannot compare
        got = pattern[:50] if type_of(pattern) is str else pattern
        raise ValidationError(f"pattern: expected 1..200 printable characters, got {got!r}",
                              field="pattern")
    unknown = set(headers) - (PUBLISH_KEYS - {"to", "type", "payload"})
    if unknown:
        raise TypeError(f"broadcast() got unknown header(s): {', '.join(sorted(unknown))}")
    delay = headers.pop("delay", 0.0)
    message_id = headers.pop("id", None)
    checked = prepare_publish(
        max_payload_bytes, sender, [], type, payload, now=now, id=message_id, delay=delay,
        broadcast_pattern=pattern, **headers,
    )
    kwargs = dict(headers, id=checked.outgoing.id, payload=payload)
    return Broadcast(max_payload_bytes, sender, type, pattern, kwargs, checked.delay_ms, now)

def prepare_interested(
    max_payload_bytes: int, sender: str, type: str, payload: Any, headers: dict[str, Any], now: int,
    event: str | None = None,
) -> Interested:
    """Event ``event`` (a message of ``type``) to the agents interested in it, validated
    now; its recipients are matched when it is written."""
    prepare(sender, [], type, payload, now_ms=now, matched=True,
            max_payload_bytes=max_payload_bytes, **headers)
    return Interested(max_payload_bytes, sender, type, event, headers, payload, now)


def publish_in(
    max_payload_bytes: int,
    tx: Tx,
    now: int,
    sender: str,
    to: list[str] | None,
    type: str,
    payload: dict[str, Any],
) -> str | None:
    """Publish a message the library builds itself, inside the caller's transaction: to
    ``to``, or to the agents interested in ``type`` when ``to`` is None (None: nobody is,
    nothing written)."""
    if to is None:  # validated as it is written (nothing to check when nobody is interested)
        return Interested(max_payload_bytes, sender, type, None, {}, payload, now).write(tx, now)
    return prepare_publish(max_payload_bytes, sender, to, type, payload, now=now).write(tx, now)
