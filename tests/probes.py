"""What the tests ask of a bus from outside its public API, in one place.

The behaviour tests check more than the API returns: that a rejected call wrote nothing, which
state a message's row is in, what a counter holds, that a waiting thread is parked. They ask it
of a probe, by name (``probe.message_states(message_id)``), never in SQL, so that a second
backend needs a probe of its own, not a rewrite of the tests. :class:`SQLiteProbe` answers
them by reading the SQLite file through a connection of its own (never the bus's), so what it
sees is what was committed; :class:`PostgresProbe` answers the same questions, by the same
names, about a bus's schema on a PostgreSQL server. What only a SQLite file has (its WAL, its
integrity check, its write lock, the doorbells) only :class:`SQLiteProbe` answers.

The probe's methods that take a bus, a delivery or ``monkeypatch``, and the module-level
helpers below the class, reach into the library's internals (the doorbells of
:mod:`sqlbus.wakeup`, the checkpointer, private attributes of a bus or delivery). This file is
the only test module that does: when an internal is renamed or moved, this is the one file to
fix.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import apsw
import pytest

import sqlbus
from sqlbus import ops
from sqlbus.agent import inbox_of
from sqlbus.delivery import settled
from sqlbus.engine import UPKEEP_CHECK_EVERY, Tx
from sqlbus.sqlite import checkpoint as checkpoints
from sqlbus.sqlite import doorbell, storage, wakeup

# The message states, by the names the tests use (SPEC's lifecycle: ready, leased, acked, dead,
# and scheduled for a later try or a delayed publish).
QUEUED, LEASED, ACKED, DEAD, SCHEDULED = "queued", "leased", "acked", "dead", "scheduled"
_STATE_NAMES = {
    storage.QUEUED: QUEUED,
    storage.LEASED: LEASED,
    storage.ACKED: ACKED,
    storage.DEAD: DEAD,
    storage.SCHEDULED: SCHEDULED,
}

_STATE_CODES = {name: code for code, name in _STATE_NAMES.items()}

SCHEMA_VERSION = storage.SCHEMA_VERSION  # what a file made or upgraded by this sqlbus says
APPLICATION_ID = storage.APPLICATION_ID  # what marks a SQLite file as a sqlbus database


@dataclass(frozen=True)
class InboxRow:
    """One (message, recipient) row as stored; times are epoch ms."""

    position: int  # publish order, never reused
    message_id: str
    sender: str
    agent: str | None  # the recipient; None: a broadcast that matched nobody (archived)
    type: str
    correlation_id: str | None
    priority: int
    state: str  # QUEUED, LEASED, ACKED, DEAD or SCHEDULED
    visible_at: int  # queued: ready at; leased: lease end; scheduled: due at
    expires_at: int | None
    attempts: int
    claims: int
    sent_at: int
    done_at: int | None
    last_error: str | None
    body: bytes  # the message's JSON, wherever it is kept
    storage: str  # "inline" (in the row), "shared" (kept once for several rows) or "other"


_ROW_COLUMNS = (
    "seq, message_id, sender, agent, type, correlation_id, priority, state, visible_at,"
    " expires_at, attempts, claims, sent_at, done_at, last_error,"
    " CASE WHEN length(body) THEN body"
    " ELSE coalesce((SELECT s.body FROM message_body AS s WHERE s.id = body_id), X'') END,"
    " CASE WHEN body_id IS NULL AND length(body) > 0 THEN 'inline'"
    " WHEN body_id IS NOT NULL AND length(body) = 0 THEN 'shared' ELSE 'other' END"
)

_ANY: Any = object()


def _filters(
    message_id: str | None, agent: str | None, type: str | None, state: str | None,
    mark: str = "?",
) -> tuple[str, tuple]:
    """The WHERE clause (and its parameters, each at a ``mark``) that picks the message rows
    asked for. Both backends number the states alike (0 queued ... 4 scheduled)."""
    where: list[str] = []
    params: list[object] = []
    if message_id is not None:
        where.append(f"message_id = {mark}")
        params.append(message_id)
    if agent is None:
        where.append("agent IS NULL")
    elif agent is not _ANY:
        where.append(f"agent = {mark}")
        params.append(agent)
    if type is not None:
        where.append(f"type = {mark}")
        params.append(type)
    if state is not None:
        where.append(f"state = {mark}")
        params.append(_STATE_CODES[state])
    return (" WHERE " + " AND ".join(where) if where else ""), tuple(params)


class _BusLooks:
    """The looks both probes answer alike: counts of tables both backends keep, those made of
    :meth:`inbox_rows`, and those at a bus object rather than its database."""

    # -- tables both backends keep alike (P: the driver's placeholder) ---------------------

    P = "?"
    ROW_COLUMNS = _ROW_COLUMNS  # inbox_rows' columns, in the backend's SQL

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    # -- inbox rows: one per message and recipient ------------------------------------------

    def inbox_rows(
        self,
        message_id: str | None = None,
        *,
        agent: str | None = _ANY,
        type: str | None = None,
        state: str | None = None,
    ) -> list[InboxRow]:
        """The rows (of one message, one recipient, type or state), in publish order."""
        where, params = _filters(message_id, agent, type, state, self.P)
        rows = self.sql(f"SELECT {self.ROW_COLUMNS} FROM message{where} ORDER BY seq", params)
        return [
            InboxRow(*row[:7], _STATE_NAMES[row[7]], *row[8:])  # type: ignore[arg-type, call-arg]
            for row in rows
        ]

    def inbox_count(
        self, *, agent: str | None = _ANY, type: str | None = None, state: str | None = None
    ) -> int:
        """How many rows are kept (for a recipient, of a type, in a state)."""
        where, params = _filters(None, agent, type, state, self.P)
        return self.sql(f"SELECT count(*) FROM message{where}", params)[0][0]

    def shared_body_count(self) -> int:
        """Bodies kept once for several recipients (a fan-out keeps one, not one per row)."""
        return self.sql("SELECT count(*) FROM message_body")[0][0]

    def dead_letter_count(self) -> int:
        """Dead-letter records kept (one per dead row)."""
        return self.sql("SELECT count(*) FROM dead_letter")[0][0]

    def counter(self, name: str, agent: str) -> int:
        """A total kept per agent (unhandled, late_responses, sent, ...); 0 when never counted."""
        rows = self.sql(f"SELECT value FROM counters WHERE name = {self.P} AND agent = {self.P}",
                        (name, agent))
        return rows[0][0] if rows else 0

    def counters(self, name: str) -> dict[str, int]:
        """A total for every agent that has one ('' is the whole bus)."""
        return dict(self.sql(f"SELECT agent, value FROM counters WHERE name = {self.P}", (name,)))

    def error_counts(self) -> dict[str, int]:
        """Handler failures by exception name."""
        return dict(self.sql("SELECT name, count FROM error_counts"))

    def request_timeout_count(self) -> int:
        """Requests remembered as timed out (their late responses are discarded)."""
        return self.sql("SELECT count(*) FROM request_timeout")[0][0]

    def interest_count(self) -> int:
        """Subscriptions recorded (type and event interests of every agent)."""
        return self.sql("SELECT count(*) FROM interest")[0][0]

    # -- looks made of inbox_rows ------------------------------------------------------------

    def message_states(self, message_id: str) -> list[str]:
        """The state of each row of a message (one per recipient), in publish order."""
        return [row.state for row in self.inbox_rows(message_id)]

    def message_ids(self, *, agent: str | None = _ANY, state: str | None = None) -> list[str]:
        """The message ids of the rows kept (of a recipient, in a state), in publish order."""
        return [row.message_id for row in self.inbox_rows(agent=agent, state=state)]

    def states_of(self, agent: str) -> dict[str, int]:
        """How many of an agent's rows are in each state (states with none left out)."""
        states: dict[str, int] = {}
        for row in self.inbox_rows(agent=agent):
            states[row.state] = states.get(row.state, 0) + 1
        return states

    @staticmethod
    def now_ms(bus: sqlbus.Bus) -> int:
        """The bus's clock, in the epoch ms it writes to the database."""
        return bus.engine.now_ms()

    @staticmethod
    def settled_as(delivery: sqlbus.Delivery) -> str | None:
        """How a delivery was settled (acked, retrying, dead, released), None while it is not."""
        return settled(delivery)

    @staticmethod
    def make_retention_due(bus: sqlbus.Bus) -> None:
        """The next write of this bus runs a background retention pass (as a minute later)."""
        bus._retention_upkeep.due = 0.0

    @staticmethod
    def count_looks(agent: sqlbus.Agent) -> list[int]:
        """A list that grows by one each time ``agent`` looks for or claims work (a wait that
        sleeps through a ring for someone else never looks)."""
        looks: list[int] = []
        inbox = inbox_of(agent)
        for name in ("look", "claim"):
            original = getattr(inbox, name)

            def counting(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                looks.append(1)
                return _original(*args, **kwargs)

            setattr(inbox, name, counting)
        return looks


class SQLiteProbe(_BusLooks):
    """Named looks at (and a few deliberate tamperings with) one bus's SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # -- raw access, for the tests about the file itself ----------------------------------------

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Run a read-only query on the file through a connection of our own."""
        conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def write(self, *statements: str) -> None:
        """Run statements that change the file, through a connection of our own."""
        conn = apsw.Connection(str(self.path))
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()

    def row_counts(self) -> dict[str, int]:
        """Rows of every table: equal before and after a call when the call wrote nothing."""
        conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            tables = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_schema WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%'"
                )
            ]
            count = 'SELECT count(*) FROM "{}"'
            return {t: cast(int, conn.execute(count.format(t)).fetchall()[0][0]) for t in tables}
        finally:
            conn.close()


    def replace_body(self, message_id: str, body: bytes) -> None:
        """Damage the file: the stored body of a message (to one recipient) becomes ``body``."""
        conn = apsw.Connection(str(self.path))
        try:
            conn.execute("UPDATE message SET body = ? WHERE message_id = ?", (body, message_id))
            assert conn.changes() >= 1, f"no row of {message_id} to damage"
        finally:
            conn.close()

    def lose_shared_bodies(self) -> None:
        """Damage the file: every body kept once for several recipients is gone."""
        self.write("DELETE FROM message_body")

    def lose_interests(self) -> None:
        """Damage the file: the recorded interests are gone, so any read of them fails."""
        self.write("DROP TABLE interest")

    def refuse_inserts_for(self, agent: str) -> None:
        """From now on, writing a row for ``agent`` fails (inside the writer's transaction)."""
        self.write(
            f"CREATE TRIGGER refuse BEFORE INSERT ON message WHEN NEW.agent = '{agent}' "
            "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
        )

    @contextlib.contextmanager
    def snapshot_held(self) -> Iterator[None]:
        """Inside: a reader of our own holds one read snapshot open (in WAL mode it pins the
        log: a checkpoint cannot copy back past it)."""
        conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM message").fetchall()  # holds this snapshot
            yield
            conn.execute("COMMIT")
        finally:
            conn.close()

    def write_lock_is_free(self) -> bool:
        """No one holds the file's write lock now (a writer of our own would not have to wait)."""
        conn = apsw.Connection(str(self.path))
        conn.set_busy_timeout(0)  # BUSY at once if anyone holds the write lock
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except apsw.BusyError:
            return False
        finally:
            conn.close()

    # -- state ------------------------------------------------------------------------------

    def state_key_count(self, prefix: str = "") -> int:
        """Keys of the shared state kept (deleted ones included, as tombstones), of those
        that start with ``prefix``."""
        return self.sql("SELECT count(*) FROM state WHERE substr(key, 1, length(?1)) = ?1",
                        (prefix,))[0][0]

    def state_log(self, key: str | None = None) -> list[tuple[int, str, int]]:
        """The change log of the shared state (of one key): (position, key, version), in order."""
        query = "SELECT seq, key, version FROM state_log"
        if key is None:
            return self.sql(query + " ORDER BY seq")
        return self.sql(query + " WHERE key = ? ORDER BY seq", (key,))

    # -- the file ---------------------------------------------------------------------------

    def checkpointed_size(self) -> int:
        """The database file's size once the WAL is copied into it and truncated."""
        conn = apsw.Connection(str(self.path))
        try:
            conn.set_busy_timeout(10_000)
            while conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0]:
                time.sleep(0.01)  # the bus's own checkpointer holds the checkpoint lock
        finally:
            conn.close()
        return os.path.getsize(self.path)

    def stored_bytes(self) -> int:
        """What the bus's data takes: the file once its WAL is copied back."""
        return self.checkpointed_size()

    def size_with_log(self) -> int:
        """The database file's size and its write-ahead log's, as they are now."""
        return sum(os.path.getsize(p) for p in (str(self.path), f"{self.path}-wal")
                   if os.path.exists(p))

    def schema_version(self) -> int:
        return self.sql("PRAGMA user_version")[0][0]

    def integrity(self) -> list[str]:
        """SQLite's own check of the file: ``["ok"]`` when sound."""
        return [row[0] for row in self.sql("PRAGMA integrity_check")]

    # -- the bus's own bookkeeping, seen from a test ------------------------------------------

    @staticmethod
    def waiters(bus: sqlbus.Bus) -> int:
        """Threads parked in a wait of this bus (receive, run, watch, tail)."""
        return bus.engine.wakeup._waiters

    @staticmethod
    def async_waiters(bus: sqlbus.Bus) -> int:
        """asyncio waits registered with this bus."""
        return len(bus.engine.wakeup._async)

    @staticmethod
    def open_connections(bus: sqlbus.Bus) -> int:
        """Connections the bus holds open (one per thread that used it, and its checkpointer)."""
        return len(bus.engine._connections)

    @staticmethod
    def count_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """A list that grows by one each time any bus runs a claim on the file."""
        claims: list[int] = []
        real_claim = storage.claim

        def counting_claim(*args: Any, **kwargs: Any) -> Any:
            claims.append(1)
            return real_claim(*args, **kwargs)

        monkeypatch.setattr(storage, "claim", counting_claim)
        return claims

    @staticmethod
    def count_write_transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """A list that grows by one each time any bus begins a write transaction."""
        writes: list[int] = []
        real_begin = storage.begin

        def counting_begin(conn: Any) -> None:
            writes.append(1)
            real_begin(conn)

        monkeypatch.setattr(storage, "begin", counting_begin)
        return writes


