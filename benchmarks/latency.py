"""Wake-up latency and idle cost of sqlbus across processes (issue 3's targets).

    python benchmarks/latency.py                           # the issue's sizes (~40 s)
    python benchmarks/latency.py --round-trips 100 --messages 50 --idle-seconds 2   # smoke
    python benchmarks/latency.py --postgres [URL]          # the same on PostgreSQL (a fresh schema)

Prints:
- request/response round trip between two processes (``agent.request`` against a ``run()``
  loop answering ``request`` handlers), p50/p99/max over ``--round-trips`` with ~200-byte
  payloads; and the same as a plain ping-pong (``receive(wait=...)`` + ``publish``);
- publish-to-handler latency with ``--idle-agents`` other agents idle in ``receive(wait=60)``
  in their own processes (each message is published after the handler went back to waiting);
- CPU of an agent idle in ``receive(wait=60)`` over ``--idle-seconds`` (``time.process_time``),
  quiet, and while another process publishes to other agents;
- publish cost with nobody waiting and with the idle agents waiting (the price of ringing).

Targets (issue 3): round trip p50 <= 0.5 ms, p99 <= 3 ms; publish-to-handler p50 <= 0.5 ms;
idle < 1% of one core. On PostgreSQL (issue 15): round trip p50 <= 2 ms, p99 <= 10 ms; idle
< 1% of one core. Durability "normal"; files in a temporary directory (``--dir``).
``--no-checkpointer`` turns off the background checkpointer (sqlbus.sqlite.checkpoint.Checkpointer) to
compare with SQLite's automatic checkpoints, which land inside commits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import threading
import time
from typing import Any

import sqlbus
import sqlbus.sqlite.checkpoint
import sqlbus.sqlite.wakeup

#: Keyword arguments of every sqlbus.connect (``schema`` on PostgreSQL); forked children
#: inherit them.
CONNECT: dict[str, Any] = {}
PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}
CTX = mp.get_context("fork")


def open_bus(path: str) -> sqlbus.Bus:
    """The bus under test: a SQLite file, or a PostgreSQL URL with :data:`CONNECT`'s schema."""
    return sqlbus.connect(path, **CONNECT)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def fmt_ms(values: list[float]) -> str:
    return (f"p50 {pct(values, 50) * 1000:.3f} ms  p99 {pct(values, 99) * 1000:.3f} ms  "
            f"max {max(values) * 1000:.2f} ms  (n={len(values)})")


# -- processes ---------------------------------------------------------------------------------


def responder(path: str, ready: Any) -> None:
    """Answer requests from a run() loop (a handler's return value is the response)."""
    bus = open_bus(path)
    agent = bus.agent("echo")
    agent.subscribe("request", lambda message: message.payload)
    ready.set()
    agent.run()
    bus.close()


def ponger(path: str, count: int, ready: Any) -> None:
    """Ping-pong without the worker: receive(wait=...) and publish the answer."""
    bus = open_bus(path)
    agent = bus.agent("pong")
    ready.set()
    done = 0
    while done < count:
        for d in agent.receive(wait=5.0):
            with d:
                d.reply(d.message.payload)
            done += 1
    bus.close()


def idle_agent(path: str, name: str, ready: Any) -> None:
    bus = open_bus(path)
    agent = bus.agent(name)
    ready.set()
    while True:
        for d in agent.receive(wait=60.0):
            d.ack()
            if d.message.type == "shutdown":
                bus.close()
                return


def handler_agent(path: str, count: int, out: str, ready: Any) -> None:
    """Record, per message, how long after its publish the handler ran (wall clock ns)."""
    bus = open_bus(path)
    agent = bus.agent("target")
    lags: list[float] = []

    def handle(message: sqlbus.Message) -> None:
        lags.append((time.time_ns() - message.payload["t"]) / 1e9)
        if len(lags) >= count:
            agent.stop()

    agent.subscribe("notification", handle)
    ready.set()
    agent.run()
    with open(out, "w") as handle_file:
        json.dump(lags, handle_file)
    bus.close()


