"""sqlbus.aio at its edges (SPEC 9): a cancelled receive counts no attempt, and awaiting
requests hold no thread, however many there are."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from probes import QUEUED

import sqlbus
import sqlbus.aio

pytestmark = pytest.mark.backends


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_cancelling_a_receive_while_its_claim_runs_counts_no_attempt(database, probe) -> None:
    async def main():
        async with await database.aio_connect(max_attempts=3) as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            message_id = await alice.publish("bob", "notification", {"n": 1})
            claimed_and_given_back = 0
            for round_ in range(20):
                waiting = asyncio.create_task(bob.receive(wait=30.0))
                await asyncio.sleep(0)  # the receive starts its claim on a thread ...
                waiting.cancel()  # ... and is cancelled while it runs
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                deadline = time.monotonic() + 10
                while True:  # the claim finishes on its thread, then gives the message back
                    (row,) = probe.inbox_rows(message_id)
                    state, claims = row.state, row.claims
                    if (state, claims) == (QUEUED, round_ + 1) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.005)
                assert (state, claims) == (QUEUED, round_ + 1)  # claimed once more, and back
                claimed_and_given_back = claims
            (d,) = await bob.receive()
            return claimed_and_given_back, d.attempts, await bus.dead_letters()

    claims, attempts, dead = run(main())
    assert claims == 20  # many more cancelled claims than max_attempts
    assert attempts == 1
    assert dead == []


def test_wait_for_timeouts_on_a_waiting_receive_never_count_an_attempt(database) -> None:
    # max_attempts=1: a single counted attempt dead-letters the message at its next claim.
    async def main():
        async with await database.aio_connect(max_attempts=1) as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            await alice.publish("bob", "notification", {})
            attempts = []
            for round_ in range(200):
                try:
                    got = await asyncio.wait_for(bob.receive(wait=5.0), (round_ % 20) / 10_000)
                except asyncio.TimeoutError:
                    continue
                for d in got:
                    attempts.append(d.attempts)
                    await d.ack()
                    await alice.publish("bob", "notification", {})
            await asyncio.sleep(0.2)  # a give-back still on its way lands
            for d in await bob.receive(limit=10, wait=1.0):
                attempts.append(d.attempts)
            return attempts, await bus.dead_letters()

    attempts, dead = run(main())
    assert dead == []
    assert attempts and set(attempts) == {1}


def _threads() -> int:
    return threading.active_count()


async def _count_threads(samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(_threads())
        await asyncio.sleep(0.01)


@pytest.mark.slow
def test_many_concurrent_requests_to_nobody_each_time_out_and_hold_no_thread(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice = await bus.agent("alice")
            await bus.agent("bob")  # registered, never answers
            await alice.publish("alice", "notification", {})  # the pool's threads exist now
            before = _threads()
            samples: list[int] = []
            stop = asyncio.Event()
            counter = asyncio.create_task(_count_threads(samples, stop))
            outcomes = await asyncio.gather(
                *(alice.request("bob", {"n": n}, timeout=0.5) for n in range(200)),
                return_exceptions=True,
            )
            stop.set()
            await counter
            return before, max(samples), outcomes

    before, most, outcomes = run(main())
    assert all(isinstance(o, sqlbus.RequestTimeoutError) for o in outcomes), {type(o) for o in outcomes}
    # At most the bus's pool (8 threads), the doorbell poller and the checkpointer: no thread
    # per waiting request (a pool of 64 request threads before).
    assert most - before <= 10, (before, most)


@pytest.mark.slow
def test_many_concurrent_requests_to_a_responder_all_get_their_answers(database) -> None:
    async def main():
        async with await database.aio_connect() as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            await bob.subscribe("request", lambda message: {"double": message.payload["n"] * 2})
            runner = asyncio.create_task(bob.run(limit=20))
            await alice.publish("bob", "notification", {})  # the loop's threads exist now
            await asyncio.sleep(0.2)
            before = _threads()
            samples: list[int] = []
            stop = asyncio.Event()
            counter = asyncio.create_task(_count_threads(samples, stop))
            try:
                answers = await asyncio.gather(
                    *(alice.request("bob", {"n": n}, timeout=60.0) for n in range(200))
                )
            finally:
                stop.set()
                await counter
                bob.stop()
                await runner
            return before, max(samples), answers

    before, most, answers = run(main())
    assert answers == [{"double": n * 2} for n in range(200)]
    assert most - before <= 10, (before, most)  # as above
