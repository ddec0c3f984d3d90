"""Metrics: totals, rates, queue depths and per-agent stats, read from the rows of the
database, and their Prometheus and OpenMetrics text formats.

>>> m = bus.metrics()                                  # doctest: +SKIP
>>> m.messages_sent, m.queue_depths["bob"].ready, m.throughput.per_minute   # doctest: +SKIP
>>> print(to_prometheus(m))                            # doctest: +SKIP

Everything here is read from the database file (SPEC 8: shared by every process), never from
one process's memory, and nothing on the publish/claim/ack path writes a counter: an extra
B-tree page per commit would cost a large share of single-message throughput
(docs/design.md). The CLI (:mod:`sqlbus.cli`) prints what :meth:`sqlbus.Bus.metrics` returns.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import apsw
import msgspec

from .backend import ACKED, AckedRow, CounterRow
from .messages import iso_ms
from .sqlite import storage as sqlite_storage

if TYPE_CHECKING:
    from .backend import Storage
    from .bus import Bus

__all__ = [
    "Metrics",
    "Throughput",
    "QueueDepth",
    "AgentActivity",
    "AgentStats",
    # reading metrics again at the cost of what changed (a dashboard, a /metrics route)
    "MetricsFollower",
    "FollowRead",
    "to_prometheus",
    "to_openmetrics",
]


class Throughput(msgspec.Struct, kw_only=True):
    """Acked deliveries in the last second (``per_second``) and the last minute (``per_minute``)."""

    per_second: float
    per_minute: float


class QueueDepth(msgspec.Struct, kw_only=True):
    """One agent's inbox (SPEC 4.2): ``ready`` to claim now (due retries included),
    ``leased`` (in flight), ``retrying`` (waiting for its backoff), ``scheduled`` (a delayed
    publish, not yet due), ``expired`` (never delivered again, not yet moved to dead letters),
    ``dead`` (dead letters kept)."""

    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int


class AgentActivity(msgspec.Struct, kw_only=True):
    """Messages an agent ``sent`` (one per id) and deliveries it ``received`` (acked)."""

    sent: int
    received: int


class Metrics(msgspec.Struct, kw_only=True):
    """Bus-wide metrics (SPEC 8), the same for every process on the file.

    Totals count since the file was made (retention folds what it deletes into them):
    ``messages_sent`` one per message id; ``messages_received`` acked deliveries;
    ``messages_failed`` failures (not ``Retry``), by name in ``error_rates``;
    ``messages_dead_lettered`` every move to dead letters, ``messages_expired`` the part of
    them whose reason is ``expired``; ``messages_unhandled`` and ``late_responses`` as counted
    by the run loop. ``average_delivery_ms``: publish to ack. ``success_rate``: acked /
    (acked + dead-lettered), 1.0 when both are 0. ``oldest_ready_age_ms``: age of the oldest
    message ready to claim (lag), 0 when none. Sizes in bytes; ``timestamp`` ISO 8601 UTC.
    """

    messages_sent: int
    messages_received: int
    messages_failed: int
    messages_dead_lettered: int
    messages_expired: int
    messages_unhandled: int
    late_responses: int
    average_delivery_ms: float
    throughput: Throughput
    error_rates: dict[str, int]
    agent_activity: dict[str, AgentActivity]
    success_rate: float
    queue_depths: dict[str, QueueDepth]
    oldest_ready_age_ms: int
    wal_bytes: int
    db_bytes: int
    timestamp: str


class AgentStats(msgspec.Struct, kw_only=True):
    """One agent's inbox as ``sqlbus stats`` shows it, in the states of :class:`QueueDepth`
    (``oldest_ready_age_ms`` 0 when nothing is ready)."""

    agent: str
    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int
    oldest_ready_age_ms: int


# ---------------------------------------------------------------------------------------------
# Metrics and stats


@contextmanager
def snapshot(storage: Storage[Any], conn: apsw.Connection) -> Iterator[None]:
    """One read transaction, so that every query inside sees the same commit (inside a
    caller's open transaction, that one is already a snapshot)."""
    if storage.in_transaction(conn):
        yield
        return
    storage.begin_read(conn)
    try:
        yield
    finally:
        storage.end_read(conn)


def compute_stats(
    storage: Storage[Any], conn: apsw.Connection, now: int, agents: Iterable[str] = ()
) -> list[AgentStats]:
    """Per-agent depths from the partial indexes (cheap whatever the archive size); call it
    inside :func:`snapshot`."""
    by_agent = {
        agent: AgentStats(agent=agent, ready=0, leased=0, retrying=0, scheduled=0, expired=0,
                          dead=0, oldest_ready_age_ms=0)
        for agent in agents
    }
    for agent, ready, leased, retrying, scheduled, expired, dead, oldest in storage.depth_rows(
        conn, now
    ):
        by_agent[agent] = AgentStats(
            agent=agent, ready=ready, leased=leased, retrying=retrying, scheduled=scheduled,
            expired=expired, dead=dead,
            oldest_ready_age_ms=0 if oldest is None else max(0, now - oldest),
        )
    return [by_agent[agent] for agent in sorted(by_agent)]


def compute_metrics(
    storage: Storage[Any], conn: Any, now: int, sizes: tuple[int, int]
) -> Metrics:
    """Read :class:`Metrics` in one read transaction; ``sizes`` is (database bytes, WAL bytes)."""
    storage.begin_read(conn)  # every query below sees the same commit
    try:
        acked = storage.acked_rows(conn, now)
        sent = storage.sent_rows(conn)
        figures = _read_figures(storage, conn, now)
    finally:
        storage.end_read(conn)
    return _assemble(figures, acked, sent, now, sizes)


class _Figures(NamedTuple):
    """What metrics read besides the archive: cheap whatever its size (partial indexes and
    small tables)."""

    registered: list[str]
    stats: list[AgentStats]
    reasons: dict[str, int]
    errors: dict[str, int]
    counters: list[CounterRow]


def _read_figures(storage: Storage[Any], conn: Any, now: int) -> _Figures:
    registered = storage.agent_ids(conn)
    return _Figures(
        registered, compute_stats(storage, conn, now, registered),
        dict(storage.dead_reason_rows(conn)), dict(storage.error_count_rows(conn)),
        storage.read_counters(conn),
    )


def _assemble(
    figures: _Figures, acked: Iterable[AckedRow], sent: Iterable[tuple[str, int]], now: int,
    sizes: tuple[int, int],
) -> Metrics:
    """:class:`Metrics` from what one snapshot read: the figures, and per recipient its acked
    rows still kept (``acked``), per sender its messages still kept (``sent``)."""
    registered, stats, reasons, errors, counters = figures

    def total(name: str) -> int:
        return sum(value for n, _agent, value in counters if n == name)

    def per_agent(name: str) -> dict[str, int]:
        result: dict[str, int] = {}
        for n, agent, value in counters:
            if n == name and agent:
                result[agent] = result.get(agent, 0) + value
        return result

    sent_by = per_agent("sent")
    for sender, count in sent:
        sent_by[sender] = sent_by.get(sender, 0) + count
    received_by = per_agent("received")
    delivery_ms = total("delivery_ms")
    last_second = last_minute = 0
    for agent, count, ms, second, minute in acked:
        received_by[agent] = received_by.get(agent, 0) + count
        delivery_ms += ms or 0
        last_second += second or 0
        last_minute += minute or 0
    received = sum(received_by.values())
    dead = sum(s.dead for s in stats) + total("dead")
    names = set(registered) | set(sent_by) | set(received_by)
    db_bytes, wal_bytes = sizes
    return Metrics(
        messages_sent=sum(sent_by.values()),
        messages_received=received,
        messages_failed=sum(errors.values()),
        messages_dead_lettered=dead,
        # expired from the moment they expire: those still in an inbox count too
        messages_expired=reasons.get("expired", 0) + total("expired") + sum(s.expired for s in stats),
        messages_unhandled=total("unhandled"),
        late_responses=total("late_responses"),
        average_delivery_ms=round(delivery_ms / received, 3) if received else 0.0,
        throughput=Throughput(per_second=float(last_second), per_minute=float(last_minute)),
        error_rates=errors,
        agent_activity={
            name: AgentActivity(sent=sent_by.get(name, 0), received=received_by.get(name, 0))
            for name in sorted(names)
        },
        success_rate=received / (received + dead) if received + dead else 1.0,
        queue_depths={
            s.agent: QueueDepth(ready=s.ready, leased=s.leased, retrying=s.retrying,
                                scheduled=s.scheduled, expired=s.expired, dead=s.dead)
            for s in stats
        },
        oldest_ready_age_ms=max((s.oldest_ready_age_ms for s in stats), default=0),
        wal_bytes=wal_bytes,
        db_bytes=db_bytes,
        timestamp=iso_ms(now),
    )


# ---------------------------------------------------------------------------------------------
# Following the metrics: what bus.metrics() returns, read again at the cost of what changed

_MINUTE_MS = 60_000
_LAST = 1 << 62  # above every position: (t, _LAST) sorts after every (t, seq)
# Counters whose growth since the last read says which rows counted then were deleted since.
_FOLDED = ("received", "delivery_ms", "late_responses", "sent")


class FollowRead(NamedTuple):
    """What one :meth:`MetricsFollower.read` looked at: ``full`` when it scanned the whole
    message table (the first read, PostgreSQL, or a change it cannot follow row by row), and
    ``rows`` the message rows it fetched by position otherwise: the new rows, the rows not
    acked at the previous read that are no longer queued, waiting or dead, and the acks of the
    last minute looked up again after a prune (0: nothing was committed since)."""

    full: bool
    rows: int


class MetricsFollower:
    """:meth:`sqlbus.Bus.metrics`, read again and again at the cost of what changed since the
    previous read instead of a scan of the whole archive: for a dashboard that samples metrics
    every second, or a Prometheus route.

    >>> follower = MetricsFollower(bus)              # doctest: +SKIP
    >>> m = follower.read()                          # the first read scans, as bus.metrics()
    >>> m = follower.read()                          # later ones read the changes only

    Every :meth:`read` returns exactly what ``bus.metrics()`` would return at that moment (the
    same :class:`Metrics`, every figure), read from the database in one snapshot: the writes
    of every process count, and nothing is added to the publish, claim or ack path.

    How (SQLite): totals are the ``counters`` table (what retention folded in when it deleted
    rows) plus aggregates over the rows still kept. The follower keeps those aggregates in
    memory (per recipient: acked rows and their publish-to-ack ms; per sender: messages; the
    ack times of the last minute) with the top position it has read and the positions of the
    rows that were not acked then (queued, leased, scheduled, dead: a dead letter can be
    requeued and acked). A read fetches the rows above that top (positions are given in
    commit order, never reused), walks the partial indexes for the rows still not acked and
    fetches by position those of its not-acked rows that are not among them (acked or deleted
    since), and reads the counters; rows deleted since moved their counts into the counters,
    so the counters' growth is taken off the aggregates. Acked rows never change again, and
    only retention's fold (``fold_retired``) and the count of late responses
    (``count_late_responses``) change those counters. When nothing was committed since the
    previous read, it reads only what depends on the clock (depths, the throughput windows).

    A read scans the whole table again, in the same snapshot, when it cannot tell the changes
    apart row by row: a row published after the previous read was deleted before this one, a
    recipient both lost rows that were acked at the previous read and had a not-acked row
    deleted (or a late response counted), or the clock went back. On PostgreSQL every read is
    a full :meth:`sqlbus.Bus.metrics` read: positions there are not in commit order (a row
    numbered below the top can commit after a read), so the rows above a position are not
    the rows committed since.

    Memory: a few numbers per agent, one entry per row not acked (the backlog and dead
    letters) and one per ack of the last minute. Thread-safe (reads take turns).
    """

    def __init__(self, bus: Bus) -> None:
        self._engine = bus.engine
        self._lock = threading.Lock()
        self._top = -1  # the highest position read (-1: nothing read yet)
        self._now = 0  # the time of the previous read, ms
        self._pending: dict[int, str | None] = {}  # rows not acked: seq -> recipient
        self._seen: tuple[Any, int, int] | None = None  # (connection, data_version, total_changes)
        self._acked: dict[str, list[int]] = {}  # recipient -> [acked rows kept, their ms]
        self._sent: dict[str, int] = {}  # sender -> messages with a row kept
        # per recipient, (done_at, seq) of its acks of the last minute, in order
        self._recent: dict[str, list[tuple[int, int]]] = {}
        self._counters: dict[tuple[str, str], int] = {}
        self.last_read = FollowRead(full=True, rows=0)

    def read(self) -> Metrics:
        """The bus's :class:`Metrics` now (as :meth:`sqlbus.Bus.metrics`)."""
        engine = self._engine
        storage = engine.storage
        sizes = engine.sizes()
        with self._lock, engine.reading() as conn:
            now = engine.now_ms()
            if storage is not sqlite_storage:
                self.last_read = FollowRead(full=True, rows=0)
                return compute_metrics(storage, conn, now, sizes)
            # Read before the snapshot is taken: when the same numbers come back next time,
            # nothing was committed in between (by another connection, or by this one).
            seen = (conn, storage.data_version(conn), conn.total_changes())
            storage.begin_read(conn)  # every query below sees the same commit
            try:
                figures = _read_figures(storage, conn, now)
                counters = {(name, agent): value for name, agent, value in figures.counters}
                if seen == self._seen and now >= self._now and counters == self._counters:
                    self.last_read = FollowRead(full=False, rows=0)
                elif self._top < 0 or now < self._now or not self._follow(conn, now, counters):
                    self._start(conn, now, counters)
                self._seen = seen
            except BaseException:
                self._top, self._seen = -1, None  # half-updated: the next read starts again
                raise
            finally:
                storage.end_read(conn)
            self._now = now
            return _assemble(figures, self._acked_rows(now), self._sent.items(), now, sizes)

    def _start(self, conn: apsw.Connection, now: int, counters: dict[tuple[str, str], int]) -> None:
        """Read the aggregates from a scan of the whole table (in the caller's snapshot)."""
        s = sqlite_storage
        self._top = s.follow_top(conn)
        self._acked, self._recent = {}, {}
        for agent, count, ms, recent in s.acked_summary(conn, now - _MINUTE_MS):
            self._acked[agent] = [count, ms]
            self._recent[agent] = sorted((done_at, seq) for seq, done_at in json.loads(recent))
        self._sent = {sender: count for sender, count in s.sent_rows(conn)}
        self._pending = dict(s.unacked_positions(conn))
        self._counters = counters
        self.last_read = FollowRead(full=True, rows=0)

    def _follow(self, conn: apsw.Connection, now: int, counters: dict[tuple[str, str], int]) -> bool:
        """Bring the aggregates to this snapshot from the rows that changed; False (nothing
        changed in memory) when the changes cannot be told apart row by row."""
        s = sqlite_storage
        top = s.follow_top(conn)
        new = s.rows_since(conn, self._top)
        if len(new) != top - self._top:
            return False  # a row published after the previous read was deleted before this one
        new_ids = {(sender, message_id) for _seq, _agent, sender, message_id, *_ in new}
        if new_ids and s.messages_before(conn, [m for _s, m in new_ids], self._top):
            return False  # rows added to a message that had rows before (never, by publish)
        # The rows not acked at the previous read that are not queued, waiting or dead now
        # (the partial indexes say which are) were acked or deleted since: read those.
        unacked = s.unacked_seqs(conn)
        known = s.rows_at(conn, [seq for seq in self._pending if seq not in unacked])
        present = unacked | {row[0] for row in known}
        vanished = [seq for seq in self._pending if seq not in present]
        vanished_agents = {self._pending[seq] for seq in vanished}

        folded = self._folded(counters, vanished_agents)
        if folded is None:
            return False
        retired, sent_gone = folded
        checked = 0
        if retired:  # acks of the last minute among the deleted rows leave the throughput
            looked = [seq for agent in retired for _done, seq in self._recent.get(agent, ())]
            checked = len(looked)
            kept = {row[0] for row in s.rows_at(conn, looked)}
            for agent in retired:
                if agent in self._recent:
                    self._recent[agent] = [r for r in self._recent[agent] if r[1] in kept]

        # From here on the changes are known row by row: apply them.
        for recipient, (rows, ms) in retired.items():
            self._acked[recipient][0] -= rows
            self._acked[recipient][1] -= ms
        for sender, gone in sent_gone.items():
            self._sent[sender] -= gone
        for seq in vanished:
            del self._pending[seq]
        since = now - _MINUTE_MS
        for seq, row_agent, state, sent_at, done_at in known:
            if state == ACKED:
                del self._pending[seq]
                self._add_acked(seq, row_agent, sent_at, done_at, since)
        for seq, row_agent, _sender, _id, state, sent_at, done_at in new:
            if state == ACKED:
                self._add_acked(seq, row_agent, sent_at, done_at, since)
            else:
                self._pending[seq] = row_agent
        for sender, _id in new_ids:
            self._sent[sender] = self._sent.get(sender, 0) + 1
        self._top = top
        self._counters = counters
        self.last_read = FollowRead(full=False, rows=len(new) + len(known) + checked)
        return True

    def _folded(
        self, counters: dict[tuple[str, str], int], vanished_agents: set[str | None]
    ) -> tuple[dict[str, tuple[int, int]], dict[str, int]] | None:
        """What retention deleted since the previous read of the rows counted then, from the
        counters' growth: per recipient (acked rows, their ms: the received and delivery_ms it
        folded in, less what late responses took off them), per sender the messages gone
        whole; None when that growth cannot be told apart row by row."""

        def grown(name: str, agent: str) -> int:
            return counters.get((name, agent), 0) - self._counters.get((name, agent), 0)

        retired: dict[str, tuple[int, int]] = {}
        sent_gone: dict[str, int] = {}
        for name, agent in set(counters) | set(self._counters):
            if name not in _FOLDED or not grown(name, agent):
                continue
            if name == "sent":
                sent_gone[agent] = grown(name, agent)
                if sent_gone[agent] < 0 or self._sent.get(agent, 0) < sent_gone[agent]:
                    return None
                continue
            late = grown("late_responses", agent)
            rows, ms = grown("received", agent) + late, grown("delivery_ms", agent)
            if rows < 0 or late < 0:
                return None
            if rows == 0:
                if not late and ms:
                    return None  # delivery_ms moved alone: a writer this does not know
                continue  # no row counted before was deleted; late responses are seen acked
            if late or agent in vanished_agents:
                return None  # the fold's rows might be rows this never counted as acked
            count, total_ms = self._acked.get(agent, (0, 0))
            if count < rows or (count == rows and total_ms != ms):
                return None
            retired[agent] = (rows, ms)
        return retired, sent_gone

    def _add_acked(
        self, seq: int, agent: str | None, sent_at: int, done_at: int | None, since: int
    ) -> None:
        if agent is None:  # a broadcast that matched nobody: not a delivery
            return
        entry = self._acked.setdefault(agent, [0, 0])
        entry[0] += 1
        if done_at is not None:
            entry[1] += done_at - sent_at
            if done_at > since:
                recent = self._recent.setdefault(agent, [])
                if not recent or recent[-1] < (done_at, seq):
                    recent.append((done_at, seq))  # acks mostly come in order
                else:
                    bisect.insort(recent, (done_at, seq))

    def _acked_rows(self, now: int) -> list[AckedRow]:
        """Per recipient with acked rows kept, as :meth:`Storage.acked_rows` reads them at ``now``."""
        windows: dict[str, tuple[int, int]] = {}
        for agent, recent in self._recent.items():
            del recent[:bisect.bisect_right(recent, (now - _MINUTE_MS, _LAST))]
            windows[agent] = (len(recent) - bisect.bisect_right(recent, (now - 1000, _LAST)),
                              len(recent))
        return [
            AckedRow(agent, count, ms, *windows.get(agent, (0, 0)))
            for agent, (count, ms) in sorted(self._acked.items()) if count
        ]


# ---------------------------------------------------------------------------------------------
# Prometheus exposition (SPEC 8): the text format and OpenMetrics, as prometheus_client writes
# them. Counters end in _total, durations are in seconds, one name per family. The formats
# differ on counters: the text format names the family ``X_total``, OpenMetrics names it ``X``
# (its samples are ``X_total``) and ends with ``# EOF``; neither parser accepts the other's.

_Family = tuple[str, str, str, list[tuple[str, float]]]  # name, kind, help, (labels, value)


def _families(m: Metrics) -> list[_Family]:
    """The families SPEC 8 names, counters without their ``_total``."""
    def one(value: float) -> list[tuple[str, float]]:
        return [("", value)]

    return [
        ("sqlbus_messages_sent", "counter",
         "Messages published, one per message id however many recipients.", one(m.messages_sent)),
        ("sqlbus_messages_received", "counter", "Deliveries acked.", one(m.messages_received)),
        ("sqlbus_messages_failed", "counter", "Handler failures (Retry excluded).",
         one(m.messages_failed)),
        ("sqlbus_messages_dead_lettered", "counter", "Moves to dead letters.",
         one(m.messages_dead_lettered)),
        ("sqlbus_messages_expired", "counter", "Messages dead-lettered because their ttl ran out.",
         one(m.messages_expired)),
        ("sqlbus_messages_unhandled", "counter", "Messages acked with no handler for their type.",
         one(m.messages_unhandled)),
        ("sqlbus_late_responses", "counter",
         "Responses that arrived after their request timed out.", one(m.late_responses)),
        ("sqlbus_errors", "counter", "Handler failures by exception name.",
         [(f'{{error="{_label(error)}"}}', count) for error, count in sorted(m.error_rates.items())]),
        ("sqlbus_agent_messages", "counter",
         "Messages sent and deliveries received (acked) per agent.",
         [(f'{{agent="{_label(agent)}",direction="{direction}"}}', getattr(activity, direction))
          for agent, activity in sorted(m.agent_activity.items())
          for direction in ("sent", "received")]),
        ("sqlbus_average_delivery_seconds", "gauge", "Mean time from publish to ack, in seconds.",
         one(m.average_delivery_ms / 1000)),
        ("sqlbus_throughput_per_second", "gauge",
         "Deliveries acked per second, over the last second (1s) or minute (1m).",
         [('{window="1s"}', m.throughput.per_second),
          ('{window="1m"}', m.throughput.per_minute / 60)]),
        ("sqlbus_success_ratio", "gauge", "Acked / (acked + dead-lettered), 0..1.",
         one(m.success_rate)),
        ("sqlbus_queue_depth", "gauge",
         "Messages per agent inbox by state (ready, leased, retrying, scheduled, expired, dead).",
         [(f'{{agent="{_label(agent)}",state="{state}"}}', getattr(depth, state))
          for agent, depth in sorted(m.queue_depths.items())
          for state in QueueDepth.__struct_fields__]),
        ("sqlbus_oldest_ready_age_seconds", "gauge",
         "Age of the oldest message ready to claim, in seconds.", one(m.oldest_ready_age_ms / 1000)),
        ("sqlbus_wal_bytes", "gauge", "Size of the write-ahead log file in bytes.", one(m.wal_bytes)),
        ("sqlbus_db_bytes", "gauge", "Size of the database file in bytes.", one(m.db_bytes)),
    ]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def to_prometheus(m: Metrics) -> str:
    """``m`` in the Prometheus text format (``text/plain; version=0.0.4``): ``# HELP`` and
    ``# TYPE`` per family, then its samples; counter families are named ``..._total``."""
    lines = []
    for name, kind, text, samples in _families(m):
        family = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {family} {text}")
        lines.append(f"# TYPE {family} {kind}")
        lines.extend(f"{family}{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def to_openmetrics(m: Metrics) -> str:
    """``m`` in OpenMetrics (``application/openmetrics-text; version=1.0.0``): counter
    families without ``_total``, their samples with it, and ``# EOF`` at the end."""
    lines = []
    for name, kind, text, samples in _families(m):
        sample = f"{name}_total" if kind == "counter" else name
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"# HELP {name} {text}")
        lines.extend(f"{sample}{labels} {_number(value)}" for labels, value in samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"
