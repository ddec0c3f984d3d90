"""Soak run: a steady load on one sqlbus database, watching for leaks.

    python tools/soak.py --duration 600                 # the 10-minute run of the closing note
    python tools/soak.py --duration 30 --interval 5     # a short smoke run
    python tools/soak.py --asyncio --duration 600       # an asyncio agent: outbox blocks, runs

One process, three threads on one bus: a producer publishing at ``--rate`` messages per second
(singles and small ``publish_many`` batches), a consumer receiving and acking them (``with d:``),
and a state updater (``state.update("counter", +1)``). With retention on (``--retention``
seconds, the bus's ``archive_retention``), acked messages are pruned as the run goes, so the
file size should reach a plateau, and so should RSS and the number of open file descriptors.

Every ``--interval`` seconds it prints: elapsed time, RSS and peak RSS (KiB), open fds, database
and WAL size, the interval's publish and ack throughput, backlog, and the state counter. At the
end it prints the start, middle and end figures, and exits non-zero if a worker thread failed
or the backlog was not drained.

``--asyncio`` soaks an asyncio agent instead: in a loop, an ``async with agent.transaction()``
block writes a row of the application's own table and publishes a message, and every few
blocks ``await agent.run(until_idle=True)`` handles them. Every ``--interval`` seconds it prints
RSS, open fds, threads, database and WAL size and the blocks per second: a long-running agent
must keep fds, threads and RSS flat.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlbus  # noqa: E402


def rss_kb() -> int:
    """Current resident set size of this process (KiB), from /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the fd listdir itself holds
    except OSError:
        return -1


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Load:
    """The three worker threads and their counters."""

    def __init__(self, bus: sqlbus.Bus, rate: float) -> None:
        self.bus = bus
        self.rate = rate
        self.stop = threading.Event()
        self.published = 0
        self.acked = 0
        self.increments = 0
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._guard(self.produce), name="producer"),
            threading.Thread(target=self._guard(self.consume), name="consumer"),
            threading.Thread(target=self._guard(self.update), name="updater"),
        ]

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported, and the run fails
                self.failures.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}")
                self.stop.set()
        return run

    def produce(self) -> None:
        alice = self.bus.agent("soak-producer")
        n = 0
        next_at = time.monotonic()
        pad = "s" * 256
        while not self.stop.is_set():
            if n % 10 == 0:
                alice.publish_many([
                    {"to": "soak-consumer", "type": "notification", "payload": {"n": n + i, "pad": pad},
                     "priority": 1 + (n + i) % 5}
                    for i in range(5)
                ])
                count = 5
            else:
                alice.publish("soak-consumer", "task_assignment",
                              {"task": {"id": f"t{n}", "type": "soak", "parameters": {"pad": pad}}})
                count = 1
            n += count
            self.published += count
            next_at += count / self.rate
            pause = next_at - time.monotonic()
            if pause > 0:
                self.stop.wait(pause)
            else:
                next_at = time.monotonic()

    def consume(self) -> None:
        bob = self.bus.agent("soak-consumer")
        while not self.stop.is_set():
            for d in bob.receive(limit=50, wait=0.2):
                with d:
                    pass
                self.acked += 1

    def update(self) -> None:
        agent = self.bus.agent("soak-updater")
        while not self.stop.is_set():
            agent.state.update("counter", lambda old: (old or 0) + 1, notify=False)
            self.increments += 1
            self.stop.wait(0.01)

    def drain(self, timeout: float) -> int:
        """After the producer stopped: ack what is left; returns the backlog left over."""
        bob = self.bus.agent("soak-consumer")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = bob.receive(limit=200, wait=0.2)
            if not got:
                break
            bob.ack(got)
            self.acked += len(got)
        return self.published - self.acked


def connect(path: str, args: argparse.Namespace) -> tuple[sqlbus.Bus, str]:
    params = inspect.signature(sqlbus.connect).parameters
    if "archive_retention" in params:
        bus = sqlbus.connect(path, archive_retention=args.retention)
        return bus, f"retention on: acked messages pruned {args.retention:g} s after their ack"
    return sqlbus.connect(path), "note: this sqlbus has no archive_retention: no retention"


