"""Throughput of sqlbus on PostgreSQL against raw psycopg doing the same logical work, in one run.

    python benchmarks/throughput.py --postgres                      # the local server
    python benchmarks/throughput.py --postgres URL --quick          # small N, 100,000 backlog

Every run uses fresh schemas (``bench_<hex>``), dropped afterwards. The raw baseline is psycopg
on an autocommit connection with explicit ``BEGIN``/``COMMIT`` (what sqlbus and a psycopg
connection in its default mode send), a table ``(id identity primary key, visible_at bigint,
body bytea)`` and the same ~200-byte JSON body:

- publish = ``BEGIN; INSERT; COMMIT`` (the single-statement autocommit INSERT, one round trip
  instead of three, is printed too, as the floor);
- batch = ``executemany`` of 100 rows in one transaction (psycopg pipelines it);
- claim = ``UPDATE ... WHERE id = (SELECT id ... ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING`` in one transaction, then ``DELETE`` in another.

Both sides run at the same ``synchronous_commit``: ``off`` against ``durability="normal"``, ``on``
against ``durability="full"``. The multi-process and backlog figures run at ``off`` (the
default durability). Every figure is the median of ``--repeats`` runs, raw and sqlbus
interleaved so the machine's drift hits both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from throughput import (
    PAYLOAD,
    PAYLOAD_BYTES,
    bus_publish,
    bus_publish_many,
    bus_receive_ack,
    bus_receive_ack_batches,
    prefill,
)

import sqlbus

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CTX = mp.get_context("fork")
DURABILITY = {"off": "normal", "on": "full"}  # synchronous_commit -> sqlbus durability


@contextmanager
def fresh_schema(url: str, prefix: str = "bench") -> Iterator[str]:
    """A new schema name (not created: sqlbus and Raw create their own), dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- raw psycopg -------------------------------------------------------------------------------


