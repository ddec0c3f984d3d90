"""Rows a reader cannot (or must not) read: a claim dead-letters them (reason ``corrupt`` or
``too_large``) instead of stranding its batch, failing the inbox or stopping a loop, and
listings show them instead of failing (SPEC 4, 4.2). The probe writes the damage into the real
database, as a disk, a crashed writer or an older version would leave it."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from probes import SQLiteProbe, tail_from_start

import sqlbus

pytestmark = pytest.mark.backends

TRAILING_NEWLINE_ID = "msg-1796000000000-abcdefghi\n"


def spliced_body(message_id: str) -> bytes:
    """The body the old plain-body path wrote for an id with a trailing newline: a raw
    newline inside a JSON string, which no JSON decoder accepts."""
    return (
        b'{"id":"' + message_id.encode() + b'","from":"alice","to":"bob","type":"notification",'
        b'"timestamp":"2026-12-01T00:00:00.000Z","payload":{},"headers":{"priority":3,'
        b'"ttl":30000,"requires_ack":false,"retry_count":0}}'
    )


def leased(bus: sqlbus.Bus, agent: str) -> int:
    return next(s.leased for s in bus.stats() if s.agent == agent)


# ---------------------------------------------------------------------------------------------
# Ids match in full (19.4)


def test_a_caller_id_with_a_trailing_newline_is_refused_and_nothing_is_written(
    bus: sqlbus.Bus, probe: SQLiteProbe
) -> None:
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match="id: expected msg-"):
        alice.publish("bob", "notification", {}, id=TRAILING_NEWLINE_ID)
    with pytest.raises(sqlbus.ValidationError, match=r"\[0\]\.id"):
        alice.publish_many([{"to": "bob", "type": "notification", "id": TRAILING_NEWLINE_ID}])
    assert probe.row_counts() == before


# ---------------------------------------------------------------------------------------------
# An undecodable row: dead-lettered by the claim, shown by listings (19.4, 12.7)


@pytest.fixture
def poisoned(bus: sqlbus.Bus, probe: SQLiteProbe) -> tuple[sqlbus.Bus, str, str]:
    """bob's inbox: a message whose body cannot be decoded, then a good one."""
    alice = bus.agent("alice")
    bus.agent("bob")
    bad = alice.publish("bob", "notification", {"n": 0})
    good = alice.publish("bob", "notification", {"n": 1})
    probe.replace_body(bad, spliced_body(bad)[:-1].replace(bad.encode(), bad.encode() + b"\n"))
    return bus, bad, good


def test_listings_show_an_undecodable_row_as_an_error_message_from_sqlbus(
    poisoned: tuple[sqlbus.Bus, str, str],
) -> None:
    bus, bad, good = poisoned
    first, second = bus.peek("bob")
    assert (first.message.type, first.message.sender, first.message.id) == ("error", "sqlbus", bad)
    assert first.message.payload["corrupt"].startswith('{"id":"' + bad + "\n")
    assert second.message.id == good
    sent = {record.message.id: record for record in bus.sent()}
    assert sent[bad].message.type == "error" and sent[bad].recipients == ["bob"]
    tailed = tail_from_start(bus, until=good)
    assert [r.message.type for r in tailed] == ["error", "notification"]


def test_a_claim_dead_letters_an_undecodable_row_and_delivers_the_rest_of_its_batch(
    poisoned: tuple[sqlbus.Bus, str, str],
) -> None:
    bus, bad, good = poisoned
    bob = bus.agent("bob")
    [d] = bob.receive(limit=10)
    assert d.message.id == good
    d.ack()
    [dead] = bus.dead_letters()
    assert dead.reason == "corrupt" and dead.attempts == 0
    assert dead.error_name == "DecodeError"
    assert (dead.message.type, dead.message.id) == ("error", bad)
    assert bus.dead_letter(bad) == dead
    assert bob.receive() == []
    assert leased(bus, "bob") == 0  # nothing stranded under a lease


def test_a_run_loop_goes_past_an_undecodable_row(poisoned: tuple[sqlbus.Bus, str, str]) -> None:
    bus, bad, good = poisoned
    bob = bus.agent("bob")
    handled = []
    bob.subscribe("notification", lambda message: handled.append(message.id))
    assert bob.run(until_idle=True) == 1
    assert handled == [good]
    assert [d.reason for d in bus.dead_letters()] == ["corrupt"]


