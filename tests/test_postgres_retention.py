"""Retention and upkeep verbs of the PostgreSQL backend on the real server (issue 15, in
progress): pruning deletes only what the policy says, folds it into the counters so totals
never go down, releases shared bodies, and keeps the state log's head."""

from __future__ import annotations

import threading

from postgres_server import connect, pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres import queue, retention, state, stats

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
LEASE = 30_000


def send(conn, schema, to, n=1, *, now=NOW, **headers):  # type: ignore[no-untyped-def]
    out = [prepare("alice", to, "notification", {"n": i}, now_ms=now, **headers) for i in range(n)]
    with conn.transaction():
        queue.publish(conn, schema, out, [now] * n, now)
    return out


def settle(conn, schema, agent="bob", *, now=NOW, acked_at=None, limit=100):  # type: ignore[no-untyped-def]
    """Claim ``agent``'s ready rows at ``now`` and ack them at ``acked_at``."""
    with conn.transaction():
        rows, _ = queue.claim(conn, schema, agent, now, now + LEASE, limit)
        assert queue.ack(conn, schema, [(r[0], r[1]) for r in rows], acked_at or now)
    return rows


def count(conn, schema, table, where="true"):  # type: ignore[no-untyped-def]
    return conn.execute(f'SELECT count(*) FROM "{schema}".{table} WHERE {where}').fetchone()[0]


def totals(conn, schema):  # type: ignore[no-untyped-def]
    return {(r.name, r.agent): r.value for r in stats.read_counters(conn, schema)}


def test_the_policy_is_stored_and_read_back(pg_bus) -> None:
    conn, schema = pg_bus
    assert retention.get_retention(conn, schema) == (7 * 86_400_000, 30 * 86_400_000, 1_000_000)
    retention.set_retention(conn, schema, None, 5, 10)
    assert retention.get_retention(conn, schema) == (None, 5, 10)


def test_prune_acked_deletes_only_rows_acked_before_the_cutoff_and_keeps_totals(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 3)
    settle(conn, schema, acked_at=NOW + 100)  # three old acked rows
    send(conn, schema, "bob", 2, now=NOW + 5_000)  # pending: never pruned
    send(conn, schema, "carol", now=NOW + 5_000)
    settle(conn, schema, "carol", now=NOW + 5_000, acked_at=NOW + 6_000)  # acked after the cutoff
    cutoff = NOW + 1_000
    assert retention.count_prunable(conn, schema, cutoff, None) == (3, 0)
    with conn.transaction():
        first = retention.prune_acked(conn, schema, cutoff, 2)
        second = retention.prune_acked(conn, schema, cutoff, 2, after=first.last_seq)
        third = retention.prune_acked(conn, schema, cutoff, 2, after=second.last_seq)
    assert (first.deleted, second.deleted, third.deleted) == (2, 1, 0)
    assert count(conn, schema, "message") == 3
    assert count(conn, schema, "message", "agent = 'carol' AND state = 2") == 1
    assert totals(conn, schema) == {("received", "bob"): 3, ("delivery_ms", "bob"): 300,
                                    ("sent", "alice"): 3}
    [acked] = stats.acked_rows(conn, schema, NOW + 6_000)  # the rows left are still counted
    assert (acked.agent, acked.acked, acked.delivery_ms) == ("carol", 1, 1_000)


def test_the_archive_above_its_maximum_loses_its_oldest_acked_rows(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 5)
    settle(conn, schema)
    send(conn, schema, "bob")  # pending
    assert retention.archive_excess(conn, schema, 10) == 0
    assert retention.archive_excess(conn, schema, 2) == 3
    with conn.transaction():
        pruned = retention.prune_oldest_acked(conn, schema, 3)
    assert pruned.deleted == 3
    kept = conn.execute(f'SELECT state FROM "{schema}".message ORDER BY seq').fetchall()
    assert kept == [(2,), (2,), (0,)]
    assert retention.archive_excess(conn, schema, 2) == 0


