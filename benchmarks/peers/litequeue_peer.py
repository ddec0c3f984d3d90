"""litequeue's ``LiteQueue`` with its defaults (one table per queue, pop = UPDATE ... RETURNING
in a BEGIN IMMEDIATE transaction, done() marks the row done)."""

from __future__ import annotations

import json
import os
import sqlite3

from . import Client, Peer, Unavailable, payload


class LiteQueueClient(Client):
    blocking = False  # litequeue has no blocking pop

    def __init__(self, path: str) -> None:
        self.path = path
        self._queues: dict[str, object] = {}

    def queue(self, name: str):
        q = self._queues.get(name)
        if q is None:
            from litequeue import LiteQueue

            q = self._queues[name] = LiteQueue(self.path, queue_name=name)
        return q

    def put(self, queue: str, i: int) -> None:
        self.queue(queue).put(json.dumps(payload(i)))

    def put_many(self, queue: str, ids: list[int]) -> None:
        q = self.queue(queue)
        with q.transaction(mode="IMMEDIATE"):
            for i in ids:
                q.put(json.dumps(payload(i)))

    def get_nowait(self, queue: str) -> int | None:
        q = self.queue(queue)
        message = q.pop()
        if message is None:
            return None
        q.done(message.message_id)
        return json.loads(message.data)["i"]

    def close(self) -> None:
        for q in self._queues.values():
            q.close()


class LiteQueuePeer(Peer):
    name = "litequeue"
    label = "litequeue"
    package = "litequeue"
    has_batch = True
    batch_note = "put() inside its transaction(mode='IMMEDIATE') context manager"
    caveats = (
        "no blocking pop: polls every 1 ms",
        "batch = its public transaction() context manager around put(); it has no batch put",
    )

    def check(self) -> None:
        try:
            import litequeue  # noqa: F401
        except ImportError as exc:
            raise Unavailable("litequeue is not installed (pip install litequeue)") from exc

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
