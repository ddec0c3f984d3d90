"""The queue verbs of the PostgreSQL backend on the real server (issue 15, in progress): the
same states and (seq, claims) fencing as SQLite, and claims that never wait on each other."""

from __future__ import annotations

import pytest
from postgres_server import connect, pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres import queue

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
LEASE = 30_000



def send(conn, schema, to, n=1, *, priority=3, **headers):  # type: ignore[no-untyped-def]
    out = [prepare("alice", to, "notification", {"n": i}, now_ms=NOW, priority=priority,
                   **headers) for i in range(n)]
    with conn.transaction():
        written = queue.publish(conn, schema, out, [NOW] * n, NOW)
    return [o.id for o, ok in zip(out, written, strict=True) if ok]


def claim(conn, schema, agent="bob", limit=10, now=NOW, **kw):  # type: ignore[no-untyped-def]
    with conn.transaction():
        rows, _more = queue.claim(conn, schema, agent, now, now + LEASE, limit, **kw)
    return rows


def state_of(conn, schema, seq):  # type: ignore[no-untyped-def]
    return conn.execute(f'SELECT state, attempts, claims FROM "{schema}".message WHERE seq = %s',
                        (seq,)).fetchone()


def test_a_claim_takes_the_highest_priority_first_then_publish_order_and_leases_it(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 2, priority=3)
    send(conn, schema, "bob", 1, priority=5)
    rows = claim(conn, schema)
    assert [row[3] for row in rows] == [5, 3, 3]
    assert rows[1][0] < rows[2][0]
    assert [(row[1], row[2]) for row in rows] == [(1, 1)] * 3  # claims, attempts
    assert state_of(conn, schema, rows[0][0]) == (1, 1, 1)
    assert claim(conn, schema) == []  # all leased


def test_two_receivers_of_one_inbox_never_wait_on_each_other(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 4)
    other = connect()
    try:
        other.execute("SET lock_timeout = '1s'")  # a wait for a lock would fail the test
        with conn.transaction():
            mine, _ = queue.claim(conn, schema, "bob", NOW, NOW + LEASE, 2)
            with other.transaction():  # while the first claim's locks are held
                theirs, _ = queue.claim(other, schema, "bob", NOW, NOW + LEASE, 10)
        assert len(mine) == 2 and len(theirs) == 2
        assert {row[0] for row in mine}.isdisjoint(row[0] for row in theirs)
    finally:
        other.close()


