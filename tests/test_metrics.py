"""Metrics (SPEC 8): read from the rows of the file, shared by every process, counted by the
SPEC's rules, and printable in the Prometheus text format."""

from __future__ import annotations

import multiprocessing
import re

import msgspec
import pytest

import sqlbus
from sqlbus.metrics import to_prometheus

pytestmark = pytest.mark.backends


def test_a_message_to_many_recipients_counts_as_one_message_sent(bus):
    alice = bus.agent("alice")
    bus.agent("bob"), bus.agent("carol")
    alice.publish(["bob", "carol"], "notification", {"n": 1})
    alice.broadcast("event", {"name": "x", "data": {}}, pattern="nobody-*")
    m = bus.metrics()
    assert m.messages_sent == 2
    assert m.agent_activity["alice"].sent == 2
    assert m.queue_depths["bob"].ready == 1 and m.queue_depths["carol"].ready == 1


def test_received_counts_acked_deliveries_and_delivery_time_runs_from_publish_to_ack(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    alice.publish("bob", "notification", {})
    clock.advance(0.2)
    first, second = bob.receive(limit=2)
    clock.advance(0.2)
    first.ack()
    clock.advance(0.4)
    second.ack()
    m = bus.metrics()
    assert m.messages_received == 2
    assert m.agent_activity["bob"].received == 2
    assert m.average_delivery_ms == pytest.approx((400 + 800) / 2)


def test_failures_are_counted_by_exception_name_and_a_retry_is_not_a_failure(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for _ in range(3):
        alice.publish("bob", "notification", {})
    a, b, c = bob.receive(limit=3)
    a.fail(ValueError("bad"))
    b.fail(KeyError("k"))
    c.retry(0.5)
    m = bus.metrics()
    assert m.messages_failed == 2
    assert m.error_rates == {"ValueError": 1, "KeyError": 1}
    assert m.queue_depths["bob"].retrying == 3
    assert m.messages_dead_lettered == 0


def test_dead_letters_and_expired_messages_are_counted_and_success_rate_is_a_fraction(make_bus, clock):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1})
    alice.publish("bob", "notification", {"n": 2})
    alice.publish("bob", "notification", {"n": 3}, ttl=1000)
    first, second = bob.receive(limit=2)
    first.ack()
    second.fail(RuntimeError("boom"))  # last attempt: dead letter
    clock.advance(2)
    assert bob.receive() == []  # the third expired: dead letter, never delivered
    m = bus.metrics()
    assert (m.messages_received, m.messages_dead_lettered, m.messages_expired) == (1, 2, 1)
    assert m.success_rate == pytest.approx(1 / 3)
    assert m.queue_depths["bob"].dead == 2


def test_success_rate_is_one_when_nothing_was_acked_or_dead_lettered(bus):
    m = bus.metrics()
    assert m.success_rate == 1.0
    assert m.messages_sent == 0 and m.average_delivery_ms == 0.0


