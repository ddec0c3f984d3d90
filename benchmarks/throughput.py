"""Throughput of sqlbus against raw apsw doing the same logical work, in one run.

    python benchmarks/throughput.py                 # full run (1,000,000 backlog: a few minutes)
    python benchmarks/throughput.py --quick         # small N, 100,000 backlog
    python benchmarks/throughput.py --postgres [URL]  # the same on PostgreSQL (pg_throughput.py)
    python benchmarks/throughput.py --group-commit --fanout   # and the issue 21 sections

Every figure is the median of ``--repeats`` runs, on files in one temporary directory (same
file system). Raw apsw: WAL, synchronous=NORMAL, one INSERT per BEGIN IMMEDIATE transaction;
claim = one ``UPDATE ... RETURNING`` transaction then one DELETE transaction. Payloads are
~200-byte JSON objects. The ratio column is sqlbus / raw; the target column is issue 2's.

The fair floor (issue 21): raw apsw doing the least a durable priority queue must do per
publish: msgspec-encode the payload, insert one row into a table with one claim-order index
(``(agent, priority DESC, seq)``), one transaction per call (``executemany`` of 100 per
transaction for batches; synchronous=FULL for durability="full"). The publish rows print their
ratio against both the bare baseline above and this floor, with issue 21's targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import apsw
import msgspec

import sqlbus

PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}
PAYLOAD_BYTES = sqlbus.encoding.encode_json(PAYLOAD)


def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median of ``repeats`` runs of ``run`` (which returns how many operations it did)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


# -- raw apsw ---------------------------------------------------------------------------------


def wal_connection(path: str, synchronous: str, ddl: str) -> apsw.Connection:
    """A raw connection in WAL mode at ``synchronous``, with the tables ``ddl`` makes."""
    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.set_busy_timeout(5000)
    conn.execute(ddl)
    return conn


def raw_connection(path: str, synchronous: str = "NORMAL") -> apsw.Connection:
    return wal_connection(path, synchronous,
                          "CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY,"
                          " visible_at INTEGER NOT NULL, body BLOB NOT NULL)")


def raw_insert(conn: apsw.Connection, n: int) -> int:
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO queue (visible_at, body) VALUES (0, ?)", (PAYLOAD_BYTES,))
        conn.execute("COMMIT")
    return n


def raw_insert_batches(conn: apsw.Connection, n: int, batch: int = 100) -> int:
    rows = [(PAYLOAD_BYTES,)] * batch
    for _ in range(n // batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO queue (visible_at, body) VALUES (0, ?)", rows)
        conn.execute("COMMIT")
    return n // batch * batch


# -- the fair floor (issue 21) -------------------------------------------------------------------

_floor_encode = msgspec.json.Encoder().encode


def floor_connection(path: str, synchronous: str = "NORMAL") -> apsw.Connection:
    """The floor's table: one row per message, one index in claim order."""
    return wal_connection(path, synchronous,
                          "CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY,"
                          " agent TEXT NOT NULL, priority INTEGER NOT NULL, body BLOB NOT NULL);"
                          "CREATE INDEX IF NOT EXISTS queue_claim ON queue (agent, priority DESC, seq)")


def floor_insert(conn: apsw.Connection, n: int) -> int:
    """Per call: encode the payload, one row, one transaction."""
    for _ in range(n):
        body = _floor_encode(PAYLOAD)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO queue (agent, priority, body) VALUES ('consumer', 3, ?)", (body,))
        conn.execute("COMMIT")
    return n


