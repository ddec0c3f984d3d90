"""The PostgreSQL backend answers as the SQLite one (issue 15, in progress): one scenario of
publishes, claims, settles, responses, dead letters, retention and state, run through each
backend's Storage verbs, gives the same rows (positions and wake-up tokens aside, which each
backend makes its own way)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from postgres_server import pg_bus, pg_schema

from sqlbus.encoding import prepare
from sqlbus.postgres.storage import PostgresStorage
from sqlbus.sqlite import storage as sqlite_storage

__all__ = ["pg_bus", "pg_schema"]  # fixtures

NOW = 1_800_000_000_000
LEASE = 30_000


def plain(value: Any) -> Any:
    """Rows as plain tuples and lists, for comparing one backend's with the other's."""
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def messages() -> list[Any]:
    """The story's messages, made once for both backends (ids are random)."""
    return [
        prepare("alice", "bob", "notification", {"n": 1}, now_ms=NOW),
        prepare("alice", "bob", "notification", {"n": 2}, now_ms=NOW, priority=5),
        prepare("alice", ["bob", "carol"], "notification", {"n": 3}, now_ms=NOW),
        prepare("alice", "bob", "notification", {"n": 4}, now_ms=NOW),  # delayed below
        prepare("alice", "bob", "notification", {"n": 5}, now_ms=NOW, ttl=100),
        prepare("carol", "bob", "response", {"success": True, "data": 1, "request_id": "q"},
                now_ms=NOW, correlation_id="r1"),
        prepare("carol", "bob", "response", {"success": True, "data": 2, "request_id": "q"},
                now_ms=NOW, correlation_id="r2", delivered=True),
        prepare("carol", "bob", "response", {"success": True, "data": 3, "request_id": "q"},
                now_ms=NOW, correlation_id="late"),
    ]