class Raw:
    """A plain queue table in its own schema, driven with psycopg the way a user would."""

    def __init__(self, url: str, schema: str, synchronous_commit: str, create: bool = True) -> None:
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        self.conn.execute("SELECT set_config('synchronous_commit', %s, false)",
                          (synchronous_commit,))
        table = sql.Identifier(schema, "queue")
        if create:
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(schema)))
            self.conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " visible_at bigint NOT NULL, body bytea NOT NULL)").format(table))
        self.insert_sql = sql.SQL("INSERT INTO {} (visible_at, body) VALUES (0, %s)").format(table)
        self.notify_sql = sql.SQL(
            "WITH i AS (INSERT INTO {} (visible_at, body) VALUES (0, %s))"
            " SELECT pg_notify('bench_raw', '')").format(table)
        self.claim_sql = sql.SQL(
            "UPDATE {t} SET visible_at = %s WHERE id = (SELECT id FROM {t} WHERE visible_at <= %s"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, body").format(t=table)
        self.delete_sql = sql.SQL("DELETE FROM {} WHERE id = %s").format(table)

    def insert(self, n: int) -> int:
        execute = self.conn.execute
        for _ in range(n):
            execute(b"BEGIN")
            execute(self.insert_sql, (PAYLOAD_BYTES,))
            execute(b"COMMIT")
        return n

    def insert_autocommit(self, n: int) -> int:
        for _ in range(n):
            self.conn.execute(self.insert_sql, (PAYLOAD_BYTES,))
        return n

    def insert_notify(self, n: int) -> int:
        """INSERT with a ``pg_notify`` in the same transaction: NOTIFY's price, raw."""
        execute = self.conn.execute
        for _ in range(n):
            execute(b"BEGIN")
            execute(self.notify_sql, (PAYLOAD_BYTES,))
            execute(b"COMMIT")
        return n

    def insert_batches(self, n: int, batch: int = 100) -> int:
        rows = [(PAYLOAD_BYTES,)] * batch
        with self.conn.cursor() as cur:
            for _ in range(n // batch):
                cur.execute(b"BEGIN")
                cur.executemany(self.insert_sql, rows)
                cur.execute(b"COMMIT")
        return n // batch * batch

    def claim_delete(self, n: int) -> int:
        execute = self.conn.execute
        done = 0
        for _ in range(n):
            now = int(time.time() * 1000)
            execute(b"BEGIN")
            row = execute(self.claim_sql, (now + 30_000, now)).fetchone()
            execute(b"COMMIT")
            if row is None:
                break
            execute(b"BEGIN")
            execute(self.delete_sql, (row[0],))
            execute(b"COMMIT")
            done += 1
        return done

    def close(self) -> None:
        self.conn.close()


# -- measuring ---------------------------------------------------------------------------------


def paired(runs: list[Callable[[], int]], repeats: int) -> list[float]:
    """The median rate (operations/s) of each of ``runs``, run in turn ``repeats`` times, one
    after the other in each round, so drift of the machine's speed touches all of them."""
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for k, run in enumerate(runs):
            start = time.perf_counter()
            count = run()
            rates[k].append(count / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


def in_processes(count: int, target: Callable[..., int], *args: Any) -> float:
    """Run ``target(*args, k)`` in ``count`` forked processes started together; the rate in
    operations/s over the whole span (first start to last end, wall clock)."""
    barrier, out = CTX.Barrier(count), CTX.Queue()

    def child(k: int) -> None:
        barrier.wait(60)
        start = time.time()
        try:
            done = target(*args, k)
        except BaseException as exc:  # the parent says what broke instead of waiting for it
            out.put((start, time.time(), -1, f"{type(exc).__name__}: {exc}"))
            raise
        out.put((start, time.time(), done, None))

    procs = [CTX.Process(target=child, args=(k,), daemon=True) for k in range(count)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [r[3] for r in results if r[3] is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} processes failed: {errors[0]}")
    total = sum(r[2] for r in results)
    return total / (max(r[1] for r in results) - min(r[0] for r in results))


def _bus(url: str, schema: str, sync: str = "off") -> sqlbus.Bus:
    return sqlbus.connect(url, schema=schema, durability=DURABILITY[sync])


# -- the parts of the run ----------------------------------------------------------------------


def single_process(url: str, sync: str, n: int, repeats: int, record: Callable[..., None]) -> None:
    """The four one-process workloads, sqlbus against raw, at ``synchronous_commit=sync``."""
    with fresh_schema(url, "bench_raw") as raw_schema, fresh_schema(url) as bus_schema:
        raw = Raw(url, raw_schema, sync)
        bus = _bus(url, bus_schema, sync)
        producer, consumer = bus.agent("producer"), bus.agent("consumer")
        tag = f"[sync {sync}]"
        try:
            floor, base, ours = paired([lambda: raw.insert_autocommit(n), lambda: raw.insert(n),
                                        lambda: bus_publish(producer, n)], repeats)
            record(f"{tag} publish, one per transaction", ours, base, ">= 0.70")
            print(f"    (raw autocommit INSERT, one round trip: {floor:,.0f}/s; sqlbus at "
                  f"{ours / floor:.2f}x of it)", flush=True)
            base, ours = paired([lambda: raw.insert_batches(n * 5),
                                 lambda: bus_publish_many(producer, n * 5)], repeats)
            record(f"{tag} publish_many, batches of 100", ours, base, ">= 0.50")

            raw.conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(raw_schema, "queue")))
            bus_receive_ack_batches(consumer, 10**9)  # drain what the publish runs left
            raw.insert_batches(n * repeats)
            prefill(producer, "consumer", n * repeats)
            base, ours = paired([lambda: raw.claim_delete(n),
                                 lambda: bus_receive_ack(consumer, n)], repeats)
            record(f"{tag} receive + ack, one at a time", ours, base, ">= 0.70")
            raw_one = base

            prefill(producer, "consumer", n * 5 * repeats)
            (ours,) = paired([lambda: bus_receive_ack_batches(consumer, n * 5)], repeats)
            record(f"{tag} receive(limit=100) + batch ack vs raw single claim", ours, raw_one,
                   ">= 3.00")
        finally:
            bus.close()
            raw.close()


def _consume(url: str, schema: str, k: int) -> int:
    with _bus(url, schema) as bus:
        return bus_receive_ack(bus.agent("consumer"), 10**9)


def _raw_consume(url: str, schema: str, k: int) -> int:
    raw = Raw(url, schema, "off", create=False)
    try:
        return raw.claim_delete(10**9)
    finally:
        raw.close()


def consumers(url: str, n: int, repeats: int, record: Callable[..., None]) -> None:
    """1 and 4 consumer processes draining one inbox (receive + ack one at a time)."""
    total = n * 2
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for procs in (1, 4):
            with fresh_schema(url) as schema:
                with _bus(url, schema) as bus:
                    prefill(bus.agent("producer"), "consumer", total)
                rates.setdefault(("sqlbus", procs), []).append(
                    in_processes(procs, _consume, url, schema))
            with fresh_schema(url, "bench_raw") as schema:
                raw = Raw(url, schema, "off")
                raw.insert_batches(total)
                raw.close()
                rates.setdefault(("raw", procs), []).append(
                    in_processes(procs, _raw_consume, url, schema))
    med = {key: statistics.median(v) for key, v in rates.items()}
    record("receive + ack, 4 consumer processes vs 1 (one inbox)", med["sqlbus", 4],
           med["sqlbus", 1], ">= 1.50")
    print(f"    (raw claim + delete: 1 process {med['raw', 1]:,.0f}/s, 4 processes "
          f"{med['raw', 4]:,.0f}/s = {med['raw', 4] / med['raw', 1]:.2f}x)", flush=True)


def _publish(url: str, schema: str, n: int, k: int) -> int:
    with _bus(url, schema) as bus:
        return bus_publish(bus.agent(f"producer-{k}"), n)


def _raw_publish(url: str, schema: str, n: int, notify: bool, k: int) -> int:
    raw = Raw(url, schema, "off", create=False)
    try:
        return raw.insert_notify(n) if notify else raw.insert(n)
    finally:
        raw.close()


def publishers(url: str, n: int, repeats: int, record: Callable[..., None]) -> dict[str, float]:
    """The price of NOTIFY: publish rates of 1 and 4 processes, each with its own bus, against
    raw INSERTs without and with a ``pg_notify`` in the transaction (synchronous_commit off)."""
    rates: dict[str, list[float]] = {}
    each = max(200, n // 4)
    with fresh_schema(url) as schema, fresh_schema(url, "bench_raw") as raw_schema:
        _bus(url, schema).close()
        Raw(url, raw_schema, "off").close()
        for _ in range(repeats):
            for procs in (1, 4):
                rates.setdefault(f"sqlbus x{procs}", []).append(
                    in_processes(procs, _publish, url, schema, each))
                rates.setdefault(f"raw x{procs}", []).append(
                    in_processes(procs, _raw_publish, url, raw_schema, each, False))
                rates.setdefault(f"raw+notify x{procs}", []).append(
                    in_processes(procs, _raw_publish, url, raw_schema, each, True))
    med = {key: statistics.median(v) for key, v in rates.items()}
    record("publish, 4 publisher processes (each its own bus) vs raw INSERT x4",
           med["sqlbus x4"], med["raw x4"], "report")
    print("    publish rates (all processes together, msgs/s): " + ", ".join(
        f"{key} {value:,.0f}" for key, value in med.items()), flush=True)
    return med


def explain_claim(url: str, schema: str) -> str:
    """The plan of sqlbus's claim statement on ``schema``'s bus (EXPLAIN ANALYZE through
    auto_explain, of one claim rolled back), or a line saying why there is none."""
    try:
        from sqlbus.postgres import queue
    except ImportError as exc:
        return f"(no plan: {exc})"
    lines: list[str] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.add_notice_handler(lambda diag: lines.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for name, value in (("auto_explain.log_min_duration", "0"),
                            ("auto_explain.log_analyze", "on"),
                            ("auto_explain.log_buffers", "on"),
                            ("auto_explain.log_nested_statements", "on"),
                            ("client_min_messages", "log")):
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        now = int(time.time() * 1000)
        try:
            with conn.transaction(force_rollback=True):
                queue.claim(conn, schema, "consumer", now, now + 30_000, 1)
        except (TypeError, AttributeError, psycopg.Error) as exc:
            return f"(no plan: sqlbus.postgres.queue.claim failed: {exc})"
    plans = [line for line in lines if "UPDATE" in line and "message" in line]
    return plans[-1] if plans else "\n".join(lines) or "(no plan was reported)"


def _prefill_fast(url: str, schema: str, count: int) -> float:
    """Fill the inbox of 'consumer' with ``count`` messages (publish_many of 1,000, ttl 0);
    the seconds it took."""
    started = time.perf_counter()
    with _bus(url, schema) as bus:
        prefill(bus.agent("producer"), "consumer", count)
    return time.perf_counter() - started


def backlog(url: str, big: int, measure: int, repeats: int, record: Callable[..., None]) -> str:
    """receive + ack rate with 1,000 and with ``big`` messages waiting; the claim's plan at
    ``big``."""
    with fresh_schema(url) as small_schema, fresh_schema(url) as big_schema:
        for schema, size in ((small_schema, 1_000), (big_schema, big)):
            secs = _prefill_fast(url, schema, size + measure * repeats)
            print(f"  prefilled {size + measure * repeats:,} in {secs:.1f} s", flush=True)
        small, large = _bus(url, small_schema), _bus(url, big_schema)
        try:
            rate_small, rate_big = paired(
                [lambda: bus_receive_ack(small.agent("consumer"), measure),
                 lambda: bus_receive_ack(large.agent("consumer"), measure)], repeats)
        finally:
            small.close()
            large.close()
        record(f"receive + ack at backlog {big:,} vs 1,000", rate_big, rate_small, ">= 0.80")
        return explain_claim(url, big_schema)


def run(url: str, n: int, repeats: int, big: int) -> int:
    """The whole PostgreSQL section; prints the figures and a Markdown table."""
    results: list[tuple[str, float, float, str]] = []

    def record(name: str, ours: float, base: float, target: str) -> None:
        results.append((name, ours, base, target))
        print(f"  {name}: sqlbus {ours:,.0f}/s, baseline {base:,.0f}/s, ratio {ours / base:.2f}",
              flush=True)

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    print(f"sqlbus {sqlbus.__version__} on PostgreSQL {server} ({url}), psycopg "
          f"{psycopg.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"n={n}, repeats={repeats}", flush=True)
    for sync in ("off", "on"):
        single_process(url, sync, n if sync == "off" else max(500, n // 2), repeats, record)
    consumers(url, n, repeats, record)
    publishers(url, n, repeats, record)
    plan = backlog(url, big, min(n, 2_000), repeats, record)
    print("\nEXPLAIN ANALYZE of sqlbus's claim (receive(limit=1)) at the big backlog:")
    print(plan)
    print()
    print("| workload | sqlbus msg/s | baseline msg/s | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for name, ours, base, target in results:
        verdict = ""
        if target.startswith(">="):
            verdict = " met" if float(target.split()[-1]) <= ours / base else " MISSED"
        print(f"| {name} | {ours:,.0f} | {base:,.0f} | {ours / base:.2f} | {target}{verdict} |")
    print("\nBaselines: raw psycopg doing the same logical work at the same synchronous_commit, "
          "except the 4-vs-1 row (sqlbus with 1 consumer process), the backlog row (sqlbus at a "
          "1,000 backlog) and the batch-receive row (raw one-at-a-time claim + delete).")
    return 0


__all__ = ["DEFAULT_URL", "PAYLOAD", "Raw", "fresh_schema", "run"]


# -- raw round trips (the floor for latency.py --postgres) ------------------------------------

_RT_TABLES = ("CREATE TABLE {s}.req (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
              " body bytea NOT NULL); CREATE TABLE {s}.resp (id bigint GENERATED ALWAYS AS"
              " IDENTITY PRIMARY KEY, body bytea NOT NULL)")


def _raw_responder(url: str, schema: str, ready: Any) -> None:
    """Answer each request: on its NOTIFY, claim it, write the reply and NOTIFY, in one
    transaction (what sqlbus's responder does, without sqlbus)."""
    s = sql.Identifier(schema)
    claim = sql.SQL("DELETE FROM {s}.req WHERE id = (SELECT id FROM {s}.req ORDER BY id LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) RETURNING body").format(s=s)
    reply = sql.SQL("INSERT INTO {s}.resp (body) VALUES (%s)").format(s=s)
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"{schema}_req")))
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET synchronous_commit = off")
    ready.set()
    while True:
        for _ in listener.notifies(timeout=1.0, stop_after=1):
            while True:
                conn.execute(b"BEGIN")
                row = conn.execute(claim).fetchone()
                if row is None:
                    conn.execute(b"COMMIT")
                    break
                conn.execute(reply, (row[0],))
                conn.execute("SELECT pg_notify(%s, '')", (f"{schema}_resp",))
                conn.execute(b"COMMIT")


def raw_round_trips(url: str, n: int) -> list[float]:
    """Seconds per request/response round trip between two processes with raw psycopg and
    LISTEN/NOTIFY, at synchronous_commit off: the client commits a request with a NOTIFY,
    waits for the reply's NOTIFY on its listener and claims the reply (DELETE ... RETURNING)."""
    with fresh_schema(url, "bench_rt") as schema:
        s = sql.Identifier(schema)
        conn = psycopg.connect(url, autocommit=True)
        conn.execute(sql.SQL(f"CREATE SCHEMA {{s}}; {_RT_TABLES}").format(s=s))
        conn.execute("SET synchronous_commit = off")
        ready = CTX.Event()
        child = CTX.Process(target=_raw_responder, args=(url, schema, ready), daemon=True)
        child.start()
        listener = psycopg.connect(url, autocommit=True)
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"{schema}_resp")))
        ask = sql.SQL("INSERT INTO {s}.req (body) VALUES (%s)").format(s=s)
        take = sql.SQL("DELETE FROM {s}.resp WHERE id = (SELECT id FROM {s}.resp ORDER BY id"
                       " LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING body").format(s=s)
        try:
            ready.wait(30)
            times = []
            for k in range(n + 20):  # the first 20 warm up
                started = time.perf_counter()
                conn.execute(b"BEGIN")
                conn.execute(ask, (PAYLOAD_BYTES,))
                conn.execute("SELECT pg_notify(%s, '')", (f"{schema}_req",))
                conn.execute(b"COMMIT")
                while conn.execute(take).fetchone() is None:
                    for _ in listener.notifies(timeout=1.0, stop_after=1):
                        pass
                if k >= 20:
                    times.append(time.perf_counter() - started)
            return times
        finally:
            child.terminate()
            child.join(10)
            listener.close()
            conn.close()
