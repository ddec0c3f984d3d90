"""Chaos run: many processes on one sqlbus database while a supervisor SIGKILLs them at random.

    python tools/chaos.py --duration 60                 # 8 processes, kills every 0.5-3 s
    python tools/chaos.py --duration 300 --json out.json --keep
    python tools/chaos.py --db postgresql://postgres@127.0.0.1/test --duration 300   # PostgreSQL

Roles (each a separate Python process, restarted with a new *incarnation* after every kill):

- ``producer-N`` publishes messages (single and ``publish_many`` batches, random priority) to
  the agent ``work``. Every message carries a unique key ``producer.incarnation.n``. The
  producer appends ``P key`` to its log before the call and ``C key`` after the library
  confirmed the commit (the call returned).
- ``consumer-N`` (all of them receive as the agent ``work``: competing consumers) log
  ``D key attempts priority`` for what they processed *before* the ack, then ``K key`` once the
  ack committed, ``L key`` for a lost lease, ``R key`` when they asked for a retry on purpose.
- ``updater-N`` does ``state.update("counter", +1)`` and logs ``U value`` after each commit.
- ``requester`` / ``responder``: request/response. With ``Agent.request`` (sqlbus.worker) the
  requester calls it; without it, it publishes a ``request`` with ``correlation_id`` and waits
  for the ``response`` with ``receive`` (a note says which). The responder replies with a
  buffered ``d.reply`` committed atomically with its ack.

Logs are line-buffered appends: a line reaches the kernel when it is written, so it survives a
SIGKILL of its writer (not a power cut, which this tool does not simulate). A torn last line is
ignored. After the run the supervisor stops the kills, lets the consumers drain the queues, and
checks the invariants (see ``analyse``). Exit status 1 when one breaks, 0 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import apsw  # noqa: E402
import msgspec  # noqa: E402

import sqlbus  # noqa: E402

WORK = "work"  # the agent id every consumer receives as
COUNTER = "counter"

# ---------------------------------------------------------------------------------------------
# Workers (one per process)


class _Stop:
    """SIGTERM asks a worker to finish what it is doing and exit (the drain at the end)."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum: int, frame: Any) -> None:
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)


def _open_log(path: str):
    # Line-buffered: every complete line is handed to the kernel by one write(), so it
    # survives a SIGKILL of this process right after.
    return open(path, "a", buffering=1, encoding="utf-8")


def _target(db: str, schema: str | None) -> dict[str, Any]:
    """connect()'s arguments for the run's database: a file, or a schema of a PostgreSQL URL."""
    return {"path": db, "schema": schema} if schema is not None else {"path": db}


class _Reader:
    """Read-only SQL on the run's database from outside the library, either backend (the
    tables have the same names and columns; ``?`` placeholders)."""

    def __init__(self, db: str, schema: str | None) -> None:
        self.schema = schema
        if schema is None:
            self.conn: Any = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
            self.conn.set_busy_timeout(5000)
        else:
            import psycopg

            self.conn = psycopg.connect(db, autocommit=True,
                                        options=f"-c search_path={schema}")

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.schema is None:
            return self.conn.execute(query, params).fetchall()
        return [tuple(r) for r in self.conn.execute(query.replace("?", "%s"), params).fetchall()]

    def integrity(self) -> list[str]:
        if self.schema is None:
            return [row[0] for row in self.conn.execute("PRAGMA integrity_check")]
        return ["ok"]  # PostgreSQL checks its pages itself; the bus's check runs in analyse

    def close(self) -> None:
        self.conn.close()


def _connect(cfg: dict[str, Any]) -> sqlbus.Bus:
    return sqlbus.connect(
        **_target(cfg["db"], cfg.get("schema")),
        lease=cfg["lease"],
        max_attempts=cfg["max_attempts"],
        backoff_base=0.05,
        backoff_cap=0.5,
        busy_timeout=cfg["busy_timeout"],
    )


