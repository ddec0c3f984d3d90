"""SPEC 4: claim with leases, ack, extend, batch ack, buffered effects, ack notices, wait,
threads and fork."""

from __future__ import annotations

import os
import threading
import time

import pytest
from probes import ACKED, LEASED, SCHEDULED

import sqlbus

pytestmark = pytest.mark.backends


@pytest.fixture
def pair(bus):
    return bus.agent("alice"), bus.agent("bob")


# ---------------------------------------------------------------------------------------------
# Leases


def test_a_claimed_message_is_leased_to_one_receiver_at_a_time(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive(lease=5.0)
    assert d.attempts == 1
    assert d.lease_until == pytest.approx(clock.now + 5.0)
    assert bob.receive() == []
    clock.advance(4.999)
    assert bob.receive() == []


def test_a_lease_that_runs_out_redelivers_the_message_with_attempts_plus_one(bus, pair, clock):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {"n": 1})
    (first,) = bob.receive(lease=5.0)
    clock.advance(5.0)
    (second,) = bob.receive(lease=5.0)
    assert second.message.id == message_id
    assert (first.attempts, second.attempts) == (1, 2)
    assert second.message.headers.retry_count == 1
    assert second.message.payload == {"n": 1}


def test_a_late_ack_after_the_message_was_claimed_again_raises_and_changes_nothing(
    bus, pair, clock, probe
):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {}, requires_ack=True)
    (late,) = bob.receive(lease=1.0)
    late.reply({"from": "the late one"})
    clock.advance(2)
    (current,) = bob.receive(lease=30.0)
    before = probe.row_counts()
    with pytest.raises(sqlbus.LeaseLostError, match=message_id):
        late.ack()
    assert probe.row_counts() == before
    assert probe.message_states(message_id) == [LEASED]  # still current's
    assert alice.receive(limit=10) == []  # neither the reply nor the ack notice went out
    current.ack()
    assert probe.message_states(message_id) == [ACKED]


def test_a_lost_lease_cannot_be_failed_extended_or_dead_lettered(bus, pair, clock, probe):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (late,) = bob.receive(lease=1.0)
    clock.advance(2)
    (current,) = bob.receive(lease=30.0)
    before = probe.row_counts()
    with pytest.raises(sqlbus.LeaseLostError):
        late.extend(10.0)
    with pytest.raises(sqlbus.LeaseLostError):
        late.fail(RuntimeError("late"))
    with pytest.raises(sqlbus.LeaseLostError):
        late.dead_letter("late")
    assert probe.row_counts() == before
    current.ack()


def test_extend_keeps_the_lease_past_its_first_deadline(bus, pair, clock):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive(lease=5.0)
    clock.advance(4)
    d.extend(30.0)
    assert d.lease_until == pytest.approx(clock.now + 30.0)
    clock.advance(20)
    assert bob.receive() == []
    d.ack()


def test_extend_without_a_lease_uses_the_bus_default(make_bus, clock):
    bus = make_bus(lease=7.0)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    assert d.lease_until == pytest.approx(clock.now + 7.0)
    clock.advance(6)
    d.extend()
    assert d.lease_until == pytest.approx(clock.now + 7.0)
    with pytest.raises(ValueError):
        d.extend(-1)


