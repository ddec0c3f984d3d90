"""Messages: the msgspec structs, their validation and their JSON form.

A message is validated and encoded once, here, before anything touches the database; storage
only ever sees the encoded bytes. Encoders and decoders are built once at import.

>>> out = prepare("alice", "bob", "notification", {"text": "hi"}, now_ms=1_700_000_000_000)
>>> out.recipients
['bob']
>>> decode_message(out.body).sender
'alice'
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from .errors import PayloadTooLargeError, ValidationError

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
    "Outgoing",
    "prepare",
    "new_message_id",
    "iso_ms",
    "decode_message",
    "decode_stored",
    "listed_message",
    "corrupt_message",
    "decode_payload",
    "check_agent_id",
    "encode_payload",
    "encode_json_value",
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
_UNTYPED = MESSAGE_TYPES - TYPED_PAYLOADS.keys()

# ---------------------------------------------------------------------------------------------
# Encoding, ids, time

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
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


def _random_id_parts(count: int) -> list[str]:
    """``count`` random parts of ids (one ``secrets`` call for all of them)."""
    text = secrets.token_bytes(9 * count).translate(_ID_ALPHABET).decode()
    return [text[i : i + 9] for i in range(0, 9 * count, 9)]


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


def _id_prefix(now_ms: int) -> str:
    """``msg-<13-digit epoch ms>-``, made once per ms."""
    global _last_id_prefix
    ms, prefix = _last_id_prefix
    if ms != now_ms:
        prefix = f"msg-{now_ms:013d}-"
        _last_id_prefix = (now_ms, prefix)
    return prefix


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
        raise _msgspec_error(exc, "payload", struct_type) from exc


# ---------------------------------------------------------------------------------------------
# Validation: before anything is written, with errors that name the field and the rule.

_PATTERN_CHARS = re.compile(r"[*?\[]")
# ttl bound (~31,700 years): expires_at = now + ttl must fit the 64-bit integer column.
MAX_TTL_MS = 10**15
_known_agent_ids: set[str] = set()


def check_agent_id(value: object, field_name: str = "agent id") -> str:
    """Return ``value`` if it is a valid agent id, else raise :class:`ValidationError`."""
    # type() first: a str subclass equal to a known id must not slip past the type check.
    if type(value) is str and value in _known_agent_ids:
        return value
    if type(value) is not str:
        raise ValidationError(f"{field_name}: expected str, got {type(value).__name__}",
                              field=field_name)
    if not 1 <= len(value) <= 200:
        raise ValidationError(f"{field_name}: expected 1..200 characters, got {len(value)}",
                              field=field_name)
    if not value.isprintable():
        raise ValidationError(f"{field_name}: expected printable text, got {value!r}",
                              field=field_name)
    if _PATTERN_CHARS.search(value):
        raise ValidationError(
            f"{field_name}: {value!r} contains a pattern character (* ? [); "
            "publish takes agent ids, use broadcast(pattern=...) to match many", field=field_name,
        )
    if len(_known_agent_ids) < 10_000:
        _known_agent_ids.add(value)
    return value


def _check_int(value: object, name: str, low: int, high: int | None) -> int:
    if type(value) is not int:
        raise ValidationError(f"{name}: expected int, got {type(value).__name__}", field=name)
    if value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f">= {low} and <= {high}"
        raise ValidationError(f"{name}: expected int {rule}, got {value}", field=name)
    return value


def _msgspec_error(
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


def _find_non_json(value: Any, path: str) -> ValidationError | None:
    """Walk a payload and name the first value that is not plain JSON (slow path, errors only)."""
    kind = type(value)
    if kind is str:
        return _bad_text(value, path)
    if value is None or kind is bool or kind is int:
        return None
    if kind is float:
        return None if value == value and value not in (float("inf"), float("-inf")) else (
            ValidationError(f"{path}: {value!r} is not JSON (NaN and infinity are not allowed)",
                            field=path)
        )
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return ValidationError(
                    f"{path}: key {key!r} is not a string (JSON object keys are strings)",
                    field=path)
            found = _bad_text(key, path, "key ")
            if found:
                return found
            found = _find_non_json(item, _member_path(path, key))
            if found:
                return found
        return None
    if kind is list:
        for index, item in enumerate(value):
            found = _find_non_json(item, f"{path}[{index}]")
            if found:
                return found
        return None
    return ValidationError(
        f"{path}: {kind.__name__} is not JSON (use dict, list, str, int, float, bool, None)",
        field=path)


def encode_json_value(value: Any, max_bytes: int, name: str) -> bytes:
    """Encode any JSON value, refusing what would not come back the same (NaN, bytes, tuples,
    objects, non-string keys), strings with NUL or a lone surrogate, nesting deeper than
    :data:`MAX_DEPTH` and anything larger than ``max_bytes`` encoded."""
    try:
        encoded = _encode(value)
    # UnicodeEncodeError: a lone surrogate ("\ud800") has no UTF-8 form, so no JSON form either.
    # RecursionError: nested far deeper than MAX_DEPTH.
    except (TypeError, OverflowError, UnicodeEncodeError, RecursionError,
            msgspec.EncodeError) as exc:
        found = _too_deep_path(value, name) or _find_non_json(value, name)
        raise (found or ValidationError(f"{name}: {exc}", field=name)) from exc
    if len(encoded) > max_bytes:
        raise PayloadTooLargeError(
            f"{name}: encoded size {len(encoded)} bytes exceeds max_payload_bytes={max_bytes}",
            field=name,
        )
    # Depth is checked before anything walks the value recursively (the NUL check below).
    try:
        decoded = _decode_any(encoded)
    except RecursionError as exc:
        raise (_too_deep_path(value, name) or _too_deep(name)) from exc
    # _may_nest_too_deep and _may_hold_nul inlined (a call costs more than their tests)
    if len(encoded) > 2 * MAX_DEPTH and encoded.count(91) + encoded.count(123) > MAX_DEPTH and (
        _nests_too_deep(encoded)
    ):
        raise _too_deep_path(value, name) or _too_deep(name)
    if 92 in encoded and encoded.find(b"\\u0000") >= 0:
        found = _find_non_json(value, name)
        if found:
            raise found
    # msgspec quietly writes NaN as null and bytes as base64; a round trip catches both.
    if decoded != value:
        raise _find_non_json(value, name) or ValidationError(
            f"{name}: does not survive a JSON round trip", field=name)
    return encoded


# JSON values the bus stores nest at most this many levels of objects and arrays (the outermost
# is 1): far below the depth at which encoding, decoding or comparing one recurses too deep,
# also in a receiver whose handler already runs some frames down.
MAX_DEPTH = 64
_TOO_DEEP = "{}: nested deeper than " + f"{MAX_DEPTH} levels of objects and arrays"


def _too_deep(path: str) -> ValidationError:
    return ValidationError(_TOO_DEEP.format(path), field=path)


def _may_nest_too_deep(encoded: bytes) -> bool:
    """False when the JSON text ``encoded`` surely nests at most MAX_DEPTH levels: it has no
    more opening brackets than that (counted in strings too, an upper bound), so almost every
    value is cleared without a walk. The length first: a small payload needs no count (91
    and 123 are "[" and "{")."""
    return len(encoded) > 2 * MAX_DEPTH and encoded.count(91) + encoded.count(123) > MAX_DEPTH


def _nests_too_deep(encoded: bytes) -> bool:
    """Whether the JSON text ``encoded`` nests more than MAX_DEPTH levels. Formatted with an
    indent of one space, every member of a container is on a line of its own, indented by how
    many containers hold it (a string holds no raw newline), so an object or array nested
    deeper than the limit starts a line indented MAX_DEPTH spaces, after its key, if any. In C
    loops: measured, half the time of a Python walk of the decoded value."""
    return _TOO_DEEP_LINE.search(msgspec.json.format(encoded, indent=1)) is not None


_TOO_DEEP_LINE = re.compile(rb'\n {%d}(?:"(?:[^"\\]|\\.)*": )?[\[{]' % MAX_DEPTH)


def _may_hold_nul(encoded: bytes) -> bool:
    """Whether JSON text ``encoded`` may hold a NUL (``\\u0000``; or a string with a backslash
    before "u0000", which the caller's walk tells apart). A search for the byte 92 (a
    backslash) first, which is a memchr, and most payloads have none; ``in`` with a bytes
    needle tries it as an int first and pays for the TypeError (measured: 5x the cost)."""
    return 92 in encoded and encoded.find(b"\\u0000") >= 0


def _member_path(path: str, key: object) -> str:
    """The path of an object member for an error: ``payload.key``, or ``payload['a\\nb']``
    for a key that is not printable (an error is one line)."""
    return f"{path}.{key}" if type_of(key) is str and key.isprintable() else f"{path}[{key!r}]"


def _too_deep_path(value: Any, name: str) -> ValidationError | None:
    """The error naming the first object or array nested deeper than MAX_DEPTH, or None.
    Iterative: the value may be nested deeper than Python can recurse."""
    stack = [(value, name, 1)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return _too_deep(path)
        if isinstance(item, dict):
            stack.extend((v, _member_path(path, k), depth + 1) for k, v in reversed(item.items())
                         if isinstance(v, (dict, list, tuple)))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(enumerate(item)))
                         if isinstance(v, (dict, list, tuple)))
    return None


def encode_payload(payload: Any, type_: str, max_bytes: int, name: str = "payload") -> bytes:
    """Validate a payload and return its JSON bytes.

    It must be a JSON object that round-trips exactly (no NaN, bytes, tuples or objects), no
    larger than ``max_bytes`` encoded, and match the typed struct for the typed kinds.
    """
    if isinstance(payload, Struct):
        payload = msgspec.to_builtins(payload)
    if type(payload) is not dict:
        raise ValidationError(
            f"{name}: expected a JSON object (dict), got {type(payload).__name__}", field=name)
    encoded = encode_json_value(payload, max_bytes, name)
    struct_type = TYPED_PAYLOADS.get(type_)
    if struct_type is not None:
        try:
            msgspec.convert(payload, struct_type)
        except msgspec.ValidationError as exc:
            raise _msgspec_error(exc, name, struct_type) from exc
    return encoded


class Outgoing(Struct, frozen=True):
    """A validated message ready to be written: its id, routing columns and encoded body."""

    id: str
    sender: str
    recipients: list[str]
    type: str
    priority: int
    ttl: int
    requires_ack: bool
    correlation_id: str | None
    body: bytes
    caller_id: bool = False  # the caller chose the id: check it for idempotency
    delivered: bool = False  # a direct reply: archived as delivered, never in an inbox


def prepare(
    sender: str,
    to: str | list[str],
    type: str,
    payload: Any,
    *,
    now_ms: int,
    priority: int = 3,
    ttl: int = 30_000,
    requires_ack: bool = False,
    correlation_id: str | None = None,
    id: str | None = None,
    broadcast_pattern: str | None = None,
    direct_reply: bool = False,
    delivered: bool = False,
    max_payload_bytes: int = 1_048_576,
    prefix: str = "",
    matched: bool = False,
) -> Outgoing:
    """Validate one message and encode it. ``prefix`` (e.g. ``"[3]."``) goes before field names.

    A list ``to`` is deduplicated, keeping order. ``broadcast_pattern`` marks a broadcast, whose
    ``to`` was expanded by the caller and may be empty; so may a ``matched`` one (the agents
    with a matching interest, SPEC 5). ``direct_reply`` marks a request whose
    response the requester reads itself; ``delivered`` writes such a response as delivered.
    """
    if type not in MESSAGE_TYPES:
        raise ValidationError(
            f"{prefix}type: expected one of {', '.join(get_args(MessageType))}, got {type!r}",
            field=f"{prefix}type",
        )
    # Fast paths first: the names for an error message are built only when one is raised.
    if type_of(priority) is not int or not 1 <= priority <= 5:
        _check_int(priority, f"{prefix}headers.priority", 1, 5)
    if type_of(ttl) is not int or not 0 <= ttl <= MAX_TTL_MS:
        _check_int(ttl, f"{prefix}headers.ttl", 0, MAX_TTL_MS)
    if requires_ack is not True and requires_ack is not False:
        raise ValidationError(
            f"{prefix}headers.requires_ack: expected bool, got {builtin_type(requires_ack)}",
            field=f"{prefix}headers.requires_ack",
        )
    if correlation_id is not None and (
        type_of(correlation_id) is not str or _bad_text(correlation_id, "")
    ):
        got = builtin_type(correlation_id) if type_of(correlation_id) is not str else (
            "a str with NUL or a lone surrogate")
        raise ValidationError(f"{prefix}headers.correlation_id: expected str, got {got}",
                              field=f"{prefix}headers.correlation_id")
    if type_of(to) is str and to in _known_agent_ids:
        recipients = [to]
    elif isinstance(to, str):
        recipients = [check_agent_id(to, f"{prefix}to")]
    elif isinstance(to, (list, tuple)):
        recipients = []
        seen: set[str] = set()  # a set: the list's `in` would cost the square of its length
        for index, agent in enumerate(to):
            check_agent_id(agent, f"{prefix}to[{index}]")
            if agent not in seen:
                seen.add(agent)
                recipients.append(agent)
        if not recipients and broadcast_pattern is None and not matched:
            raise ValidationError(f"{prefix}to: expected at least one agent id, got an empty list",
                                  field=f"{prefix}to")
    else:
        raise ValidationError(f"{prefix}to: expected str or list of str, got {builtin_type(to)}",
                              field=f"{prefix}to")
    caller_id = id is not None
    if id is None:
        id = new_message_id(now_ms)
    elif type_of(id) is not str or not _ID_RE.fullmatch(id):
        raise ValidationError(
            f"{prefix}id: expected msg-<13 digits>-<9 chars of [a-z0-9]>, got {id!r}",
            field=f"{prefix}id",
        )
    if payload is None:
        payload = {}
    encoded_payload = encode_payload(payload, type, max_payload_bytes, f"{prefix}payload")
    if broadcast_pattern is None and correlation_id is None and not direct_reply and (
        type_of(to) is str
    ):
        body = _plain_body(sender, to, type, priority, ttl, requires_ack, id, now_ms,
                           encoded_payload)
    else:
        body = _encode(Message(
            id=id,
            sender=sender,
            to=recipients if broadcast_pattern is not None or not isinstance(to, str) else to,
            type=type,  # type: ignore[arg-type]
            timestamp=iso_ms(now_ms),
            payload=msgspec.Raw(encoded_payload),  # type: ignore[arg-type]
            headers=Headers(
                priority=priority,
                ttl=ttl,
                requires_ack=requires_ack,
                correlation_id=UNSET if correlation_id is None else correlation_id,
                broadcast_pattern=UNSET if broadcast_pattern is None else broadcast_pattern,
                direct_reply=True if direct_reply else UNSET,
            ),
        ))
    if not fits(len(body), max_payload_bytes):  # a receiver with this limit would refuse it
        raise PayloadTooLargeError(
            f"{prefix}to: the message with its {len(recipients)} recipient(s) and headers is "
            f"{len(body)} bytes, more than max_payload_bytes={max_payload_bytes} plus "
            f"{ENVELOPE_ALLOWANCE} bytes for the envelope", field=f"{prefix}to",
        )
    return Outgoing(
        id=id,
        sender=sender,
        recipients=recipients,
        type=type,
        priority=priority,
        ttl=ttl,
        requires_ack=requires_ack,
        correlation_id=correlation_id,
        body=body,
        caller_id=caller_id,
        delivered=delivered,
    )


# Used with fullmatch: ``$`` also matches before a final newline, and a caller's id goes into
# the body's JSON as it is (_plain_body), so it must be exactly this.
_ID_RE = re.compile(r"msg-[0-9]{13}-[a-z0-9]{9}")
# (sender, to, type, priority, ttl, requires_ack) -> the message's JSON around its id,
# timestamp and payload: a body is three joins instead of two structs and an encode (measured
# 0.24 us against 0.68).
_ENVELOPES: dict[tuple[str, str, str, int, int, bool], tuple[bytes, bytes]] = {}


def _plain_body(
    sender: str, to: str, type: str, priority: int, ttl: int, requires_ack: bool, id: str,
    now_ms: int, encoded_payload: bytes,
) -> bytes:
    """The body of a message to one agent without correlation id, broadcast pattern or direct
    reply: its envelope (all but id, timestamp and payload) is made once."""
    middle, tail = _cached_envelope(sender, to, type, priority, ttl, requires_ack)
    return b"".join((b'{"id":"', id.encode(), middle, iso_ms(now_ms).encode(),
                     b'","payload":', encoded_payload, tail))


# The keys of a publish_many item that prepare_plain_batch handles; any other key (id, delay,
# correlation_id, or a wrong one) sends the whole batch to prepare().
_PLAIN_KEYS = frozenset(("to", "type", "payload", "priority", "ttl", "requires_ack"))


_NOTHING: Any = object()  # no item checked yet: the first item's headers are never it


class PlainRun(NamedTuple):
    """Consecutive messages of a plain batch to one agent with the same type, priority and
    ttl: what storage.publish_plain writes, binding the values they share once."""

    to: str
    type: str
    priority: int
    ttl: int
    ids: list[str]
    bodies: list[bytes]


def prepare_plain_batch(
    sender: str, items: Sequence[Any], now_ms: int, max_payload_bytes: int
) -> list[PlainRun] | None:
    """:func:`prepare` for a ``publish_many`` batch of the commonest messages (measured with
    callgrind: 15,500 instructions per message, against 26,600 for one prepare() and one
    Outgoing each): each item a dict of :data:`_PLAIN_KEYS` to one known agent id, of a type without a typed
    payload, with a dict payload. None when any item is anything else or anything wrong: the
    caller then prepares each item with prepare(), which accepts it or says what is wrong.

    The batch shares one timestamp, so its ids share their ``msg-<ms>-`` prefix and its
    bodies their ISO timestamp."""
    prefix = _id_prefix(now_ms)
    stamp = iso_ms(now_ms).encode()
    is_plain, known, untyped = _PLAIN_KEYS.issuperset, _known_agent_ids, _UNTYPED
    runs: list[PlainRun] = []
    ids: list[str] = []
    bodies: list[bytes] = []
    head = tail = b""
    # The headers of the item before, once checked: items that share them (the same objects,
    # as a batch built in a loop has) skip the checks. Identity, not equality: 1 == True.
    last_to = last_type = last_priority = last_ttl = last_ack = _NOTHING
    for item, part in zip(items, _random_id_parts(len(items)), strict=True):
        if type_of(item) is not dict or not is_plain(item):
            return None
        if len(item) == 3 and "payload" in item:  # the common item: no headers given
            to, type, payload = item.get("to"), item.get("type"), item["payload"]
            priority, ttl, requires_ack = 3, 30_000, False
        else:
            get = item.get
            to, type, payload = get("to"), get("type"), get("payload")
            priority, ttl, requires_ack = get("priority", 3), get("ttl", 30_000), get("requires_ack", False)
        if not (to is last_to and type is last_type and priority is last_priority
                and ttl is last_ttl and requires_ack is last_ack):
            if type_of(to) is not str or to not in known or type not in untyped:
                return None
            if type_of(priority) is not int or not 1 <= priority <= 5 or (
                type_of(ttl) is not int or not 0 <= ttl <= MAX_TTL_MS
            ) or (requires_ack is not True and requires_ack is not False):
                return None
            middle, tail = _cached_envelope(sender, to, type, priority, ttl, requires_ack)
            head = middle + stamp + b'","payload":'
            # requires_ack is in the body only: a change of it alone keeps the run
            if not runs or runs[-1][:4] != (to, type, priority, ttl):
                ids, bodies = [], []
                runs.append(PlainRun(to, type, priority, ttl, ids, bodies))
            last_to, last_type, last_priority, last_ttl, last_ack = to, type, priority, ttl, requires_ack
        if payload is None:
            payload = {}
        elif type_of(payload) is not dict:
            return None
        try:
            encoded = _encode(payload)
        except (TypeError, OverflowError, UnicodeEncodeError, RecursionError,
                msgspec.EncodeError):
            return None
        # The round trip rejects what JSON would change (tuples, non-str keys, NaN, ...).
        if len(encoded) > max_payload_bytes or _may_hold_nul(encoded):
            return None
        try:
            decoded = _decode_any(encoded)
        except RecursionError:
            return None
        if _may_nest_too_deep(encoded) and _nests_too_deep(encoded) or decoded != payload:
            return None
        id = prefix + part
        ids.append(id)
        bodies.append(b"".join((b'{"id":"', id.encode(), head, encoded, tail)))
    return runs


def _cached_envelope(
    sender: str, to: str, type: str, priority: int, ttl: int, requires_ack: bool
) -> tuple[bytes, bytes]:
    """:func:`_envelope`, made once per (sender, to, type, priority, ttl, requires_ack)."""
    key = (sender, to, type, priority, ttl, requires_ack)
    envelope = _ENVELOPES.get(key)
    if envelope is None:
        envelope = _envelope(*key)
        if len(_ENVELOPES) < 10_000:
            _ENVELOPES[key] = envelope
    return envelope


def _envelope(
    sender: str, to: str, type: str, priority: int, ttl: int, requires_ack: bool
) -> tuple[bytes, bytes]:
    """The JSON msgspec writes for such a Message, cut around its id, timestamp and payload:
    (from the id's closing quote to the timestamp's opening one, after the payload). Agent
    ids are JSON strings in it, so the cuts' unescaped quotes can only be the real ones."""
    whole = _encode(Message(
        id="I", sender=sender, to=to, type=type, timestamp="T",  # type: ignore[arg-type]
        payload=msgspec.Raw(b"0"), headers=Headers(  # type: ignore[arg-type]
            priority=priority, ttl=ttl, requires_ack=requires_ack),
    ))
    start = whole.index(b'","from":')
    stamp = whole.index(b'","timestamp":"') + len(b'","timestamp":"')
    tail = whole.index(b'","payload":0') + len(b'","payload":0')
    assert whole.startswith(b'{"id":"I') and whole[stamp : stamp + 1] == b"T"
    return whole[start:stamp], whole[tail:]


