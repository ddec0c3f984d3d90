"""The one error hierarchy of sqlbus, plus the two control-flow signals handlers may raise.

Every error sqlbus raises on purpose is a :class:`SqlbusError`; a wrapped cause is chained
(``raise ... from exc``). ``Retry`` and ``Discard`` are not errors: a handler raises them to
steer what happens to the message it is processing.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SqlbusError",
    "ValidationError",
    "PayloadTooLargeError",
    "DatabaseError",
    "LeaseLostError",
    "VersionConflictError",
    "NotFoundError",
    "RequestTimeoutError",
    "RemoteError",
    "AuthenticationError",
    "Retry",
    "Discard",
]


# The longest duration accepted anywhere, in seconds (~31,700 years): times are stored as epoch
# ms in 64-bit integers, which a larger or infinite value would overflow.
MAX_SECONDS = 10**12


class SqlbusError(Exception):
    """Base class of every error sqlbus raises on purpose."""


class ValidationError(SqlbusError, ValueError):
    """A message or argument broke a rule; the text names the field (``.field``) and the rule."""

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        if field is None:  # raised without one (a handler's own): the text before its first ": "
            head, sep, _ = str(message).partition(": ")
            field = head if sep else ""
        self.field = field
        """The path the text names: ``headers.priority``, ``[3].to``, ``payload.items[2]``."""

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only field: pickled as state, or a copy would parse it from the text again
        return (type(self), self.args, {"field": self.field})


class PayloadTooLargeError(ValidationError):
    """The encoded payload is larger than the bus's ``max_payload_bytes``."""


class DatabaseError(SqlbusError):
    """The database file is unusable (foreign, corrupt, newer schema, full) or stayed locked."""


class LeaseLostError(SqlbusError):
    """The delivery's lease ran out and the message was claimed again (or is gone)."""


class VersionConflictError(SqlbusError):
    """A compare-and-set on shared state found another version than the one expected."""


class NotFoundError(SqlbusError, KeyError):
    """A reference (a dead-letter number, a message id) names nothing."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quoted): ours is a plain sentence.
        return str(self.args[0]) if self.args else ""


class RequestTimeoutError(SqlbusError, TimeoutError):
    """No response arrived before the request's timeout."""


class RemoteError(SqlbusError):
    """The agent that handled a request answered with a failure: ``bob: ZeroDivisionError: ...``."""

    def __init__(self, agent: str, error_type: str, error: str) -> None:
        # all three in args, so the error pickles (a process pool) and compares like any other
        super().__init__(agent, error_type, error)
        self.agent = agent
        self.error_type = error_type
        self.error = error

    def __str__(self) -> str:
        return f"{self.agent}: {self.error_type}: {self.error}"


class AuthenticationError(SqlbusError):
    """A caller was not allowed to do what it asked; never retried when raised by a handler."""


class Retry(Exception):
    """Signal from a handler: put the message back, to be delivered again after ``delay`` seconds.

    ``delay=None`` uses the bus's exponential backoff. A retry is not counted as a failure in
    the error rates, but it is a delivery attempt, so ``max_attempts`` still bounds it.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None:
            # Refused here, in the handler that raises it, so that a bad delay is the handler's
            # failure and never reaches (and stops) the run loop.
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                raise TypeError(f"Retry delay must be a number of seconds, got {type(delay).__name__}")
            if not 0 <= delay <= MAX_SECONDS:  # False for NaN too
                raise ValueError(
                    f"Retry delay must be a finite number of seconds in 0..{MAX_SECONDS}, "
                    f"got {delay!r}"
                )
        super().__init__(delay)
        self.delay = delay


class Discard(Exception):
    """Signal from a handler: move the message to dead letters now, with ``reason``."""

    def __init__(self, reason: str = "discarded") -> None:
        if type(reason) is not str or not reason:
            raise ValueError(f"Discard reason must be a non-empty str, got {reason!r}")
        super().__init__(reason)
        self.reason = reason
