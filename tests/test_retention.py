"""Retention (prune, the background pass), vacuum, check and backup: they delete or copy what
they should and nothing else, and the metrics' totals survive them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import apsw
import msgspec
import pytest
from conftest import query, sqlite_only
from probes import UPKEEP_BATCH, prune_in_batches, tune_checkpointer, wal_limit

import sqlbus

pytestmark = pytest.mark.backends

DAY = 86400.0


def _totals(m: sqlbus.Metrics) -> dict:
    data = msgspec.structs.asdict(m)
    for volatile in ("queue_depths", "throughput", "oldest_ready_age_ms", "wal_bytes", "db_bytes",
                     "timestamp"):
        data.pop(volatile)
    return msgspec.json.decode(msgspec.json.encode(data))


def _populate(bus, clock):
    """Old and young acked rows, old and young dead letters, an old message never consumed,
    a retry: returns the ids that must survive a 7d/30d prune."""
    alice, bob = bus.agent("alice"), bus.agent("bob")
    keep = set()
    alice.publish("bob", "notification", {"old": "acked"})
    alice.publish("bob", "notification", {"old": "dead"})
    keep.add(alice.publish("bob", "notification", {"old": "never consumed"}, ttl=0, priority=1))
    acked, dead = bob.receive(limit=2)
    acked.ack()
    dead.dead_letter("poison")
    clock.advance(31 * DAY)
    keep.add(alice.publish("bob", "notification", {"young": "acked"}, priority=5))
    keep.add(alice.publish("bob", "notification", {"young": "dead"}, priority=5))
    keep.add(alice.publish("bob", "notification", {"young": "retry"}, priority=5))
    d1, d2, d3 = bob.receive(limit=3)
    d1.ack()
    d2.dead_letter("poison")
    d3.fail(ValueError("later"))
    return keep


def test_prune_deletes_old_acked_messages_and_old_dead_letters_and_nothing_else(make_bus, clock, probe):
    bus = make_bus(archive_retention=None, dead_retention=None)
    keep = _populate(bus, clock)
    result = bus.prune(sent_older_than=7 * DAY, dead_older_than=30 * DAY)
    assert (result.acked, result.dead_letters) == (1, 1)
    assert set(probe.message_ids()) == keep
    assert [d.reason for d in bus.dead_letters()] == ["poison"]
    assert bus.prune(7 * DAY, 30 * DAY) == sqlbus.PruneResult(acked=0, dead_letters=0)


def test_prune_with_none_keeps_that_kind(make_bus, clock):
    bus = make_bus(archive_retention=None, dead_retention=None)
    _populate(bus, clock)
    clock.advance(1)
    assert bus.prune(sent_older_than=None, dead_older_than=0) == sqlbus.PruneResult(
        acked=0, dead_letters=2)
    assert bus.prune(sent_older_than=0, dead_older_than=None) == sqlbus.PruneResult(
        acked=2, dead_letters=0)


def test_the_metrics_totals_survive_pruning(make_bus, clock):
    bus = make_bus(archive_retention=None, dead_retention=None)
    _populate(bus, clock)
    clock.advance(60 * DAY)  # first: the retry's ttl runs out, and expired counts from then
    before = _totals(bus.metrics())
    assert before["messages_sent"] == 6 and before["messages_received"] == 2
    bus.prune(0, 0)
    after = _totals(bus.metrics())
    assert after == before


def test_a_message_whose_other_recipient_is_pending_is_still_counted_once(make_bus, clock):
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    alice.publish(["bob", "carol"], "notification", {}, ttl=0)
    bob.receive()[0].ack()
    clock.advance(8 * DAY)
    assert bus.prune(7 * DAY, None).acked == 1
    assert bus.metrics().messages_sent == 1
    carol.receive()[0].ack()
    clock.advance(8 * DAY)
    assert bus.prune(7 * DAY, None).acked == 1
    m = bus.metrics()
    assert (m.messages_sent, m.messages_received) == (1, 2)
    assert m.average_delivery_ms == pytest.approx((8 * DAY * 1000) / 2)


def test_prune_reports_progress_up_to_the_total(make_bus, clock):
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(30)])
    bob.ack(bob.receive(limit=30))
    clock.advance(8 * DAY)
    seen = []
    result = prune_in_batches(bus, 7 * DAY, None, batch=7,
                              progress=lambda done, total: seen.append((done, total)))
    assert result.acked == 30
    assert seen[0] == (0, 30) and seen[-1] == (30, 30)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_write_runs_the_background_retention_pass(make_bus, clock, probe):
    bus = make_bus(archive_retention=7 * DAY, dead_retention=30 * DAY)
    keep = _populate(bus, clock)
    # A new bus (as a new process would) runs its first pass after its first write.
    other = make_bus(archive_retention=7 * DAY, dead_retention=30 * DAY)
    other.agent("zed")
    assert set(probe.message_ids()) == keep


def test_retention_none_keeps_the_archive_for_ever(make_bus, clock, probe):
    bus = make_bus(archive_retention=None, dead_retention=None)
    _populate(bus, clock)
    clock.advance(365 * DAY)
    make_bus(archive_retention=None, dead_retention=None).agent("zed")
    assert probe.inbox_count() == 6


def test_the_background_pass_deletes_a_small_batch_at_a_time(make_bus, clock, probe):
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    n = UPKEEP_BATCH + 300
    alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(n)])
    bob.ack(bob.receive(limit=n))
    clock.advance(8 * DAY)
    make_bus(archive_retention=7 * DAY).agent("zed")
    assert probe.inbox_count() == 300
    assert bus.metrics().messages_received == n


@sqlite_only("vacuum is for a SQLite file; on PostgreSQL it names VACUUM and refuses (SPEC 12)")
def test_vacuum_shrinks_the_file_after_a_prune_and_keeps_every_live_message(
    make_bus, clock, db_path, probe
):
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    blob = "x" * 2000
    alice.publish_many([{"to": "bob", "type": "notification", "payload": {"b": blob}, "ttl": 0}
                        for _ in range(1000)])
    bob.ack(bob.receive(limit=900))
    live = [e.message.id for e in bus.peek("bob", limit=1000)]
    clock.advance(8 * DAY)
    bus.prune(7 * DAY, None)
    result = bus.vacuum()
    assert result.bytes_after < result.bytes_before / 3
    assert os.path.getsize(str(db_path) + "-wal") == 0
    assert [e.message.id for e in bus.peek("bob", limit=1000)] == live
    assert len(live) == 100
    assert probe.integrity() == ["ok"]


def test_check_passes_on_a_healthy_file_and_counts_expired_leases(bus, clock, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {}, ttl=0)
    bob.receive(lease=1.0)
    clock.advance(2)
    report = bus.check()
    assert report.ok and report.problems == []
    # Each backend numbers its schema versions on its own (SQLite 5, PostgreSQL 1).
    assert report.integrity == ["ok"] and report.schema_version == probe.schema_version()
    assert report.schema_version == report.supported_schema_version
    assert report.expired_leases == 1
    assert not report.wal_pinned


@sqlite_only("a write-ahead log a reader can pin is SQLite's")
def test_check_reports_a_reader_that_pins_the_wal(bus, probe):
    alice = bus.agent("alice")
    bus.agent("bob")
    with probe.snapshot_held():
        for _ in range(20):
            alice.publish("bob", "notification", {})
        report = bus.check()
        assert report.wal_pinned and not report.ok
        assert any("WAL pinned" in p for p in report.problems)
    assert not bus.check().wal_pinned


_PUBLISHER = """
import sys, sqlbus
with sqlbus.connect(sys.argv[1]) as bus:
    me = bus.agent(sys.argv[2])
    bus.agent("sink")
    i = 0
    while True:
        me.publish("sink", "notification", {"i": i, "pad": "p" * 500})
        i += 1
