"""Adapters that put sqlbus and its peers behind one small interface for benchmarks/compare.py.

Every system is a :class:`Peer` (what it is, its version, its settings, how to set up a fresh
store) that opens a :class:`Client` in each process (put, put_many, get, close). Messages are
~200-byte JSON objects ``{"i": <int>, ...}``; ``get`` claims one message, acks it (the
system's own ack, where it has one) and returns its ``i``, so the workloads can check that
nothing was lost or duplicated.

Each adapter uses the peer's documented API with its default settings; where an adapter had to
choose (a poll interval where there is no cross-process blocking receive, a direct INSERT to
prefill a large backlog), ``caveats`` says so and the report prints it.
"""

from __future__ import annotations

import importlib
import json
import time
from importlib import metadata
from typing import Any

import msgspec

PAYLOAD_BYTES = 200
_FILLER = "x" * 400


_TEXT: dict[int, str] = {}  # filler by the number of characters of the id


# Every peer encodes and decodes its messages with msgspec, as sqlbus does: a peer given
# stdlib json would be measured partly on json's speed (LPUSH of 100 json.dumps bodies ran at
# about half the rate of the same with msgspec).
encode = msgspec.json.encode
decode = msgspec.json.decode


#: The shape of the payload: "flat" (one level of short fields and a filler string) or
#: "nested" (objects and lists three levels deep, as an agent's task tends to be). compare.py
#: sets it from --payload before any worker process starts.
SHAPE = "flat"


def _nested(i: int, text: str) -> dict[str, Any]:
    return {"i": i, "task": {"kind": "bench", "agent": "worker-7", "tags": ["resize", "s3"],
                             "params": {"width": 640, "height": 480, "steps": [1, 2, 3],
                                        "source": {"bucket": "b", "key": text}}}}


def payload(i: int) -> dict[str, Any]:
    """The benchmark's message body: a JSON object of about 200 bytes with the id ``i``, flat
    or nested (:data:`SHAPE`).

    Cheap to build (the filler is cached per id width), so the benchmark's own cost stays
    out of the figures as far as it can.
    """
    width = len(str(i))
    text = _TEXT.get(width)
    if text is None:
        base = (_nested(i, "") if SHAPE == "nested"
                else {"i": i, "kind": "bench", "agent": "worker-7", "text": ""})
        size = len(json.dumps(base, separators=(",", ":")))
        text = _TEXT[width] = _FILLER[: max(0, PAYLOAD_BYTES - size)]
    if SHAPE == "nested":
        return _nested(i, text)
    return {"i": i, "kind": "bench", "agent": "worker-7", "text": text}


class Unavailable(Exception):
    """The peer cannot run here (package missing, server not answering); the text says why."""


class Client:
    """One process's handle on a system. Queues are named by plain strings."""

    #: seconds between non-blocking tries when the system has no cross-process blocking receive
    poll_interval = 0.001
    #: the system waits for a message itself (True) or the adapter polls (False)
    blocking = False

    def put(self, queue: str, i: int) -> None:
        """Publish one message (one transaction / call)."""
        raise NotImplementedError

    def put_many(self, queue: str, ids: list[int]) -> None:
        """Publish a batch in one call/transaction; only for peers with ``has_batch``."""
        raise NotImplementedError

    def get_nowait(self, queue: str) -> int | None:
        """Claim and ack one message; None when none is ready."""
        raise NotImplementedError

    def get_blocking(self, queue: str, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds with the system's own blocking receive."""
        raise NotImplementedError

    def get(self, queue: str, timeout: float = 0.0) -> int | None:
        """Claim and ack one message, waiting up to ``timeout`` seconds for one to arrive."""
        if timeout <= 0:
            return self.get_nowait(queue)
        if self.blocking:
            return self.get_blocking(queue, timeout)
        deadline = time.monotonic() + timeout
        while True:
            got = self.get_nowait(queue)
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_interval)

    def consume(self, queue: str, on_message: Any, stop: Any) -> None:
        """A consumer process's loop (workload 5): call ``on_message(i)`` for each message,
        claimed and acked, until ``stop`` (an event) is set. By default ``get`` in a loop; a
        peer with a consumer loop of its own overrides this."""
        while not stop.is_set():
            i = self.get(queue, 0.2)
            if i is not None:
                on_message(i)

    # Ping-pong: a peer may override these to use its own request/reply idiom.
    def ping(self, i: int, timeout: float) -> int | None:
        """Send ``i`` to the responder and wait for its answer; returns the answer's id."""
        self.put("ping", i)
        return self.get("pong", timeout)

    def serve(self, timeout: float) -> int | None:
        """Answer one ping (waiting up to ``timeout`` s); returns the id answered, or None."""
        i = self.get("ping", timeout)
        if i is not None:
            self.put("pong", i)
        return i

    def close(self) -> None:
        pass


