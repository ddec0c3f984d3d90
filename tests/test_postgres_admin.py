"""Dead letters, the sent archive, peek and tail of the PostgreSQL backend on the real server
(issue 15, in progress), as the SQLite backend keeps them; and a tail that never steps over a
row a still-running transaction holds."""

from __future__ import annotations

import threading
import time

from postgres_server import connect, pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres import admin, queue, retention

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
LEASE = 30_000


def send(conn, schema, to, n=1, *, now=NOW, visible=None, **headers):  # type: ignore[no-untyped-def]
    out = [prepare("alice", to, "notification", {"n": i}, now_ms=now, **headers) for i in range(n)]
    with conn.transaction():
        queue.publish(conn, schema, out, [visible or now] * n, now)
    return out


def claim(conn, schema, agent="bob", limit=10, now=NOW):  # type: ignore[no-untyped-def]
    with conn.transaction():
        return queue.claim(conn, schema, agent, now, now + LEASE, limit)[0]


def kill(conn, schema, agent="bob", reason="handler_error", now=NOW):  # type: ignore[no-untyped-def]
    rows = claim(conn, schema, agent, now=now)
    with conn.transaction():
        for row in rows:
            assert queue.dead_letter(conn, schema, row[0], row[1], now, reason, "ValueError",
                                     "bad", "Traceback ...", '{"k": 1}')
    return rows


def counters(conn, schema):  # type: ignore[no-untyped-def]
    return {(r.name, r.agent): r.value for r in retention_rows(conn, schema)}


def retention_rows(conn, schema):  # type: ignore[no-untyped-def]
    from sqlbus.postgres import stats
    return stats.read_counters(conn, schema)


def test_dead_letters_list_newest_first_with_their_message_and_a_body_limit(pg_bus) -> None:
    conn, schema = pg_bus
    [sent] = send(conn, schema, "bob")
    send(conn, schema, "carol")
    kill(conn, schema, "bob")
    kill(conn, schema, "carol", reason="expired")
    both = admin.list_dead_letters(conn, schema, None, 10)
    assert [d.agent for d in both] == ["carol", "bob"]
    [bob] = admin.list_dead_letters(conn, schema, "bob", 10)
    assert (bob.reason, bob.error_name, bob.error_message, bob.context, bob.attempts) == (
        "handler_error", "ValueError", "bad", '{"k": 1}', 1)
    assert (bob.body, bob.message_id, bob.sender, bob.length) == (
        sent.body, sent.id, "alice", len(sent.body))
    assert admin.list_dead_letters(conn, schema, None, 1) == both[:1]
    assert admin.get_dead_letter(conn, schema, bob.id, max_body=10).body is None  # type: ignore[union-attr]
    assert admin.get_dead_letter(conn, schema, None, sent.id) == bob
    assert admin.get_dead_letter(conn, schema, 999) is None


def test_a_requeued_dead_letter_is_claimed_again_and_still_counted_as_dead(pg_bus) -> None:
    conn, schema = pg_bus
    [sent] = send(conn, schema, "bob", ttl=45_000)
    [row] = kill(conn, schema, reason="expired")
    [target] = admin.requeue_targets(conn, schema, None, sent.id)
    assert target.message_id == sent.id and target.ttl == 45_000  # read from the stored body
    assert admin.requeue_targets(conn, schema, target.id, None) == [target]
    with conn.transaction():
        assert admin.requeue(conn, schema, target.id, NOW + 100, target.ttl)
        assert not admin.requeue(conn, schema, target.id, NOW + 100, target.ttl)  # gone
    assert admin.list_dead_letters(conn, schema, None, 10) == []
    [again] = claim(conn, schema, now=NOW + 100)
    assert again[0] == row[0] and again[2] == 1  # attempts reset: this is the first again
    assert again[4] == NOW + 100 + 45_000  # the ttl counts from the requeue
    assert counters(conn, schema) == {("dead", "bob"): 1, ("expired", "bob"): 1}


def test_requeue_targets_of_a_shared_body_and_of_a_body_that_is_not_json(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, ["bob", "carol"], ttl=9_000)
    kill(conn, schema, "bob")
    kill(conn, schema, "carol", reason="corrupt")
    send(conn, schema, "dave")
    conn.execute(f'UPDATE "{schema}".message SET body = %s WHERE agent = %s', (b"\xff{", "dave"))
    kill(conn, schema, "dave", reason="corrupt")
    assert [t.ttl for t in admin.dead_letter_ids(conn, schema, None, None)] == [9_000, 9_000, None]
    assert [t.ttl for t in admin.dead_letter_ids(conn, schema, None, "corrupt")] == [9_000, None]
    assert [t.ttl for t in admin.dead_letter_ids(conn, schema, "bob", None)] == [9_000]
    assert admin.dead_letter_ids(conn, schema, "bob", "corrupt") == []