def idle_cpu(path: str, seconds: float, out: str, ready: Any) -> None:
    """process_time of a process whose agent waits in receive(wait=60) for ``seconds``."""
    bus = open_bus(path)
    agent = bus.agent("sleeper")
    result: dict[str, float] = {}

    def measure() -> None:
        start_cpu, start = time.process_time(), time.monotonic()
        time.sleep(seconds)
        result["cpu"] = time.process_time() - start_cpu
        result["wall"] = time.monotonic() - start
        with open(out, "w") as handle:
            json.dump(result, handle)
        os._exit(0)

    ready.set()
    threading.Thread(target=measure, daemon=True).start()
    agent.receive(wait=60.0)
    time.sleep(60)


def start(target: Any, *args: Any) -> Any:
    ready = CTX.Event()
    process = CTX.Process(target=target, args=(*args, ready), daemon=True)
    process.start()
    if not ready.wait(30):
        raise RuntimeError(f"{target.__name__} did not start")
    return process


# -- measurements ------------------------------------------------------------------------------


def round_trips(path: str, n: int) -> list[float]:
    process = start(responder, path)
    bus = open_bus(path)
    client = bus.agent("client")
    try:
        for _ in range(20):  # warm up: connections, caches, doorbells
            client.request("echo", PAYLOAD, timeout=10)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            client.request("echo", PAYLOAD, timeout=10)
            times.append(time.perf_counter() - started)
        return times
    finally:
        process.terminate()
        process.join(10)
        bus.close()


def ping_pong(path: str, n: int) -> list[float]:
    warm = 20
    process = start(ponger, path, n + warm)
    bus = open_bus(path)
    ping = bus.agent("ping")
    times = []
    try:
        for i in range(n + warm):
            started = time.perf_counter()
            ping.publish("pong", "request", PAYLOAD)
            while not ping.receive(wait=10.0):
                pass
            if i >= warm:
                times.append(time.perf_counter() - started)
            # (the received response is left unacked; its lease runs out harmlessly)
        return times
    finally:
        process.join(10)
        bus.close()


def idle_agents(path: str, count: int) -> list[Any]:
    return [start(idle_agent, path, f"idle-{i}") for i in range(count)]


def stop_idle(path: str, processes: list[Any]) -> None:
    bus = open_bus(path)
    boss = bus.agent("boss")
    for i in range(len(processes)):
        boss.publish(f"idle-{i}", "shutdown", {})
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.terminate()
    bus.close()


def publish_to_handler(path: str, n: int, gap: float, workdir: str) -> list[float]:
    out = os.path.join(workdir, "lags.json")
    process = start(handler_agent, path, n, out)
    bus = open_bus(path)
    sender = bus.agent("sender")
    try:
        time.sleep(0.2)
        for _ in range(n):
            time.sleep(gap)  # the handler is back in its wait, like an agent between tasks
            sender.publish("target", "notification", {"t": time.time_ns(), "pad": "x" * 150})
        process.join(30)
        with open(out) as handle:
            return json.load(handle)
    finally:
        if process.is_alive():
            process.terminate()
        bus.close()


def measure_idle_cpu(path: str, seconds: float, workdir: str, background: bool) -> dict[str, float]:
    out = os.path.join(workdir, "idle.json")
    process = start(idle_cpu, path, seconds, out)
    sent = 0
    if background:  # another process's traffic to other agents: rings the sleeper's doorbell
        bus = open_bus(path)
        noisy = bus.agent("noisy")
        end = time.monotonic() + seconds + 0.5
        while time.monotonic() < end:
            noisy.publish("target", "notification", {"t": 0})
            sent += 1
            time.sleep(0.01)
        bus.close()
    process.join(seconds + 30)
    with open(out) as handle:
        result = json.load(handle)
    result["sent"] = sent
    return result