_PG_ROW_COLUMNS = (
    "seq, message_id, sender, agent, type, correlation_id, priority, state, visible_at,"
    " expires_at, attempts, claims, sent_at, done_at, last_error,"
    " coalesce(body, (SELECT s.body FROM message_body AS s WHERE s.id = body_id), ''::bytea),"
    " CASE WHEN body_id IS NULL AND octet_length(body) > 0 THEN 'inline'"
    " WHEN body_id IS NOT NULL AND body IS NULL THEN 'shared' ELSE 'other' END"
)


class PostgresProbe(_BusLooks):
    """Named looks at (and a few deliberate tamperings with) one bus's PostgreSQL schema, by the
    names :class:`SQLiteProbe` uses. Each look opens an autocommit connection of its own with
    the bus's schema as its search path, so the SQL is the SQLite probe's with ``%s`` for
    ``?``, and what it sees is what was committed."""

    P = "%s"
    ROW_COLUMNS = _PG_ROW_COLUMNS

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        try:
            conn.execute(f'SET search_path TO "{self.schema}"')
            yield conn
        finally:
            conn.close()

    # -- raw access ---------------------------------------------------------------------------

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Run a query (``%s`` parameters) in the bus's schema through a connection of our own."""
        with self._connection() as conn:
            return conn.execute(query, params).fetchall()

    def write(self, *statements: str) -> None:
        """Run statements that change the schema, through a connection of our own."""
        with self._connection() as conn:
            for statement in statements:
                conn.execute(statement)

    def row_counts(self) -> dict[str, int]:
        """Rows of every table: equal before and after a call when the call wrote nothing."""
        with self._connection() as conn:
            tables = [row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))]
            count = 'SELECT count(*) FROM "{}"'
            return {t: conn.execute(count.format(t)).fetchall()[0][0] for t in tables}


    def replace_body(self, message_id: str, body: bytes) -> None:
        """Damage the schema: the stored body of a message (to one recipient) becomes ``body``."""
        with self._connection() as conn:
            cur = conn.execute("UPDATE message SET body = %s, body_id = NULL"
                               " WHERE message_id = %s", (body, message_id))
            assert cur.rowcount >= 1, f"no row of {message_id} to damage"

    def lose_shared_bodies(self) -> None:
        """Damage the schema: every body kept once for several recipients is gone (behind the
        foreign key's back: replica mode skips its trigger)."""
        self.write("SET session_replication_role = replica", "DELETE FROM message_body")

    def lose_interests(self) -> None:
        """Damage the schema: the recorded interests are gone, so any read of them fails."""
        self.write("DROP TABLE interest")

    def refuse_inserts_for(self, agent: str) -> None:
        """From now on, writing a row for ``agent`` fails (inside the writer's transaction)."""
        self.write(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'refused for the test'; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT ON message FOR EACH ROW"
            f" WHEN (NEW.agent = '{agent}') EXECUTE FUNCTION refuse()",
        )

    # -- state ------------------------------------------------------------------------------

    def state_key_count(self, prefix: str = "") -> int:
        """Keys of the shared state kept (deleted ones included, as tombstones), of those
        that start with ``prefix``."""
        return self.sql("SELECT count(*) FROM state WHERE starts_with(key, %s)", (prefix,))[0][0]

    def state_log(self, key: str | None = None) -> list[tuple[int, str, int]]:
        """The change log of the shared state (of one key): (position, key, version), in order.
        The position is ``pos``, given in commit order (``seq`` is taken at insert)."""
        query = "SELECT pos, key, version FROM state_log"
        if key is None:
            return self.sql(query + " ORDER BY pos")
        return self.sql(query + " WHERE key = %s ORDER BY pos", (key,))

    def stored_bytes(self) -> int:
        """What the bus's tables and indexes take on the server (``db_bytes`` of SPEC 12)."""
        return self.sql("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint"
                        " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
                        " WHERE n.nspname = %s AND c.relkind = 'r'", (self.schema,))[0][0]

    def schema_version(self) -> int:
        return int(self.sql("SELECT value FROM sqlbus_meta WHERE key = 'schema_version'")[0][0])

    # -- the bus's own bookkeeping, seen from a test ------------------------------------------

    @staticmethod
    def count_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """A list that grows by one each time any bus runs a claim on PostgreSQL."""
        from sqlbus.postgres.storage import PostgresStorage

        claims: list[int] = []
        real_claim = PostgresStorage.claim

        def counting_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
            claims.append(1)
            return real_claim(self, *args, **kwargs)

        monkeypatch.setattr(PostgresStorage, "claim", counting_claim)
        return claims

    @staticmethod
    def count_write_transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """A list that grows by one each time any bus opens a write transaction on PostgreSQL
        (the engine's Write takes a connection, whose BEGIN goes with the first statement)."""
        from sqlbus.postgres.engine import Write

        writes: list[int] = []
        real_enter = Write.__enter__

        def counting_enter(self: Any) -> Any:
            writes.append(1)
            return real_enter(self)

        monkeypatch.setattr(Write, "__enter__", counting_enter)
        return writes


