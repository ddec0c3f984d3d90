"""Encoding: a message's validation and its JSON form, before anything touches the database.

Every check raises :class:`ValidationError` (or :class:`PayloadTooLargeError`) naming the field
and the rule, so a bad message writes nothing. Encoders are built once at import.

>>> out = prepare("alice", "bob", "notification", {"text": "hi"}, now_ms=1_700_000_000_000)
>>> out.recipients
['bob']
>>> from sqlbus.messages import decode_message
>>> decode_message(out.body).sender
'alice'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple, get_args

import msgspec
from msgspec import UNSET, Struct

from .errors import PayloadTooLargeError, ValidationError
from .messages import (
    ENVELOPE_ALLOWANCE,
    MESSAGE_ID_RE,
    MESSAGE_TYPES,
    TYPED_PAYLOADS,
    Headers,
    Message,
    MessageType,
    escape_text,
    fits,
    iso_ms,
    new_message_id,
    new_message_ids,
    payload_error,
)

__all__ = [
    "MAX_TTL_MS",
    "MAX_DEPTH",
    "check_agent_id",
    "check_text",
    "encode_json",
    "encode_json_value",
    "encode_payload",
    "escape_strings",
    "Outgoing",
    "prepare",
    "PlainRun",
    "prepare_plain_batch",
]

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
_UNTYPED = MESSAGE_TYPES - TYPED_PAYLOADS.keys()
type_of = type  # `type` is shadowed by the parameter of the same name in prepare()

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


def builtin_type(value: object) -> str:
    """The name of ``value``'s type, for error messages."""
    return type_of(value).__name__


