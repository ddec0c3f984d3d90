"""The floor: a queue in plain apsw, with no features at all.

WAL, synchronous=NORMAL, SQLite's default busy handler (5 s). Publish = one INSERT per
BEGIN IMMEDIATE transaction. Claim = one ``UPDATE ... RETURNING`` transaction that leases the
head row for 30 s; ack = a second transaction that deletes it. No priorities, TTL, retries,
archive or wake-up: a receiver polls.
"""

from __future__ import annotations

import os
import time

import apsw
import msgspec

from . import Client, Peer, payload

SCHEMA = """
CREATE TABLE IF NOT EXISTS job (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS job_queue ON job (queue, id);
"""
_CLAIM = (
    "UPDATE job SET lease_until = ?1 WHERE id = (SELECT id FROM job WHERE queue = ?2"
    " AND lease_until <= ?3 ORDER BY id LIMIT 1) RETURNING id, body"
)
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _connect(path: str) -> apsw.Connection:
    conn = apsw.Connection(path)
    conn.set_busy_timeout(5000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class RawClient(Client):
    def __init__(self, path: str) -> None:
        self.conn = _connect(path)

    def put(self, queue: str, i: int) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO job (queue, body) VALUES (?, ?)", (queue, _encode(payload(i))))
        conn.execute("COMMIT")

    def put_many(self, queue: str, ids: list[int]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO job (queue, body) VALUES (?, ?)",
            [(queue, _encode(payload(i))) for i in ids],
        )
        conn.execute("COMMIT")

    def get_nowait(self, queue: str) -> int | None:
        conn = self.conn
        now = int(time.time() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(_CLAIM, (now + 30_000, queue, now)).fetchall()
        finally:
            conn.execute("COMMIT")
        if not rows:
            return None
        job_id, body = rows[0]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM job WHERE id = ?", (job_id,))
        conn.execute("COMMIT")
        return _decode(body)["i"]

    def close(self) -> None:
        self.conn.close()


class RawApswPeer(Peer):
    name = "apsw"
    label = "raw apsw"
    package = "apsw"
    has_batch = True
    batch_note = "executemany in one transaction"
    caveats = (
        "no blocking receive: polls every 1 ms; no priorities, TTL, retries, archive or "
        "dead letters (the floor, not a product)",
    )

    def settings(self, store: str) -> str:
        return ("journal_mode=WAL, synchronous=NORMAL, busy_timeout=5000, default cache; "
                f"SQLite {apsw.sqlite_lib_version()}")

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        path = os.path.join(workdir, "raw.db")
        conn = _connect(path)
        conn.execute(SCHEMA)
        conn.close()
        return path

    def open(self, store: str) -> RawClient:
        return RawClient(store)


PEERS = {"apsw": RawApswPeer}
