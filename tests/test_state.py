"""SPEC 6, the basics: set, get, update, compare-and-set, delete, keys (watch is tested elsewhere)."""

from __future__ import annotations

import math
import threading

import pytest

import sqlbus

pytestmark = pytest.mark.backends


def test_set_returns_versions_1_2_3_and_get_returns_the_latest(bus, clock):
    assert bus.state.set("plan", {"steps": 1}) == 1
    clock.advance(1)
    assert bus.state.set("plan", {"steps": 2}) == 2
    assert bus.state.set("plan", [1, "two", None]) == 3
    entry = bus.state.get("plan")
    assert isinstance(entry, sqlbus.StateEntry)
    assert (entry.key, entry.value, entry.version) == ("plan", [1, "two", None], 3)
    assert entry.updated_at == "2027-01-15T08:00:01.000Z"
    assert entry.updated_by is None


def test_get_of_an_absent_key_is_none(bus):
    assert bus.state.get("nothing") is None


def test_an_agents_state_writes_record_the_agent_as_updated_by(bus):
    alice = bus.agent("alice")
    alice.state.set("owner", "me")
    assert bus.state.get("owner").updated_by == "alice"


def test_compare_and_set_writes_only_at_the_expected_version(bus, probe):
    assert bus.state.set("lock", "a", expected_version=0) == 1
    before = probe.row_counts()
    with pytest.raises(sqlbus.VersionConflictError, match="expected version 0, found 1"):
        bus.state.set("lock", "b", expected_version=0)
    with pytest.raises(sqlbus.VersionConflictError, match="expected version 5, found 1"):
        bus.state.set("lock", "b", expected_version=5)
    assert probe.row_counts() == before
    assert bus.state.set("lock", "b", expected_version=1) == 2
    assert bus.state.get("lock").value == "b"


def test_update_applies_the_function_to_the_old_value(bus):
    assert bus.state.update("counter", lambda old: (old or 0) + 1) == 1
    assert bus.state.update("counter", lambda old: (old or 0) + 1) == 2
    assert bus.state.get("counter").value == 2


def test_concurrent_updates_from_threads_lose_nothing(database):
    with database.connect() as bus:
        barrier = threading.Barrier(4)
        errors = []

        def bump() -> None:
            try:
                barrier.wait()
                for _ in range(50):
                    bus.state.update("n", lambda old: (old or 0) + 1, notify=False)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert bus.state.get("n").value == 200


def test_delete_removes_the_key_and_a_later_set_continues_the_versions(bus):
    bus.state.set("k", 1)
    bus.state.set("k", 2)
    assert bus.state.delete("k") == 3
    assert bus.state.get("k") is None
    assert bus.state.keys() == []
    assert bus.state.delete("k") == 0  # deleting an absent key changes nothing
    assert bus.state.set("k", 3, expected_version=0) == 4


def test_keys_lists_live_keys_with_a_prefix_sorted(bus):
    for key in ("job/2", "job/1", "jobs", "other", "job/3"):
        bus.state.set(key, True)
    bus.state.delete("job/3")
    assert bus.state.keys() == ["job/1", "job/2", "jobs", "other"]
    assert bus.state.keys("job/") == ["job/1", "job/2"]
    assert bus.state.keys("job%") == []  # the prefix is not a LIKE pattern
    assert [e.key for e in bus.state.items("job")] == ["job/1", "job/2", "jobs"]


def test_a_state_change_message_goes_to_other_agents_in_the_same_transaction(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.subscribe("state_change")
    bob.subscribe("state_change")
    alice.state.set("plan", {"v": 1}, include_value=True)
    (d,) = bob.receive()
    assert d.message.type == "state_change"
    assert d.message.sender == "alice"
    assert d.message.payload["key"] == "plan"
    assert d.message.payload["version"] == 1
    assert d.message.payload["updated_by"] == "alice"
    assert d.message.payload["full_value"] == {"v": 1}
    assert alice.receive() == []
    alice.state.set("plan", 2, notify=False)
    assert bob.receive() == []
    alice.state.set("plan", 3, subscribers=["alice"])
    assert bob.receive() == [] and len(alice.receive()) == 1


@pytest.mark.parametrize("value", [math.nan, b"bytes", {1, 2}, object(), {"s": "\udc80"}])
def test_a_value_that_is_not_json_is_refused_and_writes_nothing(bus, probe, value):
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match="value"):
        bus.state.set("k", value)
    assert probe.row_counts() == before


@pytest.mark.parametrize("key", ["", 42, None, "k" * 513, "lone \ud800 surrogate"])
def test_a_bad_key_is_refused(bus, key):
    with pytest.raises(sqlbus.ValidationError, match="state key"):
        bus.state.set(key, 1)
