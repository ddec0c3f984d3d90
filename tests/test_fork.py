"""A forked child must not be cut off when the parent closes its bus (SQLite's lock books are
per process and a fork copies them without the locks)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

import sqlbus


def _child(path: str, started, release) -> None:
    bus = sqlbus.connect(path)
    child = bus.agent("child")
    child.publish("parent", "notification", {"step": "started"}, ttl=0)
    started.set()
    release.wait(10)
    # The parent has closed its bus by now: the child's connection must still be live.
    child.publish("parent", "notification", {"step": "after-parent-closed"}, ttl=0)
    bus.close()


def _fork_then_close_the_parent_bus(bus: sqlbus.Bus, target, args: tuple) -> None:
    """Fork a child running ``target(*args, started, release)``, close the parent's bus once
    the child is connected, check the WAL survived, then let the child finish its work."""
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    process = context.Process(target=target, args=(*args, started, release))
    process.start()
    assert started.wait(10)
    bus.close()
    # While the child is connected, the WAL must survive the parent's close.
    assert os.path.exists(bus.path + "-wal")
    release.set()
    process.join(10)
    assert process.exitcode == 0


def test_a_forked_child_keeps_working_after_the_parent_closes_its_bus(tmp_path: Path) -> None:
    path = str(tmp_path / "bus.db")
    bus = sqlbus.connect(path)
    bus.agent("parent").publish("parent", "notification", {"step": "before-fork"}, ttl=0)
    _fork_then_close_the_parent_bus(bus, _child, (path,))
    with sqlbus.connect(path) as again:
        steps = [d.message.payload["step"] for d in again.agent("parent").receive(limit=10)]
    assert steps == ["before-fork", "started", "after-parent-closed"]


def _child_using_parents_bus(bus: sqlbus.Bus, started, release) -> None:
    agent = bus.agent("child")
    started.set()
    release.wait(10)
    agent.publish("parent", "notification", {"step": "child"}, ttl=0)


def test_a_child_may_use_the_bus_it_inherited_after_the_parent_closed_its_own(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "bus.db")
    bus = sqlbus.connect(path)
    bus.agent("parent")
    _fork_then_close_the_parent_bus(bus, _child_using_parents_bus, (bus,))
    with sqlbus.connect(path) as again:
        assert [d.message.payload for d in again.agent("parent").receive()] == [{"step": "child"}]


def _my_locks_on(path: str) -> list[str]:
    """This process's POSIX locks on ``path``, as the kernel lists them."""
    inode, pid = os.stat(path).st_ino, os.getpid()
    with open("/proc/locks") as locks:
        return [line for line in locks if f":{inode} " in line and f" {pid} " in line]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_opening_a_second_bus_on_a_file_keeps_the_locks_of_the_first(tmp_path: Path) -> None:
    # Closing any descriptor of a file drops all of the process's POSIX locks on it, SQLite's
    # included (then another process, closing last, would delete the WAL under this one).
    # connect() reads the file's header only when no bus of this process has it open.
    path = str(tmp_path / "bus.db")
    first = sqlbus.connect(path)
    first.agent("parent").publish("parent", "notification", {}, ttl=0)
    held = _my_locks_on(path)
    assert held  # WAL mode: an open connection keeps a shared lock on the file
    second = sqlbus.connect(path)
    assert len(_my_locks_on(path)) == len(held)
    second.close()
    first.close()
