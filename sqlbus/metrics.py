"""Operations: metrics, queue depths, retention, checks, backup, vacuum, peek and tail.

>>> m = bus.metrics()                                  # doctest: +SKIP
>>> m.messages_sent, m.queue_depths["bob"].ready, m.throughput.per_minute   # doctest: +SKIP
>>> print(to_prometheus(m))                            # doctest: +SKIP
>>> print(to_openmetrics(m))                           # doctest: +SKIP

Everything here is read from the rows of the database file (SPEC 8: shared by every process),
never from one process's memory, and nothing on the publish/claim/ack path writes a counter:
an extra B-tree page per commit costs about a third of single-message throughput (see
:mod:`sqlbus.storage`). What retention deletes is folded into the ``counters`` table in the
same transaction, so totals survive pruning. The :class:`sqlbus.Bus` methods of the same names
are the public entry points; the CLI (:mod:`sqlbus.cli`) prints what they return.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import apsw
import msgspec

from . import connections, storage
from .errors import DatabaseError
from .messages import Message, iso_ms, listed_message

if TYPE_CHECKING:
    from .bus import Bus, SentRecord

__all__ = [
    "Metrics",
    "Throughput",
    "QueueDepth",
    "AgentActivity",
    "AgentStats",
    "InboxEntry",
    "PruneResult",
    "Retention",
    "CheckReport",
    "BackupResult",
    "VacuumResult",
    "ARCHIVE_RETENTION",
    "DEAD_RETENTION",
    "to_prometheus",
    "to_openmetrics",
]

log = logging.getLogger("sqlbus")

# The default retention (s), which a new file stores (SPEC 2.2)
ARCHIVE_RETENTION = storage.DEFAULT_RETENTION[0] / 1000  # acked rows (the sent archive)
DEAD_RETENTION = storage.DEFAULT_RETENTION[1] / 1000  # dead letters
UPKEEP_EVERY = 60.0  # s: how often each process runs a background retention pass
UPKEEP_CATCH_UP = 1.0  # s: ... or this soon again when the last pass was a full batch
UPKEEP_BATCH = 2000  # rows per background pass: a few ms of write lock
WAL_CHECK_EVERY = 0.1  # s: how often a writing process looks whether upkeep is due
WAL_LIMIT = 64 * 1024 * 1024  # bytes of WAL frames before a restart waits for readers
WAL_WAIT = 0.05  # s: how long that checkpoint may wait for readers (writers wait meanwhile)
WAL_BACKOFF = 5.0  # s: after a restart that readers kept from finishing, before the next
# A commit that leaves at least this many frames (8 MB of 2 KiB pages) in the WAL wakes the
# process's checkpointer thread (0: no checkpointer; SQLite's automatic checkpoint inside
# commits instead). Each pass copies the distinct pages and fsyncs twice, and its RESTART step
# holds writers back for about a millisecond, so fewer, larger passes cost less: measured
# with two processes in ping-pong, 1,000 frames made ~80 passes a second and a p99 of ~1.8 ms.
CHECKPOINT_FRAMES = 4000
CHECKPOINT_GAP = 0.01  # s: the least time between two checkpoints of one process


# ---------------------------------------------------------------------------------------------
# Records


class Throughput(msgspec.Struct, kw_only=True):
    """Acked deliveries in the last second (``per_second``) and the last minute (``per_minute``)."""

    per_second: float
    per_minute: float


class QueueDepth(msgspec.Struct, kw_only=True):
    """One agent's inbox (SPEC 4.2): ``ready`` to claim now (due retries included),
    ``leased`` (in flight), ``retrying`` (waiting for its backoff), ``scheduled`` (a delayed
    publish, not yet due), ``expired`` (never delivered again, not yet moved to dead letters),
    ``dead`` (dead letters kept)."""

    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int


class AgentActivity(msgspec.Struct, kw_only=True):
    """Messages an agent ``sent`` (one per id) and deliveries it ``received`` (acked)."""

    sent: int
    received: int


class Metrics(msgspec.Struct, kw_only=True):
    """Bus-wide metrics (SPEC 8), the same for every process on the file.

    Totals count since the file was made (retention folds what it deletes into them):
    ``messages_sent`` one per message id; ``messages_received`` acked deliveries;
    ``messages_failed`` failures (not ``Retry``), by name in ``error_rates``;
    ``messages_dead_lettered`` every move to dead letters, ``messages_expired`` the part of
    them whose reason is ``expired``; ``messages_unhandled`` and ``late_responses`` as counted
    by the run loop. ``average_delivery_ms``: publish to ack. ``success_rate``: acked /
    (acked + dead-lettered), 1.0 when both are 0. ``oldest_ready_age_ms``: age of the oldest
    message ready to claim (lag), 0 when none. Sizes in bytes; ``timestamp`` ISO 8601 UTC.
    """

    messages_sent: int
    messages_received: int
    messages_failed: int
    messages_dead_lettered: int
    messages_expired: int
    messages_unhandled: int
    late_responses: int
    average_delivery_ms: float
    throughput: Throughput
    error_rates: dict[str, int]
    agent_activity: dict[str, AgentActivity]
    success_rate: float
    queue_depths: dict[str, QueueDepth]
    oldest_ready_age_ms: int
    wal_bytes: int
    db_bytes: int
    timestamp: str


class AgentStats(msgspec.Struct, kw_only=True):
    """One agent's inbox as ``sqlbus stats`` shows it, in the states of :class:`QueueDepth`
    (``oldest_ready_age_ms`` 0 when nothing is ready)."""

    agent: str
    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int
    oldest_ready_age_ms: int


class InboxEntry(msgspec.Struct, kw_only=True):
    """A message in an inbox, seen without claiming it: ``status`` is one of the states of
    :class:`QueueDepth` but ``dead``; ``visible_at`` (ISO 8601 UTC) is when a lease ends or a
    retry or delayed message comes due; ``attempts`` deliveries so far."""

    message: Message
    status: str
    attempts: int
    visible_at: str
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


class PruneResult(msgspec.Struct, kw_only=True):
    """What a prune deleted: acked rows of the sent archive and dead letters."""

    acked: int
    dead_letters: int


class Retention(msgspec.Struct, kw_only=True):
    """The retention policy stored in the database, the same for every process (SPEC 2.2).

    Acked messages (the sent archive, and the state change log ``watch`` replays) are deleted
    ``archive_retention`` seconds after their ack or write, dead letters ``dead_retention``
    seconds after they failed; above ``archive_max_messages`` acked messages the oldest go
    first. None keeps them for ever (no bound)."""

    archive_retention: float | None
    dead_retention: float | None
    archive_max_messages: int | None


class CheckReport(msgspec.Struct, kw_only=True):
    """The health of a database file (``sqlbus check``). ``ok`` is False when ``problems``
    is not empty; ``wal_pinned`` says a reader holds an old snapshot, so the WAL cannot be
    checkpointed past it and grows."""

    ok: bool
    problems: list[str]
    integrity: list[str]
    schema_version: int
    supported_schema_version: int
    db_bytes: int
    wal_bytes: int
    wal_frames: int
    wal_frames_checkpointed: int
    wal_pinned: bool
    expired_leases: int
    # Expired messages still in an inbox: normal (the next claim or upkeep moves them to dead
    # letters), so information, not a problem.
    expired_messages: int = 0


class BackupResult(msgspec.Struct, kw_only=True):
    """A finished backup: where, how many pages and bytes, how long it took (seconds)."""

    dest: str
    pages: int
    bytes: int
    seconds: float


class VacuumResult(msgspec.Struct, kw_only=True):
    """File sizes (database plus WAL, bytes) before and after a vacuum. ``shrunk`` is True
    when the file was rebuilt without its free pages and the WAL truncated; else False, and
    ``reason`` says why."""

    bytes_before: int
    bytes_after: int
    shrunk: bool
    reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Metrics and stats


def file_sizes(path: str) -> tuple[int, int]:
    """(database bytes, WAL bytes) of the file at ``path`` (0 for a missing WAL)."""

    def size(name: str) -> int:
        try:
            return os.path.getsize(name)
        except OSError:
            return 0

    return size(path), size(path + "-wal")


def _read_snapshot(conn: apsw.Connection) -> None:
    storage.begin_read(conn)  # one read transaction: every query below sees the same commit


def _end_read(conn: apsw.Connection) -> None:
    storage.end_read(conn)


@contextmanager
def snapshot(conn: apsw.Connection) -> Iterator[None]:
    """One read transaction, so that every query inside sees the same commit (inside a
    caller's open transaction, that one is already a snapshot)."""
    if not conn.get_autocommit():
        yield
        return
    storage.begin_read(conn)
    try:
        yield
    finally:
        storage.end_read(conn)


def compute_stats(conn: apsw.Connection, now: int, agents: Iterable[str] = ()) -> list[AgentStats]:
    """Per-agent depths from the partial indexes (cheap whatever the archive size); call it
    inside :func:`snapshot`."""
    by_agent = {
        agent: AgentStats(agent=agent, ready=0, leased=0, retrying=0, scheduled=0, expired=0,
                          dead=0, oldest_ready_age_ms=0)
        for agent in agents
    }
    for agent, ready, leased, retrying, scheduled, expired, dead, oldest in storage.depth_rows(
        conn, now
    ):
        by_agent[agent] = AgentStats(
            agent=agent, ready=ready, leased=leased, retrying=retrying, scheduled=scheduled,
            expired=expired, dead=dead,
            oldest_ready_age_ms=0 if oldest is None else max(0, now - oldest),
        )
    return [by_agent[agent] for agent in sorted(by_agent)]


def compute_metrics(conn: apsw.Connection, now: int, path: str) -> Metrics:
    """Read :class:`Metrics` from the file in one read transaction."""
    _read_snapshot(conn)
    try:
        registered = storage.agent_ids(conn)
        stats = compute_stats(conn, now, registered)
        acked = storage.acked_rows(conn, now)
        sent = storage.sent_rows(conn)
        reasons = dict(storage.dead_reason_rows(conn))
        errors = dict(storage.error_count_rows(conn))
        counters = storage.read_counters(conn)
    finally:
        _end_read(conn)

    def total(name: str) -> int:
        return sum(value for n, _agent, value in counters if n == name)

    def per_agent(name: str) -> dict[str, int]:
        result: dict[str, int] = {}
        for n, agent, value in counters:
            if n == name and agent:
                result[agent] = result.get(agent, 0) + value
        return result

    sent_by = per_agent("sent")
    for sender, count in sent:
        sent_by[sender] = sent_by.get(sender, 0) + count
    received_by = per_agent("received")
    delivery_ms = total("delivery_ms")
    last_second = last_minute = 0
    for agent, count, ms, second, minute in acked:
        received_by[agent] = received_by.get(agent, 0) + count
        delivery_ms += ms or 0
        last_second += second or 0
        last_minute += minute or 0
    received = sum(received_by.values())
    dead = sum(s.dead for s in stats) + total("dead")
    names = set(registered) | set(sent_by) | set(received_by)
    db_bytes, wal_bytes = file_sizes(path)
    return Metrics(
        messages_sent=sum(sent_by.values()),
        messages_received=received,
        messages_failed=sum(errors.values()),
        messages_dead_lettered=dead,
        # expired from the moment they expire: those still in an inbox count too
        messages_expired=reasons.get("expired", 0) + total("expired") + sum(s.expired for s in stats),
        messages_unhandled=total("unhandled"),
        late_responses=total("late_responses"),
        average_delivery_ms=round(delivery_ms / received, 3) if received else 0.0,
        throughput=Throughput(per_second=float(last_second), per_minute=float(last_minute)),
        error_rates=errors,
        agent_activity={
            name: AgentActivity(sent=sent_by.get(name, 0), received=received_by.get(name, 0))
            for name in sorted(names)
        },
        success_rate=received / (received + dead) if received + dead else 1.0,
        queue_depths={
            s.agent: QueueDepth(ready=s.ready, leased=s.leased, retrying=s.retrying,
                                scheduled=s.scheduled, expired=s.expired, dead=s.dead)
            for s in stats
        },
        oldest_ready_age_ms=max((s.oldest_ready_age_ms for s in stats), default=0),
        wal_bytes=wal_bytes,
        db_bytes=db_bytes,
        timestamp=iso_ms(now),
    )


# ---------------------------------------------------------------------------------------------
# Prometheus exposition (SPEC 8): the text format and OpenMetrics, as prometheus_client writes
# them. Counters end in _total, durations are in seconds, one name per family. The formats
# differ on counters: the text format names the family ``X_total``, OpenMetrics names it ``X``
# (its samples are ``X_total``) and ends with ``# EOF``; neither parser accepts the other's.

_Family = tuple[str, str, str, list[tuple[str, float]]]  # name, kind, help, (labels, value)


def _families(m: Metrics) -> list[_Family]:
    """The families SPEC 8 names, counters without their ``_total``."""
    def one(value: float) -> list[tuple[str, float]]:
        return [("", value)]

    return [
        ("sqlbus_messages_sent", "counter",
         "Messages published, one per message id however many recipients.", one(m.messages_sent)),
        ("sqlbus_messages_received", "counter", "Deliveries acked.", one(m.messages_received)),
        ("sqlbus_messages_failed", "counter", "Handler failures (Retry excluded).",
         one(m.messages_failed)),
        ("sqlbus_messages_dead_lettered", "counter", "Moves to dead letters.",
         one(m.messages_dead_lettered)),
        ("sqlbus_messages_expired", "counter", "Messages dead-lettered because their ttl ran out.",
         one(m.messages_expired)),
        ("sqlbus_messages_unhandled", "counter", "Messages acked with no handler for their type.",
         one(m.messages_unhandled)),
        ("sqlbus_late_responses", "counter",
         "Responses that arrived after their request timed out.", one(m.late_responses)),
        ("sqlbus_errors", "counter", "Handler failures by exception name.",
         [(f'{{error="{_label(error)}"}}', count) for error, count in sorted(m.error_rates.items())]),
        ("sqlbus_agent_messages", "counter",
         "Messages sent and deliveries received (acked) per agent.",
         [(f'{{agent="{_label(agent)}",direction="{direction}"}}', getattr(activity, direction))
          for agent, activity in sorted(m.agent_activity.items())
          for direction in ("sent", "received")]),
        ("sqlbus_average_delivery_seconds", "gauge", "Mean time from publish to ack, in seconds.",
         one(m.average_delivery_ms / 1000)),
        ("sqlbus_throughput_per_second", "gauge",
         "Deliveries acked per second, over the last second (1s) or minute (1m).",
         [('{window="1s"}', m.throughput.per_second),
          ('{window="1m"}', m.throughput.per_minute / 60)]),
        ("sqlbus_success_ratio", "gauge", "Acked / (acked + dead-lettered), 0..1.",
         one(m.success_rate)),
        ("sqlbus_queue_depth", "gauge",
         "Messages per agent inbox by state (ready, leased, retrying, scheduled, expired, dead).",
         [(f'{{agent="{_label(agent)}",state="{state}"}}', getattr(depth, state))
          for agent, depth in sorted(m.queue_depths.items())
          for state in QueueDepth.__struct_fields__]),
        ("sqlbus_oldest_ready_age_seconds", "gauge",
         "Age of the oldest message ready to claim, in seconds.", one(m.oldest_ready_age_ms / 1000)),
        ("sqlbus_wal_bytes", "gauge", "Size of the write-ahead log file in bytes.", one(m.wal_bytes)),
        ("sqlbus_db_bytes", "gauge", "Size of the database file in bytes.", one(m.db_bytes)),
    ]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def to_prometheus(m: Metrics) -> str:
    """``m`` in the Prometheus text format (``text/plain; version=0.0.4``): ``# HELP`` and
    ``# TYPE`` per family, then its samples; counter families are named ``..._total``."""
    lines = []
    for name, kind, text, samples in _families(m):
        family = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {family} {text}")
        lines.append(f"# TYPE {family} {kind}")
        lines.extend(f"{family}{labels} {_number(value)}" for labels, value in samples)
    return "\n".join(lines) + "\n"


def to_openmetrics(m: Metrics) -> str:
    """``m`` in OpenMetrics (``application/openmetrics-text; version=1.0.0``): counter
    families without ``_total``, their samples with it, and ``# EOF`` at the end."""
    lines = []
    for name, kind, text, samples in _families(m):
        sample = f"{name}_total" if kind == "counter" else name
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"# HELP {name} {text}")
        lines.extend(f"{sample}{labels} {_number(value)}" for labels, value in samples)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Retention