def soak_asyncio(path: str, args: argparse.Namespace) -> int:
    """The ``--asyncio`` mode: outbox blocks and ``run(until_idle=True)`` in a loop."""
    import sqlbus.aio

    print(f"soak --asyncio: {path} for {args.duration:g} s", flush=True)
    print(f"{'t(s)':>6} {'rss KiB':>9} {'fds':>4} {'threads':>7} {'db bytes':>11} "
          f"{'wal bytes':>11} {'blocks/s':>8} {'handled':>8}", flush=True)
    samples: list[dict[str, Any]] = []

    def sample(elapsed: float, blocks: int, per_s: float, handled: int) -> None:
        row = {"t": round(elapsed, 1), "rss_kb": rss_kb(), "fds": open_fds(),
               "threads": threading.active_count(), "db_bytes": size(path),
               "wal_bytes": size(path + "-wal"), "blocks": blocks, "blocks_per_s": round(per_s, 1),
               "handled": handled}
        print(f"{row['t']:>6.0f} {row['rss_kb']:>9} {row['fds']:>4} {row['threads']:>7} "
              f"{row['db_bytes']:>11} {row['wal_bytes']:>11} {per_s:>8.0f} {handled:>8}",
              flush=True)
        samples.append(row)

    async def run() -> tuple[int, int]:
        kwargs = {"archive_retention": args.retention} if "archive_retention" in inspect.signature(
            sqlbus.connect).parameters else {}
        bus = await sqlbus.aio.connect(path, **kwargs)
        alice, bob = await bus.agent("alice"), await bus.agent("bob")
        handled = [0]
        bob.subscribe("notification", lambda message: handled.__setitem__(0, handled[0] + 1))
        async with alice.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS soak_orders(id INTEGER PRIMARY KEY, n)")
        started = time.monotonic()
        sample(0.0, 0, 0.0, 0)
        blocks, last_t, last_blocks = 0, started, 0
        next_sample = started + args.interval
        while time.monotonic() - started < args.duration:
            async with alice.transaction() as tx:
                await tx.execute("INSERT INTO soak_orders(n) VALUES (?)", (blocks,))
                await tx.publish("bob", "notification", {"n": blocks}, ttl=0)
            blocks += 1
            if blocks % 5 == 0:
                await bob.run(until_idle=True)
            now = time.monotonic()
            if now >= next_sample:
                sample(now - started, blocks, (blocks - last_blocks) / (now - last_t), handled[0])
                last_t, last_blocks, next_sample = now, blocks, now + args.interval
        await bob.run(until_idle=True)
        now = time.monotonic()
        sample(now - started, blocks, (blocks - last_blocks) / max(now - last_t, 1e-9), handled[0])
        await bus.close()
        return blocks, handled[0]

    blocks, handled = asyncio.run(run())
    start, middle, end = samples[0], samples[len(samples) // 2], samples[-1]
    print(f"blocks {blocks}, handled {handled}")
    for label, row in (("start", start), ("middle", middle), ("end", end)):
        print(f"  {label:>6} t={row['t']:>6.0f}s rss {row['rss_kb']} KiB, fds {row['fds']}, "
              f"threads {row['threads']}, db {row['db_bytes']} B, wal {row['wal_bytes']} B")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"samples": samples, "blocks": blocks, "handled": handled}, indent=2))
    if handled != blocks:
        print(f"FAILED: {blocks} blocks published, {handled} handled")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reports")
    parser.add_argument("--rate", type=float, default=200.0, help="messages published per second")
    parser.add_argument("--retention", type=float, default=30.0,
                        help="archive retention in seconds (acked messages older are pruned)")
    parser.add_argument("--db", default=None, help="database file (default: a temporary one)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the samples here")
    parser.add_argument("--asyncio", action="store_true",
                        help="soak an asyncio agent: outbox blocks and run(until_idle=True)")
    args = parser.parse_args(argv)
    path = args.db or os.path.join(tempfile.mkdtemp(prefix="sqlbus-soak-"), "soak.db")
    if args.asyncio:
        return soak_asyncio(path, args)
    bus, note = connect(path, args)
    load = Load(bus, args.rate)
    print(f"soak: {path} for {args.duration:g} s at {args.rate:g} msg/s; {note}", flush=True)
    header = (f"{'t(s)':>6} {'rss KiB':>9} {'peak':>9} {'fds':>4} {'db bytes':>11} "
              f"{'wal bytes':>11} {'pub/s':>7} {'ack/s':>7} {'backlog':>7} {'counter':>8}")
    print(header, flush=True)
    samples: list[dict[str, Any]] = []

    def sample(elapsed: float, pub_rate: float, ack_rate: float) -> dict[str, Any]:
        row = {
            "t": round(elapsed, 1), "rss_kb": rss_kb(),
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "fds": open_fds(), "db_bytes": size(path), "wal_bytes": size(path + "-wal"),
            "publish_per_s": round(pub_rate, 1), "ack_per_s": round(ack_rate, 1),
            "backlog": load.published - load.acked, "counter": load.increments,
        }
        print(f"{row['t']:>6.0f} {row['rss_kb']:>9} {row['peak_rss_kb']:>9} {row['fds']:>4} "
              f"{row['db_bytes']:>11} {row['wal_bytes']:>11} {row['publish_per_s']:>7.0f} "
              f"{row['ack_per_s']:>7.0f} {row['backlog']:>7} {row['counter']:>8}", flush=True)
        samples.append(row)
        return row

    started = time.monotonic()
    sample(0.0, 0.0, 0.0)
    for thread in load.threads:
        thread.start()
    last_t, last_pub, last_ack = started, 0, 0
    try:
        while not load.stop.is_set():
            remaining = started + args.duration - time.monotonic()
            if remaining <= 0:
                break
            load.stop.wait(min(args.interval, remaining))
            now = time.monotonic()
            span = max(now - last_t, 1e-9)
            sample(now - started, (load.published - last_pub) / span, (load.acked - last_ack) / span)
            last_t, last_pub, last_ack = now, load.published, load.acked
    except KeyboardInterrupt:
        pass
    load.stop.set()
    for thread in load.threads:
        thread.join()
    backlog = load.drain(timeout=30.0)
    entry = bus.state.get("counter")
    counter = entry.value if entry is not None else 0
    bus.close()

    failures = list(load.failures)
    if backlog:
        failures.append(f"{backlog} messages were not received after the drain")
    if counter != load.increments:
        failures.append(f"state counter {counter} != {load.increments} increments")
    start, middle, end = samples[0], samples[len(samples) // 2], samples[-1]
    print(f"published {load.published}, acked {load.acked}, state increments {load.increments} "
          f"(counter {counter})")
    for label, row in (("start", start), ("middle", middle), ("end", end)):
        print(f"  {label:>6} t={row['t']:>6.0f}s rss {row['rss_kb']} KiB, fds {row['fds']}, "
              f"db {row['db_bytes']} B, wal {row['wal_bytes']} B")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"samples": samples, "published": load.published, "acked": load.acked,
             "increments": load.increments, "counter": counter, "failures": failures,
             "note": note}, indent=2))
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
