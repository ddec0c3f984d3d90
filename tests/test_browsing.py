"""Browsing a bus without claiming (SPEC 4.2, 14): inbox pages by position with filters,
leases in flight, one message's fate in every inbox, a state key's history, dead-letter pages,
and a tail that goes on from where an earlier one stopped. Time is a fake clock."""

from __future__ import annotations

import pytest
from conftest import sqlite_only

import sqlbus
from sqlbus.sqlite.admin import PEEK_GROUPS

pytestmark = pytest.mark.backends


@pytest.fixture
def pair(bus):
    return bus.agent("alice"), bus.agent("bob")


def mixed_inbox(alice, bob, clock) -> None:
    """bob's inbox with every peek status: ready rows of every priority, two leased, one
    retrying, one scheduled and two expired."""
    for i in range(40):
        alice.publish("bob", "notification" if i % 2 else "event",
                      {"i": i, "word": "needle" if i % 9 == 0 else "hay"},
                      priority=1 + i % 5, ttl=0)
    alice.publish("bob", "request", {"short": 1}, ttl=1_000)
    alice.publish("bob", "request", {"short": 2}, ttl=1_000)
    alice.publish("bob", "notification", {"later": True}, ttl=0, delay=60)
    clock.advance(2)  # the two short ones have expired
    leased = bob.receive(limit=3, lease=30)  # the three highest-priority ready ones
    leased[0].fail(RuntimeError("try again"))  # retrying


def walk(bus, agent, size, **filters):
    ids, after, pages = [], None, 0
    while True:
        page = bus.peek_page(agent, after=after, limit=size, **filters)
        pages += 1
        ids += [e.message.id for e in page.entries]
        if page.after is None:
            return ids, pages
        after = page.after


def test_pages_walk_the_whole_inbox_in_peeks_order_missing_and_repeating_nothing(
    bus, pair, clock
):
    alice, bob = pair
    mixed_inbox(alice, bob, clock)
    full = bus.peek("bob", limit=1000)
    assert {e.status for e in full} == {"ready", "leased", "retrying", "scheduled", "expired"}
    for size in (1, 7, 50):
        ids, pages = walk(bus, "bob", size)
        assert ids == [e.message.id for e in full]
        assert pages >= len(full) // size


def test_each_filter_keeps_only_what_it_names_and_pages_through_all_of_it(bus, pair, clock):
    alice, bob = pair
    mixed_inbox(alice, bob, clock)
    full = bus.peek("bob", limit=1000)
    for filters, keep in [
        ({"status": "ready"}, lambda e: e.status == "ready"),
        ({"status": "leased"}, lambda e: e.status == "leased"),
        ({"status": "retrying"}, lambda e: e.status == "retrying"),
        ({"status": "scheduled"}, lambda e: e.status == "scheduled"),
        ({"status": "expired"}, lambda e: e.status == "expired"),
        ({"priority": 2}, lambda e: e.message.headers.priority == 2),
        ({"type": "event"}, lambda e: e.message.type == "event"),
        ({"text": "NEEDLE"}, lambda e: "needle" in str(e.message.payload)),
        ({"type": "notification", "priority": 4, "status": "ready"},
         lambda e: e.message.type == "notification" and e.message.headers.priority == 4
         and e.status == "ready"),
    ]:
        wanted = [e.message.id for e in full if keep(e)]
        assert wanted, filters
        ids, _ = walk(bus, "bob", 3, **filters)
        assert ids == wanted, filters


def test_a_rare_match_costs_a_bounded_look_and_the_page_says_where_to_go_on(bus, pair, clock):
    alice, bob = pair
    mixed_inbox(alice, bob, clock)
    page = bus.peek_page("bob", text="needle", scan=4)
    assert len(page.entries) <= 4 and page.after is not None
    ids, after = [e.message.id for e in page.entries], page.after
    while after is not None:
        page = bus.peek_page("bob", text="needle", scan=4, after=after)
        ids += [e.message.id for e in page.entries]
        after = page.after
    assert ids == [e.message.id for e in bus.peek("bob", limit=1000)
                   if "needle" in str(e.message.payload)]


@pytest.mark.parametrize("bad", [
    {"after": "x"}, {"after": "1.2"}, {"after": "3.0.0"}, {"after": 5}, {"status": "dead"},
    {"priority": 0}, {"priority": True}, {"limit": 0}, {"scan": 0}, {"type": 3},
])
def test_bad_page_arguments_raise_value_error(bus, pair, bad):
    with pytest.raises(ValueError):
        bus.peek_page("bob", **bad)


def test_leases_are_the_running_ones_soonest_to_end_first(bus, pair, clock):
    alice, bob = pair
    carol = bus.agent("carol")
    a = alice.publish("bob", "notification", {"n": 1}, ttl=0)
    b = alice.publish("carol", "notification", {"n": 2}, ttl=0)
    c = alice.publish("bob", "notification", {"n": 3}, ttl=0)
    bob.receive(lease=50)
    carol.receive(lease=10)
    clock.advance(1)
    bob.receive(lease=5)
    assert bus.leases() == sorted(bus.leases(), key=lambda lease: lease.lease_ends_at)
    assert [lease.message.id for lease in bus.leases()] == [c, b, a]
    assert [lease.message.id for lease in bus.leases(agent="bob")] == [c, a]
    assert [lease.message.id for lease in bus.leases(limit=1)] == [c]
    first = bus.leases()[0]
    assert (first.agent, first.attempts, first.message.payload) == ("bob", 1, {"n": 3})
    clock.advance(6)  # c's lease ran out: it is ready again, not in flight
    assert [lease.message.id for lease in bus.leases()] == [b, a]


