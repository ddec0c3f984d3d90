"""Maintenance and honest looks: stats and peek read one snapshot and name every state of
SPEC 4.2, vacuum never stalls writers behind a reader and builds its copy on disk, WAL upkeep
stays off the caller's thread, and the CLI's advice fits the command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import apsw
import msgspec
import pytest
from click.testing import CliRunner
from conftest import query
from probes import wal_check_every, wal_limit

import sqlbus
from sqlbus.cli import cli

INBOX = 200

# Another process that keeps bob's inbox moving: claims, releases, retries and leases that run
# out, so rows keep changing state under the readers of the test.
_CHURN = textwrap.dedent(
    """
    import os, random, sys, sqlbus
    path, stop = sys.argv[1], sys.argv[2]
    with sqlbus.connect(path, max_attempts=10**6) as bus:
        bob = bus.agent("bob")
        rounds = 0
        while not os.path.exists(stop):
            for d in bob.receive(limit=random.randint(1, 40), lease=0.02):
                r = random.random()
                if r < 0.4:
                    d.release()
                elif r < 0.8:
                    d.retry(delay=random.choice([0.001, 0.005, 0.02]))
                # else: the lease runs out
            rounds += 1
            if rounds == 20:
                open(stop + ".started", "w").close()
    """
)


def _start_churn(db_path: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", _CHURN, str(db_path), str(stop)])
    deadline = time.monotonic() + 60
    while not Path(str(stop) + ".started").exists():
        assert proc.poll() is None, "the churning process died"
        assert time.monotonic() < deadline, "the churning process never started"
        time.sleep(0.01)
    return proc, stop


def _stop_churn(proc: subprocess.Popen[bytes], stop: Path) -> None:
    stop.touch()
    assert proc.wait(60) == 0


def _fill_inbox(db_path: Path) -> list[str]:
    with sqlbus.connect(db_path) as bus:
        bus.agent("bob")
        return bus.agent("alice").publish_many(
            [{"to": "bob", "type": "notification", "payload": {"i": i}, "ttl": 0,
              "priority": 1 + i % 5} for i in range(INBOX)]
        )


@pytest.mark.slow
def test_stats_counts_every_message_once_while_another_process_churns_the_inbox(db_path, tmp_path):
    _fill_inbox(db_path)
    proc, stop = _start_churn(db_path, tmp_path)
    wrong = []
    try:
        with sqlbus.connect(db_path) as bus:
            for _ in range(3000):
                (bob,) = [s for s in bus.stats() if s.agent == "bob"]
                states = msgspec.structs.asdict(bob)
                del states["agent"]
                total = sum(states.values()) - states["oldest_ready_age_ms"]
                if total != INBOX:
                    wrong.append(total)
    finally:
        _stop_churn(proc, stop)
    assert wrong == [], f"{len(wrong)} of 3000 samples did not count {INBOX}: {sorted(set(wrong))}"


@pytest.mark.slow
def test_peek_lists_every_message_once_while_another_process_churns_the_inbox(db_path, tmp_path):
    ids = set(_fill_inbox(db_path))
    proc, stop = _start_churn(db_path, tmp_path)
    bad = []
    try:
        with sqlbus.connect(db_path) as bus:
            for _ in range(400):
                listed = [e.message.id for e in bus.peek("bob", limit=1000)]
                if len(listed) != INBOX or set(listed) != ids:
                    bad.append((len(listed), len(set(listed))))
    finally:
        _stop_churn(proc, stop)
    assert bad == [], f"{len(bad)} of 400 peeks were not the {INBOX} messages once each: {bad[:5]}"


def test_peek_names_retrying_scheduled_leased_and_expired_and_lists_in_receive_order(make_bus, clock):
    bus = make_bus(backoff_base=10.0)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    failed = alice.publish("bob", "notification", {}, priority=5, ttl=0)
    (d,) = bob.receive()
    d.fail(RuntimeError("again later"))  # retrying: due in 10 s
    low = alice.publish("bob", "notification", {}, priority=1, ttl=0)
    delayed = alice.publish("bob", "notification", {}, delay=60.0, ttl=0)
    held = alice.publish("bob", "notification", {}, priority=4, ttl=0)
    mortal = alice.publish("bob", "notification", {}, priority=2, ttl=5_000)
    (lease,) = bob.receive(types=None, lease=30.0, limit=1)
    assert lease.message.id == held

    def look() -> list[tuple[str, str]]:
        return [(e.message.id, e.status) for e in bus.peek("bob", limit=100)]

    assert look() == [(mortal, "ready"), (low, "ready"), (failed, "retrying"),
                      (held, "leased"), (delayed, "scheduled")]
    (stats,) = [s for s in bus.stats() if s.agent == "bob"]
    assert (stats.ready, stats.leased, stats.retrying, stats.scheduled, stats.expired) == (2, 1, 1, 1, 0)

    clock.advance(11)  # the retry is due; the ttl-5 s message expired
    assert look() == [(failed, "ready"), (low, "ready"), (held, "leased"),
                      (delayed, "scheduled"), (mortal, "expired")]
    depth = bus.metrics().queue_depths["bob"]
    assert msgspec.structs.asdict(depth) == {
        "ready": 2, "leased": 1, "retrying": 0, "scheduled": 1, "expired": 1, "dead": 0}
    assert bus.metrics().messages_expired == 1  # from the moment it expired
    # peek's order is receive's: the due priority-5 retry first, then the priority-1 message
    first, second = bob.receive(limit=2)
    assert [first.message.id, second.message.id] == [failed, low]
    assert bus.metrics().messages_expired == 1  # moved to dead letters, counted once
    assert bus.dead_letters()[0].reason == "expired"


# -- vacuum ---------------------------------------------------------------------------------

_READER = textwrap.dedent(
    """
    import apsw, os, sys, time
    path, stop = sys.argv[1], sys.argv[2]
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM message").fetchall()  # holds this snapshot
    open(stop + ".started", "w").close()
    while not os.path.exists(stop):
        time.sleep(0.01)
    conn.execute("COMMIT")
    conn.close()
    """
)

# Publishes as fast as it can until told to stop; prints how many publishes succeeded and the
# errors of those that did not.
_WRITER = textwrap.dedent(
    """
    import json, os, sys, sqlbus
    path, stop = sys.argv[1], sys.argv[2]
    done, errors = 0, []
    with sqlbus.connect(path, busy_timeout=2.0) as bus:
        writer = bus.agent("writer")
        while not os.path.exists(stop):
            try:
                writer.publish("sink", "notification", {"n": done})
                done += 1
            except sqlbus.DatabaseError as exc:
                errors.append(str(exc))
            if done == 20:
                open(stop + ".started", "w").close()
    print(json.dumps({"done": done, "errors": errors}))
    """
)


def _start(script: str, db_path: Path, stop: Path, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, str(db_path), str(stop)], **kwargs)
    deadline = time.monotonic() + 60
    while not Path(str(stop) + ".started").exists():
        assert proc.poll() is None, "the helper process died"
        assert time.monotonic() < deadline, "the helper process never started"
        time.sleep(0.01)
    return proc


def _pruned_archive(db_path: Path, messages: int = 3000, pad: int = 1000) -> None:
    """A file whose archive was pruned: free pages for vacuum to give back."""
    with sqlbus.connect(db_path, archive_retention=None, dead_retention=None) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        bus.agent("sink")
        for _ in range(messages // 500):
            alice.publish_many([{"to": "bob", "type": "notification", "payload": {"p": "x" * pad}}
                                for _ in range(500)])
            bob.ack(bob.receive(limit=500))
        time.sleep(0.01)
        assert bus.prune(sent_older_than=0, dead_older_than=None).acked == messages


@pytest.mark.slow
def test_vacuum_gives_up_on_a_reader_that_pins_the_wal_and_never_locks_writers_out(db_path, tmp_path):
    _pruned_archive(db_path)
    reader = _start(_READER, db_path, tmp_path / "reader")
    writer = _start(_WRITER, db_path, tmp_path / "writer", stdout=subprocess.PIPE)
    try:
        with sqlbus.connect(db_path) as bus:
            pinned = bus.vacuum()
    finally:
        (tmp_path / "writer").touch()
        written = msgspec.json.decode(writer.communicate(timeout=60)[0])
        (tmp_path / "reader").touch()
        assert reader.wait(60) == 0
    assert written["errors"] == [] and written["done"] > 20
    assert not pinned.shrunk and "reader" in pinned.reason
    with sqlbus.connect(db_path) as bus:  # the reader is gone: now it shrinks
        result = bus.vacuum()
        assert result.shrunk and result.reason is None
        assert result.bytes_after < result.bytes_before / 2
        assert os.path.getsize(str(db_path) + "-wal") == 0
        assert len(bus.peek("sink", limit=100_000)) == written["done"]
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


def test_the_vacuum_command_exits_1_with_the_reason_when_a_reader_pins_the_wal(db_path, probe):
    _pruned_archive(db_path, messages=500)
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice").publish("bob", "notification", {})
    with probe.snapshot_held():
        with sqlbus.connect(db_path) as bus:
            bus.agent("alice").publish("bob", "notification", {})  # past the reader's snapshot
        result = CliRunner().invoke(cli, ["--db", str(db_path), "vacuum"])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("sqlbus: error: vacuum could not shrink") and "reader" in line
    result = CliRunner().invoke(cli, ["--db", str(db_path), "vacuum"])
    assert result.exit_code == 0 and result.stdout.startswith("vacuumed: ")


_VACUUM_RSS = textwrap.dedent(
    """
    import resource, sys, sqlbus
    with sqlbus.connect(sys.argv[1]) as bus:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = bus.vacuum()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before * 1024, after * 1024)
    """
)


@pytest.mark.slow
def test_vacuum_builds_its_copy_on_disk_so_memory_does_not_grow_with_the_file(db_path):
    with sqlbus.connect(db_path, archive_retention=None, dead_retention=None) as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        for _ in range(60):
            alice.publish_many([{"to": "bob", "type": "notification", "ttl": 0,
                                 "payload": {"p": os.urandom(700).hex()}} for _ in range(700)])
    size = os.path.getsize(db_path)  # closed: the WAL is folded in
    assert size > 50 * 1024 * 1024
    out = subprocess.run([sys.executable, "-c", _VACUUM_RSS, str(db_path)], check=True,
                         capture_output=True, text=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    # ru_maxrss is the peak: what vacuum added to it must stay well below the file's size
    assert after - before < size / 4, (before, after, size)


# -- WAL upkeep -----------------------------------------------------------------------------


def _wal_frames(db_path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames copied into the database), read from outside the bus."""
    conn = apsw.Connection(str(db_path))
    try:
        _busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
        return frames, done
    finally:
        conn.close()


