"""What a metrics read costs on a large archive: ``bus.metrics()`` (a scan of the whole message
table) against :class:`sqlbus.metrics.MetricsFollower` reads (the changes since its last read).

    python benchmarks/metrics_follower.py                    # 1,000,000 archived, 10,000 queued
    python benchmarks/metrics_follower.py --archived 100000  # a quicker look
    python benchmarks/metrics_follower.py --keep /tmp/big.db # build once, reuse the file later

It builds (or reuses, with ``--keep PATH``) a SQLite file holding ``--archived`` acked
messages and ``--queued`` ready ones, then times (``--later`` s after the build, 120 by
default: acks older than a minute; with less, every ack of the archive is one the follower
keeps for the last minute's throughput), in this process, median of ``--repeats``:
a full read (``bus.metrics()``); the follower's first read (the same scan); its read when
nothing changed; and its read after ``--changes`` messages were published and half of them
acked since the previous one (the publishing is not timed). Each follower read is checked
against ``bus.metrics()`` read at the same instant (every figure but the file's sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

import sqlbus
from sqlbus.metrics import MetricsFollower


class Clock:
    """Stands still between a follower read and the bus.metrics() it is checked against."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build(path: Path, archived: int, queued: int) -> None:
    """``archived`` acked messages alice to bob, ``queued`` ready ones in carol's inbox."""
    with sqlbus.connect(path, archive_max_messages=None) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        bus.agent("carol")
        for start in range(0, archived, 1000):
            n = min(1000, archived - start)
            alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": start + i}}
                                for i in range(n)])
            while got := bob.receive(limit=1000):
                bob.ack(got)
        for start in range(0, queued, 1000):
            n = min(1000, queued - start)
            alice.publish_many([{"to": "carol", "type": "notification", "payload": {"i": i}}
                                for i in range(n)])


def figures(m: sqlbus.Metrics) -> dict:
    fields = msgspec.structs.asdict(m)
    del fields["db_bytes"], fields["wal_bytes"]
    return fields


def timed(read) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = read()
    return (time.perf_counter() - t0) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archived", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=100, help="messages published between reads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build here (or reuse this file) instead of a temp file")
    parser.add_argument("--later", type=float, default=120.0,
                        help="s after the build that the reads happen (under 60: the archive's "
                             "acks count in the last minute's throughput, one entry each)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bus.db"
        if not path.exists():
            t0 = time.perf_counter()
            build(path, args.archived, args.queued)
            print(f"built {path} ({args.archived:,} archived, {args.queued:,} queued) in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        clock = Clock(time.time() + args.later)
        with sqlbus.connect(path, clock=clock, archive_max_messages=None) as bus:
            alice, bob = bus.agent("alice"), bus.agent("bob")
            full = [timed(bus.metrics)[0] for _ in range(args.repeats)]
            follower = MetricsFollower(bus)
            first, m = timed(follower.read)
            assert figures(m) == figures(bus.metrics())
            idle, changed, rows = [], [], []
            for _ in range(args.repeats):
                clock.now += 1
                ms, m = timed(follower.read)
                idle.append(ms)
                assert not follower.last_read.full and figures(m) == figures(bus.metrics())
                alice.publish_many([{"to": "bob", "type": "notification", "payload": {}}
                                    for _ in range(args.changes)])
                bob.ack(bob.receive(limit=args.changes // 2))
                clock.now += 1
                ms, m = timed(follower.read)
                changed.append(ms)
                rows.append(follower.last_read.rows)
                assert not follower.last_read.full and figures(m) == figures(bus.metrics())
            received = m.messages_received

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}"

    base = statistics.median(full)
    print(f"archive: {received:,} acked, {args.queued:,} queued in one inbox; reads "
          f"{args.later:.0f} s after the build; median of {args.repeats}\n")
    print("| read | ms | bus.metrics() ms / this |")
    print("|---|---:|---:|")
    print(f"| bus.metrics() (full scan) | {med(full)} | 1 |")
    print(f"| follower, first read (full scan) | {first:.2f} | {base / first:.1f} |")
    print(f"| follower, nothing changed | {med(idle)} | {base / statistics.median(idle):.0f} |")
    print(f"| follower, {args.changes} published + {args.changes // 2} acked since | {med(changed)} | "
          f"{base / statistics.median(changed):.0f} |")
    print(f"\nrows the follower fetched by position in a read after changes (median): "
          f"{statistics.median(rows):,.0f} (the new rows, and rows not acked before that were acked "
          "or deleted since)")


if __name__ == "__main__":
    main()