def test_release_gives_the_message_back_at_once(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive(lease=60.0)
    d.release()
    (again,) = bob.receive()
    assert again.attempts == 2


def test_a_settled_delivery_cannot_be_settled_again(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.ack()
    with pytest.raises(ValueError, match="already settled"):
        d.fail(RuntimeError())
    with pytest.raises(ValueError, match="already settled"):
        d.reply({})


# ---------------------------------------------------------------------------------------------
# Batch ack


def test_batch_ack_acks_every_delivery_in_one_go(bus, pair, probe):
    alice, bob = pair
    ids = [alice.publish("bob", "notification", {"i": i}) for i in range(5)]
    bob.ack(bob.receive(limit=5))
    assert [probe.message_states(i) for i in ids] == [[ACKED]] * 5


def test_batch_ack_with_one_lost_lease_acks_nothing(bus, pair, clock, probe):
    alice, bob = pair
    short_id = alice.publish("bob", "notification", {"i": 0})
    (short,) = bob.receive(lease=1.0)
    ids = [alice.publish("bob", "notification", {"i": i}) for i in (1, 2)]
    longer = bob.receive(limit=2, lease=60.0)
    for d in longer:
        d.publish("alice", "notification", {"effect": d.message.id})
    clock.advance(2)
    (reclaimed,) = bob.receive(lease=60.0)
    assert reclaimed.message.id == short_id
    before = probe.row_counts()
    with pytest.raises(sqlbus.LeaseLostError):
        bob.ack(longer + [short])
    assert probe.row_counts() == before
    assert [probe.message_states(i) for i in ids] == [[LEASED], [LEASED]]
    assert alice.receive(limit=10) == []
    bob.ack(longer)  # the deliveries whose leases still hold can still be acked
    assert [probe.message_states(i) for i in ids] == [[ACKED], [ACKED]]
    assert len(alice.receive(limit=10)) == 2


def test_batch_ack_refuses_another_agents_delivery_with_value_error(bus, pair, probe):
    alice, bob = pair
    carol = bus.agent("carol")
    alice.publish(["bob", "carol"], "notification", {})
    (mine,) = bob.receive()
    (theirs,) = carol.receive()
    before = probe.row_counts()
    with pytest.raises(ValueError, match="bob"):
        bob.ack([mine, theirs])
    with pytest.raises(ValueError):
        bob.ack(["not a delivery"])  # type: ignore[list-item]
    assert probe.row_counts() == before


def test_batch_ack_of_an_empty_list_does_nothing(bus, pair, probe):
    _, bob = pair
    before = probe.row_counts()
    bob.ack([])
    assert probe.row_counts() == before


# ---------------------------------------------------------------------------------------------
# Buffered effects and ack notices


def test_buffered_reply_publish_and_state_commit_with_the_ack(bus, pair, probe):
    alice, bob = pair
    carol = bus.agent("carol")
    request_id = alice.publish("bob", "request", {"q": 1}, correlation_id="corr-1")
    (d,) = bob.receive()
    with d:
        reply_id = d.reply({"answer": 42})
        d.publish("carol", "notification", {"done": True})
        d.state.set("progress", {"done": 1})
        # nothing is visible before the ack
        assert alice.receive() == [] and carol.receive() == []
        assert bus.state.get("progress") is None
    (response,) = alice.receive(types=["response"])
    assert response.message.id == reply_id
    assert response.message.payload == {"success": True, "data": {"answer": 42},
                                        "request_id": request_id}
    assert response.message.headers.correlation_id == "corr-1"
    assert [m.message.payload for m in carol.receive(types=["notification"])] == [{"done": True}]
    entry = bus.state.get("progress")
    assert entry.value == {"done": 1} and entry.updated_by == "bob"
    assert probe.message_states(request_id) == [ACKED]


def test_buffered_effects_are_discarded_when_the_handler_raises(bus, pair, probe):
    alice, bob = pair
    bus.agent("carol")
    request_id = alice.publish("bob", "request", {"q": 1}, requires_ack=True)
    (d,) = bob.receive()
    with pytest.raises(RuntimeError, match="handler broke"):
        with d:
            d.reply({"answer": 42})
            d.publish("carol", "notification", {})
            d.state.set("progress", 1)
            raise RuntimeError("handler broke")
    assert alice.receive(limit=10) == []
    assert bus.agent("carol").receive(limit=10) == []
    assert bus.state.get("progress") is None
    assert [row.message_id for row in probe.inbox_rows()] == [request_id]
    assert probe.message_states(request_id) == [SCHEDULED]  # scheduled for retry


def test_a_buffered_state_write_with_a_stale_version_makes_the_whole_ack_fail(bus, pair, probe):
    alice, bob = pair
    bus.state.set("k", 1)
    message_id = alice.publish("bob", "notification", {})
    (d,) = bob.receive()
    d.state.set("k", 2, expected_version=0)
    d.reply({"x": 1})
    with pytest.raises(sqlbus.VersionConflictError):
        d.ack()
    assert probe.message_states(message_id) == [LEASED]  # still leased: the ack committed nothing
    assert bus.state.get("k").value == 1
    assert alice.receive(types=["response"]) == []


def test_requires_ack_sends_the_sender_an_acknowledgment_with_the_ack(bus, pair, clock):
    alice, bob = pair
    original = alice.publish("bob", "task_assignment", {"task": {"id": "t", "type": "x"}},
                             requires_ack=True)
    (d,) = bob.receive()
    assert alice.receive() == []
    clock.advance(1.5)
    d.ack()
    (notice,) = alice.receive()
    m = notice.message
    assert (m.type, m.sender, m.to) == ("notification", "bob", "alice")
    assert m.payload == {"acknowledgment": True, "original_message_id": original,
                         "processed_at": "2027-01-15T08:00:01.500Z"}
    assert m.headers.correlation_id == original


def test_no_acknowledgment_is_sent_when_requires_ack_is_false_or_the_message_fails(
    bus, pair
):
    alice, bob = pair
    alice.publish("bob", "notification", {})
    alice.publish("bob", "notification", {}, requires_ack=True)
    plain, asked = bob.receive(limit=2)
    plain.ack()
    asked.fail(RuntimeError("no"))
    assert alice.receive(limit=10) == []


# ---------------------------------------------------------------------------------------------
# Receive options


def test_receive_with_types_claims_only_those_types(bus, pair):
    alice, bob = pair
    alice.publish("bob", "notification", {}, priority=5)
    wanted = alice.publish("bob", "request", {})
    assert [d.message.id for d in bob.receive(limit=5, types=["request"])] == [wanted]
    with pytest.raises(sqlbus.ValidationError, match="types"):
        bob.receive(types=["telegram"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [(dict(limit=0), ValueError), (dict(wait=-1), ValueError), (dict(lease=0), ValueError),
     (dict(lease="5"), TypeError)],
)
def test_bad_receive_arguments_raise_at_once(bus, pair, kwargs, error):
    with pytest.raises(error):
        pair[1].receive(**kwargs)


def test_wait_blocks_until_a_message_from_another_thread_arrives(database, tmp_path):
    with database.connect(tmp_path / "real.db") as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        timer = threading.Timer(0.2, alice.publish, ("bob", "notification", {"late": True}))
        timer.start()
        try:
            got = bob.receive(wait=10.0)
        finally:
            timer.join()
        assert [d.message.payload for d in got] == [{"late": True}]


def test_wait_returns_an_empty_list_when_nothing_arrives(database, tmp_path):
    with database.connect(tmp_path / "real.db") as bus:
        bob = bus.agent("bob")
        started = time.monotonic()
        assert bob.receive(wait=0.2) == []
        assert time.monotonic() - started >= 0.2


def test_wait_wakes_for_a_message_published_by_another_process(database, tmp_path):
    path = tmp_path / "real.db"
    with database.connect(path) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        pid = os.fork()
        if pid == 0:  # child: its own bus on the same file
            try:
                time.sleep(0.2)
                with database.connect(path) as child_bus:
                    child_bus.agent("carol").publish("bob", "notification", {"from": "child"})
            finally:
                os._exit(0)
        try:
            got = bob.receive(wait=10.0)
        finally:
            os.waitpid(pid, 0)
        assert [d.message.sender for d in got] == ["carol"]
        assert alice.receive() == []


# ---------------------------------------------------------------------------------------------
# Threads and fork


def test_threads_sharing_one_bus_move_every_message_exactly_once(database, tmp_path):
    producers, consumers, per_producer = 3, 3, 150
    total = producers * per_producer
    with database.connect(tmp_path / "threads.db") as bus:
        bus.agent("worker")
        barrier = threading.Barrier(producers + consumers)
        received: list[str] = []
        received_lock = threading.Lock()
        errors: list[BaseException] = []
        done = threading.Event()

        def produce(n: int) -> None:
            try:
                agent = bus.agent(f"producer-{n}")
                barrier.wait()
                for i in range(per_producer):
                    agent.publish("worker", "notification", {"p": n, "i": i})
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def consume() -> None:
            try:
                agent = bus.agent("worker")
                barrier.wait()
                while not done.is_set():
                    batch = agent.receive(limit=7, wait=0.05)
                    agent.ack(batch)
                    with received_lock:
                        received.extend(f"{d.message.payload['p']}:{d.message.payload['i']}"
                                        for d in batch)
                        if len(received) >= total:
                            done.set()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(producers)]
        threads += [threading.Thread(target=consume) for _ in range(consumers)]
        for t in threads:
            t.start()
        done.wait(60)
        done.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        assert len(received) == total
        assert len(set(received)) == total


def test_a_forked_child_can_use_the_parents_bus(bus, tmp_path):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1})  # the parent's connection is open
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        status = 1
        try:
            (d,) = bob.receive()
            d.ack()
            bob.publish("alice", "notification", {"from": "child", "got": d.message.payload})
            status = 0
        finally:
            os.write(write, str(status).encode())
            os._exit(status)
    os.close(write)
    _, exit_status = os.waitpid(pid, 0)
    assert os.read(read, 10) == b"0"
    os.close(read)
    assert os.waitstatus_to_exitcode(exit_status) == 0
    (d,) = alice.receive()
    assert d.message.payload == {"from": "child", "got": {"n": 1}}
    # and the parent's own connection still works after the fork
    alice.publish("bob", "notification", {"n": 2})
    assert [m.message.payload for m in bob.receive()] == [{"n": 2}]


