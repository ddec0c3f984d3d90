"""What one publish, one claim and one ack write: WAL frames (pages) per commit and the
B-trees those pages belong to (issue 21, 2).

    python benchmarks/write_cost.py                    # the table, after a warm-up
    python benchmarks/write_cost.py --loop publish --n 20000   # a loop to run under strace
    strace -f -c -e trace=pwrite64,pread64,fdatasync,fsync \\
        python benchmarks/write_cost.py --loop publish --n 20000

The table: for each operation, the frames its commit appended to the WAL, and which B-tree
(table or index, from SQLite's ``dbstat``) each frame's page belongs to, on a database
warmed with ``--warm`` messages published and half of them acked (so the trees have a few
levels, as in use). The background checkpointer is held off so the WAL only grows.
``--loop OP`` runs ``--n`` of one operation (publish, publish_many (batches of 100),
receive_ack) and prints its wall time, for strace or a profiler; run it also with ``--n 0``
to subtract the setup's system calls.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from collections.abc import Callable

import apsw

import sqlbus
import sqlbus.sqlite.checkpoint

PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}
WAL_HEADER, FRAME_HEADER = 32, 24


def wal_frames(path: str, page_size: int) -> int:
    try:
        size = os.path.getsize(path + "-wal")
    except OSError:
        return 0
    return max(0, (size - WAL_HEADER) // (FRAME_HEADER + page_size))


def frame_pages(path: str, page_size: int, first: int, last: int) -> list[int]:
    """The page numbers of WAL frames ``first`` .. ``last - 1``."""
    pages = []
    with open(path + "-wal", "rb") as wal:
        for frame in range(first, last):
            wal.seek(WAL_HEADER + frame * (FRAME_HEADER + page_size))
            pages.append(int.from_bytes(wal.read(4), "big"))
    return pages


def page_owners(path: str) -> dict[int, str]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        owners = {int(page): str(name) for name, page in conn.execute("SELECT name, pageno FROM dbstat")}
    finally:
        conn.close()
    owners[1] = owners.get(1, "sqlite_schema") + " (page 1: header)"
    return owners


def measure(path: str, page_size: int, label: str, op: Callable[[], object], rows: list[str]) -> None:
    before = wal_frames(path, page_size)
    op()
    after = wal_frames(path, page_size)
    pages = frame_pages(path, page_size, before, after)
    owners = page_owners(path)
    trees = collections.Counter(owners.get(page, "free or new") for page in pages)
    listed = ", ".join(f"{name} {count}" for name, count in sorted(trees.items()))
    rows.append(f"| {label} | {after - before} | {len(set(pages))} | {len(trees)} | {listed} |")


def breakdown(workdir: str, n: int, repeats: int) -> None:
    """Where a single publish's time goes, from the fair floor up to ``agent.publish``: each
    step adds one thing, measured in one run, interleaved (median of ``repeats``)."""
    import statistics

    import msgspec

    from sqlbus.sqlite import queue as sqlite_queue

    encode = msgspec.json.Encoder().encode

    def floor_conn(path: str) -> apsw.Connection:
        conn = apsw.Connection(path)
        conn.execute("PRAGMA page_size=2048")
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE queue (seq INTEGER PRIMARY KEY, agent TEXT NOT NULL,"
                     " priority INTEGER NOT NULL, body BLOB NOT NULL);"
                     "CREATE INDEX queue_claim ON queue (agent, priority DESC, seq)")
        return conn

    floor = floor_conn(os.path.join(workdir, "floor.db"))
    bus = sqlbus.connect(os.path.join(workdir, "steps.db"))
    producer = bus.agent("producer")
    bus.agent("consumer")
    no_id = sqlbus.connect(os.path.join(workdir, "no-id.db"))
    no_id.agent("consumer")
    no_id_producer = no_id.agent("producer")
    no_id.engine.connection().execute("DROP INDEX message_id")
    raw_paths = [os.path.join(workdir, f"{name}.db") for name in ("raw", "raw-no-id")]
    for raw_path in raw_paths:
        sqlbus.connect(raw_path).close()
    raw_bus, raw_no_id = (apsw.Connection(raw_path) for raw_path in raw_paths)
    raw_no_id.execute("DROP INDEX message_id")
    for conn in (raw_bus, raw_no_id):  # as sqlbus's own connections (sqlbus.sqlite.connection)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-16000")
        conn.set_busy_timeout(5000)
    sample = producer.publish("consumer", "notification", PAYLOAD, ttl=0)
    body = bus.engine.connection().execute("SELECT body FROM message WHERE message_id = ?", (sample,)).fetchall()[0][0]

    def floor_step() -> None:
        for _ in range(n):
            b = encode(PAYLOAD)
            floor.execute("BEGIN IMMEDIATE")
            floor.execute("INSERT INTO queue (agent, priority, body) VALUES ('consumer', 3, ?)", (b,))
            floor.execute("COMMIT")

    def sql_step(conn: apsw.Connection) -> Callable[[], None]:
        def step() -> None:
            now = int(time.time() * 1000)
            for i in range(n):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(sqlite_queue._INSERT_ONE, (
                    f"msg-{now}-{i:09d}", "producer", "consumer", "notification", None, 3, 0,
                    now, None, now, None, body))
                conn.execute("COMMIT")
        return step

    def bus_step(agent: sqlbus.Agent) -> Callable[[], None]:
        def step() -> None:
            for _ in range(n):
                agent.publish("consumer", "notification", PAYLOAD, ttl=0)
        return step

    steps = {
        "fair floor (encode, 1 row, 1 index)": floor_step,
        "sqlbus's INSERT alone, without the message_id index": sql_step(raw_no_id),
        "sqlbus's INSERT alone (its schema and row)": sql_step(raw_bus),
        "agent.publish without the message_id index": bus_step(no_id_producer),
        "agent.publish": bus_step(producer),
    }
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            rates[name].append(n / (time.perf_counter() - started))
    base = statistics.median(rates["fair floor (encode, 1 row, 1 index)"])
    print(f"single publish, n={n}, median of {repeats}, interleaved")
    print()
    print("| step | msg/s | vs floor | us per publish |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {1e6 / rate:.1f} |")
    for b in (bus, no_id):
        b.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=20_000, help="messages published first")
    parser.add_argument("--loop", choices=("publish", "publish_many", "receive_ack"), default=None)
    parser.add_argument("--n", type=int, default=20_000, help="operations of --loop")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--durability", default="normal", help="of the bus (normal, full)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time a single publish step by step from the fair floor up")
    parser.add_argument("--repeats", type=int, default=5, help="--breakdown's runs (median)")
    args = parser.parse_args(argv)
    sqlbus.sqlite.checkpoint.CHECKPOINT_FRAMES = 1 << 40  # the WAL only grows: frames are countable
    workdir = tempfile.mkdtemp(prefix="sqlbus-cost-", dir=args.dir)
    if args.breakdown:
        breakdown(workdir, args.n, args.repeats)
        return 0
    path = os.path.join(workdir, "bus.db")
    bus = sqlbus.connect(path, durability=args.durability)
    producer, consumer = bus.agent("producer"), bus.agent("consumer")
    if args.loop:
        if args.loop == "receive_ack":
            item = {"to": "consumer", "type": "notification", "payload": PAYLOAD, "ttl": 0}
            for start in range(0, args.n, 1000):
                producer.publish_many([item] * min(1000, args.n - start))
        started = time.perf_counter()
        if args.loop == "publish":
            for _ in range(args.n):
                producer.publish("consumer", "notification", PAYLOAD, ttl=0)
        elif args.loop == "publish_many":
            items = [{"to": "consumer", "type": "notification", "payload": PAYLOAD, "ttl": 0}] * 100
            for _ in range(args.n // 100):
                producer.publish_many(items)
        else:
            for _ in range(args.n):
                consumer.receive()[0].ack()
        print(f"{args.loop} x {args.n}: {time.perf_counter() - started:.3f} s")
        bus.close()
        return 0
    item = {"to": "consumer", "type": "notification", "payload": PAYLOAD, "ttl": 0}
    for start in range(0, args.warm, 1000):
        producer.publish_many([item] * min(1000, args.warm - start))
    for d in consumer.receive(limit=args.warm // 2):
        d.ack()
    page_size = int(bus.engine.connection().execute("PRAGMA page_size").fetchall()[0][0])
    rows: list[str] = []
    for i in range(3):  # a few of each: the first may split a page
        measure(path, page_size, f"publish #{i + 1}",
                lambda: producer.publish("consumer", "notification", PAYLOAD, ttl=0), rows)
    measure(path, page_size, "publish_many of 100",
            lambda: producer.publish_many([item] * 100), rows)
    held = []
    for i in range(3):
        measure(path, page_size, f"receive (claim) #{i + 1}",
                lambda: held.extend(consumer.receive()), rows)
    for i in range(3):
        measure(path, page_size, f"ack #{i + 1}", lambda i=i: held[i].ack(), rows)
    echo = bus.agent("echo")
    echo.subscribe("request", lambda message: message.payload)
    client = bus.agent("client")
    measure(path, page_size, "request published",
            lambda: client.publish("echo", "request", PAYLOAD, correlation_id="c1"), rows)
    measure(path, page_size, "response published (with an ack: d.reply)",
            lambda: [(d.reply(PAYLOAD), d.ack()) for d in echo.receive()], rows)
    print(f"sqlbus {sqlbus.__version__}, SQLite {apsw.sqlite_lib_version()}, page size "
          f"{page_size}, warm: {args.warm:,} published, {args.warm // 2:,} acked")
    print()
    print("| operation | WAL frames | distinct pages | B-trees | pages per B-tree |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(row)
    bus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
