"""litequeue's ``LiteQueue`` with its defaults (one table per queue, pop = UPDATE ... RETURNING
in a BEGIN IMMEDIATE transaction, done() marks the row done)."""

from __future__ import annotations

import os
import sqlite3

from . import Peer, QueuePerName, decode, encode, payload


class LiteQueueClient(QueuePerName):
    blocking = False  # litequeue has no blocking pop

    def make_queue(self, name: str):
        from litequeue import LiteQueue

        return LiteQueue(self.path, queue_name=name)

    def put(self, queue: str, i: int) -> None:
        self.queue(queue).put(encode(payload(i)).decode())

    def put_many(self, queue: str, ids: list[int]) -> None:
        q = self.queue(queue)
        with q.transaction(mode="IMMEDIATE"):
            for i in ids:
                q.put(encode(payload(i)).decode())

    def get_nowait(self, queue: str) -> int | None:
        q = self.queue(queue)
        message = q.pop()
        if message is None:
            return None
        q.done(message.message_id)
        return decode(message.data)["i"]


class LiteQueuePeer(Peer):
    name = "litequeue"
    label = "litequeue"
    package = "litequeue"
    module = "litequeue"
    has_batch = True
    batch_note = "put() inside its transaction(mode='IMMEDIATE') context manager"
    caveats = (
        "no blocking pop: polls every 1 ms",
        "batch = its public transaction() context manager around put(); it has no batch put",
    )

    def settings(self, store: str) -> str:
        return ("journal_mode=WAL, synchronous=NORMAL, temp_store=MEMORY, cache_size=-256000 "
                f"(set by LiteQueue); sqlite3 timeout 5 s; stdlib sqlite3 {sqlite3.sqlite_version}")

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        from litequeue import LiteQueue

        path = os.path.join(workdir, "litequeue.db")
        for name in queues:
            LiteQueue(path, queue_name=name).close()
        return path

    def open(self, store: str) -> LiteQueueClient:
        return LiteQueueClient(store)


PEERS = {"litequeue": LiteQueuePeer}