"""


@pytest.mark.slow
def test_a_backup_taken_while_two_processes_publish_holds_everything_committed_before_it(tmp_path):
    db_path = tmp_path / "live.db"
    sqlbus.connect(db_path).close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writers = [
        subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(db_path), name], env=env)
        for name in ("p1", "p2")
    ]
    try:
        deadline = time.monotonic() + 30
        while query(db_path, "SELECT count(DISTINCT sender) FROM message")[0][0] < 2:
            assert time.monotonic() < deadline, "the publishers did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        before = {row[0] for row in query(db_path, "SELECT message_id FROM message")}
        with sqlbus.connect(db_path) as bus:
            result = bus.backup(tmp_path / "copy.db")
        after = query(db_path, "SELECT count(*) FROM message")[0][0]
    finally:
        for w in writers:
            w.kill()
            w.wait()
    copy = str(tmp_path / "copy.db")
    assert result.pages > 0 and os.path.getsize(copy) == result.bytes
    assert query(copy, "PRAGMA integrity_check") == [("ok",)]
    in_copy = {row[0] for row in query(copy, "SELECT message_id FROM message")}
    assert before <= in_copy
    assert after > len(before)  # the writers really were writing during the backup
    with sqlbus.connect(copy) as restored:  # a sqlbus database, usable as is
        assert restored.metrics().messages_sent == len(in_copy)


@sqlite_only("backup is for a SQLite file; on PostgreSQL it names pg_dump and refuses (SPEC 12)")
def test_a_backup_never_overwrites_an_existing_file(bus, tmp_path):
    dest = tmp_path / "exists.db"
    dest.write_bytes(b"precious")
    with pytest.raises(sqlbus.DatabaseError, match="exists"):
        bus.backup(dest)
    assert dest.read_bytes() == b"precious"


def _wal_frames(db_path) -> int:
    conn = apsw.Connection(str(db_path))
    try:
        while True:  # -1: the checkpointer thread holds the checkpoint lock; ask again
            frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][1]
            if frames >= 0:
                return frames
            time.sleep(0.005)
    finally:
        conn.close()


@sqlite_only("the checkpointer and its write-ahead log are SQLite's")
def test_the_checkpointer_restarts_a_wal_that_grew_past_the_limit(make_bus, db_path, probe, monkeypatch):
    tune_checkpointer(monkeypatch, frames=64, wal_limit=256 * 1024, backoff=0.0)
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice = bus.agent("alice")
    bus.agent("bob")
    with probe.snapshot_held():  # while a reader pins the WAL it grows; each restart gives up
        for _ in range(10):
            alice.publish_many([{"to": "bob", "type": "notification", "payload": {"p": "x" * 1000}}
                                for _ in range(50)])
        grown = _wal_frames(db_path)
        assert grown * 4096 > wal_limit()
    # The reader is gone: the checkpointer thread's next pass restarts the WAL, and a commit
    # after that writes at its start.
    deadline = time.monotonic() + 30
    while _wal_frames(db_path) >= 50:
        assert time.monotonic() < deadline
        alice.publish("bob", "notification", {})
        time.sleep(0.02)
    assert _wal_frames(db_path) < 50 < grown
    assert len(bus.peek("bob", limit=10_000)) > 500  # every message kept


def test_the_state_change_log_ages_with_the_archive_but_the_latest_values_stay(
    make_bus, clock, probe
):
    bus = make_bus(archive_retention=None, dead_retention=None)
    for value in range(5):
        bus.state.set("plan", value, notify=False)
    bus.state.set("other", "x", notify=False)
    clock.advance(8 * DAY)
    bus.state.set("plan", 99, notify=False)
    bus.prune(sent_older_than=7 * DAY, dead_older_than=None)
    logged = [version for _, _, version in probe.state_log("plan")]
    assert logged == [6]  # the five old changes are gone, the recent one stays
    assert bus.state.get("plan").value == 99 and bus.state.get("other").value == "x"
