"""Group commit (issue 21): concurrent writes of one bus share a transaction, and each caller
still gets its own result or error, after its own write is committed.

Groups are made deterministic with a *holder*: a grouped write that leads a group and waits,
inside its transaction, until the writes under test have queued behind it; they then join
its transaction (writers that arrive while a group is written join it before the commit).
``bus.engine.group.commits`` counts the transactions that group commit committed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from conftest import FakeClock

import sqlbus
import sqlbus.aio
from sqlbus.engine import Tx

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def grouping_on(monkeypatch):
    """Group at every durability: the default ("auto") groups only where a commit is dear
    (durability="full", a group_commit_delay); these tests look at the group itself."""
    from sqlbus.sqlite.group import GroupCommit

    if GroupCommit.mode == "auto":
        monkeypatch.setattr(GroupCommit, "mode", "on")
PAYLOAD = {"task": "resize", "image": "s3://bucket/" + "x" * 120, "width": 640, "height": 480}


def in_one_group(bus: sqlbus.Bus, calls: list[Callable[[], Any]],
                 hold: Callable[[Tx], Any] | None = None) -> list[tuple[str, Any]]:
    """Run each of ``calls`` on a thread of its own, in that order, all inside one transaction
    that a holder write (``hold``, run first) leads; returns ("ok", result) or ("error",
    exception) per call, and the holder's as the last item."""
    group = bus.engine.group  # type: ignore[attr-defined]
    holding = threading.Event()
    everyone_queued = threading.Event()

    def holder(tx: Tx) -> None:
        holding.set()
        deadline = time.monotonic() + 30
        while len(group._queue) < len(calls):
            assert time.monotonic() < deadline, "the writes never queued"
            time.sleep(0.001)
        everyone_queued.set()
        tx.mark_quiet()
        if hold is not None:
            hold(tx)

    outcomes: list[tuple[str, Any]] = [("none", None)] * (len(calls) + 1)

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            outcomes[index] = ("ok", call())
        except BaseException as exc:  # noqa: B036 - handed to the test
            outcomes[index] = ("error", exc)

    holder_thread = threading.Thread(
        target=run, args=(len(calls), lambda: bus.engine.grouped(holder)))
    holder_thread.start()
    assert holding.wait(30)
    threads = []
    for index, call in enumerate(calls):
        thread = threading.Thread(target=run, args=(index, call))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 30
        while len(group._queue) < index + 1 and not everyone_queued.is_set():
            assert time.monotonic() < deadline and thread.is_alive(), outcomes[index]
            time.sleep(0.0005)  # queued in this order
    for thread in [*threads, holder_thread]:
        thread.join(30)
        assert not thread.is_alive()
    return outcomes


@pytest.fixture
def sqlite_bus(tmp_path: Path, clock: FakeClock) -> Any:
    bus = sqlbus.connect(tmp_path / "bus.db", clock=clock, lease=10.0)
    yield bus
    bus.close()


def inbox_ids(bus: sqlbus.Bus, agent: str) -> list[str]:
    return [entry.message.id for entry in bus.peek(agent, limit=10_000)]


# -- results and errors, one per caller ---------------------------------------------------------


