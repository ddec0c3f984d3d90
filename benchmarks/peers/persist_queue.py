"""persist-queue's ``SQLiteAckQueue`` with its defaults (pickle serializer, auto_commit,
auto_resume, multithreading=False, sqlite3 timeout 10 s)."""

from __future__ import annotations

import os
import sqlite3
import time

from . import Peer, QueuePerName, payload


class PersistQueueClient(QueuePerName):
    # get(block=True) waits on an in-process threading.Event and otherwise re-checks only
    # every 10 s (TICK_FOR_WAIT), so it does not see other processes' puts: poll instead.
    blocking = False

    def make_queue(self, name: str):
        from persistqueue import SQLiteAckQueue

        return SQLiteAckQueue(self.path, name=name)

    def put(self, queue: str, i: int) -> None:
        self.queue(queue).put(payload(i))

    def get_nowait(self, queue: str) -> int | None:
        from persistqueue import Empty

        q = self.queue(queue)
        try:
            item = q.get(block=False)
        except Empty:
            return None
        q.ack(item)
        return item["i"]


class PersistQueuePeer(Peer):
    name = "persist-queue"
    label = "persist-queue SQLiteAckQueue"
    package = "persist-queue"
    module = "persistqueue"
    caveats = (
        "no batch put for the ack queue; no cross-process blocking get (polls every 1 ms)",
        "every SQLiteAckQueue opened with the default auto_resume=True puts all unacked "
        "items back to ready, and get() selects then marks in two statements without a "
        "write lock: concurrent consumers in several processes can get the same item",
        "large backlogs are prefilled by a direct INSERT of the same rows put() writes "
        "(pickle protocol 4, status 0)",
    )

    def settings(self, store: str) -> str:
        conn = sqlite3.connect(os.path.join(store, "data.db"))
        try:
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        finally:
            conn.close()
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return (f"journal_mode={journal}, synchronous={names.get(sync, sync)} (SQLite default), "
                f"sqlite3 timeout=10 s; stdlib sqlite3 {sqlite3.sqlite_version}")

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        from persistqueue import SQLiteAckQueue

        path = os.path.join(workdir, "pq")
        for name in queues:
            SQLiteAckQueue(path, name=name).close()
        return path

    def open(self, store: str) -> PersistQueueClient:
        return PersistQueueClient(store)

    def prefill(self, store: str, queue: str, ids: range) -> None:
        from persistqueue.serializers import pickle as pq_pickle

        conn = sqlite3.connect(os.path.join(store, "data.db"), isolation_level=None)
        try:
            now = time.time()
            for start in range(0, len(ids), 10_000):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    f"INSERT INTO ack_queue_{queue} (data, timestamp, status) VALUES (?, ?, 0)",
                    [(pq_pickle.dumps(payload(i)), now) for i in ids[start : start + 10_000]],
                )
                conn.execute("COMMIT")
        finally:
            conn.close()


PEERS = {"persist-queue": PersistQueuePeer}