def test_trace_shows_what_became_of_a_message_in_each_inbox(bus, pair, clock):
    alice, bob = pair
    carol, dave = bus.agent("carol"), bus.agent("dave")
    message_id = alice.publish(["bob", "carol", "dave"], "notification", {"x": 1}, ttl=0)
    bob.ack(bob.receive())
    (d,) = carol.receive()
    d.fail(ValueError("bad input"), retryable=False)
    trace = bus.trace(message_id)
    assert trace.message.id == message_id and trace.message.payload == {"x": 1}
    by_agent = {r.agent: r for r in trace.recipients}
    assert [r.agent for r in trace.recipients] == ["bob", "carol", "dave"]
    assert by_agent["bob"].status == "acked" and by_agent["bob"].done_at is not None
    assert by_agent["carol"].status == "dead"
    dead = by_agent["carol"].dead_letter
    assert dead is not None and dead.error_name == "ValueError" and "bad input" in dead.traceback
    assert by_agent["dave"].status == "ready" and by_agent["dave"].dead_letter is None
    (d,) = dave.receive(lease=20)
    assert bus.trace(message_id).recipients[2].status == "leased"
    assert bus.trace("msg_does_not_exist") is None
    with pytest.raises(ValueError):
        bus.trace("")


def test_a_state_keys_history_is_newest_first_deletes_included(bus):
    for value in (1, 2, 3):
        bus.state.set("config", value)
    bus.state.set("other", 9)
    bus.state.delete("config")
    history = bus.state.history("config")
    assert [(e.version, e.value, e.deleted) for e in history] == [
        (4, None, True), (3, 3, False), (2, 2, False), (1, 1, False)]
    assert [e.version for e in bus.state.history("config", limit=2)] == [4, 3]
    assert bus.state.history("never") == []
    with pytest.raises(ValueError):
        bus.state.history("config", limit=0)


def test_dead_letter_pages_go_down_by_number_with_agent_and_reason_filters(bus, pair, clock):
    alice, bob = pair
    for i in range(7):
        alice.publish("bob", "notification", {"i": i}, ttl=0 if i % 2 else 1_000)
    clock.advance(2)
    for d in bob.receive(limit=10):
        d.fail(RuntimeError("no"), retryable=False)
    bob.receive()  # the expired ones are dead-lettered at a claim
    everything = bus.dead_letters(limit=100)
    assert {d.reason for d in everything} == {"non_retryable", "expired"}
    pages, after = [], None
    while True:
        page = bus.dead_letters(limit=2, after=after)
        if not page:
            break
        pages.append(page)
        after = page[-1].id
    assert [d.id for p in pages for d in p] == [d.id for d in everything]
    failed = bus.dead_letters(reason="non_retryable")
    assert len(failed) == 3 and all(d.reason == "non_retryable" for d in failed)
    assert bus.dead_letters(agent="alice") == []
    with pytest.raises(ValueError):
        bus.dead_letters(after=-1)


def test_a_tail_goes_on_from_an_earlier_ones_position_losing_nothing(bus, pair):
    alice, _bob = pair
    first = bus.tail(timeout=1.0)
    a = alice.publish("bob", "notification", {"n": 1})
    assert [r.message.id for r in first] == [a]
    b = alice.publish("bob", "notification", {"n": 2})  # between two slices
    c = alice.publish("bob", "event", {"n": 3})
    second = bus.tail(timeout=1.0, after=first.position, types=["notification"])
    assert [r.message.id for r in second] == [b]
    third = bus.tail(timeout=1.0, after=second.position)
    assert [r.message.id for r in third] == []  # c was read (and left out) by the second
    assert third.position == second.position
    again = bus.tail(timeout=1.0, after=first.position)
    assert [r.message.id for r in again] == [b, c]
    with pytest.raises(ValueError):
        bus.tail(after=-1)


@sqlite_only("reads SQLite's query plans")
def test_every_page_query_is_a_seek_in_an_index_not_a_scan_of_the_table(bus):
    import apsw

    raw = apsw.Connection(str(bus.engine.path))
    try:
        for queries in PEEK_GROUPS:
            for sql in queries:
                plan = " ".join(str(row[-1]) for row in raw.execute(
                    "EXPLAIN QUERY PLAN " + sql, (0, "bob", 50, 3, 0, None)))
                assert "USING INDEX message_claim" in plan or "USING INDEX message_wait" in plan, (
                    sql, plan)
    finally:
        raw.close()


def test_the_async_bus_browses_as_the_sync_one(database, clock):
    import asyncio

    async def main():
        async with await database.aio_connect(clock=clock) as abus:
            alice = await abus.agent("alice")
            await alice.publish("bob", "notification", {"n": 1}, ttl=0)
            page = await abus.peek_page("bob")
            assert [e.message.payload for e in page.entries] == [{"n": 1}]
            assert await abus.leases() == []
            assert (await abus.trace(page.entries[0].message.id)).recipients[0].status == "ready"
            await abus.state.set("k", 1)
            assert [e.value for e in await abus.state.history("k")] == [1]

    asyncio.run(main())


def test_the_new_names_are_exported():
    for name in ("PeekPage", "Lease", "MessageTrace", "RecipientRecord"):
        assert name in sqlbus.__all__ and hasattr(sqlbus, name)