def test_each_caller_of_a_group_gets_its_own_result_or_error_and_only_good_writes_commit(
    sqlite_bus: sqlbus.Bus, clock: FakeClock,
) -> None:
    bus = sqlite_bus
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    kept = alice.publish("bob", "notification", {"n": "kept"}, ttl=0)
    lost_msg = alice.publish("bob", "notification", {"n": "lost"}, ttl=0)
    (good,) = bob.receive()
    (lost,) = bob.receive(lease=1.0)
    assert (good.message.id, lost.message.id) == (kept, lost_msg)
    clock.advance(2)  # the second lease ran out and the message is claimed again
    (again,) = bob.receive()
    assert again.message.id == lost_msg
    bus.state.set("k", "v1")
    good.reply({"ok": True})  # a buffered effect, committed with the ack
    existing = alice.publish("carol", "notification", {"n": "first"}, ttl=0)

    def own_error(tx: Tx) -> None:
        tx.storage.register_agent(tx.conn, "ghost", 0)  # written, then undone with the error
        raise KeyError("mine alone")

    commits = bus.engine.group.commits  # type: ignore[attr-defined]
    outcomes = in_one_group(bus, [
        lambda: alice.publish("carol", "notification", {"n": 1}, ttl=0),
        lost.ack,
        lambda: bus.state.set("k", "v2", expected_version=7),
        lambda: bus.engine.grouped(own_error),
        good.ack,
        lambda: alice.publish("carol", "notification", {"n": "again"}, id=existing, ttl=0),
        lambda: bus.state.set("k", "v3", expected_version=1),
    ])
    assert bus.engine.group.commits == commits + 1  # type: ignore[attr-defined]
    (ok1, new_id), (err2, lease_lost), (err3, conflict), (err4, mine), *rest = outcomes
    assert (ok1, err2, err3, err4) == ("ok", "error", "error", "error")
    assert isinstance(lease_lost, sqlbus.LeaseLostError)
    assert isinstance(conflict, sqlbus.VersionConflictError)
    assert isinstance(mine, KeyError) and "mine alone" in str(mine)
    assert rest[:3] == [("ok", None), ("ok", existing), ("ok", 2)]
    assert rest[3][0] == "ok"  # the holder
    # What the good callers wrote is there; what the failed ones wrote is not.
    assert inbox_ids(bus, "carol") == [existing, new_id]
    assert inbox_ids(bus, "bob") == [lost_msg]  # acked by nobody: the new claimant holds it
    assert [d.message.type for d in alice.receive(limit=10)] == ["response"]
    assert bus.state.get("k").version == 2 and bus.state.get("k").value == "v3"
    assert "ghost" not in [a.id for a in bus.agents()]
    again.ack()  # the new claimant's lease is intact
    assert inbox_ids(bus, "bob") == []
    assert carol.id == "carol"


def test_acks_of_one_message_in_one_group_are_fenced_by_their_own_lease(
    sqlite_bus: sqlbus.Bus, clock: FakeClock,
) -> None:
    bus = sqlite_bus
    alice, bob = bus.agent("alice"), bus.agent("bob")
    message_id = alice.publish("bob", "request", {"task": "t1"}, ttl=0)
    (first,) = bob.receive()
    clock.advance(11)
    (second,) = bob.receive()
    assert second.attempts == 2
    outcomes = in_one_group(bus, [first.ack, second.ack])
    assert outcomes[0][0] == "error" and isinstance(outcomes[0][1], sqlbus.LeaseLostError)
    assert outcomes[1] == ("ok", None)
    assert inbox_ids(bus, "bob") == []
    assert [r.message.id for r in bus.sent(agent="bob")] == [message_id]


def test_a_database_error_fails_every_caller_of_the_group_and_writes_none_of_it(
    sqlite_bus: sqlbus.Bus,
) -> None:
    bus = sqlite_bus
    alice = bus.agent("alice")
    bus.agent("bob")
    before = bus.metrics().messages_sent

    def disk_full_from_now_on(tx: Tx) -> None:
        # SQLite's own SQLITE_FULL: the connection may not grow the file past its size now.
        pages = tx.conn.execute("PRAGMA page_count").fetchall()[0][0]
        tx.conn.execute(f"PRAGMA max_page_count={pages}").fetchall()

    big = {"pad": "x" * 200_000}
    outcomes = in_one_group(bus, [
        lambda: alice.publish("bob", "notification", {"n": 1}),
        lambda: alice.publish("bob", "notification", big),
        lambda: bus.state.set("k", 1),
    ], hold=disk_full_from_now_on)
    for kind, error in outcomes:  # the holder's write too
        assert kind == "error" and isinstance(error, sqlbus.DatabaseError), error
        assert "disk full" in str(error)
    assert bus.metrics().messages_sent == before
    assert bus.state.get("k") is None
    # The bus goes on (the holder's connection, with its limit, closed with its thread).
    alice.publish("bob", "notification", big)
    assert bus.metrics().messages_sent == before + 1


