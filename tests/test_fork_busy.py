"""A child forked while other parent threads are inside the bus (an open outbox block, a
publish loop) can read and write at once, nobody hangs, and the parent's file stays intact."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import sqlbus

CHILD_DEADLINE = 30.0  # seconds a child may take before the test calls it hung


def _child_publishes_and_receives(bus: sqlbus.Bus, name: str) -> int:
    """In the child: publish to itself and receive it; the exit code says what happened."""
    try:
        agent = bus.agent(name)
        agent.publish(name, "notification", {"from": "child"}, ttl=0)
        got = agent.receive(limit=1)
        if not got or got[0].message.payload != {"from": "child"}:
            return 3
        got[0].ack()
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported through the exit code
        os.write(2, f"child {name}: {type(exc).__name__}: {exc}\n".encode())
        return 2


def _fork_child(bus: sqlbus.Bus, name: str) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child_publishes_and_receives(bus, name)
        finally:
            os._exit(code)
    return pid


def _wait_or_kill(pid: int) -> str:
    """'ok', 'failed' or 'hung' (then killed): never waits more than CHILD_DEADLINE."""
    deadline = time.monotonic() + CHILD_DEADLINE
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def test_a_child_forked_while_a_parent_thread_holds_a_transaction_open_can_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.db"
    bus = sqlbus.connect(path, busy_timeout=10.0)
    alice = bus.agent("alice")
    opened, release = threading.Event(), threading.Event()

    def hold_a_block() -> None:
        with alice.transaction() as tx:
            tx.publish("alice", "notification", {"n": "in the block"}, ttl=0)
            opened.set()
            release.wait(60)

    holder = threading.Thread(target=hold_a_block)
    holder.start()
    assert opened.wait(10)
    pid = _fork_child(bus, "child")  # it inherits a connection booked as holding the write lock
    release.set()
    holder.join(10)
    assert _wait_or_kill(pid) == "ok"
    assert [d.message.payload for d in alice.receive(limit=10)] == [{"n": "in the block"}]
    bus.close()
    with sqlbus.connect(path) as again:
        assert again.check().ok
        assert {record.message.sender for record in again.sent(limit=10)} == {"alice", "child"}


def test_a_child_forked_while_a_parent_thread_holds_a_transaction_open_writes_before_it_ends(
    tmp_path: Path,
) -> None:
    """The child's write must not need the parent's block to end: it is not booked as the
    child's own lock (it waits for the block like any other process, then goes on)."""
    path = tmp_path / "bus.db"
    bus = sqlbus.connect(path, busy_timeout=30.0)
    alice = bus.agent("alice")
    opened, release = threading.Event(), threading.Event()

    def hold_a_block() -> None:
        with alice.transaction() as tx:
            tx.publish("alice", "notification", {}, ttl=0)
            opened.set()
            release.wait(60)

    holder = threading.Thread(target=hold_a_block)
    holder.start()
    assert opened.wait(10)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            # A read at once, while the parent's block is open.
            bus.agents()
            os.write(write, b"r")
            code = _child_publishes_and_receives(bus, "child")
        finally:
            os._exit(code)
    os.close(write)
    assert os.read(read, 1) == b"r"  # the child could read while the block is open
    os.close(read)
    release.set()
    holder.join(10)
    assert _wait_or_kill(pid) == "ok"
    bus.close()


@pytest.mark.slow
def test_children_forked_while_a_thread_publishes_in_a_loop_all_work_and_none_hangs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.db"
    bus = sqlbus.connect(path, busy_timeout=10.0)
    publisher, sink = bus.agent("publisher"), bus.agent("sink")
    stop = threading.Event()
    published = [0]

    def publish_in_a_loop() -> None:
        while not stop.is_set():
            publisher.publish("sink", "notification", {"n": published[0]}, ttl=0)
            published[0] += 1

    def transact_in_a_loop() -> None:
        while not stop.is_set():
            with publisher.transaction() as tx:
                tx.publish("sink", "notification", {"n": "tx"}, ttl=0)

    threads = [threading.Thread(target=publish_in_a_loop),
               threading.Thread(target=transact_in_a_loop)]
    for thread in threads:
        thread.start()
    outcomes = []
    try:
        for i in range(25):
            while published[0] < (i + 1) * 3:  # forks land between and inside publishes
                time.sleep(0.001)
            outcomes.append(_wait_or_kill(_fork_child(bus, f"child-{i}")))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert outcomes == ["ok"] * 25
    # The parent's state is intact: every message it published is there, the file is sound.
    counted = len(sink.receive(limit=100_000))
    assert counted >= published[0]
    assert os.path.exists(str(path) + "-wal")
    assert bus.check().ok
    bus.close()
    with sqlbus.connect(path) as again:
        assert again.check().ok
        children = {a.id for a in again.agents()} - {"publisher", "sink"}
        assert children == {f"child-{i}" for i in range(25)}


def test_a_child_keeps_its_wal_when_the_parent_closes_first(tmp_path: Path) -> None:
    """The child's connections hold real locks of their own: the parent closing last must not
    delete the WAL under a child forked while it was busy."""
    path = tmp_path / "bus.db"
    bus = sqlbus.connect(path)
    alice = bus.agent("alice")
    opened, release = threading.Event(), threading.Event()

    def hold_a_block() -> None:
        with alice.transaction() as tx:
            tx.publish("alice", "notification", {}, ttl=0)
            opened.set()
            release.wait(60)

    holder = threading.Thread(target=hold_a_block)
    holder.start()
    assert opened.wait(10)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = bus.agent("child")  # waits for the parent's block, then writes
            child.publish("child", "notification", {"step": 1}, ttl=0)
            os.write(ready_w, b"1")
            os.read(go_r, 1)  # the parent has closed its bus by now
            child.publish("child", "notification", {"step": 2}, ttl=0)
            steps = [d.message.payload["step"] for d in child.receive(limit=10)]
            code = 0 if steps == [1, 2] else 3
        finally:
            os._exit(code)
    release.set()
    holder.join(10)
    assert os.read(ready_r, 1) == b"1"
    bus.close()
    assert os.path.exists(str(path) + "-wal")  # the child still has it open
    os.write(go_w, b"1")
    assert _wait_or_kill(pid) == "ok"
    with sqlbus.connect(path) as again:
        assert again.check().ok
        assert {r.message.sender for r in again.sent(limit=10)} == {"alice", "child"}
