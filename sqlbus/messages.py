"""Messages: the msgspec structs, message ids and timestamps, and the decoding of stored bodies.

A message is validated and encoded once, by :mod:`sqlbus.encoding`, before anything touches
the database; storage only ever sees the encoded bytes, and this module turns them back into
a :class:`Message`. Decoders are built once at import.

>>> message = decode_message(b'{"id":"msg-1700000000000-abcdefghi","from":"alice","to":"bob",'
...                          b'"type":"notification","timestamp":"2023-11-14T22:13:20.000Z",'
...                          b'"payload":{"text":"hi"}}')
>>> message.sender, message.headers.priority
('alice', 3)
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import deque
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from .errors import ValidationError

__all__ = [
    "MESSAGE_TYPES",
    "MessageType",
    "Headers",
    "Message",
    "Task",
    "TaskResources",
    "TaskAssignment",
    "TaskError",
    "TaskMetrics",
    "TaskResult",
    "Progress",
    "Health",
    "StatusUpdate",
    "TYPED_PAYLOADS",
    "MESSAGE_ID_RE",
    "new_message_id",
    "new_message_ids",
    "iso_ms",
    "ENVELOPE_ALLOWANCE",
    "fits",
    "decode_message",
    "decode_stored",
    "listed_message",
    "corrupt_message",
    "decode_payload",
    "payload_error",
    "escape_text",
]

# ---------------------------------------------------------------------------------------------
# The message model (SPEC 1)

MessageType = Literal[
    "request",
    "response",
    "notification",
    "error",
    "task_assignment",
    "task_result",
    "status_update",
    "heartbeat",
    "shutdown",
    "broadcast",
    "event",
    "state_change",
    "state_sync_request",
]
MESSAGE_TYPES: frozenset[str] = frozenset(get_args(MessageType))

Priority = Annotated[int, Meta(ge=1, le=5)]
MessageId = Annotated[str, Meta(pattern=r"^msg-[0-9]{13}-[a-z0-9]{9}$")]


class Headers(Struct, kw_only=True):
    """Message headers. ``ttl`` is in milliseconds (0 = never expires); 5 is the top priority.

    ``broadcast_pattern`` is set on a broadcast; ``direct_reply`` on a request sent by
    ``request()``, whose requester reads the response itself (it never waits in an inbox).
    """

    priority: Priority = 3
    ttl: Annotated[int, Meta(ge=0)] = 30_000
    requires_ack: bool = False
    correlation_id: Union[str, UnsetType] = UNSET
    retry_count: Annotated[int, Meta(ge=0)] = 0
    broadcast_pattern: Union[str, UnsetType] = UNSET
    direct_reply: Union[bool, UnsetType] = UNSET


class Message(Struct, kw_only=True, rename={"sender": "from"}):
    """One message, as delivered. Its JSON form validates against the seed's base schema.

    ``sender`` is the JSON key ``from``. ``headers.retry_count`` is the number of earlier
    deliveries of this message to this recipient.
    """

    id: MessageId
    sender: str
    to: Union[str, list[str]]
    type: MessageType
    timestamp: str
    payload: dict[str, Any]
    headers: Headers = field(default_factory=Headers)


# ---------------------------------------------------------------------------------------------
# Typed payloads (SPEC 1.3), field for field as in the seed. Optional parts are UNSET, so a
# struct passed to publish encodes to just the fields that were given.


class TaskResources(Struct, kw_only=True, omit_defaults=True):
    """Resource limits of a task; ``timeout`` in seconds as the seed has it (an integer)."""

    cpu_limit: Union[str, UnsetType] = UNSET
    memory_limit: Union[str, UnsetType] = UNSET
    timeout: Union[int, UnsetType] = UNSET


class Task(Struct, kw_only=True, omit_defaults=True):
    """The task inside a ``task_assignment``; ``id`` and ``type`` are required."""

    id: str
    type: str
    description: Union[str, UnsetType] = UNSET
    parameters: Union[dict[str, Any], UnsetType] = UNSET
    deadline: Union[str, UnsetType] = UNSET
    priority: Union[Priority, UnsetType] = UNSET
    dependencies: Union[list[str], UnsetType] = UNSET
    resources: Union[TaskResources, UnsetType] = UNSET


class TaskAssignment(Struct, kw_only=True, omit_defaults=True):
    """Payload of ``task_assignment``: ``{"task": {...}}``."""

    task: Task


class TaskError(Struct, kw_only=True, omit_defaults=True):
    """Why a task failed."""

    code: str
    message: str
    details: Union[dict[str, Any], UnsetType] = UNSET


class TaskMetrics(Struct, kw_only=True, omit_defaults=True):
    """What a task cost; ``execution_time`` in milliseconds."""

    execution_time: Union[int, UnsetType] = UNSET
    memory_used: Union[str, UnsetType] = UNSET
    cpu_used: Union[float, UnsetType] = UNSET


class TaskResult(Struct, kw_only=True, omit_defaults=True):
    """Payload of ``task_result``."""

    task_id: str
    status: Literal["completed", "failed", "timeout"]
    result: Union[dict[str, Any], None, UnsetType] = UNSET
    error: Union[TaskError, UnsetType] = UNSET
    metrics: Union[TaskMetrics, UnsetType] = UNSET
    artifacts: Union[list[str], UnsetType] = UNSET


class Progress(Struct, kw_only=True, omit_defaults=True):
    """Progress of the current task; ``percentage`` is 0..100."""

    current_task: Union[str, UnsetType] = UNSET
    percentage: Union[Annotated[int, Meta(ge=0, le=100)], UnsetType] = UNSET
    eta: Union[str, UnsetType] = UNSET


class Health(Struct, kw_only=True, omit_defaults=True):
    """Health figures an agent reports about itself."""

    cpu_usage: Union[float, UnsetType] = UNSET
    memory_usage: Union[str, UnsetType] = UNSET
    load_average: Union[float, UnsetType] = UNSET


class StatusUpdate(Struct, kw_only=True, omit_defaults=True):
    """Payload of ``status_update``."""

    agent_status: Literal["idle", "busy", "error", "shutting_down"]
    current_tasks: Union[list[str], UnsetType] = UNSET
    progress: Union[Progress, UnsetType] = UNSET
    health: Union[Health, UnsetType] = UNSET


TYPED_PAYLOADS: dict[str, type[Struct]] = {
    "task_assignment": TaskAssignment,
    "task_result": TaskResult,
    "status_update": StatusUpdate,
}

# ---------------------------------------------------------------------------------------------
# Ids and time

_message_decoder = msgspec.json.Decoder(Message)
_iso_second_cache: dict[int, str] = {}


# Random parts of message ids, 9 characters of a 32-letter alphabet (5 random bits each, from
# ``secrets``), made 1,000 at a time: one syscall, not one per id. A deque: taking one is
# atomic, so threads share it safely; a forked child empties it, so parent and child never
# share ids.
_random_parts: deque[str] = deque()
os.register_at_fork(after_in_child=_random_parts.clear)
_ID_ALPHABET = bytes(b"abcdefghijklmnopqrstuvwxyz234567"[b % 32] for b in range(256))
_last_id_prefix = (-1, "")  # (epoch ms, "msg-<13 digits>-"): ids made in the same ms share it


def _random_id_parts(count: int, prefix: str = "") -> list[str]:
    """``count`` random parts of ids, each after ``prefix`` (one ``secrets`` call for all)."""
    text = secrets.token_bytes(9 * count).translate(_ID_ALPHABET).decode()
    return [prefix + text[i : i + 9] for i in range(0, 9 * count, 9)]


def _random_part() -> str:
    try:
        return _random_parts.popleft()
    except IndexError:
        _random_parts.extend(_random_id_parts(1000))
        return _random_parts.popleft()


def new_message_id(now_ms: int) -> str:
    """``msg-<13-digit epoch ms>-<9 random chars of [a-z0-9]>``, the random part from ``secrets``.

    The random part is 45 bits in base32 (``a-z2-7``), a subset of the schema's alphabet.
    """
    return _id_prefix(now_ms) + _random_part()


def new_message_ids(now_ms: int, count: int) -> list[str]:
    """``count`` ids as :func:`new_message_id` makes them, for a batch that shares ``now_ms``
    (one ``secrets`` call for all of them)."""
    return _random_id_parts(count, _id_prefix(now_ms))


def _id_prefix(now_ms: int) -> str:
    """``msg-<13-digit epoch ms>-``, made once per ms."""
    global _last_id_prefix
    ms, prefix = _last_id_prefix
    if ms != now_ms:
        prefix = f"msg-{now_ms:013d}-"
        _last_id_prefix = (now_ms, prefix)
    return prefix


# An id as the schema has it (MessageId). Used with fullmatch: ``$`` also matches before a
# final newline, and a caller's id goes into a body's JSON as it is, so it must be exactly this.
MESSAGE_ID_RE = re.compile(r"msg-[0-9]{13}-[a-z0-9]{9}")


_last_iso = (-1, "")  # (epoch ms, its ISO text): the messages of a batch share a timestamp


def iso_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds: ``2026-11-24T05:46:52.123Z``."""
    global _last_iso
    ms, text = _last_iso
    if ms == epoch_ms:
        return text
    seconds, fraction = divmod(epoch_ms, 1000)
    prefix = _iso_second_cache.get(seconds)
    if prefix is None:
        if len(_iso_second_cache) > 64:
            _iso_second_cache.clear()
        prefix = _iso_second_cache[seconds] = time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)
        )
    text = f"{prefix}.{fraction:03d}Z"
    _last_iso = (epoch_ms, text)
    return text