def test_a_lock_held_elsewhere_past_busy_timeout_fails_the_queued_callers_too(
    tmp_path: Path,
) -> None:
    bus = sqlbus.connect(tmp_path / "bus.db", busy_timeout=0.3)
    alice = bus.agent("alice")
    bus.agent("bob")
    other = apsw.Connection(str(tmp_path / "bus.db"))  # another writer, as another process
    other.execute("BEGIN IMMEDIATE")
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            alice.publish("bob", "notification", {})
        except sqlbus.DatabaseError as exc:
            errors.append(exc)

    writers = [threading.Thread(target=publish) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
    other.execute("ROLLBACK")
    assert len(errors) == 4
    assert all("locked" in str(e) and "nothing was written" in str(e) for e in errors)
    assert inbox_ids(bus, "bob") == []
    alice.publish("bob", "notification", {})  # the lock is free again
    assert len(inbox_ids(bus, "bob")) == 1
    other.close()
    bus.close()


def test_close_fails_the_queued_writers_at_once(sqlite_bus: sqlbus.Bus) -> None:
    bus = sqlite_bus
    alice = bus.agent("alice")
    bus.agent("bob")
    released = threading.Event()
    failed: list[BaseException] = []
    queued_done = threading.Event()

    inside = threading.Event()

    def wait_for_release(tx: Tx) -> None:
        inside.set()
        assert released.wait(30)

    def queued_writer() -> None:
        try:
            alice.publish("bob", "notification", {})
        except sqlbus.DatabaseError as exc:
            failed.append(exc)
        queued_done.set()

    holder = threading.Thread(target=lambda: bus.engine.grouped(wait_for_release))
    holder.start()
    group = bus.engine.group  # type: ignore[attr-defined]
    assert inside.wait(30)
    writer = threading.Thread(target=queued_writer)
    writer.start()
    while not group._queue:
        time.sleep(0.001)
    # Still inside the holder's transaction: the queued writer is told at once, by close().
    closer = threading.Thread(target=bus.close)
    closer.start()
    assert queued_done.wait(30)
    assert "closed" in str(failed[0])
    released.set()
    for thread in (holder, writer, closer):
        thread.join(30)
    with pytest.raises(sqlbus.DatabaseError, match="closed"):
        alice.publish("bob", "notification", {})


# -- order, sharing, what a caller alone sees ---------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_concurrent_publishers_share_commits_and_each_keeps_its_order(
    tmp_path: Path, delay: float,
) -> None:
    bus = sqlbus.connect(tmp_path / "bus.db", group_commit_delay=delay)
    bus.agent("sink")
    threads, per = 8, 150
    agents = [bus.agent(f"p{i}") for i in range(threads)]
    barrier = threading.Barrier(threads)
    returned: dict[str, list[str]] = {a.id: [] for a in agents}

    def publish(agent: sqlbus.Agent) -> None:
        barrier.wait()
        for n in range(per):
            returned[agent.id].append(
                agent.publish("sink", "notification", {"n": n}, ttl=0))

    group = bus.engine.group  # type: ignore[attr-defined]
    commits, writes = group.commits, group.writes
    workers = [threading.Thread(target=publish, args=(a,)) for a in agents]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert group.writes - writes == threads * per
    assert group.commits - commits < threads * per  # some transactions held several writes
    sink = bus.agent("sink")
    seen: dict[str, list[int]] = {a.id: [] for a in agents}
    order: dict[str, list[str]] = {a.id: [] for a in agents}
    while batch := sink.receive(limit=500):
        for d in batch:
            seen[d.message.sender].append(d.message.payload["n"])
            order[d.message.sender].append(d.message.id)
        sink.ack(batch)
    for agent in agents:
        assert seen[agent.id] == list(range(per))  # FIFO per publishing thread
        assert order[agent.id] == returned[agent.id]
    bus.close()


def test_a_caller_alone_writes_in_a_transaction_of_its_own(sqlite_bus: sqlbus.Bus) -> None:
    bus = sqlite_bus
    alice = bus.agent("alice")
    bus.agent("bob")
    group = bus.engine.group  # type: ignore[attr-defined]
    commits, writes = group.commits, group.writes
    for n in range(20):
        alice.publish("bob", "notification", {"n": n})
    assert (group.commits - commits, group.writes - writes) == (20, 20)


