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

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import apsw
import msgspec

from .messages import iso_ms

if TYPE_CHECKING:
    from .backend import Storage

__all__ = [
    "Metrics",
    "Throughput",
    "QueueDepth",
    "AgentActivity",
    "AgentStats",
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
        registered = storage.agent_ids(conn)
        stats = compute_stats(storage, conn, now, registered)
        acked = storage.acked_rows(conn, now)
        sent = storage.sent_rows(conn)
        reasons = dict(storage.dead_reason_rows(conn))
        errors = dict(storage.error_count_rows(conn))
        counters = storage.read_counters(conn)
    finally:
        storage.end_read(conn)

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