# ---------------------------------------------------------------------------------------------
# Maintenance below the public API (sqlbus.ops): the background retention pass and a tail
# from the first position.

UPKEEP_BATCH = ops.UPKEEP_BATCH  # rows one background retention transaction deletes at most
UPKEEP_EXCESS = ops.UPKEEP_EXCESS  # rows above archive_max_messages one pass prunes at most


def run_upkeep(bus: sqlbus.Bus) -> int:
    """Run one background retention pass now; how many rows it moved or deleted."""
    return ops.upkeep(bus.engine)


def prune_in_batches(
    bus: sqlbus.Bus,
    sent_older_than: float | None,
    dead_older_than: float | None,
    *,
    batch: int,
    progress: Callable[[int, int], None],
) -> sqlbus.PruneResult:
    """``bus.prune`` in batches of ``batch`` rows, reporting (done, total) after each."""
    return ops.prune(bus.engine, sent_older_than, dead_older_than, batch=batch, progress=progress)


def tail_from_start(bus: sqlbus.Bus, until: str | None = None) -> list[sqlbus.SentRecord]:
    """Every message kept, in publish order, as ``bus.tail`` yields them: those there now, or
    (``until`` a message id) up to that message, waiting up to 10 s for it (on PostgreSQL a
    transaction of another test in the same database holds a tail back until it ends)."""
    if until is None:
        return list(ops.tail(bus.engine, None, None, timeout=0.0, from_seq=0))
    records = []
    for record in ops.tail(bus.engine, None, None, timeout=10.0, from_seq=0):
        records.append(record)
        if record.message.id == until:
            break
    return records


