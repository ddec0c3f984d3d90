"""Request/response verbs of the PostgreSQL backend on the real server (issue 15, in progress):
a response is found and taken once, a direct reply only read, and late responses of timed-out
requests discarded and counted."""

from __future__ import annotations

from postgres_server import connect, pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres import queue, responses

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000


def respond(conn, schema, cid, *, to="bob", delivered=False, ttl=30_000, now=NOW):  # type: ignore[no-untyped-def]
    out = prepare("carol", to, "response", {"success": True, "data": cid, "request_id": "r"},
                  now_ms=now, correlation_id=cid, delivered=delivered, ttl=ttl)
    with conn.transaction():
        queue.publish(conn, schema, [out], [now], now)
    return out


def test_a_response_is_found_then_taken_once_and_never_by_a_claim_after(pg_bus) -> None:
    conn, schema = pg_bus
    look = responses.find_response(conn, schema, "bob", "req-1")
    assert (look.body, look.waiting) == (None, 0)
    sent = respond(conn, schema, "req-1")
    respond(conn, schema, "req-2")
    look = responses.find_response(conn, schema, "bob", "req-1")
    assert (look.body, look.waiting) == (None, 1)
    with conn.transaction():
        taken = responses.take_response(conn, schema, "bob", "req-1", NOW + 7)
    assert taken is not None and taken[1] == sent.body
    with conn.transaction():
        assert responses.take_response(conn, schema, "bob", "req-1", NOW + 8) is None
    assert responses.delivery_ms(conn, schema, taken[0]) == 7
    assert responses.find_response(conn, schema, "bob", "req-1").waiting == 0
    with conn.transaction():  # only req-2's response is left for a claim
        rows, _ = queue.claim(conn, schema, "bob", NOW, NOW + 1000, 10)
    assert len(rows) == 1 and rows[0][0] != taken[0]


def test_two_takers_of_one_response_get_it_once(pg_bus) -> None:
    conn, schema = pg_bus
    respond(conn, schema, "req-1")
    other = connect()
    try:
        other.execute("SET lock_timeout = '1s'")
        with conn.transaction():
            mine = responses.take_response(conn, schema, "bob", "req-1", NOW)
            with other.transaction():  # while the first holds its row: skipped, not waited on
                theirs = responses.take_response(other, schema, "bob", "req-1", NOW)
    finally:
        other.close()
    assert mine is not None and theirs is None


def test_a_direct_reply_is_read_not_taken_and_an_expired_response_is_left(pg_bus) -> None:
    conn, schema = pg_bus
    reply = respond(conn, schema, "req-1", delivered=True)
    look = responses.find_response(conn, schema, "bob", "req-1")
    assert (look.body, look.waiting) == (reply.body, 0)
    respond(conn, schema, "req-2", ttl=1_000)
    with conn.transaction():
        assert responses.take_response(conn, schema, "bob", "req-2", NOW + 2_000) is None
        assert responses.take_response(conn, schema, "bob", "req-2", NOW + 1_000) is not None


def test_the_look_token_changes_when_another_connection_commits(pg_bus) -> None:
    conn, schema = pg_bus
    # (Not asserted: that it stays put without a commit here. Any commit on the server moves
    # it, another test's too: a waiter then wakes for nothing and looks again.)
    before = responses.find_response(conn, schema, "bob", "req-1").version
    other = connect()
    try:
        respond(other, schema, "req-1")
    finally:
        other.close()
    assert responses.find_response(conn, schema, "bob", "req-1").version != before


def test_late_responses_of_timed_out_requests_are_discarded_and_counted(pg_bus) -> None:
    conn, schema = pg_bus
    with conn.transaction():
        responses.record_request_timeout(conn, schema, "bob", "old", NOW - 10_000, 60_000)
        responses.record_request_timeout(conn, schema, "bob", "req-1", NOW, 60_000)
        responses.record_request_timeout(conn, schema, "bob", "req-1", NOW, 60_000)  # again: kept once
        responses.record_request_timeout(conn, schema, "bob", "req-2", NOW, 5_000)  # forgets "old"
    assert responses.request_timed_out(conn, schema, "bob", "req-1")
    assert not responses.request_timed_out(conn, schema, "bob", "old")
    assert not responses.request_timed_out(conn, schema, "carol", "req-1")
    respond(conn, schema, "req-1", now=NOW + 100)
    respond(conn, schema, "req-3", now=NOW + 100)  # no timeout recorded: not late
    with conn.transaction():
        assert responses.take_late_responses(conn, schema, "bob", NOW + 400) == (1, 300)
        assert responses.take_late_responses(conn, schema, "bob", NOW + 500) == (0, 0)
    assert not responses.request_timed_out(conn, schema, "bob", "req-1")  # forgotten with it
    assert responses.request_timed_out(conn, schema, "bob", "req-2")
    with conn.transaction():
        responses.forget_request_timeout(conn, schema, "bob", "req-2")
    assert not responses.request_timed_out(conn, schema, "bob", "req-2")
    assert responses.find_response(conn, schema, "bob", "req-3").waiting == 1
