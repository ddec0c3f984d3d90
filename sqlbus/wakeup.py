"""Wake-ups: a process waiting for work learns of another process's commit at once, idly.

How it works (figures in ``benchmarks/latency.py``):

- **Doorbells.** A process that waits binds one Unix datagram socket, its *doorbell*, in
  ``<db>.doorbells/`` (directory 0700, socket 0600, named ``<pid>-<random>.sock``: agent ids
  never reach a file name). After every commit, the committing process *rings*: one
  non-blocking ``sendto`` per doorbell. The datagram carries 4-byte tags of the agents that
  got new work (a hash of the id), or nothing for "anything may have changed", so a process
  waiting for bob goes straight back to sleep when alice gets a message.
- **No cost without waiters.** The ringer caches the directory listing. Waiters bump a counter
  in a shared memory-mapped file (``<db>.doorbells/generation``) when they bind or leave, so a
  ringer learns that its listing is stale by reading memory: with nobody waiting, ringing
  costs no system call. The listing is also refreshed every second (a recreated directory).
- **Only processes that wait now are rung.** Next to each doorbell, a one-byte memory-mapped
  flag (``<pid>-<random>.wake``) says whether one of its threads is waiting. A ringer skips a
  process whose flag is down: a busy consumer is not sent a datagram per publish (measured:
  with 2 producer and 2 consumer processes, those rings took a third of the producers' time
  and woke processes that had nothing to do). A waiter raises its flag *before* it checks the
  database, a ringer reads it *after* its commit, so either the ringer sees the flag or the
  waiter sees the commit. A process that has used asyncio keeps its flag up.
- **One poller per process.** One waiting thread (the *leader*) polls the doorbell; the other
  threads (and asyncio waiters, see :meth:`Wakeup.wait_async`) wait on a Condition that the
  leader notifies. A commit by this process rings its own doorbell when it has waiters.
- **Nothing is ever stranded.** The caller's ``check`` (``PRAGMA data_version`` differs from
  the value read before the caller looked) runs before sleeping, so a commit that landed
  between the look and the wait is seen; a slow fallback poll (``FALLBACK`` seconds) covers a
  lost ring or a deleted doorbell (which is then made again); a doorbell left by a crashed
  process refuses rings (ECONNREFUSED) and the ringer removes it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import secrets
import select
import socket
import stat
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Wakeup", "ANY", "RUNG", "CHANGED", "FALLBACK", "agent_tag", "doorbell_dir"]

FALLBACK = 0.5  # seconds: the longest a waiter sleeps without re-checking the database
REFRESH_EVERY = 1.0  # seconds: ringers re-list the doorbell directory at least this often
MAX_TAGS = 64  # more recipients than this in one commit: ring "anything changed" instead
GENERATION = "generation"
WAKE = ".wake"  # suffix of a doorbell's awake flag: <pid>-<random>.wake
_COUNTER = struct.Struct("<Q")
# Files in the doorbell directory are opened so that a symlink, FIFO or device planted there
# is never followed, never blocks, and is then refused for not being a regular file.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

log = logging.getLogger("sqlbus")


def _queue_limit() -> int:
    """How many rings a doorbell holds before a ring is refused (EAGAIN): Linux allows
    ``net.unix.max_dgram_qlen`` + 1 queued datagrams (default 10)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as handle:
            return max(1, int(handle.read()))
    except (OSError, ValueError):
        return 10


# A drain that reads this many rings may have followed a refused one (whose tags are lost), so
# it counts as "anything may have changed".
_OVERFLOW = _queue_limit()
_PROC_FD = os.path.isdir("/proc/self/fd")

ANY: Any = None  # interest of a waiter that wakes on every ring (state watch, run loops)
# What woke a wait (0: its time ran out): a ring that named the agent waited for, or anything
# else (a ring for "anything may have changed", a commit seen by the check, the bus closing).
RUNG, CHANGED = 2, 1
_NEVER = object()  # interest of the asyncio proxy: never wakes on a ring, only polls


