"""Group commit (issue 21): many threads or asyncio tasks of one process writing through one
bus, against one of them alone, with group commit on and off, in one run.

    python benchmarks/group_commit.py               # 5 interleaved rounds of 1.0 s runs
    python benchmarks/group_commit.py --quick       # 0.3 s runs

Workloads (each caller makes one call per message, ~200-byte JSON payloads, a fresh database
file per run, all files in one temporary directory):

- publish: N threads, each its own agent, ``agent.publish`` to one recipient, in a loop;
- asyncio publish: N tasks on one ``sqlbus.aio`` bus, ``await agent.publish(...)`` in a loop;
- ack: a prefilled inbox, N worker threads each ``receive(limit=10)`` then ``d.ack()`` per
  delivery (the claims are transactions of their own; the acks are what group).

Each rate is the median of ``--rounds`` runs; the rounds are interleaved (every workload
and setting once per round), so a slow phase of the machine touches all of them alike. The
ratio is the median over rounds of (N callers / 1 caller), the two runs of a round being back
to back. "off"
sets the bus's internal switch (``bus.engine.group.mode = "off"``): every write its own
transaction, as before group commit. "writes per commit" is how many writes the N callers'
transactions held (median of rounds; claims count as writes of their own).
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
from collections.abc import Callable
from typing import Any

import sqlbus
import sqlbus.aio

PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}
TARGETS = {  # issue 21: the many-callers rate over one caller's, group commit on
    ("publish", "full"): 3.0, ("publish", "normal"): 1.5,
    ("aio publish", "full"): 3.0, ("aio publish", "normal"): 1.5,
    ("ack", "normal"): 1.5,
}


class Run:
    """One measured run: operations done and seconds taken, and the group's counters."""

    def __init__(self, ops: int, seconds: float, commits: int, writes: int) -> None:
        self.rate = ops / seconds
        self.per_commit = writes / commits if commits else 0.0


def new_bus(directory: str, name: str, durability: str, mode: str) -> sqlbus.Bus:
    bus = sqlbus.connect(os.path.join(directory, name + ".db"), durability=durability)
    bus.engine.group.mode = mode  # type: ignore[attr-defined]
    return bus


def counters(bus: sqlbus.Bus) -> tuple[int, int]:
    group = bus.engine.group  # type: ignore[attr-defined]
    return group.commits, group.writes


