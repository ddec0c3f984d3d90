"""Compare sqlbus with the queues its users already know, on the same workloads, in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/compare.py --quick                 # ~2 minutes, small N
    .venv/bin/python benchmarks/compare.py                         # the full comparison
    .venv/bin/python benchmarks/compare.py --systems sqlbus,redis-list --workloads 1,3,5

Systems (``--systems``): sqlbus, apsw (a raw apsw queue: the floor), persist-queue
(SQLiteAckQueue), litequeue, huey (SqliteStorage), honker (reported as unavailable when its
wheel does not install), redis-list (LPUSH/LMOVE/LREM) and redis-stream (XADD/XREADGROUP/
XACK) on 127.0.0.1:6379 (skipped when no server answers), seed (the seed's one-JSON-file-
per-inbox design); on PostgreSQL (COMPARE_POSTGRES, default the local server; a fresh schema
per store; every system at synchronous_commit COMPARE_PG_SYNC, default off): sqlbus-pg,
pgqueuer, procrastinate, each compared with sqlbus-pg. Each uses its own documented API and default settings; the report records
its version, its pragmas and the adapter's caveats (see benchmarks/peers/).

Workloads (``--workloads``), ~200-byte JSON payloads:
  1 produce     one message per transaction / call
  2 batch       produce in batches of 100 (systems with a batch API)
  3 consume     claim + ack one at a time from a pre-filled queue
  4 pingpong    cross-process round trips (p50/p99), each system's own blocking receive
  5 procs       2 producer + 2 consumer processes: end-to-end rate, lost / duplicated check
  6 backlog     consume rate with 1,000 / 100,000 / 1,000,000 messages waiting

Every figure is the median of ``--repeats`` runs. A run that exceeds ``--budget`` seconds is
cut and marked; a system too slow for the next backlog is cut there and the report says so.
The table goes to stdout and to benchmarks/results/compare-<date>.md with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.peers` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import peers  # noqa: E402
from benchmarks.peers import NAMES, Peer, Unavailable, get_peer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUES = ("q", "ping", "pong")
WORKLOADS = {
    "1": "produce",
    "2": "batch",
    "3": "consume",
    "4": "pingpong",
    "5": "procs",
    "6": "backlog",
}
_ctx = mp.get_context("fork")  # children open their own connections after the fork


@dataclass
class Options:
    n: int = 10_000  # messages for workloads 1-3
    batch: int = 100
    pingpong: int = 2_000  # round trips
    procs_n: int = 20_000  # messages through 2 producers + 2 consumers
    backlogs: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    sample: int = 2_000  # messages consumed per measurement at each backlog
    repeats: int = 3
    budget: float = 30.0  # seconds one run of one workload may take before it is cut
    procs_budget: float = 90.0  # the same for workload 5 (process start-up included)
    prefill_budget: float = 120.0  # seconds a backlog prefill may take
    min_rate: float = 20.0  # msgs/s: below this at a backlog, larger backlogs are cut
    workdir: str | None = None


@dataclass
class Run:
    """One workload on one system, one repeat: named figures, and why it was cut, if it was."""

    values: dict[str, float | None] = field(default_factory=dict)
    cut: str | None = None
    note: str | None = None
    done: float = 1.0  # the fraction of the planned work a cut run finished


# ---------------------------------------------------------------------------------------------
# Helpers


def verify(produced: Iterable[int], consumed: list[int]) -> dict[str, int]:
    """Compare what producers sent with what consumers acked: ``lost`` (sent, never
    consumed), ``duplicates`` (consumed more than once, counted per extra copy) and
    ``unknown`` (consumed but never sent)."""
    sent = set(produced)
    seen = set(consumed)
    return {
        "lost": len(sent - seen),
        "duplicates": len(consumed) - len(seen),
        "unknown": len(seen - sent),
    }


def _fresh(peer: Peer, opts: Options) -> tuple[str, str]:
    """A new empty store in a new temporary directory: (directory, store address)."""
    workdir = tempfile.mkdtemp(prefix=f"compare-{peer.name}-", dir=opts.workdir)
    return workdir, peer.setup(workdir, QUEUES)


def _discard(peer: Peer, workdir: str, store: str) -> None:
    try:
        peer.teardown(store)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _timed_loop(count: int, step: Callable[[int], Any], budget: float) -> tuple[int, float, bool]:
    """Call step(k) for k in range(count) until done or ``budget`` s; (done, seconds, cut)."""
    start = time.perf_counter()
    deadline = start + budget
    for k in range(count):
        step(k)
        if (k & 31) == 31 and time.perf_counter() > deadline:
            return k + 1, time.perf_counter() - start, True
    return count, time.perf_counter() - start, False


# ---------------------------------------------------------------------------------------------
# Workloads 1-3: one process


def w_produce(peer: Peer, opts: Options) -> Run:
    workdir, store = _fresh(peer, opts)
    client = peer.open(store)
    try:
        done, secs, cut = _timed_loop(opts.n, lambda k: client.put("q", k), opts.budget)
    finally:
        client.close()
        _discard(peer, workdir, store)
    return Run({"msgs/s": done / secs}, cut=f"cut after {done} of {opts.n}" if cut else None,
               done=done / opts.n)


def w_batch(peer: Peer, opts: Options) -> Run:
    if not peer.has_batch:
        return Run({"msgs/s": None}, note="no batch API")
    workdir, store = _fresh(peer, opts)
    client = peer.open(store)
    size = opts.batch
    batches = max(1, opts.n // size)
    try:
        done, secs, cut = _timed_loop(
            batches, lambda k: client.put_many("q", list(range(k * size, (k + 1) * size))),
            opts.budget,
        )
    finally:
        client.close()
        _discard(peer, workdir, store)
    return Run({"msgs/s": done * size / secs},
               cut=f"cut after {done * size} of {batches * size}" if cut else None,
               done=done / batches)


def w_consume(peer: Peer, opts: Options) -> Run:
    workdir, store = _fresh(peer, opts)
    try:
        peer.prefill(store, "q", range(opts.n))
        client = peer.open(store)
        got: list[int | None] = []
        try:
            done, secs, cut = _timed_loop(
                opts.n, lambda k: got.append(client.get_nowait("q")), opts.budget
            )
        finally:
            client.close()
    finally:
        _discard(peer, workdir, store)
    empty = sum(1 for i in got if i is None)
    note = f"{empty} gets found the queue empty" if empty else None
    return Run({"msgs/s": (done - empty) / secs}, cut=f"cut after {done} of {opts.n}" if cut else None,
               note=note, done=done / opts.n)


# ---------------------------------------------------------------------------------------------
# Workload 4: ping-pong between two processes


def _responder(peer: Peer, store: str, ready: Any, stop: Any) -> None:
    client = peer.open(store)
    ready.set()
    try:
        while not stop.is_set():
            client.serve(0.5)
    finally:
        client.close()


def w_pingpong(peer: Peer, opts: Options) -> Run:
    workdir, store = _fresh(peer, opts)
    ready, stop = _ctx.Event(), _ctx.Event()
    child = _ctx.Process(target=_responder, args=(peer, store, ready, stop), daemon=True)
    child.start()
    latencies: list[float] = []
    problem = None
    cut = False
    try:
        client = peer.open(store)
        try:
            if not ready.wait(30):
                raise RuntimeError("the responder process did not start within 30 s")
            warm_until = time.perf_counter() + 1.0
            for k in range(3):  # warm-up: connections, caches (at most 1 s unless one is slow)
                if client.ping(-1 - k, 10.0) != -1 - k:
                    problem = "warm-up round trip failed"
                    break
                if time.perf_counter() > warm_until:
                    break
            deadline = time.perf_counter() + opts.budget
            for k in range(opts.pingpong if problem is None else 0):
                start = time.perf_counter()
                answer = client.ping(k, 10.0)
                latencies.append(time.perf_counter() - start)
                if answer != k:
                    problem = f"round trip {k} returned {answer!r}"
                    break
                if time.perf_counter() > deadline:
                    cut = True
                    break
        finally:
            client.close()
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        _discard(peer, workdir, store)
    if not latencies:
        return Run({"p50 ms": None, "p99 ms": None}, note=problem or "no round trip")
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    cut_note = f"cut after {len(latencies)} of {opts.pingpong} round trips" if cut else None
    return Run({"p50 ms": p50, "p99 ms": p99}, cut=cut_note, note=problem,
               done=len(latencies) / opts.pingpong)


# ---------------------------------------------------------------------------------------------
# Workload 5: two producer and two consumer processes


def _producer(peer: Peer, store: str, ids: list[int], barrier: Any, stop: Any, out: Any) -> None:
    client = peer.open(store)
    sent = 0
    try:
        barrier.wait(60)
        for sent, i in enumerate(ids, 1):
            client.put("q", i)
            if (sent & 63) == 0 and stop.is_set():
                break
    finally:
        client.close()
        out.put(("producer", ids[:sent], time.time()))


def _consumer(peer: Peer, store: str, count: Any, barrier: Any, stop: Any, out: Any) -> None:
    client = peer.open(store)
    got: list[int] = []
    last = [None]

    def on_message(i: int) -> None:
        got.append(i)
        last[0] = time.time()
        count.value += 1

    try:
        barrier.wait(60)
        client.consume("q", on_message, stop)
    finally:
        client.close()
        out.put(("consumer", got, last[0]))


def w_procs(peer: Peer, opts: Options) -> Run:
    workdir, store = _fresh(peer, opts)
    n = opts.procs_n
    barrier, stop, out = _ctx.Barrier(5), _ctx.Event(), _ctx.Queue()
    counts = [_ctx.RawValue("q", 0) for _ in range(2)]
    procs = [
        _ctx.Process(target=_producer, args=(peer, store, list(range(k, n, 2)), barrier, stop, out))
        for k in range(2)
    ] + [
        _ctx.Process(target=_consumer, args=(peer, store, counts[k], barrier, stop, out))
        for k in range(2)
    ]
    for proc in procs:
        proc.daemon = True
        proc.start()
    cut = False
    results: list[tuple[str, list[int], float | None]] = []
    try:
        barrier.wait(60)
        t0 = time.time()
        last_total, last_change = 0, time.monotonic()
        while True:
            time.sleep(0.02)
            total = sum(c.value for c in counts)
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            producers_done = all(p.exitcode is not None for p in procs[:2])
            idle = now - last_change
            if producers_done and (total >= n and idle > 0.3 or idle > 3.0):
                break  # all in (and quiet), or nothing more is coming
            if time.time() - t0 > opts.procs_budget:
                cut = True
                break
        stop.set()
        for _ in procs:
            results.append(out.get(timeout=60))
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        _discard(peer, workdir, store)
    produced = [i for kind, ids, _ in results if kind == "producer" for i in ids]
    consumed = [i for kind, ids, _ in results if kind == "consumer" for i in ids]
    ends = [t for kind, _, t in results if kind == "consumer" and t is not None]
    check = verify(produced, consumed)
    unique = len(consumed) - check["duplicates"]
    rate = unique / (max(ends) - t0) if ends else 0.0
    cut = cut and unique < len(produced)  # everything arrived, only the quiet wait ran over
    values: dict[str, float | None] = {"msgs/s": rate, "duplicates": check["duplicates"],
                                       "unknown": check["unknown"]}
    if cut:
        values["lost"] = None  # unfinished: the missing ones may still be queued
        return Run(values, cut=f"cut after {opts.procs_budget:.0f} s: {unique} of {n} consumed, "
                                f"{check['duplicates']} duplicates", done=unique / n)
    values["lost"] = check["lost"]
    note = None
    if check["lost"] or check["duplicates"] or check["unknown"]:
        note = (f"LOST {check['lost']}, DUPLICATED {check['duplicates']}, "
                f"unknown {check['unknown']} of {n}")
    return Run(values, note=note)


# ---------------------------------------------------------------------------------------------
# Workload 6: consume rate at growing backlogs (its repeats run inside, on one prefill)


def w_backlog(peer: Peer, opts: Options) -> list[Run]:
    """One Run per repeat, each holding a rate per backlog size (None where cut)."""
    runs = [Run() for _ in range(opts.repeats)]
    reason = None
    for backlog in opts.backlogs:
        key = f"{backlog:,}"
        if reason is not None:
            for run in runs:
                run.values[key] = None
            runs[0].cut = (runs[0].cut or "") + f"{key} cut: {reason}; "
            continue
        sample = min(opts.sample, backlog)
        total = backlog + opts.repeats * sample
        workdir, store = _fresh(peer, opts)
        try:
            started = time.perf_counter()
            peer.prefill(store, "q", range(total))
            prefill_secs = time.perf_counter() - started
            client = peer.open(store)
            try:
                for run in runs:
                    done, secs, cut = _timed_loop(
                        sample, lambda k, c=client: c.get_nowait("q"), opts.budget
                    )
                    run.values[key] = done / secs
                    if cut:  # a lower bound already; repeating it would only cost time
                        run.cut = (run.cut or "") + f"{key}: cut after {done} of {sample}; "
                        break
            finally:
                client.close()
        finally:
            _discard(peer, workdir, store)
        rate = statistics.median(run.values[key] for run in runs if key in run.values)
        following = [b for b in opts.backlogs if b > backlog]
        if rate < opts.min_rate:
            reason = f"{rate:.0f} msgs/s at {key} is below --min-rate {opts.min_rate:.0f}"
        elif following:
            estimate = prefill_secs * following[0] / backlog
            if estimate > opts.prefill_budget:
                reason = (f"prefilling {following[0]:,} would take ~{estimate:.0f} s "
                          f"(> --prefill-budget {opts.prefill_budget:.0f})")
    return runs


# ---------------------------------------------------------------------------------------------
# Running and reporting

SINGLE = {"1": w_produce, "2": w_batch, "3": w_consume, "4": w_pingpong, "5": w_procs}
LOWER_IS_BETTER = {"p50 ms", "p99 ms", "lost", "duplicates", "unknown"}
HEADLINE = {"1": "msgs/s", "2": "msgs/s", "3": "msgs/s", "4": "p50 ms", "5": "msgs/s"}
TITLES = {
    "1": "1. produce, one message per transaction/call (msgs/s)",
    "2": "2. produce in batches of 100 (msgs/s)",
    "3": "3. consume + ack one at a time from a pre-filled queue (msgs/s)",
    "4": "4. cross-process ping-pong round trip (ms)",
    "5": "5. 2 producer + 2 consumer processes, end to end (msgs/s) and delivery check",
    "6": "6. consume + ack rate at a backlog of N messages (msgs/s)",
}


def run_all(systems: list[str], workloads: list[str], opts: Options, log=print) -> dict[str, Any]:
    """Run every workload on every system (interleaved per repeat); return the raw results."""
    peers: dict[str, Peer] = {}
    skipped: dict[str, str] = {}
    for name in systems:
        peer = get_peer(name)
        try:
            peer.check()
        except Unavailable as exc:
            skipped[name] = str(exc)
            log(f"skip {name}: {exc}")
            continue
        peers[name] = peer
    info = {}
    for name, peer in peers.items():
        workdir, store = _fresh(peer, opts)
        try:
            info[name] = {"label": peer.label, "version": peer.version(), "postgres": peer.postgres,
                          "settings": peer.settings(store), "caveats": list(peer.caveats),
                          "batch": peer.batch_note or "none"}
        finally:
            _discard(peer, workdir, store)
    results: dict[str, dict[str, list[Run]]] = {w: {} for w in workloads}
    for w in workloads:
        if w == "6":
            for name, peer in peers.items():
                log(f"[6 backlog] {name} ...", end=" ", flush=True)
                started = time.perf_counter()
                results[w][name] = w_backlog(peer, opts)
                log(f"{time.perf_counter() - started:.1f}s")
            continue
        cut: set[str] = set()
        order = list(peers.items())
        for repeat in range(opts.repeats):
            # Each repeat starts one system later: the machine's speed drifts (measured here:
            # a fixed CPU loop varied 1.8x within seconds), and no system always runs first.
            shift = repeat % len(order) if order else 0
            for name, peer in order[shift:] + order[:shift]:
                if name in cut:  # cut early once: the figure is a bound, repeats add only time
                    continue
                log(f"[{w} {WORKLOADS[w]} #{repeat + 1}] {name} ...", end=" ", flush=True)
                started = time.perf_counter()
                try:
                    run = SINGLE[w](peer, opts)
                except Exception as exc:  # noqa: BLE001 - one broken adapter must not end the run
                    run = Run({}, note=f"error: {type(exc).__name__}: {exc}")
                results[w].setdefault(name, []).append(run)
                if run.cut and run.done < 0.5:
                    cut.add(name)
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in run.values.items())
                log(f"{shown} ({time.perf_counter() - started:.1f}s)"
                    + (f" [{run.cut}]" if run.cut else "") + (f" [{run.note}]" if run.note else ""))
    return {"peers": info, "skipped": skipped, "results": results, "options": opts}


def _median(runs: list[Run], key: str) -> float | None:
    values = [r.values.get(key) for r in runs if r.values.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 100:
        return str(int(value))  # counts (lost, duplicates)
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _advantage(key: str, ours: float | None, theirs: float | None) -> str:
    """How far sqlbus is ahead: sqlbus/peer for rates, peer/sqlbus for latencies."""
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return "-"
    ratio = theirs / ours if key in LOWER_IS_BETTER else ours / theirs
    return f"{ratio:.2f}x"


def _keys(runs_by_system: dict[str, list[Run]]) -> list[str]:
    keys: list[str] = []
    for runs in runs_by_system.values():
        for run in runs:
            for key in run.values:
                if key not in keys:
                    keys.append(key)
    return keys


def render(report: dict[str, Any], machine: dict[str, str], preliminary: bool = False) -> str:
    """The report as Markdown: machine, systems, one table per workload, caveats."""
    opts: Options = report["options"]
    info = report["peers"]
    lines = [f"# sqlbus compared with its peers ({machine['date']})", ""]
    if preliminary:
        lines += ["**Quick mode: small N, preliminary figures** (re-run without --quick on a "
                  "quiet machine for the real comparison).", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items() if k != "date"]
    lines += ["", "## Settings of this run", "",
              f"- repeats {opts.repeats} (figures are medians), N {opts.n:,} for workloads 1-3, "
              f"batch {opts.batch}, ping-pong {opts.pingpong:,} round trips, 2x2 processes "
              f"{opts.procs_n:,} messages, backlogs {', '.join(f'{b:,}' for b in opts.backlogs)} "
              f"(consuming {opts.sample:,} per measurement), budget {opts.budget:.0f} s per run "
              f"({opts.procs_budget:.0f} s for workload 5; a run cut before half its work is "
              "not repeated)",
              "- advantage column: how far sqlbus is ahead (> 1: sqlbus ahead, < 1: behind); "
              "sqlbus/peer for rates, peer/sqlbus for latencies; PostgreSQL systems are "
              "compared with sqlbus on PostgreSQL (sqlbus-pg)", ""]
    lines += ["## Systems", "", "| system | version | batch API | settings / pragmas |",
              "|---|---|---|---|"]
    for meta in info.values():
        lines.append(f"| {meta['label']} | {meta['version']} | {meta['batch']} | {meta['settings']} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | - | - | SKIPPED: {why} |")
    lines.append("")
    for w, by_system in report["results"].items():
        if not by_system:
            continue
        keys = _keys(by_system)
        lines += [f"## {TITLES[w]}", ""]
        lines.append("| system | " + " | ".join(keys) + " | sqlbus advantage | notes |")
        lines.append("|---|" + "---|" * (len(keys) + 2))
        for name, runs in by_system.items():
            reference = "sqlbus-pg" if info[name].get("postgres") else "sqlbus"
            ours = by_system.get(reference)
            cells = [_fmt(_median(runs, k)) for k in keys]
            if w == "6":
                adv = " / ".join(
                    _advantage(k, _median(ours, k) if ours else None, _median(runs, k)) for k in keys
                )
            else:
                key = HEADLINE[w]
                adv = "-" if name == reference or not ours else _advantage(
                    key, _median(ours, key), _median(runs, key))
                if w == "4" and name != reference and ours:
                    adv += " (p99 " + _advantage("p99 ms", _median(ours, "p99 ms"),
                                                 _median(runs, "p99 ms")) + ")"
            if name == reference:
                adv = "-"
            notes = sorted({n.strip("; ") for r in runs for n in (r.cut, r.note) if n})
            lines.append(f"| {info[name]['label']} | " + " | ".join(cells) + f" | {adv} | "
                         + "; ".join(notes).replace("|", "/") + " |")
        lines.append("")
    if "5" in report["results"]:
        bad = [info[name]["label"] for name, runs in report["results"]["5"].items()
               if any((r.values.get("lost") or 0) + (r.values.get("duplicates") or 0)
                      + (r.values.get("unknown") or 0) for r in runs)]
        lines += ["### Delivery check (workload 5)", "",
                  ("Lost or duplicated messages in at least one repeat: " + ", ".join(bad))
                  if bad else "No system lost or duplicated a message.", ""]
    lines += ["## Adapter caveats", ""]
    for meta in info.values():
        for caveat in meta["caveats"]:
            lines.append(f"- {meta['label']}: {caveat}")
    return "\n".join(lines) + "\n"


def describe_machine() -> dict[str, str]:
    import apsw

    memory = "?"
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} cores (nproc), {cpu}",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": f"{apsw.sqlite_lib_version()} (apsw {apsw.apsw_version()}); "
                  f"{sqlite3.sqlite_version} (stdlib sqlite3, used by persist-queue, "
                  "litequeue, huey)",
        "load average at start": load,
        "payload": f"{peers.SHAPE}, about {peers.PAYLOAD_BYTES} bytes of JSON",
        "filesystem": tempfile.gettempdir(),
    }


def parse_args(argv: list[str] | None = None) -> tuple[list[str], list[str], Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Compare sqlbus with persist-queue, litequeue, huey, honker, Redis, raw "
                    "apsw and the seed's JSON-file design on the same workloads.",
        epilog="Example: benchmarks/compare.py --quick --systems sqlbus,apsw,redis-list",
    )
    parser.add_argument("--systems", default="all",
                        help=f"comma list of: {', '.join(NAMES)} (default all)")
    parser.add_argument("--workloads", default="all",
                        help="comma list of 1-6 or names: " + ", ".join(WORKLOADS.values()))
    parser.add_argument("--quick", action="store_true",
                        help="small N everywhere: a whole run in about 2 minutes (preliminary)")
    parser.add_argument("--n", type=int, help="messages for workloads 1-3 (default 10000)")
    parser.add_argument("--pingpong", type=int, help="round trips (default 2000)")
    parser.add_argument("--procs-n", type=int, help="messages for workload 5 (default 20000)")
    parser.add_argument("--backlogs", help="comma list (default 1000,100000,1000000)")
    parser.add_argument("--sample", type=int, help="messages consumed per backlog measurement")
    parser.add_argument("--repeats", type=int, help="runs per figure, median reported (default 3)")
    parser.add_argument("--budget", type=float, help="seconds before a run is cut (default 30)")
    parser.add_argument("--procs-budget", type=float,
                        help="seconds before a workload-5 run is cut (default 90)")
    parser.add_argument("--prefill-budget", type=float, help="seconds a backlog prefill may take")
    parser.add_argument("--min-rate", type=float,
                        help="msgs/s under which larger backlogs are cut (default 20)")
    parser.add_argument("--workdir", help="where the temporary stores go (default: $TMPDIR)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="directory for compare-<date>.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--payload", choices=("flat", "nested"), default="flat",
                        help="the ~200-byte body: flat fields, or objects and lists 3 deep")
    args = parser.parse_args(argv)
    peers.SHAPE = args.payload  # before any worker process forks

    opts = Options()
    if args.quick:
        opts = Options(n=1_000, pingpong=200, procs_n=1_000, backlogs=(1_000, 10_000),
                       sample=300, repeats=3, budget=2.0, procs_budget=5.0, prefill_budget=10.0,
                       min_rate=50.0)
    for name in ("n", "pingpong", "procs_n", "sample", "repeats", "budget", "procs_budget",
                 "prefill_budget", "min_rate", "workdir"):
        value = getattr(args, name)
        if value is not None:
            setattr(opts, name, value)
    if args.backlogs:
        opts.backlogs = tuple(int(b) for b in args.backlogs.split(","))
    systems = list(NAMES) if args.systems == "all" else args.systems.split(",")
    for name in systems:
        if name not in NAMES:
            parser.error(f"--systems: unknown system {name!r}; choose from {', '.join(NAMES)}")
    by_name = {v: k for k, v in WORKLOADS.items()}
    workloads = list(WORKLOADS) if args.workloads == "all" else [
        by_name.get(w, w) for w in args.workloads.split(",")
    ]
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}; use 1-6 or a name")
    return systems, workloads, opts, args


def main(argv: list[str] | None = None) -> int:
    systems, workloads, opts, args = parse_args(argv)
    machine = describe_machine()
    started = time.perf_counter()
    report = run_all(systems, workloads, opts)
    text = render(report, machine, preliminary=args.quick)
    text += f"\nTotal run time: {time.perf_counter() - started:.0f} s\n"
    print()
    print(text)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y-%m-%d")
        path = os.path.join(args.out, f"compare-{stamp}{'-quick' if args.quick else ''}.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
