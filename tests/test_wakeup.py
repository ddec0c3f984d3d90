"""Wake-ups across processes and threads (sqlbus.wakeup): doorbells, the fallback poll,
file permissions, stale doorbells, targeted rings. No test asserts a duration: a wait that
should be woken is given a long timeout (and, where the doorbell itself is under test, a
fallback poll longer than that timeout), so a missing wake-up shows as a missing message."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import probes
import pytest
from probes import doorbells

import sqlbus

CTX = mp.get_context("fork")


def wait_for_doorbell(db_path: Path, *, other_than: set[Path] = frozenset(), limit: float = 20.0) -> Path:
    """Until some process bound a doorbell (it then waits, or is about to check and wait)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        fresh = [p for p in doorbells(db_path) if p not in other_than]
        if fresh:
            return fresh[0]
        time.sleep(0.005)
    raise AssertionError("no doorbell appeared")


def generation(db_path: Path) -> int:
    """The shared counter that waiters bump after binding (or renaming) their doorbell."""
    path = probes.doorbell_dir(db_path) / probes.GENERATION
    data = path.read_bytes() if path.exists() else b""
    return int.from_bytes(data[:8], "little") if len(data) >= 8 else 0


def wait_for_announced_doorbell(db_path: Path, limit: float = 20.0) -> Path:
    """Until a doorbell exists and its owner bumped the generation (ringers will see it)."""
    wait_for_doorbell(db_path, limit=limit)
    end = time.monotonic() + limit
    while generation(db_path) < 1 and time.monotonic() < end:
        time.sleep(0.005)
    return wait_for_doorbell(db_path, limit=limit)  # its final name


def publish_when_waiting(db_path: str, delete_doorbell: bool) -> None:
    """Child: once the parent's doorbell exists, (delete it and) publish to bob."""
    path = wait_for_doorbell(Path(db_path))
    if delete_doorbell:
        path.unlink()
    time.sleep(0.05)  # let the parent settle into its wait
    with sqlbus.connect(db_path) as bus:
        bus.agent("alice").publish("bob", "notification", {"n": 1})


def run_child(target, *args) -> mp.Process:
    process = CTX.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def test_a_waiting_receiver_wakes_for_a_message_published_by_another_process(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the fallback poll longer than the wait, only the doorbell can deliver in time.
    probes.set_fallback_poll(120.0, monkeypatch)
    with sqlbus.connect(db_path) as bus:
        bob = bus.agent("bob")
        child = run_child(publish_when_waiting, str(db_path), False)
        got = bob.receive(wait=60.0)
        child.join(10)
        assert [d.message.payload for d in got] == [{"n": 1}]
        assert child.exitcode == 0


@pytest.mark.slow
def test_a_waiting_receiver_still_gets_the_message_when_its_doorbell_was_deleted(
    db_path: Path,
) -> None:
    with sqlbus.connect(db_path) as bus:
        bob = bus.agent("bob")
        child = run_child(publish_when_waiting, str(db_path), True)
        got = bob.receive(wait=30.0)  # the fallback poll (every FALLBACK s) finds it
        child.join(10)
        assert [d.message.payload for d in got] == [{"n": 1}]
        assert child.exitcode == 0


@pytest.mark.slow
def test_a_deleted_doorbell_is_made_again_by_the_next_wait(db_path: Path) -> None:
    with sqlbus.connect(db_path) as bus:
        bob = bus.agent("bob")
        assert bob.receive(wait=0.01) == []
        first = Path(probes.doorbell_path(bus))
        first.unlink()
        assert bob.receive(wait=2.5 * probes.fallback_poll()) == []
        second = probes.doorbell_path(bus)
        assert second is not None and second != str(first) and os.path.exists(second)


def test_doorbell_files_are_private_and_removed_on_close(db_path: Path) -> None:
    bus = sqlbus.connect(db_path)
    assert bus.agent("bob").receive(wait=0.01) == []
    path = Path(probes.doorbell_path(bus))
    directory = path.parent
    assert directory == Path(str(db_path) + ".doorbells")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "generation").stat().st_mode) == 0o600
    assert path.name.startswith(f"{os.getpid()}-") and "bob" not in path.name
    bus.close()
    assert not path.exists()
    assert doorbells(db_path) == []