def test_queue_depths_show_ready_leased_retrying_and_dead_and_the_oldest_ready_age(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for _ in range(4):
        alice.publish("bob", "notification", {})
    alice.publish("bob", "notification", {}, delay=60.0)
    clock.advance(1.5)
    leased = bob.receive(limit=2)
    leased[0].dead_letter("not for me")
    m = bus.metrics()
    assert msgspec.structs.asdict(m.queue_depths["bob"]) == {
        "ready": 2, "leased": 1, "retrying": 0, "scheduled": 1, "expired": 0, "dead": 1,
    }
    assert m.oldest_ready_age_ms == 1500
    assert [s.agent for s in bus.stats()] == ["alice", "bob"]
    stats = {s.agent: s for s in bus.stats()}["bob"]
    assert (stats.ready, stats.leased, stats.retrying, stats.scheduled, stats.dead) == (2, 1, 0, 1, 1)
    assert stats.oldest_ready_age_ms == 1500


def test_throughput_counts_acks_of_the_last_second_and_the_last_minute(bus, clock):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for _ in range(3):
        alice.publish("bob", "notification", {})
    d = bob.receive(limit=3)
    d[0].ack()
    clock.advance(30)
    d[1].ack()
    d[2].ack()
    m = bus.metrics()
    assert (m.throughput.per_second, m.throughput.per_minute) == (2.0, 3.0)
    clock.advance(31)
    assert bus.metrics().throughput.per_minute == 2.0
    clock.advance(30)
    assert bus.metrics().throughput.per_minute == 0.0


def test_a_requeued_dead_letter_still_counts_as_dead_lettered_once(make_bus):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    bob.receive()[0].fail(ValueError("x"))
    (dead,) = bus.dead_letters()
    bus.requeue(dead.id)
    bob.receive()[0].ack()
    m = bus.metrics()
    assert (m.messages_dead_lettered, m.messages_received, m.messages_sent) == (1, 1, 1)
    assert m.queue_depths["bob"].dead == 0


def test_purged_dead_letters_stay_in_the_totals(make_bus):
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    bob.receive()[0].fail(ValueError("x"))
    before = bus.metrics()
    assert bus.purge_dead_letters() == 1
    after = bus.metrics()
    assert (after.messages_sent, after.messages_dead_lettered) == (1, 1)
    assert after.agent_activity == before.agent_activity
    assert after.queue_depths["bob"].dead == 0


def test_unhandled_messages_are_counted_from_the_run_loop(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)
    m = bus.metrics()
    assert m.messages_unhandled == 2
    assert m.messages_received == 2


def _publish_in_child(where, keywords: dict) -> None:
    with sqlbus.connect(where, **keywords) as bus:
        carol = bus.agent("carol")
        carol.publish("dave", "notification", {})
        carol.publish(["dave", "erin"], "notification", {})


def test_metrics_are_shared_by_every_process_on_the_file(database):
    with database.connect() as bus:
        bus.agent("dave")
        child = multiprocessing.get_context("spawn").Process(
            target=_publish_in_child, args=database.place()
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        m = bus.metrics()
    assert m.messages_sent == 2
    assert m.agent_activity["carol"].sent == 2
    assert m.queue_depths["dave"].ready == 2 and m.queue_depths["erin"].ready == 1


def test_metrics_round_trip_through_json_with_the_same_keys(bus):
    bus.agent("alice").publish("bob", "notification", {})
    m = bus.metrics()
    data = msgspec.json.decode(msgspec.json.encode(m))
    assert list(data) == list(sqlbus.Metrics.__struct_fields__)
    assert msgspec.json.decode(msgspec.json.encode(m), type=sqlbus.Metrics) == m
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", m.timestamp)
    assert m.db_bytes > 0


# -- Prometheus -----------------------------------------------------------------------------

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\})?'
    r' (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$'
)


def parse_prometheus(text: str) -> dict[str, dict[str, float]]:
    """Check the text exposition format's rules and return {name: {labels: value}}: every
    sample on its own line, after a # HELP and a # TYPE for its name, no series twice."""
    assert text.endswith("\n")
    helped: set[str] = set()
    typed: dict[str, str] = {}
    series: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"two HELP lines for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "untyped", "histogram", "summary")
            assert name not in typed, f"two TYPE lines for {name}"
            typed[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name in typed and name in helped, f"{name}: sample before its # HELP/# TYPE"
            labels = match["labels"] or ""
            assert labels not in series.setdefault(name, {}), f"duplicate series {line!r}"
            series[name][labels] = float(match["value"])
    return series


def test_prometheus_output_follows_the_exposition_format_with_agent_labels(make_bus):
    bus = make_bus(max_attempts=1)
    alice, odd = bus.agent("alice"), bus.agent('we"ird\\agent')
    alice.publish('we"ird\\agent', "notification", {})
    alice.publish('we"ird\\agent', "notification", {})
    first, second = odd.receive(limit=2)
    first.ack()
    second.fail(ValueError("x"))
    m = bus.metrics()
    series = parse_prometheus(to_prometheus(m))
    assert series["sqlbus_messages_sent_total"] == {"": 2.0}
    assert series["sqlbus_messages_received_total"] == {"": 1.0}
    assert series["sqlbus_errors_total"] == {'error="ValueError"': 1.0}
    assert series["sqlbus_queue_depth"]['agent="we\\"ird\\\\agent",state="dead"'] == 1.0
    assert series["sqlbus_agent_messages_total"]['agent="alice",direction="sent"'] == 2.0
    assert series["sqlbus_success_ratio"] == {"": 0.5}
    for name in series:
        assert name.startswith("sqlbus_")
