"""The dashboard's server-sent event streams (SPEC 14): ``counters`` (the overview's figures,
from the shared :class:`~sqlbus.dashboard.live.Sampler`) and ``message`` (each new message
the tail's filters keep)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request

from ..bus import Bus
from ..errors import SqlbusError
from ..records import SentRecord
from .live import Sampler

TAIL_QUEUE = 1000  # messages buffered for one slow tail page before the oldest are dropped


async def overview_events(request: Request, sampler: Sampler) -> AsyncIterator[dict[str, Any]]:
    """A ``counters`` event now, then one each time the figures change (read at most once a
    second for all streams together), until the client goes."""
    last = None
    while not await request.is_disconnected():
        latest = await sampler.latest()
        if latest != last:
            last = latest
            yield {"event": "counters", "data": json.dumps(latest)}
        await asyncio.sleep(sampler.interval)


def _record(record: SentRecord) -> str:
    m = record.message
    return json.dumps({
        "id": m.id, "from": m.sender, "to": record.recipients, "type": m.type,
        "priority": m.headers.priority, "sent_at": record.sent_at,
        "payload": msgspec.json.encode(m.payload).decode()[:200],
    })


async def tail_events(
    request: Request, bus: Bus, agent: str | None, type_: str | None
) -> AsyncIterator[dict[str, Any]]:
    """A ``message`` event for each new message (``agent``: sent by or to it; ``type_``),
    from a thread that follows the bus, until the client goes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue(TAIL_QUEUE)
    types = [type_] if type_ else None
    stop = threading.Event()

    def put(data: str) -> None:
        if queue.full():
            queue.get_nowait()  # a page that cannot keep up loses the oldest, not the newest
        queue.put_nowait(data)

    def follow() -> None:
        # bus.tail blocks; slices of 1 s let the thread see the stop flag, each slice going on
        # from the position the last one reached, so nothing published between two is missed.
        try:
            tail = bus.tail(agent, types, timeout=1.0)
            while not stop.is_set():
                for record in tail:
                    loop.call_soon_threadsafe(put, _record(record))
                    if stop.is_set():
                        return
                tail = bus.tail(agent, types, timeout=1.0, after=tail.position)
        except (SqlbusError, RuntimeError):  # the bus closed, or the loop ended: the page went
            return

    thread = threading.Thread(target=follow, name="sqlbus-dashboard-tail", daemon=True)
    thread.start()
    try:
        while not await request.is_disconnected():
            try:
                data = await asyncio.wait_for(queue.get(), 1.0)
            except asyncio.TimeoutError:
                continue
            yield {"event": "message", "data": data}
    finally:
        stop.set()