@pytest.mark.slow
def test_a_long_but_checkpointed_wal_file_costs_the_caller_no_connection_or_checkpoint(db_path):
    wal = str(db_path) + "-wal"
    with sqlbus.connect(db_path, archive_retention=None, dead_retention=None) as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        big = "x" * 900_000
        alice.publish_many([{"to": "bob", "type": "notification", "payload": {"p": big}}
                            for _ in range(80)])  # ~72 MB of WAL in one commit
        deadline = time.monotonic() + 60
        # The checkpointer copies it back and restarts it; a commit then writes at its start
        # and journal_size_limit trims the file to WAL_LIMIT, where it stays.
        while _wal_frames(db_path)[0] > 100 or os.path.getsize(wal) > wal_limit():
            assert time.monotonic() < deadline, (_wal_frames(db_path), os.path.getsize(wal))
            alice.publish("bob", "notification", {})
            time.sleep(0.02)
        assert os.path.getsize(wal) == wal_limit()

        caller = threading.get_ident()
        seen: list[str] = []

        def trace(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
            if threading.get_ident() == caller and "wal_checkpoint" in sql.lower():
                seen.append(sql)
            return True

        def hook(conn: apsw.Connection) -> None:
            if threading.get_ident() == caller:
                seen.append("connection opened")
            conn.exec_trace = trace

        apsw.connection_hooks.append(hook)
        try:
            for _ in range(15):
                alice.publish("bob", "notification", {})
                time.sleep(wal_check_every() * 1.2)  # so every publish finds upkeep due
        finally:
            apsw.connection_hooks.remove(hook)
    assert seen == []


_LOAD = textwrap.dedent(
    """
    import os, sys, sqlbus
    path, stop, role = sys.argv[1], sys.argv[2], sys.argv[3]
    with sqlbus.connect(path, archive_retention=None, dead_retention=None) as bus:
        me = bus.agent(role)
        n = 0
        while not os.path.exists(stop):
            if role == "producer":
                me.publish_many([{"to": "consumer", "type": "notification",
                                  "payload": {"pad": "p" * 800}} for _ in range(20)])
            else:
                me.ack(me.receive(limit=50, wait=0.05))
            n += 1
            if n == 20:
                open(stop + "." + role, "w").close()
    """
)


def _wal_restarts(wal: str) -> int:
    """The WAL header's checkpoint sequence number: one more each time the WAL starts over."""
    with open(wal, "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


@pytest.mark.slow
def test_the_wal_starts_over_under_steady_load_from_several_processes(db_path, tmp_path):
    with sqlbus.connect(db_path) as bus:
        bus.agent("consumer")
    wal = str(db_path) + "-wal"
    stop = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(db_path), str(stop), role])
             for role in ("producer", "producer", "consumer", "consumer")]
    largest, restarts = 0, set()
    try:
        deadline = time.monotonic() + 60
        while not all(Path(f"{stop}.{r}").exists() for r in ("producer", "consumer")):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.01)
        # Readers overlap all the time, so the WAL is never wholly copied: only a restart
        # that waits for them keeps it from growing for as long as the load lasts.
        while len(restarts) < 3:
            assert time.monotonic() < deadline, (restarts, largest)
            largest = max(largest, os.path.getsize(wal))
            restarts.add(_wal_restarts(wal))
            time.sleep(0.01)
    finally:
        stop.touch()
        for p in procs:
            assert p.wait(60) == 0
    # A restart is tried once the WAL holds WAL_LIMIT bytes of frames; commits go on while it
    # waits, and readers that hold it up for longer than WAL_WAIT make a process wait a while
    # before trying again: the WAL may pass the limit, but not run away.
    assert largest <= 8 * wal_limit(), largest
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


