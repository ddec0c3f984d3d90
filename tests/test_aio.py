"""sqlbus.aio: the asyncio API over real files (publish, receive, ack, state, watch, run,
request, transactions), including a wait that must not block the event loop and a message
from another process waking an async receiver."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sqlite_only
from probes import set_fallback_poll

import sqlbus
import sqlbus.aio

pytestmark = pytest.mark.backends


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_publish_receive_and_ack_are_coroutines(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            mid = await alice.publish("bob", "notification", {"n": 1}, priority=5)
            ids = await alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": 2}}])
            got = await bob.receive(limit=10)
            assert [d.message.id for d in got] == [mid, *ids]
            assert got[0].attempts == 1
            await got[0].ack()
            await bob.ack(got[1:])
            assert await bob.receive() == []
            stats = await bus.metrics()
            return stats.messages_received

    assert run(main()) == 2


def test_async_with_a_delivery_acks_on_success_and_fails_on_error(database) -> None:
    async def main():
        async with await database.aio_connect(backoff_base=0.0) as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            await alice.publish("bob", "request", {"q": 1})
            [d] = await bob.receive()
            async with d:
                d.reply({"a": 1})  # buffered: committed with the ack
            [response] = await alice.receive()
            assert response.message.payload["data"] == {"a": 1}
            await response.ack()
            await alice.publish("bob", "notification", {"boom": True})
            [d] = await bob.receive()
            with pytest.raises(RuntimeError):
                async with d:
                    raise RuntimeError("boom")
            [again] = await bob.receive(wait=5.0)  # retried (backoff 0)
            assert again.attempts == 2 and again.message.payload == {"boom": True}
            await again.ack()

    run(main())


def test_a_waiting_receive_does_not_block_the_event_loop(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            ticks = 0
            done = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            async def publish_later():
                while ticks < 10:  # the loop kept running while bob waited
                    await asyncio.sleep(0.01)
                await alice.publish("bob", "notification", {"late": True})

            task = asyncio.create_task(ticker())
            publisher = asyncio.create_task(publish_later())
            got = await bob.receive(wait=30.0)
            done.set()
            await task
            await publisher
            assert [d.message.payload for d in got] == [{"late": True}]
            assert ticks >= 10

    run(main())


PUBLISH_WHEN_WAITING = """
import sys, time
sys.path.insert(0, sys.argv[2])
import sqlbus
from probes import doorbells
db = sys.argv[1]
end = time.monotonic() + 20
while time.monotonic() < end and not doorbells(db):
    time.sleep(0.005)
time.sleep(0.05)
with sqlbus.connect(db) as bus:
    bus.agent("alice").publish("bob", "notification", {"from": "child"})