def _error_line(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")[:300]
    return f"E {type(exc).__name__} {text}\n"


def worker_producer(cfg: dict[str, Any], log) -> None:
    rng = random.Random(cfg["seed"])
    bus = _connect(cfg)
    agent = bus.agent(cfg["name"])
    prefix = f"{cfg['name']}.{cfg['incarnation']}."
    n = 0
    period = 1.0 / cfg["rate"] if cfg["rate"] > 0 else 0.0
    next_at = time.monotonic()
    while not _Stop.requested:
        size = rng.randint(2, 20) if rng.random() < 0.1 else 1
        batch = []
        for _ in range(size):
            key = f"{prefix}{n}"
            n += 1
            batch.append((key, rng.randint(1, 5), "x" * rng.randint(0, 200)))
        log.write("".join(f"P {key} {prio}\n" for key, prio, _ in batch))
        try:
            if size == 1:
                key, prio, pad = batch[0]
                agent.publish(WORK, "notification", {"key": key, "pad": pad}, priority=prio, ttl=0)
            else:
                agent.publish_many([
                    {"to": WORK, "type": "notification", "payload": {"key": key, "pad": pad},
                     "priority": prio, "ttl": 0}
                    for key, prio, pad in batch
                ])
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc) + "".join(f"F {key}\n" for key, _, _ in batch))
            time.sleep(0.05)
            continue
        log.write("".join(f"C {key} {prio}\n" for key, prio, _ in batch))
        next_at += period * size
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.monotonic()


def worker_consumer(cfg: dict[str, Any], log) -> None:
    rng = random.Random(cfg["seed"])
    bus = _connect(cfg)
    agent = bus.agent(WORK)
    while not _Stop.requested:
        try:
            deliveries = agent.receive(limit=rng.randint(1, 10), wait=0.3)
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc))
            time.sleep(0.05)
            continue
        keep = []
        for d in deliveries:
            key = d.message.payload["key"]
            log.write(f"D {key} {d.attempts} {d.message.headers.priority}\n")
            time.sleep(rng.uniform(0, 0.003))  # "work": a kill often lands while leases are held
            if rng.random() < 0.01:
                try:
                    d.retry(0.1)
                    log.write(f"R {key}\n")
                except sqlbus.LeaseLostError:
                    log.write(f"L {key}\n")
                except sqlbus.DatabaseError as exc:
                    log.write(_error_line(exc) + f"X {key}\n")
            else:
                keep.append(d)
        if not keep:
            continue
        try:
            if rng.random() < 0.5:
                agent.ack(keep)  # all or nothing
                log.write("".join(f"K {d.message.payload['key']}\n" for d in keep))
                continue
        except sqlbus.LeaseLostError:
            pass  # find out which lease was lost, one by one below
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc))
        for d in keep:
            _ack_and_log(d, d.message.payload["key"], log)


def _ack_and_log(d: sqlbus.Delivery, key: Any, log) -> None:
    """Ack one delivery and log the outcome: K acked, L lease lost, X error."""
    try:
        d.ack()
        log.write(f"K {key}\n")
    except sqlbus.LeaseLostError:
        log.write(f"L {key}\n")
    except sqlbus.DatabaseError as exc:
        log.write(_error_line(exc) + f"X {key}\n")


def worker_updater(cfg: dict[str, Any], log) -> None:
    bus = _connect(cfg)
    agent = bus.agent(cfg["name"])
    while not _Stop.requested:
        box: dict[str, int] = {}

        def increment(old: Any, box: dict[str, int] = box) -> int:
            box["value"] = (old or 0) + 1
            return box["value"]

        try:
            agent.state.update(COUNTER, increment, notify=False)
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc))
            time.sleep(0.05)
            continue
        log.write(f"U {box['value']}\n")
        time.sleep(0.002)


def worker_responder(cfg: dict[str, Any], log) -> None:
    bus = _connect(cfg)
    agent = bus.agent("responder")
    while not _Stop.requested:
        try:
            deliveries = agent.receive(limit=5, wait=0.3)
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc))
            continue
        for d in deliveries:
            key = d.message.payload.get("key")
            log.write(f"D {key} {d.attempts} {d.message.headers.priority}\n")
            if d.message.type == "request":
                d.reply({"key": key})  # buffered: commits with the ack or not at all
            _ack_and_log(d, key, log)


