"""What every backend's wake-up shares: the tag naming an agent in a ring, what woke a wait,
and the fallback poll. The machinery itself is the backend's (:mod:`sqlbus.sqlite.wakeup`:
doorbells; :mod:`sqlbus.postgres.wakeup`: LISTEN/NOTIFY)."""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["ANY", "RUNG", "CHANGED", "FALLBACK", "MAX_TAGS", "agent_tag"]

FALLBACK = 0.5  # seconds: the longest a waiter sleeps without re-checking the database
MAX_TAGS = 64  # more recipients than this in one commit: ring "anything changed" instead

ANY: Any = None  # interest of a waiter that wakes on every ring (state watch, run loops)
# What woke a wait (0: its time ran out): a ring that named the agent waited for, or anything
# else (a ring for "anything may have changed", a commit seen by the check, the bus closing).
RUNG, CHANGED = 2, 1

_tags: dict[str, bytes] = {}


def agent_tag(agent_id: str) -> bytes:
    """The 4-byte tag of an agent in a ring (a hash: the id itself never leaves the process)."""
    tag = _tags.get(agent_id)
    if tag is None:
        if len(_tags) > 100_000:
            _tags.clear()
        tag = _tags[agent_id] = zlib.crc32(agent_id.encode()).to_bytes(4, "little")
    return tag
