"""sqlbus demo: a coordinator and three workers, as separate processes, on one SQLite file.

Run it with ``make demo`` (or ``python examples/demo.py [PATH]``). What happens:

1. Three worker processes start, register on the bus and report ``idle`` (status_update).
2. The coordinator assigns seven tasks (task_assignment) with priorities 1..5. Each worker
   takes its most urgent task first. One task fails once and is retried; one always fails
   and ends in the dead letters after 3 attempts.
3. Workers answer with task_result and record each task in versioned shared state; the
   coordinator keeps a progress counter there (an atomic update).
4. The coordinator asks worker-2 a question (request/response) while its own loop runs.
5. The coordinator broadcasts the event ``all.done``; every worker stops cleanly.
6. A summary, read back from the database: sent, acked, retried, dead letters.

Everything goes through one file; nothing else is shared. Without PATH it is
``<temp dir>/sqlbus-demo-<uid>/team.db``, the same on every run: a run starts by removing the
previous run's database (and its -wal, -shm and wake-up files), and leaves its own in place for
``sqlbus --db PATH stats`` and the other commands to look at.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import stat
import sys
import tempfile
import threading
import time

import sqlbus


class _WithoutTraceback(logging.Formatter):
    def formatException(self, ei: object) -> str:  # noqa: N802 (logging's name)
        return ""


# sqlbus logs every handler failure at WARNING with its traceback; this demo narrates its
# failures itself, so it shows the library's log lines without the tracebacks.
_log_handler = logging.StreamHandler(sys.stdout)
_log_handler.setFormatter(_WithoutTraceback("[  log ] %(message)s"))
logging.getLogger("sqlbus").addHandler(_log_handler)

COORDINATOR = "coordinator"
WORKERS = ["worker-1", "worker-2", "worker-3"]
POLICY = {"backoff_base": 0.2, "max_attempts": 3}  # fast retries, so the demo is quick
# One start time for every process, so their log lines share one timeline.
STARTED = float(os.environ.setdefault("SQLBUS_DEMO_STARTED", str(time.time())))

# (task id, task type, worker, priority): worker-1 gets three, to show priority order.
TASKS = [
    ("write-report", "report", "worker-1", 1),
    ("resize-images", "images", "worker-1", 3),
    ("deploy-hotfix", "deploy", "worker-1", 5),
    ("fetch-prices", "flaky", "worker-2", 4),  # fails once, then succeeds on its retry
    ("index-docs", "index", "worker-2", 2),
    ("parse-upload", "poison", "worker-3", 3),  # always fails: dead letter after 3 attempts
    ("send-emails", "email", "worker-3", 2),
]


def say(who: str, text: str) -> None:
    # One write per line, so lines from the worker processes never interleave mid-line.
    line = f"[{time.time() - STARTED:5.2f}s] {who:<11} {text}\n"
    os.write(sys.stdout.fileno(), line.encode())


# ---------------------------------------------------------------------------------------------
# A worker process


def worker(path: str, name: str) -> None:
    bus = sqlbus.connect(path, **POLICY)
    me = bus.agent(name)

    def on_task(message: sqlbus.Message) -> None:
        task = sqlbus.decode_payload(message, sqlbus.TaskAssignment).task
        d = sqlbus.current_delivery()  # effects buffered here commit with the ack
        assert d is not None
        say(name, f"starts {task.id} (priority {message.headers.priority}, attempt {d.attempts})")
        if task.type == "flaky" and d.attempts == 1:
            say(name, f"{task.id} failed: network blip -> will be retried")
            raise ConnectionError("simulated network blip")
        if task.type == "poison":
            say(name, f"{task.id} failed: input file is corrupt")
            raise RuntimeError("input file is corrupt")
        started = time.monotonic()
        time.sleep(0.05)  # the "work"
        result = sqlbus.TaskResult(
            task_id=task.id,
            status="completed",
            result={"worker": name},
            metrics=sqlbus.TaskMetrics(execution_time=int((time.monotonic() - started) * 1000)),
        )
        d.publish(COORDINATOR, "task_result", result)
        d.state.set(f"task/{task.id}", {"status": "done", "by": name}, notify=False)

    def on_request(message: sqlbus.Message) -> dict:
        say(name, f"answers a request: {message.payload}")
        return {"agent": name, "free_slots": 2, "load": 0.4}

    def on_all_done(event: sqlbus.Event) -> None:
        say(name, f"got event {event.name!r} from {event.emitted_by}; stopping")
        d = sqlbus.current_delivery()
        assert d is not None
        d.publish(COORDINATOR, "status_update", {"agent_status": "shutting_down"})
        me.stop()

    me.subscribe("task_assignment", on_task)
    me.subscribe("request", on_request)
    me.events.on("all.done", on_all_done)
    me.publish(COORDINATOR, "status_update", {"agent_status": "idle"})
    me.run()
    bus.close()


# ---------------------------------------------------------------------------------------------
# The database file


def default_path() -> str:
    """The one path every demo run uses, in a directory of this user's alone (0700): in a
    shared temp directory another user could have made the name first."""
    directory = os.path.join(tempfile.gettempdir(), f"sqlbus-demo-{os.getuid()}")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SystemExit(f"demo: {directory} is not a private directory of this user; "
                         "remove it or pass a database path: python examples/demo.py PATH")
    return os.path.join(directory, "team.db")


def remove_earlier_run(path: str) -> None:
    """Remove the database a previous run left at ``path``, with SQLite's and sqlbus's files
    beside it, so each run starts from an empty bus."""
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
    shutil.rmtree(path + ".doorbells", ignore_errors=True)


def sqlbus_command() -> str:
    """How to call the sqlbus CLI of this Python (.venv/bin/sqlbus under make demo)."""
    script = os.path.join(os.path.dirname(sys.executable), "sqlbus")
    if not os.path.exists(script):
        return "sqlbus"
    relative = os.path.relpath(script)
    return script if relative.startswith("..") else relative


# ---------------------------------------------------------------------------------------------
# The coordinator (this process)


def main() -> int:
    path = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    remove_earlier_run(path)
    bus = sqlbus.connect(path, **POLICY)
    coordinator = bus.agent(COORDINATOR)
    print("sqlbus demo: a coordinator and 3 worker processes sharing one SQLite file\n"
          "(times are seconds since start; each line says who is talking)\n", flush=True)
    say(COORDINATOR, f"bus at {path}")

    idle: set[str] = set()
    finished: list[str] = []
    all_idle = threading.Event()
    all_finished = threading.Event()

    def on_status(message: sqlbus.Message) -> None:
        status = message.payload["agent_status"]
        say(COORDINATOR, f"status from {message.sender}: {status}")
        if status == "idle":
            idle.add(message.sender)
            if idle == set(WORKERS):
                all_idle.set()

    def on_result(message: sqlbus.Message) -> None:
        result = sqlbus.decode_payload(message, sqlbus.TaskResult)
        finished.append(result.task_id)
        done = bus.state.update(
            "progress", lambda old: {"done": (old or {"done": 0})["done"] + 1}, notify=False
        )
        say(COORDINATOR, f"result from {message.sender}: {result.task_id} {result.status} "
                         f"(progress version {done})")
        if len(finished) == len(TASKS) - 1:
            all_finished.set()

    coordinator.subscribe("status_update", on_status)
    coordinator.subscribe("task_result", on_result)
    loop = threading.Thread(target=coordinator.run, name="coordinator-loop")
    loop.start()

    context = multiprocessing.get_context("spawn")  # fresh processes, like separate programs
    processes = [context.Process(target=worker, args=(path, name), name=name) for name in WORKERS]
    for process in processes:
        process.start()
    ok = True
    try:
        if not all_idle.wait(20):
            raise RuntimeError("the workers did not report idle in time")

        # -- 1. assign the tasks, in one transaction --------------------------------------
        coordinator.publish_many([
            {"to": to, "type": "task_assignment", "priority": priority, "ttl": 0,
             "payload": {"task": {"id": task_id, "type": task_type}}}
            for task_id, task_type, to, priority in TASKS
        ])
        say(COORDINATOR, f"assigned {len(TASKS)} tasks to {len(WORKERS)} workers")

        # -- 2. wait for the results and the dead letter ------------------------------------
        if not all_finished.wait(20):
            raise RuntimeError(f"only {len(finished)} results arrived: {finished}")
        deadline = time.monotonic() + 20
        while not bus.dead_letters() and time.monotonic() < deadline:
            time.sleep(0.05)
        for dead in bus.dead_letters():
            task_id = dead.message.payload["task"]["id"]
            say(COORDINATOR, f"dead letter: {task_id} for {dead.agent} after {dead.attempts} "
                             f"attempts ({dead.reason}: {dead.error_name}: {dead.error_message})")

        # -- 3. a request/response exchange, while the coordinator's loop keeps running -------
        say(COORDINATOR, "asks worker-2 for its capacity (request)")
        answer = coordinator.request("worker-2", {"question": "capacity?"}, timeout=10)
        say(COORDINATOR, f"response from worker-2: {answer}")

        # -- 4. an event to everyone -------------------------------------------------------------
        coordinator.events.emit("all.done", {"tasks": len(TASKS)})
        say(COORDINATOR, "broadcast event 'all.done'")
        for process in processes:
            process.join(timeout=20)
            ok = ok and process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
                ok = False
        time.sleep(0.1)  # let the last status updates reach the coordinator's loop
        coordinator.stop()
        loop.join()

    # -- 5. the summary, read back from the database ------------------------------------------
    metrics = bus.metrics()
    progress = bus.state.get("progress")
    failed = metrics.messages_failed
    print()
    print("Summary (from the database)")
    print(f"  messages sent            {metrics.messages_sent}")
    print(f"  deliveries acked         {metrics.messages_received} "
          "(a broadcast is one message delivered to several agents)")
    print(f"  failed attempts          {failed} "
          f"({failed - metrics.messages_dead_lettered} retried, "
          f"{metrics.messages_dead_lettered} dead-lettered)")
    print(f"  dead letters             {len(bus.dead_letters())}")
    print(f"  tasks completed          {progress.value['done'] if progress else 0} of {len(TASKS)} "
          f"(state 'progress' at version {progress.version if progress else 0})")
    print(f"  errors by name           {metrics.error_rates}")
    print(f"  unhandled messages       {metrics.messages_unhandled}")
    print(f"  average publish->ack     {metrics.average_delivery_ms:.1f} ms")
    print(f"  workers exited cleanly   {'yes' if ok else 'NO'}")
    bus.close()
    print()
    print(f"The database is {path} (the next run replaces it). Look inside:")
    cli = f"{sqlbus_command()} --db {path}"
    print(f"  {cli} stats")
    print(f"  {cli} dead-letters list")
    print(f"  {cli} metrics")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