def floor_insert_batches(conn: apsw.Connection, n: int, batch: int = 100) -> int:
    """Per batch: encode each payload, one executemany, one transaction."""
    for _ in range(n // batch):
        rows = [(_floor_encode(PAYLOAD),) for _ in range(batch)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO queue (agent, priority, body) VALUES ('consumer', 3, ?)", rows)
        conn.execute("COMMIT")
    return n // batch * batch


def raw_claim_delete(conn: apsw.Connection, n: int) -> int:
    done = 0
    for _ in range(n):
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "UPDATE queue SET visible_at = ? WHERE id = (SELECT id FROM queue WHERE visible_at <= ?"
            " ORDER BY id LIMIT 1) RETURNING id, body",
            (now + 30_000, now),
        ).fetchall()
        conn.execute("COMMIT")
        if not rows:
            break
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM queue WHERE id = ?", (rows[0][0],))
        conn.execute("COMMIT")
        done += 1
    return done


# -- sqlbus -----------------------------------------------------------------------------------


def prefill(agent: sqlbus.Agent, to: str, n: int, batch: int = 1000) -> None:
    item = {"to": to, "type": "notification", "payload": PAYLOAD, "ttl": 0}
    for start in range(0, n, batch):
        agent.publish_many([item] * min(batch, n - start))


def bus_publish(agent: sqlbus.Agent, n: int) -> int:
    for _ in range(n):
        agent.publish("consumer", "notification", PAYLOAD, ttl=0)
    return n


def bus_publish_many(agent: sqlbus.Agent, n: int, batch: int = 100) -> int:
    items = [{"to": "consumer", "type": "notification", "payload": PAYLOAD, "ttl": 0}] * batch
    for _ in range(n // batch):
        agent.publish_many(items)
    return n // batch * batch


def bus_receive_ack(agent: sqlbus.Agent, n: int) -> int:
    done = 0
    for _ in range(n):
        deliveries = agent.receive()
        if not deliveries:
            break
        deliveries[0].ack()
        done += 1
    return done


def bus_receive_ack_batches(agent: sqlbus.Agent, n: int, batch: int = 100) -> int:
    done = 0
    while done < n:
        deliveries = agent.receive(limit=batch)
        if not deliveries:
            break
        agent.ack(deliveries)
        done += len(deliveries)
    return done


def receive_rows(
    args: argparse.Namespace, n: int, repeats: int, workdir: str, raw: apsw.Connection,
    producer: sqlbus.Agent, consumer: sqlbus.Agent, record: Callable[[str, float, float, str], None],
) -> None:
    """The receive rows: one at a time, batches, and the cost at a large backlog."""
    raw.execute("DELETE FROM queue")
    bus_receive_ack_batches(consumer, 10**9)  # drain what the publish runs left
    raw_insert_batches(raw, n * repeats)
    prefill(producer, "consumer", n * repeats)
    raw_one = median_rate(lambda: raw_claim_delete(raw, n), repeats)
    ours_one = median_rate(lambda: bus_receive_ack(consumer, n), repeats)
    record("receive + ack, one at a time", ours_one, raw_one, ">= 0.90")

    prefill(producer, "consumer", n * 5 * repeats)
    ours_many = median_rate(lambda: bus_receive_ack_batches(consumer, n * 5), repeats)
    record("receive(limit=100) + batch ack", ours_many, raw_one, ">= 3.00")

    # Backlog: the same receive+ack rate with 1,000 and with --backlog messages waiting.
    small_bus = sqlbus.connect(os.path.join(workdir, "small.db"))
    big_bus = sqlbus.connect(os.path.join(workdir, "big.db"))
    measure = min(n, 1_000)
    rates = {}
    for label, backlog_bus, backlog in (("small", small_bus, 1_000), ("big", big_bus, args.backlog)):
        p, c = backlog_bus.agent("producer"), backlog_bus.agent("consumer")
        started = time.perf_counter()
        prefill(p, "consumer", backlog + measure * repeats)
        print(f"  prefilled {backlog + measure * repeats:,} in {time.perf_counter() - started:.1f} s",
              flush=True)
        rates[label] = median_rate(lambda c=c: bus_receive_ack(c, measure), repeats)
    record(f"receive + ack at backlog {args.backlog:,} vs 1,000", rates["big"], rates["small"],
           ">= 0.85")

    small_bus.close()
    big_bus.close()


# -- the run ----------------------------------------------------------------------------------


def print_table(base: str, goal: str, rows: list[tuple[str, float, float, str]]) -> None:
    """(workload, sqlbus rate, ``base`` rate, target ratio) rows as a Markdown table."""
    print(f"\n| workload | sqlbus msg/s | {base} msg/s | ratio | {goal} |")
    print("|---|---:|---:|---:|---|")
    for name, ours, theirs, target in rows:
        met = float(target.split()[-1]) <= ours / theirs
        print(f"| {name} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | {target} "
              f"{'met' if met else 'MISSED'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="operations per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="the large backlog")
    parser.add_argument("--quick", action="store_true", help="n=5000, backlog=100000")
    parser.add_argument("--dir", default=None, help="directory for the database files")
    parser.add_argument("--publish-only", action="store_true",
                        help="only the publish rows (one, batches of 100, durability=full)")
    parser.add_argument("--group-commit", action="store_true",
                        help="then the group-commit section (benchmarks/group_commit.py --quick)")
    parser.add_argument("--fanout", action="store_true",
                        help="then the fan-out section (benchmarks/fanout.py, 10, 1,000 and "
                             "20,000 recipients)")
    parser.add_argument("--postgres", nargs="?", const="postgresql://postgres@127.0.0.1:5432/test",
                        default=None, metavar="URL",
                        help="run the PostgreSQL section instead, against raw psycopg, in fresh "
                             "schemas of this server (default: the local test server)")
    args = parser.parse_args(argv)
    if args.postgres is not None:
        import pg_throughput  # needs sqlbus[postgres]; imports this file's helpers

        n = 5_000 if args.n == 20_000 else args.n  # PostgreSQL commits cost ~10x SQLite's
        if args.quick:
            n, args.backlog = 2_000, 100_000
        return pg_throughput.run(args.postgres, n, args.repeats, args.backlog)
    if args.quick:
        args.n, args.backlog = 5_000, 100_000
    n, repeats = args.n, args.repeats
    workdir = tempfile.mkdtemp(prefix="sqlbus-bench-", dir=args.dir)
    results: list[tuple[str, float, float, str]] = []

    def record(name: str, ours: float, raw: float, target: str) -> None:
        results.append((name, ours, raw, target))
        print(f"  {name}: sqlbus {ours:,.0f}/s, raw {raw:,.0f}/s, ratio {ours / raw:.2f}", flush=True)

    print(f"sqlbus {sqlbus.__version__}, SQLite {apsw.sqlite_lib_version()}, apsw "
          f"{apsw.apsw_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} cores, n={n}, "
          f"repeats={repeats}, files in {workdir}", flush=True)

    raw = raw_connection(os.path.join(workdir, "raw.db"))
    bus = sqlbus.connect(os.path.join(workdir, "bus.db"))
    producer, consumer = bus.agent("producer"), bus.agent("consumer")

    floor = floor_connection(os.path.join(workdir, "floor.db"))
    floor_results: list[tuple[str, float, float, str]] = []

    def record_floor(name: str, ours: float, fair: float, target: str) -> None:
        floor_results.append((name, ours, fair, target))
        print(f"  {name}: sqlbus {ours:,.0f}/s, fair floor {fair:,.0f}/s, ratio {ours / fair:.2f}",
              flush=True)

    raw_single = median_rate(lambda: raw_insert(raw, n), repeats)
    floor_single = median_rate(lambda: floor_insert(floor, n), repeats)
    ours_single = median_rate(lambda: bus_publish(producer, n), repeats)
    record("publish, one per transaction", ours_single, raw_single, ">= 0.60")
    record_floor("publish, one per transaction", ours_single, floor_single, ">= 0.80")

    raw_batch = median_rate(lambda: raw_insert_batches(raw, n * 5), repeats)
    floor_batch = median_rate(lambda: floor_insert_batches(floor, n * 5), repeats)
    ours_batch = median_rate(lambda: bus_publish_many(producer, n * 5), repeats)
    record("publish_many, batches of 100", ours_batch, raw_batch, ">= 0.50")
    record_floor("publish_many, batches of 100", ours_batch, floor_batch, ">= 0.60")

    if not args.publish_only:
        receive_rows(args, n, repeats, workdir, raw, producer, consumer, record)

    raw_full = raw_connection(os.path.join(workdir, "raw-full.db"), "FULL")
    floor_full = floor_connection(os.path.join(workdir, "floor-full.db"), "FULL")
    bus_full = sqlbus.connect(os.path.join(workdir, "full.db"), durability="full")
    full_producer = bus_full.agent("producer")
    full_n = max(200, n // 20)
    raw_full_rate = median_rate(lambda: raw_insert(raw_full, full_n), repeats)
    floor_full_rate = median_rate(lambda: floor_insert(floor_full, full_n), repeats)
    ours_full = median_rate(lambda: bus_publish(full_producer, full_n), repeats)
    record("publish at durability=full (fsync)", ours_full, raw_full_rate, ">= 0.80")
    record_floor("publish at durability=full (fsync)", ours_full, floor_full_rate, ">= 0.80")

    print_table("baseline", "target", results)
    print("\nBaselines: raw apsw doing the same logical work, except the backlog row (sqlbus at a "
          "1,000 backlog) and the batch-receive row (raw one-at-a-time claim + delete).")
    print_table("fair floor", "target (issue 21)", floor_results)
    print("\nFair floor: raw apsw, msgspec-encode the payload, one row in a table with one "
          "claim-order index (agent, priority DESC, seq), one transaction per call "
          "(executemany of 100 per transaction for batches; synchronous=FULL for the fsync row).")
    for b in (bus, bus_full):
        b.close()
    if args.group_commit:  # 1 vs 8 threads and asyncio tasks publishing, 1 vs 4 acking
        import group_commit

        print("\n## Group commit\n", flush=True)
        group_commit.main(["--quick", "--rounds", "3"])
    if args.fanout:  # one message to N recipients: time, bytes, each recipient's receive rate
        import fanout

        print("\n## Fan-out\n", flush=True)
        fanout.main(["--cases", "10x20,1000x20,20000x20"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