"""


@sqlite_only("wakes through the doorbell of another process; LISTEN/NOTIFY has tests of its own")
def test_an_async_receiver_wakes_for_a_message_from_another_process(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_fallback_poll(120.0, monkeypatch)  # only the doorbell can wake it in time

    async def main():
        async with await sqlbus.aio.connect(db_path) as bus:
            bob = await bus.agent("bob")
            # a fresh interpreter, not a fork: this process has threads (the bus's pool)
            child = subprocess.Popen([sys.executable, "-c", PUBLISH_WHEN_WAITING, str(db_path),
                                      str(Path(__file__).parent)])
            got = await bob.receive(wait=60.0)
            assert child.wait(30) == 0
            return [d.message.payload for d in got]

    assert run(main()) == [{"from": "child"}]


def test_a_cancelled_receive_loses_no_message(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            waiting = asyncio.create_task(bob.receive(wait=30.0))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await alice.publish("bob", "notification", {"n": 1})
            got = await bob.receive(wait=5.0)
            assert [d.message.payload for d in got] == [{"n": 1}]

    run(main())


def test_state_calls_are_coroutines_and_update_takes_async_functions(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice = await bus.agent("alice")
            assert await bus.state.set("plan", {"v": 1}) == 1
            assert await alice.state.set("plan", {"v": 2}, expected_version=1) == 2
            with pytest.raises(sqlbus.VersionConflictError):
                await bus.state.set("plan", {"v": 3}, expected_version=1)

            async def bump(old):
                await asyncio.sleep(0)
                return (old or 0) + 1

            await bus.state.update("count", bump)
            await bus.state.update("count", lambda old: old + 10)
            entry = await bus.state.get("count")
            assert (entry.value, entry.version) == (11, 2)
            assert await bus.state.keys() == ["count", "plan"]
            assert (await alice.state.get("plan")).updated_by == "alice"
            assert await bus.state.delete("plan") == 3
            assert await bus.state.get("plan") is None

    run(main())


def test_async_watch_yields_the_snapshot_then_every_change_in_order(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            await bus.state.set("job/b", "b1")
            await bus.state.set("job/a", "a1")
            await bus.state.set("other", 0)
            seen = []

            async def consume():
                async for entry in bus.state.watch("job/"):
                    seen.append((entry.key, entry.version, entry.deleted, entry.value))
                    if len(seen) == 5:
                        return

            task = asyncio.create_task(consume())
            while len(seen) < 2:
                await asyncio.sleep(0.01)
            await bus.state.set("job/a", "a2")
            await bus.state.set("other", 1)
            await bus.state.delete("job/b")
            await bus.state.set("job/c", "c1", notify=False)
            await asyncio.wait_for(task, 30)
            return seen

    assert run(main()) == [
        ("job/a", 1, False, "a1"),
        ("job/b", 1, False, "b1"),
        ("job/a", 2, False, "a2"),
        ("job/b", 2, True, None),
        ("job/c", 1, False, "c1"),
    ]


def test_run_dispatches_to_plain_and_async_handlers_and_answers_requests(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            notes = []

            def on_note(message):
                notes.append(message.payload["n"])

            async def on_request(message):
                await asyncio.sleep(0)
                assert sqlbus.current_delivery().message.id == message.id
                return {"double": message.payload["x"] * 2}

            await bob.subscribe("notification", on_note)
            await bob.subscribe("request", on_request)
            runner = asyncio.create_task(bob.run())
            await alice.publish("bob", "notification", {"n": 1})
            answer = await alice.request("bob", {"x": 21}, timeout=30.0)
            while not notes:
                await asyncio.sleep(0.01)
            bob.stop()
            processed = await asyncio.wait_for(runner, 30)
            return answer, notes, processed

    answer, notes, processed = run(main())
    assert answer == {"double": 42}
    assert notes == [1]
    assert processed == 2


def test_an_async_handler_error_becomes_a_remote_error(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")

            async def fail(message):
                raise ValueError("no such thing")

            await bob.subscribe("request", fail)
            runner = asyncio.create_task(bob.run())
            try:
                with pytest.raises(sqlbus.RemoteError, match="no such thing"):
                    await alice.request("bob", {}, timeout=30.0)
            finally:
                runner.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await runner

    run(main())


def test_async_event_handlers_receive_other_agents_events(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            seen = []

            async def on_build(event):
                seen.append((event.name, event.data, event.emitted_by))

            await bob.events.on("build.done", on_build)
            await alice.events.emit("build.done", {"sha": "abc"})
            await bob.run(until_idle=True)
            return seen

    assert run(main()) == [("build.done", {"sha": "abc"}, "alice")]


def test_an_async_transaction_commits_all_or_nothing(database, own_sql) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            async with alice.transaction() as tx:
                await tx.execute(own_sql("CREATE TABLE IF NOT EXISTS {db}.app (x INTEGER)"))
                await tx.execute(own_sql("INSERT INTO {db}.app VALUES (1)"))
                await tx.publish("bob", "notification", {"n": 1})
                await tx.state.set("k", 1)
            with pytest.raises(KeyError):
                async with alice.transaction() as tx:
                    await tx.publish("bob", "notification", {"n": 2})
                    raise KeyError("abort")
            got = await bob.receive(limit=10, types=["notification"])
            return [d.message.payload for d in got], (await bus.state.get("k")).value

    payloads, value = run(main())
    assert payloads == [{"n": 1}]
    assert value == 1


def test_concurrent_requests_to_a_concurrent_async_handler_each_get_their_own_answer(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            running = []

            async def on_request(message):
                running.append(1)
                peak = len(running)
                await asyncio.sleep(0.01)
                running.pop()
                return {"n": message.payload["n"], "peak": peak}

            await bob.subscribe("request", on_request)
            runner = asyncio.create_task(bob.run(concurrency=8))
            answers = await asyncio.gather(
                *(alice.request("bob", {"n": n}, timeout=60.0) for n in range(60)))
            bob.stop()
            await asyncio.wait_for(runner, 30)
            return answers

    answers = run(main())
    assert [a["n"] for a in answers] == list(range(60))
    assert max(a["peak"] for a in answers) > 1  # handlers overlapped


def test_an_async_request_takes_a_response_published_to_its_inbox(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            asking = asyncio.create_task(alice.request("bob", {"q": 1}, timeout=60.0))
            while not (deliveries := await bob.receive(wait=5.0)):
                pass
            (d,) = deliveries
            # a plain publish, not a direct reply: the response waits in alice's inbox
            await bob.publish("alice", "response", {"success": True, "data": "plain",
                                                   "request_id": d.message.id},
                              correlation_id=d.message.headers.correlation_id)
            await d.ack()
            answer = await asyncio.wait_for(asking, 30)
            return answer, await alice.receive()

    answer, left = run(main())
    assert answer == "plain"
    assert left == []  # taken by the request, not left for a receiver