def sleep_in_receive(db_path: str) -> None:
    with sqlbus.connect(db_path) as bus:
        bus.agent("carol").receive(wait=60.0)


def test_a_doorbell_left_by_a_killed_process_is_removed_by_the_next_ring(db_path: Path) -> None:
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        bus.agent("carol")
        child = run_child(sleep_in_receive, str(db_path))
        stale = wait_for_announced_doorbell(db_path)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert stale.exists()  # SIGKILL: nobody cleaned up
        alice.publish("carol", "notification", {})  # the ring finds nobody bound: removes it
        assert not stale.exists()


def test_a_receiver_wakes_for_a_message_published_by_another_thread(
    bus: sqlbus.Bus, probe: probes.SQLiteProbe
) -> None:
    bob, alice = bus.agent("bob"), bus.agent("alice")
    got: list[sqlbus.Delivery] = []
    waiter = threading.Thread(target=lambda: got.extend(bob.receive(wait=30.0)))
    waiter.start()
    while probe.waiters(bus) == 0:
        time.sleep(0.001)
    alice.publish("bob", "notification", {"n": 2})
    waiter.join(30)
    assert [d.message.payload for d in got] == [{"n": 2}]


def test_several_threads_waiting_for_one_agent_each_get_a_message(
    bus: sqlbus.Bus, probe: probes.SQLiteProbe
) -> None:
    bob, alice = bus.agent("bob"), bus.agent("alice")
    got: list[sqlbus.Delivery] = []
    lock = threading.Lock()

    def receive() -> None:
        for d in bob.receive(wait=30.0):
            with lock:
                got.append(d)

    threads = [threading.Thread(target=receive) for _ in range(3)]
    for t in threads:
        t.start()
    while probe.waiters(bus) < 3:
        time.sleep(0.001)
    for n in range(3):
        alice.publish("bob", "notification", {"n": n})
    for t in threads:
        t.join(30)
    assert sorted(d.message.payload["n"] for d in got) == [0, 1, 2]


def test_messages_to_other_agents_do_not_wake_a_waiting_receiver(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes.set_fallback_poll(120.0, monkeypatch)  # only rings can wake the waiter
    with sqlbus.connect(db_path) as bus:
        bob, alice = bus.agent("bob"), bus.agent("alice")
        bus.agent("carol")
        # receive(wait=...) looks with a read before it claims, and claims after a ring for bob
        looks = probes.SQLiteProbe.count_looks(bob)
        got: list[sqlbus.Delivery] = []
        waiter = threading.Thread(target=lambda: got.extend(bob.receive(wait=60.0)))
        waiter.start()
        while not probes.leading(bus):  # past its first look and check: polling the doorbell
            time.sleep(0.001)
        # fewer rings than a doorbell holds (a full one counts as "anything may have changed")
        for n in range(min(5, probes.OVERFLOW - 1)):
            alice.publish("carol", "notification", {"n": n})
        assert len(looks) == 1  # bob never looked again: those rings were for carol
        alice.publish("bob", "notification", {"n": "bob"})
        waiter.join(30)
        assert [d.message.payload for d in got] == [{"n": "bob"}]
        assert len(looks) == 2


def test_a_waiting_receiver_wakes_when_a_delayed_message_comes_due(bus: sqlbus.Bus) -> None:
    real = sqlbus.connect(bus.path)  # real clock: the delay passes in real time
    try:
        bob = real.agent("bob")
        real.agent("alice").publish("bob", "notification", {"late": True}, delay=0.2)
        got = bob.receive(wait=30.0)
        assert [d.message.payload for d in got] == [{"late": True}]
    finally:
        real.close()


def test_a_burst_that_overflows_a_doorbell_still_wakes_the_receiver_it_was_for(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes.set_fallback_poll(120.0, monkeypatch)  # only rings can wake the waiter
    with sqlbus.connect(db_path) as bus:
        bob, alice = bus.agent("bob"), bus.agent("alice")
        bus.agent("carol")
        got: list[sqlbus.Delivery] = []
        waiter = threading.Thread(target=lambda: got.extend(bob.receive(wait=60.0)))
        waiter.start()
        while not probes.leading(bus):
            time.sleep(0.001)
        with alice.transaction() as tx:  # rings pile up faster than they are read
            for _ in range(3 * probes.OVERFLOW):
                probes.ring(bus, ["carol"])  # fill bob's process's doorbell
            tx.publish("bob", "notification", {"n": "bob"})  # its own ring may be refused
        waiter.join(30)
        assert [d.message.payload for d in got] == [{"n": "bob"}]


def test_closing_the_bus_wakes_its_waiters(db_path: Path, probe: probes.SQLiteProbe) -> None:
    bus = sqlbus.connect(db_path)
    bob = bus.agent("bob")
    outcome: list[object] = []

    def receive() -> None:
        try:
            outcome.append(bob.receive(wait=60.0))
        except sqlbus.DatabaseError as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=receive)
    waiter.start()
    while probe.waiters(bus) == 0:
        time.sleep(0.001)
    bus.close()
    waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert doorbells(db_path) == []


def test_ringing_with_nobody_waiting_lists_no_doorbells_and_sends_nothing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes.set_refresh_every(600.0, monkeypatch)
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {})  # sets up and lists the (empty) directory
        calls: list[str] = []
        real_listdir = os.listdir
        monkeypatch.setattr(os, "listdir", lambda *a: calls.append("listdir") or real_listdir(*a))
        with probes.sends(bus, monkeypatch) as sent:
            for _ in range(5):
                alice.publish("bob", "notification", {})
            assert calls == [] and sent == [] and probes.peers(bus) == []


