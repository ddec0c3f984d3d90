"""Disk size over a full-speed request/response run with the default settings (issue 21, 4).

    python tools/disk_flat.py                          # 10 minutes, a sample every 30 s
    python tools/disk_flat.py --duration 60 --interval 10   # a smoke run

Two processes on one database, both ``sqlbus.connect(path)`` with nothing but defaults
(retention 7 days, ``archive_max_messages`` 1,000,000): a responder answering ``request``
handlers from ``run()`` and a requester calling ``agent.request()`` in a loop, as fast as it
goes. Every ``--interval`` seconds it prints the elapsed time, the database and WAL sizes,
their sum, the round trips so far and the interval's rate, and the archive's row count (a
read-only look, on a connection of its own). At the end it prints whether the file size
(database + WAL) stayed within ``--tolerance`` of its value at ``--flat-from`` seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import apsw  # noqa: E402

import sqlbus  # noqa: E402

PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}
CTX = mp.get_context("fork")


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def responder(path: str, ready: Any) -> None:
    bus = sqlbus.connect(path)
    agent = bus.agent("echo")
    agent.subscribe("request", lambda message: message.payload)
    ready.set()
    agent.run()


def requester(path: str, count: Any, stop: Any) -> None:
    bus = sqlbus.connect(path)
    agent = bus.agent("client")
    done = 0
    while not stop.is_set():
        agent.request("echo", PAYLOAD, timeout=30.0)
        done += 1
        if done % 100 == 0:
            count.value = done
    count.value = done
    bus.close()


def archive_rows(path: str) -> int:
    """Message rows in the file (acked ones are nearly all of them), read-only."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.execute("SELECT count(*) FROM message").fetchall()[0][0])
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--flat-from", type=float, default=120.0,
                        help="the sample from which the size must stay flat (default 120 s)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed growth (0.10)")
    parser.add_argument("--no-count", action="store_true", help="skip the row count per sample")
    parser.add_argument("--dir", default=None, help="directory for the database")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="sqlbus-disk-", dir=args.dir)
    path = os.path.join(workdir, "bus.db")
    with sqlbus.connect(path) as bus:  # the defaults: nothing passed
        retention = bus.retention()
    print(f"sqlbus {sqlbus.__version__}, SQLite {apsw.sqlite_lib_version()}, {os.cpu_count()} "
          f"cores, defaults ({retention}), {path}", flush=True)
    ready, stop = CTX.Event(), CTX.Event()
    count = CTX.Value("q", 0)
    echo = CTX.Process(target=responder, args=(path, ready), daemon=True)
    echo.start()
    ready.wait(30)
    client = CTX.Process(target=requester, args=(path, count, stop), daemon=True)
    started = time.monotonic()
    client.start()
    print("| s | db MB | wal MB | total MB | round trips | per s | message rows |")
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    samples: list[tuple[float, int]] = []
    capped_at: float | None = None  # when the archive first reached its cap
    last_count, last_t = 0, started
    try:
        while True:
            next_at = started + (len(samples) + 1) * args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            db, wal = size(path), size(path + "-wal")
            done = count.value
            counted = None if args.no_count else archive_rows(path)
            rows = "-" if counted is None else f"{counted:,}"
            rate = (done - last_count) / (now - last_t)
            last_count, last_t = done, now
            elapsed = now - started
            samples.append((elapsed, db + wal))
            cap = retention.archive_max_messages
            if capped_at is None and counted is not None and cap is not None and counted >= cap:
                capped_at = elapsed
            print(f"| {elapsed:.0f} | {db / 1e6:.1f} | {wal / 1e6:.1f} | {(db + wal) / 1e6:.1f} "
                  f"| {done:,} | {rate:,.0f} | {rows} |", flush=True)
            if elapsed >= args.duration - 0.5:
                break
    finally:
        stop.set()
        client.join(30)
        echo.kill()
        echo.join(5)
    base = next((total for t, total in samples if t >= args.flat_from - 0.5), None)
    if base is None:
        print("\nthe run was too short to judge flatness")
        return 0
    later = [total for t, total in samples if t >= args.flat_from - 0.5]
    growth = max(later) / base - 1
    verdict = "FLAT" if growth <= args.tolerance else "GROWING"
    print(f"\nfrom {args.flat_from:.0f} s: {base / 1e6:.1f} MB, max after {max(later) / 1e6:.1f} MB, "
          f"growth {growth * 100:+.1f}% (tolerance {args.tolerance * 100:.0f}%): {verdict}")
    if capped_at is not None:
        capped = [total for t, total in samples if t >= capped_at]
        growth = max(capped) / capped[0] - 1
        print(f"from {capped_at:.0f} s, when the archive reached its cap: {capped[0] / 1e6:.1f} MB, "
              f"max after {max(capped) / 1e6:.1f} MB, growth {growth * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
