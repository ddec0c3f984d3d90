"""The ``sqlbus`` CLI: every command through CliRunner and as a real process, --json equal to
the library's numbers, one-line errors with exit code 1 or 2 that create or change no file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import apsw
import click
import pytest
from click.testing import CliRunner
from conftest import file_sha256, query
from probes import SCHEMA_VERSION, SQLiteProbe

import sqlbus
from sqlbus.cli import cli, parse_duration

ROOT = Path(__file__).resolve().parent.parent
SQLBUS = [sys.executable, "-m", "sqlbus.cli"]


def run(db: Path | str | None, *args: str, env: dict | None = None):
    """Invoke the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    argv = (["--db", str(db)] if db is not None else []) + list(args)
    return CliRunner(env=env).invoke(cli, argv, catch_exceptions=False)


def ok(db: Path, *args: str) -> str:
    result = run(db, *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sqlbus: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def all_commands(command: click.Command = cli, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from all_commands(sub, path + (name,))


def leaf_paths() -> list[str]:
    return [" ".join(p) for p, c in all_commands() if p and not isinstance(c, click.Group)]


@pytest.fixture
def populated(db_path, make_bus):
    """A bus with a little of everything: acked, ready, retrying, dead, state."""
    bus = make_bus(max_attempts=1, clock=time.time)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for i in range(4):
        alice.publish("bob", "task_assignment" if i == 0 else "notification",
                      {"task": {"id": "t1", "type": "build"}} if i == 0 else {"i": i})
    first, second = bob.receive(limit=2)
    first.ack()
    second.fail(ValueError("broken"))
    bus.state.set("plan", {"step": 1}, notify=False)
    return bus


# -- help and docs --------------------------------------------------------------------------


def test_every_command_has_help_that_ends_with_an_example():
    for path, command in all_commands():
        assert (command.help or "").strip(), f"{path} has no help"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        assert lines[-2] == "Example:", f"{' '.join(path)}: help does not end with an example"
        assert lines[-1].startswith("sqlbus "), lines[-1]
        if path:
            assert lines[-1].split()[3:][: len(path)] == list(path), lines[-1]


def test_every_command_is_in_the_readme_cli_table():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `sqlbus ")]
    listed = " ".join(rows)
    for path in leaf_paths():
        assert re.search(rf"`sqlbus {re.escape(path)}[ `]", listed), f"{path} missing from README"


def test_the_command_list_is_what_the_spec_names():
    assert set(leaf_paths()) == {
        "init", "config", "stats", "agents", "peek", "send", "tail", "dead-letters list",
        "dead-letters show", "dead-letters requeue", "dead-letters purge", "state get",
        "state set", "state delete", "state list", "metrics", "prune", "check", "backup",
        "vacuum", "worker", "mcp", "dashboard",
    }


def test_durations_read_like_people_write_them():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12h") == 43200
    assert parse_duration("250ms") == 0.25
    assert parse_duration("90") == 90
    assert parse_duration("never") is None
    with pytest.raises(ValueError, match="7x"):
        parse_duration("7x")


# -- commands and their --json --------------------------------------------------------------


def test_init_creates_a_sqlbus_database_and_is_harmless_twice(tmp_path):
    db = tmp_path / "new.db"
    assert "created" in ok(db, "init")
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert "already" in ok(db, "init")


def test_the_database_can_come_from_the_environment(populated, db_path):
    result = run(None, "stats", "--json", env={"SQLBUS_DB": str(db_path)})
    assert result.exit_code == 0
    assert {row["agent"] for row in json.loads(result.stdout)} == {"alice", "bob"}


def test_stats_json_matches_the_library(populated):
    rows = json.loads(ok(populated.path, "stats", "--json"))
    library = [s for s in populated.stats()]
    assert [(r["agent"], r["ready"], r["leased"], r["retrying"], r["dead"]) for r in rows] == [
        (s.agent, s.ready, s.leased, s.retrying, s.dead) for s in library
    ]
    assert rows[1]["dead"] == 1 and rows[1]["ready"] == 2
    table = ok(populated.path, "stats")
    assert table.splitlines()[0].split() == ["AGENT", "READY", "LEASED", "RETRYING", "SCHEDULED",
                                             "EXPIRED", "DEAD", "OLDEST_READY_MS"]


def test_agents_lists_the_registry(populated):
    rows = json.loads(ok(populated.path, "agents", "--json"))
    assert [r["id"] for r in rows] == ["alice", "bob"]
    assert set(rows[0]) == {"id", "registered_at", "last_seen", "status", "alive", "subscriptions"}
    assert "alice" in ok(populated.path, "agents")


def test_peek_shows_the_inbox_without_claiming(populated):
    before = [e.message.id for e in populated.peek("bob")]
    rows = json.loads(ok(populated.path, "peek", "bob", "--json"))
    assert [r["message"]["id"] for r in rows] == before
    assert [r["status"] for r in rows] == ["ready", "ready"]
    assert "notification" in ok(populated.path, "peek", "bob")
    claimed = populated.agent("bob").receive(limit=5)
    assert [d.message.id for d in claimed] == before
    assert all(d.attempts == 1 for d in claimed)


def test_send_publishes_a_message_the_library_receives(populated):
    out = ok(populated.path, "send", "--from", "ops", "--to", "carol", "--type", "notification",
             "--payload", '{"text": "hi"}', "--priority", "5")
    (d,) = populated.agent("carol").receive()
    assert d.message.id == out.strip()
    assert (d.message.sender, d.message.payload, d.message.headers.priority) == (
        "ops", {"text": "hi"}, 5)


def test_dead_letters_list_show_requeue_and_purge(populated):
    rows = json.loads(ok(populated.path, "dead-letters", "list", "--json"))
    assert len(rows) == 1 and rows[0]["error_name"] == "ValueError"
    dead_id = rows[0]["id"]
    shown = json.loads(ok(populated.path, "dead-letters", "show", str(dead_id), "--json"))
    assert shown == rows[0]
    assert "ValueError" in ok(populated.path, "dead-letters", "show", str(dead_id))
    assert json.loads(ok(populated.path, "dead-letters", "requeue", str(dead_id), "--json")) == {
        "requeued": [rows[0]["message"]["id"]]}
    assert populated.dead_letters() == []
    populated.agent("bob").receive(limit=5)[0].fail(ValueError("again"))
    out = ok(populated.path, "dead-letters", "requeue", "--all", "--agent", "bob",
             "--reason", "max_attempts")
    assert out.strip() == "requeued 1 message(s)"
    populated.agent("bob").receive(limit=5)[0].fail(ValueError("third"))
    assert json.loads(ok(populated.path, "dead-letters", "purge", "--all", "--yes", "--json")) == {
        "purged": 1}
    assert populated.dead_letters() == []


def test_state_get_set_and_list(populated):
    assert ok(populated.path, "state", "set", "plan", '{"step": 2}', "--expected-version",
              "1").strip() == "2"
    entry = json.loads(ok(populated.path, "state", "get", "plan", "--json"))
    assert (entry["value"], entry["version"]) == ({"step": 2}, 2)
    assert populated.state.get("plan").value == {"step": 2}
    assert json.loads(ok(populated.path, "state", "get", "plan").splitlines()[0]) == {"step": 2}
    rows = json.loads(ok(populated.path, "state", "list", "--json"))
    assert [(r["key"], r["version"]) for r in rows] == [("plan", 2)]
    conflict = run(populated.path, "state", "set", "plan", "3", "--expected-version", "1")
    assert "expected version 1, found 2" in one_line_error(conflict, 1)
    one_line_error(run(populated.path, "state", "get", "absent"), 1)


def test_metrics_json_matches_the_library(populated):
    data = json.loads(ok(populated.path, "metrics", "--format", "json"))
    m = populated.metrics()
    assert list(data) == list(sqlbus.Metrics.__struct_fields__)
    for field in ("messages_sent", "messages_received", "messages_failed",
                  "messages_dead_lettered", "messages_expired", "error_rates", "success_rate"):
        assert data[field] == json.loads(json.dumps(getattr(m, field))), field
    assert data["agent_activity"]["bob"] == {"sent": 0, "received": 1}
    assert data["queue_depths"]["bob"] == {"ready": 2, "leased": 0, "retrying": 0, "scheduled": 0,
                                           "expired": 0, "dead": 1}
    assert data["error_rates"] == {"ValueError": 1}
    table = ok(populated.path, "metrics")
    assert re.search(r"^messages sent\s+4$", table, re.M)


def test_metrics_prometheus_is_the_text_exposition_format(populated):
    from test_metrics import parse_prometheus

    series = parse_prometheus(ok(populated.path, "metrics", "--format", "prometheus"))
    assert series["sqlbus_messages_sent_total"] == {"": 4.0}
    assert series["sqlbus_queue_depth"]['agent="bob",state="ready"'] == 2.0


def test_prune_deletes_only_what_is_older_than_asked(populated):
    assert json.loads(ok(populated.path, "prune", "--yes", "--json")) == {"acked": 0, "dead_letters": 0}
    time.sleep(0.01)
    out = json.loads(ok(populated.path, "prune", "--yes", "--sent-older-than", "1ms",
                        "--dead-older-than", "never", "--json"))
    assert out == {"acked": 1, "dead_letters": 0}
    assert len(populated.dead_letters()) == 1
    assert populated.metrics().messages_received == 1


def test_check_passes_on_a_healthy_file_and_fails_when_a_reader_pins_the_wal(
    populated, db_path, probe
):
    report = json.loads(ok(db_path, "check", "--json"))
    assert report["ok"] and report["integrity"] == ["ok"] and report["schema_version"] == SCHEMA_VERSION
    assert ok(db_path, "check").splitlines()[-1] == "ok"
    with probe.snapshot_held():
        for _ in range(10):
            populated.agent("alice").publish("bob", "notification", {})
        result = run(db_path, "check")
        assert result.exit_code == 1
        assert "PINNED" in result.stdout and result.stdout.splitlines()[-1] == "NOT OK"


def test_backup_and_vacuum(populated, tmp_path):
    dest = tmp_path / "copy.db"
    out = json.loads(ok(populated.path, "backup", str(dest), "--json"))
    assert out["dest"] == str(dest) and out["bytes"] == dest.stat().st_size
    assert SQLiteProbe(dest).inbox_count() == SQLiteProbe(populated.path).inbox_count()
    sha = file_sha256(dest)
    line = one_line_error(run(populated.path, "backup", str(dest)), 1)
    assert "exists" in line and file_sha256(dest) == sha
    result = json.loads(ok(populated.path, "vacuum", "--json"))
    assert result["bytes_after"] <= result["bytes_before"]
    assert len(populated.peek("bob")) == 2


def test_tail_prints_what_is_published_and_stops_on_count(populated):
    import threading

    def publish_soon():
        time.sleep(0.3)
        populated.agent("alice").publish("bob", "notification", {"ignored": True})
        populated.agent("alice").publish("carol", "error", {"wanted": True})

    thread = threading.Thread(target=publish_soon)
    thread.start()
    out = ok(populated.path, "tail", "--type", "error", "--count", "1", "--timeout", "20s",
             "--json")
    thread.join()
    (line,) = out.splitlines()
    record = json.loads(line)
    assert record["message"]["payload"] == {"wanted": True}
    assert record["recipients"] == ["carol"]


# -- errors ---------------------------------------------------------------------------------

_EVERY_COMMAND = [
    ["stats"], ["agents"], ["peek", "bob"], ["send", "--from", "a", "--to", "b", "--type",
    "notification"], ["tail", "--timeout", "0"], ["dead-letters", "list"],
    ["dead-letters", "show", "1"], ["dead-letters", "requeue", "--all"],
    ["dead-letters", "purge", "--all"], ["state", "get", "k"], ["state", "set", "k", "1"],
    ["state", "list"], ["metrics"], ["prune"], ["check"], ["backup", "BACKUP"], ["vacuum"],
]


def _files(directory: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("args", _EVERY_COMMAND, ids=lambda a: " ".join(a[:2]))
def test_a_missing_database_is_one_line_exit_1_and_no_file_is_created(tmp_path, args):
    db = tmp_path / "missing.db"
    args = [str(tmp_path / "b.db") if a == "BACKUP" else a for a in args]
    line = one_line_error(run(db, *args), 1)
    assert "no such database" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["text", "other-app", "truncated", "empty"])
def test_a_foreign_or_corrupt_file_is_refused_in_one_line_and_left_untouched(tmp_path, kind):
    db = tmp_path / "x.db"
    if kind == "text":
        db.write_text("name,age\nbob,3\n" * 100)
    elif kind == "other-app":
        conn = apsw.Connection(str(db))
        conn.execute("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('bob')")
        conn.close()
    elif kind == "truncated":
        with sqlbus.connect(db) as bus:
            bus.agent("a").publish_many([{"to": "b", "type": "notification", "payload": {
                "pad": "x" * 3000}} for _ in range(50)])
            bus.vacuum()
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
        for suffix in ("-wal", "-shm"):
            if os.path.exists(str(db) + suffix):
                os.remove(str(db) + suffix)
    else:
        db.write_bytes(b"")
    before = _files(tmp_path)
    for args in (["stats"], ["metrics"], ["prune"], ["vacuum"], ["check"], ["init"]):
        result = run(db, *args)
        if kind == "empty" and args == ["init"]:
            continue  # an empty file is where init may create the database
        one_line_error(result, 1)
        assert _files(tmp_path) == before, args


@pytest.mark.parametrize("args", [
    ["bogus"],
    ["stats", "--bogus"],
    ["prune", "--sent-older-than", "7x"],
    ["state", "set", "k", "{not json"],
    ["dead-letters", "requeue"],
    ["dead-letters", "requeue", "3", "--all"],
    ["dead-letters", "purge"],
    ["metrics", "--format", "xml"],
    ["peek", "bob", "--limit", "0"],
    ["send", "--from", "a", "--to", "b", "--type", "nonsense"],
], ids=lambda a: " ".join(a))
def test_bad_arguments_are_one_line_and_exit_code_2_and_touch_nothing(populated, db_path, args):
    populated.close()
    before = _files(db_path.parent)
    one_line_error(run(db_path, *args), 2)
    assert _files(db_path.parent) == before


def test_no_database_at_all_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SQLBUS_DB", raising=False)
    assert "--db" in one_line_error(run(None, "stats"), 2)


# -- as real processes ----------------------------------------------------------------------


def _sub(db: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SQLBUS, "--db", str(db), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, **kwargs)


@pytest.mark.slow
def test_every_command_runs_as_a_real_process(tmp_path):
    db = tmp_path / "p.db"
    backup = tmp_path / "p-copy.db"

    def check(*args: str) -> str:
        proc = _sub(db, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr == "", (args, proc.stderr)  # no progress bar when piped
        return proc.stdout

    check("init")
    with sqlbus.connect(db) as bus:
        bus.agent("bob")  # registered: a send to an unknown agent warns on stderr
    message_id = check("send", "--from", "ops", "--to", "bob", "--type", "notification").strip()
    assert message_id.startswith("msg-")
    assert json.loads(check("stats", "--json"))[0]["agent"] == "bob"
    assert "ops" in check("agents")
    assert json.loads(check("peek", "bob", "--json"))[0]["message"]["id"] == message_id
    assert check("metrics", "--format", "prometheus").startswith("# HELP sqlbus_")
    assert check("state", "set", "k", '"v"').strip() == "1"
    assert json.loads(check("state", "get", "k", "--json"))["value"] == "v"
    assert "k" in check("state", "list")
    with sqlbus.connect(db, max_attempts=1) as bus:
        bus.agent("bob").receive()[0].fail(ValueError("x"))
    dead = json.loads(check("dead-letters", "list", "--json"))
    assert "ValueError" in check("dead-letters", "show", str(dead[0]["id"]))
    assert check("dead-letters", "requeue", str(dead[0]["id"])).startswith("requeued 1")
    assert check("dead-letters", "purge", "--older-than", "30d", "--yes").startswith("purged 0")
    assert check("prune", "--yes").startswith("pruned")
    assert check("check").splitlines()[-1] == "ok"
    assert check("backup", str(backup)).startswith("backed up")
    assert check("vacuum").startswith("vacuumed")
    assert check("tail", "--timeout", "0.2s") == ""
    installed = ROOT / ".venv" / "bin" / "sqlbus"
    if installed.exists():
        proc = subprocess.run([str(installed), "--db", str(db), "stats", "--json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and json.loads(proc.stdout)[0]["agent"] == "bob"


@pytest.mark.slow
def test_errors_in_a_real_process_are_one_line_without_a_traceback(tmp_path):
    proc = _sub(tmp_path / "none.db", "stats")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    proc = _sub(tmp_path / "none.db", "prune", "--sent-older-than", "soon")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tail_prints_a_message_published_by_another_process(tmp_path):
    db = tmp_path / "t.db"
    sqlbus.connect(db).close()
    tail = subprocess.Popen(
        [*SQLBUS, "--db", str(db), "tail", "--agent", "bob", "--count", "1", "--timeout", "30s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    published = []
    try:
        # The tail starts from the newest message when it is ready: publish until it prints.
        with sqlbus.connect(db) as bus:
            alice = bus.agent("alice")
            deadline = time.monotonic() + 30
            while tail.poll() is None and time.monotonic() < deadline:
                published.append(alice.publish("bob", "notification", {"n": len(published)}))
                time.sleep(0.1)
        out, err = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0, err
    (line,) = out.splitlines()
    assert "alice -> bob" in line
    assert line.split()[5] in published