def worker_requester(cfg: dict[str, Any], log) -> None:
    bus = _connect(cfg)
    agent = bus.agent("requester")
    prefix = f"{cfg['name']}.{cfg['incarnation']}."
    n = 0
    use_request = cfg["request_api"]
    while not _Stop.requested:
        key = f"{prefix}{n}"
        n += 1
        log.write(f"P {key}\n")
        if use_request:
            try:
                data = agent.request("responder", {"key": key}, timeout=3.0)  # type: ignore[attr-defined]
            except sqlbus.RequestTimeoutError:
                log.write(f"T {key}\n")
                continue
            except sqlbus.DatabaseError as exc:
                log.write(_error_line(exc) + f"F {key}\n")
                continue
            got = data.get("key") if isinstance(data, dict) else None
            log.write(f"OK {key}\n" if got == key else f"MISMATCH {key} {got}\n")
            continue
        # Without Agent.request: publish + receive, matching on correlation_id.
        try:
            agent.publish("responder", "request", {"key": key}, correlation_id=key, ttl=0)
        except sqlbus.DatabaseError as exc:
            log.write(_error_line(exc) + f"F {key}\n")
            continue
        log.write(f"C {key}\n")
        deadline = time.monotonic() + 3.0
        answered = False
        while not answered and not _Stop.requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.write(f"T {key}\n")
                break
            try:
                deliveries = agent.receive(limit=10, wait=min(remaining, 0.5), types=["response"])
            except sqlbus.DatabaseError as exc:
                log.write(_error_line(exc))
                continue
            for d in deliveries:
                corr = d.message.headers.correlation_id
                data = d.message.payload.get("data") or {}
                try:
                    d.ack()
                except (sqlbus.LeaseLostError, sqlbus.DatabaseError) as exc:
                    log.write(_error_line(exc))
                    continue
                log.write(f"G {corr} {data.get('key')}\n")
                answered = answered or corr == key


WORKERS = {
    "producer": worker_producer,
    "consumer": worker_consumer,
    "updater": worker_updater,
    "responder": worker_responder,
    "requester": worker_requester,
}


