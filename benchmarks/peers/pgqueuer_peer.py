"""pgqueuer 1.6.0 on PostgreSQL, through its psycopg driver (an autocommit AsyncConnection),
driven from synchronous code by an event loop per client.

- put: ``Queries.enqueue(queue, body)``; put_many: one ``enqueue`` of lists (one statement);
- get: ``Queries.dequeue(batch_size=1)`` then ``Queries.log_jobs([(job, "successful", None)])``:
  the two calls its QueueManager makes for each batch;
- the 2x2 consumers run pgqueuer's own worker, ``PgQueuer.qm.run(batch_size=10)`` (LISTEN for
  new jobs, completions buffered and logged in batches), in continuous mode until stopped.

The entrypoint is the queue's name; the schema is the store (``DBSettings(db_schema=...)``).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from . import Client, decode, encode, payload
from .postgres import PostgresPeer, dsn

BATCH = 10  # the worker's batch_size: pgqueuer's default


def _settings(schema: str) -> Any:
    from pgqueuer.domain.settings import DBSettings

    return DBSettings(db_schema=schema)


class PgqueuerClient(Client):
    def __init__(self, schema: str) -> None:
        import psycopg
        from pgqueuer.adapters.drivers.psycopg import PsycopgDriver
        from pgqueuer.adapters.persistence import qb
        from pgqueuer.adapters.persistence.queries import Queries

        self.schema = schema
        self.loop = asyncio.new_event_loop()
        self.conn = self.run(psycopg.AsyncConnection.connect(dsn(), autocommit=True))
        settings = _settings(schema)
        self.queries = Queries(PsycopgDriver(self.conn),
                               qbe=qb.QueryBuilderEnvironment(settings=settings),
                               qbq=qb.QueryQueueBuilder(settings=settings))
        self.manager_id = uuid.uuid4()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def put(self, queue: str, i: int) -> None:
        self.run(self.queries.enqueue(queue, encode(payload(i))))

    def put_many(self, queue: str, ids: list[int]) -> None:
        self.run(self.queries.enqueue([queue] * len(ids), [encode(payload(i)) for i in ids],
                                      [0] * len(ids)))

    def get_nowait(self, queue: str) -> int | None:
        from pgqueuer.ports.repository import EntrypointExecutionParameter

        async def take() -> int | None:
            jobs = await self.queries.dequeue(
                batch_size=1, entrypoints={queue: EntrypointExecutionParameter(0)},
                queue_manager_id=self.manager_id, global_concurrency_limit=None,
                heartbeat_timeout=timedelta(seconds=30))
            if not jobs:
                return None
            await self.queries.log_jobs([(jobs[0], "successful", None)])
            return decode(jobs[0].payload)["i"]

        return self.run(take())

    def consume(self, queue: str, on_message: Any, stop: Any) -> None:
        from pgqueuer import PgQueuer
        from pgqueuer.adapters.drivers.psycopg import PsycopgDriver

        async def main() -> None:
            import psycopg

            conn = await psycopg.AsyncConnection.connect(dsn(), autocommit=True)
            pgq = PgQueuer(PsycopgDriver(conn), queries=self.queries)

            @pgq.entrypoint(queue)
            async def work(job: Any) -> None:
                on_message(decode(job.payload)["i"])

            async def watch() -> None:
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                pgq.qm.shutdown.set()

            watcher = asyncio.ensure_future(watch())
            await pgq.qm.run(batch_size=BATCH, dequeue_timeout=timedelta(seconds=1))
            await watcher
            await conn.close()

        self.run(main())

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


class PgqueuerPeer(PostgresPeer):
    name = "pgqueuer"
    label = "pgqueuer"
    package = "pgqueuer"
    module = "pgqueuer"
    has_batch = True
    batch_note = "one enqueue() of lists (one INSERT ... SELECT unnest)"
    caveats = (
        "one-at-a-time get = Queries.dequeue(batch_size=1) + log_jobs (the calls its worker "
        "makes per batch); no cross-process blocking get outside its worker, so ping-pong "
        "polls every 1 ms",
        f"2x2 processes: each consumer is pgqueuer's worker, qm.run(batch_size={BATCH}) in "
        "continuous mode (LISTEN, buffered completions); durability 'durable' (its default)",
    )

    def settings(self, store: str) -> str:
        return f"{self.server_settings()}; schema per store (DBSettings.db_schema), defaults"

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        schema = self.new_schema(create=False)
        client = PgqueuerClient(schema)
        try:
            client.run(client.queries.install())
        finally:
            client.close()
        return schema

    def open(self, store: str) -> PgqueuerClient:
        return PgqueuerClient(store)


PEERS = {"pgqueuer": PgqueuerPeer}
