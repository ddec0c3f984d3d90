"""run(concurrency=N) against a slow async handler (issue 21, 4).

    python benchmarks/run_concurrency.py                  # 200 requests, handler awaits 10 ms
    python benchmarks/run_concurrency.py --requests 50 --repeats 1   # a smoke run

One asyncio process: an agent ``run(concurrency=N)`` whose ``async def`` handler awaits
``--sleep`` seconds and returns the payload, and ``--requests`` concurrent
``agent.request()`` calls from another agent of the same bus (``asyncio.gather``). Prints the
wall time of the whole batch for concurrency 1 and 16 (median of ``--repeats``), and the
sync twin: a thread-pool ``run(concurrency=N)`` with a plain handler that sleeps, driven by
as many requesting threads. Issue 21's target: with concurrency=16, 200 requests to a handler
awaiting 10 ms take well under 0.5 s (one at a time they take about 200 x 10 ms = 2 s and more).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import sqlbus
import sqlbus.aio

PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}


async def async_batch(path: str, concurrency: int, requests: int, sleep: float) -> float:
    bus = await sqlbus.aio.connect(path)
    try:
        server, client = await bus.agent("server"), await bus.agent("client")

        async def handle(message: sqlbus.Message) -> object:
            await asyncio.sleep(sleep)
            return message.payload

        await server.subscribe("request", handle)
        loop_task = asyncio.create_task(server.run(concurrency=concurrency))
        await client.request("server", PAYLOAD, timeout=30.0)  # the loop is up
        started = time.perf_counter()
        await asyncio.gather(*(client.request("server", PAYLOAD, timeout=60.0)
                               for _ in range(requests)))
        elapsed = time.perf_counter() - started
        server.stop()
        await loop_task
        return elapsed
    finally:
        await bus.close()


def sync_batch(path: str, concurrency: int, requests: int, sleep: float) -> float:
    bus = sqlbus.connect(path)
    try:
        server, client = bus.agent("server"), bus.agent("client")

        def handle(message: sqlbus.Message) -> object:
            time.sleep(sleep)
            return message.payload

        server.subscribe("request", handle)
        loop = threading.Thread(target=server.run, kwargs={"concurrency": concurrency})
        loop.start()
        client.request("server", PAYLOAD, timeout=30.0)
        with ThreadPoolExecutor(min(requests, 64)) as pool:
            started = time.perf_counter()
            list(pool.map(lambda _: client.request("server", PAYLOAD, timeout=60.0),
                          range(requests)))
            elapsed = time.perf_counter() - started
        server.stop()
        loop.join()
        return elapsed
    finally:
        bus.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--sleep", type=float, default=0.010, help="handler's wait (s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="sqlbus-conc-", dir=args.dir)
    print(f"sqlbus {sqlbus.__version__}, {os.cpu_count()} cores, {args.requests} concurrent "
          f"requests, handler waits {args.sleep * 1000:g} ms, median of {args.repeats}")
    print()
    print("| API | concurrency | wall time s | requests/s | target |")
    print("|---|---:|---:|---:|---|")
    run = 0
    for api in ("asyncio", "threads"):
        for concurrency in (1, 16):
            times = []
            for _ in range(args.repeats):
                run += 1
                path = os.path.join(workdir, f"bus-{run}.db")
                if api == "asyncio":
                    times.append(asyncio.run(
                        async_batch(path, concurrency, args.requests, args.sleep)))
                else:
                    times.append(sync_batch(path, concurrency, args.requests, args.sleep))
            wall = statistics.median(times)
            target = ""
            if concurrency == 16:
                target = "< 0.5 s " + ("met" if wall < 0.5 else "MISSED")
            print(f"| {api} | {concurrency} | {wall:.3f} | {args.requests / wall:,.0f} | {target} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