def test_a_body_nested_too_deep_to_decode_is_dead_lettered_without_stranding_the_batch(
    bus: sqlbus.Bus, probe: SQLiteProbe
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    ids = [alice.publish("bob", "notification", {"n": n}) for n in range(3)]
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    body = spliced_body(ids[1]).replace(b'"payload":{}', b'"payload":' + deep)
    probe.replace_body(ids[1], body)
    got = bob.receive(limit=3)
    assert [d.message.id for d in got] == [ids[0], ids[2]]
    assert [d.reason for d in bus.dead_letters()] == ["corrupt"]
    assert leased(bus, "bob") == 2


def test_a_listing_shows_at_most_1000_escaped_characters_of_a_garbage_body(
    bus: sqlbus.Bus, probe: SQLiteProbe
) -> None:
    alice = bus.agent("alice")
    bus.agent("bob")
    mid = alice.publish("bob", "notification", {})
    probe.replace_body(mid, b"\xff\xfe garbage " * 1000)
    [entry] = bus.peek("bob")
    text = entry.message.payload["corrupt"]
    assert len(text) == 1000 and text.startswith("\\xff\\xfe garbage")
    text.encode()  # escaped: storable and printable anywhere


# ---------------------------------------------------------------------------------------------
# A message above the receiver's max_payload_bytes (19.5)


@pytest.fixture
def oversized(make_bus: Callable[..., sqlbus.Bus]) -> tuple[sqlbus.Bus, sqlbus.Bus, str, str]:
    """A sender at a 4 MiB limit sends bob 600 KB and then a small message; bob's bus reads
    at most 100 KB."""
    sender = make_bus(max_payload_bytes=4 * 1024 * 1024)
    receiver = make_bus(max_payload_bytes=100_000)
    alice = sender.agent("alice")
    receiver.agent("bob")
    big = alice.publish("bob", "notification", {"blob": "x" * 600_000})
    small = alice.publish("bob", "notification", {"n": 1})
    return sender, receiver, big, small


def test_a_claim_dead_letters_a_message_above_its_limit_unread(
    oversized: tuple[sqlbus.Bus, sqlbus.Bus, str, str],
) -> None:
    sender, receiver, big, small = oversized
    bob = receiver.agent("bob")
    tracemalloc.start()
    try:
        got = bob.receive(limit=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.message.id for d in got] == [small]
    assert peak < 300_000, peak  # the 600 KB body was never fetched
    [dead] = receiver.dead_letters()
    assert dead.reason == "too_large" and dead.attempts == 0
    assert "600" in dead.error_message and "max_payload_bytes=100000" in dead.error_message
    assert (dead.message.id, dead.message.payload) == (big, {})
    assert sender.dead_letter(big).message.payload == {"blob": "x" * 600_000}


def test_listings_of_a_reader_with_a_smaller_limit_leave_the_payload_out(
    oversized: tuple[sqlbus.Bus, sqlbus.Bus, str, str],
) -> None:
    sender, receiver, big, small = oversized
    assert [e.message.payload for e in receiver.peek("bob")] == [{}, {"n": 1}]
    assert {r.message.id: r.message.payload for r in receiver.sent()}[big] == {}
    assert sender.peek("bob")[0].message.payload == {"blob": "x" * 600_000}


def _peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_listings_never_fetch_a_body_above_the_readers_limit(
    oversized: tuple[sqlbus.Bus, sqlbus.Bus, str, str],
) -> None:
    sender, receiver, big, small = oversized
    listings = {
        "peek": lambda: receiver.peek("bob"),
        "sent": lambda: receiver.sent(),
        "tail": lambda: tail_from_start(receiver, until=big),
    }
    for name, listing in listings.items():
        assert _peak_bytes(listing) < 300_000, name  # the 600 KB body stayed on disk
    [entry, _] = receiver.peek("bob")
    assert (entry.message.id, entry.message.sender, entry.message.type) == (
        big, "alice", "notification")
    assert entry.payload_bytes > 600_000
    record = {r.message.id: r for r in receiver.sent()}[big]
    assert record.payload_bytes == entry.payload_bytes and record.recipients == ["bob"]
    [tailed] = [r for r in tail_from_start(receiver, until=big)
                if r.message.id == big]
    assert tailed.message.payload == {} and tailed.payload_bytes == entry.payload_bytes
    bob = receiver.agent("bob")
    bob.receive(limit=10)  # dead-letters the big one unread
    assert _peak_bytes(lambda: receiver.dead_letters()) < 300_000
    assert receiver.dead_letters()[0].payload_bytes == entry.payload_bytes


def test_a_run_loop_goes_past_a_message_above_its_limit(
    oversized: tuple[sqlbus.Bus, sqlbus.Bus, str, str],
) -> None:
    sender, receiver, big, small = oversized
    bob = receiver.agent("bob")
    handled = []
    bob.subscribe("notification", lambda message: handled.append(message.id))
    assert bob.run(until_idle=True) == 1
    assert handled == [small]
    assert [d.reason for d in receiver.dead_letters()] == ["too_large"]


def test_a_message_at_the_receivers_own_limit_is_delivered(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_payload_bytes=100_000)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    payload = {"blob": "x" * (100_000 - len('{"blob":""}'))}
    alice.publish(["bob", "carol"], "notification", payload, correlation_id="c" * 1000)
    [d] = bob.receive()
    assert d.message.payload == payload
