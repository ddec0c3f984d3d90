"""The bus API: open a database, register agents, publish, receive, ack, fail, dead-letter.

>>> import sqlbus
>>> with sqlbus.connect("team.db") as bus:                    # doctest: +SKIP
...     alice, bob = bus.agent("alice"), bus.agent("bob")
...     alice.publish("bob", "notification", {"text": "hi"})
...     for d in bob.receive(limit=10, wait=1.0):
...         with d:                         # clean exit acks; an exception fails (retry)
...             print(d.message.payload)

The bus owns policy (defaults, the clock, connections, wake-ups); all SQL is in
:mod:`sqlbus.storage`. Every write is one short ``BEGIN IMMEDIATE`` transaction; no
transaction is open while a handler runs (claim, run the handler, ack in another).
"""

from __future__ import annotations

import contextvars
import enum
import fcntl
import fnmatch
import math
import os
import pwd
import stat as stat_module
import threading
import time
import traceback as traceback_module
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast, get_args

if TYPE_CHECKING:
    from .worker import Events

import apsw
import msgspec

from . import connections, storage
from . import metrics as ops
from .encoding import (
    Outgoing,
    PlainRun,
    check_agent_id,
    encode_json,
    encode_json_value,
    escape_strings,
    prepare,
    prepare_plain_batch,
)
from .errors import (
    AuthenticationError,
    DatabaseError,
    Discard,
    LeaseLostError,
    NotFoundError,
    Retry,
    ValidationError,
)
from .messages import (
    ENVELOPE_ALLOWANCE,
    MESSAGE_ID_RE,
    MESSAGE_TYPES,
    Headers,
    Message,
    MessageType,
    decode_stored,
    escape_text,
    iso_ms,
    listed_message,
)
from .state import StateStore, StateWrite, check_key
from .wakeup import ANY, RUNG, Wakeup, agent_tag, mark, mark_quiet, reset_marks, take_marks

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

T = TypeVar("T")
DURABILITY = {"normal": "NORMAL", "full": "FULL"}
ALIVE_WITHIN_MS = 60_000  # an agent seen within this window counts as alive
_TOUCH_EVERY_MS = 1_000  # receive() refreshes last_seen at most this often per agent object
_PUBLISH_KEYS = frozenset(
    ("to", "type", "payload", "priority", "ttl", "requires_ack", "correlation_id", "delay", "id")
)
NON_RETRYABLE: tuple[type[BaseException], ...] = (
    ValidationError,
    msgspec.ValidationError,
    AuthenticationError,
    PermissionError,
)


class Subscription(msgspec.Struct):
    """An agent's recorded interest (SPEC 5): ``kind`` ``"type"`` (``pattern`` a message type
    or ``*``) or ``"event"`` (``pattern`` an event-name pattern); ``subscribed_at`` ISO 8601 UTC."""

    kind: str
    pattern: str
    subscribed_at: str


class AgentInfo(msgspec.Struct, kw_only=True):
    """A registered agent. ``alive``: seen within the last 60 s (ISO 8601 UTC times);
    ``subscriptions``: its recorded interests."""

    id: str
    registered_at: str
    last_seen: str
    status: str
    alive: bool
    subscriptions: list[Subscription] = []


class SentRecord(msgspec.Struct, kw_only=True):
    """An archived message and the agents it was delivered to (empty for an unmatched broadcast)."""

    message: Message
    recipients: list[str]
    sent_at: str
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


class DeadLetter(msgspec.Struct, kw_only=True):
    """A delivery that ended in dead letters, with why (``reason``) and the error, if any.

    ``reason`` is ``max_attempts``, ``non_retryable``, ``discarded``, ``expired``,
    ``too_large`` (above the receiver's ``max_payload_bytes``, never loaded), ``corrupt``
    (the stored message cannot be decoded) or the caller's text; ``context`` a JSON object;
    ``failed_at`` ISO 8601 UTC.
    """

    id: int
    agent: str
    message: Message
    reason: str
    error_name: str | None
    error_message: str | None
    traceback: str | None
    context: dict[str, Any]
    failed_at: str
    attempts: int
    payload_bytes: int = 0  # the stored message's size (JSON bytes), loaded or not


# The longest duration accepted anywhere (~31,700 years): times are stored as epoch ms in
# 64-bit integers, and an infinite or larger value would overflow them (OverflowError).
MAX_SECONDS = 10**12


