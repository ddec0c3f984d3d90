"""The SQLite backend as one object: every verb of :class:`sqlbus.backend.Storage`, and the
constants callers read, gathered from the modules that hold them. The engine calls it as
``storage.claim(conn, ...)`` (``from .sqlite import storage``).

A module rather than an instance of a class: calls cost what a call of a module function
costs, ``storage.Connection`` stays a type that annotations and mypy can name, and mypy
checks the module against the Protocol (see ``sqlbus/sqlite/__init__.py``).
"""

from __future__ import annotations

from .admin import (
    add_interest,
    agent_ids,
    dead_letter_ids,
    drop_interest,
    event_interests,
    get_dead_letter,
    interested_in_type,
    last_seq,
    lease_rows,
    list_agents,
    list_dead_letters,
    list_interests,
    list_sent,
    message_rows,
    peek_rows,
    purge_dead_letters,
    register_agent,
    requeue,
    requeue_targets,
    rows_after,
    touch_agent,
)
from .connection import (
    Connection,
    begin,
    begin_read,
    checkpoint,
    commit,
    data_version,
    end_read,
    in_transaction,
    integrity_check,
    open_connection,
    page_size,
    rollback,
    schema_marks,
    set_busy_timeout,
    set_wal_mode,
    vacuum,
)
from .queue import (
    ack,
    acked_now,
    body_length,
    claim,
    count_error,
    dead_letter,
    extend,
    last_error,
    look,
    next_due,
    publish,
    publish_plain,
    release,
    retry,
    wait_point,
)
from .responses import (
    delivery_ms,
    find_response,
    find_responses,
    forget_request_timeout,
    record_request_timeout,
    request_timed_out,
    take_late_responses,
    take_response,
)
from .retention import (
    add_counters,
    archive_bound,
    archive_excess,
    count_expired,
    count_prunable,
    dead_letter_expired,
    expired_rows,
    get_retention,
    prune_acked,
    prune_dead,
    prune_oldest_acked,
    prune_state_log,
    set_retention,
)
from .schema import (
    ACKED,
    APPLICATION_ID,
    BODY,
    DEAD,
    DEFAULT_RETENTION,
    LEASED,
    QUEUED,
    SCHEDULED,
    SCHEMA_VERSION,
    check_file,
    initialize,
)
from .state import (
    get_state,
    lock_state,
    put_state,
    state_entries,
    state_history,
    state_keys,
    state_log_after,
    state_snapshot,
)
from .stats import (
    acked_rows,
    acked_summary,
    dead_reason_rows,
    depth_rows,
    error_count_rows,
    expired_leases,
    follow_top,
    messages_before,
    read_counters,
    rows_at,
    rows_since,
    rows_without_body,
    sent_rows,
    unacked_positions,
    unacked_seqs,
)

__all__ = [
    # constants: the schema's marks and defaults; row states and the body's SQL, for tests
    # that read the file with SQL of their own
    "SCHEMA_VERSION", "APPLICATION_ID", "DEFAULT_RETENTION",
    "QUEUED", "LEASED", "ACKED", "DEAD", "SCHEDULED", "BODY",
    # files, connections and transactions
    "Connection", "check_file", "open_connection", "initialize", "set_wal_mode",
    "set_busy_timeout", "begin", "commit", "rollback", "begin_read", "end_read", "in_transaction",
    "data_version", "checkpoint", "page_size", "vacuum", "integrity_check", "schema_marks",
    # agents and interests
    "register_agent", "touch_agent", "list_agents", "agent_ids", "add_interest",
    "drop_interest", "list_interests", "interested_in_type", "event_interests",
    # publish, claim and settle
    "publish", "publish_plain", "claim", "look", "wait_point", "next_due", "ack", "acked_now",
    "extend", "release", "retry", "dead_letter", "last_error", "body_length", "count_error",
    # request/response
    "find_response", "find_responses", "take_response", "record_request_timeout", "request_timed_out",
    "forget_request_timeout", "take_late_responses", "delivery_ms",
    # dead letters, the archive, peek and tail
    "list_dead_letters", "get_dead_letter", "requeue_targets", "dead_letter_ids", "requeue",
    "purge_dead_letters", "list_sent", "peek_rows", "lease_rows", "message_rows", "last_seq",
    "rows_after",
    # retention, counters and upkeep
    "get_retention", "set_retention", "add_counters", "archive_bound", "prune_acked",
    "archive_excess", "prune_oldest_acked", "prune_dead", "prune_state_log", "count_prunable",
    "expired_rows", "dead_letter_expired",
    # figures: metrics, stats and check
    "depth_rows", "acked_rows", "sent_rows", "dead_reason_rows", "error_count_rows",
    "read_counters", "count_expired", "expired_leases", "rows_without_body",
    # following the rows by position (sqlbus.metrics.MetricsFollower; SQLite only)
    "follow_top", "acked_summary", "unacked_positions", "unacked_seqs", "rows_since", "rows_at",
    "messages_before",
    # shared state
    "get_state", "lock_state", "put_state", "state_keys", "state_entries", "state_snapshot",
    "state_log_after", "state_history",
]
