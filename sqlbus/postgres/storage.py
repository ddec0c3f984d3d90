"""The PostgreSQL backend as one object: every verb of :class:`sqlbus.backend.Storage` but the
SQLite-only ones (files, WAL, pages, ``data_version``), over one bus's schema, and the
constants callers read. In progress (issue 15): not yet behind the engine.

>>> storage = PostgresStorage("sqlbus")                                  # doctest: +SKIP
>>> storage.claim(conn, "bob", now, now + 30_000, 10)                    # doctest: +SKIP

Each method takes the connection and the Protocol's arguments and calls the function of the
module that holds the verb (``queue``, ``responses``, ``admin``, ``retention``, ``stats``,
``state``, ``agents``, ``connection``) with the schema's name. Written out, not generated, so
that mypy checks the class against the Protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

from ..backend import (
    AckedRow,
    AgentRow,
    ClaimedRow,
    CounterRow,
    DeadLetterRow,
    DepthRow,
    InterestRow,
    LeaseRow,
    MessageRow,
    PeekRow,
    Pruned,
    RequeueTarget,
    ResponseLook,
    RetentionRow,
    SentRow,
    StateChange,
    StateRow,
    TailRow,
)
from . import admin, agents, connection, queue, responses, retention, state, stats
from .connection import APPLICATION_ID
from .queue import ACKED, DEAD, LEASED, QUEUED, SCHEDULED
from .schema import DEFAULT_RETENTION, SCHEMA_VERSION, check_schema_name

Conn = psycopg.Connection[Any]
Connection = Conn  # the type the engine names its connections by, as ``sqlite.storage``'s

__all__ = [
    "PostgresStorage", "Connection",
    "SCHEMA_VERSION", "APPLICATION_ID", "DEFAULT_RETENTION",
    "QUEUED", "LEASED", "ACKED", "DEAD", "SCHEDULED",
]


def _names(names_json: str | None) -> list[str] | None:
    """A JSON list of names (the Protocol's ``types_json``, ``skip_json``) as a list; None
    stays None (no filter)."""
    return None if names_json is None else [str(name) for name in json.loads(names_json)]


class PostgresStorage:
    """The verbs of the bus in PostgreSQL schema ``schema`` (checked: ``[a-z_][a-z0-9_]*``)."""

    SCHEMA_VERSION = SCHEMA_VERSION
    APPLICATION_ID = APPLICATION_ID
    DEFAULT_RETENTION = DEFAULT_RETENTION
    QUEUED, LEASED, ACKED, DEAD, SCHEDULED = QUEUED, LEASED, ACKED, DEAD, SCHEDULED

    def __init__(self, schema: str) -> None:
        self.schema = check_schema_name(schema)

    # -- Transactions, lock waits and checks ---------------------------------------------------

    def set_busy_timeout(self, conn: Conn, timeout: float) -> None:
        """Make ``conn`` wait up to ``timeout`` seconds for a lock another connection holds
        (``lock_timeout``)."""
        connection.set_busy_timeout(conn, timeout)

    def begin(self, conn: Conn) -> None:
        """Start a transaction (``BEGIN``: PostgreSQL locks rows as it writes them)."""
        connection.begin(conn)

    def commit(self, conn: Conn) -> None:
        """Commit the open transaction."""
        connection.commit(conn)

    def rollback(self, conn: Conn) -> None:
        """Roll back the open transaction, if any."""
        connection.rollback(conn)

    def begin_read(self, conn: Conn) -> None:
        """Start a read transaction that holds one snapshot until :meth:`end_read`."""
        connection.begin_read(conn)

    def end_read(self, conn: Conn) -> None:
        """End a read transaction."""
        connection.end_read(conn)

    def in_transaction(self, conn: Conn) -> bool:
        return connection.in_transaction(conn)

    def integrity_check(self, conn: Conn, max_errors: int = 20) -> list[str]:
        """``['ok']`` or up to ``max_errors`` problems found in the bus's rows."""
        return connection.integrity_check(conn, self.schema, max_errors)

    def schema_marks(self, conn: Conn) -> tuple[int, int]:
        """(application id, schema version) as the bus's ``sqlbus_meta`` holds them."""
        return connection.schema_marks(conn, self.schema)

    # -- Agents and interests ------------------------------------------------------------------

    def register_agent(self, conn: Conn, agent: str, now: int) -> None:
        """Add ``agent`` to the registry, or mark it active and seen now."""
        agents.register_agent(conn, self.schema, agent, now)

    def touch_agent(self, conn: Conn, agent: str, now: int, status: str | None = None) -> None:
        """Record that ``agent`` was seen at ``now`` (and its new ``status``)."""
        agents.touch_agent(conn, self.schema, agent, now, status)

    def list_agents(self, conn: Conn) -> list[AgentRow]:
        """Every registered agent, by id."""
        return agents.list_agents(conn, self.schema)

    def agent_ids(self, conn: Conn) -> list[str]:
        """The ids of every registered agent, sorted."""
        return agents.agent_ids(conn, self.schema)

    def add_interest(self, conn: Conn, agent: str, kind: str, pattern: str, now: int) -> None:
        """Record ``agent``'s interest in ``pattern`` of ``kind`` (kept if already there)."""
        agents.add_interest(conn, self.schema, agent, kind, pattern, now)

    def drop_interest(self, conn: Conn, agent: str, kind: str, pattern: str) -> None:
        """Forget one of ``agent``'s interests."""
        agents.drop_interest(conn, self.schema, agent, kind, pattern)

    def list_interests(self, conn: Conn, agent: str | None = None) -> list[InterestRow]:
        """``agent``'s interests, or everyone's (None), by agent, kind and pattern."""
        return agents.list_interests(conn, self.schema, agent)

    def interested_in_type(self, conn: Conn, type: str, sender: str) -> list[str]:
        """The agents but ``sender`` interested in messages of ``type`` (or ``*``), by id."""
        return agents.interested_in_type(conn, self.schema, type, sender)

    def event_interests(self, conn: Conn, sender: str) -> list[tuple[str, str | None]]:
        """(agent, event pattern, or None for an interest in every event) of all but ``sender``."""
        return agents.event_interests(conn, self.schema, sender)

    # -- Publish, claim and settle -------------------------------------------------------------

    def publish(
        self, conn: Conn, messages: Sequence[Any], visible_at: Sequence[int], now: int,
    ) -> list[bool]:
        """Write ``messages.Outgoing`` to their recipients' inboxes; per message, whether it was new."""
        return queue.publish(conn, self.schema, messages, visible_at, now)

    def publish_plain(self, conn: Conn, sender: str, runs: Sequence[Any], now: int) -> None:
        """Write a plain batch (``messages.prepare_plain_batch``'s runs), ready now."""
        queue.publish_plain(conn, self.schema, sender, runs, now)

    def claim(
        self, conn: Conn, agent: str, now: int, lease_until: int, limit: int,
        types_json: str | None = None, skip_json: str | None = None, max_body: int = 1 << 62,
    ) -> tuple[list[ClaimedRow], bool]:
        """Lease up to ``limit`` ready rows of ``agent`` in delivery order; and whether more wait."""
        types, skip = _names(types_json), _names(skip_json)
        rows, more = queue.claim(conn, self.schema, agent, now, lease_until, limit, types, skip,
                                 max_body)
        return [(*row[:6], None if row[6] is None else bytes(row[6])) for row in rows], more

    def look(
        self, conn: Conn, agent: str, now: int, types_json: str | None = None,
        skip_json: str | None = None,
    ) -> tuple[int, bool, int | None]:
        """(wake-up token, whether a claim would find work, when the next waiting row comes due)."""
        return queue.look(conn, self.schema, agent, now, _names(types_json), _names(skip_json))

    def wait_point(self, conn: Conn, agent: str) -> tuple[int, int | None]:
        """(wake-up token, when ``agent``'s next waiting row comes due), in the caller's transaction."""
        return queue.wait_point(conn, self.schema, agent)

    def next_due(self, conn: Conn, agent: str) -> int | None:
        """When ``agent``'s next retry, delayed message or lease end comes due (None: none)."""
        return queue.next_due(conn, self.schema, agent)

    def ack(self, conn: Conn, leases: Sequence[tuple[int, int]], now: int) -> bool:
        """Mark leased rows acked, given as (seq, claims); False when any lease is gone."""
        return queue.ack(conn, self.schema, leases, now)

    def acked_now(self, conn: Conn, seq: int, claims: int, now: int) -> bool:
        """Whether this transaction's ack took the lease (seq, claims)."""
        return queue.acked_now(conn, self.schema, seq, claims, now)

    def extend(self, conn: Conn, seq: int, claims: int, lease_until: int) -> bool:
        """Move a held lease's deadline; False when that lease is gone."""
        return queue.extend(conn, self.schema, seq, claims, lease_until)

    def release(
        self, conn: Conn, seq: int, claims: int, now: int, *, attempted: bool = True,
        last_error: str | None = None,
    ) -> bool:
        """Give a held lease back, ready again now; False when that lease is gone."""
        return queue.release(
            conn, self.schema, seq, claims, now, attempted=attempted, last_error=last_error,
        )

    def retry(self, conn: Conn, seq: int, claims: int, due_at: int, last_error: str | None) -> bool:
        """Schedule a leased row for another attempt at ``due_at``; False when the lease is gone."""
        return queue.retry(conn, self.schema, seq, claims, due_at, last_error)

    def dead_letter(
        self, conn: Conn, seq: int, claims: int | None, now: int, reason: str,
        error_name: str | None = None, error_message: str | None = None,
        traceback: str | None = None, context_json: str | None = None, attempts: int | None = None,
        failed_at: int | None = None,
    ) -> bool:
        """Move a queued or leased row to dead letters; False when that lease (or row) is gone."""
        return queue.dead_letter(
            conn, self.schema, seq, claims, now, reason, error_name, error_message, traceback,
            context_json, attempts, failed_at,
        )

    def last_error(self, conn: Conn, seq: int) -> str | None:
        """The recorded error of a row's last attempt ("Name: text"), or None."""
        return queue.last_error(conn, self.schema, seq)

    def body_length(self, conn: Conn, seq: int) -> int:
        """The stored length of a row's body in bytes, without reading the body."""
        return queue.body_length(conn, self.schema, seq)

    def count_error(self, conn: Conn, name: str) -> None:
        """Count one failure of exception ``name``."""
        queue.count_error(conn, self.schema, name)

    # -- Request/response ----------------------------------------------------------------------

    def find_response(self, conn: Conn, agent: str, correlation_id: str) -> ResponseLook:
        """A requester's look for its response, in one read."""
        return responses.find_response(conn, self.schema, agent, correlation_id)

    def find_responses(
        self, conn: Conn, agent: str, correlation_ids: Sequence[str]
    ) -> list[tuple[str, bytes | None, int]]:
        """:meth:`find_response` for many requests at once, in one read."""
        return responses.find_responses(conn, self.schema, agent, correlation_ids)

    def take_response(
        self, conn: Conn, agent: str, correlation_id: str, now: int,
    ) -> tuple[int, bytes] | None:
        """Claim and ack the oldest ready response with ``correlation_id``: (seq, body) or None."""
        return responses.take_response(conn, self.schema, agent, correlation_id, now)

    def record_request_timeout(
        self, conn: Conn, agent: str, correlation_id: str, now: int, keep_ms: int,
    ) -> None:
        """Remember that a request timed out; forget such records older than ``keep_ms``."""
        responses.record_request_timeout(
            conn, self.schema, agent, correlation_id, now, keep_ms,
        )

    def request_timed_out(self, conn: Conn, agent: str, correlation_id: str) -> bool:
        """Whether ``agent``'s request ``correlation_id`` timed out (its response is late)."""
        return responses.request_timed_out(conn, self.schema, agent, correlation_id)

    def forget_request_timeout(self, conn: Conn, agent: str, correlation_id: str) -> None:
        """Forget that a request timed out."""
        responses.forget_request_timeout(conn, self.schema, agent, correlation_id)

    def take_late_responses(self, conn: Conn, agent: str, now: int) -> tuple[int, int]:
        """Ack (discard) ``agent``'s late responses: (how many, their summed delivery ms)."""
        return responses.take_late_responses(conn, self.schema, agent, now)

    def delivery_ms(self, conn: Conn, seq: int) -> int:
        """The publish-to-ack time in ms of the acked row ``seq``."""
        return responses.delivery_ms(conn, self.schema, seq)

    # -- Dead letters, the archive, peek and tail ----------------------------------------------

    def list_dead_letters(
        self, conn: Conn, agent: str | None, limit: int, max_body: int = 1 << 62,
        reason: str | None = None, before: int | None = None,
    ) -> list[DeadLetterRow]:
        """Dead letters, newest first, of one recipient or all (None)."""
        return admin.list_dead_letters(conn, self.schema, agent, limit, max_body, reason, before)

    def get_dead_letter(
        self, conn: Conn, dead_letter_id: int | None, message_id: str | None = None,
        max_body: int = 1 << 62,
    ) -> DeadLetterRow | None:
        """A dead letter by number, or the newest of a message's, or None."""
        return admin.get_dead_letter(conn, self.schema, dead_letter_id, message_id, max_body)

    def requeue_targets(
        self, conn: Conn, dead_letter_id: int | None, message_id: str | None,
    ) -> list[RequeueTarget]:
        """The dead letter numbered ``dead_letter_id``, or every one of ``message_id``, oldest first."""
        return admin.requeue_targets(conn, self.schema, dead_letter_id, message_id)

    def dead_letter_ids(
        self, conn: Conn, agent: str | None, reason: str | None,
    ) -> list[RequeueTarget]:
        """The dead letters of ``agent`` with ``reason`` (None: any), oldest first."""
        return admin.dead_letter_ids(conn, self.schema, agent, reason)

    def requeue(self, conn: Conn, dead_letter_id: int, now: int, ttl_ms: int) -> bool:
        """Queue a dead letter's row again with a fresh TTL; False when there is no such record."""
        return admin.requeue(conn, self.schema, dead_letter_id, now, ttl_ms)

    def purge_dead_letters(self, conn: Conn, older_than: int | None) -> int:
        """Delete dead letters that failed before ``older_than`` ms (None: all); how many."""
        return admin.purge_dead_letters(conn, self.schema, older_than)

    def list_sent(
        self, conn: Conn, agent: str | None, limit: int, max_body: int = 1 << 62,
    ) -> list[SentRow]:
        """Archived messages, newest first; ``agent`` keeps those sent by or to it."""
        return admin.list_sent(conn, self.schema, agent, limit, max_body)

    def peek_rows(
        self, conn: Conn, agent: str, now: int, limit: int, max_body: int = 1 << 62,
        after: tuple[int, int, int] | None = None, priority: int | None = None,
    ) -> list[PeekRow]:
        """An inbox without claiming: ready rows in claim order, then waiting, then expired."""
        return admin.peek_rows(conn, self.schema, agent, now, limit, max_body, after, priority)

    def lease_rows(
        self, conn: Conn, now: int, limit: int, agent: str | None = None,
        max_body: int = 1 << 62,
    ) -> list[LeaseRow]:
        """Leases running at ``now``, the soonest to end first."""
        return admin.lease_rows(conn, self.schema, now, limit, agent, max_body)

    def message_rows(
        self, conn: Conn, message_id: str, now: int, max_body: int = 1 << 62
    ) -> list[MessageRow]:
        """Every recipient's row of message ``message_id``, in publish order."""
        return admin.message_rows(conn, self.schema, message_id, now, max_body)

    def last_seq(self, conn: Conn) -> int:
        """The newest row's position (0 when empty): where a tail starts."""
        return admin.last_seq(conn, self.schema)

    def rows_after(
        self, conn: Conn, after_seq: int, limit: int, max_body: int = 1 << 62,
    ) -> list[TailRow]:
        """Rows published after ``after_seq``, in publish order."""
        return admin.rows_after(conn, self.schema, after_seq, limit, max_body)

    # -- Retention, counters and upkeep --------------------------------------------------------

    def get_retention(self, conn: Conn) -> RetentionRow:
        """The stored retention policy."""
        return retention.get_retention(conn, self.schema)

    def set_retention(
        self, conn: Conn, archive_ms: int | None, dead_ms: int | None, max_messages: int | None,
    ) -> None:
        """Store a new retention policy."""
        retention.set_retention(conn, self.schema, archive_ms, dead_ms, max_messages)

    def add_counters(self, conn: Conn, deltas: Sequence[tuple[str, str, int]]) -> None:
        """Add ``(name, agent, delta)`` to the counters (agent ``''``: the whole bus)."""
        retention.add_counters(conn, self.schema, deltas)

    def archive_bound(self, conn: Conn, cutoff: int) -> int:
        """A seq below which every row acked before ``cutoff`` lies (for :meth:`prune_acked`)."""
        return retention.archive_bound(conn, self.schema, cutoff)

    def prune_acked(
        self, conn: Conn, cutoff: int, limit: int, after: int = 0, bound: int | None = None,
    ) -> Pruned:
        """Delete up to ``limit`` acked rows acked before ``cutoff``, oldest first, counting them."""
        return retention.prune_acked(conn, self.schema, cutoff, limit, after, bound)

    def archive_excess(self, conn: Conn, max_messages: int) -> int:
        """How many acked rows there are above ``max_messages``."""
        return retention.archive_excess(conn, self.schema, max_messages)

    def prune_oldest_acked(self, conn: Conn, limit: int, after: int = 0) -> Pruned:
        """Delete up to ``limit`` of the oldest acked rows whatever their age, counting them."""
        return retention.prune_oldest_acked(conn, self.schema, limit, after)

    def prune_dead(self, conn: Conn, cutoff: int, limit: int) -> int:
        """Delete up to ``limit`` dead letters that failed before ``cutoff``; how many."""
        return retention.prune_dead(conn, self.schema, cutoff, limit)

    def prune_state_log(self, conn: Conn, cutoff: int, limit: int) -> int:
        """Delete up to ``limit`` of the oldest state changes logged before ``cutoff``."""
        return retention.prune_state_log(conn, self.schema, cutoff, limit)

    def count_prunable(
        self, conn: Conn, acked_cutoff: int | None, dead_cutoff: int | None,
    ) -> tuple[int, int]:
        """How many acked rows and dead letters the cutoffs would prune (None: none)."""
        return retention.count_prunable(conn, self.schema, acked_cutoff, dead_cutoff)

    def expired_rows(self, conn: Conn, now: int, limit: int) -> list[int]:
        """Up to ``limit`` expired messages still in an inbox: their seqs."""
        return retention.expired_rows(conn, self.schema, now, limit)

    def dead_letter_expired(self, conn: Conn, seqs: Sequence[int], now: int) -> int:
        """Move the rows ``seqs`` still expired at ``now`` to dead letters; how many."""
        return retention.dead_letter_expired(conn, self.schema, seqs, now)

    # -- Figures: metrics, stats and check -----------------------------------------------------

    def depth_rows(self, conn: Conn, now: int) -> list[DepthRow]:
        """Per recipient, its rows by status at ``now`` (inside one read transaction)."""
        return stats.depth_rows(conn, self.schema, now)

    def acked_rows(self, conn: Conn, now: int) -> list[AckedRow]:
        """Per recipient, its acked rows still kept."""
        return stats.acked_rows(conn, self.schema, now)

    def sent_rows(self, conn: Conn) -> list[tuple[str, int]]:
        """Per sender: (sender, messages sent, one per message id)."""
        return stats.sent_rows(conn, self.schema)

    def dead_reason_rows(self, conn: Conn) -> list[tuple[str, int]]:
        """(reason, dead letters) for the dead letters kept now."""
        return stats.dead_reason_rows(conn, self.schema)

    def error_count_rows(self, conn: Conn) -> list[tuple[str, int]]:
        """(exception name, failures) since the database was made."""
        return stats.error_count_rows(conn, self.schema)

    def read_counters(self, conn: Conn) -> list[CounterRow]:
        """Every counter."""
        return stats.read_counters(conn, self.schema)

    def count_expired(self, conn: Conn, now: int) -> int:
        """Expired messages not yet moved to dead letters."""
        return retention.count_expired(conn, self.schema, now)

    def expired_leases(self, conn: Conn, now: int) -> int:
        """Deliveries whose lease ran out that nobody has claimed again yet."""
        return stats.expired_leases(conn, self.schema, now)

    def rows_without_body(self, conn: Conn) -> int:
        """Message rows whose shared body is missing (a damaged database)."""
        return stats.rows_without_body(conn, self.schema)

    # -- Shared state --------------------------------------------------------------------------

    def lock_state(self, conn: Conn, key: str) -> StateRow | None:
        return state.lock_state(conn, self.schema, key)

    def get_state(self, conn: Conn, key: str) -> StateRow | None:
        """A key's current row, deleted or not, or None."""
        return state.get_state(conn, self.schema, key)

    def put_state(
        self, conn: Conn, key: str, value_json: bytes, version: int, deleted: bool,
        updated_by: str | None, now: int,
    ) -> None:
        """Write a key's new version and log the change (the caller checked the version)."""
        state.put_state(
            conn, self.schema, key, value_json, version, deleted, updated_by, now,
        )

    def state_keys(self, conn: Conn, prefix: str) -> list[str]:
        """The live keys under ``prefix``, sorted."""
        return state.state_keys(conn, self.schema, prefix)

    def state_entries(self, conn: Conn, prefix: str) -> list[StateRow]:
        """The live entries under ``prefix``, by key."""
        return state.state_entries(conn, self.schema, prefix)

    def state_snapshot(self, conn: Conn, prefix: str) -> tuple[list[StateRow], int]:
        """The live entries under ``prefix`` and the change log's head, in one snapshot."""
        return state.state_snapshot(conn, self.schema, prefix)

    def state_log_after(
        self, conn: Conn, prefix: str, after_seq: int, limit: int = 1000,
    ) -> list[StateChange]:
        """Changes under ``prefix`` logged after ``after_seq``, in commit order."""
        return state.state_log_after(conn, self.schema, prefix, after_seq, limit)

    def state_history(self, conn: Conn, key: str, limit: int) -> list[StateChange]:
        """``key``'s logged changes, newest first."""
        return state.state_history(conn, self.schema, key, limit)
