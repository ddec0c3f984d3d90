"""The retention policy lives in the database (SPEC 2.2): every process prunes by the same one,
a connect without retention keywords never changes it, ``set_retention`` and ``sqlbus config``
change it for everyone; ``archive_max_messages`` bounds the archive, oldest acked first; a
schema 2 file is upgraded with its messages and the default policy."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest
from click.testing import CliRunner
from conftest import query
from probes import ACKED, APPLICATION_ID, SCHEMA_VERSION, UPKEEP_EXCESS, SQLiteProbe

import sqlbus
import sqlbus.aio
from sqlbus import ops
from sqlbus.bus import STORED
from sqlbus.cli import cli

pytestmark = pytest.mark.backends

DAY = 86400.0
ROOT = Path(__file__).resolve().parent.parent
DEFAULT = sqlbus.Retention(archive_retention=7 * DAY, dead_retention=30 * DAY,
                           archive_max_messages=1_000_000)


def _cli(database, *args: str):
    return CliRunner().invoke(cli, [*database.cli_args(), *args], catch_exceptions=False)


def _counts(probe: SQLiteProbe) -> tuple[int, int, int]:
    """(acked rows, dead letters, all message rows)."""
    return probe.inbox_count(state=ACKED), probe.dead_letter_count(), probe.inbox_count()


def test_a_new_file_starts_with_the_default_policy(bus):
    assert bus.retention() == DEFAULT


def test_the_retention_keywords_default_to_the_stored_policy():
    for function in (sqlbus.connect, sqlbus.Bus.set_retention, sqlbus.Bus.prune):
        parameters = inspect.signature(function).parameters
        for name in ("archive_retention", "dead_retention", "archive_max_messages",
                     "sent_older_than", "dead_older_than"):
            if name in parameters:
                assert parameters[name].default is STORED, (function, name)


def test_a_bus_connected_with_none_retention_keeps_its_archive_when_others_use_defaults(
    make_bus, clock, database, probe
):
    clock.now = time.time() - 40 * DAY  # acked and failed 40 days before the real clock's now
    bus = make_bus(archive_retention=None, dead_retention=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": i}}
                        for i in range(110)])
    deliveries = bob.receive(limit=110)
    bob.ack(deliveries[:105])
    for delivery in deliveries[105:]:
        delivery.dead_letter("kept")
    assert _counts(probe) == (105, 5, 110)
    # Another process with the default keywords (and the real clock) writes: its retention
    # pass runs under the stored policy, which keeps everything.
    make_bus(clock=time.time).agent("zed")
    assert _counts(probe) == (105, 5, 110)
    proc = subprocess.run(
        [sys.executable, "-m", "sqlbus.cli", *database.cli_args(), "send", "--from", "ops",
         "--to", "bob", "--type", "notification"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for args in (["state", "set", "k", "1", "--no-notify"],
                 ["dead-letters", "requeue", "--all", "--reason", "nope"]):
        assert _cli(database, *args).exit_code == 0
    assert _counts(probe) == (105, 5, 111)
    assert bus.retention().archive_retention is None


def test_a_connect_stores_the_retention_keywords_it_is_given_and_only_those(make_bus):
    make_bus(archive_retention=DAY)
    assert make_bus().retention() == sqlbus.Retention(
        archive_retention=DAY, dead_retention=30 * DAY, archive_max_messages=1_000_000)
    make_bus(dead_retention=None, archive_max_messages=10)
    assert make_bus().retention() == sqlbus.Retention(
        archive_retention=DAY, dead_retention=None, archive_max_messages=10)


def test_set_retention_changes_the_policy_for_another_process(bus, database):
    policy = bus.set_retention(archive_retention=86_400.0, dead_retention=None)
    assert policy == bus.retention() == sqlbus.Retention(
        archive_retention=86_400.0, dead_retention=None, archive_max_messages=1_000_000)
    code = ("import json, sqlbus, sys, msgspec; "
            "bus = sqlbus.connect(sys.argv[1], **json.loads(sys.argv[2])); "
            "print(msgspec.json.encode(bus.retention()).decode()); bus.close()")
    where, keywords = database.place()
    proc = subprocess.run([sys.executable, "-c", code, str(where), json.dumps(keywords)],
                          capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "archive_retention": 86400.0, "dead_retention": None, "archive_max_messages": 1000000}


def test_another_process_prunes_by_a_policy_set_after_it_connected(make_bus, clock, probe):
    bus = make_bus()
    other = make_bus()  # connected before the change, as a long-running process would be
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(3)])
    bob.ack(bob.receive(limit=3))
    bus.set_retention(archive_retention=DAY)
    clock.advance(2 * DAY)
    probe.make_retention_due(other)  # its next write runs a retention pass (as a minute later)
    other.agent("zed")
    assert _counts(probe) == (0, 0, 0)
    assert other.metrics().messages_received == 3


def test_bad_retention_values_raise_at_once_and_change_nothing(bus, database, db_path):
    before = bus.retention()
    for kwargs, error in (
        (dict(archive_retention=-1), ValueError),
        (dict(dead_retention="30d"), TypeError),
        (dict(archive_retention=float("inf")), ValueError),
        (dict(archive_max_messages=-1), ValueError),
        (dict(archive_max_messages=2.5), TypeError),
        (dict(archive_max_messages=True), TypeError),
        (dict(archive_retention=DAY, archive_max_messages=2**63), ValueError),
    ):
        with pytest.raises(error):
            bus.set_retention(**kwargs)
        with pytest.raises(error):
            database.connect(**kwargs)
    assert bus.retention() == before
    if database.postgres:
        return  # what follows is about a file: none is made for a bad keyword
    missing = db_path.parent / "missing.db"
    with pytest.raises(ValueError):
        sqlbus.connect(missing, archive_max_messages=-1)
    assert not missing.exists()


def test_archive_max_messages_prunes_the_oldest_acked_messages_first(make_bus, clock, probe):
    bus = make_bus(archive_max_messages=4)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    ids = alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": i},
                               "ttl": 0} for i in range(12)])
    deliveries = bob.receive(limit=12)
    bob.ack(deliveries[:10])
    deliveries[10].dead_letter("kept")  # not acked: neither counted nor pruned by the bound
    # deliveries[11] stays leased
    make_bus().agent("zed")  # another process's write runs its retention pass
    acked = probe.message_ids(state=ACKED)
    assert acked == ids[6:10]
    assert _counts(probe) == (4, 1, 6)
    assert bus.metrics().messages_received == 10  # the totals keep counting them
    bus.set_retention(archive_max_messages=1)
    assert bus.prune().acked == 3  # prune applies the bound too
    assert probe.message_ids(state=ACKED) == [ids[9]]
    bus.set_retention(archive_max_messages=None)
    assert bus.prune().acked == 0


def test_the_background_pass_bounds_the_archive_a_bounded_number_of_rows_at_a_time(
    make_bus, probe
):
    bus = make_bus(archive_max_messages=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    n = UPKEEP_EXCESS + 500
    for start in range(0, n, 5000):
        alice.publish_many([{"to": "bob", "type": "notification", "ttl": 0}
                            for _ in range(min(5000, n - start))])
    bob.ack(bob.receive(limit=n))
    make_bus(archive_max_messages=100).agent("zed")
    # one pass prunes up to UPKEEP_EXCESS rows, in transactions of UPKEEP_BATCH rows
    assert _counts(probe)[0] == n - UPKEEP_EXCESS
    later = make_bus()
    later.agent("zed")
    assert _counts(probe)[0] == 100


def test_a_pass_near_the_archive_cap_says_the_next_pass_should_come_soon(make_bus, probe):
    bus = make_bus(archive_max_messages=None)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification", "ttl": 0} for _ in range(95)])
    bob.ack(bob.receive(limit=95))
    bus.set_retention(archive_max_messages=200)
    assert ops.upkeep_pass(bus.engine) == (0, False)  # far below the cap: a minute on
    bus.set_retention(archive_max_messages=100)
    assert ops.upkeep_pass(bus.engine) == (0, True)  # within 10%: nothing to prune yet
    bus.set_retention(archive_max_messages=90)
    assert ops.upkeep_pass(bus.engine) == (5, True)
    assert _counts(probe)[0] == 90


def test_prune_without_arguments_applies_the_stored_policy(make_bus, clock):
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(3)])
    bob.ack(bob.receive(limit=3))
    bus.set_retention(archive_retention=DAY)
    clock.advance(2 * DAY)
    assert bus.prune(sent_older_than=None).acked == 0  # an override wins
    assert bus.prune().acked == 3


def test_cli_prune_without_options_applies_the_stored_policy(make_bus, clock, database):
    clock.now = time.time() - 2 * DAY
    bus = make_bus()
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish_many([{"to": "bob", "type": "notification"} for _ in range(3)])
    bob.ack(bob.receive(limit=3))
    bus.set_retention(archive_retention=DAY)
    result = _cli(database, "prune", "--yes", "--sent-older-than", "never", "--dead-older-than", "never",
                  "--json")
    assert json.loads(result.stdout) == {"acked": 0, "dead_letters": 0}
    result = _cli(database, "prune", "--yes", "--json")
    assert json.loads(result.stdout) == {"acked": 3, "dead_letters": 0}


def test_cli_config_shows_and_sets_the_stored_policy(bus, database):
    result = _cli(database, "config")
    assert result.exit_code == 0
    assert result.stdout.split() == ["archive_retention", "7d", "dead_retention", "30d",
                                     "archive_max_messages", "1000000"]
    assert json.loads(_cli(database, "config", "--json").stdout) == {
        "archive_retention": 604800.0, "dead_retention": 2592000.0,
        "archive_max_messages": 1000000}
    result = _cli(database, "config", "--archive-retention", "36h", "--dead-retention", "never")
    assert result.exit_code == 0
    assert result.stdout.split() == ["archive_retention", "36h", "dead_retention", "never",
                                     "archive_max_messages", "1000000"]
    assert bus.retention() == sqlbus.Retention(
        archive_retention=36 * 3600.0, dead_retention=None, archive_max_messages=1_000_000)
    result = _cli(database, "config", "--archive-max-messages", "none", "--json")
    assert json.loads(result.stdout) == {"archive_retention": 129600.0, "dead_retention": None,
                                         "archive_max_messages": None}
    result = _cli(database, "config", "--archive-max-messages", "500", "--archive-retention", "90")
    assert result.stdout.split()[1::2] == ["90s", "never", "500"]


@pytest.mark.parametrize("args", [
    ["--archive-retention", "7x"],
    ["--dead-retention", "soon"],
    ["--archive-max-messages", "-1"],
    ["--archive-max-messages", "lots"],
    ["--archive-retention", "99999999999999"],
    ["--archive-max-messages", "9223372036854775808"],
    ["--bogus"],
], ids=lambda a: " ".join(a))
def test_cli_config_bad_values_are_one_line_exit_2_and_change_nothing(bus, database, args, request):
    bus.close()
    before = database.fingerprint()
    result = _cli(database, "config", *args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("sqlbus: error: ")
    assert database.fingerprint() == before


def test_cli_config_on_a_missing_database_is_exit_1_and_creates_nothing(tmp_path):
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "none.db"), "config"])
    assert result.exit_code == 1 and "no such database" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_asyncio_bus_reads_and_sets_the_policy(database):
    async def main() -> tuple[sqlbus.Retention, sqlbus.Retention]:
        async with await database.aio_connect() as bus:
            changed = await bus.set_retention(archive_max_messages=7)
            return changed, await bus.retention()

    changed, read = asyncio.run(main())
    assert changed == read == sqlbus.Retention(
        archive_retention=7 * DAY, dead_retention=30 * DAY, archive_max_messages=7)


# -- upgrading a schema 2 file --------------------------------------------------------------

# The tables of schema version 2, as sqlbus 0.1.0 created them.
SCHEMA_2 = """
CREATE TABLE agents (id TEXT PRIMARY KEY, registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'active') STRICT, WITHOUT ROWID;
CREATE TABLE message (
    seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL, sender TEXT NOT NULL, agent TEXT,
    type TEXT NOT NULL, correlation_id TEXT,
    priority INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 5),
    state INTEGER NOT NULL CHECK (state BETWEEN 0 AND 4), visible_at INTEGER NOT NULL,
    expires_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims INTEGER NOT NULL DEFAULT 0, sent_at INTEGER NOT NULL, done_at INTEGER,
    last_error TEXT, body BLOB NOT NULL) STRICT;