def prune(
    bus: Bus,
    sent_older_than: float | None,
    dead_older_than: float | None,
    max_messages: int | None = None,
    *,
    batch: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Delete acked rows acked more than ``sent_older_than`` seconds ago and dead letters
    older than ``dead_older_than`` seconds (None: keep them), then the oldest acked rows above
    ``max_messages`` (None: no bound), in short transactions of ``batch`` rows so writers are
    never held up for long. ``progress(done, total)``."""
    now = bus._now_ms()
    acked_cutoff = None if sent_older_than is None else now - int(sent_older_than * 1000)
    dead_cutoff = None if dead_older_than is None else now - int(dead_older_than * 1000)
    total = 0
    if progress is not None:
        with bus._reading() as conn:
            total = sum(storage.count_prunable(conn, acked_cutoff, dead_cutoff))
        progress(0, total)
    result = PruneResult(acked=0, dead_letters=0)
    bound = after = 0
    if acked_cutoff is not None:
        with bus._reading() as conn:
            bound = storage.archive_bound(conn, acked_cutoff)
    for kind, cutoff in (("acked", acked_cutoff), ("dead", dead_cutoff)):
        if cutoff is None:
            continue
        while True:
            with bus._write() as conn:
                if kind == "acked":
                    n, after = storage.prune_acked(conn, cutoff, batch, after, bound)
                    result.acked += n
                    # the state change log ages with the archive (watch replays only recent)
                    n = max(n, storage.prune_state_log(conn, cutoff, batch))
                else:
                    n = storage.prune_dead(conn, cutoff, batch)
                    result.dead_letters += n
            if progress is not None:
                done = result.acked + result.dead_letters
                progress(done, max(total, done))
            if n < batch:
                break
    if max_messages is not None:
        # Counted once, outside the write lock (it reads whole indexes); the batches delete
        # that excess and no more.
        with bus._reading() as conn:
            excess = storage.archive_excess(conn, max_messages)
        total += excess
        after = 0
        while excess > 0:
            with bus._write() as conn:
                n, after = storage.prune_oldest_acked(conn, min(excess, batch), after)
            result.acked += n
            excess -= n
            if progress is not None:
                done = result.acked + result.dead_letters
                progress(done, max(total, done))
            if n == 0:
                break
    return result


def upkeep(bus: Bus) -> int:
    """One background retention pass under the policy stored in the file: at most
    ``UPKEEP_BATCH`` acked rows past ``archive_retention`` (and as many state changes), as many
    dead letters past ``dead_retention`` and as many of the oldest acked rows above
    ``archive_max_messages``, in one short transaction; in the same one it moves up to
    ``UPKEEP_BATCH`` expired messages to dead letters (SPEC 4: not only a claim on their inbox
    does, so an inbox nobody reads does not keep them). Returns rows deleted or moved."""
    now = bus._now_ms()
    # Read before the write lock: the archive's bound walks every row older than the cutoff,
    # its excess counts whole indexes, and finding expired rows walks the backlog.
    with bus._reading() as conn:
        archive_ms, dead_ms, max_messages = storage.get_retention(conn)
        bound = 0 if archive_ms is None else storage.archive_bound(conn, now - archive_ms)
        excess = 0 if max_messages is None else storage.archive_excess(conn, max_messages)
        expired = storage.expired_rows(conn, now, UPKEEP_BATCH)
    if archive_ms is None and dead_ms is None and not excess and not expired:
        return 0
    acked = deleted = 0
    with bus._write() as conn:
        if expired:
            deleted += storage.dead_letter_expired(conn, expired, now)
        if archive_ms is not None:
            acked = storage.prune_acked(conn, now - archive_ms, UPKEEP_BATCH, bound=bound)[0]
            deleted += storage.prune_state_log(conn, now - archive_ms, UPKEEP_BATCH)
        if excess > acked:  # the rows just pruned by age count against the excess
            acked += storage.prune_oldest_acked(conn, min(excess - acked, UPKEEP_BATCH))[0]
        if dead_ms is not None:
            deleted += storage.prune_dead(conn, now - dead_ms, UPKEEP_BATCH)
    return deleted + acked


# ---------------------------------------------------------------------------------------------
# WAL upkeep


class Checkpointer:
    """Copies the WAL back into the database from a thread of its own, so that no commit
    pays for a checkpoint, and makes the WAL start over so it stays a few MB long.

    SQLite's automatic checkpoint runs inside whichever commit takes the WAL past its
    threshold, and a checkpoint ends with an fsync of the database file: measured with 2
    producer and 2 consumer processes, a quarter of a consumer's time went there, and a
    ping-pong's p99 went from ~1.6 to ~4.5 ms. Every connection of the bus reports the WAL's
    length after each of its commits (:meth:`wal_hook`, SQLite's WAL hook, which replaces the
    automatic checkpoint); past ``CHECKPOINT_FRAMES`` the thread (started on first need) runs
    :func:`fold_wal` on a connection of its own, at most once per ``CHECKPOINT_GAP``, and
    otherwise sleeps on an event.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._frames = 0  # the WAL's length after this process's last commit
        self._restart_after = 0.0  # no RESTART pass before (a reader pinned the WAL)

    def wal_hook(self, frames: int) -> None:
        """After a commit of this process that left ``frames`` frames in the WAL."""
        self._frames = frames
        if frames >= CHECKPOINT_FRAMES and not self._wanted.is_set():
            self._wake()

    def _wake(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is not None or self._closed or self._pid != os.getpid():
                    return
                thread = threading.Thread(target=self._run, name="sqlbus-checkpoint", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    return  # interpreter shutting down
                self._thread = thread
        self._wanted.set()

    def _run(self) -> None:
        wanted = self._wanted
        conn = None
        while True:
            wanted.wait()
            if self._closed or self._pid != os.getpid():
                return
            wanted.clear()
            if self._frames < CHECKPOINT_FRAMES:
                continue  # another process's checkpointer made it start over meanwhile
            try:
                with connections.inside:  # a fork waits for the checkpoint in progress
                    if conn is None:  # its own, waiting at most WAL_WAIT for others
                        conn = self._bus._open_connection(WAL_WAIT)
                    restart = time.monotonic() >= self._restart_after
                    if fold_wal(conn, restart=restart) is False:
                        self._restart_after = time.monotonic() + WAL_BACKOFF
            except (apsw.Error, DatabaseError):
                pass  # busy, closed, read-only: an optimisation only, the next one retries
            except Exception:  # noqa: BLE001 - a bug here must not end checkpoints for good
                log.exception("sqlbus: the checkpointer failed; it will try again")
            time.sleep(CHECKPOINT_GAP)

    def close(self) -> None:
        """End the thread, after the checkpoint it may be running (the bus then closes its
        connection: a connection is never used by two threads at once)."""
        self._closed = True
        self._wanted.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and (
            self._pid == os.getpid()
        ):
            thread.join(5.0)


def fold_wal(conn: apsw.Connection, *, restart: bool = True) -> bool | None:
    """Copy the WAL back into the database and make it start over. Returns False when a
    reader kept the RESTART pass from finishing (try it again later, not at once), else None.

    A PASSIVE pass copies what it can without holding anyone up. The WAL itself starts over
    only at a commit made while it is wholly copied and no reader is using it, which under
    steady load never happens by itself (commits land during every copy): measured, 2
    processes in ping-pong grew it to 64 MB in two seconds. So when the copy is complete and
    the WAL still long, a RESTART pass copies what came meanwhile, holding writers back (for
    about an fsync), and waits up to the connection's busy timeout for readers to leave the
    WAL; the next commit then writes at its start again. When the copy is not complete, a
    reader holds an older snapshot, and a RESTART would hold every writer back while it waits
    for that reader: it is tried only once the WAL holds ``WAL_LIMIT`` bytes of frames (under
    sustained load from several processes, readers overlap so that the copy is never
    complete: measured, the WAL grew to 160-375 MB in 10 s of 2 publishers and 2 consumers).
    Frames are counted, never the file's size: ``journal_size_limit`` keeps a WAL file that
    once grew that long at its limit after it starts over. ``restart=False`` skips RESTART.
    """
    busy, frames, done = storage.checkpoint(conn, "PASSIVE")
    if not restart or busy or frames < CHECKPOINT_FRAMES:
        return None
    if done < frames and frames * (storage.page_size(conn) + 24) < WAL_LIMIT:
        return None
    busy, frames, _done = storage.checkpoint(conn, "RESTART")
    # Busy with no frame counts: another process holds the checkpoint lock (SQLite does not
    # wait for it), so it is copying now and the next pass tries again; with counts, the
    # wait for readers ran out.
    return False if busy and frames >= 0 else None


def background_upkeep(bus: Bus) -> None:
    """What a process does after some of its writes (see ``Bus._committed``): about once a
    minute, run a retention pass (WAL upkeep is the :class:`Checkpointer` thread's). Errors
    are swallowed: upkeep must never fail the write that triggered it, and the next pass
    tries again."""
    now = time.monotonic()
    if now < bus._retention_due:
        return
    bus._retention_due = now + UPKEEP_EVERY
    try:
        if upkeep(bus) >= UPKEEP_BATCH:
            bus._retention_due = time.monotonic() + UPKEEP_CATCH_UP
    except DatabaseError:
        pass


# ---------------------------------------------------------------------------------------------
# Checks, backup, vacuum


def check(bus: Bus) -> CheckReport:
    """Integrity, schema version, file sizes, WAL pinning, expired leases and expired messages
    not yet moved to dead letters of the bus's file."""
    conn = bus._conn()
    now = bus._now_ms()
    problems: list[str] = []
    with bus._reading(conn):
        integrity = storage.integrity_check(conn)
        application_id, version = storage.schema_marks(conn)
    try:
        with bus._reading(conn):
            leases = storage.expired_leases(conn, now)
            expired = storage.count_expired(conn, now)
            bodiless = storage.rows_without_body(conn)
    except DatabaseError:
        if integrity == ["ok"]:
            raise
        leases = expired = bodiless = 0  # the rows cannot be read: the damage is the problem to report
    with bus._reading(conn):
        # A passive checkpoint copies what it can and says how far it got: frames it could not
        # copy belong to snapshots that some reader still holds. Ask twice, a moment apart, so
        # a transaction that was merely running does not count as pinning.
        busy, frames, done = storage.checkpoint(conn, "PASSIVE")
        if frames > 0 and done < frames:
            time.sleep(0.05)
            busy, frames, done = storage.checkpoint(conn, "PASSIVE")
    pinned = frames > 0 and done < frames
    if integrity != ["ok"]:
        found = "; ".join(integrity[:3]).replace("\n", "; ")
        problems.append(f"integrity check failed: {found}; the file is damaged: restore a backup")
    if bodiless:
        problems.append(f"{bodiless} message rows have lost their shared body (message_body)")
    if application_id != storage.APPLICATION_ID:
        problems.append(f"not marked as a sqlbus database (application_id {application_id:#x})")
    if version != storage.SCHEMA_VERSION:
        problems.append(f"schema version {version}, this sqlbus reads {storage.SCHEMA_VERSION}")
    if pinned:
        problems.append(
            f"WAL pinned: {frames - done} of {frames} frames cannot be checkpointed because a "
            "reader holds an old snapshot (a long read transaction); the WAL grows until it ends"
        )
    db_bytes, wal_bytes = file_sizes(bus.path)
    return CheckReport(
        ok=not problems, problems=problems, integrity=integrity, schema_version=version,
        supported_schema_version=storage.SCHEMA_VERSION, db_bytes=db_bytes, wal_bytes=wal_bytes,
        wal_frames=max(frames, 0), wal_frames_checkpointed=max(done, 0), wal_pinned=pinned,
        expired_leases=leases, expired_messages=expired,
    )


def backup(
    bus: Bus,
    dest: str | os.PathLike[str],
    *,
    pages_per_step: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """Copy the database to the new file ``dest`` with SQLite's online backup API.

    The copy is one consistent snapshot, taken when the backup starts: a read transaction is
    held on the source for the whole copy, so writers in other processes keep going (WAL) and
    the copy never restarts. ``progress(pages_done, pages_total)``. ``dest`` must not exist.
    """
    dest_path = os.path.abspath(os.fspath(dest))
    # SQLite would use (or write through) whatever it found at these names.
    for name in (dest_path, *(dest_path + suffix for suffix in ("-journal", "-wal", "-shm"))):
        if os.path.lexists(name):
            raise DatabaseError(f"backup destination {name} exists; refusing to overwrite it")
    directory = os.path.dirname(dest_path)
    if not os.path.isdir(directory):
        raise DatabaseError(f"backup destination directory {directory} does not exist")
    started = time.monotonic()
    # Inside the fork gate for the whole copy: its connection is none of the bus's, so a child
    # forked meanwhile could not take it out of SQLite's books (sqlbus.connections).
    with connections.inside:
        return _backup(bus, dest_path, pages_per_step, progress, started)


def _backup(
    bus: Bus, dest_path: str, pages_per_step: int,
    progress: Callable[[int, int], None] | None, started: float,
) -> BackupResult:
    source = storage.open_connection(
        bus.path, synchronous=bus._synchronous, busy_timeout=bus.busy_timeout
    )
    created = False
    try:
        fd = os.open(dest_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        created = True
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
        finally:
            os.close(fd)
        target = apsw.Connection(dest_path)
        try:
            storage.begin_read(source)  # one snapshot for the whole copy: consistent
            with target.backup("main", source, "main") as copy:
                while not copy.done:
                    copy.step(pages_per_step)
                    if progress is not None:
                        progress(copy.page_count - copy.remaining, copy.page_count)
                pages = copy.page_count
            storage.end_read(source)
        finally:
            target.close()
    except BaseException as exc:
        if created:
            for suffix in ("", "-journal", "-wal", "-shm"):
                try:
                    os.remove(dest_path + suffix)
                except OSError:
                    pass
        if isinstance(exc, apsw.Error):
            raise DatabaseError(f"backup to {dest_path} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise DatabaseError(f"cannot create {dest_path}: {exc.strerror}") from exc
        raise
    finally:
        source.close()
    return BackupResult(
        dest=dest_path, pages=pages, bytes=os.path.getsize(dest_path),
        seconds=round(time.monotonic() - started, 3),
    )


def _truncate_wal(conn: apsw.Connection, patience: float) -> bool:
    """Copy the whole WAL into the database and truncate it; False when a reader (or a long
    transaction) kept it in use for ``WAL_WAIT``, the connection's busy timeout.

    A TRUNCATE checkpoint holds writers back while it waits for readers, so that wait stays
    short. Another process's checkpoint copying the same frames is no reader: (busy, -1, -1)
    says the checkpoint lock was taken, and it is worth waiting for, up to ``patience`` s,
    without holding anyone back."""
    deadline = time.monotonic() + patience
    while True:
        busy, frames, _done = storage.checkpoint(conn, "TRUNCATE")
        if not busy:
            return True
        if frames >= 0 or time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def vacuum(bus: Bus) -> VacuumResult:
    """Rebuild the file to give the space of deleted rows back to the file system, then
    truncate the WAL (SPEC 2.2).

    VACUUM writes the rebuilt file into the WAL; only a checkpoint that copies all of it
    back shrinks the database, and a reader holding an older snapshot prevents that, leaving
    the file larger than before. So the WAL must be free first: a reader that does not leave
    it within ``WAL_WAIT`` makes vacuum give up before rebuilding anything. The rebuild holds
    writers back while it copies; the copy back into the database is a PASSIVE checkpoint,
    which holds nobody back; the final truncation waits at most ``WAL_WAIT`` for readers.
    """
    before = sum(file_sizes(bus.path))
    reader = "a reader holding an old snapshot (or a long transaction)"
    if bus._closed:
        raise DatabaseError(f"the bus on {bus.path} is closed")
    with connections.inside:  # like backup: a connection that is none of the bus's
        return _vacuum(bus, before, reader)


def _vacuum(bus: Bus, before: int, reader: str) -> VacuumResult:
    conn = None
    try:
        # a connection of its own: its waits and temp_store differ from the bus's
        conn = storage.open_connection(
            bus.path, synchronous=bus._synchronous, busy_timeout=WAL_WAIT
        )
        if not _truncate_wal(conn, bus.busy_timeout):
            return VacuumResult(
                bytes_before=before, bytes_after=sum(file_sizes(bus.path)), shrunk=False,
                reason=f"not vacuumed: {reader} kept the WAL in use for more than "
                f"{WAL_WAIT * 1000:.0f} ms; run vacuum again when it has ended",
            )
        storage.set_busy_timeout(conn, bus.busy_timeout)  # for the write lock, like any writer
        storage.vacuum(conn)
        storage.checkpoint(conn, "PASSIVE")
        storage.set_busy_timeout(conn, WAL_WAIT)
        truncated = _truncate_wal(conn, bus.busy_timeout)
    except apsw.Error as exc:
        raise bus._database_error(exc) from exc
    finally:
        if conn is not None:
            conn.close()
    after = sum(file_sizes(bus.path))
    if not truncated:
        return VacuumResult(
            bytes_before=before, bytes_after=after, shrunk=False,
            reason=f"rebuilt, but {reader} keeps the rebuilt pages in the WAL; the file shrinks "
            "at the first checkpoint after it ends",
        )
    return VacuumResult(bytes_before=before, bytes_after=after, shrunk=True)


# ---------------------------------------------------------------------------------------------
# Peek and tail


def peek(bus: Bus, agent: str, limit: int) -> list[InboxEntry]:
    """An agent's inbox without claiming anything, read in one snapshot: ready messages in
    the order receive takes them, then the others by when they become claimable, expired
    ones last."""
    now = bus._now_ms()
    with bus._reading() as conn, snapshot(conn):
        rows = storage.peek_rows(conn, agent, now, limit, bus._max_body())
    entries = []
    for status, visible_at, attempts, *columns, length, body in rows:
        entries.append(
            # a row that cannot be decoded shows as an error message (SPEC 4.2)
            InboxEntry(message=listed_message(agent, *columns, body),
                       status=status, attempts=attempts, visible_at=iso_ms(visible_at),
                       payload_bytes=length)
        )
    return entries


def tail(
    bus: Bus,
    agent: str | None,
    types: Iterable[str] | None,
    *,
    timeout: float | None,
    from_seq: int | None = None,
) -> Iterator[SentRecord]:
    """Yield messages as they are published (by any process), from now on, until
    ``timeout`` seconds pass (None: forever). ``agent`` keeps messages sent by or to it,
    ``types`` those types. The position and the timeout start at this call, not at the first
    ``next()``: a message published in between is yielded."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if from_seq is None:
        with bus._reading() as conn:
            from_seq = storage.last_seq(conn)
    return _follow(bus, agent, None if types is None else set(types), deadline, from_seq)


def _follow(
    bus: Bus, agent: str | None, wanted: set[str] | None, deadline: float | None, cursor: int
) -> Iterator[SentRecord]:
    from .bus import SentRecord

    while True:
        baseline = bus._data_version()
        with bus._reading() as conn:
            rows = storage.rows_after(conn, cursor, 500, bus._max_body())
        if len(rows) == 500:
            # Rows of one message are written together; keep the last message whole.
            last_id = rows[-1][2]
            trimmed = [row for row in rows if row[2] != last_id]
            if trimmed:
                rows = trimmed
        groups: list[list[tuple[Any, ...]]] = []
        for row in rows:
            if groups and groups[-1][0][2] == row[2]:
                groups[-1].append(row)
            else:
                groups.append([row])
        for group in groups:
            cursor = group[-1][0]
            recipients = [row[1] for row in group if row[1] is not None]
            _seq, _agent, *columns, length, body = group[0]
            message = listed_message(recipients, *columns, body)
            if wanted is not None and message.type not in wanted:
                continue
            if agent is not None and message.sender != agent and agent not in recipients:
                continue
            yield SentRecord(message=message, recipients=recipients,
                             sent_at=iso_ms(columns[-1]), payload_bytes=length)
        if rows:
            continue
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        bus._wait_for_change(baseline, 1.0 if remaining is None else min(remaining, 1.0))
