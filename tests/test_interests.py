"""SPEC 5-7: subscriptions are recorded interests. State changes and events sent without
explicit recipients go to the agents interested in them, never to every agent; explicit
recipients work as always and read no interests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import query, sqlite_only
from probes import SCHEMA_VERSION, SQLiteProbe

import sqlbus
import sqlbus.aio
from sqlbus.cli import cli

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parent.parent


def inbox(probe, agent: str) -> list[tuple]:
    """(type, payload name or key) of every row addressed to ``agent``, in order."""
    return [
        (row.type, json.loads(row.body)["payload"].get("name")
         or json.loads(row.body)["payload"].get("key"))
        for row in probe.inbox_rows(agent=agent)
    ]


# ---------------------------------------------------------------------------------------------
# The README's Quick start, twice on the same file


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README.md has no python block under '## Quick start'"
    return found.group(1)


def test_the_readme_quick_start_runs_twice_in_a_row_on_the_same_file(tmp_path):
    code = quick_start()
    # the sqlbus this test imported, whatever the current directory
    env = dict(os.environ, PYTHONPATH=str(Path(sqlbus.__file__).resolve().parent.parent))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
    team = SQLiteProbe(tmp_path / "team.db")
    assert team.state_key_count() == 1
    # the state changes interested nobody: no inbox holds one, nothing will expire
    assert team.inbox_count(type="state_change") == 0


# ---------------------------------------------------------------------------------------------
# State changes


def test_a_state_change_goes_only_to_agents_interested_in_state_change_or_everything(bus, probe):
    alice, bob, carol, dave = (bus.agent(a) for a in ("alice", "bob", "carol", "dave"))
    alice.subscribe("state_change")
    bob.subscribe("*")
    carol.subscribe("task_assignment")  # another type: not interested in state changes

    alice.state.set("plan", {"v": 1})
    bus.state.set("plan", {"v": 2})

    assert inbox(probe, "alice") == [("state_change", "plan")]  # its own write did not come back
    assert inbox(probe, "bob") == [("state_change", "plan"), ("state_change", "plan")]
    assert inbox(probe, "carol") == inbox(probe, "dave") == []
    [second, first] = bus.sent(limit=2)
    assert (first.message.to, first.recipients) == (["bob"], ["bob"])
    assert second.recipients == ["alice", "bob"]
    assert second.message.headers.broadcast_pattern is sqlbus.messages.UNSET


def test_a_state_change_nobody_is_interested_in_writes_no_message_and_no_dead_letter(bus, clock, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    for n in range(20):
        alice.state.set("counter", n)
        bus.state.update("other", lambda old: (old or 0) + 1)
    clock.advance(3600)  # far past any TTL
    assert bob.receive(limit=100) == [] and alice.receive(limit=100) == []
    assert probe.inbox_rows() == []
    assert bus.dead_letters() == []
    assert bus.state.get("counter").version == 20
    assert len(probe.state_log()) == 40  # the log has every change


def test_explicit_subscribers_get_the_state_change_without_any_interest(bus, probe):
    alice = bus.agent("alice")
    bus.agent("bob")
    bus.agent("carol").subscribe("state_change")
    alice.state.set("plan", 1, subscribers=["bob"])
    alice.state.set("plan", 2, subscribers=[])
    assert inbox(probe, "bob") == [("state_change", "plan")]
    assert inbox(probe, "carol") == []


def test_state_changes_written_in_a_transaction_or_with_an_ack_reach_the_interested(bus, probe):
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    carol.subscribe("state_change")
    with alice.transaction() as tx:
        tx.state.set("plan", 1)
    alice.publish("bob", "notification", {})
    with bob.receive()[0] as d:
        d.state.set("done", True)
    assert inbox(probe, "carol") == [("state_change", "plan"), ("state_change", "done")]
    assert [t for t, _ in inbox(probe, "alice")] == []


# ---------------------------------------------------------------------------------------------
# Events


def test_an_event_goes_to_the_agents_whose_interests_match_its_name(bus, probe):
    names = ("alice", "builder", "deployer", "logger", "auditor", "bystander", "picky")
    alice, builder, deployer, logger, auditor, bystander, picky = (bus.agent(a) for a in names)
    alice.events.on("*")  # the emitter: never gets its own event
    builder.events.on("build.*", lambda e: None)
    deployer.events.on("deploy", lambda e: None)
    logger.subscribe("event")
    auditor.subscribe("*")
    bystander.subscribe("state_change")
    picky.events.on("build.[!d]*")  # fnmatch's negation (GLOB would need [^d])

    first = alice.events.emit("build.done", {"sha": "abc"})
    second = alice.events.emit("build.failed")

    recipients = {r.message.id: r.recipients for r in bus.sent()}
    assert recipients[first] == ["auditor", "builder", "logger"]
    assert recipients[second] == ["auditor", "builder", "logger", "picky"]
    assert inbox(probe, "deployer") == inbox(probe, "bystander") == inbox(probe, "alice") == []


def test_an_event_that_matches_nobody_is_archived_with_no_recipient(bus, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bob.events.on("deploy")
    message_id = alice.events.emit("build.done")
    [record] = bus.sent()
    assert (record.message.id, record.recipients, record.message.type) == (message_id, [], "event")
    assert [row.agent for row in probe.inbox_rows()] == [None]


def test_explicit_event_targets_work_without_any_interest(bus):
    alice = bus.agent("alice")
    bus.agent("bob")
    bus.agent("carol").events.on("*")
    alice.events.emit("job", targets=["bob"])
    [record] = bus.sent()
    assert record.recipients == ["bob"]


def test_a_pattern_handler_in_the_run_loop_receives_the_events_it_matches(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    got = []
    bob.events.on("*", lambda e: got.append(("*", e.name)))
    bob.events.on("build.[!x]*", lambda e: got.append(("build.[!x]*", e.name)))
    bob.events.on("build.done", lambda e: got.append(("build.done", e.name)))
    bob.events.on("build.*", lambda e: got.append(("build.*", e.name)))

    for name in ("build.done", "build.xyz", "deploy"):
        alice.events.emit(name)
    bob.run(until_idle=True)

    assert got == [
        ("build.done", "build.done"), ("build.[!x]*", "build.done"), ("build.*", "build.done"),
        ("*", "build.done"),
        ("build.*", "build.xyz"), ("*", "build.xyz"),
        ("*", "deploy"),
    ]


@pytest.mark.parametrize("name", ["build.*", "build?", "build[1]"])
def test_an_event_name_with_pattern_characters_is_refused_and_writes_nothing(bus, probe, name):
    alice = bus.agent("alice")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match="event name"):
        alice.events.emit(name)
    assert probe.row_counts() == before


def test_bad_types_and_patterns_are_refused_before_anything_is_recorded(bus, probe):
    bob = bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match="type"):
        bob.subscribe("nonsense")
    with pytest.raises(sqlbus.ValidationError, match="event pattern"):
        bob.events.on("")
    with pytest.raises(sqlbus.ValidationError, match="event pattern"):
        bob.events.on("bad\x00")
    with pytest.raises(TypeError, match="callable"):
        bob.subscribe("notification", "not a function")
    assert probe.row_counts() == before and bob.subscriptions() == []


# ---------------------------------------------------------------------------------------------
# Recording, listing, dropping


def test_subscriptions_are_recorded_once_listed_and_outlive_the_process(make_bus, probe, clock):
    bus = make_bus()
    bob = bus.agent("bob")
    bus.agent("alice")
    bob.subscribe("state_change")
    clock.advance(5)
    bob.subscribe("state_change", lambda m: None)  # idempotent: the first time stays
    bob.events.on("build.*", lambda e: None)

    expected = [
        sqlbus.Subscription("event", "build.*", "2027-01-15T08:00:05.000Z"),
        sqlbus.Subscription("type", "state_change", "2027-01-15T08:00:00.000Z"),
    ]
    assert bob.subscriptions() == expected
    bus.close()

    again = make_bus()
    assert again.agent("bob").subscriptions() == expected
    assert {a.id: a.subscriptions for a in again.agents()} == {"alice": [], "bob": expected}
    assert probe.interest_count() == 2


def test_unsubscribing_the_last_handler_drops_the_interest(bus):
    bob = bus.agent("bob")

    def first(m):
        pass

    def second(m):
        pass

    bob.subscribe("notification", first)
    bob.subscribe("notification", second)
    bob.unsubscribe("notification", lambda m: None)  # never subscribed: nothing changes
    bob.unsubscribe("notification", first)
    assert [s.pattern for s in bob.subscriptions()] == ["notification"]
    bob.unsubscribe("notification", second)
    assert bob.subscriptions() == []


def test_unsubscribe_without_a_handler_drops_the_interest_and_its_handlers(bus):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    got = []
    bob.subscribe("notification", got.append)
    bob.subscribe("*", lambda m: None)
    bob.unsubscribe("notification")
    assert [s.pattern for s in bob.subscriptions()] == ["*"]
    alice.publish("bob", "notification", {})
    bob.run(until_idle=True)
    assert got == []
    # an interest recorded by an earlier process, with no handler here, goes too
    bob.unsubscribe("*")
    assert bob.subscriptions() == []


def test_events_off_drops_the_pattern_like_unsubscribe(bus, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")

    def handler(event):
        pass

    bob.events.on("build.*", handler)
    bob.events.on("deploy")
    bob.events.off("build.*", handler)
    bob.events.off("deploy")
    assert bob.subscriptions() == []
    alice.events.emit("build.done")
    alice.events.emit("deploy")
    assert inbox(probe, "bob") == []


def test_a_publish_with_explicit_recipients_reads_no_interests(bus, probe):
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bob.subscribe("state_change")
    probe.lose_interests()  # any read of them would now fail

    alice.publish("bob", "notification", {"n": 1})
    alice.publish(["bob", "alice"], "notification", {"n": 2}, correlation_id="c")
    alice.publish_many([{"to": "bob", "type": "heartbeat", "payload": {"n": 1}}])
    alice.broadcast("notification", {"n": 3})
    alice.state.set("plan", 1, subscribers=["bob"])
    alice.state.set("plan", 2, notify=False)
    alice.events.emit("build.done", targets=["bob"])
    assert len(bob.receive(limit=10)) == 6

    with pytest.raises(sqlbus.DatabaseError, match="interest"):  # these do read them
        alice.state.set("plan", 3)
    with pytest.raises(sqlbus.DatabaseError, match="interest"):
        alice.events.emit("build.done")


# ---------------------------------------------------------------------------------------------
# Schema 5, asyncio, CLI


@sqlite_only("an upgrade of a SQLite file written by schema 4; PostgreSQL starts at its own version 1")
def test_a_schema_4_file_is_upgraded_with_an_empty_interest_table(make_bus, db_path, tmp_path):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    kept = alice.publish("bob", "notification", {"n": 1})
    bus.close()
    SQLiteProbe(db_path).write("DROP TABLE interest", "PRAGMA user_version = 4")

    bus = make_bus()
    assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(5,)]
    make_bus(tmp_path / "fresh.db")
    schema = "SELECT type, name, sql FROM sqlite_schema ORDER BY name"
    assert query(db_path, schema) == query(tmp_path / "fresh.db", schema)
    bob = bus.agent("bob")
    assert bob.subscriptions() == []
    assert [d.message.id for d in bob.receive()] == [kept]
    bob.subscribe("state_change")
    bus.agent("alice").state.set("plan", 1)
    assert bob.receive()[0].message.type == "state_change"


def test_asyncio_subscribe_and_on_are_coroutines_that_record_interests(db_path):
    async def main():
        async with await sqlbus.aio.connect(db_path) as bus:
            alice, bob = await bus.agent("alice"), await bus.agent("bob")
            got = []

            async def on_build(event):
                got.append(event.name)

            await bob.events.on("build.*", on_build)
            await bob.subscribe("state_change")
            subscriptions = await bob.subscriptions()
            await alice.events.emit("build.done")
            await alice.state.set("plan", 1)
            await bob.run(until_idle=True)
            await bob.events.off("build.*", on_build)
            await bob.unsubscribe("state_change")
            return got, subscriptions, await bob.subscriptions()

    got, subscriptions, after = asyncio.run(main())
    assert got == ["build.done"]
    assert [(s.kind, s.pattern) for s in subscriptions] == [
        ("event", "build.*"), ("type", "state_change")]
    assert after == []


def test_the_cli_agents_command_lists_subscriptions(bus, database):
    bob = bus.agent("bob")
    bus.agent("alice")
    bob.subscribe("state_change")
    bob.events.on("build.*")
    result = CliRunner().invoke(cli, [*database.cli_args(), "agents"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    header, alice_row, bob_row = result.stdout.splitlines()
    assert header.split()[-1] == "SUBSCRIPTIONS"
    assert bob_row.endswith("event:build.*, state_change") and alice_row.endswith("-")
    result = CliRunner().invoke(cli, [*database.cli_args(), "agents", "--json"])
    rows = {r["id"]: r["subscriptions"] for r in json.loads(result.stdout)}
    assert rows["alice"] == []
    assert [(s["kind"], s["pattern"]) for s in rows["bob"]] == [
        ("event", "build.*"), ("type", "state_change")]
    assert set(rows["bob"][0]) == {"kind", "pattern", "subscribed_at"}
