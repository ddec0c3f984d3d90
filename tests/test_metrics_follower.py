"""MetricsFollower: bus.metrics() read again at the cost of what changed, returning exactly
what bus.metrics() returns at the same instant, whatever happened in between."""

from __future__ import annotations

import multiprocessing
import random
import threading

import apsw
import msgspec
import pytest
from conftest import sqlite_only

import sqlbus
from sqlbus.metrics import FollowRead, Metrics, MetricsFollower

pytestmark = pytest.mark.backends

AGENTS = ("alice", "bob", "carol", "dave")


def same(follower: MetricsFollower, bus: sqlbus.Bus) -> Metrics:
    """The follower's read and bus.metrics() at one instant (the fake clock stands still),
    equal in every figure; the file's sizes are read apart, so a checkpoint between the two
    reads may move them."""
    followed = follower.read()
    full = bus.metrics()
    followed_fields = msgspec.structs.asdict(followed)
    full_fields = msgspec.structs.asdict(full)
    for size in ("db_bytes", "wal_bytes"):
        followed_fields.pop(size), full_fields.pop(size)
    assert followed_fields == full_fields
    return followed


def random_step(rng: random.Random, bus: sqlbus.Bus, other: sqlbus.Bus, clock) -> str:
    """One random thing done to the bus (or through ``other``, a second bus on the same
    database); returns its name."""
    who = rng.choice((bus, bus, other))
    sender, to = who.agent(rng.choice(AGENTS)), rng.choice(AGENTS)
    agent = bus.agent(to)
    step = rng.choice((
        "publish", "publish", "publish_many", "fanout", "broadcast", "broadcast_nobody",
        "delayed", "ack", "ack", "ack", "fail", "fail_dead", "retry", "release", "clock",
        "clock_long", "requeue", "purge", "prune_age", "prune_max", "respond", "late", "run",
    ))
    ttl = rng.choice((0, 0, 1_000, 30_000))
    if step == "publish":
        sender.publish(to, "notification", {"n": rng.random()}, ttl=ttl)
    elif step == "publish_many":
        sender.publish_many([{"to": rng.choice(AGENTS), "type": "notification", "payload": {"i": i}}
                             for i in range(rng.randint(1, 70))])
    elif step == "fanout":
        sender.publish(rng.sample(AGENTS, rng.randint(2, 4)), "notification", {}, ttl=ttl)
    elif step == "broadcast":
        sender.broadcast("notification", {"n": 1})
    elif step == "broadcast_nobody":  # archived with no recipient: a message sent, no delivery
        sender.broadcast("notification", {"n": 2}, pattern="nobody-*")
    elif step == "delayed":
        sender.publish(to, "notification", {}, delay=rng.choice((0.5, 5.0)))
    elif step in ("ack", "fail", "fail_dead", "retry", "release"):
        for d in agent.receive(limit=rng.randint(1, 20), lease=rng.choice((1.0, 30.0))):
            if step == "ack" or rng.random() < 0.3:
                d.ack()
            elif step == "fail":
                d.fail(ValueError("bad"))
            elif step == "fail_dead":
                d.fail(KeyError("k"), retryable=False)
            elif step == "retry":
                d.retry(rng.choice((0.2, 3.0)))
            else:
                d.release()
    elif step == "clock":
        clock.advance(rng.choice((0.3, 1.1, 2.0)))
    elif step == "clock_long":  # past expiry, leases and the throughput's minute
        clock.advance(rng.choice((31.0, 61.0)))
    elif step == "requeue":
        who.requeue_dead_letters(agent=rng.choice((None, to)))
    elif step == "purge":
        who.purge_dead_letters(older_than=rng.choice((None, 1.0)))
    elif step == "prune_age":
        who.prune(sent_older_than=rng.choice((0.0, 1.0, 30.0)), dead_older_than=rng.choice((None, 0.0)))
    elif step == "prune_max":
        who.set_retention(archive_max_messages=rng.choice((5, 50, 200)))
        who.prune()
        who.set_retention(archive_max_messages=None)
    elif step == "respond":  # a request answered (a response delivered to the requester)
        sender.publish(to, "request", {"q": 1}, correlation_id=f"c{rng.random()}")
        for d in agent.receive(limit=5, types=["request"]):
            if rng.random() < 0.5:
                agent.respond(d.message, {"ok": True})
            d.ack()
    elif step == "late":  # a request that times out, answered after: a late response
        with pytest.raises(sqlbus.RequestTimeoutError):
            sender.request(to, {"q": 2}, timeout=0.01)
        for d in agent.receive(limit=5, types=["request"]):
            agent.respond(d.message, {"late": True})
            d.ack()
    elif step == "run":  # the run loop acks what it has no handler for (unhandled)
        agent.run(until_idle=True)
    return step


