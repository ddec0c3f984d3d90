"""SPEC 7: events: emit/on/off, wildcard, targets, never delivered to the emitter."""

from __future__ import annotations

import pytest
from probes import ACKED

import sqlbus

pytestmark = pytest.mark.backends


@pytest.fixture
def team(bus):
    return bus.agent("alice"), bus.agent("bob"), bus.agent("carol")


def test_an_emitted_event_reaches_the_handlers_of_its_name_in_every_other_agent(team):
    alice, bob, carol = team
    got = []
    bob.events.on("build.done", lambda e: got.append(("bob", e.name, e.data)))
    carol.events.on("build.done", lambda e: got.append(("carol", e.name, e.data)))
    carol.events.on("build.failed", lambda e: got.append(("carol", "wrong handler", e.data)))

    alice.events.emit("build.done", {"sha": "abc"})
    bob.run(until_idle=True)
    carol.run(until_idle=True)

    assert got == [("bob", "build.done", {"sha": "abc"}), ("carol", "build.done", {"sha": "abc"})]


def test_an_event_is_a_message_of_type_event_with_the_spec_payload(team, bus):
    alice, bob, carol = team
    bob.events.on("deploy")
    carol.subscribe("event")
    message_id = alice.events.emit("deploy", {"env": "prod"}, correlation_id="c-9")

    [record] = bus.sent(limit=1)
    assert record.message.id == message_id
    assert record.message.type == "event"
    assert record.message.headers.correlation_id == "c-9"
    assert sorted(record.recipients) == ["bob", "carol"]
    assert record.message.payload == {
        "name": "deploy",
        "data": {"env": "prod"},
        "emitted_at": "2027-01-15T08:00:00.000Z",  # the fake clock's start
        "emitted_by": "alice",
        "correlation_id": "c-9",
    }


def test_an_agent_never_handles_its_own_events_even_when_it_targets_itself(team, probe):
    alice, bob, _ = team
    got = []
    alice.events.on("*", lambda e: got.append(("alice", e.name)))
    alice.subscribe("event", lambda m: got.append(("alice-subscribe", m.payload["name"])))
    bob.events.on("*", lambda e: got.append(("bob", e.name)))

    alice.events.emit("ping", targets=["alice", "bob"])
    alice.events.emit("broadcast-ping")
    alice.run(until_idle=True)
    bob.run(until_idle=True)

    assert got == [("bob", "ping"), ("bob", "broadcast-ping")]
    assert set(probe.states_of("alice")) <= {ACKED}
    assert probe.counters("unhandled") == {}


def test_targets_limit_an_event_to_the_given_agents(team):
    alice, bob, carol = team
    got = []
    bob.events.on("job", lambda e: got.append("bob"))
    carol.events.on("job", lambda e: got.append("carol"))

    alice.events.emit("job", {"n": 1}, targets="carol")
    bob.run(until_idle=True)
    carol.run(until_idle=True)

    assert got == ["carol"]


def test_a_wildcard_event_handler_gets_every_event_after_the_named_ones(team):
    alice, bob, _ = team
    got = []
    bob.events.on("*", lambda e: got.append(("*", e.name)))
    bob.events.on("a", lambda e: got.append(("a", e.name)))

    alice.events.emit("a")
    alice.events.emit("b", [1, 2])
    bob.run(until_idle=True)

    assert got == [("a", "a"), ("*", "a"), ("*", "b")]


def test_off_removes_an_event_handler_and_the_event_then_counts_as_unhandled(team, probe):
    alice, bob, _ = team
    got = []

    def handler(event):
        got.append(event.data)

    bob.subscribe("event")  # keeps bob interested in every event once the handler is gone
    bob.events.on("tick", handler)
    alice.events.emit("tick", 1)
    bob.run(until_idle=True)
    bob.events.off("tick", handler)
    alice.events.emit("tick", 2)
    bob.run(until_idle=True)

    assert got == [1]
    assert probe.counter("unhandled", "bob") == 1


def test_an_event_handler_that_raises_fails_the_event_message_for_a_retry(team, bus, clock):
    alice, bob, _ = team
    calls = []

    def flaky(event):
        calls.append(event.emitted_by)
        if len(calls) == 1:
            raise RuntimeError("not yet")

    bob.events.on("sync", flaky)
    alice.events.emit("sync", ttl=0)
    bob.run(until_idle=True)
    clock.advance(2)
    bob.run(until_idle=True)

    assert calls == ["alice", "alice"]


def test_emit_and_on_check_their_arguments(team):
    alice, _, _ = team
    with pytest.raises(sqlbus.ValidationError, match="event name"):
        alice.events.emit("")
    with pytest.raises(TypeError, match="callable"):
        alice.events.on("x", "not a function")
    with pytest.raises(sqlbus.ValidationError, match="data"):
        alice.events.emit("x", {"bad": float("nan")})


def test_the_events_property_is_the_same_object_each_time(team):
    alice, _, _ = team
    assert alice.events is alice.events
    assert isinstance(alice.events, sqlbus.Events)