def _exit_with_parent() -> None:
    """A worker never outlives its supervisor (e.g. a test run that was itself killed)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def run_worker(cfg: dict[str, Any]) -> int:
    _exit_with_parent()
    _Stop.install()
    log = _open_log(cfg["log"])
    log.write(f"I {os.getpid()}\n")
    try:
        WORKERS[cfg["role"]](cfg, log)
    except BaseException as exc:  # an unexpected crash: say what, then fail the process
        log.write(_error_line(exc) + "CRASH\n")
        raise
    log.write(f"M {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")
    log.write("EXIT\n")
    return 0


# ---------------------------------------------------------------------------------------------
# The supervisor


class Child:
    """One role's current process and its history of incarnations."""

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.incarnation = -1
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed: set[int] = set()  # incarnations ended by SIGKILL
        self.peak_rss_kb = 0
        self.unexpected: list[str] = []


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident set size of a live process, from /proc (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.db = args.db or str(self.workdir / "chaos.db")
        self.schema = args.schema if self.db.startswith(("postgresql://", "postgres://")) else None
        self.target = _target(self.db, self.schema)
        self.request_api = hasattr(sqlbus.Agent, "request")
        self.children: list[Child] = []
        for i in range(args.producers):
            self.children.append(Child(f"producer-{i}", "producer"))
        for i in range(args.consumers):
            self.children.append(Child(f"consumer-{i}", "consumer"))
        for i in range(args.updaters):
            self.children.append(Child(f"updater-{i}", "updater"))
        if args.requests:
            self.children.append(Child("requester", "requester"))
            self.children.append(Child("responder", "responder"))
        self.kills: list[tuple[float, str, int]] = []
        self.peak_wal = 0

    # -- processes ---------------------------------------------------------------------------

    def log_path(self, name: str, incarnation: int) -> Path:
        return self.logdir / f"{name}.{incarnation}.log"

    def start(self, child: Child) -> None:
        child.incarnation += 1
        cfg = {
            "role": child.role, "name": child.name, "incarnation": child.incarnation,
            "db": self.db, "schema": self.schema, "lease": self.args.lease, "max_attempts": self.args.max_attempts,
            "busy_timeout": self.args.busy_timeout, "rate": self.args.rate,
            "seed": self.rng.randrange(1 << 30), "request_api": self.request_api,
            "log": str(self.log_path(child.name, child.incarnation)),
        }
        err = open(self.logdir / f"{child.name}.{child.incarnation}.err", "wb")
        child.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(cfg)],
            stdout=err, stderr=subprocess.STDOUT, cwd=str(ROOT),
        )
        err.close()

    def sample(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.peak_rss_kb = max(child.peak_rss_kb, _vm_hwm_kb(child.proc.pid))
        if self.schema is None:
            try:
                self.peak_wal = max(self.peak_wal, os.path.getsize(self.db + "-wal"))
            except OSError:
                pass

    def kill(self, child: Child) -> None:
        proc = child.proc
        assert proc is not None
        child.peak_rss_kb = max(child.peak_rss_kb, _vm_hwm_kb(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        child.killed.add(child.incarnation)
        self.kills.append((time.monotonic(), child.name, child.incarnation))

    def last_error(self, child: Child) -> str:
        """The last line of a worker's stderr (its traceback's last line), for the report."""
        path = self.logdir / f"{child.name}.{child.incarnation}.err"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return (lines[-1] if lines else "no output") + f" (see {path})"

    def check_exits(self) -> None:
        """A worker that exits without being killed or asked to stop is a failure: note it and
        restart it so the run goes on."""
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                child.unexpected.append(
                    f"{child.name}.{child.incarnation} exited with status {proc.returncode}: "
                    f"{self.last_error(child)}"
                )
                self.start(child)

    def stop(self, children: list[Child], timeout: float = 15.0) -> None:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.peak_rss_kb = max(child.peak_rss_kb, _vm_hwm_kb(child.proc.pid))
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            proc = child.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                child.unexpected.append(f"{child.name}.{child.incarnation} ignored SIGTERM")
            if proc.returncode == -signal.SIGTERM:
                # Restarted so recently that it had not installed its handler yet (still
                # importing): SIGTERM ended it like a kill, so count it as one.
                child.killed.add(child.incarnation)
            elif proc.returncode not in (0, -signal.SIGKILL):
                child.unexpected.append(
                    f"{child.name}.{child.incarnation} exited with status {proc.returncode}"
                    f" while stopping: {self.last_error(child)}"
                )
            child.proc = None

    def pending(self) -> dict[str, int]:
        """Rows still queued, leased or scheduled, per agent (a read-only look from outside)."""
        reader = _Reader(self.db, self.schema)
        try:
            return dict(reader.rows(
                "SELECT agent, count(*) FROM message WHERE state IN (0, 1, 4) GROUP BY agent"
            ))
        finally:
            reader.close()

    def run(self) -> dict[str, Any]:
        args = self.args
        note = ("requester uses Agent.request" if self.request_api else
                "note: sqlbus has no Agent.request yet: the requester uses publish + "
                "receive(wait) matched on correlation_id")
        print(f"chaos: {len(self.children)} processes on {self.db} for {args.duration:.0f} s, "
              f"kills every {args.kill_min}-{args.kill_max} s, lease {args.lease} s; {note}",
              flush=True)
        # Create the file once up front so the workers race on nothing but the messages.
        if self.schema is not None:  # a fresh schema for the run
            import psycopg

            with psycopg.connect(self.db, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        sqlbus.connect(**self.target).close()
        for child in self.children:
            self.start(child)
        started = time.monotonic()
        end = started + args.duration
        next_kill = started + self.rng.uniform(args.kill_min, args.kill_max)
        next_report = started + 10
        while (now := time.monotonic()) < end:
            self.sample()
            self.check_exits()
            if now >= next_kill:
                victim = self.rng.choice(self.children)
                self.kill(victim)
                self.start(victim)
                next_kill = now + self.rng.uniform(args.kill_min, args.kill_max)
            if now >= next_report:
                print(f"  t={now - started:5.0f}s kills={len(self.kills)} pending={self.pending()}",
                      flush=True)
                next_report += 10
            time.sleep(0.05)
        # Drain: stop the writers, let consumers and the responder empty the queues (leases of
        # killed consumers run out after `lease` seconds and come back), then stop them.
        producers = [c for c in self.children if c.role in ("producer", "updater", "requester")]
        self.stop(producers)
        drain_started = time.monotonic()
        drained = False
        while time.monotonic() - drain_started < args.drain_timeout:
            self.sample()
            self.check_exits()
            pending = self.pending()
            if not pending.get(WORK) and not pending.get("responder"):
                drained = True
                break
            time.sleep(0.25)
        drain_seconds = time.monotonic() - drain_started
        self.stop([c for c in self.children if c.role in ("consumer", "responder")])
        result = analyse(self, drained, drain_seconds)
        result["duration_s"] = args.duration
        return result


# ---------------------------------------------------------------------------------------------
# Checking the invariants


def _read_log(path: Path) -> list[list[str]]:
    """Complete lines of a worker log, split in fields (a torn last line is dropped)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # the part after the last newline is torn or empty
    return [line.split(" ") for line in lines if line]


def _order_key(key: str) -> tuple[str, int, int]:
    producer, incarnation, n = key.rsplit(".", 2)
    return producer, int(incarnation), int(n)


def analyse(sup: Supervisor, drained: bool, drain_seconds: float) -> dict[str, Any]:
    violations: list[str] = []
    warnings: list[str] = []
    errors: collections.Counter[str] = collections.Counter()
    by_role: dict[str, list[Child]] = collections.defaultdict(list)
    for child in sup.children:
        by_role[child.role].append(child)
        for line in child.unexpected:
            violations.append(f"unexpected worker exit: {line}")

    def logs(child: Child):
        for inc in range(child.incarnation + 1):
            yield inc, _read_log(sup.log_path(child.name, inc))

    def note_error(fields: list[str], where: str) -> None:
        name = fields[1] if len(fields) > 1 else "?"
        text = " ".join(fields[2:])
        errors[name] += 1
        if name == "DatabaseError" and "locked" in text:
            return  # busy timeout ran out under the load: reported, not an invariant
        violations.append(f"{where}: {name}: {text}")

    # Producers: what was attempted, confirmed, failed.
    attempted: dict[str, int] = {}
    confirmed: dict[str, int] = {}
    failed: set[str] = set()
    for child in by_role["producer"]:
        for inc, lines in logs(child):
            for f in lines:
                if f[0] == "P":
                    attempted[f[1]] = int(f[2])
                elif f[0] == "C":
                    confirmed[f[1]] = int(f[2])
                elif f[0] == "F":
                    failed.add(f[1])
                elif f[0] == "E":
                    note_error(f, f"{child.name}.{inc}")
                elif f[0] == "CRASH":
                    violations.append(f"{child.name}.{inc} crashed (see its .err file)")

    # Consumers: every processing of a key, with its outcome.
    processings: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    order_violations = 0
    first_deliveries = 0
    for child in by_role["consumer"]:
        for inc, lines in logs(child):
            killed = inc in child.killed
            open_: dict[str, dict[str, Any]] = {}
            last_seen: dict[tuple[str, int], tuple[int, int]] = {}
            for f in lines:
                tag = f[0]
                if tag == "D":
                    key, attempts, priority = f[1], int(f[2]), int(f[3])
                    p = {"where": f"{child.name}.{inc}", "attempts": attempts, "outcome": None,
                         "killed": killed}
                    processings[key].append(p)
                    open_[key] = p
                    if attempts == 1:  # redeliveries legitimately reorder
                        first_deliveries += 1
                        producer, p_inc, n = _order_key(key)
                        previous = last_seen.get((producer, priority))
                        if previous is not None and previous > (p_inc, n):
                            order_violations += 1
                            # PostgreSQL: a claim passes over rows another consumer's claim
                            # has locked (SKIP LOCKED); when that consumer is killed before
                            # its claim commits, those rows come back as first deliveries
                            # after later ones. Explained only if a consumer was killed.
                            explained = sup.schema is not None and any(
                                name.startswith("consumer-") for _, name, _ in sup.kills)
                            if explained:
                                if order_violations <= 5:
                                    warnings.append(
                                        f"order (claim of a killed consumer rolled back, SKIP "
                                        f"LOCKED): {child.name}.{inc} got {key} after "
                                        f"{producer}.{previous[0]}.{previous[1]}")
                            elif order_violations <= 5:
                                violations.append(
                                    f"order: {child.name}.{inc} got {key} (priority {priority}) "
                                    f"after {producer}.{previous[0]}.{previous[1]} on first delivery"
                                )
                        last_seen[(producer, priority)] = (p_inc, n)
                elif tag in ("K", "L", "R", "X"):
                    p = open_.pop(f[1], None)
                    if p is not None:
                        p["outcome"] = tag
                elif tag == "E":
                    note_error(f, f"{child.name}.{inc}")
                elif tag == "CRASH":
                    violations.append(f"{child.name}.{inc} crashed (see its .err file)")

    # Dead letters, read through the library.
    with sqlbus.connect(**sup.target) as bus:
        dead = bus.dead_letters(limit=1_000_000)
        counter_entry = bus.state.get(COUNTER)
    dead_keys: dict[str, str] = {}
    dead_explained = 0
    for dl in dead:
        key = dl.message.payload.get("key")
        dead_keys[str(key)] = dl.reason
        if dl.reason == "max_attempts" and dl.error_name == "LeaseExpired":
            dead_explained += 1  # its leases were held by killed processes max_attempts times
        elif dl.reason == "expired" and dl.message.type == "request":
            dead_explained += 1  # a request has a finite ttl by design
        else:
            violations.append(
                f"unexplained dead letter {dl.message.id} key={key}: {dl.reason} "
                f"{dl.error_name}: {dl.error_message}"
            )

    # Delivery: lost, duplicates and their causes.
    delivered = set(processings)
    lost = [k for k in confirmed if k not in delivered and k not in dead_keys]
    if lost:
        violations.append(f"lost: {len(lost)} confirmed messages never delivered, e.g. {lost[:5]}")
    unconfirmed_delivered = [k for k in delivered if k not in confirmed]
    for key in unconfirmed_delivered:
        if key not in attempted:
            violations.append(f"delivered a key no producer tried to publish: {key}")
        elif key in failed:
            violations.append(f"{key} was delivered although its publish raised (nothing written?)")
    causes: collections.Counter[str] = collections.Counter()
    for key, plist in processings.items():
        plist.sort(key=lambda p: p["attempts"])
        attempts = [p["attempts"] for p in plist]
        if len(set(attempts)) != len(attempts):
            violations.append(f"{key}: two deliveries with the same attempt number {attempts}")
        acked = [p for p in plist if p["outcome"] == "K"]
        if len(acked) > 1:
            violations.append(f"{key}: acked twice ({[p['where'] for p in acked]})")
        if acked and acked[0] is not plist[-1]:
            violations.append(f"{key}: delivered again after its ack committed ({plist})")
        for p in plist[:-1]:
            if p["outcome"] == "L":
                causes["lease ran out before the ack (slow consumer)"] += 1
            elif p["outcome"] == "R":
                causes["retry asked by the consumer"] += 1
            elif p["outcome"] == "X":
                causes["ack raised DatabaseError"] += 1
            elif p["outcome"] is None and p["killed"]:
                causes["lease held by a killed process"] += 1
            elif p["outcome"] is None:
                causes["unexplained"] += 1
                violations.append(f"{key}: redelivered without a kill or a lost lease ({plist})")
    duplicates = sum(len(plist) - 1 for plist in processings.values())
    if not drained:
        violations.append(f"the queues did not drain within {sup.args.drain_timeout} s: "
                          f"{sup.pending()}")

    # Shared state: the counter counts every committed increment.
    increments: list[int] = []
    updater_kills = 0
    for child in by_role["updater"]:
        updater_kills += len(child.killed)
        for inc, lines in logs(child):
            for f in lines:
                if f[0] == "U":
                    increments.append(int(f[1]))
                elif f[0] == "E":
                    note_error(f, f"{child.name}.{inc}")
    counter = counter_entry.value if counter_entry is not None else 0
    if len(set(increments)) != len(increments):
        violations.append("state: two updaters logged the same counter value (lost update)")
    unlogged = counter - len(increments)
    if by_role["updater"] and not 0 <= unlogged <= updater_kills:
        violations.append(
            f"state: counter {counter} != {len(increments)} logged increments (+ at most "
            f"{updater_kills} committed by an updater killed before it could log)"
        )

    # Request / response.
    rr: dict[str, Any] = {"api": "Agent.request" if sup.request_api else "publish+receive"}
    if sup.args.requests:
        req_lines = [f for c in by_role["requester"] for _, lines in logs(c) for f in lines]
        resp_lines = [f for c in by_role["responder"] for _, lines in logs(c) for f in lines]
        for f in req_lines + resp_lines:
            if f[0] == "E":
                note_error(f, "requester/responder")
            elif f[0] == "MISMATCH":
                violations.append(f"request {f[1]} got the response of {f[2]}")
        rr["sent"] = sum(1 for f in req_lines if f[0] in ("C", "OK", "T", "MISMATCH"))
        rr["answered_in_time"] = sum(1 for f in req_lines if f[0] == "OK") or len(
            {f[1] for f in req_lines if f[0] == "G"})
        rr["timeouts"] = sum(1 for f in req_lines if f[0] == "T")
        if not sup.request_api:
            requests = {f[1] for f in req_lines if f[0] == "C"}
            responses = _responses(sup.db, sup.schema)
            for corr, keys in responses.items():
                if len(keys) > 1:
                    violations.append(f"request {corr} was answered {len(keys)} times "
                                      "(reply and ack not atomic?)")
                if any(k != corr for k in keys):
                    violations.append(f"response to {corr} carries {keys}")
            unanswered = [k for k in requests if k not in responses and k not in dead_keys]
            if unanswered:
                violations.append(f"{len(unanswered)} confirmed requests never answered, "
                                  f"e.g. {unanswered[:5]}")
            rr["confirmed"] = len(requests)
            rr["answered"] = sum(1 for k in requests if k in responses)

    # The database itself.
    reader = _Reader(sup.db, sup.schema)
    try:
        integrity = reader.integrity()
        stuck = reader.rows(
            "SELECT count(*) FROM message WHERE agent = ? AND state IN (0, 1, 4)", (WORK,)
        )[0][0]
    finally:
        reader.close()
    if sup.schema is not None:
        with sqlbus.connect(**sup.target) as bus:
            report = bus.check()
        if not report.ok:
            integrity = report.problems
    if integrity != ["ok"]:
        violations.append(f"integrity_check: {integrity[:5]}")
    wal = os.path.getsize(sup.db + "-wal") if os.path.exists(sup.db + "-wal") else 0
    if sup.schema is None:
        db_bytes = os.path.getsize(sup.db)
    else:
        with sqlbus.connect(**sup.target) as bus:
            db_bytes = bus.metrics().db_bytes

    kills_by_role = collections.Counter(name.rsplit("-", 1)[0] for _, name, _ in sup.kills)
    peak_rss = {c.name: c.peak_rss_kb for c in sup.children}
    for child in sup.children:
        for _inc, lines in logs(child):
            for f in lines:
                if f[0] == "M":
                    peak_rss[child.name] = max(peak_rss[child.name], int(f[1]))
    return {
        "processes": len(sup.children),
        "kills": len(sup.kills),
        "kills_by_role": dict(kills_by_role),
        "messages_attempted": len(attempted),
        "messages_confirmed": len(confirmed),
        "messages_delivered": len(delivered),
        "committed_but_unconfirmed": len(unconfirmed_delivered),
        "lost": len(lost),
        "duplicates": duplicates,
        "duplicate_causes": dict(causes),
        "first_deliveries_checked_for_order": first_deliveries,
        "order_violations": order_violations,
        "dead_letters": len(dead),
        "dead_letters_explained": dead_explained,
        "state_counter": counter,
        "state_increments_logged": len(increments),
        "state_unlogged_increments": unlogged,
        "updater_kills": updater_kills,
        "request_response": rr,
        "errors": dict(errors),
        "drained": drained,
        "drain_s": round(drain_seconds, 1),
        "left_in_queue": stuck,
        "integrity_check": integrity[0] if len(integrity) == 1 else integrity[:5],
        "db_bytes": db_bytes,
        "wal_bytes_end": wal,
        "wal_bytes_peak": sup.peak_wal,
        "peak_rss_kb": peak_rss,
        "supervisor_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "violations": violations,
        "warnings": warnings,
    }


def _responses(db: str, schema: str | None) -> dict[str, list[Any]]:
    """correlation_id -> the keys carried by every response ever written (any state)."""
    reader = _Reader(db, schema)
    try:
        rows = reader.rows(
            "SELECT body FROM message WHERE agent = 'requester' AND type = 'response'"
        )
    finally:
        reader.close()
    result: dict[str, list[Any]] = collections.defaultdict(list)
    for (body,) in rows:
        message = msgspec.json.decode(body)
        corr = message.get("headers", {}).get("correlation_id")
        data = (message.get("payload") or {}).get("data") or {}
        result[str(corr)].append(data.get("key"))
    return result


def print_report(result: dict[str, Any]) -> None:
    rr = result["request_response"]
    lines = [
        f"processes {result['processes']}, kills survived {result['kills']} "
        f"{result['kills_by_role']}",
        f"messages: attempted {result['messages_attempted']}, confirmed "
        f"{result['messages_confirmed']}, delivered {result['messages_delivered']}, "
        f"lost {result['lost']}, committed-but-unconfirmed {result['committed_but_unconfirmed']} "
        "(producer killed between commit and log)",
        f"duplicates {result['duplicates']}: {result['duplicate_causes']}",
        f"order: {result['order_violations']} violations among "
        f"{result['first_deliveries_checked_for_order']} first deliveries (per consumer, per "
        "producer and priority; redeliveries excluded)",
        f"state: counter {result['state_counter']}, logged increments "
        f"{result['state_increments_logged']}, unlogged {result['state_unlogged_increments']} "
        f"(allowed: 0..{result['updater_kills']} = updater kills)",
        f"request/response ({rr['api']}): {json.dumps({k: v for k, v in rr.items() if k != 'api'})}",
        f"dead letters {result['dead_letters']} (explained {result['dead_letters_explained']})",
        f"errors raised to workers: {result['errors'] or 'none'}",
        f"drained in {result['drain_s']} s: {result['drained']}, left in queue "
        f"{result['left_in_queue']}",
        f"integrity_check {result['integrity_check']}; db {result['db_bytes']} B, WAL end "
        f"{result['wal_bytes_end']} B, WAL peak {result['wal_bytes_peak']} B",
        f"peak RSS (KiB) {result['peak_rss_kb']}, supervisor {result['supervisor_peak_rss_kb']}",
    ]
    for line in lines:
        print("  " + line)
    if result["violations"]:
        print(f"INVARIANTS BROKEN ({len(result['violations'])}):")
        for v in result["violations"][:50]:
            print("  - " + v)
    else:
        print("all invariants held")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return run_worker(json.loads(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--updaters", type=int, default=2)
    parser.add_argument("--no-requests", dest="requests", action="store_false",
                        help="leave out the requester/responder pair")
    parser.add_argument("--rate", type=float, default=150.0,
                        help="messages per second per producer (0 = as fast as possible)")
    parser.add_argument("--kill-min", type=float, default=0.5, help="seconds between kills, low")
    parser.add_argument("--kill-max", type=float, default=3.0, help="seconds between kills, high")
    parser.add_argument("--lease", type=float, default=2.0, help="lease in seconds (short, so "
                        "the leases of killed consumers come back quickly)")
    parser.add_argument("--max-attempts", type=int, default=50)
    parser.add_argument("--busy-timeout", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the database and logs go "
                        "(default: a new temporary directory)")
    parser.add_argument("--db", default=None, help="a postgresql:// URL (or a file path) to "
                        "run on (default: chaos.db in the workdir)")
    parser.add_argument("--schema", default="sqlbus_chaos", help="PostgreSQL: the schema, "
                        "dropped and made anew for the run (default sqlbus_chaos)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="sqlbus-chaos-")
    print(f"seed {args.seed}, workdir {args.workdir}")
    sup = Supervisor(args)
    try:
        result = sup.run()
    finally:
        for child in sup.children:  # never leave a worker behind
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
    result["seed"] = args.seed
    result["workdir"] = args.workdir
    print_report(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