def test_an_outbox_block_stays_its_own_transaction_beside_groups(sqlite_bus: sqlbus.Bus) -> None:
    bus = sqlite_bus
    alice, bob = bus.agent("alice"), bus.agent("bob")
    stop = threading.Event()
    published: list[str] = []

    def publisher() -> None:
        while not stop.is_set():
            published.append(bob.publish("alice", "notification", {}))

    workers = [threading.Thread(target=publisher) for _ in range(3)]
    for w in workers:
        w.start()
    group = bus.engine.group  # type: ignore[attr-defined]
    while group.commits < 10:
        time.sleep(0.001)
    with alice.transaction() as tx:
        time.sleep(0.05)  # a group that committed just before the block has counted itself
        commits = group.commits
        tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)")
        tx.execute("INSERT INTO orders (id) VALUES (1)")
        outbox_id = tx.publish("bob", "notification", {"order": 1})
        with pytest.raises(RuntimeError, match="transaction"):
            alice.publish("bob", "notification", {})  # a write of its own inside the block
        time.sleep(0.05)
        assert group.commits == commits  # the block holds the write lock: no group commits
    while group.commits == commits:
        time.sleep(0.001)
    stop.set()
    for w in workers:
        w.join()
    assert outbox_id in inbox_ids(bus, "bob")
    assert len(inbox_ids(bus, "alice")) == len(published)


# -- asyncio, fork, the keyword -----------------------------------------------------------------


def test_asyncio_tasks_publishing_at_once_share_commits(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, dict[str, list[int]]]:
        async with await sqlbus.aio.connect(tmp_path / "bus.db") as bus:
            await bus.agent("sink")
            agents = [await bus.agent(f"t{i}") for i in range(8)]
            group = bus.sync.engine.group
            commits, writes = group.commits, group.writes

            async def publish(agent: Any) -> None:
                for n in range(100):
                    await agent.publish("sink", "notification", {"n": n}, ttl=0)

            await asyncio.gather(*(publish(a) for a in agents))
            commits, writes = group.commits - commits, group.writes - writes
            sink = await bus.agent("sink")
            seen: dict[str, list[int]] = {}
            while batch := await sink.receive(limit=500):
                for d in batch:
                    seen.setdefault(d.message.sender, []).append(d.message.payload["n"])
                await sink.ack(batch)
            return commits, writes, seen

    commits, writes, seen = asyncio.run(main())
    assert writes == 800 and commits < 800
    assert all(ns == list(range(100)) for ns in seen.values()) and len(seen) == 8