class _Untrusted(OSError):
    """The doorbell directory, or a file in it, is not this user's alone: it is not used."""


def _check_directory(path: str, fd: int) -> None:
    """Refuse the doorbell directory (open as ``fd``) unless it is a real directory owned by
    this user with mode 0700: whoever else can write there could plant links, FIFOs, files
    they can truncate under our mapping, or sockets that hear which agents got work."""
    info = os.fstat(fd)
    user = os.geteuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != user or info.st_mode & 0o777 != 0o700:
        raise _Untrusted(
            f"{path} is not this user's alone (owner uid {info.st_uid}, mode "
            f"{info.st_mode & 0o777:o}; expected owner uid {user}, mode 700)"
        )


def _own_file(fd: int) -> os.stat_result:
    """``fstat`` of a doorbell-directory file; _Untrusted unless a regular file of this user."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise _Untrusted(f"not a file of this user (uid {info.st_uid}, mode {info.st_mode:o})")
    return info


def doorbell_dir(db_path: str) -> str:
    """The directory of the doorbells of the database at ``db_path``."""
    return db_path + ".doorbells"


_tags: dict[str, bytes] = {}


def agent_tag(agent_id: str) -> bytes:
    """The 4-byte tag of an agent in a ring (a hash: the id itself never leaves the process)."""
    tag = _tags.get(agent_id)
    if tag is None:
        if len(_tags) > 100_000:
            _tags.clear()
        tag = _tags[agent_id] = zlib.crc32(agent_id.encode()).to_bytes(4, "little")
    return tag


def _unlink_doorbell(directory: str, name: list[str], owner: int) -> None:
    """Finalizer: remove a doorbell file (``name[0]``: it is renamed as its interest grows),
    but only in the process that bound it (a forked child must not remove its parent's)."""
    if os.getpid() != owner:
        return
    for file in (name[0], _stem_of(name[0]) + WAKE):
        try:
            os.unlink(os.path.join(directory, file))
        except OSError:
            pass


def _stem_of(name: str) -> str:
    """``<pid>-<random>`` of a doorbell's (or a flag's) file name."""
    return name.split(".", 1)[0]


def _owner_alive(name: str) -> bool:
    """False when the process named in a doorbell's file name is gone (a reused pid only
    keeps a stale doorbell a while longer: ringing it then fails and removes it)."""
    try:
        pid = int(name.split("-", 1)[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        pass  # not our naming, or alive but not ours to signal
    return True


MAX_ADVERTISED = 16  # tags a doorbell's name lists; a process waiting for more wants "any"


def _doorbell_name(stem: str, wants_any: bool, tags: set[bytes]) -> str:
    """``<pid>-<random>.<interest>.sock``: the interest is ``any`` or the hex tags (hashes of
    agent ids) the process waits for, so ringers skip processes a commit does not concern."""
    interest = "any" if wants_any else "-".join(sorted(tag.hex() for tag in tags)) or "none"
    return f"{stem}.{interest}.sock"


def _interest_of(name: str) -> frozenset[bytes] | None:
    """The tags a doorbell file's name asks for; None means every ring."""
    parts = name.split(".")
    if len(parts) != 3 or parts[1] == "any":
        return None
    if parts[1] == "none":
        return frozenset()
    try:
        return frozenset(bytes.fromhex(tag) for tag in parts[1].split("-"))
    except ValueError:
        return None


class _AsyncWaiter:
    __slots__ = ("loop", "future", "tag", "snapshot")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool], tag: Any,
                 snapshot: tuple[int, int, int]) -> None:
        self.loop = loop
        self.future = future
        self.tag = tag
        self.snapshot = snapshot


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


class Wakeup:
    """The wake-up machinery of one :class:`~sqlbus.Bus` in one process.

    ``ring(tags)`` after a commit; ``wait(check, timeout, tag)`` to sleep until a ring for
    ``tag`` (an agent id; :data:`ANY` for every ring), until ``check()`` is true, or until
    ``timeout`` seconds pass.
    """

    def __init__(self, db_path: str) -> None:
        self.directory = doorbell_dir(db_path)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._setup_lock = threading.Lock()
        self._closed = False
        # Shared: the directory, the generation counter, the socket rings are sent from.
        self._dir_fd: int | None = None
        self._dir_ino = 0
        self._gen_fd: int | None = None
        self._gen: mmap.mmap | None = None
        self._sender: socket.socket | None = None
        self._retry_setup_at = 0.0
        self._warned = False  # about a doorbell directory that is not ours alone (once)
        # Ringing side: the cached listing of the other processes' doorbells.
        self._seen_gen = -1
        # name, address, wants, awake flag (None: none found, ring always)
        self._peers: list[tuple[str, str, frozenset[bytes] | None, mmap.mmap | None]] = []
        self._flags: dict[str, mmap.mmap] = {}  # the other processes' awake flags, by stem
        self._refresh_at = 0.0
        # Waiting side: this process's doorbell and its waiters.
        self._sock: socket.socket | None = None
        self._name: str | None = None
        self._stem = ""  # <pid>-<random> of our doorbell
        self._holder: list[str] = [""]  # the doorbell's current name, for the finalizer
        self._wants_any = False  # interest advertised in the doorbell's name: grows, never shrinks
        self._wants: set[bytes] = set()
        self._address: str | None = None
        self._ino = 0
        self._finalizer: weakref.finalize | None = None
        self._poller: Any = None
        self._awake: mmap.mmap | None = None  # our flag: up while a thread here waits
        self._always_awake = False  # asyncio was used: its waits start before they register
        self._waiters = 0
        self._leading = False
        self._generic = 0  # rings that said "anything may have changed"
        self._any = 0  # every ring
        self._tag_counts: dict[bytes, int] = {}  # rings per tag some waiter is interested in
        self._interest: dict[bytes, int] = {}
        self._async: set[_AsyncWaiter] = set()
        self._proxy_running = False

    # -- setup ---------------------------------------------------------------------------

    def _setup(self) -> bool:
        """Open the doorbell directory and the generation counter (once; retried every
        REFRESH_EVERY seconds when the directory cannot be made, e.g. a read-only place)."""
        if self._gen is not None:
            return True
        if self._closed or time.monotonic() < self._retry_setup_at:
            return False
        with self._setup_lock:
            if self._gen is not None:
                return True
            try:
                self._open_shared()
            except OSError as exc:
                self._close_shared()
                self._retry_setup_at = time.monotonic() + REFRESH_EVERY
                if isinstance(exc, _Untrusted):
                    self._distrust(exc)
                return False
        return True

    def _distrust(self, problem: OSError) -> None:
        """Say once that waiters poll because the doorbell directory cannot be trusted."""
        if not self._warned:
            self._warned = True
            log.warning("sqlbus: not using the doorbell directory: %s; waiters poll every %s s",
                        problem, FALLBACK)

    def _open_shared(self) -> None:
        created = True
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            created = False
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or not a directory
                raise _Untrusted(f"{self.directory} is not a directory ({exc.strerror})") from exc
            raise
        self._dir_fd = dir_fd
        if created:
            os.fchmod(dir_fd, 0o700)  # whatever the umask
        _check_directory(self.directory, dir_fd)
        self._dir_ino = os.fstat(dir_fd).st_ino
        try:
            gen_fd = os.open(GENERATION, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
            self._gen_fd = gen_fd
            info = _own_file(gen_fd)
        except OSError as exc:
            if isinstance(exc, _Untrusted) or exc.errno in (errno.ELOOP, errno.ENXIO):
                raise _Untrusted(f"{self.directory}/{GENERATION}: {exc}") from None
            raise
        if info.st_mode & 0o777 != 0o600:
            os.fchmod(gen_fd, 0o600)
        if info.st_size < _COUNTER.size:
            os.ftruncate(gen_fd, _COUNTER.size)  # growing never clears a counter already there
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        self._sender = sender
        self._gen = mmap.mmap(gen_fd, _COUNTER.size)

    def _close_shared(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
        for attr in ("_gen_fd", "_dir_fd"):
            fd = getattr(self, attr)
            setattr(self, attr, None)
            if fd is not None:
                os.close(fd)
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        self._peers = []
        self._seen_gen = -1
        flags, self._flags = self._flags, {}
        for flag in flags.values():
            flag.close()

    def _address_of(self, name: str) -> str:
        # AF_UNIX addresses are limited to 108 bytes; a path through our open directory
        # descriptor stays short however deep the database lives.
        if _PROC_FD:
            return f"/proc/self/fd/{self._dir_fd}/{name}"
        return os.path.join(self.directory, name)

    def _bump_generation(self) -> None:
        """Tell every ringer that the set of doorbells changed (under an flock: waiters of
        several processes may bump at once)."""
        gen, gen_fd = self._gen, self._gen_fd
        if gen is None or gen_fd is None:
            return
        fcntl.flock(gen_fd, fcntl.LOCK_EX)
        try:
            _COUNTER.pack_into(gen, 0, (_COUNTER.unpack_from(gen, 0)[0] + 1) & (2**64 - 1))
        finally:
            fcntl.flock(gen_fd, fcntl.LOCK_UN)

    # -- ringing -------------------------------------------------------------------------

    def ring(self, tags: set[bytes] | None = None) -> None:
        """After a commit: wake the waiters of every process. ``tags`` (from
        :func:`agent_tag`) names the agents that got work; None means anything may have
        changed; an empty collection (a claim, a plain ack) rings nobody. Never raises: the
        commit is done, and a lost ring only delays a waiter until its fallback poll."""
        try:
            self._ring(tags)
        except (OSError, ValueError):
            pass  # e.g. the directory vanished, or another thread is closing the bus

    def _ring(self, tags: set[bytes] | None) -> None:
        if tags is not None and not tags:
            return
        gen = self._gen
        if gen is None:
            if not self._setup():
                if self._waiters or self._async:
                    self._kick(b"")
                return
            gen = self._gen
            assert gen is not None
        # Reading the shared counter is a memory read: no system call unless someone waits.
        current = _COUNTER.unpack_from(gen, 0)[0]
        if current != self._seen_gen or time.monotonic() >= self._refresh_at:
            self._refresh(current)
        peers = self._peers
        local = self._waiters or self._async
        if not peers and not local:
            return
        if tags is None:
            payload = b""  # an empty datagram: anything may have changed
        else:
            payload = b"".join(tags) if len(tags) <= MAX_TAGS else b""
        if local:
            self._kick(payload)
        if not peers:
            return
        sender = self._sender
        if sender is None:
            return
        gone: list[tuple[str, str, frozenset[bytes] | None, mmap.mmap | None]] = []
        for peer in peers:
            wants, awake = peer[2], peer[3]
            if tags is not None and wants is not None and wants.isdisjoint(tags):
                continue  # a process that waits for none of these agents sleeps on
            if awake is not None and not awake[0]:
                continue  # nobody there waits now: its next wait checks the database first
            try:
                sender.sendto(payload, peer[1])
            except BlockingIOError:
                pass  # full: its reader will see the overflow and treat it as "anything"
            except ConnectionRefusedError:
                gone.append(peer)  # nobody bound: the process that made it died
                self._remove(peer[0])
            except OSError:
                gone.append(peer)  # removed meanwhile (or not ours to ring): skip until refresh
        if gone:
            self._peers = [peer for peer in peers if peer not in gone]

    def _refresh(self, current: int) -> None:
        """Re-list the doorbells (the generation changed, or a second passed)."""
        self._refresh_at = time.monotonic() + REFRESH_EVERY
        with self._setup_lock:
            try:
                if os.lstat(self.directory).st_ino != self._dir_ino:
                    raise FileNotFoundError(self.directory)  # replaced: open the new one
                _check_directory(self.directory, self._dir_fd)  # type: ignore[arg-type]
                names = os.listdir(self._dir_fd)  # type: ignore[arg-type]
            except OSError as exc:
                self._close_shared()
                self._retry_setup_at = 0.0
                if isinstance(exc, _Untrusted):
                    self._retry_setup_at = time.monotonic() + REFRESH_EVERY
                    self._distrust(exc)
                return
            self._seen_gen = current
            own = self._name
            peers = []
            flags: dict[str, mmap.mmap] = {}
            for name in names:
                if name.endswith(WAKE) and not _owner_alive(name):
                    self._remove(name)  # the flag of a process that died while binding
                    continue
                if not name.endswith(".sock") or name == own:
                    continue
                if not self._is_own_socket(name):
                    continue  # rung only if it is this user's socket: nobody else hears rings
                if not _owner_alive(name):
                    self._remove(name)  # left by a process that died without closing
                    continue
                stem = _stem_of(name)
                flag = self._flags.pop(stem, None) or self._map_flag(stem)
                if flag is not None:
                    flags[stem] = flag
                peers.append((name, self._address_of(name), _interest_of(name), flag))
            for gone in self._flags.values():
                gone.close()
            self._flags = flags
            self._peers = peers

    def _is_own_socket(self, name: str) -> bool:
        try:
            info = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid()

    def _map_flag(self, stem: str) -> mmap.mmap | None:
        """Map another process's awake flag for reading (None: it has none, ring it always).

        Only a regular file of this user that already holds its byte is mapped: reading a
        mapping past the end of a file that was cut short kills the process (SIGBUS), and in
        our 0700 directory only this user can cut it."""
        try:
            fd = os.open(stem + WAKE, os.O_RDONLY | _OPEN_FLAGS, dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            if _own_file(fd).st_size < 1:
                return None  # empty (being made): ring it
            return mmap.mmap(fd, 1, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def _remove(self, name: str) -> None:
        """Remove a doorbell of another process, and its awake flag."""
        files = (name,) if name.endswith(WAKE) else (name, _stem_of(name) + WAKE)
        for file in files:
            try:
                os.unlink(os.path.join(self.directory, file))
            except OSError:
                pass

    def _kick(self, payload: bytes) -> None:
        """Wake this process's own waiters after its own commit."""
        sender, address = self._sender, self._address
        if sender is not None and address is not None:
            try:
                sender.sendto(payload, address)
                return
            except BlockingIOError:
                return  # a full doorbell: its reader will count the overflow as "anything"
            except OSError:
                pass
        with self._cond:  # no doorbell (it could not be made): wake everyone directly
            self._count(None)

    # -- the doorbell --------------------------------------------------------------------

    def _bind(self) -> bool:
        """Make this process's doorbell if it has none (or lost it); False when impossible."""
        if self._sock is not None and self._pid == os.getpid():
            return True
        if not self._setup():
            return False
        with self._setup_lock:
            if self._sock is not None:
                return True
            if self._closed or self._dir_fd is None:
                return False  # closed meanwhile: its directory descriptor is gone
            stem = f"{os.getpid()}-{secrets.token_hex(6)}"
            name = _doorbell_name(stem, self._wants_any, self._wants)
            awake = self._make_flag(stem)  # before the socket: a ringer that lists it finds it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(self._address_of(name))
                os.chmod(name, 0o600, dir_fd=self._dir_fd)
                ino = os.stat(name, dir_fd=self._dir_fd).st_ino
            except OSError:
                sock.close()
                if awake is not None:
                    awake.close()
                self._remove(name)
                return False
            with self._lock:
                self._awake = awake
                self._raise_flag(self._waiters > 0 or self._always_awake or bool(self._async))
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            self._sock, self._name, self._ino, self._poller = sock, name, ino, poller
            self._stem = stem
            self._address = self._address_of(name)
            self._holder = [name]
            self._finalizer = weakref.finalize(
                self, _unlink_doorbell, self.directory, self._holder, os.getpid()
            )
            self._peers = [peer for peer in self._peers if peer[0] != name]
        self._bump_generation()
        return True

    def _make_flag(self, stem: str) -> mmap.mmap | None:
        """Our awake flag's file (0600), mapped for writing; None if it cannot be made (then
        ringers find no flag and ring us always)."""
        try:
            fd = os.open(stem + WAKE, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600,
                         dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, 1)
            return mmap.mmap(fd, 1)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _raise_flag(self, up: bool) -> None:
        """Say whether a thread of this process waits (under ``self._lock``)."""
        awake = self._awake
        if awake is not None:
            awake[0] = 1 if up else 0

    def _unbind(self) -> None:
        sock, self._sock = self._sock, None
        self._address = None
        awake, self._awake = self._awake, None
        if awake is not None:
            awake.close()
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()
        if sock is not None:
            sock.close()
            self._bump_generation()

    def _advertise(self, tag: Any) -> None:
        """Make the doorbell's name ask for ``tag`` too (before the caller's first look, so a
        ringer that reads the new generation rings us). The interest only grows: a process
        keeps being rung for an agent it waited for once, which keeps renames rare."""
        if self._wants_any or tag is _NEVER or (isinstance(tag, bytes) and tag in self._wants):
            return
        with self._setup_lock:
            if tag is ANY or len(self._wants) >= MAX_ADVERTISED:
                self._wants_any = True
            else:
                self._wants.add(tag)
            old = self._name
            if self._sock is None or old is None:
                return  # _bind names it
            new = _doorbell_name(self._stem, self._wants_any, self._wants)
            try:
                os.rename(os.path.join(self.directory, old), os.path.join(self.directory, new))
            except OSError:
                return  # deleted under us: the fallback poll makes a new one
            self._name = self._holder[0] = new
            self._address = self._address_of(new)
        self._bump_generation()

    def _doorbell_intact(self) -> bool:
        """False when our doorbell's file was removed or replaced (we then make a new one)."""
        name = self._name
        if name is None or self._dir_fd is None:
            return False
        try:
            return os.stat(os.path.join(self.directory, name)).st_ino == self._ino
        except OSError:
            return False

    @property
    def doorbell_path(self) -> str | None:
        """The file of this process's doorbell, or None before the first wait."""
        if self._sock is None or self._name is None:
            return None
        return os.path.join(self.directory, self._name)

    # -- waiting -------------------------------------------------------------------------

    def _snapshot(self, tag: Any) -> tuple[int, int, int]:
        count = self._tag_counts.get(tag, 0) if isinstance(tag, bytes) else 0
        return (self._generic, self._any, count)

    def _matches(self, tag: Any, snapshot: tuple[int, int, int]) -> int:
        """RUNG, CHANGED or 0 (nothing for this waiter since ``snapshot``)."""
        if self._tag_counts.get(tag, 0) != snapshot[2] and isinstance(tag, bytes):
            return RUNG
        if self._closed or self._generic != snapshot[0]:
            return CHANGED
        if tag is ANY:
            return CHANGED if self._any != snapshot[1] else 0
        return 0

    def _register(self, tag: Any) -> None:
        if isinstance(tag, bytes):
            self._interest[tag] = self._interest.get(tag, 0) + 1
            self._tag_counts.setdefault(tag, 0)

    def _unregister(self, tag: Any) -> None:
        if isinstance(tag, bytes):
            left = self._interest[tag] - 1
            if left:
                self._interest[tag] = left
            else:
                del self._interest[tag]
                del self._tag_counts[tag]

    def _count(self, tags: set[bytes] | None) -> None:
        """Record rings (under the lock) and wake whoever they concern."""
        self._any += 1
        if tags is None:
            self._generic += 1
        else:
            counts = self._tag_counts
            for tag in tags:
                if tag in counts:
                    counts[tag] += 1
        self._cond.notify_all()
        if self._async:
            for waiter in list(self._async):
                if self._matches(waiter.tag, waiter.snapshot):
                    self._async.discard(waiter)
                    try:
                        waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                    except RuntimeError:
                        pass  # its loop is closed

    def _drain(self) -> tuple[int, set[bytes] | None]:
        """Read every pending ring: (any read, their tags or None for "anything")."""
        sock, poller = self._sock, self._poller
        tags: set[bytes] | None = set()
        got = 0
        while sock is not None:
            try:
                data = sock.recv(4096)
            except OSError:  # BlockingIOError (empty), InterruptedError, closed
                break
            got += 1
            if got >= _OVERFLOW:
                tags = None  # the queue was (nearly) full: a ring may have been refused
            elif tags is not None:
                if not data:
                    tags = None
                elif len(data) == 4:
                    tags.add(data)
                else:
                    tags.update(data[i : i + 4] for i in range(0, len(data) - 3, 4))
            if poller is None or not poller.poll(0):
                break  # nothing more queued (cheaper than the recv that would fail)
        return got, tags

    def token(self, tag: Any = ANY) -> tuple[int, int, int]:
        """Make the doorbell if needed and return a snapshot to pass to :meth:`wait_async`.
        Take it *before* looking at the database, so a commit after the look wakes you."""
        self._advertise(tag)  # before binding: a new doorbell is named with it at once
        self._bind()
        with self._lock:
            # Rings must reach the waits that follow this token, which register only later.
            self._always_awake = True
            self._raise_flag(True)
            return self._snapshot(tag)

    def wait(self, check: Callable[[], bool], timeout: float, tag: Any = ANY) -> int:
        """Sleep until ``check()`` is true, a ring for ``tag`` arrives (an :func:`agent_tag`,
        or :data:`ANY`), or ``timeout`` seconds pass. Returns :data:`RUNG` when a ring named
        ``tag``, :data:`CHANGED` when woken otherwise, 0 on time-out.

        ``check`` must compare against a value read before the caller last looked at the
        database (``PRAGMA data_version``); it runs first, and then at least every
        ``FALLBACK`` seconds, so a lost ring delays a wake-up by FALLBACK at most.
        """
        end = time.monotonic() + timeout
        self._advertise(tag)  # before binding: a new doorbell is named with it at once
        bound = self._bind()
        with self._lock:
            self._waiters += 1
            self._register(tag)
            self._raise_flag(True)  # before the check: a commit after it rings us
            snapshot = self._snapshot(tag)
        try:
            if check():
                return CHANGED
            next_check = time.monotonic() + FALLBACK
            while True:
                now = time.monotonic()
                if now >= end:
                    return 0
                if now >= next_check:
                    if check():
                        return CHANGED
                    if bound and not self._closed and not self._doorbell_intact():
                        self._rebind()
                    next_check = now + FALLBACK
                with self._lock:
                    woken = self._matches(tag, snapshot)
                    if woken:
                        return woken
                    lead = bound and not self._leading and self._sock is not None
                    if not lead:
                        self._cond.wait(min(end, next_check) - now)
                        continue
                    self._leading = True
                try:
                    self._lead(min(end, next_check) - now)
                finally:
                    with self._lock:
                        self._leading = False
                        self._cond.notify_all()  # hand over: a follower may lead now
        finally:
            with self._lock:
                self._waiters -= 1
                self._unregister(tag)
                if not self._waiters and not self._always_awake:
                    self._raise_flag(False)
                last_out = self._closed and not self._leading and not self._waiters
                if last_out:
                    self._unbind()
            if last_out and self._pid == os.getpid():
                # close() left the shared descriptors to the last waiter out
                with self._setup_lock, self._lock:
                    if self._sock is None:
                        self._close_shared()

    def _lead(self, timeout: float) -> None:
        """Poll the doorbell for up to ``timeout`` seconds (as the process's one poller)."""
        if not self._poller.poll(max(0.0, timeout) * 1000):
            return
        got, tags = self._drain()
        if got:
            with self._lock:
                self._count(tags)

    def _rebind(self) -> None:
        with self._lock:
            if self._leading:
                return  # the leader is polling the old socket; try again next time
            self._leading = True
        try:
            self._unbind()
            self._bind()
        finally:
            with self._lock:
                self._leading = False

    async def wait_async(self, token: tuple[int, int, int], timeout: float, tag: Any = ANY) -> bool:
        """The asyncio form of :meth:`wait`, without a ``check``: wakes on a ring for ``tag``
        since ``token`` (from :meth:`token`) or after ``timeout`` seconds (the caller looks
        again, which is the fallback). Never blocks the event loop: a daemon thread polls the
        doorbell for the process while asyncio waiters exist."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = _AsyncWaiter(loop, future, tag, token)
        with self._lock:
            if self._matches(tag, token):
                return True
            self._register(tag)
            self._async.add(waiter)
            start = not self._proxy_running
            self._proxy_running = True
        try:
            if start:
                threading.Thread(target=self._proxy, name="sqlbus-doorbell", daemon=True).start()
            try:
                return await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                return False
        finally:
            with self._lock:
                self._async.discard(waiter)
                self._unregister(tag)

    def _proxy(self) -> None:
        """Keep a poller on the doorbell while asyncio waiters exist (a thread waiter that
        wants no ring for itself: the leader's notifications reach the futures)."""
        try:
            while True:
                with self._lock:
                    if not self._async or self._closed:
                        return
                self.wait(lambda: False, FALLBACK, _NEVER)
        finally:
            with self._lock:
                self._proxy_running = False

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove this process's doorbell and wake every waiter (they see the bus closed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._count(None)
            idle = not self._leading and not self._waiters
        if self._pid != os.getpid():
            return
        if idle:
            self._unbind()
        else:
            self._kick(b"")  # the leader wakes, and the last waiter out removes the doorbell
            if self._finalizer is not None:
                self._finalizer()  # the file goes now; the socket closes with the last waiter
        with self._setup_lock, self._lock:  # not while a waiter's _unbind uses them
            if self._sock is None:
                self._close_shared()

    def forget(self) -> None:
        """In a forked child: drop the parent's doorbell without touching it (not closed, not
        removed: the parent still uses it)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._sock = None
        self._awake = None  # the parent's: never written from here
        self._closed = True


# -- what a commit rings -----------------------------------------------------------------------
# The bus marks, while a write transaction runs, which agents got work; the commit then rings
# only their tags. A write that marks nothing rings "anything may have changed" (always
# correct, just less targeted); a write marked quiet (a claim, a plain ack) rings nobody.

_pending = threading.local()


def reset_marks() -> None:
    """At BEGIN: nothing marked yet."""
    _pending.tags = None


def mark(agents: Iterable[str]) -> None:
    """Mark agents that got work (a message, a retry coming due) in the current write."""
    tags = getattr(_pending, "tags", None)
    if tags is None:
        tags = _pending.tags = set()
    for agent in agents:
        if len(tags) > MAX_TAGS:
            break  # the commit rings "anything may have changed": more tags change nothing
        tags.add(agent_tag(agent))


def mark_quiet() -> None:
    """Mark the current write as making no work for anyone (unless agents get marked)."""
    if getattr(_pending, "tags", None) is None:
        _pending.tags = set()


def take_marks() -> set[bytes] | None:
    """After COMMIT: the tags to ring (None: anything may have changed), and reset."""
    tags = getattr(_pending, "tags", None)
    _pending.tags = None
    return tags
