"""What the bus's listings return: agents, subscriptions, archived messages and dead letters,
and how a stored dead-letter row becomes one."""

from __future__ import annotations

from typing import Any

import msgspec

from .messages import MESSAGE_ID_RE, Headers, Message, iso_ms, listed_message


class Subscription(msgspec.Struct):
    """An agent's recorded interest (SPEC 5): ``kind`` ``"type"`` (``pattern`` a message type
    or ``*``) or ``"event"`` (``pattern`` an event-name pattern); ``subscribed_at`` ISO 8601 UTC."""

    kind: str
    pattern: str
    subscribed_at: str


class AgentInfo(msgspec.Struct, kw_only=True):
    """A registered agent. ``alive``: seen within the last 60 s (ISO 8601 UTC times);
    ``subscriptions``: its recorded interests."""

    id: str
    registered_at: str
    last_seen: str
    status: str
    alive: bool
    subscriptions: list[Subscription] = []


class SentRecord(msgspec.Struct, kw_only=True):
    """An archived message and the agents it was delivered to (empty for an unmatched broadcast)."""

    message: Message
    recipients: list[str]
    sent_at: str
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


class DeadLetter(msgspec.Struct, kw_only=True):
    """A delivery that ended in dead letters, with why (``reason``) and the error, if any.

    ``reason`` is ``max_attempts``, ``non_retryable``, ``discarded``, ``expired``,
    ``too_large`` (above the receiver's ``max_payload_bytes``, never loaded), ``corrupt``
    (the stored message cannot be decoded) or the caller's text; ``context`` a JSON object;
    ``failed_at`` ISO 8601 UTC.
    """

    id: int
    agent: str
    message: Message
    reason: str
    error_name: str | None
    error_message: str | None
    traceback: str | None
    context: dict[str, Any]
    failed_at: str
    attempts: int
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


def dead_letter_ref(ref: object) -> tuple[int | None, str | None] | None:
    """(number, message id) that a dead-letter ``ref`` names, or None when it can name none
    (an int beyond SQLite's 64 bits, a str that is not a message id)."""
    if type(ref) is int:  # not bool
        return (ref, None) if -(2**63) <= ref < 2**63 else None
    if type(ref) is str:
        return (None, ref) if MESSAGE_ID_RE.fullmatch(ref) else None
    raise TypeError(
        f"ref must be a dead-letter number (int) or a message id (str), got {type(ref).__name__}"
    )


def ref_text(ref: int | str) -> str:
    """``ref`` for an error message (an int of thousands of digits cannot even be printed)."""
    if type(ref) is int:
        return f"numbered {ref}" if abs(ref) < 10**30 else f"numbered with a {ref.bit_length()}-bit int"
    return f"of message {ref[:100]!r}"


def stored_ttl(ttl: object) -> int:
    """The ttl read from a stored body for a requeue; the default when the body is damaged."""
    return ttl if type(ttl) is int and ttl >= 0 else Headers().ttl


class Lease(msgspec.Struct, kw_only=True):
    """A delivery in flight: ``agent``'s inbox holds ``message`` under a lease that ends at
    ``lease_ends_at`` (ISO 8601 UTC) unless acked, failed or extended; ``attempts`` deliveries
    so far, this one included."""

    agent: str
    message: Message
    attempts: int
    lease_ends_at: str
    payload_bytes: int = 0


class RecipientRecord(msgspec.Struct, kw_only=True):
    """What became of a message in one recipient's inbox: ``status`` (``ready``, ``leased``,
    ``retrying``, ``scheduled``, ``expired``, ``acked`` or ``dead``), ``attempts`` so far,
    ``visible_at`` (when a lease ends or a retry comes due), ``done_at`` (acked or dead at),
    ``last_error`` (the error of the attempt before, "Name: text") and, when dead, its dead
    letter in full (with the traceback)."""

    agent: str | None  # None: a broadcast that matched nobody
    status: str
    attempts: int
    visible_at: str
    done_at: str | None = None
    last_error: str | None = None
    dead_letter: DeadLetter | None = None


class MessageTrace(msgspec.Struct, kw_only=True):
    """One message and what became of it in every recipient's inbox (its archive record:
    ``recipients`` are the agents it went to)."""

    message: Message
    sent_at: str
    payload_bytes: int
    recipients: list[RecipientRecord]


def dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter:
    (dead_id, agent, reason, error_name, error_message, tb, context, failed_at, attempts, body,
     message_id, sender, type_, priority, sent_at, length) = row
    # above the reader's limit (body None) its columns stand in, the payload is not loaded
    message = listed_message(agent, message_id, sender, type_, priority, sent_at, body)
    try:
        context_value = msgspec.json.decode(context) if context else {}
    except msgspec.DecodeError:  # a listing never fails because of one row
        context_value = {"corrupt": context[:1000]}
    return DeadLetter(
        id=dead_id,
        agent=agent,
        message=message,
        reason=reason,
        error_name=error_name,
        error_message=error_message,
        traceback=tb,
        context=context_value,
        failed_at=iso_ms(failed_at),
        attempts=attempts,
        payload_bytes=length,
    )
