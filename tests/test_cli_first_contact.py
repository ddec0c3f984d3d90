"""The CLI as a user of sqlite-utils, rq or redis-cli expects it (SPEC 10): --db anywhere,
``python -m sqlbus``, confirmation before destructive commands, ``worker``, consistent exit
codes, and ``run(concurrency=N)`` (SPEC 5) underneath ``worker --concurrency``."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import file_sha256

import sqlbus
import sqlbus.aio
from sqlbus.cli import cli

TYPES_IN_ORDER = [
    "request", "response", "notification", "error", "task_assignment", "task_result",
    "status_update", "heartbeat", "shutdown", "broadcast", "event", "state_change",
    "state_sync_request",
]
HUGE = "9" * 30


def invoke(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sqlbus: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert "unexpected" not in lines[0]
    return lines[0]


@pytest.fixture
def populated(db_path, make_bus):
    bus = make_bus(max_attempts=1, clock=time.time)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for i in range(3):
        alice.publish("bob", "notification", {"i": i})
    first, second = bob.receive(limit=2)
    first.ack()
    second.fail(ValueError("broken"))
    bus.state.set("plan", {"step": 1}, notify=False)
    return bus


def all_commands(command: click.Command = cli, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from all_commands(sub, path + (name,))


# -- --db before or after the command, python -m sqlbus ----------------------------------------


@pytest.mark.parametrize("args", [
    ["stats", "--json"], ["dead-letters", "list", "--json"], ["state", "get", "plan", "--json"],
    ["metrics", "--json"],
], ids=" ".join)
def test_db_goes_before_or_after_the_command(populated, db_path, args):
    before = invoke("--db", str(db_path), *args)
    after = invoke(*args, "--db", str(db_path))
    assert before.exit_code == 0 and after.exit_code == 0, (before.stderr, after.stderr)
    assert _stable(json.loads(after.stdout)) == _stable(json.loads(before.stdout))


def _stable(value):
    """``value`` without what moves with the clock or the WAL (ages, times, file sizes)."""
    moving = ("age_ms", "timestamp", "throughput", "wal_bytes", "db_bytes")
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not k.endswith(moving)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_db_after_a_group_name_and_after_the_command_wins(populated, db_path, tmp_path):
    result = invoke("dead-letters", "--db", str(db_path), "list", "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 1
    missing = tmp_path / "missing.db"
    result = invoke("--db", str(missing), "stats", "--db", str(db_path), "--json")
    assert result.exit_code == 0, result.stderr
    result = invoke("stats", "--db", str(db_path), "--json", env={"SQLBUS_DB": str(missing)})
    assert result.exit_code == 0, result.stderr
    assert not missing.exists()


def test_python_dash_m_sqlbus_runs_the_cli(populated, db_path):
    out = subprocess.run([sys.executable, "-m", "sqlbus", "stats", "--db", str(db_path), "--json"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(sqlbus.__file__).parent.parent)})
    assert out.returncode == 0, out.stderr
    assert {row["agent"] for row in json.loads(out.stdout)} == {"alice", "bob"}


# -- dead letters by number or message id ------------------------------------------------------


def test_dead_letters_show_and_requeue_take_a_number_or_a_message_id(populated, db_path):
    (dead,) = populated.dead_letters()
    for ref in (str(dead.id), dead.message.id):
        shown = invoke("dead-letters", "show", ref, "--json", "--db", str(db_path))
        assert shown.exit_code == 0, shown.stderr
        assert json.loads(shown.stdout)["message"]["id"] == dead.message.id
    result = invoke("dead-letters", "requeue", dead.message.id, "--db", str(db_path), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"requeued": [dead.message.id]}
    assert populated.dead_letters() == []


# -- destructive commands ask first --------------------------------------------------------------


DESTRUCTIVE = [
    ["state", "delete", "plan"],
    ["dead-letters", "purge", "--all"],
    ["dead-letters", "purge", "--older-than", "0s"],
    ["prune", "--sent-older-than", "0s", "--dead-older-than", "0s"],
]


@pytest.mark.parametrize("args", DESTRUCTIVE, ids=" ".join)
def test_a_destructive_command_without_yes_and_without_a_terminal_refuses(
    populated, db_path, probe, args
):
    time.sleep(0.01)  # "older than 0s" covers everything there is
    populated.close()
    counts, digest = probe.row_counts(), file_sha256(db_path)
    line = one_line_error(invoke("--db", str(db_path), *args), 1)
    assert "--yes" in line
    assert probe.row_counts() == counts and file_sha256(db_path) == digest


@pytest.mark.parametrize("args", DESTRUCTIVE, ids=" ".join)
def test_a_destructive_command_with_yes_acts(populated, db_path, args):
    time.sleep(0.01)
    result = invoke("--db", str(db_path), *args, "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    if args[0] == "state":
        assert json.loads(result.stdout) == {"key": "plan", "version": 2}
        assert populated.state.get("plan") is None
    elif args[0] == "prune":
        assert json.loads(result.stdout) == {"acked": 1, "dead_letters": 1}
    else:
        assert json.loads(result.stdout) == {"purged": 1}
        assert populated.dead_letters() == []


@pytest.mark.slow
def test_a_refusal_typed_at_the_terminal_changes_nothing(populated, db_path):
    script = ("import sys; sys.stdin.isatty = lambda: True; sys.argv[0] = 'sqlbus'; "
              "from sqlbus.cli import main; main()")
    for answer, code in (("n\n", 1), ("\n", 1), ("y\n", 0)):
        out = subprocess.run(
            [sys.executable, "-c", script, "--db", str(db_path), "state", "delete", "plan"],
            input=answer, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == code, out.stderr
        assert "Traceback" not in out.stderr
        assert (populated.state.get("plan") is None) == (code == 0)


def test_state_delete_of_an_absent_key_exits_1(populated, db_path):
    assert "absent" in one_line_error(invoke("--db", str(db_path), "state", "delete", "nope",
                                             "--yes"), 1)


# -- exit codes and one-line errors --------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["peek", "bob", "--limit", HUGE],
    ["send", "--from", "alice", "--to", "b", "--type", "notification", "--ttl", HUGE],
    ["send", "--from", "alice", "--to", "b", "--type", "notification", "--priority", HUGE],
    ["send", "--from", "alice", "--to", "b", "--type", "notification", "--delay", HUGE + "d"],
    ["tail", "--timeout", HUGE + "d"],
    ["tail", "--count", "0"],
    ["dead-letters", "list", "--limit", HUGE],
    ["dead-letters", "purge", "--older-than", HUGE + "d", "--yes"],
    ["state", "set", "k", "1", "--expected-version", HUGE],
    ["state", "set", "k", "1e999"],
    ["state", "delete", "plan", "--expected-version", HUGE, "--yes"],
    ["config", "--archive-retention", HUGE + "w"],
    ["config", "--archive-max-messages", HUGE],
    ["prune", "--sent-older-than", HUGE + "d", "--yes"],
    ["worker", "m:f", "--agent", "w", "--concurrency", HUGE],
    ["worker", "m:f", "--agent", "w", "--concurrency", "0"],
    ["worker", "no-colon", "--agent", "w"],
    ["worker", "no_such_module_here:f", "--agent", "w"],
    ["metrics", "--format", "xml"],
    ["send", "--from", "a*", "--to", "b", "--type", "notification"],
    ["send", "--from", "alice", "--to", "b", "--type", "task_assignment", "--payload", "{}"],
], ids=lambda a: " ".join(a)[:60])
def test_every_bad_argument_value_is_one_line_and_exit_2_and_changes_nothing(
    populated, db_path, probe, args
):
    populated.close()
    counts = probe.row_counts()
    one_line_error(invoke("--db", str(db_path), *args), 2)
    assert probe.row_counts() == counts


def test_type_choices_follow_the_spec_order_everywhere():
    for command in ("send", "tail", "worker"):
        text = invoke(command, "--help").stdout.replace("\n", " ")
        listed = " ".join(text.split()).split("--type [", 1)[1].split("]", 1)[0].split("|")
        assert [t for t in listed if t != "*"] == TYPES_IN_ORDER, command


def test_the_group_help_shows_shell_completion_and_every_help_ends_with_an_example():
    assert '_SQLBUS_COMPLETE=bash_source sqlbus' in invoke("--help").stdout
    for path, _command in all_commands():
        lines = [line.strip() for line in invoke(*path, "--help").stdout.splitlines()
                 if line.strip()]
        assert lines[-2] == "Example:" and lines[-1].startswith("sqlbus "), path
    completion = subprocess.run(
        [sys.executable, "-c", "from sqlbus.cli import main; main()"],
        env={**os.environ, "_SQLBUS_COMPLETE": "bash_source"},
        capture_output=True, text=True, timeout=60,
    )
    assert completion.returncode == 0 and "complete" in completion.stdout


# -- worker ------------------------------------------------------------------------------------


HANDLER_MODULE = '''
import json, os, sqlbus

def handle(message):
    with open(os.environ["HANDLED"], "a") as out:
        out.write(json.dumps({"id": message.id, "type": message.type}) + "\\n")
    return {"handled": message.id}
'''


# The console script as installed: the current directory is not on sys.path by itself.
SQLBUS_SCRIPT = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
                 "sys.argv[0] = 'sqlbus'; from sqlbus.cli import main; main()")


def _worker(tmp_path: Path, db_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "myhandlers.py").write_text(HANDLER_MODULE)
    env = {**os.environ, "HANDLED": str(tmp_path / "handled.jsonl"),
           "PYTHONPATH": str(Path(sqlbus.__file__).parent.parent)}  # this test's sqlbus
    return subprocess.Popen(
        [sys.executable, "-c", SQLBUS_SCRIPT, "worker", "myhandlers:handle", "--db", str(db_path),
         *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _handled(tmp_path: Path) -> list[dict]:
    path = tmp_path / "handled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_worker_runs_a_function_from_a_module_in_the_current_directory_until_sigterm(
    tmp_path, db_path
):
    with sqlbus.connect(db_path) as bus:
        bus.agent("w")
    proc = _worker(tmp_path, db_path, "--agent", "w")
    try:
        with sqlbus.connect(db_path) as bus:
            alice = bus.agent("alice")
            ids = [alice.publish("w", "notification", {"i": i}) for i in range(5)]
            answer = alice.request("w", {"q": 1}, timeout=60)  # the return value answers
            _wait_for(lambda: len(_handled(tmp_path)) == 6, "six handled messages")
            handled = _handled(tmp_path)
            assert [h["id"] for h in handled[:5]] == ids
            assert answer == {"handled": handled[5]["id"]} and handled[5]["type"] == "request"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "worker: agent w" in err  # logs go to stderr
    with sqlbus.connect(db_path) as bus:
        assert bus.peek("w", 10) == []


@pytest.mark.slow
def test_worker_handles_only_its_types_with_concurrency_and_stops_on_sigint(tmp_path, db_path):
    with sqlbus.connect(db_path) as bus:
        bus.agent("w")
    proc = _worker(tmp_path, db_path, "--agent", "w", "--type", "task_assignment", "--type",
                   "notification", "--concurrency", "4")
    try:
        with sqlbus.connect(db_path) as bus:
            alice = bus.agent("alice")
            for i in range(8):
                alice.publish("w", "notification", {"i": i})
            alice.publish("w", "heartbeat", {})
            _wait_for(lambda: len(_handled(tmp_path)) == 8, "eight handled messages")
            _wait_for(lambda: bus.peek("w", 10) == [], "the heartbeat acked (unhandled)")
            assert {t["type"] for t in _handled(tmp_path)} == {"notification"}
            assert bus.metrics().messages_unhandled == 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err


# -- run(concurrency=N) --------------------------------------------------------------------------


def test_run_with_concurrency_has_that_many_messages_in_handlers_at_once_and_no_more(make_bus):
    bus = make_bus(clock=time.time)
    bob = bus.agent("bob")
    together = threading.Barrier(4, timeout=30)
    lock = threading.Lock()
    now = most = 0

    def handler(message):
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
        together.wait()  # breaks (and the test fails) unless 4 handlers run at once
        with lock:
            now -= 1

    bob.subscribe("notification", handler)
    bus.agent("alice").publish_many([{"to": "bob", "type": "notification", "payload": {"i": i}}
                                     for i in range(12)])
    assert bob.run(until_idle=True, concurrency=4) == 12
    assert most == 4
    assert bus.metrics().messages_received == 12 and bus.metrics().messages_failed == 0


@pytest.mark.slow
def test_each_concurrent_handler_keeps_its_own_lease(make_bus):
    bus = make_bus(clock=time.time)
    bob = bus.agent("bob")
    release = threading.Event()
    started = threading.Semaphore(0)

    def handler(message):
        started.release()
        release.wait(30)

    bob.subscribe("notification", handler)
    for i in range(3):
        bus.agent("alice").publish("bob", "notification", {"i": i})
    runner = threading.Thread(target=bob.run, kwargs={"until_idle": True, "lease": 0.2,
                                                      "concurrency": 3})
    runner.start()
    for _ in range(3):
        assert started.acquire(timeout=30)
    time.sleep(1.0)  # five leases long: each must have been extended
    rival = bus.agent("bob").receive(limit=10)
    release.set()
    runner.join(30)
    assert rival == []
    assert bus.metrics().messages_received == 3
    assert bus.metrics().messages_failed == 0


def test_stop_lets_in_flight_handlers_finish_and_the_rest_stay_unattempted(make_bus):
    bus = make_bus(clock=time.time)
    bob = bus.agent("bob")
    release = threading.Event()
    started = threading.Semaphore(0)
    finished = []

    def handler(message):
        started.release()
        release.wait(30)
        finished.append(message.id)

    bob.subscribe("notification", handler)
    for i in range(6):
        bus.agent("alice").publish("bob", "notification", {"i": i})
    result = []
    runner = threading.Thread(target=lambda: result.append(bob.run(concurrency=2)))
    runner.start()
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    bob.stop()
    release.set()
    runner.join(30)
    assert result == [2] and len(finished) == 2
    left = bus.peek("bob", 10)
    assert len(left) == 4 and {e.attempts for e in left} == {0}
    assert {e.status for e in left} == {"ready"}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", 2**64])
def test_run_refuses_a_concurrency_that_is_not_a_small_positive_int(bus, bad):
    bob = bus.agent("bob")
    with pytest.raises(ValueError, match="concurrency"):
        bob.run(until_idle=True, concurrency=bad)


def test_the_asyncio_run_takes_concurrency_too(db_path):
    async def main() -> tuple[int, int]:
        async with await sqlbus.aio.connect(db_path) as bus:
            bob = await bus.agent("bob")
            now = most = 0
            gate = asyncio.Event()

            async def handler(message):
                nonlocal now, most
                now += 1
                most = max(most, now)
                if now == 3:
                    gate.set()
                await asyncio.wait_for(gate.wait(), 30)
                now -= 1

            subscribed = bob.subscribe("notification", handler)
            if inspect.isawaitable(subscribed):  # SPEC 9: a coroutine
                await subscribed
            alice = await bus.agent("alice")
            for i in range(9):
                await alice.publish("bob", "notification", {"i": i})
            done = await bob.run(until_idle=True, concurrency=3)
            return done, most

    assert asyncio.run(main()) == (9, 3)


def test_a_failing_concurrent_handler_does_not_stop_the_loop(make_bus):
    bus = make_bus(clock=time.time, max_attempts=1)
    bob = bus.agent("bob")

    def handler(message):
        if message.payload["i"] % 2:
            raise ValueError("odd")

    bob.subscribe("notification", handler)
    bus.agent("alice").publish_many([{"to": "bob", "type": "notification", "payload": {"i": i}}
                                     for i in range(10)])
    assert bob.run(until_idle=True, concurrency=3) == 10
    m = bus.metrics()
    assert (m.messages_received, m.messages_failed, m.messages_dead_lettered) == (5, 5, 5)


def test_hundreds_of_concurrent_runs_leave_no_thread_behind(make_bus):
    bus = make_bus(clock=time.time)
    bob, alice = bus.agent("bob"), bus.agent("alice")
    bob.subscribe("notification", lambda message: None)
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True, concurrency=4)  # the bus's own threads start here
    threads = threading.active_count()
    for _ in range(300):
        alice.publish("bob", "notification", {})
        assert bob.run(until_idle=True, concurrency=4) == 1
    assert threading.active_count() == threads


def test_send_that_fails_validation_does_not_register_its_sender(tmp_path: Path) -> None:
    db = tmp_path / "team.db"
    sqlbus.connect(db).close()
    result = CliRunner().invoke(cli, ["--db", str(db), "send", "--from", "newcomer", "--to", "bob",
                                      "--type", "notification", "--payload", "[1]"])
    assert result.exit_code == 2, result.output
    with sqlbus.connect(db) as bus:
        assert [a.id for a in bus.agents()] == []