def scenario(storage: Any, conn: Any, out: list[Any]) -> dict[str, Any]:
    """Run one story through ``storage``'s verbs; what each step returned, positions dropped."""
    seen: dict[str, Any] = {}

    def write(name: str, verb: str, *args: Any, **kwargs: Any) -> Any:
        storage.begin(conn)
        try:
            result = getattr(storage, verb)(conn, *args, **kwargs)
        except BaseException:
            storage.rollback(conn)
            raise
        storage.commit(conn)
        seen[name] = plain(result)
        return result

    def read(name: str, verb: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(storage, verb)(conn, *args, **kwargs)
        seen[name] = plain(result)
        return result

    for agent in ("bob", "carol"):
        write(f"register {agent}", "register_agent", agent, NOW)
    visible = [NOW, NOW, NOW, NOW + 5_000, NOW, NOW, NOW, NOW]
    write("publish", "publish", out, visible, NOW)
    write("timeout", "record_request_timeout", "bob", "late", NOW, 60_000)
    read("look", "look", "bob", NOW, json.dumps(["notification"]), json.dumps(["r1"]))
    seen["look"] = seen["look"][1:]  # the token is each backend's own
    rows, more = write("claim", "claim", "bob", NOW, NOW + LEASE, 2, None, json.dumps(["r1"]))
    seen["claim"] = [row[1:] for row in rows], more
    first, second = rows
    write("ack", "ack", [(first[0], first[1])], NOW + 10)
    write("retry", "retry", second[0], second[1], NOW + 1_000, "ValueError: no")
    read("last_error", "last_error", second[0])
    read("delivery_ms", "delivery_ms", first[0])
    for cid in ("r1", "r2", "nothing"):
        read(f"find {cid}", "find_response", "bob", cid)
        seen[f"find {cid}"] = seen[f"find {cid}"][1:]
    taken = write("take r1", "take_response", "bob", "r1", NOW + 20)
    seen["take r1"] = taken[1]
    write("late", "take_late_responses", "bob", NOW + 30)
    read("timed out", "request_timed_out", "bob", "late")
    read("peek", "peek_rows", "bob", NOW + 200, 20)
    read("peek small", "peek_rows", "bob", NOW + 200, 3, 10)
    read("depth", "depth_rows", NOW + 200)
    read("acked", "acked_rows", NOW + 200)
    read("sent", "sent_rows")
    seen["sent"] = sorted(seen["sent"])
    read("list sent", "list_sent", None, 20)
    read("list sent carol", "list_sent", "carol", 20, 5)
    read("count expired", "count_expired", NOW + 200)
    expired = read("expired", "expired_rows", NOW + 200, 10)
    seen["expired"] = len(expired)
    write("dead expired", "dead_letter_expired", expired, NOW + 200)
    dead = read("dead letters", "list_dead_letters", None, 10)
    seen["dead letters"] = [row[1:] for row in seen["dead letters"]]
    read("targets", "dead_letter_ids", None, "expired")
    seen["targets"] = [row[1:] for row in seen["targets"]]
    write("requeue", "requeue", dead[0].id, NOW + 300, 0)
    read("expired leases", "expired_leases", NOW + LEASE + 1)
    read("excess", "archive_excess", 1)
    read("prunable", "count_prunable", NOW + 100, NOW + 1_000)
    write("prune", "prune_oldest_acked", 10)
    seen["prune"] = seen["prune"][0]
    read("counters", "read_counters")
    read("errors", "error_count_rows")
    for version, key in ((1, "job/a"), (1, "job/b"), (2, "job/a")):
        write(f"put {key} {version}", "put_state", key, b"1", version, False, "alice", NOW)
    read("snapshot", "state_snapshot", "job/")
    read("log", "state_log_after", "job/", 1)
    write("prune log", "prune_state_log", NOW + 1, 10)
    # On PostgreSQL any transaction on the server with an older id holds the tail back a
    # moment (another test's): read until it reaches the newest row.
    newest, deadline = newest_position(storage, conn), time.monotonic() + 5
    while not (rows := storage.rows_after(conn, 0, 50)) or rows[-1].seq < newest:
        assert time.monotonic() < deadline, "the tail never reached the newest row"
        time.sleep(0.01)
    seen["tail"] = [plain(row[1:]) for row in rows]
    read("retention", "get_retention")
    return seen


def newest_position(storage: Any, conn: Any) -> int:
    """The tail position of the newest row: its seq on SQLite, its transaction on PostgreSQL."""
    if isinstance(storage, PostgresStorage):
        row = conn.execute(
            f'SELECT max(xact_id)::text::bigint FROM "{storage.schema}".message').fetchone()
        return int(row[0])
    return int(conn.execute("SELECT max(seq) FROM message").fetchall()[0][0])


def test_the_postgres_backend_answers_a_story_as_the_sqlite_backend_does(
    pg_bus: Any, tmp_path: Path
) -> None:
    conn, schema = pg_bus
    out = messages()
    on_postgres = scenario(PostgresStorage(schema), conn, out)
    path = str(tmp_path / "bus.db")
    Path(path).touch()
    lite = sqlite_storage.open_connection(path, synchronous="NORMAL", busy_timeout=5.0)
    try:
        sqlite_storage.set_wal_mode(lite, path, new_file=True)
        sqlite_storage.initialize(lite, path, NOW)
        on_sqlite = scenario(sqlite_storage, lite, out)
    finally:
        lite.close()
    assert list(on_postgres) == list(on_sqlite)
    for step in on_sqlite:
        assert on_postgres[step] == on_sqlite[step], step
    # the story reaches every kind of row (an empty answer on both sides proves nothing)
    assert len(on_sqlite["peek"]) >= 3 and len(on_sqlite["depth"]) == 2
    assert on_sqlite["dead letters"] and on_sqlite["counters"] and on_sqlite["tail"]
    assert on_sqlite["log"] and on_sqlite["late"] == (1, 30)