def test_a_delivery_listed_twice_in_a_batch_ack_is_acked_once(bus, pair, probe):
    alice, bob = pair
    message_id = alice.publish("bob", "notification", {}, requires_ack=True)
    (d,) = bob.receive()
    bob.ack([d, d])
    assert probe.message_states(message_id) == [ACKED]
    assert len(alice.receive(limit=10)) == 1  # one acknowledgment, not two


@pytest.mark.slow
def test_waiting_for_one_type_does_not_spin_while_another_type_is_ready(database, tmp_path, monkeypatch):
    claims = database.probe().count_claims(monkeypatch)
    with database.connect(tmp_path / "real.db") as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        alice.publish("bob", "notification", {}, ttl=0)  # ready, but not what bob waits for
        assert bob.receive(types=["request"], wait=0.5) == []
        assert len(claims) < 20, f"{len(claims)} claim transactions in 0.5 s: a busy loop"


def test_two_buses_on_one_file_never_lease_the_same_message_twice(make_bus, clock):
    first, second = make_bus(), make_bus()
    first.agent("alice").publish_many(
        [{"to": "bob", "type": "notification", "payload": {"i": i}} for i in range(10)])
    bob1, bob2 = first.agent("bob"), second.agent("bob")
    got1 = bob1.receive(limit=3, lease=5.0)
    got2 = bob2.receive(limit=10, lease=60.0)
    assert [d.message.payload["i"] for d in got1] == [0, 1, 2]
    assert [d.message.payload["i"] for d in got2] == list(range(3, 10))
    clock.advance(5)
    again = bob2.receive(limit=10)  # bob1's leases ran out: bob2 takes them over
    assert [d.message.payload["i"] for d in again] == [0, 1, 2]
    with pytest.raises(sqlbus.LeaseLostError):
        bob1.ack(got1)
    bob2.ack(again)


def test_a_message_from_a_writer_whose_clock_is_ahead_is_ready_at_once(database, tmp_path):
    # A reader's clock may read earlier than the writer's (a step back, skew between CPUs). A
    # queued message must not wait for the reader's clock to catch up: nothing would wake the
    # reader when it does, and it would sleep for its whole wait.
    path = tmp_path / "bus.db"
    ahead = database.connect(path, clock=lambda: time.time() + 60.0)
    reader = database.connect(path)
    try:
        bob = reader.agent("bob")
        ahead.agent("alice").publish("bob", "notification", {"n": 1})
        assert [entry.status for entry in reader.peek("bob")] == ["ready"]
        got = bob.receive(wait=0)
        assert [d.message.payload for d in got] == [{"n": 1}]
        got[0].ack()

        def publish_soon():
            time.sleep(0.2)
            ahead.agent("alice").publish("bob", "notification", {"n": 2})

        threading.Thread(target=publish_soon).start()
        waited = bob.receive(wait=30.0)  # woken by the commit; the message is ready for it
        assert [d.message.payload for d in waited] == [{"n": 2}]
    finally:
        reader.close()
        ahead.close()
