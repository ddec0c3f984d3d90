"""Watch shared state: the current entries under a key prefix, then every change, in order.

>>> for entry in bus.state.watch("job/"):                   # doctest: +SKIP
...     print(entry.key, entry.version, entry.deleted, entry.value)

Like a NATS KV watch. The snapshot is taken when iteration starts, in one read transaction
together with the position in ``state_log``, so the changes that follow are exactly those
committed after the snapshot: none missed, none repeated. Changes come from ``state_log`` in
commit order, by any process; a delete is an entry with ``deleted=True`` (value None) and the
next version. Between changes the iterator sleeps on the bus's wake-up (sqlbus.wakeup): a
commit by any process wakes it at once, and it looks again at least every ``poll`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import storage
from .state import StateEntry, check_prefix, entry_from_row

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["watch_state", "Watch"]

_BATCH = 1000  # log rows read per query


def _check_prefix(prefix: object) -> str:
    return check_prefix(prefix)


def _check_poll(poll: object) -> float:
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not poll > 0:
        raise ValueError(f"poll must be a number of seconds > 0, got {poll!r}")
    return float(poll)


class Watch:
    """The position of one watch: take the snapshot, then read the changes after it.

    The blocking iterator (:func:`watch_state`) and the asyncio one (``sqlbus.aio``) share it;
    each call is a short read, so either can run it where it likes (a thread, the loop's
    executor).
    """

    def __init__(self, bus: Bus, prefix: str) -> None:
        self.bus = bus
        self.prefix = _check_prefix(prefix)
        self.after: int | None = None  # state_log seq of the last change seen

    def snapshot(self) -> list[StateEntry]:
        """The live entries under the prefix, by key; later changes follow from here."""
        with self.bus._reading() as conn:
            rows, head = storage.state_snapshot(conn, self.prefix)
        self.after = head
        return [entry_from_row(row) for row in rows]

    def changes(self) -> list[StateEntry]:
        """Changes committed since the last call (or the snapshot), in commit order."""
        if self.after is None:
            raise RuntimeError("take the snapshot first")
        with self.bus._reading() as conn:
            rows = storage.state_log_after(conn, self.prefix, self.after, _BATCH)
        if rows:
            self.after = rows[-1][0]
        return [entry_from_row(row[1:]) for row in rows]


def watch_state(bus: Bus, prefix: str = "", *, poll: float = 1.0) -> Iterator[StateEntry]:
    """Yield the entries under ``prefix`` (sorted by key), then every later change in commit
    order, blocking between changes; ``poll`` (seconds) is the longest it goes without looking.

    The snapshot is taken when iteration starts (the first ``next()``), not when this is
    called. Stop by breaking out of the loop (or closing the generator).
    """
    _check_prefix(prefix)
    poll = _check_poll(poll)
    return _watch(bus, prefix, poll)


def _watch(bus: Bus, prefix: str, poll: float) -> Iterator[StateEntry]:
    watch = Watch(bus, prefix)
    yield from watch.snapshot()
    while True:
        # data_version before the look: a commit after it is seen by the wait, never lost
        baseline = bus._data_version()
        changes = watch.changes()
        if changes:
            yield from changes
            continue
        bus._wait_for_change(baseline, poll)