def test_a_new_waiter_makes_ringers_list_the_doorbells_again(db_path: Path) -> None:
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {})
        assert probes.peers(bus) == []
        child = run_child(sleep_in_receive, str(db_path))
        try:
            path = wait_for_announced_doorbell(db_path)
            alice.publish("bob", "notification", {})
            assert probes.peers(bus) == [path.name]
        finally:
            child.kill()
            child.join(10)


def test_a_process_is_rung_only_for_the_agents_its_doorbell_asks_for(db_path: Path) -> None:
    import socket

    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        alice.publish("nobody", "notification", {})  # makes the doorbell directory
        directory = probes.doorbell_dir(db_path)
        # another process's doorbell, waiting for carol only (its name says so, as a hash)
        carol = probes.agent_tag("carol")
        name = probes.doorbell_name(f"{os.getpid()}-feedbeef", False, ["carol"])
        assert "carol" not in name and carol.hex() in name
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        peer.setblocking(False)
        old = os.getcwd()
        os.chdir(directory)  # bind by a short relative name (AF_UNIX paths are short)
        try:
            peer.bind(name)
        finally:
            os.chdir(old)
        probes.bump_generation(bus)
        try:
            alice.publish("bob", "notification", {})
            with pytest.raises(BlockingIOError):
                peer.recv(64)  # not rung: the commit was for bob
            alice.publish(["bob", "carol"], "notification", {})
            data = peer.recv(64)
            assert carol in {data[i : i + 4] for i in range(0, len(data), 4)}
            with alice.transaction() as tx:  # marks nobody: "anything may have changed"
                tx.execute("CREATE TABLE app (x INTEGER)")
            assert peer.recv(64) == b""
        finally:
            peer.close()


def wait_once_then_hold(db_path: str, ready: Any, go: Any, result: Any) -> None:
    """Child: wait once for carol (its doorbell stays), then stay busy (not waiting) until
    told; report how many rings reached the doorbell meanwhile, then receive with a wait."""
    with sqlbus.connect(db_path) as bus:
        carol = bus.agent("carol")
        assert carol.receive(wait=0.01) == []
        ready.set()
        go.wait(20)
        result.put(probes.drain(bus))
        result.put(len(carol.receive(limit=10, wait=20.0)))


def test_a_process_that_is_not_waiting_now_is_not_rung_and_loses_nothing(
    db_path: Path,
) -> None:
    ready, go, result = CTX.Event(), CTX.Event(), CTX.Queue()
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        bus.agent("carol")
        child = run_child(wait_once_then_hold, str(db_path), ready, go, result)
        try:
            assert ready.wait(20)
            path = wait_for_doorbell(db_path)
            flag = path.parent / (path.name.split(".")[0] + probes.WAKE)
            assert flag.read_bytes() == b"\x00"  # down: the child is busy
            assert stat.S_IMODE(flag.stat().st_mode) == 0o600
            for _ in range(5):
                alice.publish("carol", "notification", {})
            assert probes.peers(bus) == [path.name]  # listed, not rung
            go.set()
            assert result.get(timeout=20) == 0  # no ring queued for it
            assert result.get(timeout=20) == 5  # its next wait looks first: all five are there
        finally:
            child.join(20)
            if child.is_alive():
                child.kill()
    assert child.exitcode == 0
    assert not flag.exists()  # removed with the doorbell when the child closed


