"""Latency of the MCP server (issue 16's targets: p50 <= 5 ms for both), over stdio with the
official ``mcp`` client, in one run:

    python benchmarks/mcp_latency.py                  # 500 calls each, a SQLite file in /tmp
    python benchmarks/mcp_latency.py --calls 200 --db postgresql://postgres@127.0.0.1/test

- ``send``: a ``send`` tool call's round trip (client -> server -> committed -> result).
- ``receive`` woken by a publish: the client's ``receive`` call waits in the server; another
  process publishes to the agent; the time from that publish's return to the tool result.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

import sqlbus


def _publisher(target: dict[str, str], ready: mp.Event, go: mp.Queue, sent: mp.Queue) -> None:
    """Publish to mcp-agent each time the parent asks, reporting when the publish returned."""
    with sqlbus.connect(**target) as bus:
        sender = bus.agent("publisher")
        ready.set()
        while go.get() is not None:
            sender.publish("mcp-agent", "notification", {"n": 1})
            sent.put(time.time())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, ms: list[float]) -> None:
    print(f"{name}: p50 {statistics.median(ms):.2f} ms  p99 {percentile(ms, 0.99):.2f} ms  "
          f"(n={len(ms)})", flush=True)


async def run(target: dict[str, str], calls: int) -> None:
    args = ["-m", "sqlbus", "mcp", "--db", target["path"], "--agent", "mcp-agent"]
    if "schema" in target:
        args += ["--schema", target["schema"]]
    params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await session.call_tool("send", {"to": "mcp-agent", "payload": {"warm": True}})
        for _ in range(3):  # drain the warm-up message
            result = await session.call_tool("receive", {"wait_seconds": 0.1})
            for d in (result.structured_content or {}).get("deliveries", []):
                await session.call_tool("ack", {"token": d["token"]})
        sends = []
        for n in range(calls):
            start = time.perf_counter()
            result = await session.call_tool("send", {"to": "elsewhere", "payload": {"n": n}})
            sends.append((time.perf_counter() - start) * 1000)
            assert not result.is_error, result
        report("send tool call round trip", sends)

        ctx = mp.get_context("spawn")
        ready, go, sent = ctx.Event(), ctx.Queue(), ctx.Queue()
        publisher = ctx.Process(target=_publisher, args=(target, ready, go, sent))
        publisher.start()
        ready.wait(30)
        woken = []
        try:
            for _ in range(calls):
                call = asyncio.create_task(session.call_tool("receive", {"wait_seconds": 10}))
                await asyncio.sleep(0.005)  # the receive is waiting in the server
                go.put(1)
                result = await call
                done = time.time()
                published = sent.get(timeout=10)
                deliveries = (result.structured_content or {}).get("deliveries", [])
                for d in deliveries:
                    await session.call_tool("ack", {"token": d["token"]})
                if deliveries:
                    woken.append((done - published) * 1000)
        finally:
            go.put(None)
            publisher.join(10)
        report("receive woken by a publish from another process", woken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--db", default=None, help="a file path or postgresql:// URL "
                        "(default: a new file in a temporary directory)")
    parser.add_argument("--schema", default="bench_mcp", help="PostgreSQL: the schema")
    args = parser.parse_args()
    if args.db is None:
        target = {"path": os.path.join(tempfile.mkdtemp(prefix="sqlbus-mcp-"), "bench.db")}
    elif args.db.startswith(("postgresql://", "postgres://")):
        target = {"path": args.db, "schema": args.schema}
    else:
        target = {"path": args.db}
    sqlbus.connect(**target).close()
    print(f"sqlbus mcp latency on {target}, {args.calls} calls each", flush=True)
    asyncio.run(run(target, args.calls))


if __name__ == "__main__":
    main()
