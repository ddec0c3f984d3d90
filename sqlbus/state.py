"""Versioned shared state: one JSON value per key, with a version that goes 1, 2, 3, ...

>>> v = bus.state.set("plan", {"steps": 3})          # doctest: +SKIP
>>> bus.state.get("plan").version                   # doctest: +SKIP
1
>>> alice.state.update("counter", lambda old: (old or 0) + 1)   # doctest: +SKIP

Every write is one short transaction that also logs the change (``state_log``, read by
``watch``) and, unless ``notify=False``, sends a ``state_change`` message in the same
transaction. ``update`` runs the caller's function outside any transaction and writes with a
compare-and-set, retrying on conflict, so no lock is held while user code runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from .arguments import check_limit
from .encoding import check_agent_id, check_text, encode_json_value
from .engine import Looked
from .errors import ValidationError, VersionConflictError
from .messages import iso_ms
from .writes import publish_in

if TYPE_CHECKING:
    from .bus import Bus
    from .engine import Engine, Tx

T = TypeVar("T")

__all__ = ["StateEntry", "StateStore", "SYSTEM_SENDER"]

# The sender of state_change messages written through ``bus.state`` (no agent).
SYSTEM_SENDER = "sqlbus"


class StateEntry(msgspec.Struct, kw_only=True):
    """One version of a key. ``updated_at`` is ISO 8601 UTC; ``deleted`` only in watch streams."""

    key: str
    value: Any
    version: int
    updated_by: str | None
    updated_at: str
    deleted: bool = False


def entry_from_row(row: tuple[Any, ...]) -> StateEntry:
    key, value, version, deleted, updated_by, updated_at = row
    return StateEntry(
        key=key,
        value=None if deleted else msgspec.json.decode(value),
        version=version,
        updated_by=updated_by,
        updated_at=iso_ms(updated_at),
        deleted=bool(deleted),
    )


def check_key(key: object) -> str:
    if type(key) is not str or not 1 <= len(key) <= 512:
        got = key[:50] if type(key) is str else key
        raise ValidationError(f"state key: expected a str of 1..512 characters, got {got!r}",
                              field="state key")
    # NUL: SQLite's length() ends a text at it, which would make prefixes match wrongly; a
    # lone surrogate has no UTF-8 form to store.
    return check_text(key, "state key", 512)


def check_prefix(prefix: object) -> str:
    """A key prefix: like a key, but may be empty (every key)."""
    if type(prefix) is not str:
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return check_text(prefix, "prefix", 512, empty=True)


def check_subscribers(subscribers: object) -> list[str] | None:
    """``subscribers`` as a list of agent ids (``[]``: nobody), or None (every interested agent)."""
    if subscribers is None:
        return None
    if isinstance(subscribers, (str, bytes)) or not hasattr(subscribers, "__iter__"):
        raise ValidationError(
            f"subscribers: expected a list of agent ids, got {type(subscribers).__name__}",
            field="subscribers")
    return [check_agent_id(agent, f"subscribers[{i}]") for i, agent in enumerate(subscribers)]


def write_version(
    tx: Tx,
    key: str,
    value_json: bytes | None,
    expected_version: int | None,
    updated_by: str | None,
    now: int,
) -> int:
    """Write the next version of ``key`` (``value_json=None`` deletes) inside the caller's
    transaction, checking ``expected_version`` (0 = must be absent); returns the new version."""
    row = tx.storage.lock_state(tx.conn, key)
    current = 0 if row is None or row.deleted else row.version
    if expected_version is not None and expected_version != current:
        raise VersionConflictError(
            f"state {key!r}: expected version {expected_version}, found {current}"
            + (" (absent)" if current == 0 else "")
        )
    if value_json is None and current == 0:
        return 0  # deleting an absent key changes nothing
    version = (row.version if row is not None else 0) + 1
    tx.storage.put_state(tx.conn, key, value_json or b"null", version, value_json is None, updated_by, now)
    return version


class StateStore:
    """Shared state seen through one agent (``updated_by``), or through the bus (``None``).

    ``subscribers`` (agent ids) receive the ``state_change`` message; when omitted it goes to
    every agent but the writer with an interest in ``state_change`` or ``*`` (``subscribe``).
    ``include_value=True`` puts the new value in the message as ``full_value``.
    """

    def __init__(
        self,
        bus: Bus,
        updated_by: str | None,
        run: Callable[..., Any] | None = None,
    ):
        self._bus = bus
        self._updated_by = updated_by
        # Set inside agent.transaction(): Transaction._run runs a call in the caller's
        # transaction (fn(tx, ...)) and refuses a transaction that ended.
        self._run = run

    def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._run is not None:
            return cast(T, self._run(lambda tx, *args: fn(tx.conn, *args), *args))
        with self._bus.engine.reading() as conn:
            return fn(conn, *args)

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> StateEntry | None:
        """The latest version of ``key``, or None when it is absent (or deleted)."""
        check_key(key)
        row = self._read(self._bus.engine.storage.get_state, key)
        return None if row is None or row.deleted else entry_from_row(row)

    def keys(self, prefix: str = "") -> list[str]:
        """Live keys that start with ``prefix``, sorted."""
        check_prefix(prefix)
        return self._read(self._bus.engine.storage.state_keys, prefix)

    def items(self, prefix: str = "") -> list[StateEntry]:
        """Live entries whose key starts with ``prefix``, sorted by key."""
        check_prefix(prefix)
        state_entries = self._bus.engine.storage.state_entries
        return self._read(
            lambda conn: [entry_from_row(row) for row in state_entries(conn, prefix)]
        )

    def history(self, key: str, limit: int = 20) -> list[StateEntry]:
        """``key``'s recent versions, newest first, from the change log (kept as long as the
        archive retention keeps acked messages); a delete shows as ``deleted=True``.

        >>> [(e.version, e.value) for e in bus.state.history("config")]   # doctest: +SKIP
        """
        check_key(key)
        check_limit(limit)
        state_history = self._bus.engine.storage.state_history
        return self._read(
            lambda conn: [entry_from_row(row[1:]) for row in state_history(conn, key, limit)]
        )

    # -- writes --------------------------------------------------------------------------

    def set(
        self,
        key: str,
        value: Any,
        *,
        expected_version: int | None = None,
        notify: bool = True,
        subscribers: list[str] | None = None,
        include_value: bool = False,
    ) -> int:
        """Write ``value`` (any JSON value) as the next version of ``key``; returns the version.

        ``expected_version=N`` writes only if the current version is N (0 = absent) and
        raises :class:`VersionConflictError` otherwise.
        """
        check_key(key)
        value_json = encode_json_value(value, self._bus.max_payload_bytes, "value")
        return self._write(key, value_json, expected_version, notify, subscribers, include_value)

    def delete(
        self,
        key: str,
        *,
        expected_version: int | None = None,
        notify: bool = True,
        subscribers: list[str] | None = None,
    ) -> int:
        """Delete ``key``; returns the version of the deletion (0 when it was absent)."""
        check_key(key)
        return self._write(key, None, expected_version, notify, subscribers, False)

    def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        notify: bool = True,
        subscribers: list[str] | None = None,
        include_value: bool = False,
        max_tries: int = 1000,
    ) -> int:
        """Atomically replace the value with ``fn(old_value)`` (``old`` is None when absent).

        ``fn`` runs outside any transaction and may run more than once: the write is a
        compare-and-set that retries when another writer got in first.
        """
        check_key(key)
        for _ in range(max_tries):
            entry = self.get(key)
            version = 0 if entry is None else entry.version
            new_value = fn(None if entry is None else entry.value)
            value_json = encode_json_value(new_value, self._bus.max_payload_bytes, "value")
            try:
                return self._write(key, value_json, version, notify, subscribers, include_value)
            except VersionConflictError:
                continue
        raise VersionConflictError(f"state {key!r}: update lost the race {max_tries} times")

    def _write(
        self,
        key: str,
        value_json: bytes | None,
        expected_version: int | None,
        notify: bool,
        subscribers: list[str] | None,
        include_value: bool,
    ) -> int:
        op = StateWrite(
            self._bus, self._updated_by, key, value_json, expected_version, notify, subscribers,
            include_value,
        )
        if self._run is not None:
            return cast(int, self._run(op.write, self._bus.engine.now_ms()))
        now = self._bus.engine.now_ms()
        return self._bus.engine.grouped(lambda tx: op.write(tx, now))

    def watch(self, prefix: str = "", *, poll: float = 1.0) -> Iterator[StateEntry]:
        """Yield the current entries under ``prefix`` (by key), then every later change.

        See :mod:`sqlbus.watch`; this is the blocking iterator form.
        """
        return watch_state(self._bus.engine, prefix, poll=poll)


class StateWrite:
    """One pending state write; runs inside a transaction (now, or at a delivery's ack)."""

    __slots__ = (
        "bus", "updated_by", "key", "value_json", "expected_version", "notify", "subscribers",
        "include_value", "_notice",
    )

    def __init__(
        self,
        bus: Bus,
        updated_by: str | None,
        key: str,
        value_json: bytes | None,
        expected_version: int | None,
        notify: bool,
        subscribers: list[str] | None,
        include_value: bool,
    ) -> None:
        if expected_version is not None and (
            type(expected_version) is not int or expected_version < 0
        ):
            raise ValueError(f"expected_version must be an int >= 0, got {expected_version!r}")
        self.bus = bus
        self.updated_by = updated_by
        self.key = key
        self.value_json = value_json
        self.expected_version = expected_version
        self.notify = notify
        self.subscribers = check_subscribers(subscribers)
        self.include_value = include_value

    def write(self, tx: Tx, now: int) -> int:
        version = write_version(
            tx, self.key, self.value_json, self.expected_version, self.updated_by, now
        )
        if version and self.notify and self.subscribers != []:  # [] = nobody
            payload: dict[str, Any] = {
                "key": self.key,
                "version": version,
                "updated_by": self.updated_by,
                "updated_at": iso_ms(now),
            }
            if self.value_json is None:
                payload["deleted"] = True
            if self.include_value:
                payload["full_value"] = (
                    None if self.value_json is None else msgspec.json.decode(self.value_json)
                )
            sender = self.updated_by or SYSTEM_SENDER
            publish_in(self.bus.max_payload_bytes, tx, now, sender, self.subscribers, "state_change",
                       payload)
        return version


# ---------------------------------------------------------------------------------------------
# Watch: the current entries under a key prefix, then every change, in order.
#
# >>> for entry in bus.state.watch("job/"):                   # doctest: +SKIP
# ...     print(entry.key, entry.version, entry.deleted, entry.value)
#
# Like a NATS KV watch. The snapshot is taken when iteration starts, in one read transaction
# together with the position in ``state_log``, so the changes that follow are exactly those
# committed after the snapshot: none missed, none repeated. Changes come from ``state_log`` in
# commit order, by any process; a delete is an entry with ``deleted=True`` (value None) and the
# next version. Between changes the iterator sleeps on the bus's wake-up (sqlbus.sqlite.wakeup): a
# commit by any process wakes it at once, and it looks again at least every ``poll`` seconds.


_BATCH = 1000  # log rows read per query


def check_poll(poll: object) -> float:
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not poll > 0:
        raise ValueError(f"poll must be a number of seconds > 0, got {poll!r}")
    return float(poll)


class Watch:
    """The position of one watch: take the snapshot, then read the changes after it.

    The blocking iterator (:func:`watch_state`) and the asyncio one (``sqlbus.aio``) share it;
    each call is a short read, so either can run it where it likes (a thread, the loop's
    executor).
    """

    def __init__(self, engine: Engine, prefix: str) -> None:
        self.engine = engine
        self.prefix = check_prefix(prefix)
        self.after: int | None = None  # state_log seq of the last change seen

    def snapshot(self) -> list[StateEntry]:
        """The live entries under the prefix, by key; later changes follow from here."""
        with self.engine.reading() as conn:
            rows, head = self.engine.storage.state_snapshot(conn, self.prefix)
        self.after = head
        return [entry_from_row(row) for row in rows]

    def changes(self) -> list[StateEntry]:
        """Changes committed since the last call (or the snapshot), in commit order."""
        if self.after is None:
            raise RuntimeError("take the snapshot first")
        with self.engine.reading() as conn:
            rows = self.engine.storage.state_log_after(conn, self.prefix, self.after, _BATCH)
        if rows:
            self.after = rows[-1].seq
        return [entry_from_row(row[1:]) for row in rows]


def watch_state(engine: Engine, prefix: str = "", *, poll: float = 1.0) -> Iterator[StateEntry]:
    """Yield the entries under ``prefix`` (sorted by key), then every later change in commit
    order, blocking between changes; ``poll`` (seconds) is the longest it goes without looking.

    The snapshot is taken when iteration starts (the first ``next()``), not when this is
    called. Stop by breaking out of the loop (or closing the generator).
    """
    check_prefix(prefix)
    poll = check_poll(poll)
    return _watch(engine, prefix, poll)


def _watch(engine: Engine, prefix: str, poll: float) -> Iterator[StateEntry]:
    watch = Watch(engine, prefix)
    yield from watch.snapshot()

    def look(rung: bool) -> Looked:
        token = engine.change_token()  # before the look: a commit after it wakes the wait
        return Looked(watch.changes(), token)

    while True:
        yield from engine.wait_until(look, poll)
