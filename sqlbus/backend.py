"""The storage backend interface: every verb the engine asks of the database, and the rows
those verbs return.

A backend keeps the queue, the archive, dead letters, shared state and the registry in one
database, and does all of its SQL. Each verb takes an open connection of the backend's own
kind (``ConnT``: an ``apsw.Connection`` for SQLite, a psycopg connection for PostgreSQL) and
times as epoch milliseconds (``now``); no verb reads the clock or begins a transaction unless
its docstring says so, so the same verb runs alone or inside the caller's bigger transaction
(the outbox), which the engine brackets with :meth:`Storage.begin` and :meth:`Storage.commit`.

The SQLite backend is :mod:`sqlbus.sqlite.storage`, the PostgreSQL one
:class:`sqlbus.postgres.storage.PostgresStorage`. Both store the same rows in the same states,
and count the rows they delete the same way (:func:`retired_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

# A message row's state, the same number in every backend.
QUEUED, LEASED, ACKED, DEAD, SCHEDULED = 0, 1, 2, 3, 4


def retired_counts(
    rows: Sequence[tuple[Any, ...]],
) -> tuple[dict[tuple[str, str], int], set[tuple[str, str]]]:
    """What deleted message rows ``(message_id, sender, agent, state, sent_at, done_at,
    reason)`` add to the counters, so every total stays the same: acked rows to received and
    delivery_ms, dead rows to dead (and expired), per agent; and the (message id, sender)
    pairs whose message may be gone whole, which count as sent once the backend finds no row
    of them left."""
    deltas: dict[tuple[str, str], int] = {}

    def add(name: str, agent: str, value: int = 1) -> None:
        deltas[name, agent] = deltas.get((name, agent), 0) + value

    senders: set[tuple[str, str]] = set()  # one message per id and sender, as sent_rows counts
    for message_id, sender, agent, state, sent_at, done_at, reason in rows:
        senders.add((message_id, sender))
        if agent is None:
            continue
        if state == ACKED:
            add("received", agent)
            add("delivery_ms", agent, done_at - sent_at)
        elif state == DEAD:
            add("dead", agent)
            if reason == "expired":
                add("expired", agent)
    return deltas, senders


# ---------------------------------------------------------------------------------------------
# Rows


# A claimed row: (seq, claims, attempts, priority, expires_at, sent_at, body or None when above
# the reader's limit). A plain tuple, not a NamedTuple: it is made for every message a claim
# takes, on the hot path, and its one caller unpacks it by name at once.
ClaimedRow = tuple[int, int, int, int, int | None, int, bytes | None]


class ResponseLook(NamedTuple):
    """A requester's look for its response (see :meth:`Storage.find_response`)."""

    version: int  # the wake-up token to wait on, read in the same snapshot
    body: bytes | None  # the body of a direct reply, or None
    waiting: int  # 1 when a response waits in the inbox instead


class AgentRow(NamedTuple):
    """An agent in the registry; times in epoch ms."""

    id: str
    registered_at: int
    last_seen: int
    status: str


class InterestRow(NamedTuple):
    """One recorded interest: kind ``type`` or ``event`` and its pattern."""

    agent: str
    kind: str
    pattern: str
    subscribed_at: int


class DeadLetterRow(NamedTuple):
    """A dead letter with its message's columns. ``body`` is None when the stored body is
    longer than the reader's limit (it was not read); ``length`` is its stored length."""

    id: int
    agent: str | None
    reason: str
    error_name: str | None
    error_message: str | None
    traceback: str | None
    context: str | None  # a JSON object
    failed_at: int
    attempts: int
    body: bytes | None
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int


class RequeueTarget(NamedTuple):
    """A dead letter to requeue; ``ttl`` is read from its stored body (None: unreadable)."""

    id: int
    message_id: str
    ttl: Any