# ---------------------------------------------------------------------------------------------
# Decoding: a stored body as a Message (or, for a damaged row, as what a listing shows)


def decode_message(body: bytes) -> Message:
    """Decode a stored message body into a :class:`Message`."""
    return _message_decoder.decode(body)


# How much longer than its payload a stored body may be (id, sender, recipients, timestamp,
# headers): a claim or a listing loads a body only up to the reader's max_payload_bytes plus
# this, and a publish refuses a body longer than the sender's (a list of thousands of
# recipients or a huge correlation id would be needed to reach it).
ENVELOPE_ALLOWANCE = 64 * 1024
# What a listing shows of a row it cannot decode (SPEC 4.2).
CORRUPT_SENDER = "sqlbus"
CORRUPT_TEXT_CHARS = 1000
_NO_ID = "msg-0000000000000-000000000"
_ID_IN_BODY = re.compile(rb'\{"id":"(msg-[0-9]{13}-[a-z0-9]{9})')


_DAMAGE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
type_of = type  # `type` is shadowed by the parameter of the same name in listed_message()


def fits(body_length: int, max_payload_bytes: int) -> bool:
    """Whether a stored body of ``body_length`` bytes is within a reader's ``max_payload_bytes``
    (the payload limit, plus :data:`ENVELOPE_ALLOWANCE` for the rest of the message)."""
    return body_length <= max_payload_bytes + ENVELOPE_ALLOWANCE