CREATE INDEX message_claim ON message (agent, priority DESC, seq, visible_at) WHERE state = 0;
CREATE INDEX message_wait ON message (agent, visible_at) WHERE (state = 1 OR state = 4);
CREATE INDEX message_id ON message (message_id);
CREATE INDEX message_response ON message (agent, correlation_id) WHERE type = 'response';
CREATE TABLE dead_letter (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,
    reason TEXT NOT NULL, error_name TEXT, error_message TEXT, traceback TEXT, context TEXT,
    failed_at INTEGER NOT NULL, attempts INTEGER NOT NULL) STRICT;
CREATE INDEX dead_letter_failed_at ON dead_letter (failed_at);
CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    deleted INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)), updated_by TEXT,
    updated_at INTEGER NOT NULL) STRICT;
CREATE TABLE state_log (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB NOT NULL,
    version INTEGER NOT NULL, deleted INTEGER NOT NULL, updated_by TEXT,
    updated_at INTEGER NOT NULL) STRICT;
CREATE TABLE error_counts (name TEXT PRIMARY KEY, count INTEGER NOT NULL) STRICT, WITHOUT ROWID;
CREATE TABLE counters (name TEXT NOT NULL, agent TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (name, agent)) STRICT, WITHOUT ROWID;
CREATE TABLE request_timeout (agent TEXT NOT NULL, correlation_id TEXT NOT NULL,
    timed_out_at INTEGER NOT NULL, PRIMARY KEY (agent, correlation_id)) STRICT, WITHOUT ROWID;
