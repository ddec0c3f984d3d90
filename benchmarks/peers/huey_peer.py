"""huey's ``SqliteStorage`` (through ``SqliteHuey``) with its defaults: enqueue = one INSERT,
dequeue = SELECT + DELETE in a ``BEGIN EXCLUSIVE`` transaction. There is no ack: a consumer
that crashes after dequeue loses the task."""

from __future__ import annotations

import os
import sqlite3

from . import Client, Peer, decode, encode, payload


class HueyClient(Client):
    blocking = False  # the huey consumer polls storage (0.1 s doubling to 10 s by default)

    def __init__(self, path: str) -> None:
        self.path = path
        self._storages: dict[str, object] = {}

    def storage(self, name: str):
        storage = self._storages.get(name)
        if storage is None:
            from huey import SqliteHuey

            storage = self._storages[name] = SqliteHuey(name, filename=self.path).storage
        return storage

    def put(self, queue: str, i: int) -> None:
        self.storage(queue).enqueue(encode(payload(i)))

    def get_nowait(self, queue: str) -> int | None:
        data = self.storage(queue).dequeue()
        if data is None:
            return None
        return decode(bytes(data))["i"]

    def close(self) -> None:
        for storage in self._storages.values():
            storage.close()


class HueyPeer(Peer):
    name = "huey"
    label = "huey SqliteStorage"
    package = "huey"
    module = "huey"
    caveats = (
        "no acks: dequeue deletes the row, so a consumer crash loses the task",
        "measured at the storage layer (enqueue/dequeue of raw bytes), below the task "
        "decorator and consumer; no batch enqueue; polled every 1 ms (the huey consumer "
        "itself polls 0.1 s doubling up to 10 s)",
        "large backlogs are prefilled by a direct INSERT of the rows enqueue() writes",
    )

    def settings(self, store: str) -> str:
        conn = sqlite3.connect(store)
        try:
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            conn.close()
        return (f"journal_mode={journal}, synchronous=FULL (SQLite default; fsync=None leaves it), "
                "cache_size=-8000, sqlite3 timeout=5 s, BEGIN EXCLUSIVE for dequeue; "
                f"stdlib sqlite3 {sqlite3.sqlite_version}")

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        from huey import SqliteHuey

        path = os.path.join(workdir, "huey.db")
        for name in queues:
            SqliteHuey(name, filename=path).storage.close()
        return path

    def open(self, store: str) -> HueyClient:
        return HueyClient(store)

    def prefill(self, store: str, queue: str, ids: range) -> None:
        conn = sqlite3.connect(store, isolation_level=None)
        try:
            for start in range(0, len(ids), 10_000):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO task (queue, data, priority) VALUES (?, ?, 0)",
                    [(queue, encode(payload(i))) for i in ids[start : start + 10_000]],
                )
                conn.execute("COMMIT")
        finally:
            conn.close()


PEERS = {"huey": HueyPeer}