def decode_stored(body: bytes) -> Message | str:
    """Decode a stored body; on damage, the reason (one line) instead of raising."""
    try:
        return _message_decoder.decode(body)
    except _DAMAGE as exc:
        return escape_text(f"{type_of(exc).__name__}: {exc}")


def listed_message(
    to: str | list[str], message_id: str, sender: str, type: str, priority: int, sent_at: int,
    body: bytes | None,
) -> Message:
    """A message row as a listing shows it, which never fails because of one row (SPEC 4.2):
    decoded from its ``body``; when the body was too long for the reader to load (None), made
    of the row's columns with the payload ``{}``; when it cannot be decoded, as
    :func:`corrupt_message`."""
    if body is None:
        return Message(id=message_id, sender=sender, to=to, type=type,  # type: ignore[arg-type]
                       timestamp=iso_ms(sent_at), payload={}, headers=Headers(priority=priority))
    message = decode_stored(body)
    if type_of(message) is Message:
        return message  # type: ignore[return-value]
    return corrupt_message(body, to=to, sent_at=sent_at)


def corrupt_message(
    body: bytes, *, to: str | list[str] | None = None, sent_at: int = 0
) -> Message:
    """A row that cannot be decoded, as a listing shows it: type ``error`` from ``sqlbus``,
    payload ``{"corrupt": <its first 1,000 characters, bad bytes escaped>}``."""
    head = bytes(body[: 4 * CORRUPT_TEXT_CHARS])
    found = _ID_IN_BODY.match(head)
    return Message(
        id=found.group(1).decode() if found else _NO_ID,
        sender=CORRUPT_SENDER,
        to=[] if to is None else to,
        type="error",
        timestamp=iso_ms(sent_at),
        payload={"corrupt": head.decode("utf-8", "backslashreplace")[:CORRUPT_TEXT_CHARS]},
    )