"""
TABLES_2 = ("agents", "message", "dead_letter", "state", "state_log", "error_counts", "counters",
            "request_timeout")


def _as_schema_2(source: Path, dest: Path) -> None:
    """Write the rows of ``source`` into a new schema 2 file ``dest`` (WAL, 2 KiB pages)."""
    conn = apsw.Connection(str(dest))
    conn.execute("PRAGMA page_size = 2048")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(SCHEMA_2)
    conn.execute("ATTACH ? AS source", (str(source),))
    conn.execute("BEGIN")
    for table in TABLES_2:  # the columns schema 2 has (later schemas add some)
        columns = ", ".join(row[1] for row in conn.execute(f"PRAGMA main.table_info({table})"))
        conn.execute(f"INSERT INTO main.{table} SELECT {columns} FROM source.{table}")
    conn.execute(f"PRAGMA main.application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA main.user_version = 2")
    conn.execute("COMMIT")
    conn.execute("DETACH source")
    conn.close()


def test_a_schema_2_file_is_upgraded_keeps_every_message_and_gets_the_default_policy(
    tmp_path, clock
):
    source, db = tmp_path / "source.db", tmp_path / "v2.db"
    with sqlbus.connect(source, clock=clock, backoff_base=10.0) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        ids = alice.publish_many([{"to": "bob", "type": "notification", "payload": {"i": i},
                                   "ttl": 0} for i in range(6)])
        acked, leased, failing, dead, purged = bob.receive(limit=5, lease=60.0)
        acked.ack()
        failing.fail(RuntimeError("try again"))  # scheduled 10 s from now
        dead.dead_letter("by hand")
        purged.dead_letter("purged")
        bus.state.set("plan", {"step": 1}, notify=False)
        bus.state.set("plan", {"step": 2}, notify=False)
    _as_schema_2(source, db)
    with sqlbus.connect(db, clock=clock, backoff_base=10.0) as bus:
        assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(5,)]
        assert bus.retention() == DEFAULT
        assert [r.message.id for r in bus.sent(limit=10)] == ids[::-1]
        assert {e.message.id: e.status for e in bus.peek("bob")} == {
            ids[5]: "ready", ids[1]: "leased", ids[2]: "retrying"}
        assert [(d.id, d.message.id, d.reason) for d in bus.dead_letters()] == [
            (2, ids[4], "purged"), (1, ids[3], "by hand")]
        assert bus.state.get("plan").version == 2
        assert bus.metrics().messages_received == 1
        # positions and dead-letter numbers go on from where schema 2 left them
        assert bus.purge_dead_letters() == 2
        bob = bus.agent("bob")
        (ready,) = bob.receive()
        assert ready.message.id == ids[5]
        ready.dead_letter("again")
        assert bus.dead_letters()[0].id == 3
        newest = bus.agent("alice").publish("bob", "notification", {})
        assert [row.position for row in SQLiteProbe(db).inbox_rows(newest)] == [7]
        changes = bus.state.watch("plan")
        assert next(changes).value == {"step": 2}
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_schema_2_file_opened_with_retention_keywords_stores_them_after_the_upgrade(
    tmp_path, clock
):
    source, db = tmp_path / "source.db", tmp_path / "v2.db"
    sqlbus.connect(source, clock=clock).close()
    _as_schema_2(source, db)
    with sqlbus.connect(db, clock=clock, dead_retention=None) as bus:
        assert bus.retention() == sqlbus.Retention(
            archive_retention=7 * DAY, dead_retention=None, archive_max_messages=1_000_000)
