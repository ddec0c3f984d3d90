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

import sqlbus
from sqlbus import metrics as ops
from sqlbus.cli import cli

from conftest import query

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
