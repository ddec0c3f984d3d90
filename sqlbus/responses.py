"""Responses (SPEC 5.1): the response payload, direct replies that a waiting ``request()``
reads from the archive, and the count of late responses to requests that timed out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .encoding import prepare
from .messages import Message, escape_text
from .writes import Publish

if TYPE_CHECKING:
    from .engine import Tx

type_of = type

# Counter (per requester) of responses that came after their request timed out.
LATE_RESPONSES = "late_responses"


def count_late_responses(tx: Tx, agent: str, count: int, delivery_ms: int) -> None:
    """Count ``count`` late responses to ``agent`` as discarded. Their rows stay in the archive
    as acked, and received/delivery time totals add acked rows to counters: the counters take
    them off again (pruning the rows later adds them back), so they count as late only."""
    tx.storage.add_counters(tx.conn, [
        (LATE_RESPONSES, agent, count), ("received", agent, -count),
        ("delivery_ms", agent, -delivery_ms),
    ])


class DirectReply(Publish):
    """A response to a ``request()`` call, written as delivered: its requester reads it from
    the archive, so it never waits in an inbox and taking it costs no write. When that request
    already timed out, it is counted as a late response (and still archived, never handled)."""

    __slots__ = ()

    def write(self, tx: Tx, now: int) -> str:
        out = self.outgoing
        requester, correlation_id = out.recipients[0], out.correlation_id
        assert correlation_id is not None
        if tx.storage.request_timed_out(tx.conn, requester, correlation_id):
            tx.storage.forget_request_timeout(tx.conn, requester, correlation_id)
            count_late_responses(tx, requester, 1, 0)  # written acked now: 0 ms
        return super().write(tx, now)


def response_payload(
    request: Message, data: Any, success: bool, error: str | None, error_type: str | None = None
) -> tuple[dict[str, Any], str]:
    """The payload and correlation id of the response to ``request`` (SPEC 5.1)."""
    payload: dict[str, Any] = {"success": bool(success), "data": data, "request_id": request.id}
    if not success or error is not None:
        if error is None:
            error = "request failed"
        # recorded text (often an exception's): a lone surrogate is kept escaped
        payload["error"] = escape_text(error) if type_of(error) is str else error
    if error_type is not None and type_of(error_type) is not str:
        raise TypeError(f"error_type must be a str (an exception's name), got {type_of(error_type).__name__}")
    if not success:
        # recorded text, like error: a lone surrogate is kept escaped
        payload["error_type"] = "Error" if error_type is None else escape_text(error_type)
    correlation_id = request.headers.correlation_id
    return payload, correlation_id if isinstance(correlation_id, str) else request.id


def prepare_response(
    max_payload_bytes: int, sender: str, request: Message, data: Any, success: bool, error: str | None, now: int,
    error_type: str | None = None,
) -> Publish:
    """The response to ``request`` (SPEC 5.1), validated; a direct reply when the request
    came from ``request()`` (header ``direct_reply``)."""
    payload, correlation_id = response_payload(request, data, success, error, error_type)
    direct = request.headers.direct_reply is True
    outgoing = prepare(
        sender, request.sender, "response", payload, now_ms=now,
        correlation_id=correlation_id, delivered=direct,
        max_payload_bytes=max_payload_bytes,
    )
    return DirectReply(outgoing, 0) if direct else Publish(outgoing, 0)