def _seconds(value: object, name: str, *, allow_zero: bool = True) -> float:
    """Check a duration in seconds (programmer mistakes raise ValueError/TypeError at once)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if value != value or value < 0 or (not allow_zero and value == 0):
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {rule} seconds, got {value!r}")
    if value > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS} seconds, got {value!r}")
    return float(value)


class _Stored(enum.Enum):
    STORED = "STORED"

    def __repr__(self) -> str:
        return "STORED"


#: The default of the retention keywords (``connect``, ``Bus.set_retention``, ``Bus.prune``):
#: the policy stored in the database, left as it is.
STORED = _Stored.STORED


def _retention_ms(value: float | None, name: str) -> int | None:
    """A retention duration (seconds, None: for ever) as stored: ms."""
    return None if value is None else round(_seconds(value, name) * 1000)


def _max_messages(value: int | None) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError(f"archive_max_messages must be an int or None, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"archive_max_messages must be >= 0 (or None: no bound), got {value!r}")
    return value


def _retention_changes(
    archive_retention: float | None | _Stored,
    dead_retention: float | None | _Stored,
    archive_max_messages: int | None | _Stored,
) -> dict[int, int | None]:
    """The given retention keywords, checked, as stored (by their place in the policy row)."""
    changes: dict[int, int | None] = {}
    if archive_retention is not STORED:
        changes[0] = _retention_ms(archive_retention, "archive_retention")
    if dead_retention is not STORED:
        changes[1] = _retention_ms(dead_retention, "dead_retention")
    if archive_max_messages is not STORED:
        changes[2] = _max_messages(archive_max_messages)
    return changes


def _retention(row: tuple[int | None, int | None, int | None]) -> ops.Retention:
    archive_ms, dead_ms, max_messages = row
    return ops.Retention(
        archive_retention=None if archive_ms is None else archive_ms / 1000,
        dead_retention=None if dead_ms is None else dead_ms / 1000,
        archive_max_messages=max_messages,
    )

# The latest time an id's 13 digits can hold: 2286-11-20T17:46:39.999Z, in epoch ms.
MAX_CLOCK_MS = 9_999_999_999_999

_all_buses: weakref.WeakSet[Bus] = weakref.WeakSet()
# The outbox block open in this thread (asyncio: this task), if any: a write of its own there
# would wait for the block's own write lock (see _Write).
_open_block: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "sqlbus_open_block", default=None
)


def _after_fork_in_child() -> None:
    for bus in list(_all_buses):
        bus._forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
    mode: int = 0o600,
    non_retryable: Iterable[type[BaseException]] = (),
    archive_retention: float | None | _Stored = STORED,
    dead_retention: float | None | _Stored = STORED,
    archive_max_messages: int | None | _Stored = STORED,
) -> Bus:
    """Open (creating if needed) the sqlbus database at ``path`` and return a :class:`Bus`.

    >>> bus = sqlbus.connect("team.db", durability="full")   # doctest: +SKIP

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
    )


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_paths(path: str) -> None:
    """Refuse a database path that is not a regular file of this user, or whose -journal,
    -wal or -shm (beside the file a symlink leads to: where SQLite makes them) is another
    user's or not a regular file: SQLite would read and write whatever it finds there."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        raise DatabaseError(f"{path} is a dangling symbolic link, not a database file") from None
    except OSError as exc:
        raise DatabaseError(f"cannot open {path}: {exc.strerror}") from exc
    if stat_module.S_ISDIR(target.st_mode):
        raise DatabaseError(f"{path} is a directory, not a database file")
    if not stat_module.S_ISREG(target.st_mode):
        raise DatabaseError(f"{path} is not a regular file (a device, FIFO or socket); refusing it")
    user = os.geteuid()
    link = os.lstat(path)
    for info, what in ((link, "the symbolic link"), (target, "the file")):
        if info.st_uid != user:
            raise DatabaseError(
                f"{path}: {what} is owned by {_owner_name(info.st_uid)}, not by this user "
                f"({_owner_name(user)}); refusing to open it"
            )
    real = os.path.realpath(path)
    for suffix in ("-journal", "-wal", "-shm"):
        try:
            info = os.lstat(real + suffix)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DatabaseError(f"cannot check {real}{suffix}: {exc.strerror}") from exc
        if not stat_module.S_ISREG(info.st_mode):
            raise DatabaseError(f"{real}{suffix} is not a regular file; refusing to open {path}")
        if info.st_uid != user:
            raise DatabaseError(
                f"{real}{suffix} is owned by {_owner_name(info.st_uid)}, not by this user "
                f"({_owner_name(user)}); refusing to open {path}"
            )


def _read_only_directory(path: str) -> str:
    """``"; its directory is read-only"`` when this user cannot make files beside ``path``."""
    directory = os.path.dirname(path) or "."
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        return f"; its directory {directory} is read-only"
    return ""


class _Write:
    """``with bus._write() as conn``: one BEGIN IMMEDIATE transaction on this thread's
    connection; apsw errors become :class:`DatabaseError`; waiters are woken after commit.
    The thread is inside :data:`sqlbus.connections.inside` from BEGIN to COMMIT."""

    __slots__ = ("bus", "conn")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def __enter__(self) -> apsw.Connection:
        block = _open_block.get()
        if block is not None and block._conn is not None:
            # Its BEGIN would wait out busy_timeout for the write lock the block holds.
            raise RuntimeError(
                f"{block.agent.id}'s transaction() block is open in this thread or task: "
                "write through its tx (tx.publish, tx.state.set, ...) or after the block"
            )
        connections.inside.__enter__()
        try:
            conn = self.conn = self.bus._conn()
            storage.begin(conn)
        except BaseException as exc:
            connections.inside.__exit__()
            if isinstance(exc, apsw.Error):
                raise self.bus._database_error(exc) from exc
            raise
        reset_marks()  # the commit rings whom this transaction marks (sqlbus.wakeup)
        return conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn = self.conn
        try:
            if exc_type is None:
                try:
                    storage.commit(conn)
                except apsw.Error as error:
                    self._rollback()
                    raise self.bus._database_error(error) from error
            else:
                self._rollback()
        finally:
            connections.inside.__exit__()
        if exc_type is None:
            self.bus._committed()
            return
        if isinstance(exc, apsw.Error):
            raise self.bus._database_error(exc) from exc

    def _rollback(self) -> None:
        try:
            storage.rollback(self.conn)
        except apsw.Error:
            pass  # the connection already ended the transaction


class _ClosedWithThread:
    """Kept in a thread's thread-local storage beside its connection: when the thread ends,
    that storage goes and this closes the connection (a thread that ends leaves nothing)."""

    __slots__ = ("bus", "conn", "pid")

    def __init__(self, bus: Bus, conn: storage.Connection) -> None:
        self.bus = weakref.ref(bus)
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        # In a forked child the other threads' storage goes before any at-fork handler runs:
        # their connections are the parent's, parked by _forget_connections, never closed.
        bus = self.bus()
        if bus is not None and os.getpid() == self.pid:
            bus._release(self.conn)


_DAMAGE = (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError)


class _Read:
    """``with bus._reading() as conn``: translate apsw errors for a read (no transaction)."""

    __slots__ = ("bus", "conn")

    def __init__(self, bus: Bus, conn: apsw.Connection | None) -> None:
        self.bus = bus
        self.conn = conn

    def __enter__(self) -> apsw.Connection:
        connections.inside.__enter__()
        try:
            if self.conn is None:
                self.conn = self.bus._conn()
            else:
                self.bus._check_usable(self.conn)
        except BaseException:
            connections.inside.__exit__()
            raise
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        connections.inside.__exit__()
        if isinstance(exc, apsw.Error):
            raise self.bus._database_error(exc) from exc
        if isinstance(exc, _DAMAGE):
            # sqlbus only stores valid UTF-8 text and message bodies it encoded itself: anything
            # else is damage SQLite did not notice.
            raise DatabaseError(
                f"{self.bus.path} is corrupt ({type_of(exc).__name__}: {exc}); "
                "run 'sqlbus check' and restore from a 'sqlbus backup'"
            ) from exc


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
        mode: int = 0o600,
        non_retryable: Iterable[type[BaseException]] = (),
        archive_retention: float | None | _Stored = STORED,
        dead_retention: float | None | _Stored = STORED,
        archive_max_messages: int | None | _Stored = STORED,
    ) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be 'normal' or 'full', got {durability!r}")
        self.lease = _seconds(lease, "lease", allow_zero=False)
        if type(max_attempts) is not int or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        self.backoff_base = _seconds(backoff_base, "backoff_base")
        self.backoff_cap = _seconds(backoff_cap, "backoff_cap")
        if type(max_payload_bytes) is not int or max_payload_bytes < 2:
            raise ValueError(f"max_payload_bytes must be an int >= 2, got {max_payload_bytes!r}")
        self.busy_timeout = _seconds(busy_timeout, "busy_timeout")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning epoch seconds")
        extra = tuple(non_retryable)
        for cls in extra:
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise TypeError(f"non_retryable takes exception classes, got {cls!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.durability = durability
        self.max_attempts = max_attempts
        self.max_payload_bytes = max_payload_bytes
        self.clock: Callable[[], float] = clock or time.time
        if clock is not None:
            self._now_ms()  # a clock out of range is refused before the file is touched
        self.non_retryable: tuple[type[BaseException], ...] = NON_RETRYABLE + extra
        retention = _retention_changes(archive_retention, dead_retention, archive_max_messages)
        self._upkeep_due = 0.0  # time.monotonic() of the next background upkeep
        self._retention_due = 0.0  # ... and of the next background retention pass
        self._synchronous = DURABILITY[durability]
        self._local = threading.local()
        self._connections: set[storage.Connection] = set()
        self._lock = threading.Lock()
        # Wake-ups of waiters, in this process and others (doorbells, checkpoints): sqlbus.wakeup
        self._wakeup = Wakeup(self.path)
        self._checkpointer = ops.Checkpointer(self)
        # Correlation ids that requests of this process await, per agent id (sqlbus.worker):
        # receive() and run() of that agent skip those responses. Replaced, never mutated.
        self._awaiting: dict[str, frozenset[str]] = {}
        self._closed = False
        self._open_file(mode)
        if retention:
            try:
                self._store_retention(retention)
            except BaseException:
                self.close()
                raise
        self.state = StateStore(self, None)
        _all_buses.add(self)

    # -- opening ---------------------------------------------------------------------------

    def _open_file(self, mode: int) -> None:
        path = self.path
        if path == ":memory:" or os.path.basename(path) == ":memory:":
            raise ValueError("sqlbus needs a database file path that several processes can open")
        created = False
        if not os.path.lexists(path):
            directory = os.path.dirname(path) or "."
            if not os.path.isdir(directory):
                raise DatabaseError(f"cannot create {path}: directory {directory} does not exist")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except FileExistsError:
                pass  # another process created it first
            except OSError as exc:
                raise DatabaseError(
                    f"cannot create {path}: {exc.strerror}{_read_only_directory(path)}"
                ) from exc
            else:
                try:
                    os.fchmod(fd, mode)  # the mode asked for, whatever the umask
                finally:
                    os.close(fd)
                created = True
        try:
            _check_paths(path)
            stat = os.stat(path)
            self._file_id = (stat.st_dev, stat.st_ino)
            # Reading the header opens and closes the file, and closing any descriptor of a file
            # drops every POSIX lock this process holds on it, SQLite's included: so only a file
            # that no bus of this process has open yet is read (one that is open was checked).
            in_use_here = any(
                bus._file_id == self._file_id and not bus._closed for bus in list(_all_buses)
            )
            empty = False if in_use_here else storage.check_file(path) == "empty"
            if empty or created:
                self._initialize_new_file(path)
            else:
                conn = self._conn()
                with connections.inside:
                    storage.initialize(conn, path, self._now_ms())
                    storage.set_wal_mode(conn, path)
        except apsw.Error as exc:
            self.close()
            raise self._database_error(exc) from exc
        except BaseException:
            self.close()
            raise

    def _initialize_new_file(self, path: str) -> None:
        """Switch an empty file to WAL and create the schema, one process at a time.

        Two processes switching the same empty file to WAL at once can lock each other out
        (measured: one waits out its whole busy timeout), so they take turns on an flock of
        the directory; the file itself is not opened for that (see _open_file).
        """
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            still_empty = storage.check_file(path) == "empty"  # before our connection reads it
            conn = self._conn()
            with connections.inside:
                if still_empty:  # nobody initialised it while we waited
                    storage.set_wal_mode(conn, path, new_file=True)
                storage.initialize(conn, path, self._now_ms())
                storage.set_wal_mode(conn, path)
        finally:
            os.close(directory)  # releases the flock

    def _conn(self) -> apsw.Connection:
        """This thread's connection (each thread has its own; it closes when the thread ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise self._closed_error()
            conn = self._open_connection(self.busy_timeout)
            self._local.conn = conn
            self._local.closer = _ClosedWithThread(self, conn)
        elif self._closed:
            raise self._closed_error()
        return conn

    def _check_usable(self, conn: storage.Connection) -> None:
        """Refuse a connection of a closed bus, or one a forked child inherited."""
        if self._closed:
            raise self._closed_error()
        if conn.generation != connections.generation:
            raise DatabaseError(
                f"{self.path}: this transaction or connection was opened before os.fork() and "
                "belongs to the parent process; open a new one in the child"
            )

    def _closed_error(self) -> DatabaseError:
        return DatabaseError(f"{self.path}: the bus is closed")

    def _open_connection(self, busy_timeout: float) -> apsw.Connection:
        """A new connection, closed with the bus (and handled at a fork like the others)."""
        if self._closed:
            raise self._closed_error()
        try:
            with connections.inside:
                conn = storage.open_connection(
                    self.path, synchronous=self._synchronous, busy_timeout=busy_timeout,
                    wal_hook=self._wal_hook if ops.CHECKPOINT_FRAMES else None,
                )
                conn.file = connections.file_pointer(conn)
            conn.generation = connections.generation
        except apsw.Error as exc:
            raise self._database_error(exc) from exc
        with self._lock:
            self._connections.add(conn)
        return conn

    def _release(self, conn: storage.Connection) -> None:
        """Close the connection of a thread that ended (unless close() or a fork took it)."""
        with self._lock:
            if conn not in self._connections:
                return
            self._connections.discard(conn)
        connections.close(conn)

    def _forget_connections(self) -> None:
        """In a forked child: drop the parent's connections; open new ones on demand.

        The inherited connections are taken out of SQLite's per-process books and parked for
        ever, never called, rolled back or closed (see :mod:`sqlbus.connections`): the
        child's own connections then take real locks, and the parent's transactions and WAL
        are left alone.
        """
        inherited, self._connections = self._connections, set()
        self._lock = threading.Lock()
        for conn in inherited:
            connections.release_inherited(conn.file)
            connections.park(conn)
        self._local = threading.local()
        self._wakeup.forget()  # the parent's doorbell stays the parent's
        self._wakeup = Wakeup(self.path)
        self._checkpointer = ops.Checkpointer(self)  # the parent's thread is not here
        self._awaiting = {}  # the parent's waiting requests are not the child's

    def _database_error(self, exc: apsw.Error) -> DatabaseError:
        """Say in one line what an apsw error means for the user."""
        path = self.path
        if isinstance(exc, apsw.BusyError):
            return DatabaseError(
                f"{path}: database is locked: another writer held it for more than "
                f"busy_timeout={self.busy_timeout}s; nothing was written"
            )
        if isinstance(exc, apsw.FullError):
            return DatabaseError(
                f"{path}: disk full (ENOSPC); nothing was written. Free space and retry"
            )
        if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
            return DatabaseError(
                f"{path} is corrupt ({exc}); run 'sqlbus check' and restore from a 'sqlbus backup'"
            )
        if isinstance(exc, (apsw.ReadOnlyError, apsw.CantOpenError)) and os.path.exists(path):
            if not os.access(path, os.W_OK, effective_ids=True):
                return DatabaseError(f"{path} is read-only ({exc}); check the file's permissions")
            if _read_only_directory(path):
                return DatabaseError(
                    f"{path}: its directory {os.path.dirname(path)} is read-only ({exc}): "
                    "SQLite makes its -wal and -shm files there"
                )
        if isinstance(exc, apsw.ReadOnlyError):
            return DatabaseError(f"{path} is read-only ({exc}); check the file's permissions")
        if isinstance(exc, apsw.CantOpenError):
            return DatabaseError(f"cannot open {path} ({exc}); check the path and permissions")
        if isinstance(exc, apsw.IOError):
            return DatabaseError(f"{path}: I/O error ({exc})")
        return DatabaseError(f"{path}: {exc}")

    def close(self) -> None:
        """Close every connection this bus opened; a thread waiting in it wakes at once with
        :class:`DatabaseError`, as does every later call. Safe to call twice."""
        self._closed = True
        self._wakeup.close()  # removes this process's doorbell and wakes its waiters
        self._checkpointer.close()
        # Other threads may be using their connections: close them while none is inside SQLite
        # (their next call sees the bus closed).
        with connections.exclusive():
            with self._lock:
                opened, self._connections = self._connections, set()
            for conn in opened:
                try:
                    conn.close()
                except apsw.Error:
                    pass
        self._local = threading.local()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sqlbus.Bus {self.path!r} durability={self.durability!r}>"

    # -- time, transactions, wake-ups ----------------------------------------------------------

    def _now_ms(self) -> int:
        now = self.clock()
        try:
            ms = int(now * 1000)
        except (TypeError, ValueError, OverflowError):  # not a number, NaN, infinity
            ms = -1
        if not 0 <= ms <= MAX_CLOCK_MS:
            # Ids hold the time as 13 digits: a time outside them would write ids that do not
            # match the id pattern, which every later read would take for damage.
            raise ValueError(
                f"clock() returned {now!r}: expected epoch seconds from 0 "
                "(1970-01-01T00:00:00Z) to 9999999999.999 (2286-11-20T17:46:39.999Z)"
            )
        return ms

    def _write(self) -> _Write:
        return _Write(self)

    def _reading(self, conn: apsw.Connection | None = None) -> _Read:
        return _Read(self, conn)

    def _committed(self) -> None:
        """After a commit: ring the waiters the transaction concerns (every process's; see
        sqlbus.wakeup). Called outside a write, it wakes every waiter."""
        self._wakeup.ring(take_marks())
        if time.monotonic() >= self._upkeep_due:
            self._upkeep()

    def _upkeep(self) -> None:
        """Background upkeep after a write, at most every ``WAL_CHECK_EVERY`` seconds: about
        once a minute, prune past retention (sqlbus.metrics.background_upkeep). Never fails
        the caller's operation."""
        self._upkeep_due = time.monotonic() + ops.WAL_CHECK_EVERY
        ops.background_upkeep(self)

    def _wait_for_change(self, baseline: int, timeout: float, agent: str | None = None) -> int:
        """Block up to ``timeout`` seconds until a commit may have made work for ``agent``
        (None: any commit). ``baseline`` is ``data_version`` read before the caller last
        looked, so a commit between that look and this wait is never missed. Rings of any
        process wake the wait at once (sqlbus.wakeup); data_version is re-checked at least
        every wakeup.FALLBACK seconds in case a ring was lost. Returns what woke it
        (``wakeup.RUNG``: a commit for ``agent``; ``wakeup.CHANGED``; 0: the time ran out)."""
        conn = self._conn()

        def changed() -> bool:
            with self._reading(conn):
                return storage.data_version(conn) != baseline

        return self._wakeup.wait(changed, timeout, ANY if agent is None else agent_tag(agent))

    def _wal_hook(self, frames: int) -> None:
        self._checkpointer.wal_hook(frames)  # through the bus: a forked child has a new one

    def _data_version(self) -> int:
        conn = self._conn()
        with self._reading(conn):
            return storage.data_version(conn)

    # -- agents ----------------------------------------------------------------------------

    def agent(self, agent_id: str) -> Agent:
        """Register (or re-register) ``agent_id`` and return its handle; records last_seen."""
        check_agent_id(agent_id)
        now = self._now_ms()
        with self._write() as conn:
            storage.register_agent(conn, agent_id, now)
        return Agent(self, agent_id)

    def agents(self) -> list[AgentInfo]:
        """The registry: every agent with its registration time, last_seen, status, alive
        and subscriptions."""
        now = self._now_ms()
        with self._reading() as conn:
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
        _check_limit(limit)
        with self._reading() as conn:
            rows = storage.list_sent(conn, agent, limit, self._max_body())
        return [  # a row that cannot be decoded shows as an error message (SPEC 4.2)
            SentRecord(message=listed_message(recipients, *columns, body),
                       recipients=recipients, sent_at=iso_ms(columns[-1]), payload_bytes=length)
            for recipients, *columns, length, body in rows
        ]

    def dead_letters(self, agent: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, newest first; ``agent`` keeps those of one recipient."""
        if agent is not None:
            check_agent_id(agent, "agent")
        _check_limit(limit)
        with self._reading() as conn:
            rows = storage.list_dead_letters(conn, agent, limit, self._max_body())
        return [_dead_letter_from_row(row) for row in rows]

    def dead_letter(self, ref: int | str) -> DeadLetter | None:
        """A dead letter by ``ref``: its number (int), or a message id (str), which names
        every dead letter of that message (one per recipient): the newest is returned. None
        when ``ref`` names none."""
        names = _dead_letter_ref(ref)
        if names is None:
            return None
        with self._reading() as conn:
            row = storage.get_dead_letter(conn, *names, max_body=self._max_body())
        return None if row is None else _dead_letter_from_row(row)

    def requeue(self, ref: int | str) -> str:
        """Put dead letters back in their inboxes (attempts reset, fresh TTL) and return the
        message id. ``ref`` is a dead-letter number (int), or a message id (str): then every
        dead letter of that message goes back, in one transaction. Raises
        :class:`sqlbus.NotFoundError` when ``ref`` names none."""
        names = _dead_letter_ref(ref)
        now = self._now_ms()
        with self._write() as conn:
            targets = [] if names is None else storage.requeue_targets(conn, *names)
            if not targets:
                raise NotFoundError(f"no dead letter {_ref_text(ref)}")
            for dead_letter_id, _message_id, ttl in targets:
                storage.requeue(conn, dead_letter_id, now, _stored_ttl(ttl))
        return targets[0][1]

    def _max_body(self) -> int:
        """The longest stored body this bus reads (see messages.fits)."""
        return self.max_payload_bytes + ENVELOPE_ALLOWANCE

    def purge_dead_letters(self, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (None = all); returns how many."""
        cutoff = None
        if older_than is not None:
            cutoff = self._now_ms() - int(_seconds(older_than, "older_than") * 1000)
        with self._write() as conn:
            return storage.purge_dead_letters(conn, cutoff)

    def requeue_dead_letters(self, agent: str | None = None, reason: str | None = None) -> list[str]:
        """Requeue every dead letter of ``agent`` with ``reason`` (None: any), in one
        transaction, like :meth:`requeue`; returns the message ids, oldest first."""
        if agent is not None:
            check_agent_id(agent, "agent")
        now = self._now_ms()
        ids = []
        with self._write() as conn:
            for dead_letter_id, message_id, ttl in storage.dead_letter_ids(conn, agent, reason):
                storage.requeue(conn, dead_letter_id, now, _stored_ttl(ttl))
                ids.append(message_id)
        return ids

    # -- operations: metrics, stats, retention, checks, backup (see sqlbus.metrics) --------------

    def metrics(self) -> ops.Metrics:
        """Bus-wide :class:`sqlbus.Metrics` read from the file (the same in every process).

        >>> m = bus.metrics(); m.messages_sent, m.queue_depths["bob"].ready   # doctest: +SKIP
        """
        with self._reading() as conn:
            return ops.compute_metrics(conn, self._now_ms(), self.path)

    def stats(self) -> list[ops.AgentStats]:
        """Per-agent inbox depths (ready, leased, retrying, scheduled, expired, dead, oldest
        ready age in ms) of every registered agent and every recipient, read in one snapshot;
        cheap at any archive size."""
        now = self._now_ms()
        with self._reading() as conn, ops.snapshot(conn):
            return ops.compute_stats(conn, now, storage.agent_ids(conn))

    def peek(self, agent: str, limit: int = 10) -> list[ops.InboxEntry]:
        """Look at ``agent``'s inbox without claiming anything, in one snapshot: ready
        messages in the order receive takes them, then leased, retrying and scheduled ones by
        when they become claimable, expired ones last."""
        check_agent_id(agent, "agent")
        _check_limit(limit)
        return ops.peek(self, agent, limit)

    def tail(
        self,
        agent: str | None = None,
        types: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[SentRecord]:
        """Yield messages as any process publishes them, from now on, for ``timeout``
        seconds (None: until the caller stops iterating). ``agent`` keeps those sent by or to
        it; ``types`` those types.

        >>> for record in bus.tail(types=["error"]): print(record.message.id)   # doctest: +SKIP
        """
        if agent is not None:
            check_agent_id(agent, "agent")
        if types is not None:
            types = [types] if isinstance(types, str) else list(types)
            for name in types:
                if name not in MESSAGE_TYPES:
                    raise ValidationError(f"types: unknown message type {name!r}, expected one of "
                                          f"{', '.join(get_args(MessageType))}", field="types")
        if timeout is not None:
            timeout = _seconds(timeout, "timeout")
        return ops.tail(self, agent, types, timeout=timeout)

    def retention(self) -> ops.Retention:
        """The retention policy stored in the database (the same for every process).

        >>> bus.retention()   # doctest: +SKIP
        Retention(archive_retention=604800.0, dead_retention=2592000.0, archive_max_messages=1000000)
        """
        with self._reading() as conn:
            return _retention(storage.get_retention(conn))

    def set_retention(
        self,
        *,
        archive_retention: float | None | _Stored = STORED,
        dead_retention: float | None | _Stored = STORED,
        archive_max_messages: int | None | _Stored = STORED,
    ) -> ops.Retention:
        """Store a new retention policy for every process: seconds after their ack that acked
        messages are kept, seconds after they failed that dead letters are kept, acked messages
        kept at most (None: for ever, no bound). Omitted keywords stay as they are. Returns
        the policy now stored.

        >>> bus.set_retention(archive_retention=86_400.0, dead_retention=None)   # doctest: +SKIP
        """
        return self._store_retention(
            _retention_changes(archive_retention, dead_retention, archive_max_messages)
        )

    def _store_retention(self, changes: dict[int, int | None]) -> ops.Retention:
        """Write checked ``changes`` (see _retention_changes) into the stored policy; a policy
        that already holds them is not written again (a connect with keywords takes no lock)."""
        with self._reading() as conn:
            stored = storage.get_retention(conn)
        if all(stored[place] == value for place, value in changes.items()):
            return _retention(stored)
        with self._write() as conn:
            mark_quiet()  # a policy makes no work for anyone
            policy = list(storage.get_retention(conn))
            for place, value in changes.items():
                policy[place] = value
            storage.set_retention(conn, policy[0], policy[1], policy[2])
        return _retention((policy[0], policy[1], policy[2]))

    def prune(
        self,
        sent_older_than: float | None | _Stored = STORED,
        dead_older_than: float | None | _Stored = STORED,
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
            sent_older_than = _seconds(sent_older_than, "sent_older_than")
        if dead_older_than is not STORED and dead_older_than is not None:
            dead_older_than = _seconds(dead_older_than, "dead_older_than")
        policy = self.retention()
        if sent_older_than is STORED:
            sent_older_than = policy.archive_retention
        if dead_older_than is STORED:
            dead_older_than = policy.dead_retention
        return ops.prune(
            self, sent_older_than, dead_older_than, policy.archive_max_messages, progress=progress
        )

    def check(self) -> ops.CheckReport:
        """Integrity check, schema version, file and WAL sizes, whether a reader pins the WAL,
        and leases that ran out; ``report.ok`` is False when ``report.problems`` is not empty."""
        return ops.check(self)

    def backup(
        self, dest: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None
    ) -> ops.BackupResult:
        """Copy the database, online, to the new file ``dest``: a consistent snapshot of the
        moment the backup starts, while other processes keep writing.
        ``progress(pages_done, pages_total)``."""
        return ops.backup(self, dest, progress=progress)

    def vacuum(self) -> ops.VacuumResult:
        """Give the space of deleted rows back to the file system (after a large prune) and
        truncate the WAL. Holds the write lock while it runs."""
        return ops.vacuum(self)

    # -- writing messages (shared by agents, transactions and deliveries) ------------------------

    def _prepare(
        self,
        sender: str,
        to: Any,
        type: str,
        payload: Any,
        *,
        priority: int = 3,
        ttl: int = 30_000,
        requires_ack: bool = False,
        correlation_id: str | None = None,
        delay: float = 0.0,
        id: str | None = None,
        now: int,
        prefix: str = "",
        broadcast_pattern: str | None = None,
        direct_reply: bool = False,
    ) -> _Publish:
        # the common delay=0 skips the checks of _seconds (still exact: 0 and 0.0 only)
        delay_ms = 0 if delay == 0 and type_of(delay) in (int, float) else (
            _ceil_ms(_seconds(delay, f"{prefix}delay")))
        outgoing = prepare(
            sender, to, type, payload, now_ms=now, priority=priority, ttl=ttl,
            requires_ack=requires_ack, correlation_id=correlation_id, id=id,
            max_payload_bytes=self.max_payload_bytes, prefix=prefix,
            broadcast_pattern=broadcast_pattern, direct_reply=direct_reply,
        )
        return _Publish(outgoing, delay_ms)

    def _prepare_response(
        self, sender: str, request: Message, data: Any, success: bool, error: str | None, now: int,
        error_type: str | None = None,
    ) -> _Publish:
        """The response to ``request`` (SPEC 5.1), validated; a direct reply when the request
        came from ``request()`` (header ``direct_reply``)."""
        payload, correlation_id = response_payload(request, data, success, error, error_type)
        direct = request.headers.direct_reply is True
        outgoing = prepare(
            sender, request.sender, "response", payload, now_ms=now,
            correlation_id=correlation_id, delivered=direct,
            max_payload_bytes=self.max_payload_bytes,
        )
        return _DirectReply(outgoing, 0) if direct else _Publish(outgoing, 0)

    def _prepare_broadcast(
        self, sender: str, type: str, payload: Any, pattern: str, headers: dict[str, Any], now: int
    ) -> _Broadcast:
        if type_of(pattern) is not str or not 1 <= len(pattern) <= 200 or not pattern.isprintable():
            # isprintable() refuses NUL and lone surrogates, which SQLite cannot compare
            got = pattern[:50] if type_of(pattern) is str else pattern
            raise ValidationError(f"pattern: expected 1..200 printable characters, got {got!r}",
                                  field="pattern")
        unknown = set(headers) - (_PUBLISH_KEYS - {"to", "type", "payload"})
        if unknown:
            raise TypeError(f"broadcast() got unknown header(s): {', '.join(sorted(unknown))}")
        delay = headers.pop("delay", 0.0)
        message_id = headers.pop("id", None)
        checked = self._prepare(
            sender, [], type, payload, now=now, id=message_id, delay=delay,
            broadcast_pattern=pattern, **headers,
        )
        kwargs = dict(headers, id=checked.outgoing.id, payload=payload)
        return _Broadcast(self, sender, type, pattern, kwargs, checked.delay_ms, now)

    def _prepare_interested(
        self, sender: str, type: str, payload: Any, headers: dict[str, Any], now: int,
        event: str | None = None,
    ) -> _Interested:
        """Event ``event`` (a message of ``type``) to the agents interested in it, validated
        now; its recipients are matched when it is written."""
        prepare(sender, [], type, payload, now_ms=now, matched=True,
                max_payload_bytes=self.max_payload_bytes, **headers)
        return _Interested(self, sender, type, event, headers, payload, now)

    def _publish_in(
        self,
        conn: apsw.Connection,
        now: int,
        sender: str,
        to: list[str] | None,
        type: str,
        payload: dict[str, Any],
    ) -> str | None:
        """Publish a message the library builds itself, inside the caller's transaction: to
        ``to``, or to the agents interested in ``type`` when ``to`` is None (None: nobody is,
        nothing written)."""
        if to is None:  # validated as it is written (nothing to check when nobody is interested)
            return _Interested(self, sender, type, None, {}, payload, now).write(conn, now)
        return self._prepare(sender, to, type, payload, now=now).write(conn, now)


type_of = type  # the name `type` is a parameter in many methods below


def _ceil_ms(seconds: float) -> int:
    """``seconds`` in whole ms, rounded up (a delay is never early). Rounded to the microsecond
    first: 0.003 s is 3.0000000000000004 ms as a float, and means 3 ms."""
    return math.ceil(round(seconds * 1000, 3))


def _check_limit(limit: object) -> int:
    # The upper bound is SQLite's 64-bit LIMIT (a larger int raised OverflowError).
    if type(limit) is not int or limit < 1 or limit >= 2**63:
        raise ValueError(f"limit must be an int >= 1 (and < 2**63), got {limit!r}")
    return limit


def _dead_letter_ref(ref: object) -> tuple[int | None, str | None] | None:
    """(number, message id) that a dead-letter ``ref`` names, or None when it can name none
    (an int beyond SQLite's 64 bits, a str that is not a message id)."""
    if type(ref) is int:  # not bool
        return (ref, None) if -(2**63) <= ref < 2**63 else None
    if type(ref) is str:
        return (None, ref) if MESSAGE_ID_RE.fullmatch(ref) else None
    raise TypeError(
        f"ref must be a dead-letter number (int) or a message id (str), got {type_of(ref).__name__}"
    )


def _ref_text(ref: int | str) -> str:
    """``ref`` for an error message (an int of thousands of digits cannot even be printed)."""
    if type(ref) is int:
        return f"numbered {ref}" if abs(ref) < 10**30 else f"numbered with a {ref.bit_length()}-bit int"
    return f"of message {ref[:100]!r}"


def _stored_ttl(ttl: object) -> int:
    """The ttl read from a stored body for a requeue; the default when the body is damaged."""
    return ttl if type(ttl) is int and ttl >= 0 else Headers().ttl


def _dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter:
    (dead_id, agent, reason, error_name, error_message, tb, context, failed_at, attempts, body,
     message_id, sender, type_, priority, sent_at, length) = row
    # above the reader's limit (body None) its columns stand in, the payload is not loaded
    message = listed_message(agent, message_id, sender, type_, priority, sent_at, body)
    try:
        context_value = msgspec.json.decode(context) if context else {}
    except msgspec.DecodeError:  # a listing never fails because of one row
        context_value = {"corrupt": context[:1000]}
    return DeadLetter(
        id=dead_id,
        agent=agent,
        message=message,
        reason=reason,
        error_name=error_name,
        error_message=error_message,
        traceback=tb,
        context=context_value,
        failed_at=iso_ms(failed_at),
        attempts=attempts,
        payload_bytes=length,
    )


# ---------------------------------------------------------------------------------------------
# Pending writes: validated before any transaction, written inside one.


class _Claimed(NamedTuple):
    """What a claim found; when nothing, what a wait needs: the data_version of the look and
    the agent's next due time in ms (None: nothing pending, or not asked for)."""

    deliveries: list[Delivery]
    baseline: int | None
    due: int | None


class _Publish:
    """A validated message waiting to be written (now, or with a delivery's ack)."""

    __slots__ = ("outgoing", "delay_ms")

    def __init__(self, outgoing: Outgoing, delay_ms: int) -> None:
        self.outgoing = outgoing
        self.delay_ms = delay_ms

    def write(self, conn: apsw.Connection, now: int) -> str:
        storage.publish(conn, [self.outgoing], [now + self.delay_ms], now)
        mark(self.outgoing.recipients)  # the commit rings these agents' waiters
        return self.outgoing.id


# Counter (per requester) of responses that came after their request timed out (sqlbus.worker).
LATE_RESPONSES = "late_responses"


def count_late_responses(conn: apsw.Connection, agent: str, count: int, delivery_ms: int) -> None:
    """Count ``count`` late responses to ``agent`` as discarded. Their rows stay in the archive
    as acked, and received/delivery time totals add acked rows to counters: the counters take
    them off again (pruning the rows later adds them back), so they count as late only."""
    storage.add_counters(conn, [
        (LATE_RESPONSES, agent, count), ("received", agent, -count),
        ("delivery_ms", agent, -delivery_ms),
    ])


class _DirectReply(_Publish):
    """A response to a ``request()`` call, written as delivered: its requester reads it from
    the archive, so it never waits in an inbox and taking it costs no write. When that request
    already timed out, it is counted as a late response (and still archived, never handled)."""

    __slots__ = ()

    def write(self, conn: apsw.Connection, now: int) -> str:
        out = self.outgoing
        requester, correlation_id = out.recipients[0], out.correlation_id
        assert correlation_id is not None
        if storage.request_timed_out(conn, requester, correlation_id):
            storage.forget_request_timeout(conn, requester, correlation_id)
            count_late_responses(conn, requester, 1, 0)  # written acked now: 0 ms
        return super().write(conn, now)


class _Broadcast:
    """A validated broadcast; its recipients are matched in the transaction that writes it."""

    __slots__ = ("bus", "sender", "type", "pattern", "kwargs", "delay_ms", "prepared_at")

    def __init__(
        self, bus: Bus, sender: str, type: str, pattern: str, kwargs: dict[str, Any],
        delay_ms: int, prepared_at: int,
    ) -> None:
        self.bus = bus
        self.sender = sender
        self.type = type
        self.pattern = pattern
        self.kwargs = kwargs
        self.delay_ms = delay_ms
        self.prepared_at = prepared_at

    def write(self, conn: apsw.Connection, now: int) -> str:
        recipients = [
            agent
            for agent in storage.agent_ids(conn)
            if agent != self.sender and fnmatch.fnmatchcase(agent, self.pattern)
        ]
        kwargs = self.kwargs
        out = prepare(
            self.sender, recipients, self.type, kwargs["payload"], now_ms=self.prepared_at,
            priority=kwargs.get("priority", 3), ttl=kwargs.get("ttl", 30_000),
            requires_ack=kwargs.get("requires_ack", False),
            correlation_id=kwargs.get("correlation_id"), id=kwargs["id"],
            broadcast_pattern=self.pattern, max_payload_bytes=self.bus.max_payload_bytes,
        )
        storage.publish(conn, [out], [now + self.delay_ms], now)
        if recipients:  # matched nobody: leave the ring untargeted (a state write may ride on it)
            mark(recipients)
        return out.id


class _Interested:
    """A state change or event sent without explicit recipients (SPEC 5-7): to every agent but
    the sender with a matching interest, matched in the transaction that writes it. A state
    change that interests nobody is not written (the state log has the change); such an event
    is archived like a broadcast that matched nobody, so the id ``emit`` returned is a message.

    Event patterns are matched here, with ``fnmatch.fnmatchcase`` over the (few) event
    interests, not with SQLite's GLOB (which negates with ``[^...]``, not ``[!...]``): the
    same function as the receivers' run loops, so an event goes to an agent exactly when one
    of its patterns would dispatch it."""

    __slots__ = ("bus", "sender", "type", "event", "headers", "payload", "prepared_at")

    def __init__(
        self, bus: Bus, sender: str, type: str, event: str | None, headers: dict[str, Any],
        payload: Any, prepared_at: int,
    ) -> None:
        self.bus = bus
        self.sender = sender
        self.type = type
        self.event = event
        self.headers = headers
        self.payload = payload
        self.prepared_at = prepared_at

    def write(self, conn: apsw.Connection, now: int) -> str | None:
        if self.event is None:
            recipients = storage.interested_in_type(conn, self.type, self.sender)
            if not recipients:
                return None
        else:
            matched: set[str] = set()
            last, matches = "", False
            for agent, pattern in storage.event_interests(conn, self.sender):  # by pattern
                if pattern != last:
                    last, matches = pattern, pattern is None or fnmatch.fnmatchcase(
                        self.event, pattern)
                if matches:
                    matched.add(agent)
            recipients = sorted(matched)
        out = prepare(self.sender, recipients, self.type, self.payload, now_ms=self.prepared_at,
                      matched=True, max_payload_bytes=self.bus.max_payload_bytes, **self.headers)
        storage.publish(conn, [out], [now], now)
        if recipients:  # matched nobody: leave the ring untargeted (a state write may ride on it)
            mark(recipients)
        return out.id


def _write_all(
    conn: apsw.Connection, sender: str, ops: list[PlainRun] | list[_Publish], now: int
) -> list[str]:
    """Write a validated batch (:meth:`Agent._prepare_many`); returns the message ids."""
    if type_of(ops[0]) is PlainRun:  # plain messages, ready now
        runs = cast("list[PlainRun]", ops)
        storage.publish_plain(conn, sender, runs, now)
        mark({run.to for run in runs})
        return [id for run in runs for id in run.ids]
    publishes = cast("list[_Publish]", ops)
    if all(type_of(op) is _Publish for op in publishes):  # one statement batch
        storage.publish(conn, [op.outgoing for op in publishes],
                        [now + op.delay_ms for op in publishes], now)
        mark({agent for op in publishes for agent in op.outgoing.recipients})
        return [op.outgoing.id for op in publishes]
    return [op.write(conn, now) for op in publishes]


# ---------------------------------------------------------------------------------------------
# Agents


class Agent:
    """One agent on the bus: publishes, receives and owns its inbox. Get one from
    :meth:`Bus.agent`. Thread-safe like the bus."""

    def __init__(self, bus: Bus, agent_id: str) -> None:
        self.bus = bus
        self.id = agent_id
        self.state = StateStore(bus, agent_id)
        self._touched_at = 0
        self._more = False  # the last claim left ready messages behind (a hint, not a promise)

    def __repr__(self) -> str:
        return f"<sqlbus.Agent {self.id!r}>"

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        to: str | list[str],
        type: str,
        payload: Any = None,
        *,
        priority: int = 3,
        ttl: int = 30_000,
        requires_ack: bool = False,
        correlation_id: str | None = None,
        delay: float = 0.0,
        id: str | None = None,
    ) -> str:
        """Publish one message to one agent or a list (one message, N inboxes, all or none).

        ``ttl`` is in milliseconds (0 = never expires), ``delay`` in seconds. Returns the id;
        publishing an ``id`` that exists already writes nothing and returns it (idempotent).
        """
        bus = self.bus
        now = bus._now_ms()
        op = bus._prepare(
            self.id, to, type, payload, priority=priority, ttl=ttl, requires_ack=requires_ack,
            correlation_id=correlation_id, delay=delay, id=id, now=now,
        )
        with bus._write() as conn:
            op.write(conn, now)
        return op.outgoing.id

    def publish_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Publish many messages in one transaction: another process sees all or none.

        Each item is a dict with the keyword names of :meth:`publish`; every item is validated
        first, and an error names the item (``[3].priority: ...``).
        """
        bus = self.bus
        now = bus._now_ms()
        ops = self._prepare_many(items, now)
        if not ops:
            return []
        with bus._write() as conn:
            return _write_all(conn, self.id, ops, now)

    def _prepare_many(
        self, items: Sequence[dict[str, Any]], now: int
    ) -> list[PlainRun] | list[_Publish]:
        """The batch validated: runs of plain messages (the fast path) or one _Publish per
        item."""
        if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
            raise TypeError("publish_many takes a list of dicts")
        plain = prepare_plain_batch(self.id, items, now, self.bus.max_payload_bytes)
        if plain is not None:
            return plain
        ops = []
        for index, item in enumerate(items):
            if type_of(item) is not dict:
                raise ValidationError(f"[{index}]: expected a dict, got {type_of(item).__name__}",
                                      field=f"[{index}]")
            if not _PUBLISH_KEYS.issuperset(item):
                unknown = sorted(map(str, set(item) - _PUBLISH_KEYS))
                raise ValidationError(f"[{index}]: unknown key(s) {', '.join(unknown)}",
                                      field=f"[{index}]")
            if "to" not in item or "type" not in item:
                missing = "to" if "to" not in item else "type"
                raise ValidationError(f"[{index}].{missing}: required", field=f"[{index}].{missing}")
            get = item.get
            ops.append(self.bus._prepare(
                self.id, item["to"], item["type"], get("payload"), priority=get("priority", 3),
                ttl=get("ttl", 30_000), requires_ack=get("requires_ack", False),
                correlation_id=get("correlation_id"), delay=get("delay", 0.0), id=get("id"),
                now=now, prefix=f"[{index}].",
            ))
        return ops

    def broadcast(self, type: str, payload: Any = None, *, pattern: str = "*", **headers: Any) -> str:
        """Send one message to every registered agent matching ``pattern`` (``*``, ``?``,
        ``[...]``) except the sender; returns its id (a pattern that matches nobody delivers
        nothing). ``headers``: ``priority``, ``ttl``, ``requires_ack``, ``correlation_id``,
        ``delay``, ``id``."""
        bus = self.bus
        now = bus._now_ms()
        op = bus._prepare_broadcast(self.id, type, payload, pattern, dict(headers), now)
        with bus._write() as conn:
            return op.write(conn, now)

    def transaction(self) -> Transaction:
        """``with alice.transaction() as tx:`` publish, write state and run your own SQL
        (``tx.execute``) in one transaction: all of it commits, or none of it."""
        return Transaction(self)

    # -- receiving -------------------------------------------------------------------------

    def receive(
        self,
        limit: int = 1,
        wait: float = 0.0,
        lease: float | None = None,
        types: Iterable[str] | None = None,
    ) -> list[Delivery]:
        """Claim up to ``limit`` messages, highest priority first, then in publish order.

        Each is leased to this caller for ``lease`` seconds (default: the bus's). ``wait``
        (seconds) blocks until a message arrives or the time runs out. ``types`` keeps only
        those message types. Expired messages move to dead letters and are never returned.
        """
        _check_limit(limit)
        wait = _seconds(min(wait, MAX_SECONDS) if wait == float("inf") else wait, "wait")
        lease_ms = int(_seconds(self.bus.lease if lease is None else lease, "lease", allow_zero=False) * 1000)
        types_json = None
        if types is not None:
            if not isinstance(types, (str, Iterable)):
                raise TypeError(
                    f"types must be a message type or a list of them, got {type_of(types).__name__}"
                )
            types = [types] if isinstance(types, str) else list(types)
            for name in types:
                if name not in MESSAGE_TYPES:
                    raise ValidationError(f"types: unknown message type {name!r}, expected one of "
                                          f"{', '.join(get_args(MessageType))}", field="types")
            types_json = encode_json(types).decode()
        if wait <= 0:
            return self._claim(limit, lease_ms, types_json).deliveries
        bus = self.bus
        deadline = time.monotonic() + wait
        # A receiver that may wait reads before it claims, unless its last claim left more
        # behind: an empty claim would take the write lock that the writers it waits for need.
        look = not self._more
        while True:
            if look:
                baseline, work, due = self._look(types_json)
            if not look or work:
                claimed = self._claim(limit, lease_ms, types_json)
                if claimed.deliveries:
                    return claimed.deliveries
                baseline, due = claimed.baseline, claimed.due
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            woken = bus._wait_for_change(baseline, min(remaining, self._seconds_until(due)), self.id)
            look = woken != RUNG  # a ring that named this agent: claim straight away

    def _skip_json(self) -> str | None:
        """The responses a request of this process awaits for this agent (JSON list), which its
        claims leave alone, or None."""
        skip = self.bus._awaiting.get(self.id)
        return encode_json(list(skip)).decode() if skip else None

    def _look(self, types_json: str | None = None) -> tuple[int, bool, int | None]:
        """One read before claiming: (data_version, work waiting, next due time in ms)."""
        bus = self.bus
        with bus._reading() as conn:
            return storage.look(conn, self.id, bus._now_ms(), types_json, self._skip_json())

    def _seconds_until(self, due: int | None) -> float:
        """Seconds until ``due`` (ms; None: nothing pending), at least 1 ms."""
        if due is None:
            return 3600.0
        return max(0.001, (due - self.bus._now_ms()) / 1000)

    def _until_due(self) -> float:
        """Seconds until one of this agent's retries, delayed messages or leases comes due."""
        with self.bus._reading() as conn:
            return self._seconds_until(storage.next_due(conn, self.id))

    def _claim(
        self,
        limit: int,
        lease_ms: int,
        types_json: str | None = None,
        *,
        acking: Sequence[Delivery] = (),
    ) -> _Claimed:
        """Lease up to ``limit`` messages in one write transaction, after acking ``acking``
        (a run loop's last delivery: one transaction instead of two). When nothing is found,
        the result carries what a wait needs, read in the same transaction (data_version and
        the next due time), so that no commit after this look is missed."""
        with _settling(acking):
            return self._claim_settling(limit, lease_ms, types_json, acking)

    def _claim_settling(
        self, limit: int, lease_ms: int, types_json: str | None, acking: Sequence[Delivery]
    ) -> _Claimed:
        bus = self.bus
        now = bus._now_ms()
        lease_until = now + lease_ms
        notices = [d._ack_notice(now) for d in acking if d.message.headers.requires_ack]
        claimed: list[tuple[Any, ...]] = []
        with bus._write() as conn:
            if acking:
                self._ack_in(conn, acking, notices, now)
            else:
                mark_quiet()  # a claim makes no work for anyone: its commit rings nobody
            while True:
                rows, more = storage.claim(
                    conn, self.id, now, lease_until, limit - len(claimed), types_json,
                    self._skip_json(), bus._max_body(),
                )
                for row in rows:
                    seq, claims, attempts, _priority, expires_at, _sent_at, body = row
                    if expires_at is not None and now > expires_at:
                        storage.dead_letter(conn, seq, None, now, "expired", attempts=attempts - 1,
                                            failed_at=expires_at)
                    elif attempts > bus.max_attempts:
                        self._dead_letter_worn_out(conn, seq, attempts, now)
                    else:
                        message = self._readable(conn, seq, body, now, attempts)
                        if message is not None:
                            claimed.append((message, seq, claims, attempts))
                if len(claimed) >= limit or not more:
                    break
            baseline = due = None
            if not claimed:
                baseline, due = storage.wait_point(conn, self.id)
            if now - self._touched_at >= _TOUCH_EVERY_MS:
                storage.touch_agent(conn, self.id, now)
                self._touched_at = now
        for d in acking:
            d._settled = "acked"
        self._more = more
        deliveries = []
        for message, seq, claims, attempts in claimed:
            message.headers.retry_count = attempts - 1
            deliveries.append(Delivery(self, message, seq, claims, attempts, lease_until / 1000))
        return _Claimed(deliveries, baseline, due)

    def _readable(
        self, conn: apsw.Connection, seq: int, body: bytes | None, now: int, attempts: int
    ) -> Message | None:
        """The message of a row just claimed, or None when it cannot be delivered: a body
        above this bus's limit (``body`` None: it was not read) or one that cannot be decoded
        (SQLite keeps no page checksums, so damage inside a body goes unseen until here) is
        dead-lettered in the claim's transaction, so it never strands the batch, fails the
        inbox or stops a loop."""
        if body is not None:
            message = decode_stored(body)
            if type_of(message) is Message:
                return message  # type: ignore[return-value]
            reason, error_name, error_message = "corrupt", "DecodeError", (
                f"the stored message cannot be decoded ({message})")
        else:
            length = storage.body_length(conn, seq)
            reason, error_name, error_message = "too_large", "PayloadTooLargeError", (
                f"the stored message is {length} bytes, more than this receiver reads "
                f"(max_payload_bytes={self.bus.max_payload_bytes} plus {ENVELOPE_ALLOWANCE} for "
                "the envelope); it was not loaded")
        storage.dead_letter(conn, seq, None, now, reason, error_name, error_message,
                            attempts=attempts - 1)  # no handler saw it: not an attempt
        return None

    def _dead_letter_worn_out(
        self, conn: apsw.Connection, seq: int, attempts: int, now: int
    ) -> None:
        """Dead-letter a row claimed once more than ``max_attempts`` allow, with the error of
        its last attempt as it happened: the one recorded when the attempt ended (e.g. a loop
        interrupted in its handler), else its lease ran out."""
        last_error = storage.last_error(conn, seq)
        error_name, _, error_message = (last_error or "").partition(": ")
        if not last_error:
            error_name = "LeaseExpired"
            error_message = f"the lease ran out {attempts - 1} times without an ack"
        storage.dead_letter(conn, seq, None, now, "max_attempts", error_name=error_name,
                            error_message=error_message, attempts=attempts - 1)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack many deliveries (with their buffered effects) in one transaction, all or none.

        Raises :class:`LeaseLostError` (and commits nothing) if any lease was lost, and
        ``ValueError`` if a delivery is not this agent's or is settled already.
        """
        pending = self._unsettled(deliveries)
        if not pending:
            return
        bus = self.bus
        with _settling(pending):
            now = bus._now_ms()
            notices = [d._ack_notice(now) for d in pending if d.message.headers.requires_ack]
            with bus._write() as conn:
                self._ack_in(conn, pending, notices, now)
            for d in pending:
                d._settled = "acked"

    def _unsettled(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Check that ``deliveries`` are this agent's and not settled yet; each once."""
        deliveries = list(deliveries)
        for d in deliveries:
            if not isinstance(d, Delivery) or d.agent is not self and d.agent.id != self.id:
                raise ValueError(f"{d!r} was not received by agent {self.id!r}")
            d._check_open()
        # dict.fromkeys: a delivery listed twice is acked once (a second UPDATE would find the
        # row acked and wrongly report the lease lost).
        return list(dict.fromkeys(deliveries))

    def _ack_in(
        self, conn: apsw.Connection, pending: Sequence[Delivery], notices: Sequence[_Publish],
        now: int,
    ) -> None:
        """Inside a write: ack ``pending`` with their buffered effects and ack notices, or raise
        :class:`LeaseLostError` (the caller's transaction then rolls back: all or nothing)."""
        if not any(type_of(e) is StateWrite for d in pending for e in d._effects):
            mark_quiet()  # rings only the agents its buffered publishes reach
        if not storage.ack(conn, [(d._seq, d._claims) for d in pending], now):
            lost = next(  # always found; the default only keeps StopIteration from the caller
                (d for d in pending if not storage.acked_now(conn, d._seq, d._claims, now)),
                pending[0],
            )
            raise LeaseLostError(
                f"message {lost.message.id} to {self.id!r}: the lease of attempt "
                f"{lost.attempts} was lost (it ran out and the message was claimed again, "
                "or is gone); nothing was acked"
            )
        for d in pending:
            for effect in d._effects:
                effect.write(conn, now)
        for notice in notices:
            notice.write(conn, now)

    # -- handlers, the run loop, request/response, events (the logic is in sqlbus.worker) ----

    def subscribe(self, type: str, handler: Callable[[Message], Any] | None = None) -> None:
        """Record this agent's interest in messages of ``type`` (``"*"``: every type) in the
        database and, with ``handler``, call ``handler(message)`` for them in :meth:`run`.
        Recording is idempotent; subscribing the same handler twice has no further effect.

        Interests pick the recipients of state changes and events sent without explicit
        ones (``subscribe("state_change")`` alone suits a :meth:`receive` consumer); they
        outlive the process until dropped. A handler reaches its :class:`Delivery` with
        :func:`sqlbus.current_delivery` to buffer publishes, replies and state writes that
        commit with the ack.
        """
        from .worker import dispatcher

        dispatcher(self).subscribe(type, handler)

    def unsubscribe(self, type: str, handler: Callable[[Message], Any] | None = None) -> None:
        """Stop calling ``handler`` for ``type``, and drop the interest once this agent object
        has no handler left for it (a handler not subscribed changes nothing); without
        ``handler``, drop the interest and every handler of ``type``."""
        from .worker import dispatcher

        dispatcher(self).unsubscribe(type, handler)

    def subscriptions(self) -> list[Subscription]:
        """This agent's recorded interests, by kind and pattern."""
        with self.bus._reading() as conn:
            rows = storage.list_interests(conn, self.id)
        return [Subscription(kind, pattern, iso_ms(at)) for _, kind, pattern, at in rows]

    def run(
        self, until_idle: bool = False, *, limit: int = 1, lease: float | None = None,
        concurrency: int = 1,
    ) -> int:
        """Claim messages and dispatch them to the handlers until :meth:`stop`, SIGINT or
        SIGTERM; returns how many messages it processed.

        ``until_idle=True`` drains what is ready now (not retries due later) and returns.
        Messages are acked when every handler succeeds and failed (retry or dead letter) when
        one raises; a message without handler is acked and counted as ``unhandled``. A signal
        (handled only when run() is in the main thread) lets the message in hand finish; the
        other claimed ones go back at once. ``limit``: messages claimed at a time; ``lease``
        (seconds, default the bus's) is extended in the background while a handler runs.
        ``concurrency`` (int 1..1024): up to that many messages in handlers at once, each on a
        thread of its own with its own lease; order holds only with 1 (then ``limit`` applies).
        On stop the handlers in flight finish; claimed messages no handler saw go back
        without counting an attempt.
        """
        from .worker import dispatcher

        return dispatcher(self).run(until_idle, limit=limit, lease=lease, concurrency=concurrency)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand (safe from any thread)."""
        from .worker import dispatcher

        dispatcher(self).stop()

    def request(
        self, to: str, payload: Any = None, timeout: float = 30.0, *, priority: int = 3,
        ttl: int | None = None,
    ) -> Any:
        """Send a ``request`` to agent ``to`` and wait up to ``timeout`` seconds for the
        ``data`` of its response.

        >>> alice.request("bob", {"q": 1}, timeout=5.0)          # doctest: +SKIP

        Raises :class:`sqlbus.RemoteError` (the remote error text) when the response says
        ``success: false``, :class:`sqlbus.RequestTimeoutError` when none comes in time (a
        response arriving later is discarded and counted as ``late_responses``). ``ttl`` (ms)
        defaults to the timeout. Works while this agent's :meth:`run` runs in another thread.
        """
        from .worker import request

        return request(self, to, payload, timeout, priority=priority, ttl=ttl)

    def respond(
        self, message: Message, data: Any = None, success: bool = True, *, error: str | None = None,
        error_type: str | None = None,
    ) -> str:
        """Answer the request ``message`` with ``data`` (or a failure with ``error`` and
        ``error_type``, default ``"Error"``); returns the response's id. Inside that request's
        handler it commits with the ack."""
        from .worker import respond

        return respond(self, message, data, success, error=error, error_type=error_type)

    @property
    def events(self) -> Events:
        """Events (SPEC 7): ``agent.events.emit(name, data, targets=None)``, ``.on(name,
        handler)``, ``.off(name, handler)``; see :class:`sqlbus.Events`."""
        from .worker import dispatcher

        return dispatcher(self).events


# ---------------------------------------------------------------------------------------------
# Deliveries


class Delivery:
    """A message leased to one receiver: ack it, fail it, extend it or dead-letter it.

    ``with d:`` acks on a clean exit and fails on an exception (which it re-raises);
    :class:`sqlbus.Retry` and :class:`sqlbus.Discard` raised inside are handled, not re-raised.
    ``reply``, ``publish`` and ``state`` writes are buffered and committed with the ack.
    ``attempts`` is 1 on the first delivery; ``lease_until`` is in epoch seconds.
    """

    __slots__ = ("agent", "message", "attempts", "lease_until", "_seq", "_claims", "_effects",
                 "_settled", "_lock", "state", "_outcome")

    def __init__(
        self, agent: Agent, message: Message, seq: int, claims: int, attempts: int,
        lease_until: float,
    ) -> None:
        self.agent = agent
        self.message = message
        self.attempts = attempts
        self.lease_until = lease_until
        self._seq = seq
        self._claims = claims
        self._effects: list[Any] = []
        self._settled: str | None = None
        self._outcome = ""  # after a failure, what happens next, for the run loop's log
        # Held from the check that a delivery is unsettled to the write that settles it, so of
        # two threads settling it one writes and the other is told it is settled already.
        self._lock = threading.Lock()
        self.state = _BufferedState(self)

    def __repr__(self) -> str:
        return (f"<sqlbus.Delivery {self.message.type} {self.message.id} to {self.agent.id!r} "
                f"attempt {self.attempts}>")

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._settled is not None:
            return False
        if exc_type is None:
            self.ack()
            return False
        if isinstance(exc, Retry):
            self.retry(exc.delay)
            return True
        if isinstance(exc, Discard):
            self.dead_letter(exc.reason)
            return True
        if not isinstance(exc, Exception):
            # KeyboardInterrupt, SystemExit: give the message back, untouched, saying why
            self._release(attempted=True, error=exc)
            return False
        self.fail(exc)
        return False

    # -- settling --------------------------------------------------------------------------

    def ack(self) -> None:
        """Remove the message from the inbox and commit the buffered effects, in one
        transaction. Raises :class:`LeaseLostError` if the lease was lost."""
        self.agent.ack([self])

    def fail(
        self,
        exc: BaseException | None = None,
        *,
        retryable: bool | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        """Record a failure: retry after backoff, or dead-letter when this was the last
        attempt or the error is non-retryable. Buffered effects are discarded."""
        self._settle_failure(exc, retryable=retryable, context=context, delay=None, counted=True)

    def retry(self, delay: float | None = None) -> None:
        """Put the message back for another attempt after ``delay`` seconds (None = backoff),
        without counting a failure. The last attempt still ends in dead letters."""
        self._settle_failure(None, retryable=True, context=None, delay=delay, counted=False)

    def dead_letter(self, reason: str = "discarded", *, context: dict[str, Any] | None = None) -> None:
        """Move the message to dead letters now with ``reason``."""
        if type_of(reason) is not str or not reason:
            raise ValueError(f"reason must be a non-empty str, got {reason!r}")
        bus = self.agent.bus
        reason = escape_text(reason)  # recorded text: a lone surrogate is kept escaped
        context_json = _context_json(context, bus.max_payload_bytes)
        with self._lock:
            self._check_open()
            now = bus._now_ms()
            with bus._write() as conn:
                if not storage.dead_letter(conn, self._seq, self._claims, now, reason,
                                           context_json=context_json):
                    raise self._lease_lost()
            self._settled = "dead"

    def extend(self, lease: float | None = None) -> None:
        """Keep the message ``lease`` more seconds from now (default: the bus's lease)."""
        bus = self.agent.bus
        lease_s = _seconds(bus.lease if lease is None else lease, "lease", allow_zero=False)
        with self._lock:
            self._check_open()
            now = bus._now_ms()
            lease_until = now + int(lease_s * 1000)
            with bus._write() as conn:
                mark_quiet()  # a later deadline makes no work for anyone
                if not storage.extend(conn, self._seq, self._claims, lease_until):
                    raise self._lease_lost()
            self.lease_until = lease_until / 1000

    def release(self) -> None:
        """Give the message back now, for anyone to claim (the attempt still counts)."""
        if not self._release(attempted=True):
            self._check_open()  # raises: settled already

    def _release(self, *, attempted: bool, error: BaseException | None = None) -> bool:
        """``attempted=False``: no handler saw it (a run loop that stops with messages in
        hand, a cancelled asyncio receive), so the claim does not count as an attempt.
        ``error``: what ended the attempt (a KeyboardInterrupt in the handler), kept as the
        last attempt's error. False, doing nothing, when it was settled already."""
        bus = self.agent.bus
        last_error = None if error is None else (
            f"{_error_name(error)}: {_error_text(error)}")
        with self._lock:
            if self._settled is not None:
                return False
            with bus._write() as conn:
                storage.release(conn, self._seq, self._claims, bus._now_ms(),
                                attempted=attempted, last_error=last_error)
                mark([self.agent.id])  # ready again: wake the agent's other receivers
            self._settled = "released"
        return True

    # -- buffered effects ------------------------------------------------------------------

    def reply(
        self, data: Any = None, *, success: bool = True, error: str | None = None,
        error_type: str | None = None,
    ) -> str:
        """Buffer a ``response`` to the sender: ``{"success", "data", "request_id"}`` (and
        ``"error"``, ``"error_type"`` (default ``"Error"``) on failure) with the request's
        correlation id. Returns its id."""
        self._check_open()
        bus = self.agent.bus
        op = bus._prepare_response(self.agent.id, self.message, data, success, error,
                                   bus._now_ms(), error_type)
        self._effects.append(op)
        return op.outgoing.id

    def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Buffer a message from this agent, published with the ack (validated now)."""
        self._check_open()
        bus = self.agent.bus
        op = bus._prepare(self.agent.id, to, type, payload, now=bus._now_ms(), **headers)
        self._effects.append(op)
        return op.outgoing.id

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._settled is not None:
            raise ValueError(f"{self!r} was already settled ({self._settled})")

    def _lease_lost(self) -> LeaseLostError:
        return LeaseLostError(
            f"message {self.message.id} to {self.agent.id!r}: the lease of attempt "
            f"{self.attempts} was lost (it ran out and the message was claimed again, or is gone)"
        )

    def _ack_notice(self, now: int) -> _Publish:
        message = self.message
        return self.agent.bus._prepare(
            self.agent.id, message.sender, "notification",
            {"acknowledgment": True, "original_message_id": message.id,
             "processed_at": iso_ms(now)},
            correlation_id=message.id, now=now,
        )

    def _settle_failure(
        self,
        exc: BaseException | None,
        *,
        retryable: bool | None,
        context: dict[str, Any] | None,
        delay: float | None,
        counted: bool,
    ) -> None:
        with self._lock:
            self._check_open()
            self._settle_failure_locked(exc, retryable, context, delay, counted)

    def _settle_failure_locked(
        self,
        exc: BaseException | None,
        retryable: bool | None,
        context: dict[str, Any] | None,
        delay: float | None,
        counted: bool,
    ) -> None:
        bus = self.agent.bus
        if delay is not None:
            delay = _seconds(delay, "delay")
        # Recorded text never fails the recording: lone surrogates (file names from
        # os.listdir carry them) are kept escaped, and an exception whose str() raises is named.
        error_name = _error_name(exc) if exc is not None else None
        error_message = _error_text(exc) if exc is not None else None
        tb = _traceback_text(exc) if exc is not None else None
        context_json = _context_json(context, bus.max_payload_bytes)
        if retryable is None:
            retryable = not isinstance(exc, bus.non_retryable)
        now = bus._now_ms()
        if not retryable:
            reason = "non_retryable"
        elif self.attempts >= bus.max_attempts:
            reason = "max_attempts"
        else:
            reason = None
        if delay is None:
            backoff = bus.backoff_base * (2 ** (self.attempts - 1))
            delay = min(bus.backoff_cap, backoff)
        last_error = f"{error_name}: {error_message}" if exc is not None else None
        with bus._write() as conn:
            if reason is None:
                due_at = now + _ceil_ms(delay)  # never early, like a publish delay
                ok = storage.retry(conn, self._seq, self._claims, due_at, last_error)
                mark([self.agent.id])  # its waiters re-read the next due time
            else:
                ok = storage.dead_letter(
                    conn, self._seq, self._claims, now, reason, error_name, error_message, tb,
                    context_json,
                )
            if not ok:
                raise self._lease_lost()
            if counted:  # messages_failed and error_rates both come from these counts
                storage.count_error(conn, error_name or "UnknownError")
        self._settled = "retrying" if reason is None else "dead"
        self._outcome = f"retry in {delay:g} s" if reason is None else f"dead letter ({reason})"


def response_payload(
    request: Message, data: Any, success: bool, error: str | None, error_type: str | None = None
) -> tuple[dict[str, Any], str]:
    """The payload and correlation id of the response to ``request`` (SPEC 5.1)."""
    payload: dict[str, Any] = {"success": bool(success), "data": data, "request_id": request.id}
    if not success or error is not None:
        if error is None:
            error = "request failed"
        # recorded text (often an exception's): a lone surrogate is kept escaped
        payload["error"] = escape_text(error) if type_of(error) is str else error
    if error_type is not None and type_of(error_type) is not str:
        raise TypeError(f"error_type must be a str (an exception's name), got {type_of(error_type).__name__}")
    if not success:
        # recorded text, like error: a lone surrogate is kept escaped
        payload["error_type"] = "Error" if error_type is None else escape_text(error_type)
    correlation_id = request.headers.correlation_id
    return payload, correlation_id if isinstance(correlation_id, str) else request.id


def _context_json(context: dict[str, Any] | None, max_bytes: int) -> str | None:
    """A failure's ``context`` as JSON text. It is recorded text, so lone surrogates in its
    strings are kept escaped; otherwise it follows the rules of every JSON value the bus
    stores (exact round trip: no NaN; nesting; size): a ValidationError, raised before
    anything is written, leaves the delivery unsettled for the caller to settle again."""
    if context is None:
        return None
    if type_of(context) is not dict:
        raise TypeError(f"context must be a dict, got {type_of(context).__name__}")
    try:
        return encode_json_value(context, max_bytes, "context").decode()
    except ValidationError:
        escaped = escape_strings(context)
        if escaped is context:
            raise
        return encode_json_value(escaped, max_bytes, "context").decode()


def _error_name(exc: BaseException) -> str:
    return escape_text(type_of(exc).__name__)


def _error_text(exc: BaseException) -> str:
    """``str(exc)``, escaped for recording; never raises (a run loop records any exception)."""
    try:
        return escape_text(str(exc))
    except Exception:  # a broken __str__
        return f"<{_error_name(exc)} whose str() failed>"


def _traceback_text(exc: BaseException) -> str:
    try:
        return escape_text(
            "".join(traceback_module.format_exception(type_of(exc), exc, exc.__traceback__)))
    except Exception:
        return f"<the traceback of {_error_name(exc)} could not be formatted>"


@contextmanager
def _settling(deliveries: Sequence[Delivery]) -> Iterator[None]:
    """Hold the locks of ``deliveries`` (in one order, so two batches cannot deadlock) while
    they are settled; raises ``ValueError`` when one was settled already."""
    held = sorted(deliveries, key=id)
    taken = 0
    try:
        for d in held:
            d._lock.acquire()
            taken += 1
        for d in held:
            d._check_open()
        yield
    finally:
        for d in held[:taken]:
            d._lock.release()


class _BufferedState:
    """``d.state``: state writes buffered and committed with the delivery's ack."""

    __slots__ = ("_delivery",)

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    def get(self, key: str) -> Any:
        """The latest committed entry (buffered writes are not visible before the ack)."""
        return self._delivery.agent.state.get(key)

    def set(
        self, key: str, value: Any, *, expected_version: int | None = None, notify: bool = True,
        subscribers: list[str] | None = None, include_value: bool = False,
    ) -> None:
        """Buffer a write of ``key``; the version check happens at the ack."""
        from .encoding import encode_json_value

        d = self._delivery
        d._check_open()
        check_key(key)
        value_json = encode_json_value(value, d.agent.bus.max_payload_bytes, "value")
        d._effects.append(
            StateWrite(d.agent.bus, d.agent.id, key, value_json, expected_version, notify,
                       subscribers, include_value)
        )

    def delete(self, key: str, *, expected_version: int | None = None, notify: bool = True,
               subscribers: list[str] | None = None) -> None:
        """Buffer a delete of ``key``."""
        d = self._delivery
        d._check_open()
        check_key(key)
        d._effects.append(
            StateWrite(d.agent.bus, d.agent.id, key, None, expected_version, notify, subscribers,
                       False)
        )


# ---------------------------------------------------------------------------------------------
# The transactional outbox


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
        self._write: _Write | None = None
        self._conn: apsw.Connection | None = None
        self._ended = False  # the database ended the transaction before the block did
        self._token: contextvars.Token[Transaction | None] | None = None
        self.state: StateStore = StateStore(agent.bus, agent.id)

    def __enter__(self) -> Transaction:
        self._begin()
        self._token = _open_block.set(self)
        return self

    def _begin(self) -> None:
        if self._write is not None:
            raise RuntimeError("this transaction is already open")
        write = self.agent.bus._write()
        self._conn = write.__enter__()
        # Between the block's calls no thread is inside SQLite: a fork or a close may go ahead.
        connections.inside.__exit__()
        self._write = write
        self._ended = False
        self.state = StateStore(self.agent.bus, self.agent.id, self._conn, self._run)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._token is not None:
            _open_block.reset(self._token)
            self._token = None
        self._end(exc_type, exc, tb)

    def _end(self, exc_type: Any, exc: Any, tb: Any) -> None:
        write, self._write, self._conn = self._write, None, None
        assert write is not None
        bus = self.agent.bus
        try:
            bus._check_usable(write.conn)
        except DatabaseError:
            if exc_type is None:
                raise
            return  # the caller's own error goes on
        if self._ended or write.conn.get_autocommit():
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

    def _connection(self) -> apsw.Connection:
        conn = self._conn
        if conn is None:
            raise RuntimeError("use the transaction in a with block: with agent.transaction() as tx")
        self.agent.bus._check_usable(conn)
        if self._ended:
            raise self._ended_error()
        return conn

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in the transaction; a statement that made the database end the
        transaction leaves the block ended for every later call."""
        conn = self._connection()
        with connections.inside:
            try:
                return fn(conn, *args)
            except apsw.Error as exc:
                raise self.agent.bus._database_error(exc) from exc
            finally:
                if conn.get_autocommit():
                    self._ended = True

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        """Run the application's own SQL in this transaction (bound parameters); returns rows."""
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    def publish(self, to: str | list[str], type: str, payload: Any = None, **headers: Any) -> str:
        """Like :meth:`Agent.publish`, committed with the transaction."""
        self._connection()
        bus = self.agent.bus
        now = bus._now_ms()
        op = bus._prepare(self.agent.id, to, type, payload, now=now, **headers)
        return self._run(op.write, now)

    def publish_many(self, items: Sequence[dict[str, Any]]) -> list[str]:
        """Like :meth:`Agent.publish_many`, committed with the transaction."""
        self._connection()
        now = self.agent.bus._now_ms()
        ops = self.agent._prepare_many(items, now)
        return self._run(_write_all, self.agent.id, ops, now) if ops else []

    def broadcast(self, type: str, payload: Any = None, *, pattern: str = "*", **headers: Any) -> str:
        """Like :meth:`Agent.broadcast`, committed with the transaction."""
        self._connection()
        bus = self.agent.bus
        now = bus._now_ms()
        op = bus._prepare_broadcast(self.agent.id, type, payload, pattern, dict(headers), now)
        return self._run(op.write, now)

