"""Positions (SPEC 4): a message row, a state change and a dead letter each get a number that is
never given again for the life of the file, even after the newest ones were purged, requeued
or pruned; leases are fenced by (position, claim number), tail and watch resume by position."""

from __future__ import annotations

import threading
import time

import pytest

import sqlbus

pytestmark = pytest.mark.backends

DAY = 86400.0


def _position(probe, message_id: str) -> int:
    return probe.inbox_rows(message_id)[0].position


def _stale_lease(bus):
    """Worker A holds M1 past its lease; B's claim sweeps M1 to dead letters (max_attempts=1)
    and M1 is purged; M2 is published and B claims it. Returns (A's delivery, B's, M2's id)."""
    alice = bus.agent("alice")
    worker_a, worker_b = bus.agent("bob"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1}, ttl=0)
    (held,) = worker_a.receive(lease=30.0)
    bus.clock.advance(31)
    assert worker_b.receive() == []  # the lease ran out on the last attempt: dead letter
    assert [d.reason for d in bus.dead_letters()] == ["max_attempts"]
    assert bus.purge_dead_letters() == 1  # M1, the newest row, is gone
    m2 = alice.publish("bob", "notification", {"n": 2}, ttl=0)
    (current,) = worker_b.receive(lease=30.0)
    assert current.message.id == m2
    return held, current, m2


def test_a_stale_ack_after_its_message_was_purged_does_not_ack_the_next_message(make_bus):
    bus = make_bus(max_attempts=1)
    held, current, m2 = _stale_lease(bus)
    with pytest.raises(sqlbus.LeaseLostError, match="lease of attempt 1 was lost"):
        held.ack()
    assert [(e.message.id, e.status) for e in bus.peek("bob")] == [(m2, "leased")]
    current.ack()  # B's lease is intact: M2 is acked once, by B
    assert bus.metrics().messages_received == 1


def test_a_stale_ack_in_the_same_millisecond_as_the_current_one_raises_lease_lost(make_bus):
    bus = make_bus(max_attempts=1)
    held, current, _ = _stale_lease(bus)
    current.ack()
    with pytest.raises(sqlbus.LeaseLostError):  # never a bare StopIteration
        held.ack()
    assert bus.metrics().messages_received == 1


def test_a_batch_ack_with_a_stale_and_a_current_lease_of_one_message_acks_nothing(make_bus):
    bus = make_bus()
    alice, worker_a, worker_b = bus.agent("alice"), bus.agent("bob"), bus.agent("bob")
    mid = alice.publish("bob", "notification", {}, ttl=0)
    (stale,) = worker_a.receive(lease=30.0)
    bus.clock.advance(31)
    (current,) = worker_b.receive(lease=30.0)
    with pytest.raises(sqlbus.LeaseLostError, match="attempt 1 was lost"):
        worker_b.ack([current, stale])
    assert [(e.message.id, e.status, e.attempts) for e in bus.peek("bob")] == [(mid, "leased", 2)]
    current.ack()


def test_a_tail_sees_messages_published_after_the_newest_rows_were_purged(make_bus, probe):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    seen: list[str] = []
    seen_first = threading.Event()

    def follow() -> None:
        for record in bus.tail(timeout=10):
            seen.append(record.message.id)
            seen_first.set()
            if record.message.payload.get("last"):
                return

    follower = threading.Thread(target=follow)
    follower.start()
    # The tail takes its position when it starts: publish markers until it has seen one.
    for _ in range(1000):
        alice.publish("bob", "notification", {"marker": True}, ttl=0)
        if seen_first.wait(0.01):
            break
    for delivery in bob.receive(limit=1000):
        delivery.dead_letter("marker")
    bus.purge_dead_letters()  # the newest rows, where the tail stands, are gone
    assert probe.inbox_rows() == []
    last = alice.publish("bob", "notification", {"last": True}, ttl=0)
    follower.join(15)
    assert seen[-1] == last


def test_a_watch_sees_changes_after_retention_emptied_the_state_log(make_bus, clock):
    bus = make_bus(archive_retention=7 * DAY)
    bus.state.set("job/1", "queued", notify=False)
    changes = bus.state.watch("job/")
    assert next(changes).value == "queued"  # the snapshot: the watch stands at the log's head
    clock.advance(8 * DAY)
    make_bus().agent("zed")  # another process's write runs its retention pass
    assert bus.state.get("job/1").value == "queued"
    bus.state.set("job/1", "running", notify=False)
    got: list[sqlbus.StateEntry] = []
    reader = threading.Thread(target=lambda: got.append(next(changes)), daemon=True)
    reader.start()
    reader.join(10)
    assert [(e.key, e.value, e.version) for e in got] == [("job/1", "running", 2)]