def in_threads(bus: sqlbus.Bus, workers: list[Callable[[float], int]], duration: float) -> Run:
    """Start ``workers`` (each loops until the deadline it is given and returns its count)
    together, on threads; the run's rate."""
    barrier = threading.Barrier(len(workers) + 1)
    counts = [0] * len(workers)
    deadline = [0.0]

    def run(index: int) -> None:
        barrier.wait()
        counts[index] = workers[index](deadline[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    commits, writes = counters(bus)
    start = time.perf_counter()
    deadline[0] = start + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - start
    after = counters(bus)
    return Run(sum(counts), took, after[0] - commits, after[1] - writes)


def publish_run(directory: str, name: str, durability: str, mode: str, callers: int,
                duration: float) -> Run:
    bus = new_bus(directory, name, durability, mode)
    bus.agent("sink")
    agents = [bus.agent(f"p{i}") for i in range(callers)]

    def worker(agent: sqlbus.Agent) -> Callable[[float], int]:
        def loop(deadline: float) -> int:
            n = 0
            while time.perf_counter() < deadline:
                agent.publish("sink", "notification", PAYLOAD)
                n += 1
            return n
        return loop

    try:
        return in_threads(bus, [worker(a) for a in agents], duration)
    finally:
        bus.close()


def aio_publish_run(directory: str, name: str, durability: str, mode: str, callers: int,
                    duration: float) -> Run:
    async def main() -> Run:
        bus = await sqlbus.aio.connect(os.path.join(directory, name + ".db"),
                                       durability=durability)
        try:
            bus.sync.engine.group.mode = mode
            await bus.agent("sink")
            agents = [await bus.agent(f"t{i}") for i in range(callers)]
            commits, writes = counters(bus.sync)
            start = time.perf_counter()
            deadline = start + duration

            async def loop(agent: Any) -> int:
                n = 0
                while time.perf_counter() < deadline:
                    await agent.publish("sink", "notification", PAYLOAD)
                    n += 1
                return n

            counts = await asyncio.gather(*(loop(a) for a in agents))
            took = time.perf_counter() - start
            after = counters(bus.sync)
            return Run(sum(counts), took, after[0] - commits, after[1] - writes)
        finally:
            await bus.close()

    return asyncio.run(main())


def ack_run(directory: str, name: str, durability: str, mode: str, callers: int,
            duration: float) -> Run:
    bus = new_bus(directory, name, durability, mode)
    alice, worker_agent = bus.agent("alice"), bus.agent("worker")
    prefill = 60_000 if durability == "normal" else 15_000
    for _ in range(prefill // 1000):
        alice.publish_many([{"to": "worker", "type": "notification", "payload": PAYLOAD,
                             "ttl": 0}] * 1000)

    def loop(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            batch = worker_agent.receive(limit=10)
            if not batch:
                break
            for d in batch:
                d.ack()
                n += 1
        return n

    try:
        return in_threads(bus, [loop] * callers, duration)
    finally:
        bus.close()


WORKLOADS: list[tuple[str, str, Callable[..., Run], int]] = [
    ("publish", "normal", publish_run, 8),
    ("publish", "full", publish_run, 8),
    ("aio publish", "normal", aio_publish_run, 8),
    ("aio publish", "full", aio_publish_run, 8),
    ("ack", "normal", ack_run, 4),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.3 s runs")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="off,on",
                        help="group commit modes to compare (off, on, auto: the default's)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    duration = 0.3 if args.quick else args.duration
    results: dict[tuple[str, str, str, int], list[Run]] = {}
    with tempfile.TemporaryDirectory() as directory:
        serial = 0
        for round_ in range(args.rounds):
            for workload, durability, fn, many in WORKLOADS:
                for mode in modes:
                    for callers in (1, many):
                        serial += 1
                        run = fn(directory, f"r{serial}", durability, mode, callers, duration)
                        results.setdefault((workload, durability, mode, callers), []).append(run)
                        os.remove(os.path.join(directory, f"r{serial}.db"))
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)

    print(f"sqlbus {sqlbus.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} cores; "
          f"medians of {args.rounds} interleaved rounds of {duration:g} s runs\n")
    print("| workload | durability | group commit | 1 caller | N callers | ratio | writes per commit (N) | target |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for workload, durability, _fn, many in WORKLOADS:
        for mode in modes:
            singles = results[(workload, durability, mode, 1)]
            runs = results[(workload, durability, mode, many)]
            one = statistics.median(r.rate for r in singles)
            lots = statistics.median(r.rate for r in runs)
            # The ratio of each round's pair (run one after the other), then their median:
            # the machine's slow and fast phases cancel out better than in a ratio of medians.
            ratio = statistics.median(m.rate / s.rate for s, m in zip(singles, runs, strict=True))
            per_commit = statistics.median(r.per_commit for r in runs)
            target = TARGETS.get((workload, durability))
            goal = (f">= {target:g}x: {'met' if ratio >= target else 'NOT met'}"
                    if mode != "off" and target else "")
            shown = ("1 (off)" if mode == "off" else "1 (alone)" if per_commit == 0
                     else f"{per_commit:.1f}")
            print(f"| {workload} ({many} vs 1) | {durability} | {mode} | {one:,.0f}/s "
                  f"| {lots:,.0f}/s | {ratio:.2f}x | {shown} | {goal} |")


if __name__ == "__main__":
    main()