type_of = type  # `type` is shadowed by the parameter of the same name in prepare()


def _is_utf8(text: str) -> bool:
    """False for a str with a lone surrogate, which has no UTF-8 (so no JSON, no SQLite) form."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(text: str, path: str, what: str = "") -> ValidationError | None:
    """The error for a caller's string (``what``: ``"key "`` for an object's key) at ``path``
    that holds NUL or a lone surrogate (SPEC 1.1), or None."""
    if "\x00" in text:
        return ValidationError(
            f"{path}: {what}{text[:50]!r} holds NUL (\\x00), which sqlbus refuses in any string",
            field=path)
    if not _is_utf8(text):
        return ValidationError(
            f"{path}: {what}{text[:50]!r} is not valid Unicode (a lone surrogate has no UTF-8 form)",
            field=path)
    return None


def check_text(value: object, field_name: str, max_length: int, *, empty: bool = False) -> str:
    """Return ``value`` if it is a str of 1..``max_length`` characters (0.. with ``empty``)
    without NUL or a lone surrogate, else raise :class:`ValidationError`."""
    if type(value) is not str:
        raise ValidationError(f"{field_name}: expected str, got {builtin_type(value)}",
                              field=field_name)
    if not (0 if empty else 1) <= len(value) <= max_length:
        raise ValidationError(
            f"{field_name}: expected {0 if empty else 1}..{max_length} characters, got {len(value)}",
            field=field_name,
        )
    found = _bad_text(value, field_name)
    if found:
        raise found
    return value


def escape_text(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udcff``: text the bus records (errors,
    tracebacks, reasons) must be storable whatever it holds (file names from os.listdir carry
    surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def escape_strings(value: Any, depth: int = 1) -> Any:
    """A copy of a JSON-like value with :func:`escape_text` applied to every string (keys
    included); ``value`` itself when nothing changed. Beyond :data:`MAX_DEPTH` it stops,
    leaving the value for the depth check to refuse."""
    kind = type_of(value)
    if kind is str:
        return escape_text(value)
    if depth > MAX_DEPTH:
        return value
    if kind is dict:
        copy = {escape_text(k) if type_of(k) is str else k: escape_strings(v, depth + 1)
                for k, v in value.items()}
        same = len(copy) == len(value) and all(
            a is b and copy[a] is value[b] for a, b in zip(copy, value, strict=True))
        return value if same else copy
    if kind is list:
        items = [escape_strings(v, depth + 1) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def builtin_type(value: object) -> str:
    """The name of ``value``'s type, for error messages."""
    return type_of(value).__name__


def encode_json(value: Any) -> bytes:
    """Encode a plain JSON value the library built itself (no validation)."""
    return _encode(value)
