"""Resources stay flat: threads that end, run() calls that return, async outbox blocks and
close() while a thread waits leave no connection, descriptor or thread behind."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from probes import SQLiteProbe

import sqlbus
import sqlbus.aio
from sqlbus import DatabaseError

# Opened once per bus, not per thread or call: the checkpointer's connection and thread (when
# the WAL first grows long), the doorbell's descriptors and its poller thread.
ONCE_FDS = 6
ONCE_THREADS = 2


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(count: Callable[[], int], at_most: int) -> int:
    """``count()`` once it is at most ``at_most``, or its last value after ~5 s of polling
    (threads of a pool that was shut down exit a moment later)."""
    value = count()
    for _ in range(500):
        if value <= at_most:
            break
        time.sleep(0.01)
        value = count()
    return value


def test_a_thread_that_ends_leaves_no_connection_behind(tmp_path: Path, probe: SQLiteProbe) -> None:
    with sqlbus.connect(tmp_path / "bus.db") as bus:
        alice = bus.agent("alice")
        bus.agent("bob")

        def publish_once() -> None:
            alice.publish("bob", "notification", {}, ttl=0)

        for _ in range(20):  # warm up: the first threads may open what the bus keeps
            thread = threading.Thread(target=publish_once)
            thread.start()
            thread.join()
        fds, threads = _fds(), threading.active_count()
        for _ in range(400):
            thread = threading.Thread(target=publish_once)
            thread.start()
            thread.join()
        assert _settled(_fds, fds + ONCE_FDS) <= fds + ONCE_FDS
        assert _settled(threading.active_count, threads + ONCE_THREADS) <= threads + ONCE_THREADS
        assert probe.open_connections(bus) <= 2  # this thread's and the checkpointer's at most
        assert len(bus.agent("bob").receive(limit=1000)) == 420


@pytest.mark.slow
def test_threads_that_end_while_others_run_leave_nothing_behind(tmp_path: Path) -> None:
    with sqlbus.connect(tmp_path / "bus.db") as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        barrier = threading.Barrier(8)

        def publish_together() -> None:
            barrier.wait(10)
            alice.publish("bob", "notification", {}, ttl=0)

        def batch() -> None:
            threads = [threading.Thread(target=publish_together) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        batch()
        fds = _fds()
        for _ in range(50):
            batch()
        assert _settled(_fds, fds + ONCE_FDS) <= fds + ONCE_FDS


@pytest.mark.slow
def test_async_transactions_and_runs_leave_nothing_behind(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int, int]:
        bus = await sqlbus.aio.connect(tmp_path / "bus.db")
        alice = await bus.agent("alice")
        bob = await bus.agent("bob")
        handled = []
        await bob.subscribe("notification", handled.append)

        async def one_cycle(i: int) -> None:
            async with alice.transaction() as tx:
                await tx.publish("bob", "notification", {"i": i}, ttl=0)
            if i % 3 == 0:
                await bob.run(until_idle=True)

        for i in range(10):  # warm up the bus's pools
            await one_cycle(i)
        fds, threads = _fds(), threading.active_count()
        for i in range(300):
            await one_cycle(i)
        after_fds = _settled(_fds, fds + ONCE_FDS)
        after_threads = _settled(threading.active_count, threads + ONCE_THREADS)
        await bob.run(until_idle=True)
        await bus.close()
        assert len(handled) == 310
        return fds, after_fds, threads, after_threads

    fds, after_fds, threads, after_threads = asyncio.run(main())
    assert after_fds <= fds + ONCE_FDS
    assert after_threads <= threads + ONCE_THREADS


@pytest.mark.slow
def test_a_run_whose_lease_keeper_extended_leases_leaves_nothing_behind(tmp_path: Path) -> None:
    with sqlbus.connect(tmp_path / "bus.db", lease=0.06) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        extended = []

        def slow(message: sqlbus.Message) -> None:
            before = sqlbus.current_delivery().lease_until
            time.sleep(0.05)  # past half the lease: the keeper extends it from its thread
            extended.append(sqlbus.current_delivery().lease_until > before)

        bob.subscribe("notification", slow)

        def cycle() -> None:
            alice.publish("bob", "notification", {}, ttl=0)
            bob.run(until_idle=True)

        for _ in range(3):
            cycle()
        fds, threads = _fds(), threading.active_count()
        for _ in range(100):
            cycle()
        assert any(extended)
        assert _settled(_fds, fds + ONCE_FDS) <= fds + ONCE_FDS
        assert _settled(threading.active_count, threads + ONCE_THREADS) <= threads + ONCE_THREADS


def _wait_until_waiting(bus: sqlbus.Bus, probe: SQLiteProbe) -> None:
    for _ in range(1000):
        if probe.waiters(bus) or probe.async_waiters(bus):
            return
        time.sleep(0.002)
    raise AssertionError("the receive never started waiting")


@pytest.mark.slow
def test_close_wakes_a_waiting_thread_with_database_error_and_leaks_nothing(
    tmp_path: Path, probe: SQLiteProbe
) -> None:
    path = tmp_path / "bus.db"
    sqlbus.connect(path).close()
    fds, threads = _fds(), threading.active_count()
    errors: list[BaseException] = []
    for _ in range(100):
        bus = sqlbus.connect(path)
        bob = bus.agent("bob")

        def wait(bob: sqlbus.Agent = bob) -> None:
            try:
                bob.receive(wait=60)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        _wait_until_waiting(bus, probe)
        bus.close()
        waiter.join(10)
        assert not waiter.is_alive()
        with pytest.raises(DatabaseError, match="bus is closed"):
            bob.receive()
    assert _settled(_fds, fds + ONCE_FDS) <= fds + ONCE_FDS
    assert _settled(threading.active_count, threads + ONCE_THREADS) <= threads + ONCE_THREADS
    assert len(errors) == 100
    odd = [e for e in errors if type(e) is not DatabaseError or "bus is closed" not in str(e)]
    assert not odd, odd[:3]


@pytest.mark.slow
def test_closing_an_async_bus_while_a_receive_waits_raises_database_error_and_leaks_nothing(
    tmp_path: Path, probe: SQLiteProbe
) -> None:
    path = tmp_path / "bus.db"
    sqlbus.connect(path).close()

    async def main() -> tuple[int, int, list[BaseException]]:
        errors: list[BaseException] = []
        fds = _fds()
        for _ in range(100):
            bus = await sqlbus.aio.connect(path)
            bob = await bus.agent("bob")
            waiting = asyncio.ensure_future(bob.receive(wait=60))
            for _ in range(1000):
                if probe.async_waiters(bus.sync):
                    break
                await asyncio.sleep(0.002)
            await bus.close()
            try:
                await asyncio.wait_for(waiting, 10)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)
        return fds, _settled(_fds, fds + ONCE_FDS), errors

    fds, after, errors = asyncio.run(main())
    assert after <= fds + ONCE_FDS
    assert len(errors) == 100
    assert all(isinstance(e, DatabaseError) and "bus is closed" in str(e) for e in errors), (
        errors[:3]
    )