def test_an_ack_is_fenced_by_its_claim(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    [row] = claim(conn, schema)
    seq, claims = row[0], row[1]
    later = NOW + LEASE + 1  # the lease ran out: the next claim takes it again
    [again] = claim(conn, schema, now=later)
    assert again[0] == seq and again[1] == claims + 1 and again[2] == 2
    with conn.transaction():
        assert not queue.ack(conn, schema, [(seq, claims)], later)  # the stale lease
        assert queue.ack(conn, schema, [(seq, again[1])], later)
        assert queue.acked_now(conn, schema, seq, again[1], later)
    assert state_of(conn, schema, seq)[0] == queue.ACKED


def test_a_batch_ack_with_one_lost_lease_reports_it(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 2)
    rows = claim(conn, schema)
    with pytest.raises(RuntimeError), conn.transaction():
        if not queue.ack(conn, schema, [(rows[0][0], rows[0][1]), (rows[1][0], 99)], NOW):
            raise RuntimeError("lease lost: roll back")
    assert [state_of(conn, schema, row[0])[0] for row in rows] == [queue.LEASED] * 2


def test_a_message_to_many_keeps_its_body_once_and_each_recipient_reads_it(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol", "dave"])
    assert conn.execute(f'SELECT count(*) FROM "{schema}".message_body').fetchone() == (1,)
    bodies = [claim(conn, schema, agent)[0][6] for agent in ("bob", "carol", "dave")]
    assert len(set(bodies)) == 1 and b'"n":0' in bodies[0]


def test_a_body_above_the_readers_limit_is_not_loaded(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    [row] = claim(conn, schema, max_body=10)
    assert row[6] is None


def test_a_caller_chosen_id_publishes_once(pg_bus) -> None:
    conn, schema = pg_bus
    assert len(send(conn, schema, "bob", id="msg-1800000000000-abcdefghi")) == 1
    assert send(conn, schema, "bob", id="msg-1800000000000-abcdefghi") == []
    assert len(claim(conn, schema)) == 1


def test_release_retry_and_dead_letter_settle_a_held_lease(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 3)
    a, b, c = claim(conn, schema)
    with conn.transaction():
        assert queue.release(conn, schema, a[0], a[1], NOW, attempted=False)
        assert queue.retry(conn, schema, b[0], b[1], NOW + 5_000, "ValueError: no")
        assert queue.dead_letter(conn, schema, c[0], c[1], NOW, "discarded")
        assert not queue.dead_letter(conn, schema, c[0], c[1], NOW, "again")  # settled
        queue.count_error(conn, schema, "ValueError")
        queue.count_error(conn, schema, "ValueError")
    assert state_of(conn, schema, a[0]) == (queue.QUEUED, 0, 1)  # the attempt taken back
    assert state_of(conn, schema, b[0])[0] == queue.SCHEDULED
    assert state_of(conn, schema, c[0])[0] == queue.DEAD
    assert queue.next_due(conn, schema, "bob") == NOW + 5_000
    assert [row[0] for row in claim(conn, schema)] == [a[0]]  # the retry is not due yet
    assert [row[0] for row in claim(conn, schema, now=NOW + 5_000)] == [b[0]]
    reason = conn.execute(f'SELECT reason FROM "{schema}".dead_letter WHERE seq = %s', (c[0],))
    assert reason.fetchone() == ("discarded",)
    assert conn.execute(f'SELECT count FROM "{schema}".error_counts').fetchone() == (2,)


def test_extend_moves_only_a_held_lease(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    [row] = claim(conn, schema)
    with conn.transaction():
        assert queue.extend(conn, schema, row[0], row[1], NOW + 99_000)
        assert not queue.extend(conn, schema, row[0], row[1] + 1, NOW + 99_000)
    assert queue.next_due(conn, schema, "bob") == NOW + 99_000


def test_claims_filter_by_type_and_leave_awaited_responses_alone(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    response = prepare("carol", "bob", "response", {"success": True, "data": 1, "request_id": "r"},
                       now_ms=NOW, correlation_id="req-1")
    with conn.transaction():
        queue.publish(conn, schema, [response], [NOW], NOW)
    assert [row[0] for row in claim(conn, schema, types=["response"], skip=["req-1"])] == []
    assert len(claim(conn, schema, types=["response"])) == 1


def test_a_plain_batch_is_queued_in_order_with_its_ttl_and_claimed_like_any_row(pg_bus) -> None:
    conn, schema = pg_bus
    runs = [("bob", "notification", 3, 5_000, ["m-1", "m-2"], [b'{"n":1}', b'{"n":2}']),
            ("carol", "task", 5, 0, ["m-3"], [b'{"n":3}'])]
    with conn.transaction():
        queue.publish_plain(conn, schema, "alice", runs, NOW)
    rows = conn.execute(f'SELECT message_id, agent, priority, state, expires_at, sent_at, body '
                        f'FROM "{schema}".message ORDER BY seq').fetchall()
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("m-1", "bob", 3, 0, NOW + 5_000), ("m-2", "bob", 3, 0, NOW + 5_000),
        ("m-3", "carol", 5, 0, None)]
    assert [r[6] for r in rows] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert [row[6] for row in claim(conn, schema)] == [b'{"n":1}', b'{"n":2}']


def test_a_look_sees_work_and_the_next_due_time_and_its_token_moves_with_a_commit(pg_bus) -> None:
    conn, schema = pg_bus
    token, work, due = queue.look(conn, schema, "bob", NOW)
    assert (work, due) == (False, None)
    other = connect()
    try:  # a commit on another connection changes the token
        with other.transaction():
            queue.publish(other, schema, [prepare("alice", "bob", "notification", {}, now_ms=NOW)],
                          [NOW + 5_000], NOW)  # delayed: not work yet
    finally:
        other.close()
    token2, work, due = queue.look(conn, schema, "bob", NOW)
    assert token2 != token and (work, due) == (False, NOW + 5_000)
    assert queue.look(conn, schema, "bob", NOW + 5_000)[1:] == (True, NOW + 5_000)
    send(conn, schema, "bob")
    assert queue.look(conn, schema, "bob", NOW)[1] is True
    assert queue.look(conn, schema, "bob", NOW, types=["task"])[1] is False
    with conn.transaction():
        assert queue.wait_point(conn, schema, "bob")[1] == NOW + 5_000
        assert queue.wait_point(conn, schema, "nobody")[1] is None


def test_a_look_leaves_awaited_responses_to_their_requester(pg_bus) -> None:
    conn, schema = pg_bus
    response = prepare("carol", "bob", "response", {"success": True, "data": 1, "request_id": "r"},
                       now_ms=NOW, correlation_id="req-1")
    with conn.transaction():
        queue.publish(conn, schema, [response], [NOW], NOW)
    assert queue.look(conn, schema, "bob", NOW, skip=["req-1"])[1] is False
    assert queue.look(conn, schema, "bob", NOW, skip=["req-2"])[1] is True


def test_the_last_error_and_body_length_of_a_row_inline_or_shared(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    send(conn, schema, ["carol", "dave"])
    a, = claim(conn, schema)
    with conn.transaction():
        assert queue.retry(conn, schema, a[0], a[1], NOW + 1, "ValueError: no")
    assert queue.last_error(conn, schema, a[0]) == "ValueError: no"
    assert queue.last_error(conn, schema, 999) is None
    lengths = conn.execute(
        f'SELECT seq, octet_length(coalesce(m.body, b.body)) FROM "{schema}".message AS m '
        f'LEFT JOIN "{schema}".message_body AS b ON b.id = m.body_id ORDER BY seq').fetchall()
    assert all(queue.body_length(conn, schema, seq) == n > 0 for seq, n in lengths)
    assert queue.body_length(conn, schema, 999) == 0