# ---------------------------------------------------------------------------------------------
# The SQLite backend's own machinery: its connection, and the doorbells (sqlbus.sqlite.wakeup) that
# wake waiting threads and processes. Only the tests of that machinery use these.

WAKE = doorbell.WAKE  # suffix of a doorbell's awake flag: <stem><WAKE>
GENERATION = doorbell.GENERATION  # the doorbell directory's shared counter file
OVERFLOW = doorbell.OVERFLOW  # rings a doorbell holds before a ring means "anything changed"
MAX_TAGS = wakeup.MAX_TAGS  # recipients of one commit past which it rings "anything changed"


def connection(bus: sqlbus.Bus) -> apsw.Connection:
    """This thread's connection of the bus (to read pragmas or checkpoint as the bus would)."""
    return bus.engine.connection()


def checkpoint(bus: sqlbus.Bus, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """Checkpoint the WAL on this thread's connection of the bus, as the bus itself would:
    (busy, frames in the WAL, frames copied back)."""
    return storage.checkpoint(bus.engine.connection(), mode)


def wal_limit() -> int:
    """Bytes of WAL past which the checkpointer restarts the WAL (and trims its file to)."""
    return checkpoints.WAL_LIMIT


def wal_check_every() -> float:
    """Seconds between a writing process's looks at whether WAL upkeep is due."""
    return UPKEEP_CHECK_EVERY


def tune_checkpointer(
    monkeypatch: pytest.MonkeyPatch,
    *,
    frames: int | None = None,
    wal_limit: int | None = None,
    backoff: float | None = None,
) -> None:
    """Make the checkpointer thread start after ``frames`` WAL frames, restart the WAL past
    ``wal_limit`` bytes, and wait ``backoff`` s after a restart readers kept from finishing."""
    for name, value in (("CHECKPOINT_FRAMES", frames), ("WAL_LIMIT", wal_limit),
                        ("WAL_BACKOFF", backoff)):
        if value is not None:
            monkeypatch.setattr(checkpoints, name, value)


def record_wal_folds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list of the name of the thread of each pass that copies the WAL back and restarts it."""
    threads: list[str] = []
    fold = checkpoints.fold_wal

    def recording(conn: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return fold(conn, **kwargs)

    monkeypatch.setattr(checkpoints, "fold_wal", recording)
    return threads


def record_checkpoint_modes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list of the mode (PASSIVE, RESTART, ...) of each checkpoint the checkpointer thread runs."""
    modes: list[str] = []
    checkpoint = storage.checkpoint

    def recording(conn: Any, mode: str = "PASSIVE") -> Any:
        if threading.current_thread().name == "sqlbus-checkpoint":
            modes.append(mode)
        return checkpoint(conn, mode)

    monkeypatch.setattr(storage, "checkpoint", recording)
    return modes


def fallback_poll() -> float:
    """Seconds a waiter sleeps at most before it looks at the file again without a ring."""
    return wakeup.FALLBACK


def set_fallback_poll(seconds: float, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Make the fallback poll ``seconds`` long (longer than a wait: only a ring can end it).
    Without ``monkeypatch`` (in a child process) the change lasts for the process."""
    if monkeypatch is None:
        wakeup.FALLBACK = seconds
    else:
        monkeypatch.setattr(wakeup, "FALLBACK", seconds)


def set_refresh_every(seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """How often ringers re-list the doorbell directory even when its generation is unchanged."""
    monkeypatch.setattr(doorbell, "REFRESH_EVERY", seconds)


def doorbell_dir(db_path: Path | str) -> Path:
    return Path(doorbell.doorbell_dir(str(db_path)))


def doorbells(db_path: Path | str) -> list[Path]:
    """The doorbell sockets bound in the file's doorbell directory, by name."""
    directory = doorbell_dir(db_path)
    return sorted(directory.glob("*.sock")) if directory.exists() else []


def doorbell_path(bus: sqlbus.Bus) -> str | None:
    """The path of this process's doorbell for the bus, None while it has none."""
    return bus.engine.wakeup.doorbell_path


def leading(bus: sqlbus.Bus) -> bool:
    """A thread of the bus is past its first look and polls the doorbell for everyone."""
    return bus.engine.wakeup._leading


def peers(bus: sqlbus.Bus) -> list[str]:
    """The doorbells (of other processes) the bus last listed to ring, by name."""
    return [peer[0] for peer in bus.engine.wakeup._ringer.peers]


def ring(bus: sqlbus.Bus, agents: Iterable[str]) -> None:
    """Ring the doorbells of the processes waiting for ``agents``, as a commit would."""
    bus.engine.wakeup.ring({wakeup.agent_tag(agent) for agent in agents})


def bump_generation(bus: sqlbus.Bus) -> None:
    """Tell ringers that the doorbell directory changed (as a new waiter does)."""
    bus.engine.wakeup._directory.bump_generation()


def drain(bus: sqlbus.Bus) -> int:
    """Empty this process's doorbell; how many rings were waiting in it."""
    got, _tags = bus.engine.wakeup._doorbell.drain()
    return got


@contextlib.contextmanager
def sends(bus: sqlbus.Bus, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Inside: every ring the bus tries to send to another process lands in the list."""
    sent: list[bytes] = []
    sender = bus.engine.wakeup._directory.sender
    bus.engine.wakeup._directory.sender = None  # any attempt to send would now show in ``sent``
    monkeypatch.setattr(bus.engine.wakeup, "_kick", lambda payload: sent.append(payload))
    try:
        yield sent
    finally:
        bus.engine.wakeup._directory.sender = sender


def agent_tag(agent: str) -> bytes:
    """The short hash a doorbell's name and a ring carry for an agent (never its id)."""
    return wakeup.agent_tag(agent)


def doorbell_name(stem: str, wants_any: bool, agents: Iterable[str]) -> str:
    """The name a process waiting for ``agents`` (or for anything) gives its doorbell."""
    return doorbell.doorbell_name(stem, wants_any, {wakeup.agent_tag(a) for a in agents})


def marks_of(agents: Iterable[str]) -> set[bytes] | None:
    """The tags a commit writing rows for ``agents`` rings with (None: "anything changed")."""
    tx = Tx(cast(Any, None), storage)
    tx.mark(agents)
    return tx.tags