def publish_cost(path: str, n: int) -> float:
    bus = open_bus(path)
    sender = bus.agent("cost")
    started = time.perf_counter()
    for _ in range(n):
        sender.publish("nobody", "notification", PAYLOAD)
    elapsed = time.perf_counter() - started
    bus.close()
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200, help="publish-to-handler messages")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between those messages")
    parser.add_argument("--idle-agents", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--publishes", type=int, default=2000, help="for the publish cost")
    parser.add_argument("--no-checkpointer", action="store_true",
                        help="leave checkpoints to SQLite's automatic ones (for comparison)")
    parser.add_argument("--dir", default=None, help="where the database goes (default: a temp dir)")
    parser.add_argument("--postgres", nargs="?", const="postgresql://postgres@127.0.0.1:5432/test",
                        default=None, metavar="URL",
                        help="run on this PostgreSQL server instead, in a fresh schema dropped "
                             "afterwards (default: the local test server)")
    parser.add_argument("--notify-throttle", type=float, default=None, metavar="SECONDS",
                        help="PostgreSQL: the shortest time between two NOTIFYs of one bus "
                             "(sqlbus.postgres.wakeup.THROTTLE), to measure what it costs")
    args = parser.parse_args()
    if args.notify_throttle is not None:
        # "as": a plain "import sqlbus.postgres.wakeup" would make sqlbus a local name of
        # main(), unbound on the SQLite path below
        import sqlbus.postgres.wakeup as postgres_wakeup

        postgres_wakeup.THROTTLE = args.notify_throttle  # inherited by forked processes
    if args.no_checkpointer:
        sqlbus.sqlite.checkpoint.CHECKPOINT_FRAMES = 0  # inherited by the forked processes
    workdir = tempfile.mkdtemp(prefix="sqlbus-latency-", dir=args.dir)
    if args.postgres is not None:
        CONNECT["schema"] = f"bench_{secrets.token_hex(5)}"
        try:
            measure_all(args.postgres, args, workdir)
        finally:
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{CONNECT["schema"]}" CASCADE')
        return
    path = os.path.join(workdir, "bench.db")
    frames = sqlbus.sqlite.checkpoint.CHECKPOINT_FRAMES
    print(f"checkpointer: {f'past {frames} WAL frames' if frames else 'off (SQLite automatic)'};"
          f" fallback poll {sqlbus.sqlite.wakeup.FALLBACK}s")
    measure_all(path, args, workdir)


def measure_all(path: str, args: argparse.Namespace, workdir: str) -> None:
    """Every measurement on the bus at ``path`` (a file or a URL), printed as it comes."""
    open_bus(path).close()
    where = f"schema {CONNECT['schema']} of {path}" if CONNECT else f"database {path}"
    print(f"sqlbus latency, {os.cpu_count()} cores, {where}", flush=True)
    if CONNECT:
        import sqlbus.postgres.wakeup

        print(f"notify throttle {sqlbus.postgres.wakeup.THROTTLE * 1000:g} ms", flush=True)

    if CONNECT:  # the floor on this machine: the same round trip in raw psycopg
        import pg_throughput

        print(f"raw psycopg round trip (LISTEN/NOTIFY, 2 processes): "
              f"{fmt_ms(pg_throughput.raw_round_trips(path, args.round_trips))}", flush=True)
    cost_alone = publish_cost(path, args.publishes)
    times = round_trips(path, args.round_trips)
    print(f"request/response round trip (2 processes):   {fmt_ms(times)}")
    times = ping_pong(path, args.round_trips)
    print(f"ping-pong receive(wait)+publish round trip:   {fmt_ms(times)}")

    idle = idle_agents(path, args.idle_agents)
    try:
        time.sleep(0.3)
        cost_waiting = publish_cost(path, args.publishes)
        lags = publish_to_handler(path, args.messages, args.gap, workdir)
        print(f"publish-to-handler, {args.idle_agents} idle agents waiting: {fmt_ms(lags)}")
    finally:
        stop_idle(path, idle)
    print(f"publish cost: {cost_alone * 1e6:.1f} us with nobody waiting, "
          f"{cost_waiting * 1e6:.1f} us with {args.idle_agents} idle agents waiting")

    quiet = measure_idle_cpu(path, args.idle_seconds, workdir, background=False)
    print(f"idle agent in receive(wait=60): {quiet['cpu'] * 1000:.1f} ms CPU in "
          f"{quiet['wall']:.1f} s = {100 * quiet['cpu'] / quiet['wall']:.3f}% of one core")
    busy = measure_idle_cpu(path, args.idle_seconds, workdir, background=True)
    print(f"  ... while another process publishes to others ({busy['sent']} messages): "
          f"{busy['cpu'] * 1000:.1f} ms CPU = {100 * busy['cpu'] / busy['wall']:.3f}% of one core")
    print(f"(median of round trips alone: {statistics.median(times) * 1000:.3f} ms)")


if __name__ == "__main__":
    main()