def test_purge_deletes_only_older_dead_letters_and_their_rows_and_folds_the_counts(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob", 2)
    kill(conn, schema, now=NOW)
    send(conn, schema, "bob", now=NOW + 10_000)
    kill(conn, schema, now=NOW + 10_000)
    with conn.transaction():
        assert admin.purge_dead_letters(conn, schema, NOW + 5_000) == 2
    assert len(admin.list_dead_letters(conn, schema, None, 10)) == 1
    assert conn.execute(f'SELECT count(*) FROM "{schema}".message').fetchone() == (1,)
    assert counters(conn, schema) == {("dead", "bob"): 2, ("sent", "alice"): 2}
    with conn.transaction():
        assert admin.purge_dead_letters(conn, schema, None) == 1
    assert conn.execute(f'SELECT count(*) FROM "{schema}".message').fetchone() == (0,)


def test_the_sent_archive_lists_messages_once_newest_first_with_every_recipient(pg_bus) -> None:
    conn, schema = pg_bus
    [one] = send(conn, schema, ["bob", "carol"])
    [two] = send(conn, schema, "dave")
    out = prepare("zed", "bob", "heartbeat", {}, now_ms=NOW)
    with conn.transaction():
        queue.publish(conn, schema, [out], [NOW], NOW)
    listed = admin.list_sent(conn, schema, None, 10)
    assert [(s.message_id, s.recipients) for s in listed] == [
        (out.id, ["bob"]), (two.id, ["dave"]), (one.id, ["bob", "carol"])]
    assert listed[2].body == one.body and listed[2].length == len(one.body)
    assert [s.message_id for s in admin.list_sent(conn, schema, "carol", 10)] == [one.id]
    assert [s.message_id for s in admin.list_sent(conn, schema, "bob", 1)] == [out.id]
    assert [s.message_id for s in admin.list_sent(conn, schema, "zed", 10)] == [out.id]
    assert admin.list_sent(conn, schema, None, 10, max_body=5)[0].body is None


def test_peek_shows_ready_rows_in_claim_order_then_waiting_then_expired(pg_bus) -> None:
    conn, schema = pg_bus
    low = send(conn, schema, "bob", priority=1)
    high = send(conn, schema, "bob", priority=5)
    later = send(conn, schema, "bob", visible=NOW + 5_000)
    leased = send(conn, schema, "bob", priority=2)
    with conn.transaction():  # two claims of one: the priority-5 row, then the priority-2 one
        queue.claim(conn, schema, "bob", NOW, NOW + LEASE, 1)
        queue.claim(conn, schema, "bob", NOW, NOW + LEASE, 1)
    short = send(conn, schema, "bob", ttl=10, priority=1)
    now = NOW + 1_000
    rows = admin.peek_rows(conn, schema, "bob", now, 10)
    assert [(r.status, r.message_id) for r in rows] == [
        ("ready", low[0].id), ("scheduled", later[0].id), ("leased", high[0].id),
        ("leased", leased[0].id), ("expired", short[0].id)]
    assert rows[1].visible_at == NOW + 5_000 and rows[2].attempts == 1
    assert [r.message_id for r in admin.peek_rows(conn, schema, "bob", now, 2)] == [
        low[0].id, later[0].id]
    assert admin.peek_rows(conn, schema, "bob", now, 1, max_body=3)[0].body is None
    assert admin.peek_rows(conn, schema, "nobody", now, 10) == []


def settled_rows_after(conn, schema, start, count, limit=10):  # type: ignore[no-untyped-def]
    """rows_after once ``count`` rows show: a transaction running anywhere on the server (the
    other tests') holds a tail back until it ends."""
    deadline = time.monotonic() + 10
    while len(rows := admin.rows_after(conn, schema, start, limit)) < min(count, 2 * limit):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return rows


def test_a_tail_reads_rows_after_its_position_a_message_s_rows_together(pg_bus) -> None:
    conn, schema = pg_bus
    send(conn, schema, "bob")
    settled_rows_after(conn, schema, 0, 1)
    start = admin.last_seq(conn, schema)
    [fan] = send(conn, schema, ["carol", "dave"])
    [nobody] = send(conn, schema, [], broadcast_pattern="*")
    rows = settled_rows_after(conn, schema, start, 3)
    assert [(r.agent, r.message_id) for r in rows] == [
        ("carol", fan.id), ("dave", fan.id), (None, nobody.id)]
    assert rows[0][2:] == rows[1][2:] and rows[0].body == fan.body
    assert [r.seq for r in admin.rows_after(conn, schema, start, 2)] == [r.seq for r in rows[:2]]
    assert admin.rows_after(conn, schema, start, 10, max_body=3)[0].body is None
    assert rows[0].seq == rows[1].seq < rows[2].seq  # positions: the writing transactions
    assert len(settled_rows_after(conn, schema, start, 3, limit=1)) == 2  # fan's, whole


def test_a_tail_waits_behind_a_running_writer_instead_of_stepping_over_its_row(pg_bus) -> None:
    conn, schema = pg_bus
    start = admin.last_seq(conn, schema)
    slow, fast = connect(), connect()
    try:
        slow.execute("BEGIN")
        [late] = [prepare("alice", "bob", "notification", {"n": 1}, now_ms=NOW)]
        queue.publish(slow, schema, [late], [NOW], NOW)  # takes the smaller seq
        send(fast, schema, "bob")  # a larger seq, committed first
        assert admin.rows_after(conn, schema, start, 10) == []  # held back: slow still runs
        slow.execute("COMMIT")
    finally:
        slow.close()
        fast.close()
    # Any transaction running anywhere on the server holds the tail back too (other tests'):
    # look again for a while.
    deadline = time.monotonic() + 10
    while len(rows := admin.rows_after(conn, schema, start, 10)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rows) == 2 and rows[0].message_id == late.id


def test_retention_and_requeue_share_the_counters(pg_bus) -> None:
    conn, schema = pg_bus
    with conn.transaction():
        retention.add_counters(conn, schema, [("late_responses", "bob", 2), ("x", "", 0)])
        retention.add_counters(conn, schema, [("late_responses", "bob", 3),
                                              ("late_responses", "bob", 1)])
    assert counters(conn, schema) == {("late_responses", "bob"): 6}


def test_a_tail_reading_while_one_message_publishers_race_sees_every_row_once(pg_bus) -> None:
    conn, schema = pg_bus
    writers, each = 3, 60
    start = threading.Barrier(writers)

    def publish(w: int) -> None:
        with connect() as mine:
            start.wait()
            for _ in range(each):
                send(mine, schema, "bob")  # one row, one statement: the case the rule covers

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    seen: list[int] = []
    cursor = 0
    # Read until every row came; a row the cursor stepped over would never come. Rows can be
    # held back a moment after the publishers end: any transaction on the server holding an
    # older transaction id (autovacuum's analyze) holds the tail back until it ends.
    deadline = time.monotonic() + 30
    while len(seen) < writers * each and time.monotonic() < deadline:
        rows = admin.rows_after(conn, schema, cursor, 50)
        for row in rows:
            cursor = row.seq
            seen.append(row.message_id)
        if not rows:
            time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert len(seen) == len(set(seen)) == writers * each


def test_a_tail_does_not_pass_over_a_row_an_older_transaction_inserts_after_it(pg_bus) -> None:
    """A transaction that wrote before a newer one drew its seq inserts after it: a tail that
    followed seqs would step over the newer one's row; positions by transaction do not."""
    conn, schema = pg_bus
    older, slow = connect(), connect()
    try:
        older.execute("BEGIN")
        send_in(older, schema)  # the older transaction's id is taken here
        slow.execute("BEGIN")
        [late] = send_in(slow, schema)  # a newer transaction draws the next seq ...
        send_in(older, schema)  # ... and the older one a later seq, then commits
        older.execute("COMMIT")
        seen = settled_rows_after(conn, schema, 0, 2)
        slow.execute("COMMIT")
        seen += settled_rows_after(conn, schema, seen[-1].seq, 1)
    finally:
        older.close()
        slow.close()
    assert late.id in [row.message_id for row in seen] and len(seen) == 3


def send_in(conn, schema):  # type: ignore[no-untyped-def]
    """Publish one message to bob in ``conn``'s open transaction."""
    out = [prepare("alice", "bob", "notification", {}, now_ms=NOW)]
    queue.publish(conn, schema, out, [NOW], NOW)
    return out
