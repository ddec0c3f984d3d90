"""The dashboard's page times on a large bus, and what it costs when idle (SPEC 14).

    python benchmarks/dashboard.py                     # 1,000,000 archived, 10,000 queued
    python benchmarks/dashboard.py --archived 100000   # a quicker look
    python benchmarks/dashboard.py --postgres postgresql://127.0.0.1/test --archived 100000

It builds (or reuses, with ``--keep PATH``) a database holding ``--archived`` acked messages
and ``--queued`` ready ones in one inbox (plus some dead letters, leases and state keys),
then times every page through Starlette's test client in this process: the server's time to
answer, median of ``--repeats``. Then it runs ``sqlbus dashboard`` as a real process with an
overview stream and a tail stream open, and reads the process's CPU time (``/proc``) over
``--idle`` seconds of no traffic: the idle cost, as a share of one core.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import sqlbus

TOKEN = "benchmark-token-of-32-characters"
SCHEMA = "sqlbus_dashboard_bench"  # the schema --postgres builds in (dropped first)
OPTIONS: dict[str, str] = {}  # connect() keywords: the schema on PostgreSQL


def build(path: Path, archived: int, queued: int) -> None:
    """Fill a new file: ``archived`` acked messages (alice to bob), ``queued`` ready ones in
    carol's inbox (one in 1,000 holds the word "needle"), 20 dead letters, 20 leases, 100
    state keys."""
    with sqlbus.connect(path, archive_max_messages=None, **OPTIONS) as bus:
        alice, bob, _carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
        batch = 1000
        for start in range(0, archived, batch):
            n = min(batch, archived - start)
            alice.publish_many([{"to": "bob", "type": "notification",
                                 "payload": {"i": start + i, "text": "archived work item"}}
                                for i in range(n)])
            while True:
                got = bob.receive(limit=1000)
                if not got:
                    break
                bob.ack(got)
        for start in range(0, queued, batch):
            n = min(batch, queued - start)
            alice.publish_many([{"to": "carol", "type": "request", "priority": 1 + (start + i) % 5,
                                 "payload": {"i": start + i,
                                             "text": "needle" if (start + i) % 1000 == 7
                                             else "hay"}} for i in range(n)])
        dave = bus.agent("dave")
        alice.publish_many([{"to": "dave", "type": "request", "payload": {"i": i}}
                            for i in range(40)])
        for d in dave.receive(limit=20):
            d.fail(RuntimeError("benchmark failure"), retryable=False)
        dave.receive(limit=20, lease=3600)
        for i in range(100):
            bus.state.set(f"team/key{i:03}", {"i": i})


def time_pages(path: Path, repeats: int) -> list[tuple[str, float]]:
    from starlette.testclient import TestClient

    from sqlbus.dashboard.app import create_app

    results = []
    with sqlbus.connect(path, **OPTIONS) as bus:
        deep = bus.peek_page("carol", limit=50)
        for _ in range(100):  # 5,000 rows in: the 101st page
            deep = bus.peek_page("carol", limit=50, after=deep.after)
        archived_id = bus.sent("bob", limit=1)[0].message.id
        dead = bus.dead_letters()[0]
        pages = [
            ("overview", "/"),
            ("agents", "/agents"),
            ("inbox, first page", "/agents/carol"),
            ("inbox, page 101", f"/agents/carol?after={deep.after}"),
            ("inbox, priority 2 ready", "/agents/carol?priority=2&state=ready"),
            ("inbox, text search", "/agents/carol?q=needle"),
            ("message (archived)", f"/messages/{archived_id}"),
            ("leases", "/leases"),
            ("dead letters", "/dead-letters"),
            ("dead letter", f"/dead-letters/{dead.id}"),
            ("state", "/state"),
            ("state key", "/state/team/key042"),
            ("tail page", "/tail"),
            ("metrics", "/metrics"),
            ("healthz", "/healthz"),
        ]
        from sqlbus.metrics import MetricsFollower

        t0 = time.perf_counter()
        bus.metrics()
        full = time.perf_counter() - t0
        follower = MetricsFollower(bus)
        follower.read()  # the first read is a whole one
        t0 = time.perf_counter()
        follower.read()
        later = time.perf_counter() - t0
        print(f"one read of bus.metrics(): {full * 1000:.0f} ms; the dashboard's later reads "
              f"(MetricsFollower): {later * 1000:.1f} ms, one every {max(1.0, 50 * later):.1f} s")
        app = create_app(bus, TOKEN)
        with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            for name, url in pages:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    r = client.get(url)
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200, (url, r.status_code)
                results.append((name, statistics.median(times) * 1000))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cost(path: Path, seconds: float) -> float:
    """The share of one core ``sqlbus dashboard`` uses with two streams open and no traffic."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlbus", "dashboard", "--db", str(path), "--port", str(port),
         "--token", TOKEN, *(["--schema", OPTIONS["schema"]] if OPTIONS else [])], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stop = threading.Event()

    def stream(route: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{route}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=seconds + 30) as r:
            while not stop.is_set() and r.readline():
                pass

    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.search(r"http://127\.0\.0\.1:\d+/", line), line
        deadline = time.monotonic() + 20  # the URL is printed before uvicorn listens
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        threads = [threading.Thread(target=stream, args=(route,), daemon=True)
                   for route in ("/sse/overview", "/sse/tail")]
        for t in threads:
            t.start()
        time.sleep(3)  # start-up and the first reads
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(proc.pid) - before
        return used / (time.monotonic() - t0)
    finally:
        stop.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archived", type=int, default=1_000_000)
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    p.add_argument("--keep", type=Path, help="a database file to reuse (built when missing)")
    p.add_argument("--postgres", metavar="URL", help=f"build in schema {SCHEMA} there instead")
    args = p.parse_args()
    tmp = None
    if args.postgres:
        import psycopg

        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        OPTIONS["schema"] = SCHEMA
        t0 = time.perf_counter()
        build(args.postgres, args.archived, args.queued)  # type: ignore[arg-type]
        print(f"built schema {SCHEMA} ({args.archived:,} archived, {args.queued:,} queued) in "
              f"{time.perf_counter() - t0:.0f} s")
        path: Any = args.postgres
    elif args.keep is not None:
        path = args.keep
    else:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "dashboard.db"
    if not args.postgres and not path.exists():
        t0 = time.perf_counter()
        build(path, args.archived, args.queued)
        print(f"built {path} ({args.archived:,} archived, {args.queued:,} queued) in "
              f"{time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MiB")
    print(f"\n| page | median ms ({args.repeats} loads) |\n|---|---:|")
    for name, ms in time_pages(path, args.repeats):
        print(f"| {name} | {ms:.1f} |")
    share = idle_cost(path, args.idle)
    print(f"\nidle, overview and tail streams open, {args.idle:.0f} s: "
          f"{share * 100:.2f}% of one core")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