def wait_for_carol(db_path: str, result: Any) -> None:
    probes.set_fallback_poll(600.0)  # no fallback poll within the wait: only a ring ends it
    with sqlbus.connect(db_path) as bus:
        result.put(len(bus.agent("carol").receive(wait=20.0)))


def test_a_waiting_process_raises_its_flag_and_is_rung(db_path: Path) -> None:
    result = CTX.Queue()
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        bus.agent("carol")
        child = run_child(wait_for_carol, str(db_path), result)
        try:
            path = wait_for_announced_doorbell(db_path)
            flag = path.parent / (path.name.split(".")[0] + probes.WAKE)
            end = time.monotonic() + 20
            while flag.read_bytes() != b"\x01" and time.monotonic() < end:
                time.sleep(0.005)
            assert flag.read_bytes() == b"\x01"
            alice.publish("carol", "notification", {})
            assert result.get(timeout=30) == 1  # the ring woke it (its wait had no poll left)
        finally:
            child.join(20)
            if child.is_alive():
                child.kill()


def test_commits_that_grow_the_wal_are_checkpointed_by_a_thread_of_their_own(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = probes.record_wal_folds(monkeypatch)
    probes.tune_checkpointer(monkeypatch, frames=500)
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {})
        assert calls == []  # a short WAL: no checkpoint at all
        big = {"text": "x" * 1500}  # each message fills most of a 2 KiB page
        for _ in range(4):
            alice.publish_many([{"to": "bob", "type": "notification", "payload": big}] * 400)
        end = time.monotonic() + 20
        while not calls and time.monotonic() < end:
            time.sleep(0.01)
        assert calls and set(calls) == {"sqlbus-checkpoint"}  # never on the committing thread
        # The thread copies the WAL back and makes it start over: the next commit then
        # writes at the start of the WAL (waited for, not timed: the machine may be loaded).
        while True:
            alice.publish("bob", "notification", {})
            busy, frames, done = probes.checkpoint(bus, "PASSIVE")
            if (busy == 0 and frames < 50) or time.monotonic() > end:  # busy: it is copying
                break
            time.sleep(0.05)
        assert busy == 0 and done == frames < 50  # copied back, and the WAL started over
        assert set(calls) == {"sqlbus-checkpoint"}


@pytest.mark.slow
def test_a_reader_that_pins_the_wal_does_not_make_the_checkpointer_hold_writers_back(
    db_path: Path, probe: probes.SQLiteProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes.tune_checkpointer(monkeypatch, frames=200)
    modes = probes.record_checkpoint_modes(monkeypatch)
    with sqlbus.connect(db_path) as bus:
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {})
        with probe.snapshot_held():
            big = {"text": "x" * 1500}
            for _ in range(20):
                alice.publish_many([{"to": "bob", "type": "notification", "payload": big}] * 50)
                time.sleep(0.02)  # let the checkpointer run between the batches
    assert modes.count("PASSIVE") >= 3  # it kept copying what it could
    assert modes.count("RESTART") == 0  # but never waited on the reader, holding writers


def test_a_forked_child_waits_on_a_doorbell_of_its_own_and_leaves_the_parents_alone(
    db_path: Path,
) -> None:
    with sqlbus.connect(db_path) as bus:
        bob = bus.agent("bob")
        bus.agent("carol")
        assert bob.receive(wait=0.01) == []
        parents = Path(probes.doorbell_path(bus))
        pid = os.fork()
        if pid == 0:  # the child: the same Bus object, used after the fork
            code = 1
            try:
                got = bus.agent("carol").receive(wait=30.0)
                mine = probes.doorbell_path(bus)
                code = 0 if got and mine and Path(mine) != parents and parents.exists() else 2
            finally:
                os._exit(code)
        while len(doorbells(db_path)) < 2:  # the child's doorbell is there: it is waiting
            time.sleep(0.005)
        bob.publish("carol", "notification", {"to": "child"})
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parents.exists()  # the child's exit did not remove the parent's doorbell
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {})
        assert len(bob.receive(wait=10.0)) == 1
