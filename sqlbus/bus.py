"""The bus: open a database file, register agents, read the archive and dead letters, and
operate the bus (metrics, retention, checks, backup).

>>> import sqlbus
>>> with sqlbus.connect("team.db") as bus:                    # doctest: +SKIP
...     alice, bob = bus.agent("alice"), bus.agent("bob")
...     alice.publish("bob", "notification", {"text": "hi"})
...     for d in bob.receive(limit=10, wait=1.0):
...         with d:                         # clean exit acks; an exception fails (retry)
...             print(d.message.payload)

A :class:`Bus` holds the policy (defaults, the clock) and the :class:`~sqlbus.engine.Engine`
(connections, transactions, wake-ups); agents (:mod:`sqlbus.agent`) do the messaging.
Every write is one short ``BEGIN IMMEDIATE`` transaction; no transaction is open while a
handler runs (claim, run the handler, ack in another).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

import msgspec

from . import ops
from .agent import Agent
from .arguments import STORED, Stored, check_limit, check_types, seconds
from .delivery import Delivery
from .encoding import check_agent_id
from .engine import Engine, check_clock
from .errors import AuthenticationError, NotFoundError, ValidationError
from .messages import ENVELOPE_ALLOWANCE, iso_ms, listed_message
from .metrics import AgentStats, Metrics, compute_metrics, compute_stats, snapshot
from .ops import RetentionUpkeep, retention_changes, retention_from_row, store_retention
from .records import (
    AgentInfo,
    DeadLetter,
    Lease,
    MessageTrace,
    SentRecord,
    Subscription,
    dead_letter_from_row,
    dead_letter_ref,
    ref_text,
    stored_ttl,
)
from .sqlite.engine import SqliteEngine
from .state import StateStore
from .transaction import Transaction

__all__ = [
    "connect",
    "Bus",
    "Agent",
    "Delivery",
    "Transaction",
    "AgentInfo",
    "Subscription",
    "SentRecord",
    "DeadLetter",
    "DURABILITY",
    "STORED",
]

DURABILITY = {"normal": "NORMAL", "full": "FULL"}
# PostgreSQL: synchronous_commit of the bus's own transactions (SPEC 12).
SYNCHRONOUS_COMMIT = {"normal": "off", "full": "on"}


class _DefaultMode(int):
    """The default ``mode`` (0o600), told apart from one the caller gave."""


DEFAULT_MODE = _DefaultMode(0o600)


def is_postgres_url(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL database rather than a file path."""
    return target.startswith(("postgresql://", "postgres://"))


def _postgres_engine(
    url: str, durability: str, busy_timeout: float, clock: Callable[[], float] | None,
    schema: str | None, pool_size: int | None, connect_timeout: float | None,
) -> Engine:
    try:
        from .postgres.engine import PostgresEngine
    except ImportError as exc:
        raise ImportError(
            f"a postgresql:// URL needs the extra sqlbus[postgres] (pip install 'sqlbus[postgres]'): {exc}"
        ) from exc
    from .postgres.schema import check_schema_name

    size = 10 if pool_size is None else pool_size
    if type(size) is not int or size < 1:
        raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
    timeout = 5.0 if connect_timeout is None else seconds(connect_timeout, "connect_timeout",
                                                          allow_zero=False)
    return PostgresEngine(
        url, schema=check_schema_name("sqlbus" if schema is None else schema), pool_size=size,
        connect_timeout=timeout, synchronous_commit=SYNCHRONOUS_COMMIT[durability],
        busy_timeout=busy_timeout, clock=clock,
    )


