"""Live figures for the dashboard: one :class:`Sampler` reads the bus's metrics at most once
a second for every open page and stream (nothing per message), and keeps an hour of acked
counts for the overview's chart."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from anyio import to_thread

from ..bus import Bus
from ..metrics import Metrics, MetricsFollower

HISTORY = 3600  # samples kept: one an interval, an hour at the default interval
INTERVAL = 1.0  # s between reads of the bus's metrics, whatever the number of streams
COST_FACTOR = 50  # the pause after a read is at least this many times its length (2% of a core)


def figures(m: Metrics) -> dict[str, Any]:
    """The overview's figures (the ``counters`` event's data) from ``m``."""
    return {
        "sent": m.messages_sent,
        "acked": m.messages_received,
        "failed": m.messages_failed,
        "dead_lettered": m.messages_dead_lettered,
        "expired": m.messages_expired,
        "success_rate": round(m.success_rate, 4),
        "acked_per_second": round(m.throughput.per_second, 3),
        "oldest_ready_age_ms": m.oldest_ready_age_ms,
        "ready": sum(d.ready for d in m.queue_depths.values()),
        "leased": sum(d.leased for d in m.queue_depths.values()),
        "timestamp": m.timestamp,
    }


class Sampler:
    """The latest figures and ``history``: (monotonic s, acked total) pairs for the chart.

    One read of the bus's metrics at a time, in a worker thread, for every page and stream,
    by a :class:`~sqlbus.metrics.MetricsFollower` (a read costs what changed since the last
    one; on PostgreSQL a whole read). The next read comes ``interval`` s after the last one, or ``COST_FACTOR`` times as long as
    the last read took, whichever is longer: on a bus whose metrics take long to read (a large
    archive) the dashboard refreshes less often rather than use more than about 1/COST_FACTOR
    of a core. Pages never wait for a read once there is a first sample."""

    def __init__(self, bus: Bus, interval: float = INTERVAL) -> None:
        self.bus = bus
        self.follower = MetricsFollower(bus)  # bus.metrics(), read at the cost of the changes
        self.interval = interval
        self.history: deque[tuple[float, int]] = deque(maxlen=HISTORY)
        self.metrics: Metrics | None = None  # the latest read
        self._latest: dict[str, Any] | None = None
        self._next_read = float("-inf")
        self._lock = asyncio.Lock()
        self._reading: asyncio.Task[None] | None = None

    async def latest(self) -> dict[str, Any]:
        """The latest figures; a read is started when the last one is old enough (awaited only
        when there is none yet)."""
        if self._latest is None:
            await self._read()
        elif time.monotonic() >= self._next_read and (
                self._reading is None or self._reading.done()):
            self._reading = asyncio.get_running_loop().create_task(self._read())
        assert self._latest is not None
        return self._latest

    async def latest_metrics(self) -> Metrics:
        """The latest :class:`Metrics` (as :meth:`latest`)."""
        await self.latest()
        assert self.metrics is not None
        return self.metrics

    async def _read(self) -> None:
        async with self._lock:
            if self._latest is not None and time.monotonic() < self._next_read:
                return  # another caller read while this one waited
            started = time.monotonic()
            m = await to_thread.run_sync(self.follower.read)
            done = time.monotonic()
            self._next_read = done + max(self.interval, COST_FACTOR * (done - started))
            self.metrics = m
            self._latest = figures(m)
            self.history.append((done, m.messages_received))

    def rates(self) -> list[float]:
        """Acked per second between successive samples, oldest first (the chart's points)."""
        points = list(self.history)
        return [max(0.0, (b[1] - a[1]) / (b[0] - a[0]))
                for a, b in zip(points, points[1:], strict=False) if b[0] > a[0]]


def chart_points(rates: list[float], width: int = 600, height: int = 80) -> str:
    """An SVG polyline's ``points`` for ``rates`` (the newest at the right edge)."""
    if not rates:
        return ""
    top = max(max(rates), 1.0)
    step = width / max(len(rates) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - r / top * height:.1f}" for i, r in enumerate(rates))
