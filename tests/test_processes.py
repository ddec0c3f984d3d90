"""Real processes on one database, a SQLite file or a PostgreSQL schema over TCP: producers
and consumers, a consumer killed with SIGKILL while it holds leases, and four writers at
durability="full". Each test takes a few seconds."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from postgres_server import URL as PG_URL
from postgres_server import connect as connect_pg
from postgres_server import pg_schema

import sqlbus


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path):  # type: ignore[no-untyped-def]
    """``where(name)``: the connect() arguments of a new database for the test, on either
    backend: a file in tmp_path, or a fresh schema on the test server (dropped afterwards)."""
    if request.param == "sqlite":
        return lambda name: {"path": str(tmp_path / f"{name}.db")}
    schema = request.getfixturevalue("pg_schema")
    connect_pg().close()  # the server answers (CI: else fail; elsewhere: skip saying why)
    return lambda name: {"path": PG_URL, "schema": schema}


# spawn: every child is a fresh interpreter with its own connections, as separate programs are.
ctx = multiprocessing.get_context("spawn")
__all__ = ["pg_schema"]  # fixtures


# ---------------------------------------------------------------------------------------------
# Child process bodies (module level, so spawn can import them)


def _produce(path: dict, name: str, count: int, start, report: str) -> None:
    with sqlbus.connect(**path) as bus:
        agent = bus.agent(name)
        start.wait(30)
        sent = []
        i = 0
        while i < count:
            if i % 2:  # alternate single publishes and small batches
                batch = [{"to": "worker", "type": "notification", "payload": {"key": f"{name}:{j}"},
                          "ttl": 0} for j in range(i, min(i + 10, count))]
                agent.publish_many(batch)
                sent += [item["payload"]["key"] for item in batch]
                i += len(batch)
            else:
                agent.publish("worker", "notification", {"key": f"{name}:{i}"}, ttl=0)
                sent.append(f"{name}:{i}")
                i += 1
    Path(report).write_text(json.dumps(sent))


def _consume(path: dict, producers_done, start, report: str) -> None:
    got = []
    with sqlbus.connect(**path) as bus:
        worker = bus.agent("worker")
        start.wait(30)
        while True:
            batch = worker.receive(limit=20, wait=0.2)
            if not batch:
                if producers_done.is_set() and not worker.receive(limit=1, wait=0.3):
                    break
                continue
            worker.ack(batch)
            got += [d.message.payload["key"] for d in batch]
    Path(report).write_text(json.dumps(got))


def _consume_then_hang(path: dict, ack_first: int, claimed_file: str, acked_file: str,
                       holding) -> None:
    """Ack ``ack_first`` messages, then claim a batch with a 1 s lease and hang holding it."""
    with sqlbus.connect(**path) as bus:
        worker = bus.agent("worker")
        acked: list[str] = []
        while len(acked) < ack_first:
            batch = worker.receive(limit=5, wait=1.0, lease=1.0)
            worker.ack(batch)
            acked += [d.message.payload["key"] for d in batch]
        Path(acked_file).write_text(json.dumps(acked))
        held = worker.receive(limit=25, wait=1.0, lease=1.0)
        Path(claimed_file).write_text(json.dumps([d.message.payload["key"] for d in held]))
        holding.set()
        time.sleep(60)  # "processing": the parent kills us here


def _write_full(path: dict, name: str, count: int, start, report: str) -> None:
    errors = []
    with sqlbus.connect(**path, durability="full") as bus:
        agent = bus.agent(name)
        start.wait(30)
        for i in range(count):
            try:
                agent.publish("sink", "notification", {"i": i})
                if i % 3 == 0:
                    agent.state.update("total", lambda old: (old or 0) + 1, notify=False)
            except sqlbus.DatabaseError as exc:
                errors.append(str(exc))
    Path(report).write_text(json.dumps(errors))


def _join_all(processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "a child process hung"
    assert [p.exitcode for p in processes] == [0] * len(processes)


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_producers_and_two_consumers_move_5000_messages_with_none_lost_or_duplicated(
    tmp_path, where,
):
    path = where("procs")
    with sqlbus.connect(**path) as bus:
        bus.agent("worker")
    start = ctx.Barrier(4)
    producers_done = ctx.Event()
    producers = [
        ctx.Process(target=_produce, args=(path, f"p{n}", 2500, start, str(tmp_path / f"p{n}")))
        for n in range(2)
    ]
    consumers = [
        ctx.Process(target=_consume, args=(path, producers_done, start, str(tmp_path / f"c{n}")))
        for n in range(2)
    ]
    for p in producers + consumers:
        p.start()
    _join_all(producers)
    producers_done.set()
    _join_all(consumers)

    sent = [key for n in range(2) for key in json.loads((tmp_path / f"p{n}").read_text())]
    got = [key for n in range(2) for key in json.loads((tmp_path / f"c{n}").read_text())]
    assert len(sent) == len(set(sent)) == 5000
    assert len(got) == len(set(got)), "a message was delivered twice"
    assert set(got) == set(sent), "a message was lost"
    assert all(json.loads((tmp_path / f"c{n}").read_text()) for n in range(2)), \
        "both consumers took part"
    with sqlbus.connect(**path) as bus:
        assert bus.agent("worker").receive(limit=10) == []
        assert bus.dead_letters() == []


@pytest.mark.slow
def test_a_consumer_killed_while_holding_leases_loses_nothing(tmp_path, where):
    path = where("kill")
    with sqlbus.connect(**path) as bus:
        boss = bus.agent("boss")
        bus.agent("worker")
        boss.publish_many([{"to": "worker", "type": "notification", "payload": {"key": str(i)},
                            "ttl": 0} for i in range(400)])
    holding = ctx.Event()
    victim = ctx.Process(
        target=_consume_then_hang,
        args=(path, 100, str(tmp_path / "claimed"), str(tmp_path / "acked"), holding),
    )
    victim.start()
    try:
        assert holding.wait(60), "the victim never claimed its batch"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.join(10)
    assert victim.exitcode == -signal.SIGKILL
    acked_by_victim = set(json.loads((tmp_path / "acked").read_text()))
    killed_leases = set(json.loads((tmp_path / "claimed").read_text()))
    assert len(killed_leases) == 25 and len(acked_by_victim) >= 100

    survivor_got: dict[str, int] = {}
    with sqlbus.connect(**path) as bus:
        worker = bus.agent("worker")
        deadline = time.monotonic() + 30
        while len(acked_by_victim) + len(survivor_got) < 400 and time.monotonic() < deadline:
            batch = worker.receive(limit=50, wait=0.5)
            worker.ack(batch)
            for d in batch:
                assert d.message.payload["key"] not in survivor_got, "delivered twice"
                survivor_got[d.message.payload["key"]] = d.attempts
        assert worker.receive(limit=1, wait=0.2) == []
        assert bus.dead_letters() == []

    everything = {str(i) for i in range(400)}
    assert acked_by_victim | set(survivor_got) == everything
    assert not acked_by_victim & set(survivor_got), "an acked message came back"
    # duplicates (handled by both) are exactly the leases the victim held when it died
    handled_by_victim = acked_by_victim | killed_leases
    assert handled_by_victim & set(survivor_got) == killed_leases
    assert {survivor_got[key] for key in killed_leases} == {2}


@pytest.mark.slow
def test_four_processes_writing_at_durability_full_never_see_database_is_locked(tmp_path, where):
    path = where("full")
    with sqlbus.connect(**path) as bus:
        bus.agent("sink")
    start = ctx.Barrier(4)
    writers = [
        ctx.Process(target=_write_full, args=(path, f"w{n}", 400, start, str(tmp_path / f"w{n}")))
        for n in range(4)
    ]
    for p in writers:
        p.start()
    _join_all(writers)
    errors = [e for n in range(4) for e in json.loads((tmp_path / f"w{n}").read_text())]
    assert errors == []
    with sqlbus.connect(**path) as bus:
        assert len(bus.agent("sink").receive(limit=2000)) == 1600
        assert bus.state.get("total").value == 4 * 134


@pytest.mark.slow
def test_four_consumers_on_one_inbox_share_it_without_a_message_taken_twice(tmp_path, where):
    path = where("four")
    with sqlbus.connect(**path) as bus:
        boss = bus.agent("boss")
        bus.agent("worker")
        boss.publish_many([{"to": "worker", "type": "notification", "payload": {"key": str(i)},
                            "ttl": 0} for i in range(2000)])
    start = ctx.Barrier(4)
    done = ctx.Event()
    done.set()  # nothing more comes: each consumer stops once the inbox is empty
    consumers = [
        ctx.Process(target=_consume, args=(path, done, start, str(tmp_path / f"c{n}")))
        for n in range(4)
    ]
    for p in consumers:
        p.start()
    _join_all(consumers)
    shares = [json.loads((tmp_path / f"c{n}").read_text()) for n in range(4)]
    got = [key for share in shares for key in share]
    assert len(got) == len(set(got)) == 2000
    assert sum(1 for share in shares if share) >= 2, "the consumers took turns, not shares"


def _connect_and_publish(path: dict, name: str, start, report: str) -> None:
    start.wait(30)
    try:
        with sqlbus.connect(**path) as bus:
            bus.agent(name).publish("sink", "notification", {"from": name})
        Path(report).write_text("ok")
    except Exception as exc:  # reported to the parent
        Path(report).write_text(f"{type(exc).__name__}: {exc}")


def test_processes_creating_the_same_new_file_at_once_all_succeed(tmp_path):
    fork = multiprocessing.get_context("fork")  # cheap children: several rounds of the race
    for attempt in range(5):
        path = str(tmp_path / f"new-{attempt}.db")
        start = fork.Barrier(4)
        procs = [
            fork.Process(target=_connect_and_publish,
                        args=({"path": path}, f"p{n}", start, str(tmp_path / f"r{attempt}-{n}")))
            for n in range(4)
        ]
        for p in procs:
            p.start()
        _join_all(procs)
        results = [(tmp_path / f"r{attempt}-{n}").read_text() for n in range(4)]
        assert results == ["ok"] * 4
        with sqlbus.connect(path) as bus:
            senders = sorted(d.message.sender for d in bus.agent("sink").receive(limit=10))
        assert senders == ["p0", "p1", "p2", "p3"]
