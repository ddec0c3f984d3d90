"""Fan-out: the time and bytes of one message to N recipients, and their receive rate.

    python benchmarks/fanout.py                      # 10, 1,000 and 20,000 recipients
    python benchmarks/fanout.py --cases 10x20,1000x200

A case ``NxL`` registers N agents with ids of L characters in a new file, then times one
``publish(to=[all N ids])`` and one ``broadcast()`` (which matches all N), each a single
transaction with an 11-byte payload. Bytes: the growth of the database file plus its WAL
over the operation (a TRUNCATE checkpoint first, so the WAL starts empty), and the growth of
the database alone once a TRUNCATE checkpoint has copied the WAL into it (what stays).
Receive: up to 1,000 of the recipients each receive and ack their copy of both messages,
one delivery per receive, and the rate is deliveries per second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import apsw

import sqlbus

PAYLOAD = {"n": 123456}  # 11 bytes of JSON
MiB = 1024 * 1024


def agent_ids(n: int, length: int) -> list[str]:
    return [f"agent-{i:0{length - 6}d}" for i in range(n)]


def total_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def truncate_wal(path: str) -> None:
    conn = apsw.Connection(path)
    conn.set_busy_timeout(10_000)
    while conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]:
        time.sleep(0.01)  # the bus's own checkpointer is running
    conn.close()


def measure(path: str, write: Callable[[], object]) -> tuple[float, int, int]:
    """(seconds, growth of db + WAL, growth of the db after a checkpoint) of ``write()``."""
    truncate_wal(path)
    db_before = os.path.getsize(path)
    before = total_bytes(path)
    started = time.perf_counter()
    write()
    seconds = time.perf_counter() - started
    grown = total_bytes(path) - before
    truncate_wal(path)
    return seconds, grown, os.path.getsize(path) - db_before


def run_case(workdir: str, n: int, length: int) -> dict[str, float]:
    path = os.path.join(workdir, f"fanout-{n}x{length}.db")
    bus = sqlbus.connect(path)
    ids = agent_ids(n, length)
    agents = [bus.agent(agent_id) for agent_id in ids]
    sender = bus.agent("sender")
    result: dict[str, float] = {}
    result["publish_s"], result["publish_bytes"], result["publish_kept"] = measure(
        path, lambda: sender.publish(ids, "notification", PAYLOAD))
    result["broadcast_s"], result["broadcast_bytes"], result["broadcast_kept"] = measure(
        path, lambda: sender.broadcast("notification", PAYLOAD, pattern="agent-*"))
    receivers = agents[:1000]
    started = time.perf_counter()
    received = 0
    for agent in receivers:
        for _ in range(2):
            deliveries = agent.receive()
            assert deliveries and len(deliveries[0].message.to) == n
            deliveries[0].ack()
            received += 1
    result["receive_rate"] = received / (time.perf_counter() - started)
    bus.close()
    os.remove(path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="10x20,1000x20,1000x200,20000x20",
                        help="comma-separated NxL: N recipients with ids of L characters")
    parser.add_argument("--dir", default=None, help="directory for the database files")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="sqlbus-fanout-", dir=args.dir)
    print(f"sqlbus at {os.path.dirname(sqlbus.__file__)}, SQLite {apsw.sqlite_lib_version()}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, files in {workdir}", flush=True)
    print()
    print("| recipients | id length | publish s | publish MiB (db+wal) | publish MiB kept "
          "| broadcast s | broadcast MiB (db+wal) | broadcast MiB kept | receive+ack /s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        n, length = (int(part) for part in case.split("x"))
        r = run_case(workdir, n, length)
        print(f"| {n:,} | {length} | {r['publish_s']:.3f} | {r['publish_bytes'] / MiB:.2f} "
              f"| {r['publish_kept'] / MiB:.2f} | {r['broadcast_s']:.3f} "
              f"| {r['broadcast_bytes'] / MiB:.2f} | {r['broadcast_kept'] / MiB:.2f} "
              f"| {r['receive_rate']:,.0f} |", flush=True)
    shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
