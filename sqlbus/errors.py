"""The one error hierarchy of sqlbus, plus the two control-flow signals handlers may raise.

Every error sqlbus raises on purpose is a :class:`SqlbusError`; a wrapped cause is chained
(``raise ... from exc``). ``Retry`` and ``Discard`` are not errors: a handler raises them to
steer what happens to the message it is processing.
"""

from __future__ import annotations

__all__ = [
    "SqlbusError",
    "ValidationError",
    "PayloadTooLargeError",
    "DatabaseError",
    "LeaseLostError",
    "VersionConflictError",
    "RequestTimeoutError",
    "RemoteError",
    "AuthenticationError",
    "Retry",
    "Discard",
]


class SqlbusError(Exception):
    """Base class of every error sqlbus raises on purpose."""


class ValidationError(SqlbusError, ValueError):
    """A message or argument broke a rule; the text names the field and the rule."""


class PayloadTooLargeError(ValidationError):
    """The encoded payload is larger than the bus's ``max_payload_bytes``."""


class DatabaseError(SqlbusError):
    """The database file is unusable (foreign, corrupt, newer schema, full) or stayed locked."""


class LeaseLostError(SqlbusError):
    """The delivery's lease ran out and the message was claimed again (or is gone)."""


class VersionConflictError(SqlbusError):
    """A compare-and-set on shared state found another version than the one expected."""


class RequestTimeoutError(SqlbusError, TimeoutError):
    """No response arrived before the request's timeout."""


class RemoteError(SqlbusError):
    """The agent that handled a request answered with a failure; the text is its error."""


class AuthenticationError(SqlbusError):
    """A caller was not allowed to do what it asked; never retried when raised by a handler."""


class Retry(Exception):
    """Signal from a handler: put the message back, to be delivered again after ``delay`` seconds.

    ``delay=None`` uses the bus's exponential backoff. A retry is not counted as a failure in
    the error rates, but it is a delivery attempt, so ``max_attempts`` still bounds it.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and delay < 0:
            raise ValueError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        super().__init__(delay)
        self.delay = delay


class Discard(Exception):
    """Signal from a handler: move the message to dead letters now, with ``reason``."""

    def __init__(self, reason: str = "discarded") -> None:
        super().__init__(reason)
        self.reason = reason
