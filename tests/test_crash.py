"""Crash consistency: a process SIGKILLed in the middle of a write leaves all of it or none.

Each test starts a child Python process that prepares its work, says ``ready`` on its stdout
right before the call, and says ``done`` when the call returned. The parent kills it after a
delay drawn inside the call's measured duration (the child times the same call once on a
scratch file first), repeats a few times, and then looks at the file from outside the library.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from probes import ACKED, SQLiteProbe

import sqlbus

ROOT = Path(__file__).resolve().parent.parent
TESTS = str(Path(__file__).resolve().parent)

# Child processes SIGKILLed inside a timed call, four times each: out of make test-fast.
pytestmark = pytest.mark.slow

# Shared prelude of every child: ``timed(fn)`` runs the operation, bracketed by the signals.
PRELUDE = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, TESTS)  # the probe of tests/probes.py
    import sqlbus

    def say(word):
        sys.stdout.write(word + "\\n")
        sys.stdout.flush()

    def timed(setup, operation):
        # Calibrate on a scratch copy of the setup, then run the real one between the signals.
        scratch = setup(sys.argv[1] + ".scratch")
        t0 = time.perf_counter()
        operation(*scratch)
        say("took %.6f" % (time.perf_counter() - t0))
        real = setup(sys.argv[1])
        say("ready")
        operation(*real)
        say("done")
    """
)