class SentRow(NamedTuple):
    """A message of the sent archive: its recipients and listed columns (see ``DeadLetterRow``
    for ``body`` and ``length``)."""

    recipients: list[str]
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int
    body: bytes | None


class PeekRow(NamedTuple):
    """A row of an inbox as peek shows it, with its status at the time of the look."""

    status: str
    visible_at: int
    attempts: int
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int
    body: bytes | None
    position: tuple[int, int, int]  # (group, key, seq): where a next page starts


def peek_start(group: int, after: tuple[int, int, int] | None) -> tuple[int, int]:
    """Where ``group``'s queries start for a page after ``after`` (a row's position: group,
    key, seq): just after it within its own group, at the start of a later one. The ready
    group's key is -priority and its queries take the priority itself (6: above them all)."""
    if after is None or after[0] != group:
        return (6, 0) if group == 0 else (-1, 0)
    return (-after[1], after[2]) if group == 0 else (after[1], after[2])


class TailRow(NamedTuple):
    """A row published after a tail's position, with its message's listed columns (see
    ``DeadLetterRow`` for ``body`` and ``length``). A message's rows come together."""

    seq: int
    agent: str | None  # None: a broadcast that matched nobody
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int
    body: bytes | None


class StateRow(NamedTuple):
    """A key of the shared state; ``value`` is JSON, ``deleted`` 0 or 1."""

    key: str
    value: bytes
    version: int
    deleted: int
    updated_by: str | None
    updated_at: int


class StateChange(NamedTuple):
    """A logged change of the shared state at position ``seq`` (the rest as ``StateRow``)."""

    seq: int
    key: str
    value: bytes
    version: int
    deleted: int
    updated_by: str | None
    updated_at: int


class LeaseRow(NamedTuple):
    """A running lease: the inbox, when the lease ends, the deliveries so far, and the
    message's listed columns (see ``DeadLetterRow`` for ``body`` and ``length``)."""

    agent: str
    lease_ends_at: int
    attempts: int
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int
    body: bytes | None


class MessageRow(NamedTuple):
    """One recipient's row of a message: its status at the time of the look (a peek status,
    ``acked`` or ``dead``), the dead letter's number if dead, and the listed columns."""

    agent: str | None  # None: a broadcast that matched nobody
    status: str
    attempts: int
    visible_at: int
    done_at: int | None
    last_error: str | None
    dead_letter_id: int | None
    message_id: str
    sender: str
    type: str
    priority: int
    sent_at: int
    length: int
    body: bytes | None


class DepthRow(NamedTuple):
    """One inbox's rows by status, and when its oldest ready row was sent (None: none)."""

    agent: str
    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int
    oldest_ready: int | None


class AckedRow(NamedTuple):
    """One recipient's acked rows still kept: how many, their summed publish-to-ack time in
    ms, and how many were acked in the last second and the last minute."""

    agent: str
    acked: int
    delivery_ms: int
    last_second: int
    last_minute: int


class CounterRow(NamedTuple):
    """A total kept in the counters (agent ``''``: the whole bus)."""

    name: str
    agent: str
    value: int


class RetentionRow(NamedTuple):
    """The stored retention policy in ms and a count; None keeps for ever."""

    archive_ms: int | None
    dead_ms: int | None
    max_messages: int | None


class Pruned(NamedTuple):
    """What one prune batch did: rows deleted, and the last seq it looked at (where the next
    batch starts)."""

    deleted: int
    last_seq: int


class CheckpointResult(NamedTuple):
    """What a WAL checkpoint did: whether it was blocked, frames in the WAL, frames copied."""

    busy: int
    frames: int
    done: int


# ---------------------------------------------------------------------------------------------
# The interface

ConnT = TypeVar("ConnT")