@pytest.mark.slow
def test_a_forked_child_writes_while_parent_threads_are_in_groups(tmp_path: Path) -> None:
    bus = sqlbus.connect(tmp_path / "bus.db")
    bus.agent("sink")
    stop = threading.Event()

    def publisher(agent: sqlbus.Agent) -> None:
        while not stop.is_set():
            agent.publish("sink", "notification", {})

    workers = [threading.Thread(target=publisher, args=(bus.agent(f"p{i}"),)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        for _ in range(3):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:  # the child: its own group, its own connection
                code = 1
                try:
                    child = bus.agent("child")
                    child.publish("sink", "notification", {"from": "child"})
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert sum(1 for e in bus.peek("sink", limit=100_000) if e.message.sender == "child") == 3
    bus.close()


def test_group_commit_delay_is_checked_and_accepted_on_both_backends(database: Any) -> None:
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True, None, 1.5):
        with pytest.raises(ValueError, match="group_commit_delay"):
            database.connect(group_commit_delay=bad)
    bus = database.connect(group_commit_delay=0.001)
    bus.agent("sink")
    agents = [bus.agent(f"p{i}") for i in range(4)]
    workers = [threading.Thread(target=lambda a=a: [a.publish("sink", "notification", {})
                                                  for _ in range(20)]) for a in agents]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(bus.peek("sink", limit=1000)) == 80
    bus.close()

    async def main() -> None:
        with pytest.raises(ValueError, match="group_commit_delay"):
            await database.aio_connect(group_commit_delay=-1)
        async with await database.aio_connect(group_commit_delay=0.0) as abus:
            await abus.agent("x")

    asyncio.run(main())


# -- SIGKILL in the middle of groups ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, threading
    import sqlbus

    bus = sqlbus.connect(sys.argv[1], durability=sys.argv[2])
    bus.agent("sink")
    agents = [bus.agent("p%d" % i) for i in range(8)]
    out = threading.Lock()
    group = bus.engine.group
    group.mode = "on"  # also at durability="normal", where "auto" would not group

    def publish(agent):
        n = 0
        while True:
            mid = agent.publish("sink", "notification", {"n": n}, ttl=0)
            with out:  # printed only once the call returned: committed, the bus said
                sys.stdout.write(mid + "\\n")
                if n % 200 == 0:
                    sys.stdout.write("groups %d %d\\n" % (group.commits, group.writes))
                sys.stdout.flush()
            n += 1

    for agent in agents:
        threading.Thread(target=publish, args=(agent,), daemon=True).start()
    threading.Event().wait()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_in_the_middle_of_groups_loses_nothing_a_caller_was_told_is_committed(
    tmp_path: Path, durability: str,
) -> None:
    db = tmp_path / "bus.db"
    told: list[str] = []
    grouped = False
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), durability],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
        )
        assert proc.stdout is not None
        target = 300 + 250 * round_
        lines = 0
        for line in proc.stdout:
            if line.startswith("groups "):
                _, commits, writes = line.split()
                grouped = grouped or int(writes) > int(commits)
            elif line.startswith("msg-"):
                told.append(line.strip())
                lines += 1
                if lines >= target:
                    break
        else:
            raise AssertionError(proc.stderr.read())  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)  # publishers are mid-call, groups mid-commit
        told.extend(line.strip() for line in proc.stdout if line.startswith("msg-"))
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
        proc.stdout.close()
    assert grouped, "the publishers never shared a transaction"
    bus = sqlbus.connect(db)
    stored = {record.message.id for record in bus.sent(agent="sink", limit=1_000_000)}
    missing = [mid for mid in told if mid not in stored]
    assert not missing, f"{len(missing)} of {len(told)} told-committed messages lost"
    assert bus.check().ok
    bus.close()


# -- the behaviour tests with grouping forced ---------------------------------------------------

BEHAVIOUR_SUBSET = [
    "tests/test_publish.py", "tests/test_receive.py", "tests/test_state.py",
    "tests/test_dead_letters.py", "tests/test_events.py", "tests/test_outbox.py",
    "tests/test_worker.py", "tests/test_aio.py",
]


@pytest.mark.slow
def test_the_behaviour_tests_pass_with_every_write_in_a_group_led_by_another_thread() -> None:
    """tests/grouping.py: SQLBUS_TEST_GROUP_COMMIT=companion makes each grouped write join a
    transaction another thread leads (run any test file so by hand)."""
    env = dict(os.environ, SQLBUS_TEST_GROUP_COMMIT="companion")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
         "-k", "sqlite or not postgres", *BEHAVIOUR_SUBSET],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_the_default_groups_where_a_commit_is_dear_and_for_asyncio_calls(tmp_path, monkeypatch):
    """mode "auto": threads at durability="normal" write alone (grouping measured slower
    there); at "full", and for an asyncio bus's calls at any durability, writes share commits."""
    from sqlbus.sqlite.group import GroupCommit

    monkeypatch.setattr(GroupCommit, "mode", "auto")

    def threads_publish(bus: sqlbus.Bus) -> None:
        agents = [bus.agent(f"p{i}") for i in range(4)]
        workers = [threading.Thread(target=lambda a=a: [a.publish("sink", "notification", {})
                                                       for _ in range(50)]) for a in agents]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    with sqlbus.connect(tmp_path / "normal.db") as bus:
        threads_publish(bus)
        assert bus.engine.group.writes == 0  # type: ignore[attr-defined]
    with sqlbus.connect(tmp_path / "full.db", durability="full") as bus:
        threads_publish(bus)
        assert bus.engine.group.writes == 200  # type: ignore[attr-defined]

    async def tasks_publish() -> int:
        async with await sqlbus.aio.connect(tmp_path / "aio.db") as abus:
            agent = await abus.agent("p")
            await asyncio.gather(*(agent.publish("sink", "notification", {}) for _ in range(50)))
            return abus.sync.engine.group.writes  # type: ignore[attr-defined]

    assert asyncio.run(tasks_publish()) == 50