def run_and_kill(code: str, db: Path, rng: random.Random, spread: tuple[float, float]) -> bool:
    """Run ``code`` in a child, SIGKILL it inside the timed call; True if the kill came before
    the call returned (the child never said ``done``)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"TESTS = {TESTS!r}\n" + PRELUDE + textwrap.dedent(code), str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
    )
    try:
        took = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("took "):
                took = float(line.split()[1])
            if line.strip() == "ready":
                break
        else:
            raise AssertionError(f"child never got ready: {proc.stderr.read()}")  # type: ignore[union-attr]
        assert took is not None
        time.sleep(took * rng.uniform(*spread))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        return "done" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_kill_during_publish_many_of_10000_messages_leaves_all_or_none(tmp_path: Path) -> None:
    code = """
        def setup(path):
            bus = sqlbus.connect(path)
            alice = bus.agent("alice")
            bus.agent("bob")
            items = [{"to": "bob", "type": "notification", "payload": {"n": i, "pad": "x" * 200}}
                     for i in range(10_000)]
            return alice, items

        timed(setup, lambda alice, items: alice.publish_many(items))
    """
    rng = random.Random(1)
    outcomes = []
    for attempt in range(4):
        db = tmp_path / f"bus{attempt}.db"
        interrupted = run_and_kill(code, db, rng, (0.2, 0.95))
        count = SQLiteProbe(db).inbox_count(agent="bob")
        outcomes.append((interrupted, count))
        assert count in (0, 10_000), f"a killed publish_many left {count} of 10,000 messages"
        with sqlbus.connect(db) as bus:  # the file opens and works after the kill
            assert len(bus.agent("bob").receive(limit=5)) == (5 if count else 0)
    assert any(interrupted for interrupted, _ in outcomes), outcomes
    print("publish_many kills (interrupted, rows):", outcomes)


def test_a_kill_during_an_ack_with_buffered_effects_leaves_all_or_none(tmp_path: Path) -> None:
    code = """
        def setup(path):
            bus = sqlbus.connect(path, lease=1.0)
            alice, bob = bus.agent("alice"), bus.agent("bob")
            bus.agent("carol")
            alice.publish_many([{"to": "bob", "type": "request", "payload": {"n": i},
                                 "requires_ack": True} for i in range(2000)])
            deliveries = bob.receive(limit=2000)
            for d in deliveries:
                n = d.message.payload["n"]
                d.reply({"n": n})
                d.publish("carol", "notification", {"n": n})
                d.state.set(f"done/{n}", n, notify=False)
            return bob, deliveries

        timed(setup, lambda bob, deliveries: bob.ack(deliveries))
    """
    rng = random.Random(2)
    outcomes = []
    for attempt in range(4):
        db = tmp_path / f"bus{attempt}.db"
        interrupted = run_and_kill(code, db, rng, (0.2, 0.95))
        probe = SQLiteProbe(db)
        acked = probe.inbox_count(agent="bob", state=ACKED)
        replies = probe.inbox_count(agent="alice", type="response")
        notices = probe.inbox_count(agent="alice", type="notification")
        to_carol = probe.inbox_count(agent="carol")
        states = probe.state_key_count("done/")
        seen = (acked, replies, notices, to_carol, states)
        outcomes.append((interrupted, acked))
        assert seen in ((0, 0, 0, 0, 0), (2000,) * 5), f"a killed ack left {seen}"
        if not acked:  # nothing was acked: the leases run out and bob gets every message again
            with sqlbus.connect(db, lease=1.0) as bus:
                time.sleep(1.1)
                again = bus.agent("bob").receive(limit=2000)
                assert len(again) == 2000 and all(d.attempts == 2 for d in again)
    assert any(interrupted for interrupted, _ in outcomes), outcomes
    print("ack kills (interrupted, acked):", outcomes)


def test_a_kill_inside_an_outbox_transaction_leaves_all_or_none(tmp_path: Path) -> None:
    code = """
        def setup(path):
            bus = sqlbus.connect(path)
            alice = bus.agent("alice")
            bus.agent("bob")
            with alice.transaction() as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
            return bus, alice

        def outbox(bus, alice):
            with alice.transaction() as tx:
                for i in range(3000):
                    tx.execute("INSERT INTO orders (id, item) VALUES (?, ?)", (i, f"item {i}"))
                    tx.publish("bob", "notification", {"order": i})
                    tx.state.set(f"order/{i}", {"placed": True}, notify=False)

        timed(setup, outbox)
    """
    rng = random.Random(3)
    outcomes = []
    for attempt in range(4):
        db = tmp_path / f"bus{attempt}.db"
        interrupted = run_and_kill(code, db, rng, (0.2, 0.95))
        probe = SQLiteProbe(db)
        orders = probe.sql("SELECT count(*) FROM orders")[0][0]  # the application's own table
        messages = probe.inbox_count(agent="bob")
        states = probe.state_key_count("order/")
        outcomes.append((interrupted, orders))
        assert (orders, messages, states) in ((0, 0, 0), (3000, 3000, 3000)), (
            f"a killed outbox left orders={orders} messages={messages} states={states}"
        )
    assert any(interrupted for interrupted, _ in outcomes), outcomes
    print("outbox kills (interrupted, rows):", outcomes)


def test_a_kill_during_a_checkpoint_loses_no_committed_message(tmp_path: Path) -> None:
    # The WAL holds ~5,000 committed messages; the child checkpoints it into the main file
    # (TRUNCATE: copy every frame, then reset the WAL) and is killed on the way.
    code = """
        from probes import checkpoint, connection

        def setup(path):
            bus = sqlbus.connect(path)
            connection(bus).execute("PRAGMA wal_autocheckpoint=0")  # all in the WAL until we ask
            alice = bus.agent("alice")
            bus.agent("bob")
            for start in range(0, 5000, 500):
                alice.publish_many([{"to": "bob", "type": "notification",
                                     "payload": {"n": n, "pad": "y" * 1000}, "ttl": 0}
                                    for n in range(start, start + 500)])
            return (bus,)

        timed(setup, lambda bus: checkpoint(bus, "TRUNCATE"))
    """
    rng = random.Random(4)
    outcomes = []
    for attempt in range(4):
        db = tmp_path / f"bus{attempt}.db"
        interrupted = run_and_kill(code, db, rng, (0.1, 0.9))
        wal = os.path.getsize(f"{db}-wal") if os.path.exists(f"{db}-wal") else 0
        outcomes.append((interrupted, wal))
        with sqlbus.connect(db) as bus:
            probe = SQLiteProbe(db)
            assert probe.integrity() == ["ok"]
            rows = probe.inbox_rows(agent="bob")
            assert sorted(json.loads(row.body)["payload"]["n"] for row in rows) == list(range(5000))
            got = bus.agent("bob").receive(limit=3)
            assert [d.message.payload["n"] for d in got] == [0, 1, 2]
    assert any(interrupted for interrupted, _ in outcomes), outcomes
    print("checkpoint kills (interrupted, wal bytes left):", outcomes)