@pytest.mark.parametrize("seed", range(4))
def test_every_read_equals_bus_metrics_after_each_step_of_a_random_run(make_bus, clock, seed):
    bus = make_bus(max_attempts=2)
    other = make_bus(max_attempts=2)
    for name in AGENTS:
        bus.agent(name)
    rng = random.Random(seed)
    every_step, now_and_then = MetricsFollower(bus), MetricsFollower(other)
    followed = 0
    for i in range(160):
        random_step(rng, bus, other, clock)
        same(every_step, bus)
        followed += not every_step.last_read.full
        if i % 7 == 0:  # many changes between two reads
            same(now_and_then, bus)
    if bus.engine.kind == "sqlite":
        assert followed > 100
    else:  # on PostgreSQL every read is a full one, by design (positions not in commit order)
        assert followed == 0


def test_the_first_read_is_a_full_one_and_equals_bus_metrics_on_an_empty_bus(bus):
    follower = MetricsFollower(bus)
    m = same(follower, bus)
    assert follower.last_read.full
    assert (m.messages_sent, m.messages_received, m.agent_activity) == (0, 0, {})


def test_throughput_leaves_the_last_second_and_minute_as_the_clock_moves(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    follower = MetricsFollower(bus)
    same(follower, bus)
    for _ in range(3):
        alice.publish("bob", "notification", {})
    d = bob.receive(limit=3)
    d[0].ack()
    assert same(follower, bus).throughput.per_second == 1.0
    clock.advance(30)
    d[1].ack()
    d[2].ack()
    assert same(follower, bus).throughput == sqlbus.metrics.Throughput(per_second=2.0, per_minute=3.0)
    clock.advance(31)
    assert same(follower, bus).throughput.per_minute == 2.0
    clock.advance(30)
    assert same(follower, bus).throughput.per_minute == 0.0


def test_a_clock_that_goes_back_still_reads_what_bus_metrics_reads(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    follower = MetricsFollower(bus)
    alice.publish("bob", "notification", {}, ttl=0)
    clock.advance(100)
    bob.receive()[0].ack()
    same(follower, bus)
    clock.advance(-90)  # the ack is in the future now: inside the last minute again
    same(follower, bus)


def test_a_pruned_archive_moves_into_the_totals_without_a_full_read(make_bus, clock):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for _ in range(5):
        alice.publish_many([{"to": "bob", "type": "notification", "payload": {}}] * 20)
        for d in bob.receive(limit=20):
            d.ack()
    follower = MetricsFollower(bus)
    same(follower, bus)
    bus.set_retention(archive_max_messages=30)
    bus.prune()
    bus.set_retention(archive_max_messages=None)
    m = same(follower, bus)
    assert m.messages_received == 100 and m.agent_activity["alice"].sent == 100
    if bus.engine.kind == "sqlite":
        assert follower.last_read.full is False


def test_a_dead_letter_requeued_acked_and_pruned_between_two_reads_is_counted_once(make_bus, clock):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    alice.publish("bob", "notification", {})
    bob.receive()[0].ack()
    bob.receive()[0].fail(ValueError("x"))
    follower = MetricsFollower(bus)
    same(follower, bus)
    bus.requeue_dead_letters()
    bob.receive()[0].ack()
    clock.advance(2)
    bus.prune(sent_older_than=1.0)  # both acked rows: one counted acked before, one dead then
    same(follower, bus)


def test_rows_published_and_deleted_between_two_reads_are_counted(make_bus, clock):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    follower = MetricsFollower(bus)
    same(follower, bus)
    alice.publish(["bob", "alice"], "notification", {})
    for d in bob.receive():
        d.fail(ValueError("x"))
    bus.purge_dead_letters()
    same(follower, bus)
    alice.publish("bob", "notification", {})
    bob.receive()[0].ack()
    clock.advance(2)
    bus.prune(sent_older_than=1.0)
    same(follower, bus)


def test_late_responses_and_unhandled_messages_count_as_bus_metrics_counts_them(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    follower = MetricsFollower(bus)
    with pytest.raises(sqlbus.RequestTimeoutError):
        alice.request("bob", {"q": 1}, timeout=0.05)
    request = bob.receive(types=["request"])[0]
    bob.respond(request.message, {"late": True})  # alice gave up: a late response
    request.ack()
    same(follower, bus)
    bob.publish("alice", "notification", {})
    alice.run(until_idle=True)
    m = same(follower, bus)
    assert m.late_responses >= 1 and m.messages_unhandled >= 1


def _publish_in_child(where, keywords: dict) -> None:
    with sqlbus.connect(where, **keywords) as bus:
        carol = bus.agent("carol")
        carol.publish("dave", "notification", {})
        carol.publish(["dave", "erin"], "notification", {})
        for d in bus.agent("dave").receive(limit=2):
            d.ack()


def test_another_process_writing_to_the_database_is_followed(database, clock):
    with database.connect(clock=clock) as bus:
        bus.agent("dave")
        follower = MetricsFollower(bus)
        same(follower, bus)
        child = multiprocessing.get_context("spawn").Process(
            target=_publish_in_child, args=database.place()
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        m = same(follower, bus)
    assert m.messages_sent == 2 and m.messages_received == 2


def test_reads_from_many_threads_take_turns(bus):
    alice = bus.agent("alice")
    bus.agent("bob")
    follower = MetricsFollower(bus)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(20):
                follower.read()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        alice.publish("bob", "notification", {})
    for t in threads:
        t.join()
    assert errors == []
    same(follower, bus)


@sqlite_only("counts the SQLite VM steps of the follower's statements")
def test_a_read_after_the_first_reads_the_new_rows_only_not_the_archive(make_bus):
    bus = make_bus(archive_max_messages=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for _ in range(20):
        alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": i}} for i in range(500)])
        while got := bob.receive(limit=500):
            bob.ack(got)
    steps: list[int] = []

    def profile(event: dict) -> None:
        steps.append(event["stmt_status"]["SQLITE_STMTSTATUS_VM_STEP"])

    follower = MetricsFollower(bus)
    with bus.engine.reading() as conn:  # this thread's connection, which the follower reads on
        conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, profile, id="steps")
        try:
            same(follower, bus)
            steps.clear()
            follower.read()
            idle = sum(steps)
            assert follower.last_read == FollowRead(full=False, rows=0)  # nothing committed
            alice.publish_many([{"to": "bob", "type": "notification", "payload": {}} for _ in range(10)])
            for d in bob.receive(limit=5):
                d.ack()
            steps.clear()
            follower.read()
            changed = sum(steps)
            steps.clear()
            bus.metrics()
            full = sum(steps)
        finally:
            conn.trace_v2(0, None, id="steps")
    assert follower.last_read == FollowRead(full=False, rows=10)  # 10 new rows, none pending
    assert full > 10_000 * 3  # a full read steps through every archived row
    assert idle < 500 and changed < 1_000, (idle, changed, full)
