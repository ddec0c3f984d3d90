"""bus.state.watch(prefix): the snapshot when iteration starts, then every change in commit
order (deletes included), from this process and from others."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

import sqlbus

pytestmark = pytest.mark.backends

CTX = mp.get_context("fork")


def collect(iterator, count: int, out: list, timeout: float = 30.0) -> threading.Thread:
    """Consume ``count`` entries of ``iterator`` on a thread into ``out``."""

    def consume() -> None:
        for entry in iterator:
            out.append(entry)
            if len(out) == count:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread


def test_watch_yields_current_entries_by_key_then_changes_in_order_with_deletes(
    bus: sqlbus.Bus,
) -> None:
    bus.state.set("job/2", "two")
    bus.state.set("job/1", "one")
    bus.state.set("jobs", "not under the prefix")
    bus.state.set("job/3", "three")
    bus.state.delete("job/3")  # deleted before the snapshot: not in it
    seen: list[sqlbus.StateEntry] = []
    watcher = collect(bus.state.watch("job/"), 6, seen)
    while len(seen) < 2:
        watcher.join(0.01)
    bus.state.set("job/1", "uno")
    bus.state.delete("job/2")
    bus.state.set("other", 1)
    bus.state.set("job/2", "dos", notify=False)
    bus.state.update("job/1", lambda old: old + "!")
    watcher.join(30)
    assert [(e.key, e.version, e.deleted, e.value) for e in seen] == [
        ("job/1", 1, False, "one"),
        ("job/2", 1, False, "two"),
        ("job/1", 2, False, "uno"),
        ("job/2", 2, True, None),
        ("job/2", 3, False, "dos"),
        ("job/1", 3, False, "uno!"),
    ]


def test_the_snapshot_is_taken_when_iteration_starts_not_when_watch_is_called(
    bus: sqlbus.Bus,
) -> None:
    watch = bus.state.watch("k")
    bus.state.set("k", 1)
    bus.state.set("k", 2)
    first = next(watch)
    assert (first.key, first.version, first.value) == ("k", 2, 2)
    bus.state.set("k", 3)
    assert next(watch).version == 3  # nothing repeated, nothing skipped
    watch.close()


def test_an_entry_carries_who_changed_it_and_when(make_bus, clock) -> None:
    bus = make_bus()
    alice = bus.agent("alice")
    watch = bus.state.watch()
    alice.state.set("plan", {"steps": 3})
    entry = next(watch)
    assert entry.updated_by == "alice"
    assert entry.updated_at == sqlbus.messages.iso_ms(clock.ms)
    watch.close()


def write_versions(where, keywords: dict, count: int, go) -> None:
    go.wait(30)
    with sqlbus.connect(where, **keywords) as bus:
        writer = bus.agent("writer")
        for n in range(count):
            writer.state.set("job/counter", n)
        writer.state.delete("job/counter")


def test_watch_sees_every_version_written_by_another_process_in_order(database) -> None:
    count = 100
    go = CTX.Event()
    # forked before this process has threads (a fork while a thread is inside SQLite could
    # inherit a held mutex); it writes once the snapshot is taken
    child = CTX.Process(target=write_versions, args=(*database.place(), count, go), daemon=True)
    child.start()
    with database.connect() as bus:
        bus.state.set("job/", "start")
        seen: list[sqlbus.StateEntry] = []
        watch = bus.state.watch("job/")
        assert next(watch).value == "start"  # the snapshot is taken: the child writes after it
        watcher = collect(watch, count + 1, seen)
        go.set()
        child.join(60)
        watcher.join(60)
        assert child.exitcode == 0
        assert [e.version for e in seen] == list(range(1, count + 2))
        assert [e.value for e in seen[:-1]] == list(range(count))
        assert seen[-1].deleted and seen[-1].value is None
        assert {e.updated_by for e in seen} == {"writer"}


def test_a_watch_with_a_bad_prefix_or_poll_is_refused(bus: sqlbus.Bus) -> None:
    with pytest.raises(TypeError):
        bus.state.watch(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bus.state.watch("", poll=0)
