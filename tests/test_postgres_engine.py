"""The PostgreSQL engine under a bus: opening by URL, the keywords, the server's clock, a
server that restarts or kills connections, forks, and no growth of threads or descriptors
over many buses and reconnects. Real servers only: the shared test server, or one of the
test's own (tests/private_postgres.py) when the test stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from postgres_server import URL, connect, pg_schema
from private_postgres import private_server

import sqlbus
from sqlbus.errors import DatabaseError

__all__ = ["pg_schema", "private_server"]  # fixtures

PYTHON = sys.executable


def msg_id(n: int) -> str:
    """A caller-chosen message id (the pattern ids follow), the n-th of a test."""
    return f"msg-1800000000000-{n:09d}"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def drop(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- opening ----------------------------------------------------------------------------------


def test_a_url_opens_a_bus_in_its_schema_and_the_path_hides_the_password(pg_schema: str) -> None:
    connect().close()  # the server answers (else: fail under CI, skip elsewhere)
    url = URL.replace("postgres@", "postgres:secret@", 1)
    with sqlbus.connect(url, schema=pg_schema) as bus:
        assert "secret" not in bus.path and "***" in bus.path and pg_schema in bus.path
        alice, bob = bus.agent("alice"), bus.agent("bob")
        message_id = alice.publish("bob", "notification", {"n": 1})
        [delivery] = bob.receive(limit=5)
        assert delivery.message.id == message_id
        delivery.ack()
    with psycopg.connect(URL) as conn:
        rows = conn.execute(f'SELECT state FROM "{pg_schema}".message').fetchall()
    assert rows == [(2,)]  # acked, in the bus's own schema


@pytest.mark.parametrize(("target", "keywords", "message"), [
    ("/tmp/x.db", {"schema": "s"}, "only for a postgresql:// URL"),
    ("/tmp/x.db", {"pool_size": 3}, "only for a postgresql:// URL"),
    ("/tmp/x.db", {"connect_timeout": 1.0}, "only for a postgresql:// URL"),
    (URL, {"mode": 0o644}, "mode is for a database file"),
    (URL, {"schema": "Bad-Name"}, "schema must match"),
    (URL, {"pool_size": 0}, "pool_size must be an int >= 1"),
])
def test_keywords_of_the_other_backend_are_refused_before_anything_is_opened(
    target: str, keywords: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        sqlbus.connect(target, **keywords)  # type: ignore[arg-type]
    assert not os.path.exists("/tmp/x.db")


def test_without_the_extra_a_url_raises_an_import_error_naming_it() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "import sqlbus\n"
        "try:\n"
        f"    sqlbus.connect({URL!r})\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ImportError:" in out.stdout and "sqlbus[postgres]" in out.stdout, out.stderr


def test_a_server_that_does_not_answer_raises_database_error() -> None:
    with socket_nobody_listens_on() as port:
        with pytest.raises(DatabaseError, match="cannot connect"):
            sqlbus.connect(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=1.0)


class socket_nobody_listens_on:
    """A port that was free a moment ago (connections to it are refused)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        pass


# -- time -------------------------------------------------------------------------------------


def test_with_clock_none_times_are_the_servers_even_when_this_hosts_clock_is_an_hour_off(
    pg_schema: str,
) -> None:
    """A process whose time.time() runs an hour ahead still writes ids, timestamps and lease
    ends from the server's clock, so another host's receiver honours its leases."""
    connect().close()
    code = (
        "import time, json\n"
        "real = time.time\n"
        "time.time = lambda: real() + 3600.0  # this host's clock is an hour fast\n"
        "import sqlbus\n"
        f"bus = sqlbus.connect({URL!r}, schema={pg_schema!r})\n"
        "alice, bob = bus.agent('alice'), bus.agent('bob')\n"
        "alice.publish('bob', 'notification', {})\n"
        "[d] = bob.receive(lease=30)\n"
        "print(json.dumps({'lease_until': d.lease_until, 'timestamp': d.message.timestamp}))\n"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    seen = json.loads(out.stdout)
    with psycopg.connect(URL) as conn:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    server_now = float(row[0]) if row else 0.0
    assert abs(seen["lease_until"] - (server_now + 30)) < 20  # not an hour later
    assert seen["timestamp"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(server_now)))
    with sqlbus.connect(URL, schema=pg_schema) as bus:
        assert bus.agent("bob").receive(limit=5) == []  # the lease still holds


# -- the server restarts, connections die -----------------------------------------------------