def test_the_state_log_keeps_only_its_newest_entry_when_all_are_past_retention(make_bus, clock, probe):
    bus = make_bus(archive_retention=None)
    for value in range(3):
        bus.state.set("k", value, notify=False)
    clock.advance(8 * DAY)
    bus.prune(sent_older_than=7 * DAY, dead_older_than=None)
    assert [version for _, _, version in probe.state_log()] == [3]
    bus.state.set("k", 99, notify=False)
    assert [position for position, _, _ in probe.state_log()] == [3, 4]


def test_positions_continue_after_the_whole_archive_was_pruned(make_bus, clock, probe):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    ids = alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(3)])
    bob.ack(bob.receive(limit=3))
    assert [_position(probe, i) for i in ids] == [1, 2, 3]
    clock.advance(8 * DAY)
    assert bus.prune().acked == 3
    assert probe.inbox_rows() == []
    one = alice.publish("bob", "notification", {})  # one row
    many = alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(2)])
    mixed = alice.publish_many([{"to": "bob", "type": "notification", "priority": p}
                                for p in (1, 5)])  # a plain batch of two runs
    fanned = alice.publish(["bob", "carol"], "notification", {})  # two rows, one message
    assert [_position(probe, i) for i in [one, *many, *mixed]] == [4, 5, 6, 7, 8]
    assert [row.position for row in probe.inbox_rows(fanned)] == [9, 10]


def test_positions_survive_the_newest_rows_being_purged_twice_and_the_file_reopened(
    make_bus, probe
):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for expected in (1, 2, 3):
        mid = alice.publish("bob", "notification", {}, ttl=0)
        assert _position(probe, mid) == expected
        bob.receive()[0].dead_letter("gone")
        bus.purge_dead_letters()
        bus.close()
        bus = make_bus()
        alice, bob = bus.agent("alice"), bus.agent("bob")


def test_requeue_and_purge_never_give_a_dead_letter_number_or_a_position_twice(bus, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    first = alice.publish("bob", "notification", {"n": 1}, ttl=0)
    second = alice.publish("bob", "notification", {"n": 2}, ttl=0)
    for delivery in bob.receive(limit=2):
        delivery.dead_letter("poison")
    newest = bus.dead_letters()[0]
    assert (newest.id, newest.message.id) == (2, second)
    assert bus.requeue(newest.id) == second  # the newest record goes
    assert bus.dead_letter(newest.id) is None
    (again,) = bob.receive()
    assert (again.message.id, _position(probe, second)) == (second, 2)  # keeps its position
    again.dead_letter("still poison")
    assert [(d.id, d.message.id) for d in bus.dead_letters()] == [(3, second), (1, first)]
    assert bus.purge_dead_letters() == 2
    third = alice.publish("bob", "notification", {"n": 3}, ttl=0)
    assert _position(probe, third) == 3
    bob.receive()[0].dead_letter("poison")
    assert [(d.id, d.message.id) for d in bus.dead_letters()] == [(4, third)]
    with pytest.raises(KeyError):  # sqlbus.NotFoundError is a KeyError
        bus.requeue(2)


def test_a_lease_lost_before_a_requeue_stays_lost_after_it(make_bus):
    bus = make_bus(max_attempts=2)
    alice, worker_a, worker_b = bus.agent("alice"), bus.agent("bob"), bus.agent("bob")
    alice.publish("bob", "notification", {}, ttl=0)
    (stale,) = worker_a.receive(lease=30.0)
    bus.clock.advance(31)
    (second,) = worker_b.receive(lease=30.0)
    second.dead_letter("by hand")
    bus.requeue(bus.dead_letters()[0].id)  # attempts start again; claim numbers do not
    (fresh,) = worker_b.receive(lease=30.0)
    assert fresh.attempts == 1
    with pytest.raises(sqlbus.LeaseLostError):
        stale.ack()
    with pytest.raises(sqlbus.LeaseLostError):
        stale.extend()
    fresh.ack()


def test_positions_stay_unique_while_threads_publish_and_purge(make_bus, probe):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    published: list[str] = []
    stop = threading.Event()

    def purge() -> None:
        while not stop.is_set():
            for delivery in bob.receive(limit=50):
                delivery.dead_letter("churn")
            bus.purge_dead_letters()
            time.sleep(0.001)

    purger = threading.Thread(target=purge)
    purger.start()
    try:
        for _ in range(300):
            published.append(alice.publish("bob", "notification", {}, ttl=0))
    finally:
        stop.set()
        purger.join()
    for delivery in bob.receive(limit=1000):
        delivery.dead_letter("churn")
    bus.purge_dead_letters()
    assert probe.inbox_rows() == []
    # every publish took a new position, whatever the purges deleted meanwhile
    last = alice.publish("bob", "notification", {}, ttl=0)
    assert _position(probe, last) == len(published) + 1