class Storage(Protocol[ConnT]):
    """Every verb the engine asks of its database, over connections of type ``ConnT``."""

    SCHEMA_VERSION: int  # the schema this backend writes and reads
    APPLICATION_ID: int  # the mark that says a database is a sqlbus one
    DEFAULT_RETENTION: tuple[int, int, int]  # a new database's policy: archive ms, dead ms, max

    # -- connections and transactions ----------------------------------------------------

    def set_busy_timeout(self, conn: ConnT, timeout: float) -> None:
        """Make ``conn`` wait up to ``timeout`` seconds for a lock another connection holds."""

    def begin(self, conn: ConnT) -> None:
        """Start a write transaction, taking the write lock now."""

    def commit(self, conn: ConnT) -> None:
        """Commit the open transaction."""

    def rollback(self, conn: ConnT) -> None:
        """Roll back the open transaction, if any."""

    def begin_read(self, conn: ConnT) -> None:
        """Start a read transaction that holds one snapshot until :meth:`end_read`."""

    def end_read(self, conn: ConnT) -> None:
        """End a read transaction."""

    def in_transaction(self, conn: ConnT) -> bool:
        """Whether ``conn`` has a transaction open."""

    def integrity_check(self, conn: ConnT, max_errors: int = 20) -> list[str]:
        """``['ok']`` or up to ``max_errors`` problems the database finds in itself."""

    def schema_marks(self, conn: ConnT) -> tuple[int, int]:
        """(application id, schema version) as stored in the database."""

    # -- agents and interests ------------------------------------------------------------

    def register_agent(self, conn: ConnT, agent: str, now: int) -> None:
        """Add ``agent`` to the registry, or mark it active and seen now."""

    def touch_agent(self, conn: ConnT, agent: str, now: int, status: str | None = None) -> None:
        """Record that ``agent`` was seen at ``now`` (and its new ``status``)."""

    def list_agents(self, conn: ConnT) -> list[AgentRow]:
        """Every registered agent, by id."""

    def agent_ids(self, conn: ConnT) -> list[str]:
        """The ids of every registered agent, sorted."""

    def add_interest(self, conn: ConnT, agent: str, kind: str, pattern: str, now: int) -> None:
        """Record ``agent``'s interest in ``pattern`` of ``kind`` (kept if already there)."""

    def drop_interest(self, conn: ConnT, agent: str, kind: str, pattern: str) -> None:
        """Forget one of ``agent``'s interests."""

    def list_interests(self, conn: ConnT, agent: str | None = None) -> list[InterestRow]:
        """``agent``'s interests, or everyone's (None), by agent, kind and pattern."""

    def interested_in_type(self, conn: ConnT, type: str, sender: str) -> list[str]:
        """The agents but ``sender`` interested in messages of ``type`` (or ``*``), by id."""

    def event_interests(self, conn: ConnT, sender: str) -> list[tuple[str, str | None]]:
        """(agent, event pattern, or None for an interest in every event) of all but ``sender``."""

    # -- publish, claim and settle -------------------------------------------------------

    def publish(
        self, conn: ConnT, messages: Sequence[Any], visible_at: Sequence[int], now: int
    ) -> list[bool]:
        """Write ``messages.Outgoing`` to their recipients' inboxes; per message, whether it was new."""

    def publish_plain(self, conn: ConnT, sender: str, runs: Sequence[Any], now: int) -> None:
        """Write a plain batch (``messages.prepare_plain_batch``'s runs), ready now."""

    def claim(
        self, conn: ConnT, agent: str, now: int, lease_until: int, limit: int,
        types_json: str | None = None, skip_json: str | None = None, max_body: int = 1 << 62,
    ) -> tuple[list[ClaimedRow], bool]:
        """Lease up to ``limit`` ready rows of ``agent`` in delivery order; and whether more wait."""

    def look(
        self, conn: ConnT, agent: str, now: int, types_json: str | None = None,
        skip_json: str | None = None,
    ) -> tuple[int, bool, int | None]:
        """(wake-up token, whether a claim would find work, when the next waiting row comes due)."""

    def wait_point(self, conn: ConnT, agent: str) -> tuple[int, int | None]:
        """(wake-up token, when ``agent``'s next waiting row comes due), in the caller's transaction."""

    def next_due(self, conn: ConnT, agent: str) -> int | None:
        """When ``agent``'s next retry, delayed message or lease end comes due (None: none)."""

    def ack(self, conn: ConnT, leases: Sequence[tuple[int, int]], now: int) -> bool:
        """Mark leased rows acked, given as (seq, claims); False when any lease is gone."""

    def acked_now(self, conn: ConnT, seq: int, claims: int, now: int) -> bool:
        """Whether this transaction's ack took the lease (seq, claims)."""

    def extend(self, conn: ConnT, seq: int, claims: int, lease_until: int) -> bool:
        """Move a held lease's deadline; False when that lease is gone."""

    def release(
        self, conn: ConnT, seq: int, claims: int, now: int, *, attempted: bool = True,
        last_error: str | None = None,
    ) -> bool:
        """Give a held lease back, ready again now; False when that lease is gone."""

    def retry(
        self, conn: ConnT, seq: int, claims: int, due_at: int, last_error: str | None
    ) -> bool:
        """Schedule a leased row for another attempt at ``due_at``; False when the lease is gone."""

    def dead_letter(
        self, conn: ConnT, seq: int, claims: int | None, now: int, reason: str,
        error_name: str | None = None, error_message: str | None = None,
        traceback: str | None = None, context_json: str | None = None,
        attempts: int | None = None, failed_at: int | None = None,
    ) -> bool:
        """Move a queued or leased row to dead letters; False when that lease (or row) is gone."""

    def last_error(self, conn: ConnT, seq: int) -> str | None:
        """The recorded error of a row's last attempt ("Name: text"), or None."""

    def body_length(self, conn: ConnT, seq: int) -> int:
        """The stored length of a row's body in bytes, without reading the body."""

    def count_error(self, conn: ConnT, name: str) -> None:
        """Count one failure of exception ``name``."""

    # -- request/response ----------------------------------------------------------------

    def find_response(self, conn: ConnT, agent: str, correlation_id: str) -> ResponseLook:
        """A requester's look for its response, in one read."""

    def find_responses(
        self, conn: ConnT, agent: str, correlation_ids: Sequence[str]
    ) -> list[tuple[str, bytes | None, int]]:
        """:meth:`find_response` for many requests at once, in one read: (correlation id,
        the body of a direct reply or None, 1 when one waits in the inbox) for each id that
        has one."""

    def take_response(
        self, conn: ConnT, agent: str, correlation_id: str, now: int
    ) -> tuple[int, bytes] | None:
        """Claim and ack the oldest ready response with ``correlation_id``: (seq, body) or None."""

    def record_request_timeout(
        self, conn: ConnT, agent: str, correlation_id: str, now: int, keep_ms: int
    ) -> None:
        """Remember that a request timed out; forget such records older than ``keep_ms``."""

    def request_timed_out(self, conn: ConnT, agent: str, correlation_id: str) -> bool:
        """Whether ``agent``'s request ``correlation_id`` timed out (its response is late)."""

    def forget_request_timeout(self, conn: ConnT, agent: str, correlation_id: str) -> None:
        """Forget that a request timed out."""

    def take_late_responses(self, conn: ConnT, agent: str, now: int) -> tuple[int, int]:
        """Ack (discard) ``agent``'s late responses: (how many, their summed delivery ms)."""

    def delivery_ms(self, conn: ConnT, seq: int) -> int:
        """The publish-to-ack time in ms of the acked row ``seq``."""

    # -- dead letters and the archive ----------------------------------------------------

    def list_dead_letters(
        self, conn: ConnT, agent: str | None, limit: int, max_body: int = 1 << 62,
        reason: str | None = None, before: int | None = None,
    ) -> list[DeadLetterRow]:
        """Dead letters, newest first, of one recipient or all (None), with ``reason`` (None:
        any), numbered below ``before`` (None: from the newest)."""

    def get_dead_letter(
        self, conn: ConnT, dead_letter_id: int | None, message_id: str | None = None,
        max_body: int = 1 << 62,
    ) -> DeadLetterRow | None:
        """A dead letter by number, or the newest of a message's, or None."""

    def requeue_targets(
        self, conn: ConnT, dead_letter_id: int | None, message_id: str | None
    ) -> list[RequeueTarget]:
        """The dead letter numbered ``dead_letter_id``, or every one of ``message_id``, oldest first."""

    def dead_letter_ids(
        self, conn: ConnT, agent: str | None, reason: str | None
    ) -> list[RequeueTarget]:
        """The dead letters of ``agent`` with ``reason`` (None: any), oldest first."""

    def requeue(self, conn: ConnT, dead_letter_id: int, now: int, ttl_ms: int) -> bool:
        """Queue a dead letter's row again with a fresh TTL; False when there is no such record."""

    def purge_dead_letters(self, conn: ConnT, older_than: int | None) -> int:
        """Delete dead letters that failed before ``older_than`` ms (None: all); how many."""

    def list_sent(
        self, conn: ConnT, agent: str | None, limit: int, max_body: int = 1 << 62
    ) -> list[SentRow]:
        """Archived messages, newest first; ``agent`` keeps those sent by or to it."""

    def peek_rows(
        self, conn: ConnT, agent: str, now: int, limit: int, max_body: int = 1 << 62,
        after: tuple[int, int, int] | None = None, priority: int | None = None,
    ) -> list[PeekRow]:
        """An inbox without claiming: ready rows in claim order, then waiting, then expired;
        with ``after`` (a row's ``position``) those after it, each group a seek in an index;
        ``priority`` keeps one priority."""

    def lease_rows(
        self, conn: ConnT, now: int, limit: int, agent: str | None = None,
        max_body: int = 1 << 62,
    ) -> list[LeaseRow]:
        """Leases running at ``now`` (of ``agent``'s inbox, or all), the soonest to end first."""

    def message_rows(
        self, conn: ConnT, message_id: str, now: int, max_body: int = 1 << 62
    ) -> list[MessageRow]:
        """Every recipient's row of message ``message_id``, in publish order (none: unknown
        or pruned)."""

    def last_seq(self, conn: ConnT) -> int:
        """The position of now (SQLite: the newest row's, 0 when empty): where a tail starts."""

    def rows_after(
        self, conn: ConnT, after_seq: int, limit: int, max_body: int = 1 << 62
    ) -> list[TailRow]:
        """Rows published after the position ``after_seq``, in publish order, a message's rows
        together; each row's ``seq`` is the position to continue from after it (SQLite: the
        row's own; PostgreSQL: a commit-order position, see its ``rows_after``)."""

    # -- retention, counters and upkeep --------------------------------------------------

    def get_retention(self, conn: ConnT) -> RetentionRow:
        """The stored retention policy."""

    def set_retention(
        self, conn: ConnT, archive_ms: int | None, dead_ms: int | None, max_messages: int | None
    ) -> None:
        """Store a new retention policy."""

    def add_counters(self, conn: ConnT, deltas: Sequence[tuple[str, str, int]]) -> None:
        """Add ``(name, agent, delta)`` to the counters (agent ``''``: the whole bus)."""

    def archive_bound(self, conn: ConnT, cutoff: int) -> int:
        """A seq below which every row acked before ``cutoff`` lies (for :meth:`prune_acked`)."""

    def prune_acked(
        self, conn: ConnT, cutoff: int, limit: int, after: int = 0, bound: int | None = None
    ) -> Pruned:
        """Delete up to ``limit`` acked rows acked before ``cutoff``, oldest first, counting them."""

    def archive_excess(self, conn: ConnT, max_messages: int) -> int:
        """How many acked rows there are above ``max_messages``."""

    def prune_oldest_acked(self, conn: ConnT, limit: int, after: int = 0) -> Pruned:
        """Delete up to ``limit`` of the oldest acked rows whatever their age, counting them."""

    def prune_dead(self, conn: ConnT, cutoff: int, limit: int) -> int:
        """Delete up to ``limit`` dead letters that failed before ``cutoff``; how many."""

    def prune_state_log(self, conn: ConnT, cutoff: int, limit: int) -> int:
        """Delete up to ``limit`` of the oldest state changes logged before ``cutoff``."""

    def count_prunable(
        self, conn: ConnT, acked_cutoff: int | None, dead_cutoff: int | None
    ) -> tuple[int, int]:
        """How many acked rows and dead letters the cutoffs would prune (None: none)."""

    def expired_rows(self, conn: ConnT, now: int, limit: int) -> list[int]:
        """Up to ``limit`` expired messages still in an inbox: their seqs."""

    def dead_letter_expired(self, conn: ConnT, seqs: Sequence[int], now: int) -> int:
        """Move the rows ``seqs`` still expired at ``now`` to dead letters; how many."""

    # -- figures: metrics, stats and check -----------------------------------------------

    def depth_rows(self, conn: ConnT, now: int) -> list[DepthRow]:
        """Per recipient, its rows by status at ``now`` (inside one read transaction)."""

    def acked_rows(self, conn: ConnT, now: int) -> list[AckedRow]:
        """Per recipient, its acked rows still kept."""

    def sent_rows(self, conn: ConnT) -> list[tuple[str, int]]:
        """Per sender: (sender, messages sent, one per message id)."""

    def dead_reason_rows(self, conn: ConnT) -> list[tuple[str, int]]:
        """(reason, dead letters) for the dead letters kept now."""

    def error_count_rows(self, conn: ConnT) -> list[tuple[str, int]]:
        """(exception name, failures) since the database was made."""

    def read_counters(self, conn: ConnT) -> list[CounterRow]:
        """Every counter."""

    def count_expired(self, conn: ConnT, now: int) -> int:
        """Expired messages not yet moved to dead letters."""

    def expired_leases(self, conn: ConnT, now: int) -> int:
        """Deliveries whose lease ran out that nobody has claimed again yet."""

    def rows_without_body(self, conn: ConnT) -> int:
        """Message rows whose shared body is missing (a damaged database)."""

    # -- shared state --------------------------------------------------------------------

    def lock_state(self, conn: ConnT, key: str) -> StateRow | None:
        """:meth:`get_state` inside a write transaction, holding the key against other writers
        until it ends (SQLite: the write lock already does)."""

    def get_state(self, conn: ConnT, key: str) -> StateRow | None:
        """A key's current row, deleted or not, or None."""

    def put_state(
        self, conn: ConnT, key: str, value_json: bytes, version: int, deleted: bool,
        updated_by: str | None, now: int,
    ) -> None:
        """Write a key's new version and log the change (the caller checked the version)."""

    def state_keys(self, conn: ConnT, prefix: str) -> list[str]:
        """The live keys under ``prefix``, sorted."""

    def state_entries(self, conn: ConnT, prefix: str) -> list[StateRow]:
        """The live entries under ``prefix``, by key."""

    def state_snapshot(self, conn: ConnT, prefix: str) -> tuple[list[StateRow], int]:
        """The live entries under ``prefix`` and the change log's head, in one snapshot."""

    def state_log_after(
        self, conn: ConnT, prefix: str, after_seq: int, limit: int = 1000
    ) -> list[StateChange]:
        """Changes under ``prefix`` logged after ``after_seq``, in commit order."""

    def state_history(self, conn: ConnT, key: str, limit: int) -> list[StateChange]:
        """The logged changes of ``key``, newest first (as long as retention keeps them)."""