# ---------------------------------------------------------------------------------------------
# JSON values: payloads, state values, contexts


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
    deeper than the limit starts a line indented MAX_DEPTH spaces, after its key, if any. Both
    steps run in C, cheaper than a Python walk of the decoded value."""
    return _TOO_DEEP_LINE.search(msgspec.json.format(encoded, indent=1)) is not None


_TOO_DEEP_LINE = re.compile(rb'\n {%d}(?:"(?:[^"\\]|\\.)*": )?[\[{]' % MAX_DEPTH)


def _may_hold_nul(encoded: bytes) -> bool:
    """Whether JSON text ``encoded`` may hold a NUL (``\\u0000``; or a string with a backslash
    before "u0000", which the caller's walk tells apart). A search for the byte 92 (a
    backslash) first, which is a memchr, and most payloads have none; ``in`` with a bytes
    needle would try it as an int first and pay for the TypeError."""
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
            raise payload_error(exc, name, struct_type) from exc
    return encoded


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


def encode_json(value: Any) -> bytes:
    """Encode a plain JSON value the library built itself (no validation)."""
    return _encode(value)


# ---------------------------------------------------------------------------------------------
# One message: prepare()

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
    # On the publish path: the common message passes each check here in one test, and the
    # helpers that build the names for an error message run only when one is raised.
    if type not in MESSAGE_TYPES or type_of(priority) is not int or not 1 <= priority <= 5 or (
        type_of(ttl) is not int or not 0 <= ttl <= MAX_TTL_MS
    ) or (requires_ack is not True and requires_ack is not False) or (
        correlation_id is not None
        and (type_of(correlation_id) is not str or _bad_text(correlation_id, ""))
    ):
        _refuse_headers(prefix, type, priority, ttl, requires_ack, correlation_id)
    if type_of(to) is str and to in _known_agent_ids:
        recipients = [to]
    else:
        recipients = _recipients(to, prefix, broadcast_pattern is not None or matched)
    caller_id = id is not None
    if id is None:
        id = new_message_id(now_ms)
    elif type_of(id) is not str or not MESSAGE_ID_RE.fullmatch(id):
        raise ValidationError(
            f"{prefix}id: expected msg-<13 digits>-<9 chars of [a-z0-9]>, got {id!r}",
            field=f"{prefix}id",
        )
    if payload is None:
        payload = {}
    if type_of(payload) is dict and type in _UNTYPED:  # encode_payload's common case, inline
        encoded_payload = encode_json_value(payload, max_payload_bytes, f"{prefix}payload")
    else:
        encoded_payload = encode_payload(payload, type, max_payload_bytes, f"{prefix}payload")
    if broadcast_pattern is None and correlation_id is None and not direct_reply and (
        type_of(to) is str
    ):
        body = _plain_body(sender, to, type, priority, ttl, requires_ack, id, now_ms,
                           encoded_payload)
    else:  # inline, not a helper: requests and fan-outs take this branch, and a call costs them
        body = _encode(Message(
            id=id, sender=sender, type=type, timestamp=iso_ms(now_ms),  # type: ignore[arg-type]
            to=recipients if broadcast_pattern is not None or not isinstance(to, str) else to,
            payload=msgspec.Raw(encoded_payload),  # type: ignore[arg-type]
            headers=Headers(
                priority=priority, ttl=ttl, requires_ack=requires_ack,
                correlation_id=UNSET if correlation_id is None else correlation_id,
                broadcast_pattern=UNSET if broadcast_pattern is None else broadcast_pattern,
                direct_reply=True if direct_reply else UNSET),
        ))
    if not fits(len(body), max_payload_bytes):  # a receiver with this limit would refuse it
        raise _too_large(prefix, len(recipients), len(body), max_payload_bytes)
    return Outgoing(id, sender, recipients, type, priority, ttl, requires_ack, correlation_id,
                    body, caller_id, delivered)


def _refuse_headers(
    prefix: str, type: str, priority: Any, ttl: Any, requires_ack: Any, correlation_id: Any
) -> None:
    """Raise the error for the first of a message's type and headers that breaks its rule
    (prepare() calls this only when one does)."""
    if type not in MESSAGE_TYPES:
        raise ValidationError(
            f"{prefix}type: expected one of {', '.join(get_args(MessageType))}, got {type!r}",
            field=f"{prefix}type",
        )
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


def _recipients(to: object, prefix: str, may_be_empty: bool) -> list[str]:
    """The checked recipients of a ``to`` that is not a known agent id: a new one, or a list
    (deduplicated, in order; empty only when ``may_be_empty``)."""
    if isinstance(to, str):
        return [check_agent_id(to, f"{prefix}to")]
    if not isinstance(to, (list, tuple)):
        raise ValidationError(f"{prefix}to: expected str or list of str, got {builtin_type(to)}",
                              field=f"{prefix}to")
    recipients = []
    seen: set[str] = set()  # a set: the list's `in` would cost the square of its length
    for index, agent in enumerate(to):
        check_agent_id(agent, f"{prefix}to[{index}]")
        if agent not in seen:
            seen.add(agent)
            recipients.append(agent)
    if not recipients and not may_be_empty:
        raise ValidationError(f"{prefix}to: expected at least one agent id, got an empty list",
                              field=f"{prefix}to")
    return recipients


def _too_large(prefix: str, recipients: int, length: int, max_payload_bytes: int) -> Exception:
    return PayloadTooLargeError(
        f"{prefix}to: the message with its {recipients} recipient(s) and headers is "
        f"{length} bytes, more than max_payload_bytes={max_payload_bytes} plus "
        f"{ENVELOPE_ALLOWANCE} bytes for the envelope", field=f"{prefix}to",
    )


# (sender, to, type, priority, ttl, requires_ack) -> the message's JSON around its id,
# timestamp and payload: a body is then three joins, about a third of the cost of building
# two structs and encoding them (docs/design.md).
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
    """:func:`prepare` for a ``publish_many`` batch of the commonest messages, in one loop that
    makes no Outgoing (about 40% cheaper per message, docs/design.md): each item a dict of
    :data:`_PLAIN_KEYS` to one known agent id, of a type without a typed payload, with a dict
    payload. None when any item is anything else or anything wrong: the caller then prepares
    each item with prepare(), which accepts it or says what is wrong.

    The batch shares one timestamp, so its ids share their ``msg-<ms>-`` prefix and its
    bodies their ISO timestamp."""
    stamp = iso_ms(now_ms).encode()
    is_plain, known, untyped = _PLAIN_KEYS.issuperset, _known_agent_ids, _UNTYPED
    runs: list[PlainRun] = []
    ids: list[str] = []
    bodies: list[bytes] = []
    head = tail = b""
    # The headers of the item before, once checked: items that share them (the same objects,
    # as a batch built in a loop has) skip the checks. Identity, not equality: 1 == True.
    last_to = last_type = last_priority = last_ttl = last_ack = _NOTHING
    for item, id in zip(items, new_message_ids(now_ms, len(items)), strict=True):
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
