"""The PostgreSQL half of the engine (:class:`sqlbus.engine.Engine`): one schema of one
database, for agents on many hosts.

>>> engine = PostgresEngine("postgresql://app@db/team", schema="sqlbus", pool_size=10,
...                         connect_timeout=5.0, synchronous_commit="off",
...                         busy_timeout=5.0, clock=None)               # doctest: +SKIP

- **Connections.** A pool per bus (psycopg_pool, ``pool_size`` connections, autocommit; the
  bus's transactions are explicit ``BEGIN``/``COMMIT``), shared by its threads: a write or a
  read borrows a connection for its length and gives it back. ``synchronous_commit`` and
  ``lock_timeout`` (``busy_timeout``) are set on the bus's own connections only; a write's
  ``BEGIN`` goes with its first statement. A connection idle for more than ``CHECK_IDLE``
  seconds is checked before use, and a write whose first statement meets a dead connection
  takes another, so a restarted server costs callers
  nothing once it is back; while it is away calls raise :class:`DatabaseError` after
  ``connect_timeout``.
- **Time.** With ``clock=None`` the time is the server's: its ``clock_timestamp()`` is read
  when the bus opens and every ``CLOCK_RESYNC`` seconds, and the local monotonic clock
  counts from it, so hosts whose clocks disagree still agree on leases.
- **Fork.** A forked child never touches the parent's connections (closing one would end the
  parent's session): it drops them unclosed and opens a pool of its own on first use.
- **Wake-up.** :mod:`sqlbus.postgres.wakeup`.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
import psycopg_pool
from psycopg import pq, sql

from .. import connections
from ..engine import Engine, Tx, WriteContext, refuse_inside_block
from ..errors import DatabaseError
from ..waking import ANY, agent_tag
from .schema import check_schema_name, ensure_schema
from .storage import PostgresStorage
from .wakeup import Wakeup, channel_name

CHECK_IDLE = 2.0  # s: a pooled connection idle longer than this is checked before use
CLOCK_RESYNC = 60.0  # s: how often the server's clock is read again
_DAMAGE = (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError)
_BROKEN_AT_BEGIN_RETRIES = 3

_all_engines: weakref.WeakSet[PostgresEngine] = weakref.WeakSet()
_abandoned: list[Any] = []  # a forked child's inherited pools: kept, never closed or used


def _after_fork_in_child() -> None:
    for engine in list(_all_engines):
        engine.forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)


def redact(url: str) -> str:
    """The URL without its password (for messages and ``repr``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://?"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{netloc[1]}", parts.path, parts.query,
                       parts.fragment))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class TxConnection:
    """The connection a write's :class:`Tx` holds: a psycopg connection whose ``BEGIN`` goes
    out with the transaction's first statement, in one round trip (psycopg's pipeline mode),
    instead of in one of its own. A connection found dead at that first statement (the server
    restarted since it was last used) is given back and another taken: nothing was sent on it
    yet. Everything but ``execute`` and ``cursor`` is the connection's own."""

    __slots__ = ("engine", "conn", "begun")

    def __init__(self, engine: PostgresEngine, conn: psycopg.Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.begun = False  # BEGIN sent

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        if self.begun:
            return self.conn.execute(query, params, **kwargs)
        for attempt in range(_BROKEN_AT_BEGIN_RETRIES + 1):
            conn = self.conn
            try:
                with conn.pipeline():
                    conn.execute(b"BEGIN")
                    cursor = conn.execute(query, params, **kwargs)
                self.begun = True
                return cursor
            except psycopg.Error:
                if not conn.broken or attempt == _BROKEN_AT_BEGIN_RETRIES:
                    self.begun = True  # the transaction (if any) ends with the write
                    raise
                self.engine.give_back(conn)  # the pool drops a broken one
                self.conn = self.engine.borrow()
        raise AssertionError("unreachable")

    def cursor(self, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        if not self.begun:
            self.execute(b"SELECT 1")  # BEGIN, with the retry above
        return self.conn.cursor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class Write(WriteContext):
    """``with engine.write() as tx``: one transaction on a borrowed connection (its BEGIN sent
    with its first statement, see :class:`TxConnection`); psycopg errors become
    :class:`DatabaseError`; the waiters it marked are woken after commit."""

    __slots__ = ("engine", "conn", "tx")

    def __init__(self, engine: PostgresEngine) -> None:
        self.engine = engine

    def __enter__(self) -> Tx:
        refuse_inside_block()
        engine = self.engine
        connections.inside.__enter__()
        try:
            self.conn = TxConnection(engine, engine.borrow())
        except BaseException:
            connections.inside.__exit__()
            raise
        tx = self.tx = Tx(self.conn, engine.storage)
        return tx

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        engine, conn = self.engine, self.conn.conn
        try:
            if exc_type is None and self.conn.begun:
                # The notify (if one is due) goes in the commit's round trip: no extra one.
                notify = engine.wakeup.notify_statement(self.tx.tags)
                try:
                    conn.execute(b"COMMIT" if notify is None else notify + b"; COMMIT")
                except psycopg.Error as error:
                    engine.discard_transaction(conn)
                    if conn.broken or isinstance(error, psycopg.OperationalError):
                        raise DatabaseError(
                            f"{engine.path}: the connection broke during COMMIT "
                            f"({_first_line(error)}): whether the transaction was committed "
                            "is unknown; check before you retry"
                        ) from error
                    raise engine.database_error(error) from error
            else:
                engine.discard_transaction(conn)
        finally:
            engine.give_back(conn)
            connections.inside.__exit__()
        if exc_type is None:
            engine.wakeup.rang(self.tx.tags)
            engine.after_commit()
            return
        if isinstance(exc, psycopg.Error):
            raise engine.database_error(exc) from exc


class PostgresEngine(Engine):
    """Connections, transactions, the clock and wake-ups of one bus in a PostgreSQL schema."""

    kind = "postgresql"
    backend_errors = (psycopg.Error, psycopg_pool.PoolTimeout)

    def __init__(
        self, url: str, *, schema: str, pool_size: int, connect_timeout: float,
        synchronous_commit: str, busy_timeout: float, clock: Callable[[], float] | None,
    ) -> None:
        self.url = url
        self.schema = check_schema_name(schema)
        super().__init__(f"{redact(url)} (schema {schema})", busy_timeout=busy_timeout,
                         clock=clock or time.time)
        self.server_clock = clock is None
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.synchronous_commit = synchronous_commit
        self.storage = PostgresStorage(self.schema)
        self.schema_version = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._used: dict[int, float] = {}  # id(conn) -> time.monotonic() it was given back
        self._clock_base: tuple[float, float] | None = None  # (server epoch s, monotonic s)
        self._clock_read = 0.0
        self.wakeup = self._new_wakeup()
        _all_engines.add(self)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------

    def _conninfo_kwargs(self) -> dict[str, Any]:
        # psycopg turns a connect_timeout under 2 s into 2 s (FIELD-NOTES 1.1).
        return {"autocommit": True, "connect_timeout": max(2, math.ceil(self.connect_timeout)),
                "application_name": f"sqlbus:{self.schema}"}

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "SELECT set_config('synchronous_commit', %s, false),"
            " set_config('lock_timeout', %s, false)",
            (self.synchronous_commit, f"{int(self.busy_timeout * 1000)}ms"),
        )

    def _check(self, conn: psycopg.Connection) -> None:
        # Checking every borrow costs a round trip; a connection used a moment ago is fine.
        if time.monotonic() - self._used.get(id(conn), 0.0) > CHECK_IDLE:
            psycopg_pool.ConnectionPool.check_connection(conn)

    def _new_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        return psycopg_pool.ConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, open=False,
            timeout=self.connect_timeout, kwargs=self._conninfo_kwargs(),
            configure=self._configure, check=self._check, num_workers=1,
            name=f"sqlbus-{self.schema}", reconnect_timeout=365 * 86400.0,
        )

    def _pool_now(self) -> psycopg_pool.ConnectionPool[Any]:
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            with self._lock:
                if self.closed:
                    raise self.closed_error()
                if self._pool is None:
                    pool = self._new_pool()
                    pool.open(wait=False)
                    self._pool = pool
                pool = self._pool
        return pool

    def _open(self) -> None:
        try:
            conn = psycopg.connect(self.url, **self._conninfo_kwargs())
        except psycopg.Error as exc:
            raise DatabaseError(
                f"{self.path}: cannot connect to the server ({_first_line(exc)})"
            ) from exc
        try:
            self.schema_version = ensure_schema(conn, self.schema)
            self._read_server_clock(conn)
        finally:
            conn.close()
        self._pool_now()

    def _new_wakeup(self) -> Wakeup:
        return Wakeup(channel_name(self.schema), self._listener_connection, self._notify,
                      self._server_came_back)

    def _server_came_back(self) -> None:
        # The listener lost its connection and has a new one: the pool's idle connections
        # may be dead too (a restarted server); test them now rather than on a caller's call.
        pool = self._pool
        if pool is not None and self._pid == os.getpid() and not self.closed:
            try:
                pool.check()
            except Exception:
                pass

    def _listener_connection(self) -> psycopg.Connection:
        return psycopg.connect(self.url, **self._conninfo_kwargs())

    def _notify(self, channel: str, payload: str) -> None:
        with self.borrowed() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    # -- connections -------------------------------------------------------------------------

    def borrow(self) -> psycopg.Connection:
        """A connection of the pool (give it back with :meth:`give_back`)."""
        if self.closed:
            raise self.closed_error()
        try:
            return self._pool_now().getconn()
        except psycopg_pool.PoolTimeout as exc:
            raise DatabaseError(
                f"{self.path}: no connection within connect_timeout={self.connect_timeout} s "
                "(the server does not answer, or all pool_size connections are busy)"
            ) from exc

    def give_back(self, conn: psycopg.Connection) -> None:
        if self._pid != os.getpid():
            return  # the parent's: never touched
        pool = self._pool
        if pool is None or self.closed:
            if not conn.closed:
                conn.close()
            return
        if conn.info.transaction_status != pq.TransactionStatus.IDLE and not conn.broken:
            self.discard_transaction(conn)
        self._used[id(conn)] = time.monotonic()
        try:
            pool.putconn(conn)
        except Exception:  # a pool closed meanwhile
            conn.close()

    def discard_transaction(self, conn: psycopg.Connection) -> None:
        """Roll back whatever transaction ``conn`` has open (quietly: it may be broken)."""
        try:
            if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.execute(b"ROLLBACK")
        except psycopg.Error:
            pass

    @contextmanager
    def borrowed(self) -> Iterator[psycopg.Connection]:
        conn = self.borrow()
        try:
            yield conn
        finally:
            self.give_back(conn)

    def check_usable(self, conn: Any) -> None:
        if self.closed:
            raise self.closed_error()
        if self._pid != os.getpid():
            raise DatabaseError(
                f"{self.path}: this transaction was opened before os.fork() and belongs to the "
                "parent process; open a new one in the child"
            )

    def forget_connections(self) -> None:
        """In a forked child: drop the parent's pool and listener without closing them."""
        if self._pool is not None:
            _abandoned.append(self._pool)
        self._pool = None
        self._lock = threading.Lock()
        self._used = {}
        self.wakeup.forget()
        self.wakeup = self._new_wakeup()
        self.awaiting = {}
        self._pid = os.getpid()

    def close(self) -> None:
        self.wakeup.close()  # first: it stops the listener with a notify on a pooled connection
        self.closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close(timeout=1.0)

    # -- transactions ------------------------------------------------------------------------

    def write(self) -> Write:
        return Write(self)

    @contextmanager
    def reading(self, conn: Any = None) -> Iterator[psycopg.Connection]:
        connections.inside.__enter__()
        try:
            if conn is not None:
                self.check_usable(conn)
                own = None
            else:
                own = conn = self.borrow()
            try:
                yield conn
            except psycopg.Error as exc:
                raise self.database_error(exc) from exc
            except _DAMAGE as exc:
                raise DatabaseError(
                    f"{self.path}: a stored row does not decode ({type(exc).__name__}: {exc}); "
                    "run 'sqlbus check'"
                ) from exc
            finally:
                if own is not None:
                    self.give_back(own)
        finally:
            connections.inside.__exit__()

    def tx_ended(self, conn: Any) -> bool:
        if isinstance(conn, TxConnection):
            if not conn.begun:
                return False  # nothing sent yet: the transaction is still to begin
            conn = conn.conn
        return bool(conn.broken or conn.info.transaction_status != pq.TransactionStatus.INTRANS)

    def execute_user_sql(self, conn: psycopg.Connection, query: str, params: Any) -> list[tuple[Any, ...]]:
        # A savepoint per statement: a failing statement undoes itself, not the transaction
        # (PostgreSQL would otherwise refuse every later statement of the block).
        conn.execute(b"SAVEPOINT sqlbus_user")
        try:
            cursor = conn.execute(query, params or None)
        except psycopg.Error:
            if not conn.broken:
                conn.execute(b"ROLLBACK TO SAVEPOINT sqlbus_user")
            raise
        rows = cursor.fetchall() if cursor.description is not None else []
        conn.execute(b"RELEASE SAVEPOINT sqlbus_user")
        return rows

    def database_error(self, exc: BaseException) -> DatabaseError:
        if isinstance(exc, DatabaseError):
            return exc
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return DatabaseError(
                f"{self.path}: a row or table stayed locked for busy_timeout={self.busy_timeout} s")
        if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
            return DatabaseError(
                f"{self.path}: the server does not answer ({_first_line(exc)}); the bus "
                "reconnects by itself when it is back")
        return DatabaseError(f"{self.path}: {type(exc).__name__}: {_first_line(exc)}")

    # -- time and change tokens --------------------------------------------------------------

    def _read_server_clock(self, conn: psycopg.Connection) -> None:
        before = time.monotonic()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.monotonic()
        assert row is not None
        self._clock_base = (float(row[0]), (before + after) / 2)
        self._clock_read = after

    def server_time(self) -> float:
        """The server's clock now, in epoch seconds (re-read every ``CLOCK_RESYNC`` s)."""
        if time.monotonic() - self._clock_read > CLOCK_RESYNC:
            self._clock_read = time.monotonic()  # one thread re-reads; the rest use the old base
            try:
                with self.borrowed() as conn:
                    self._read_server_clock(conn)
            except (DatabaseError, psycopg.Error):
                pass  # the server is away: count on from the last reading
        base = self._clock_base
        assert base is not None
        return base[0] + (time.monotonic() - base[1])

    def now_ms(self) -> int:
        if self.server_clock:
            return int(self.server_time() * 1000)
        return super().now_ms()

    def change_token(self) -> int:
        self.wakeup.start(wait=self.connect_timeout)
        return self.wakeup.change_token

    def token_before_look(self) -> int:
        return self.change_token()  # the wake-up's count of rings: no read carries it

    def change_token_in(self, tx: Tx) -> int:
        return self.change_token()

    def wait_for_change(self, token: int, timeout: float, agent: str | None = None) -> int:
        """Wait for a ring after ``token`` that names ``agent`` (None: any ring) or says
        anything may have changed, for at most ``timeout`` and at most ``FALLBACK`` seconds
        (the caller looks again then)."""
        return self.wakeup.wait_since(token, timeout, ANY if agent is None else agent_tag(agent))

    # -- sizes and health --------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        """(bytes of the schema's tables and indexes, 0): PostgreSQL's WAL is the server's."""
        query = sql.SQL(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = {} AND c.relkind IN ('r', 'm', 't')"
        ).format(sql.Literal(self.schema))
        with self.reading() as conn:
            row = conn.execute(query).fetchone()
        return (int(row[0]) if row else 0), 0

    def pool_stats(self) -> dict[str, int]:
        """The pool's figures: size, idle connections, requests waiting, errors so far."""
        stats = self._pool_now().get_stats()
        return {
            "pool_max": self.pool_size,
            "pool_size": int(stats.get("pool_size", 0)),
            "pool_available": int(stats.get("pool_available", 0)),
            "requests_waiting": int(stats.get("requests_waiting", 0)),
            "connections_errors": int(stats.get("connections_errors", 0)),
        }
