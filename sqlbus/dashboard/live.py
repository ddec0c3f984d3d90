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
from ..metrics import Metrics

HISTORY = 3600  # samples kept: one an interval, an hour at the default interval
INTERVAL = 1.0  # s between reads of the bus's metrics, whatever the number of streams


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
    """The latest figures, read in a worker thread at most every ``interval`` seconds, and
    ``history``: (monotonic s, acked total) pairs for the chart."""

    def __init__(self, bus: Bus, interval: float = INTERVAL) -> None:
        self.bus = bus
        self.interval = interval
        self.history: deque[tuple[float, int]] = deque(maxlen=HISTORY)
        self._latest: dict[str, Any] | None = None
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def latest(self) -> dict[str, Any]:
        """The figures, read again when the last read is ``interval`` seconds old."""
        async with self._lock:
            if self._latest is None or time.monotonic() - self._read_at >= self.interval:
                m = await to_thread.run_sync(self.bus.metrics)
                self._read_at = time.monotonic()
                self._latest = figures(m)
                self.history.append((self._read_at, m.messages_received))
            return self._latest

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