def test_a_shared_body_goes_with_its_last_row_only(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol"])
    settle(conn, schema, "bob")
    with conn.transaction():
        assert retention.prune_oldest_acked(conn, schema, 10).deleted == 1
    assert count(conn, schema, "message_body") == 1  # carol's row still needs it
    settle(conn, schema, "carol")
    with conn.transaction():
        retention.prune_oldest_acked(conn, schema, 10)
    assert count(conn, schema, "message_body") == 0
    assert totals(conn, schema)[("sent", "alice")] == 1  # one message, counted once


def test_prune_dead_deletes_old_dead_letters_and_counts_the_expired_ones(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 2, ttl=1_000)
    send(conn, schema, "bob", now=NOW + 50_000)
    expired = retention.expired_rows(conn, schema, NOW + 2_000, 10)
    assert len(expired) == 2 and retention.count_expired(conn, schema, NOW + 2_000) == 2
    with conn.transaction():
        assert retention.dead_letter_expired(conn, schema, expired, NOW + 2_000) == 2
        assert retention.dead_letter_expired(conn, schema, expired, NOW + 2_000) == 0
    failed = conn.execute(f'SELECT DISTINCT failed_at, reason FROM "{schema}".dead_letter')
    assert failed.fetchall() == [(NOW + 1_000, "expired")]  # when they expired
    assert retention.count_prunable(conn, schema, None, NOW + 1_001) == (0, 2)
    with conn.transaction():
        assert retention.prune_dead(conn, schema, NOW + 1_000, 10) == 0  # not before the cutoff
        assert retention.prune_dead(conn, schema, NOW + 1_001, 1) == 1
        assert retention.prune_dead(conn, schema, NOW + 1_001, 10) == 1
    assert count(conn, schema, "message") == 1
    assert totals(conn, schema) == {("dead", "bob"): 2, ("expired", "bob"): 2,
                                    ("sent", "alice"): 2}


def test_expired_rows_skip_a_running_lease_but_take_one_that_ran_out(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", ttl=1_000)
    with conn.transaction():
        [row], _ = queue.claim(conn, schema, "bob", NOW, NOW + 5_000, 1)
    assert retention.expired_rows(conn, schema, NOW + 2_000, 10) == []  # its holder may ack
    assert retention.expired_rows(conn, schema, NOW + 6_000, 10) == [row[0]]
    assert retention.expired_rows(conn, schema, NOW + 6_000, 0) == []


def test_pruning_the_state_log_keeps_its_newest_entry_and_recent_ones(pg_bus) -> None:
    conn, schema = pg_bus
    for version, at in ((1, 100), (2, 200), (3, 300)):
        with conn.transaction():
            state.put_state(conn, schema, "k", b"1", version, False, None, at)
    with conn.transaction():
        assert retention.prune_state_log(conn, schema, 250, 1) == 1  # the oldest only
        assert retention.prune_state_log(conn, schema, 10_000, 10) == 1  # never the newest
    assert [c.version for c in state.state_log_after(conn, schema, "", 0)] == [3]
    assert state.state_snapshot(conn, schema, "")[1] == 3  # the head stays where it was


def test_two_transactions_deleting_a_body_s_last_rows_at_once_free_it(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol"])
    seqs = [row[0] for row in conn.execute(f'SELECT seq FROM "{schema}".message ORDER BY seq')]
    other = connect()
    done = threading.Event()

    def delete_the_other() -> None:
        with other.transaction():
            other.execute(f'DELETE FROM "{schema}".message WHERE seq = %s', (seqs[1],))
        done.set()

    try:
        with conn.transaction():
            conn.execute(f'DELETE FROM "{schema}".message WHERE seq = %s', (seqs[0],))
            thread = threading.Thread(target=delete_the_other)
            thread.start()
            assert not done.wait(0.3)  # it waits for this one's lock on the body
        thread.join(10)
        assert done.is_set()
    finally:
        other.close()
    assert count(conn, schema, "message") == 0
    assert count(conn, schema, "message_body") == 0
