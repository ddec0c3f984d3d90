"""The figures of the PostgreSQL backend on the real server (issue 15, in progress): depths by
status as a claim would see the rows, what was acked and sent, dead letters by reason, and the
checks of a damaged bus."""

from __future__ import annotations

from postgres_server import pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres import connection, queue, stats

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
LEASE = 30_000


def send(conn, schema, to, n=1, *, now=NOW, visible=None, **headers):  # type: ignore[no-untyped-def]
    out = [prepare("alice", to, "notification", {"n": i}, now_ms=now, **headers) for i in range(n)]
    with conn.transaction():
        queue.publish(conn, schema, out, [visible or now] * n, now)
    return out


def claim(conn, schema, agent="bob", limit=1, now=NOW):  # type: ignore[no-untyped-def]
    with conn.transaction():
        return queue.claim(conn, schema, agent, now, now + LEASE, limit)[0]


def test_depth_rows_count_each_row_once_in_the_status_a_claim_would_see(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 2, now=NOW - 500)  # ready, the older sent_at
    send(conn, schema, "bob", priority=5)  # leased below
    [leased] = claim(conn, schema)
    send(conn, schema, "bob", priority=5)
    [retried] = claim(conn, schema)
    with conn.transaction():
        queue.retry(conn, schema, retried[0], retried[1], NOW + 9_000, "E: x")
    send(conn, schema, "bob", visible=NOW + 9_000)  # scheduled
    send(conn, schema, "bob", ttl=10)  # expired at NOW + 100
    send(conn, schema, "carol", priority=5)
    [dead] = claim(conn, schema, "carol")
    with conn.transaction():
        queue.dead_letter(conn, schema, dead[0], dead[1], NOW, "discarded")
    bob, carol = stats.depth_rows(conn, schema, NOW + 100)
    assert bob == ("bob", 2, 1, 1, 1, 1, 0, NOW - 500)
    assert carol == ("carol", 0, 0, 0, 0, 0, 1, None)
    # When the lease ran out, the leased row is ready again, and so are the retry and the
    # delayed one (due); the first two expired (sent at NOW - 500, a ttl of 30 s).
    [bob] = [d for d in stats.depth_rows(conn, schema, NOW + LEASE) if d.agent == "bob"]
    assert (bob.ready, bob.leased, bob.retrying, bob.scheduled, bob.expired) == (3, 0, 0, 0, 3)
    assert stats.expired_leases(conn, schema, NOW + LEASE) == 1
    assert stats.expired_leases(conn, schema, NOW) == 0
    assert stats.dead_reason_rows(conn, schema) == [("discarded", 1)]


def test_acked_and_sent_rows_count_messages_once_however_many_recipients(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol"])
    send(conn, schema, "bob")
    rows = claim(conn, schema, "bob", limit=10)
    with conn.transaction():
        assert queue.ack(conn, schema, [(rows[0][0], rows[0][1])], NOW + 100)
        assert queue.ack(conn, schema, [(rows[1][0], rows[1][1])], NOW + 900)
    [bob] = stats.acked_rows(conn, schema, NOW + 1_500)
    assert bob == ("bob", 2, 1_000, 1, 2)  # 100 + 900 ms; one acked in the last second
    assert type(bob.delivery_ms) is int
    assert stats.sent_rows(conn, schema) == [("alice", 2)]
    with conn.transaction():
        queue.count_error(conn, schema, "ValueError")
        queue.count_error(conn, schema, "KeyError")
    assert stats.error_count_rows(conn, schema) == [("KeyError", 1), ("ValueError", 1)]


def test_a_healthy_bus_checks_ok_and_damage_is_named(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol"])
    send(conn, schema, "bob")
    assert connection.integrity_check(conn, schema) == ["ok"]
    assert stats.rows_without_body(conn, schema) == 0
    # Damage that only SQL run around sqlbus's rules can do: a body gone under its rows, a
    # dead row without its record.
    conn.execute("SET session_replication_role = replica")  # no triggers, no foreign keys
    try:
        conn.execute(f'DELETE FROM "{schema}".message_body')
        conn.execute(f'UPDATE "{schema}".message SET state = 3, done_at = 1 WHERE body_id IS NULL')
    finally:
        conn.execute("SET session_replication_role = origin")
    problems = connection.integrity_check(conn, schema)
    assert problems == ["2 message rows whose shared body is missing (message_body)",
                        "1 dead message rows without a dead-letter record"]
    assert connection.integrity_check(conn, schema, max_errors=1) == problems[:1]
    assert stats.rows_without_body(conn, schema) == 2


def test_schema_marks_are_the_application_and_version_sqlbus_meta_holds(pg_bus) -> None:
    conn, schema = pg_bus
    assert connection.schema_marks(conn, schema) == (connection.APPLICATION_ID, 1)
    conn.execute(f"UPDATE \"{schema}\".sqlbus_meta SET value = 'other' WHERE key = 'application'")
    assert connection.schema_marks(conn, schema) == (0, 1)
