"""sqlbus itself, through its public API only (connect, agent, publish, publish_many,
receive, ack; request and d.reply for ping-pong): on a SQLite file (``sqlbus``) and on
PostgreSQL (``sqlbus-pg``, a fresh schema per store on the server of
:mod:`benchmarks.peers.postgres`)."""

from __future__ import annotations

import os
from typing import Any

from . import Client, Peer, payload
from .postgres import SYNC, URL, PostgresPeer


class SqlbusClient(Client):
    blocking = True  # receive(wait=...) wakes on commits of other processes

    def __init__(self, path: str, **options: Any) -> None:
        import sqlbus

        self.bus = sqlbus.connect(path, **options)
        self._agents: dict[str, Any] = {}
        self.sender = self.agent("bench")
        # Ping-pong uses request() when it exists (COMPARE_SQLBUS_REQUEST=0 forces the
        # publish + receive path, to compare the two), else publish + receive.
        self.has_request = (hasattr(self.sender, "request")
                            and os.environ.get("COMPARE_SQLBUS_REQUEST", "1") != "0")

    def agent(self, name: str) -> Any:
        agent = self._agents.get(name)
        if agent is None:
            agent = self._agents[name] = self.bus.agent(name)
        return agent

    def put(self, queue: str, i: int, ttl: int | None = None) -> None:
        if ttl is None:
            self.sender.publish(queue, "notification", payload(i))
        else:
            self.sender.publish(queue, "notification", payload(i), ttl=ttl)

    def put_many(self, queue: str, ids: list[int], ttl: int | None = None) -> None:
        extra = {} if ttl is None else {"ttl": ttl}
        self.sender.publish_many(
            [{"to": queue, "type": "notification", "payload": payload(i), **extra} for i in ids]
        )

    def _take(self, queue: str, wait: float) -> int | None:
        deliveries = self.agent(queue).receive(limit=1, wait=wait)
        if not deliveries:
            return None
        d = deliveries[0]
        d.ack()
        body = d.message.payload
        return body["i"] if "i" in body else body["data"]["i"]  # a response wraps the data

    def get_nowait(self, queue: str) -> int | None:
        return self._take(queue, 0.0)

    def get_blocking(self, queue: str, timeout: float) -> int | None:
        return self._take(queue, timeout)

    def consume(self, queue: str, on_message: Any, stop: Any) -> None:
        """agent.run() with a handler: sqlbus's consumer loop (an ack claims the next)."""
        import threading

        agent = self.agent(queue)
        agent.subscribe("notification", lambda message: on_message(message.payload["i"]))
        watcher = threading.Thread(target=lambda: (stop.wait(), agent.stop()), daemon=True)
        watcher.start()
        agent.run()

    def ping(self, i: int, timeout: float) -> int | None:
        pinger = self.agent("pong")
        if self.has_request:
            data = pinger.request("ping", payload(i), timeout=timeout)
            return data["i"]
        pinger.publish("ping", "request", payload(i))
        return self._take("pong", timeout)

    def serve(self, timeout: float) -> int | None:
        for d in self.agent("ping").receive(limit=1, wait=timeout):
            with d:  # the reply is committed with the ack, in one transaction
                d.reply(d.message.payload)
            return d.message.payload["i"]
        return None

    def close(self) -> None:
        self.bus.close()


class SqlbusPeer(Peer):
    name = "sqlbus"
    label = "sqlbus"
    package = "sqlbus"
    has_batch = True
    batch_note = "publish_many (one transaction)"
    caveats = (
        "default settings (durability='normal' = WAL + synchronous=NORMAL, lease 30 s, TTL "
        "30 s); backlog prefills use publish_many with ttl=0 so they do not expire",
        "ping-pong: agent.request() when it exists, else publish + receive(wait=...); the "
        "responder answers with d.reply(), committed with its ack",
        "2x2 processes: each consumer is agent.run() with a handler (its consumer loop, in "
        "which the ack of a message also claims the next); workload 3 uses receive() + ack()",
    )

    def settings(self, store: str) -> str:
        import apsw

        conn = apsw.Connection(store)
        try:
            journal = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
        finally:
            conn.close()
        return (f"journal_mode={journal}, synchronous=NORMAL, cache_size=-16000, "
                "wal_autocheckpoint=4000, temp_store=MEMORY (sqlbus.sqlite.connection.open_connection); "
                f"apsw {_apsw_version()}")

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        import sqlbus

        path = os.path.join(workdir, "sqlbus.db")
        with sqlbus.connect(path) as bus:
            for name in ("bench", *queues):
                bus.agent(name)
        return path

    def open(self, store: str) -> SqlbusClient:
        return SqlbusClient(store)

    def prefill(self, store: str, queue: str, ids: range) -> None:
        client = self.open(store)
        try:
            for start in range(0, len(ids), 5000):
                client.put_many(queue, list(ids[start : start + 5000]), ttl=0)
        finally:
            client.close()


def _apsw_version() -> str:
    import apsw

    return apsw.apsw_version()


class SqlbusPostgresPeer(PostgresPeer):
    """sqlbus on PostgreSQL: the store is a schema (created by the first connect)."""

    name = "sqlbus-pg"
    label = "sqlbus on PostgreSQL"
    package = "sqlbus"
    module = "sqlbus.postgres.engine"
    has_batch = True
    batch_note = "publish_many (one transaction)"
    caveats = (
        "durability follows COMPARE_PG_SYNC: 'normal' (synchronous_commit off) for off, 'full' "
        "for on; pool_size 10, lease 30 s, TTL 30 s (prefills ttl=0); ping-pong, consumers and "
        "prefills as sqlbus on SQLite",
    )
    durability = "normal" if SYNC == "off" else "full"

    def settings(self, store: str) -> str:
        return f"{self.server_settings()}; durability={self.durability!r}, pool_size 10"

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        import sqlbus

        schema = self.new_schema(create=False)
        with sqlbus.connect(URL, schema=schema, durability=self.durability) as bus:
            for name in ("bench", *queues):
                bus.agent(name)
        return schema

    def open(self, store: str) -> SqlbusClient:
        return SqlbusClient(URL, schema=store, durability=self.durability)

    fill = SqlbusPeer.prefill


PEERS = {"sqlbus": SqlbusPeer, "sqlbus-pg": SqlbusPostgresPeer}
