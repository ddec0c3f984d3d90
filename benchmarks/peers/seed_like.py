"""A re-implementation, in Python, of the design sqlbus replaces (shared/seed/000_...txt):
one JSON file per inbox (``messages/inbox/<agent>.json``), rewritten whole under a lock file
on every publish (read, insert by priority, write a temp file, rename) and every consume
(read, take the head, write the rest back); receivers poll every second.

Kept from the seed: the message envelope, ``JSON.stringify(queue, null, 2)`` formatting, the
priority insert, the temp-file-and-rename write, the 1 s poll interval. Left out (so these
figures flatter the seed): the sent archive written on every publish, and agent-registry
reads. The seed does not show ``acquireLock``; here it is an O_CREAT|O_EXCL lock file retried
every 1 ms for up to 5 s.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone

from . import Client, Peer, payload


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SeedClient(Client):
    poll_interval = 1.0  # the seed's MessageSubscriber.pollInterval

    def __init__(self, directory: str) -> None:
        self.inbox = os.path.join(directory, "messages", "inbox")

    def _lock(self, path: str) -> str:
        lock = path + ".lock"
        deadline = time.monotonic() + 5.0
        while True:
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return lock
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not take {lock} within 5 s") from None
                time.sleep(0.001)

    def _read(self, path: str) -> list[dict]:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return []

    def _write(self, path: str, queue: list[dict]) -> None:
        temp = path + ".tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(queue, indent=2))
        os.replace(temp, path)

    @staticmethod
    def envelope(queue: str, i: int) -> dict:
        now_ms = int(time.time() * 1000)
        return {
            "id": f"msg-{now_ms}-{secrets.token_hex(5)[:9]}",
            "from": "bench",
            "to": queue,
            "type": "notification",
            "timestamp": _iso_now(),
            "payload": payload(i),
            "headers": {"priority": 3, "ttl": 30000, "requires_ack": False},
            "queued_at": _iso_now(),
            "delivery_attempts": 0,
        }

    def put(self, queue: str, i: int) -> None:
        path = os.path.join(self.inbox, f"{queue}.json")
        entry = self.envelope(queue, i)
        lock = self._lock(path)
        try:
            messages = self._read(path)
            priority = entry["headers"]["priority"]
            index = next(
                (n for n, m in enumerate(messages) if m["headers"].get("priority", 3) < priority),
                None,
            )
            if index is None:
                messages.append(entry)
            else:
                messages.insert(index, entry)
            self._write(path, messages)
        finally:
            os.unlink(lock)

    def get_nowait(self, queue: str) -> int | None:
        path = os.path.join(self.inbox, f"{queue}.json")
        lock = self._lock(path)
        try:
            messages = self._read(path)
            if not messages:
                return None
            head = messages.pop(0)
            self._write(path, messages)
        finally:
            os.unlink(lock)
        return head["payload"]["i"]


class SeedPeer(Peer):
    name = "seed"
    label = "seed-like JSON files"
    caveats = (
        "a Python re-implementation of the seed's design: each publish and consume rewrites "
        "the whole inbox file, so its cost grows with the backlog; receivers poll every 1 s "
        "(the seed's pollInterval); the sent archive is left out",
    )

    def settings(self, store: str) -> str:
        return "one JSON file per inbox, O_EXCL lock file, temp file + rename, no fsync"

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        directory = os.path.join(workdir, "seed")
        os.makedirs(os.path.join(directory, "messages", "inbox"), exist_ok=True)
        return directory

    def open(self, store: str) -> SeedClient:
        return SeedClient(store)

    def prefill(self, store: str, queue: str, ids: range) -> None:
        client = SeedClient(store)
        path = os.path.join(client.inbox, f"{queue}.json")
        messages = client._read(path) + [client.envelope(queue, i) for i in ids]
        client._write(path, messages)


PEERS = {"seed": SeedPeer}
