"""procrastinate 3.10.0 on PostgreSQL (PsycopgConnector; the schema is the first entry of the
conninfo's search_path, as procrastinate has no schema option), driven from synchronous code
by an event loop per client.

- put: ``task.configure(queue=...).defer_async(**body)``; put_many: ``batch_defer_async``
  (one statement);
- get: ``job_manager.fetch_job`` (its ``procrastinate_fetch_job_v2``) then
  ``job_manager.finish_job(..., SUCCEEDED, delete_job=True)``: the calls its worker makes per
  job, with a worker id from ``register_worker``;
- the 2x2 consumers run procrastinate's own worker, ``run_worker_async(concurrency=4,
  delete_jobs="successful", listen_notify=True)``, until stopped.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import Client, payload
from .postgres import PostgresPeer, dsn

CONCURRENCY = 4  # the worker's concurrent jobs (FIELD-NOTES 2: 1,001 jobs in 1.75 s at 4)
TASK = "bench_work"


def _app(schema: str, on_message: Any = None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn(schema)))

    @app.task(name=TASK, queue="q")
    async def work(**body: Any) -> None:
        if on_message is not None:
            on_message(body["i"])

    return app


class ProcrastinateClient(Client):
    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.loop = asyncio.new_event_loop()
        self.app = _app(schema)
        self.task = self.app.tasks[TASK]
        self.run(self.app.open_async())
        self.worker_id: int | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def put(self, queue: str, i: int) -> None:
        self.run(self.task.configure(queue=queue).defer_async(**payload(i)))

    def put_many(self, queue: str, ids: list[int]) -> None:
        self.run(self.task.configure(queue=queue).batch_defer_async(*(payload(i) for i in ids)))

    def get_nowait(self, queue: str) -> int | None:
        from procrastinate.jobs import Status

        manager = self.app.job_manager

        async def take() -> int | None:
            if self.worker_id is None:
                self.worker_id = await manager.register_worker()
            job = await manager.fetch_job(queues=[queue], worker_id=self.worker_id)
            if job is None:
                return None
            await manager.finish_job(job, Status.SUCCEEDED, delete_job=True)
            return job.task_kwargs["i"]

        return self.run(take())

    def consume(self, queue: str, on_message: Any, stop: Any) -> None:
        app = _app(self.schema, on_message)

        async def main() -> None:
            async with app.open_async():
                worker = asyncio.ensure_future(app.run_worker_async(
                    queues=[queue], concurrency=CONCURRENCY, wait=True, listen_notify=True,
                    delete_jobs="successful", install_signal_handlers=False))
                while not stop.is_set() and not worker.done():
                    await asyncio.sleep(0.05)
                worker.cancel()
                try:
                    await worker
                except asyncio.CancelledError:
                    pass

        self.run(main())

    def close(self) -> None:
        async def end() -> None:
            if self.worker_id is not None:
                await self.app.job_manager.unregister_worker(self.worker_id)
            await self.app.close_async()

        self.run(end())
        self.loop.close()


class ProcrastinatePeer(PostgresPeer):
    name = "procrastinate"
    label = "procrastinate"
    package = "procrastinate"
    module = "procrastinate"
    has_batch = True
    batch_note = "batch_defer_async (one statement)"
    caveats = (
        "one-at-a-time get = job_manager.fetch_job + finish_job(delete_job=True) (the calls its "
        "worker makes per job); no cross-process blocking get outside its worker, so ping-pong "
        "polls every 1 ms",
        f"2x2 processes: each consumer is procrastinate's worker (concurrency={CONCURRENCY}, "
        "listen_notify, delete_jobs='successful'); its row trigger sends 2 pg_notify per job",
    )

    def settings(self, store: str) -> str:
        return f"{self.server_settings()}; schema via search_path, defaults"

    def setup(self, workdir: str, queues: tuple[str, ...]) -> str:
        schema = self.new_schema()
        app = _app(schema)
        loop = asyncio.new_event_loop()
        try:
            async def apply() -> None:
                async with app.open_async():
                    await app.schema_manager.apply_schema_async()

            loop.run_until_complete(apply())
        finally:
            loop.close()
        return schema

    def open(self, store: str) -> ProcrastinateClient:
        return ProcrastinateClient(store)


PEERS = {"procrastinate": ProcrastinatePeer}
