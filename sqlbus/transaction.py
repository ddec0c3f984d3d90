"""The transactional outbox: messages, state writes and the application's own SQL committed
in one transaction.

>>> with alice.transaction() as tx:                                       # doctest: +SKIP
...     tx.execute("INSERT INTO orders(id) VALUES (?)", (42,))
...     tx.publish("billing", "task", {"order": 42})
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import connections
from .engine import Tx, WriteContext, open_block
from .errors import DatabaseError
from .state import StateStore
from .writes import prepare_broadcast, prepare_many, prepare_publish, write_all

if TYPE_CHECKING:
    from .agent import Agent

T = TypeVar("T")


class Transaction:
    """``with alice.transaction() as tx:`` one write transaction for messages, state and the
    application's own SQL (``tx.execute``); it commits on a clean exit and rolls back on an
    exception. It holds the write lock until the block ends: keep the block short.

    Once the database has ended the transaction (a trigger's ``RAISE(ROLLBACK)``, ``INSERT OR
    ROLLBACK``, ...), every later call, and leaving the block, raises :class:`DatabaseError`
    and writes nothing, even if the caller caught the first error. While the block is open,
    a write of its own on the same thread (``alice.publish``, ``d.ack``, ...) raises
    ``RuntimeError``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._write: WriteContext | None = None
        self._tx: Tx | None = None  # its marks ring at the commit
        self._ended = False  # the database ended the transaction before the block did
        self._token: contextvars.Token[Transaction | None] | None = None
        self.state: StateStore = StateStore(agent.bus, agent.id)

    def holds_lock(self) -> bool:
        """Whether the block is open (it holds the write lock)."""
        return self._tx is not None

    def __enter__(self) -> Transaction:
        self._begin()
        self._token = open_block.set(self)
        return self

    def _begin(self) -> None:
        if self._write is not None:
            raise RuntimeError("this transaction is already open")
        write = self.agent.bus.engine.write()
        self._tx = write.__enter__()
        # Between the block's calls no thread is inside SQLite: a fork or a close may go ahead.
        connections.inside.__exit__()
        self._write = write
        self._ended = False
        self.state = StateStore(self.agent.bus, self.agent.id, self._run)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._token is not None:
            open_block.reset(self._token)
            self._token = None
        self._end(exc_type, exc, tb)

    def _end(self, exc_type: Any, exc: Any, tb: Any) -> None:
        write, self._write, self._tx = self._write, None, None
        assert write is not None
        bus = self.agent.bus
        try:
            bus.engine.check_usable(write.conn)
        except DatabaseError:
            if exc_type is None:
                raise
            return  # the caller's own error goes on
        if self._ended or bus.engine.tx_ended(write.conn):
            if exc_type is None:
                raise self._ended_error()
            return
        connections.inside.__enter__()  # write.__exit__ leaves it
        write.__exit__(exc_type, exc, tb)

    def _ended_error(self) -> DatabaseError:
        return DatabaseError(
            f"{self.agent.bus.path}: the database ended this transaction (rolled back, e.g. by a "
            "trigger's RAISE(ROLLBACK)); nothing in the block was written: leave it and retry"
        )

    def _connection(self) -> Tx:
        tx = self._tx
        if tx is None:
            raise RuntimeError("use the transaction in a with block: with agent.transaction() as tx")
        self.agent.bus.engine.check_usable(tx.conn)
        if self._ended:
            raise self._ended_error()
        return tx

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(tx, *args)`` in the transaction (``tx``: its :class:`~sqlbus.engine.Tx`); a
        statement that made the database end the transaction leaves the block ended for every
        later call."""
        tx = self._connection()
        conn = tx.conn
        engine = self.agent.bus.engine
        with connections.inside:
            try:
                return fn(tx, *args)
            except engine.backend_errors as exc:
                raise engine.database_error(exc) from exc
            finally:
                if engine.tx_ended(conn):
                    self._ended = True

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        """Run the application's own SQL in this transaction (bound parameters); returns rows."""
        engine = self.agent.bus.engine
        return self._run(lambda tx: engine.execute_user_sql(tx.conn, sql, params))

    def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Like :meth:`Agent.publish`, committed with the transaction."""
        self._connection()
        bus = self.agent.bus
        now = bus.engine.now_ms()
        op = prepare_publish(bus.max_payload_bytes, self.agent.id, to, type, payload, now=now,
                             **headers)
        return self._run(op.write, now)

    def publish_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Like :meth:`Agent.publish_many`, committed with the transaction."""
        self._connection()
        bus = self.agent.bus
        now = bus.engine.now_ms()
        ops = prepare_many(bus.max_payload_bytes, self.agent.id, items, now)
        return self._run(write_all, self.agent.id, ops, now) if ops else []

    def broadcast(self, type: str, payload: Any = None, *, pattern: str = "*", **headers: Any) -> str:
        """Like :meth:`Agent.broadcast`, committed with the transaction."""
        self._connection()
        bus = self.agent.bus
        now = bus.engine.now_ms()
        op = prepare_broadcast(bus.max_payload_bytes, self.agent.id, type, payload, pattern,
                               dict(headers), now)
        return self._run(op.write, now)


def begin_block(tx: Transaction) -> None:
    """Begin ``tx`` without entering its block (the asyncio API enters it on its own thread)."""
    tx._begin()


def end_block(tx: Transaction, exc_type: Any, exc: Any, tb: Any) -> None:
    """End ``tx`` begun with :func:`begin_block`: commit, or roll back after an exception."""
    tx._end(exc_type, exc, tb)