# -- CLI advice -----------------------------------------------------------------------------


def _damaged(db_path: Path, where: str) -> None:
    """A sqlbus file with the b-tree page of the schema (``schema``: it cannot be opened) or
    of the message table (``messages``: it opens, its rows cannot be read) made invalid."""
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice").publish_many([{"to": "bob", "type": "notification",
                                          "payload": {"pad": "z" * 300}} for _ in range(300)])
    data = bytearray(db_path.read_bytes())
    if where == "schema":
        for offset in range(100 + 8, 100 + 24):  # the cell pointers of page 1
            data[offset] ^= 0xFF
    else:
        root = query(db_path, "SELECT rootpage FROM sqlite_schema WHERE name = 'message'")[0][0]
        size = int.from_bytes(data[16:18], "big")
        start = (root - 1) * size
        data[start] = 0x00  # no b-tree page type is 0
        data[start + 3:start + 5] = b"\xff\xff"
    db_path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["schema", "messages"])
def test_check_on_a_damaged_file_advises_restoring_a_backup_not_running_check(db_path, where):
    _damaged(db_path, where)
    result = CliRunner().invoke(cli, ["--db", str(db_path), "check"])
    assert result.exit_code == 1
    said = result.stdout + result.stderr
    assert "sqlbus check" not in said and "Traceback" not in said
    assert "backup" in said
    if where == "schema":
        (line,) = result.stderr.splitlines()
        assert line.startswith("sqlbus: error: ") and "corrupt" in line
    else:
        assert result.stdout.splitlines()[-1] == "NOT OK"
        (problem,) = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
        assert "integrity check failed" in problem and "restore a backup" in problem


def test_requeue_with_an_agent_pattern_says_the_filter_takes_an_agent_id(bus, db_path):
    bus.agent("alice").publish("bob", "notification", {})
    (d,) = bus.agent("bob").receive()
    d.dead_letter("by hand")
    for args in (["requeue", "--all", "--agent", "bob*"], ["list", "--agent", "b?b"]):
        result = CliRunner().invoke(cli, ["--db", str(db_path), "dead-letters", *args])
        assert result.exit_code == 2
        (line,) = result.stderr.splitlines()
        assert "--agent" in line and "agent id" in line and "pattern" in line
        assert "broadcast" not in line and "publish" not in line
    assert len(bus.dead_letters()) == 1