class QueuePerName(Client):
    """A client over a library object per queue, made on first use and closed at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._queues: dict[str, Any] = {}

    def make_queue(self, name: str) -> Any:
        raise NotImplementedError

    def queue(self, name: str) -> Any:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = self.make_queue(name)
        return q

    def close(self) -> None:
        for q in self._queues.values():
            q.close()


class Peer:
    """A system under test: metadata plus how to make a fresh store and open clients."""

    name = "?"  # the --systems key
    label = "?"  # how the table names it
    package: str | None = None  # the distribution whose version is recorded
    module: str | None = None  # the module it imports; check() says when it is missing
    has_batch = False
    batch_note = ""
    caveats: tuple[str, ...] = ()
    postgres = False  # on the PostgreSQL server: compared with sqlbus-pg, not sqlbus

    def check(self) -> None:
        """Raise :class:`Unavailable` when the system cannot run here."""
        if self.module is None:
            return
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            raise Unavailable(
                f"{self.package} is not installed (pip install '.[bench]')"
            ) from exc

    def version(self) -> str:
        if self.package is None:
            return "-"
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return "not installed"

    def settings(self, store: str) -> str:
        """The pragmas / server settings in force, read back from a store made by setup()."""
        return ""

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        """Create a fresh, empty store under ``workdir`` with these queues; returns the
        store's address (a path, or a key prefix) that clients open."""
        raise NotImplementedError

    def open(self, store: str) -> Client:
        raise NotImplementedError

    def prefill(self, store: str, queue: str, ids: range) -> None:
        """Fill ``queue`` fast (untimed), by default through put_many or put."""
        client = self.open(store)
        try:
            if self.has_batch:
                for start in range(0, len(ids), 1000):
                    client.put_many(queue, list(ids[start : start + 1000]))
            else:
                for i in ids:
                    client.put(queue, i)
        finally:
            client.close()

    def teardown(self, store: str) -> None:
        """Release what setup() made outside ``workdir`` (Redis keys)."""


# name -> module (in this package) defining a Peer subclass named PEER
_MODULES = {
    "sqlbus": "sqlbus_peer",
    "apsw": "raw_apsw",
    "persist-queue": "persist_queue",
    "litequeue": "litequeue_peer",
    "huey": "huey_peer",
    "honker": "honker_peer",
    "redis-list": "redis_peer",
    "redis-stream": "redis_peer",
    "seed": "seed_like",
    "sqlbus-pg": "sqlbus_peer",
    "pgqueuer": "pgqueuer_peer",
    "procrastinate": "procrastinate_peer",
}
NAMES = tuple(_MODULES)


def get_peer(name: str) -> Peer:
    """The adapter for ``name`` (one of :data:`NAMES`); importing it never needs the peer's
    package (``check()`` reports a missing one)."""
    if name not in _MODULES:
        raise KeyError(f"unknown system {name!r}; choose from {', '.join(NAMES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.PEERS[name]()