def test_a_server_restarted_mid_run_loses_nothing_and_the_bus_recovers_by_itself(
    private_server,  # type: ignore[no-untyped-def]
) -> None:
    """Publishers and a waiting receiver keep going across a restart of the server (no new
    bus, no process restart). A publish that raised DatabaseError while the server was away
    is retried with the same id (idempotent), so nothing is lost or doubled."""
    url = private_server.url
    bus = sqlbus.connect(url, schema="bus", durability="full", connect_timeout=2.0)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    total = 300
    received: list[str] = []
    errors: list[str] = []
    done = threading.Event()

    def publish_all() -> None:
        for n in range(total):
            while True:
                try:
                    alice.publish("bob", "notification", {"n": n}, id=msg_id(n), ttl=0)
                    break
                except DatabaseError as exc:
                    errors.append(str(exc))
                    time.sleep(0.05)
            time.sleep(0.002)
        done.set()

    def receive_all() -> None:
        deadline = time.monotonic() + 120
        while len(received) < total and time.monotonic() < deadline:
            try:
                for delivery in bob.receive(limit=20, wait=1.0):
                    received.append(delivery.message.id)
                    delivery.ack()
            except DatabaseError as exc:
                errors.append(str(exc))
                time.sleep(0.05)

    threads = [threading.Thread(target=publish_all), threading.Thread(target=receive_all)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    private_server.restart(down_for=1.0)
    for thread in threads:
        thread.join(150)
    try:
        assert done.is_set()
        assert sorted(set(received)) == sorted(msg_id(n) for n in range(total))
        # an ack that broke with the server may deliver a message twice, never lose it
        assert len(received) - len(set(received)) <= 20
        assert errors, "the restart went unnoticed: the test did not test anything"
        assert all("sqlbus" not in e or "Traceback" not in e for e in errors)
        # after the restart the same bus works without a reconnect by hand
        alice.publish("bob", "notification", {"after": True})
        assert [d.message.payload for d in bob.receive(limit=5)] == [{"after": True}]
    finally:
        bus.close()


def test_connections_killed_by_the_server_are_replaced_and_writes_go_on(pg_schema: str) -> None:
    connect().close()
    with sqlbus.connect(URL, schema=pg_schema) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        for round_ in range(5):
            alice.publish("bob", "notification", {"round": round_})
            with psycopg.connect(URL, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()"
                    " AND query NOT LIKE 'LISTEN%%'", (f"sqlbus:{pg_schema}",)
                ).fetchone()
            assert killed and killed[0] >= 1
            alice.publish("bob", "notification", {"round": round_, "after": True})  # a write: new conn
        got: list[object] = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            try:
                for d in bob.receive(limit=10, wait=0.5):
                    got.append(d.message.payload)
                    d.ack()
            except DatabaseError:
                pass  # a read on a connection killed a moment ago: the next one is new
        assert len(got) == 10


# -- fork, and what a long-running process keeps ----------------------------------------------


def test_a_forked_child_opens_its_own_connections_and_the_parent_keeps_its_own(
    pg_schema: str,
) -> None:
    connect().close()
    with sqlbus.connect(URL, schema=pg_schema) as bus:
        alice = bus.agent("alice")
        alice.publish("bob", "notification", {"from": "parent, before"})
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            try:
                bob = bus.agent("bob")
                [d] = bob.receive(limit=5)
                d.ack()
                alice.publish("carol", "notification", {"from": "child"})
                bus.close()
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's pool is whole: the child neither used nor closed its connections
        alice.publish("bob", "notification", {"from": "parent, after"})
        carol, bob = bus.agent("carol"), bus.agent("bob")
        assert [d.message.payload for d in carol.receive()] == [{"from": "child"}]
        assert [d.message.payload for d in bob.receive()] == [{"from": "parent, after"}]


def test_buses_opened_and_closed_and_threads_that_end_leave_no_threads_or_descriptors(
    pg_schema: str,
) -> None:
    connect().close()

    def cycle() -> None:
        with sqlbus.connect(URL, schema=pg_schema, pool_size=2) as bus:
            bob = bus.agent("bob")
            bus.agent("alice").publish("bob", "notification", {})
            for d in bob.receive(limit=5, wait=0.01):  # a wait starts the listener
                d.ack()

    cycle()
    time.sleep(0.2)
    threads, fds = threading.active_count(), open_fds()
    for _ in range(60):
        cycle()
    with sqlbus.connect(URL, schema=pg_schema, pool_size=2) as bus:
        alice = bus.agent("alice")
        for _ in range(100):  # a thread per call, each ending
            worker = threading.Thread(target=alice.publish, args=("bob", "notification", {}))
            worker.start()
            worker.join()
    time.sleep(1.5)  # the pool's and listener's threads end after close
    assert threading.active_count() <= threads + 1
    assert open_fds() <= fds + 2


def test_a_claim_skips_rows_another_transaction_has_locked_instead_of_waiting(
    pg_schema: str,
) -> None:
    """FOR UPDATE SKIP LOCKED: receivers of one inbox never wait on each other. Rows locked by
    another transaction are passed over at once (a wait would run into lock_timeout)."""
    connect().close()
    with sqlbus.connect(URL, schema=pg_schema, busy_timeout=1.0) as bus:
        boss, bob = bus.agent("boss"), bus.agent("bob")
        boss.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}}
                           for n in range(10)])
        with psycopg.connect(URL, autocommit=True) as other:
            with other.transaction():
                locked = other.execute(
                    f'SELECT seq FROM "{pg_schema}".message WHERE agent = %s'
                    " ORDER BY seq LIMIT 5 FOR UPDATE", ("bob",)).fetchall()
                assert len(locked) == 5
                got = [d.message.payload["n"] for d in bob.receive(limit=10)]
            assert got == [5, 6, 7, 8, 9]
        rest = [d.message.payload["n"] for d in bob.receive(limit=10)]
        assert rest == [0, 1, 2, 3, 4]


def test_a_waiting_receive_and_request_look_again_only_every_half_second_not_in_a_loop(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiter sleeps on the listener between looks (at most every FALLBACK = 0.5 s), not in a
    loop of reads: the change token on PostgreSQL is the wake-up's, read before each look."""
    connect().close()
    with sqlbus.connect(URL, schema=pg_schema) as bus:
        bob, alice = bus.agent("bob"), bus.agent("alice")
        storage = bus.engine.storage
        calls = {"look": 0, "find_response": 0, "claim": 0}
        for name in calls:
            real = getattr(storage, name)

            def counting(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
                calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(storage, name, counting)
        assert bob.receive(wait=1.5) == []
        assert calls["look"] + calls["claim"] <= 8
        with pytest.raises(sqlbus.RequestTimeoutError):
            alice.request("bob", {"q": 1}, timeout=1.5)
        assert calls["find_response"] <= 8
