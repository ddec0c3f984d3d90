"""Checks of the arguments every part of the API shares: durations, limits, message types,
and the ``STORED`` default of the retention keywords. A mistake raises ``TypeError`` or
``ValueError`` (``ValidationError`` for message types) before anything is written."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import get_args

from .errors import ValidationError
from .messages import MESSAGE_TYPES, MessageType

# The longest duration accepted anywhere (~31,700 years): times are stored as epoch ms in
# 64-bit integers, and an infinite or larger value would overflow them (OverflowError).
MAX_SECONDS = 10**12


def seconds(value: object, name: str, *, allow_zero: bool = True) -> float:
    """Check a duration in seconds (programmer mistakes raise ValueError/TypeError at once)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if value != value or value < 0 or (not allow_zero and value == 0):
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {rule} seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS} seconds, got {value!r}")
    return float(value)


class Stored(enum.Enum):
    STORED = "STORED"

    def __repr__(self) -> str:
        return "STORED"


#: The default of the retention keywords (``connect``, ``Bus.set_retention``, ``Bus.prune``):
#: the policy stored in the database, left as it is.
STORED = Stored.STORED


def ceil_ms(seconds: float) -> int:
    """``seconds`` in whole ms, rounded up (a delay is never early). Rounded to the microsecond
    first: 0.003 s is 3.0000000000000004 ms as a float, and means 3 ms."""
    return math.ceil(round(seconds * 1000, 3))


def check_limit(limit: object) -> int:
    # The upper bound is SQLite's 64-bit LIMIT (a larger int raised OverflowError).
    if type(limit) is not int or limit < 1 or limit >= 2**63:
        raise ValueError(f"limit must be an int >= 1 (and < 2**63), got {limit!r}")
    return limit




def check_types(types: object) -> list[str]:
    """``types`` (one message type or an iterable of them) as a list of known message types."""
    if not isinstance(types, (str, Iterable)):
        raise TypeError(f"types must be a message type or a list of them, got {type(types).__name__}")
    names = [types] if isinstance(types, str) else list(types)
    for name in names:
        if name not in MESSAGE_TYPES:
            raise ValidationError(f"types: unknown message type {name!r}, expected one of "
                                  f"{', '.join(get_args(MessageType))}", field="types")
    return names