def check_group_commit_delay(delay: object) -> float:
    """``group_commit_delay``: seconds >= 0 (at most 1), else ValueError."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 1:
        raise ValueError(f"group_commit_delay must be a number of seconds from 0 to 1, got {delay!r}")
    return float(delay)


ALIVE_WITHIN_MS = 60_000  # an agent seen within this window counts as alive
NON_RETRYABLE: tuple[type[BaseException], ...] = (
    ValidationError,
    msgspec.ValidationError,
    AuthenticationError,
    PermissionError,
)


def connect(
    path: str | os.PathLike[str],
    *,
    durability: str = "normal",
    lease: float = 30.0,
    max_attempts: int = 5,
    backoff_base: float = 1.0,
    backoff_cap: float = 16.0,
    max_payload_bytes: int = 1_048_576,
    busy_timeout: float = 5.0,
    clock: Callable[[], float] | None = None,
    mode: int = DEFAULT_MODE,
    non_retryable: Iterable[type[BaseException]] = (),
    archive_retention: float | None | Stored = STORED,
    dead_retention: float | None | Stored = STORED,
    archive_max_messages: int | None | Stored = STORED,
    schema: str | None = None,
    pool_size: int | None = None,
    connect_timeout: float | None = None,
    group_commit_delay: float = 0.0,
) -> Bus:
    """Open (creating if needed) the sqlbus database at ``path`` and return a :class:`Bus`.

    >>> bus = sqlbus.connect("team.db", durability="full")   # doctest: +SKIP
    >>> bus = sqlbus.connect("postgresql://app@db/team", schema="sqlbus")  # doctest: +SKIP

    A ``postgresql://`` or ``postgres://`` URL opens the bus in that database's ``schema``
    (default ``"sqlbus"``; needs the extra ``sqlbus[postgres]``), with ``pool_size``
    connections (10) and ``connect_timeout`` seconds (5.0) to wait for the server; those three
    are for URLs only, as ``mode`` is for files only (``ValueError`` otherwise).

    ``durability``: ``"normal"`` (commits survive a process crash) or ``"full"`` (fsync every
    commit: they also survive power loss). ``lease``, ``backoff_*`` and ``busy_timeout`` are
    seconds; ``clock`` returns epoch seconds (for tests); ``mode`` is the new file's
    permissions; ``non_retryable`` adds exception classes that dead-letter at once. A file that
    is not a healthy sqlbus database raises :class:`DatabaseError` and is left untouched.
    Retention is a policy stored in the database, for every process (:meth:`Bus.retention`):
    acked messages of the sent archive are deleted ``archive_retention`` seconds (7 days) after
    their ack (state changes in the log watch replays age the same way), dead letters
    ``dead_retention`` seconds (30 days) after they failed, and above ``archive_max_messages``
    (1,000,000) acked messages the oldest go first; None keeps them for ever (no bound). The
    keywords given are stored (as :meth:`Bus.set_retention`); a connect without them
    (``STORED``) leaves the stored policy as it is. Pruning runs a small batch at a time, at
    most about once a minute per process, after one of its writes; totals in
    :meth:`Bus.metrics` keep counting what it deletes.

    Concurrent writes of one bus (threads, asyncio calls) share a transaction when they meet
    (group commit: one commit, one fsync at ``durability="full"``, for all): each call returns
    once its own write is committed, with its own result or error. A caller alone never
    waits; ``group_commit_delay`` (seconds, default 0) makes a group wait that long for
    company before it writes, trading latency for throughput. PostgreSQL accepts it and
    commits each call on its own (its pool commits in parallel).
    """
    return Bus(
        path,
        durability=durability,
        lease=lease,
        max_attempts=max_attempts,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        max_payload_bytes=max_payload_bytes,
        busy_timeout=busy_timeout,
        clock=clock,
        mode=mode,
        non_retryable=non_retryable,
        archive_retention=archive_retention,
        dead_retention=dead_retention,
        archive_max_messages=archive_max_messages,
        schema=schema,
        pool_size=pool_size,
        connect_timeout=connect_timeout,
        group_commit_delay=group_commit_delay,
    )



class Bus:
    """A handle on one sqlbus database file, shared by the agents of this process.

    Safe to share between threads (each thread gets its own connection) and across
    ``os.fork()`` (a child opens its own connections). Use :func:`connect` to make one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "normal",
        lease: float = 30.0,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 16.0,
        max_payload_bytes: int = 1_048_576,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
        mode: int = DEFAULT_MODE,
        non_retryable: Iterable[type[BaseException]] = (),
        archive_retention: float | None | Stored = STORED,
        dead_retention: float | None | Stored = STORED,
        archive_max_messages: int | None | Stored = STORED,
        schema: str | None = None,
        pool_size: int | None = None,
        connect_timeout: float | None = None, group_commit_delay: float = 0.0,
    ) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be 'normal' or 'full', got {durability!r}")
        self.lease = seconds(lease, "lease", allow_zero=False)
        if type(max_attempts) is not int or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        self.backoff_base = seconds(backoff_base, "backoff_base")
        self.backoff_cap = seconds(backoff_cap, "backoff_cap")
        if type(max_payload_bytes) is not int or max_payload_bytes < 2:
            raise ValueError(f"max_payload_bytes must be an int >= 2, got {max_payload_bytes!r}")
        self.busy_timeout = seconds(busy_timeout, "busy_timeout")
        group_delay = check_group_commit_delay(group_commit_delay)
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning epoch seconds")
        extra = tuple(non_retryable)
        for cls in extra:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(f"non_retryable takes exception classes, got {cls!r}")
        url = os.fspath(path)
        postgres = is_postgres_url(url)
        if postgres:
            if type(mode) is not _DefaultMode:
                raise ValueError("mode is for a database file; a PostgreSQL bus has no file")
        else:
            given = [name for name, value in (("schema", schema), ("pool_size", pool_size),
                                              ("connect_timeout", connect_timeout))
                     if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for a postgresql:// URL, "
                                 f"not a file path ({url!r})")
        self.path = url if postgres else os.path.abspath(url)
        self.durability = durability
        self.max_attempts = max_attempts
        self.max_payload_bytes = max_payload_bytes
        self.clock: Callable[[], float] = clock or time.time
        if clock is not None:
            check_clock(self.clock)  # a clock out of range is refused before the file is touched
        self.non_retryable: tuple[type[BaseException], ...] = NON_RETRYABLE + extra
        retention = retention_changes(archive_retention, dead_retention, archive_max_messages)
        #: The engine under this bus (internal: connections, transactions, wake-ups).
        self.engine: Engine = (
            _postgres_engine(url, durability, self.busy_timeout, clock, schema, pool_size,
                             connect_timeout)
            if postgres else
            SqliteEngine(self.path, synchronous=DURABILITY[durability],
                         busy_timeout=self.busy_timeout, clock=self.clock, mode=mode)
        )
        if postgres:
            self.path = self.engine.path  # the URL without its password, and the schema
        self.engine.max_body = max_payload_bytes + ENVELOPE_ALLOWANCE
        self.engine.group_commit_delay = group_delay
        self._retention_upkeep = RetentionUpkeep(self.engine)
        self.engine.upkeep = self._retention_upkeep.after_write
        if retention:
            try:
                store_retention(self.engine, retention)
            except BaseException:
                self.close()
                raise
        self.state = StateStore(self, None)

    def close(self) -> None:
        """Close every connection this bus opened; a thread waiting in it wakes at once with
        :class:`DatabaseError`, as does every later call. Safe to call twice."""
        self.engine.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sqlbus.Bus {self.path!r} durability={self.durability!r}>"

    # -- agents ----------------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent:
        """Register (or re-register) ``agent_id`` and return its handle; records last_seen."""
        check_agent_id(agent_id)
        now = self.engine.now_ms()
        with self.engine.write() as tx:
            tx.storage.register_agent(tx.conn, agent_id, now)
        return Agent(self, agent_id)

    def agents(self) -> list[AgentInfo]:
        """The registry: every agent with its registration time, last_seen, status, alive
        and subscriptions."""
        now = self.engine.now_ms()
        storage = self.engine.storage
        with self.engine.reading() as conn:
            storage.begin_read(conn)  # agents and interests of the same commit
            try:
                rows = storage.list_agents(conn)
                interests = storage.list_interests(conn)
            finally:
                storage.end_read(conn)
        subscriptions: dict[str, list[Subscription]] = {}
        for agent_id, kind, pattern, subscribed_at in interests:
            subscriptions.setdefault(agent_id, []).append(
                Subscription(kind, pattern, iso_ms(subscribed_at)))
        return [
            AgentInfo(
                id=agent_id,
                registered_at=iso_ms(registered_at),
                last_seen=iso_ms(last_seen),
                status=status,
                alive=now - last_seen <= ALIVE_WITHIN_MS,
                subscriptions=subscriptions.get(agent_id, []),
            )
            for agent_id, registered_at, last_seen, status in rows
        ]

    # -- archive and dead letters -----------------------------------------------------------

    def sent(self, agent: str | None = None, limit: int = 100) -> list[SentRecord]:
        """The sent archive, newest first; ``agent`` keeps messages sent by or to it."""
        if agent is not None:
            check_agent_id(agent, "agent")
        check_limit(limit)
        with self.engine.reading() as conn:
            rows = self.engine.storage.list_sent(conn, agent, limit, self.engine.max_body)
        return [  # a row that cannot be decoded shows as an error message (SPEC 4.2)
            SentRecord(message=listed_message(r.recipients, r.message_id, r.sender, r.type,
                                              r.priority, r.sent_at, r.body),
                       recipients=r.recipients, sent_at=iso_ms(r.sent_at), payload_bytes=r.length)
            for r in rows
        ]

    def dead_letters(
        self, agent: str | None = None, limit: int = 100, *, reason: str | None = None,
        after: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, newest first; ``agent`` keeps those of one recipient, ``reason``
        those dead for it (``"failed"``, ``"expired"``, ...). ``after``: the number of the last
        dead letter of a page; the next page is those older than it.

        >>> page = bus.dead_letters(limit=50)                              # doctest: +SKIP
        >>> more = bus.dead_letters(limit=50, after=page[-1].id)           # doctest: +SKIP
        """
        if agent is not None:
            check_agent_id(agent, "agent")
        check_limit(limit)
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"reason must be a str, got {reason!r}")
        if after is not None and (type(after) is not int or after < 0):
            raise ValueError(f"after must be a dead-letter number, got {after!r}")
        with self.engine.reading() as conn:
            rows = self.engine.storage.list_dead_letters(conn, agent, limit, self.engine.max_body,
                                                         reason, after)
        return [dead_letter_from_row(row) for row in rows]

    def dead_letter(self, ref: int | str) -> DeadLetter | None:
        """A dead letter by ``ref``: its number (int), or a message id (str), which names
        every dead letter of that message (one per recipient): the newest is returned. None
        when ``ref`` names none."""
        names = dead_letter_ref(ref)
        if names is None:
            return None
        with self.engine.reading() as conn:
            row = self.engine.storage.get_dead_letter(conn, *names, max_body=self.engine.max_body)
        return None if row is None else dead_letter_from_row(row)

    def requeue(self, ref: int | str) -> str:
        """Put dead letters back in their inboxes (attempts reset, fresh TTL) and return the
        message id. ``ref`` is a dead-letter number (int), or a message id (str): then every
        dead letter of that message goes back, in one transaction. Raises
        :class:`sqlbus.NotFoundError` when ``ref`` names none."""
        names = dead_letter_ref(ref)
        now = self.engine.now_ms()
        with self.engine.write() as tx:
            targets = [] if names is None else tx.storage.requeue_targets(tx.conn, *names)
            if not targets:
                raise NotFoundError(f"no dead letter {ref_text(ref)}")
            for dead_letter_id, _message_id, ttl in targets:
                tx.storage.requeue(tx.conn, dead_letter_id, now, stored_ttl(ttl))
        return targets[0].message_id

    def purge_dead_letters(self, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (None = all); returns how many."""
        cutoff = None
        if older_than is not None:
            cutoff = self.engine.now_ms() - int(seconds(older_than, "older_than") * 1000)
        with self.engine.write() as tx:
            return tx.storage.purge_dead_letters(tx.conn, cutoff)

    def requeue_dead_letters(self, agent: str | None = None, reason: str | None = None) -> list[str]:
        """Requeue every dead letter of ``agent`` with ``reason`` (None: any), in one
        transaction, like :meth:`requeue`; returns the message ids, oldest first."""
        if agent is not None:
            check_agent_id(agent, "agent")
        now = self.engine.now_ms()
        ids = []
        with self.engine.write() as tx:
            for dead_letter_id, message_id, ttl in tx.storage.dead_letter_ids(tx.conn, agent, reason):
                tx.storage.requeue(tx.conn, dead_letter_id, now, stored_ttl(ttl))
                ids.append(message_id)
        return ids

    # -- operations: metrics, stats, retention, checks, backup (see sqlbus.metrics) --------------

    def metrics(self) -> Metrics:
        """Bus-wide :class:`sqlbus.Metrics` read from the file (the same in every process).

        >>> m = bus.metrics(); m.messages_sent, m.queue_depths["bob"].ready   # doctest: +SKIP
        """
        sizes = self.engine.sizes()
        with self.engine.reading() as conn:
            return compute_metrics(self.engine.storage, conn, self.engine.now_ms(), sizes)

    def stats(self) -> list[AgentStats]:
        """Per-agent inbox depths (ready, leased, retrying, scheduled, expired, dead, oldest
        ready age in ms) of every registered agent and every recipient, read in one snapshot;
        cheap at any archive size."""
        now = self.engine.now_ms()
        storage = self.engine.storage
        with self.engine.reading() as conn, snapshot(storage, conn):
            return compute_stats(storage, conn, now, storage.agent_ids(conn))

    def peek(self, agent: str, limit: int = 10) -> list[ops.InboxEntry]:
        """Look at ``agent``'s inbox without claiming anything, in one snapshot: ready
        messages in the order receive takes them, then leased, retrying and scheduled ones by
        when they become claimable, expired ones last."""
        check_agent_id(agent, "agent")
        check_limit(limit)
        return ops.peek(self.engine, agent, limit)

    def peek_page(
        self,
        agent: str,
        *,
        after: str | None = None,
        limit: int = 50,
        type: str | None = None,
        status: str | None = None,
        priority: int | None = None,
        text: str | None = None,
        scan: int = 10_000,
    ) -> ops.PeekPage:
        """A page of ``agent``'s inbox in :meth:`peek`'s order, for browsing a large one:
        ``after`` is the position the page before gave (each page a seek in an index, never
        an OFFSET). Filters: ``type``, ``status`` (a peek status), ``priority`` (1-5),
        ``text`` (in the payload's JSON, any case). At most ``scan`` rows are looked at per
        page, so a rare match gives a short page that says where to go on.

        >>> page = bus.peek_page("bob", status="ready")              # doctest: +SKIP
        >>> page = bus.peek_page("bob", status="ready", after=page.after)   # doctest: +SKIP
        """
        check_agent_id(agent, "agent")
        check_limit(limit)
        check_limit(scan)
        if status is not None and status not in ops.PEEK_STATUSES:
            raise ValueError(f"status must be one of {', '.join(ops.PEEK_STATUSES)}, got {status!r}")
        if priority is not None and (
                isinstance(priority, bool) or not isinstance(priority, int)
                or not 1 <= priority <= 5):
            raise ValueError(f"priority must be an int 1..5, got {priority!r}")
        for name, value in (("type", type), ("text", text)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a str, got {value!r}")
        return ops.peek_page(self.engine, agent, after=after, limit=limit, type=type,
                             status=status, priority=priority, text=text, scan=scan)

    def leases(self, agent: str | None = None, limit: int = 100) -> list[Lease]:
        """Deliveries in flight (leases running now), the soonest to end first; ``agent``
        keeps those of its inbox.

        >>> [(l.agent, l.message.id, l.lease_ends_at) for l in bus.leases()]   # doctest: +SKIP
        """
        if agent is not None:
            check_agent_id(agent, "agent")
        check_limit(limit)
        return ops.leases(self.engine, agent, limit)

    def trace(self, message_id: str) -> MessageTrace | None:
        """Message ``message_id`` and what became of it in each recipient's inbox (status,
        attempts, last error, lease end, dead letter), or None when no row of it is left
        (unknown, or pruned from the archive).

        >>> [(r.agent, r.status) for r in bus.trace(message_id).recipients]   # doctest: +SKIP
        """
        if not isinstance(message_id, str) or not message_id:
            raise ValueError(f"message_id must be a non-empty str, got {message_id!r}")
        return ops.trace(self.engine, message_id)

    def tail(
        self,
        agent: str | None = None,
        types: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        after: int | None = None,
    ) -> ops.Tail:
        """Yield messages as any process publishes them, from now on, for ``timeout``
        seconds (None: until the caller stops iterating). ``agent`` keeps those sent by or to
        it; ``types`` those types. ``after``: start at the ``position`` of an earlier tail
        instead of now, so that following in slices of time misses nothing.

        >>> for record in bus.tail(types=["error"]): print(record.message.id)   # doctest: +SKIP
        """
        if agent is not None:
            check_agent_id(agent, "agent")
        if types is not None:
            types = check_types(types)
        if timeout is not None:
            timeout = seconds(timeout, "timeout")
        if after is not None and (type(after) is not int or after < 0):
            raise ValueError(f"after must be the position of an earlier tail, got {after!r}")
        return ops.tail(self.engine, agent, types, timeout=timeout, from_seq=after)

    def retention(self) -> ops.Retention:
        """The retention policy stored in the database (the same for every process).

        >>> bus.retention()   # doctest: +SKIP
        Retention(archive_retention=604800.0, dead_retention=2592000.0, archive_max_messages=1000000)
        """
        with self.engine.reading() as conn:
            return retention_from_row(self.engine.storage.get_retention(conn))

    def set_retention(
        self,
        *,
        archive_retention: float | None | Stored = STORED,
        dead_retention: float | None | Stored = STORED,
        archive_max_messages: int | None | Stored = STORED,
    ) -> ops.Retention:
        """Store a new retention policy for every process: seconds after their ack that acked
        messages are kept, seconds after they failed that dead letters are kept, acked messages
        kept at most (None: for ever, no bound). Omitted keywords stay as they are. Returns
        the policy now stored.

        >>> bus.set_retention(archive_retention=86_400.0, dead_retention=None)   # doctest: +SKIP
        """
        return store_retention(self.engine,
            retention_changes(archive_retention, dead_retention, archive_max_messages)
        )

    def prune(
        self,
        sent_older_than: float | None | Stored = STORED,
        dead_older_than: float | None | Stored = STORED,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> ops.PruneResult:
        """Apply the stored retention policy now (:meth:`retention`): delete acked messages
        acked more than ``sent_older_than`` seconds ago (the sent archive), dead letters older
        than ``dead_older_than`` seconds (None: keep them; omitted: the stored policy's), then
        the oldest acked messages above the policy's ``archive_max_messages``, in short
        transactions. Metrics totals keep counting what is deleted.
        ``progress(done, total)`` is called as batches commit."""
        if sent_older_than is not STORED and sent_older_than is not None:
            sent_older_than = seconds(sent_older_than, "sent_older_than")
        if dead_older_than is not STORED and dead_older_than is not None:
            dead_older_than = seconds(dead_older_than, "dead_older_than")
        policy = self.retention()
        if sent_older_than is STORED:
            sent_older_than = policy.archive_retention
        if dead_older_than is STORED:
            dead_older_than = policy.dead_retention
        return ops.prune(
            self.engine, sent_older_than, dead_older_than, policy.archive_max_messages, progress=progress
        )

    def check(self) -> ops.CheckReport:
        """Integrity check, schema version, file and WAL sizes, whether a reader pins the WAL,
        and leases that ran out; ``report.ok`` is False when ``report.problems`` is not empty."""
        return ops.check(self.engine)

    def schema_version(self) -> int:
        """The schema version the database holds: one small read, for health checks (the
        full :meth:`check` reads every page)."""
        return ops.schema_version(self.engine)

    def backup(
        self, dest: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None
    ) -> ops.BackupResult:
        """Copy the database, online, to the new file ``dest``: a consistent snapshot of the
        moment the backup starts, while other processes keep writing.
        ``progress(pages_done, pages_total)``."""
        return ops.backup(self.engine, dest, progress=progress)

    def vacuum(self) -> ops.VacuumResult:
        """Give the space of deleted rows back to the file system (after a large prune) and
        truncate the WAL. Holds the write lock while it runs."""
        return ops.vacuum(self.engine)