def decode_payload(message: Message, struct_type: type[Struct]) -> Any:
    """Decode a message's payload into a typed struct, e.g. ``decode_payload(m, TaskResult)``."""
    try:
        return msgspec.convert(message.payload, struct_type)
    except msgspec.ValidationError as exc:
        raise payload_error(exc, "payload", struct_type) from exc


def payload_error(
    exc: msgspec.ValidationError, root: str, struct_type: type[Struct]
) -> ValidationError:
    """msgspec's error about a value converted to ``struct_type``, in our words: the path from
    ``root`` and the rule; an enum error lists the valid values (SPEC 1.1)."""
    text = str(exc)
    match = re.match(r"^(.*) - at `\$(.*)`$", text, re.S)
    if not match:
        return ValidationError(f"{root}: {text[0].lower() + text[1:] if text else text}",
                               field=root)
    rule, path = match.groups()
    rule = rule.replace("`", "")
    choices = _enum_values(struct_type, path) if rule.startswith("Invalid enum value") else ()
    if choices:
        rule += f", expected one of {', '.join(choices)}"
    return ValidationError(f"{root}{path}: {rule[0].lower() + rule[1:]}", field=f"{root}{path}")


def _enum_values(struct_type: type[Struct], path: str) -> tuple[str, ...]:
    """The values of the ``Literal`` at ``path`` (``.progress.eta``, ``.items[2]``, as msgspec
    names it) inside ``struct_type``, or () when that is no Literal."""
    kind: Any = struct_type
    for step in re.finditer(r"\.([^.\[]+)|\[\d+\]", path):
        kind = _unwrapped(kind)
        name = step.group(1)
        if name:
            is_struct = isinstance(kind, type) and issubclass(kind, Struct)
            kind = get_type_hints(kind, include_extras=True).get(name) if is_struct else None
        else:
            kind = (get_args(kind) or (None,))[0]  # a list's items
    kind = _unwrapped(kind)
    return tuple(str(v) for v in get_args(kind)) if get_origin(kind) is Literal else ()


def _unwrapped(kind: Any) -> Any:
    """``kind`` without ``Annotated`` and without the ``UNSET``/``None`` of an optional field."""
    while get_origin(kind) is Annotated or get_origin(kind) is Union:
        if get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
        else:
            rest = [k for k in get_args(kind) if k is not UnsetType and k is not type(None)]
            if len(rest) != 1:
                return kind
            kind = rest[0]
    return kind


# ---------------------------------------------------------------------------------------------
# Text the bus records


def escape_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udcff``: text the bus records (errors,
    tracebacks, reasons) must be storable whatever it holds (file names from os.listdir carry
    surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text
