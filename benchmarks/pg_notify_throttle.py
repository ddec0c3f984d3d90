"""What the notify throttle costs publishers on PostgreSQL: 4 publisher processes (each its own
bus, one message per transaction) at each throttle window, in one run.

    python benchmarks/pg_notify_throttle.py                      # windows 0.005 0.01 0.02 off
    python benchmarks/pg_notify_throttle.py --windows 0.002 0.02 --repeats 3

"off" is a window of 1000 s: a bus then sends one notify and merges every later ring into a
notify that never goes out, so it measures publishing without notifies. Each figure is the
median of ``--repeats`` runs of the total rate; the schema is made fresh and dropped after.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import secrets
import statistics
import time

import psycopg

import sqlbus
import sqlbus.postgres.wakeup as wakeup

URL = "postgresql://postgres@127.0.0.1:5432/test"


def _publisher(url: str, schema: str, window: float, count: int, rates: mp.Queue) -> None:
    wakeup.THROTTLE = window
    with sqlbus.connect(url, schema=schema) as bus:
        agent = bus.agent("producer")
        start = time.perf_counter()
        for n in range(count):
            agent.publish("consumer", "notification", {"n": n})
        rates.put(count / (time.perf_counter() - start))


def total_rate(url: str, schema: str, window: float, count: int, processes: int) -> float:
    ctx = mp.get_context("fork")
    rates: mp.Queue = ctx.Queue()
    children = [ctx.Process(target=_publisher, args=(url, schema, window, count, rates))
                for _ in range(processes)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    return sum(rates.get() for _ in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--windows", nargs="+", default=["0.005", "0.01", "0.02", "off"])
    parser.add_argument("--count", type=int, default=1500, help="messages per publisher")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    schema = f"bench_{secrets.token_hex(5)}"
    sqlbus.connect(args.url, schema=schema).close()
    try:
        print(f"{args.processes} publisher processes, {args.count} messages each, "
              f"median of {args.repeats}")
        windows = [(w, 1000.0 if w == "off" else float(w)) for w in args.windows]
        results: dict[str, list[float]] = {name: [] for name, _ in windows}
        for _ in range(args.repeats):  # interleaved: the machine's drift hits every window
            for name, window in windows:
                results[name].append(total_rate(args.url, schema, window, args.count,
                                                args.processes))
        base = statistics.median(results[windows[-1][0]])
        print("| window (s) | publishes/s, all processes | vs the last |")
        print("|---|---:|---:|")
        for name, _ in windows:
            rate = statistics.median(results[name])
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
