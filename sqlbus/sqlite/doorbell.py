"""Doorbells: the files in ``<db>.doorbells/`` and this process's own doorbell.

A process that waits binds one Unix datagram socket there, its *doorbell*, named
``<pid>-<random>.<interest>.sock`` (the interest is ``any`` or the hex tags of the agents it
waits for: agent ids never reach a file name), and beside it a one-byte memory-mapped *awake
flag*, ``<pid>-<random>.wake``, up while one of its threads waits. Whoever makes, renames or
removes a doorbell bumps the shared memory-mapped counter ``generation``, so a ringer
(:mod:`sqlbus.sqlite.ringer`) learns that its listing is stale by reading memory.

Whoever else could write in the directory could plant links, FIFOs, files they can truncate
under our mappings, or sockets that hear which agents got work. So the directory must be this
user's alone (mode 0700), and every file in it is opened without following a link or blocking
and refused unless it is a regular file of this user.
"""

from __future__ import annotations

import errno
import fcntl
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
from collections.abc import Callable

__all__ = [
    "Doorbell", "DoorbellDirectory", "Untrusted", "doorbell_dir", "doorbell_name", "own_file",
    "stem_of", "COUNTER", "GENERATION", "MAX_ADVERTISED", "OPEN_FLAGS", "OVERFLOW",
    "REFRESH_EVERY", "WAKE",
]

# seconds: ringers re-list the directory this often, and a failed open is retried after it
REFRESH_EVERY = 1.0
GENERATION = "generation"  # the shared counter's file
WAKE = ".wake"  # suffix of a doorbell's awake flag: <pid>-<random>.wake
MAX_ADVERTISED = 16  # tags a doorbell's name lists; a process waiting for more wants "any"
COUNTER = struct.Struct("<Q")
# A symlink, FIFO or device planted in the directory is never followed, never blocks an open,
# and is then refused for not being a regular file.
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PROC_FD = os.path.isdir("/proc/self/fd")


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
OVERFLOW = _queue_limit()


class Untrusted(OSError):
    """The doorbell directory, or a file in it, is not this user's alone: it is not used."""


def _check_directory(path: str, fd: int) -> None:
    """Refuse the doorbell directory (open as ``fd``) unless it is a real directory owned by
    this user with mode 0700."""
    info = os.fstat(fd)
    user = os.geteuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != user or info.st_mode & 0o777 != 0o700:
        raise Untrusted(
            f"{path} is not this user's alone (owner uid {info.st_uid}, mode "
            f"{info.st_mode & 0o777:o}; expected owner uid {user}, mode 700)"
        )


def own_file(fd: int) -> os.stat_result:
    """``fstat`` of a doorbell-directory file; Untrusted unless a regular file of this user."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise Untrusted(f"not a file of this user (uid {info.st_uid}, mode {info.st_mode:o})")
    return info


def doorbell_dir(db_path: str) -> str:
    """The directory of the doorbells of the database at ``db_path``."""
    return db_path + ".doorbells"


def doorbell_name(stem: str, wants_any: bool, tags: set[bytes]) -> str:
    """``<pid>-<random>.<interest>.sock``: the interest is ``any`` or the hex tags (hashes of
    agent ids) the process waits for, so ringers skip processes a commit does not concern."""
    interest = "any" if wants_any else "-".join(sorted(tag.hex() for tag in tags)) or "none"
    return f"{stem}.{interest}.sock"


def stem_of(name: str) -> str:
    """``<pid>-<random>`` of a doorbell's (or a flag's) file name."""
    return name.split(".", 1)[0]


def _unlink_doorbell(directory: str, name: list[str], owner: int) -> None:
    """Finalizer: remove a doorbell file (``name[0]``: it is renamed as its interest grows),
    but only in the process that bound it (a forked child must not remove its parent's)."""
    if os.getpid() != owner:
        return
    for file in (name[0], stem_of(name[0]) + WAKE):
        try:
            os.unlink(os.path.join(directory, file))
        except OSError:
            pass


class DoorbellDirectory:
    """The doorbell directory of one database, as one :class:`~sqlbus.sqlite.wakeup.Wakeup`
    holds it open: the directory's descriptor, the generation counter, and the socket that
    rings are sent from.

    ``lock`` is held while these are opened or released and while files are made, renamed or
    listed through the descriptor. ``closed`` is set when the bus closes: the directory is
    never opened again. ``on_untrusted`` hears, once, why the directory is not used.
    """

    def __init__(self, db_path: str, on_untrusted: Callable[[OSError], None]) -> None:
        self.path = doorbell_dir(db_path)
        self.lock = threading.Lock()
        self.closed = False
        self.fd: int | None = None
        self.counter: mmap.mmap | None = None  # the generation, mapped (None: not open)
        self.sender: socket.socket | None = None
        self._ino = 0
        self._counter_fd: int | None = None
        self._retry_at = 0.0
        self._on_untrusted = on_untrusted
        self._warned = False

    def open(self) -> bool:
        """Open the directory and the generation counter (once; retried every REFRESH_EVERY
        seconds when the directory cannot be made, e.g. in a read-only place)."""
        if self.counter is not None:
            return True
        if self.closed or time.monotonic() < self._retry_at:
            return False
        with self.lock:
            if self.counter is not None:
                return True
            try:
                self._open()
            except OSError as exc:
                self.release()
                self._retry_at = time.monotonic() + REFRESH_EVERY
                if isinstance(exc, Untrusted):
                    self._distrust(exc)
                return False
        return True

    def _distrust(self, problem: OSError) -> None:
        if not self._warned:
            self._warned = True
            self._on_untrusted(problem)

    def _open(self) -> None:
        created = True
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            created = False
        try:
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or not a directory
                raise Untrusted(f"{self.path} is not a directory ({exc.strerror})") from exc
            raise
        self.fd = dir_fd
        if created:
            os.fchmod(dir_fd, 0o700)  # whatever the umask
        _check_directory(self.path, dir_fd)
        self._ino = os.fstat(dir_fd).st_ino
        try:
            gen_fd = os.open(GENERATION, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600, dir_fd=dir_fd)
            self._counter_fd = gen_fd
            info = own_file(gen_fd)
        except OSError as exc:
            if isinstance(exc, Untrusted) or exc.errno in (errno.ELOOP, errno.ENXIO):
                raise Untrusted(f"{self.path}/{GENERATION}: {exc}") from None
            raise
        if info.st_mode & 0o777 != 0o600:
            os.fchmod(gen_fd, 0o600)
        if info.st_size < COUNTER.size:
            os.ftruncate(gen_fd, COUNTER.size)  # growing never clears a counter already there
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        self.sender = sender
        self.counter = mmap.mmap(gen_fd, COUNTER.size)

    def release(self) -> None:
        """Close the descriptors (under ``lock``); :meth:`open` opens them again."""
        counter, self.counter = self.counter, None
        if counter is not None:
            counter.close()
        for fd in (self._counter_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self._counter_fd = self.fd = None
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.close()

    def listing(self) -> list[str] | None:
        """The names in the directory (under ``lock``), or None when it was replaced, removed
        or is no longer this user's alone: it is then released, to be opened afresh."""
        try:
            if os.lstat(self.path).st_ino != self._ino:
                raise FileNotFoundError(self.path)  # replaced: open the new one
            _check_directory(self.path, self.fd)  # type: ignore[arg-type]
            return os.listdir(self.fd)  # type: ignore[arg-type]
        except OSError as exc:
            self.release()
            self._retry_at = 0.0
            if isinstance(exc, Untrusted):
                self._retry_at = time.monotonic() + REFRESH_EVERY
                self._distrust(exc)
            return None

    def address_of(self, name: str) -> str:
        # AF_UNIX addresses are limited to 108 bytes; a path through our open directory
        # descriptor stays short however deep the database lives.
        if _PROC_FD:
            return f"/proc/self/fd/{self.fd}/{name}"
        return os.path.join(self.path, name)

    def bump_generation(self) -> None:
        """Tell every ringer that the set of doorbells changed (under an flock: waiters of
        several processes may bump at once)."""
        counter, fd = self.counter, self._counter_fd
        if counter is None or fd is None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            COUNTER.pack_into(counter, 0, (COUNTER.unpack_from(counter, 0)[0] + 1) & (2**64 - 1))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def make_flag(self, stem: str) -> mmap.mmap | None:
        """A new awake flag's file (0600), mapped for writing; None if it cannot be made (then
        ringers find no flag and ring that doorbell always)."""
        try:
            fd = os.open(stem + WAKE, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600,
                         dir_fd=self.fd)
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

    def remove(self, name: str) -> None:
        """Remove a doorbell and its awake flag (or a flag alone)."""
        files = (name,) if name.endswith(WAKE) else (name, stem_of(name) + WAKE)
        for file in files:
            try:
                os.unlink(os.path.join(self.path, file))
            except OSError:
                pass


class Doorbell:
    """This process's doorbell in a :class:`DoorbellDirectory`: its socket, its awake flag,
    and the interest its name advertises.

    ``lock`` is the waiters' lock: the flag is written under it. The doorbell's files are
    removed when this object is collected, but only by the process that bound them.
    """

    def __init__(self, directory: DoorbellDirectory, lock: threading.Lock) -> None:
        self._directory = directory
        self._lock = lock
        self._pid = os.getpid()
        self.name: str | None = None  # the file's current name (kept after unbind)
        self.address: str | None = None  # where to send a ring (None: not bound)
        self._sock: socket.socket | None = None
        self._poller: select.poll | None = None
        self._stem = ""  # <pid>-<random>
        self._ino = 0
        self._holder: list[str] = [""]  # the current name, for the finalizer
        self._finalizer: weakref.finalize | None = None
        self._awake: mmap.mmap | None = None  # the awake flag: up while a thread here waits
        self._wants_any = False  # interest advertised in the name: grows, never shrinks
        self._wants: set[bytes] = set()

    @property
    def bound(self) -> bool:
        return self._sock is not None

    @property
    def path(self) -> str | None:
        """The doorbell's file, or None while none is bound."""
        if self._sock is None or self.name is None:
            return None
        return os.path.join(self._directory.path, self.name)

    def bind(self, waiting: Callable[[], bool]) -> bool:
        """Make the doorbell if there is none (or it was lost); False when impossible.
        ``waiting()``, called under the waiters' lock, says whether to raise the new flag."""
        if self._sock is not None and self._pid == os.getpid():
            return True
        directory = self._directory
        if not directory.open():
            return False
        with directory.lock:
            if self._sock is not None:
                return True
            if directory.closed or directory.fd is None:
                return False  # closed meanwhile: its directory descriptor is gone
            stem = f"{os.getpid()}-{secrets.token_hex(6)}"
            name = doorbell_name(stem, self._wants_any, self._wants)
            awake = directory.make_flag(stem)  # before the socket: a ringer that lists it finds it
            made = self._make_socket(name)
            if made is None:
                if awake is not None:
                    awake.close()
                directory.remove(name)
                return False
            sock, ino = made
            with self._lock:  # the flag is set before any waiter can see the doorbell bound
                self._awake = awake
                self.raise_flag(waiting())
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            self._sock, self.name, self._ino, self._poller = sock, name, ino, poller
            self._stem = stem
            self.address = directory.address_of(name)
            self._holder = [name]
            self._finalizer = weakref.finalize(
                self, _unlink_doorbell, directory.path, self._holder, os.getpid()
            )
        directory.bump_generation()
        return True

    def _make_socket(self, name: str) -> tuple[socket.socket, int] | None:
        """A socket bound as ``name`` (0600) and the file's inode; None if it cannot be made."""
        directory = self._directory
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(directory.address_of(name))
            os.chmod(name, 0o600, dir_fd=directory.fd)
            return sock, os.stat(name, dir_fd=directory.fd).st_ino
        except OSError:
            sock.close()
            return None

    def raise_flag(self, up: bool) -> None:
        """Say whether a thread of this process waits (under the waiters' lock)."""
        awake = self._awake
        if awake is not None:
            awake[0] = 1 if up else 0

    def unbind(self) -> None:
        """Close the socket and remove the doorbell's files."""
        sock, self._sock = self._sock, None
        self.address = None
        awake, self._awake = self._awake, None
        if awake is not None:
            awake.close()
        self.remove_files()
        if sock is not None:
            sock.close()
            self._directory.bump_generation()

    def remove_files(self) -> None:
        """Remove the doorbell's files now (the socket stays open until :meth:`unbind`)."""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()

    def forget(self) -> None:
        """In a forked child: let go of the parent's doorbell without touching it."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._sock = None
        self._awake = None  # the parent's: never written from here

    def advertise(self, tag: bytes | None) -> None:
        """Make the doorbell's name ask for ``tag`` too (None: every ring), before the caller's
        first look, so a ringer that reads the new generation rings us. The interest only
        grows: a process keeps being rung for an agent it waited for once (renames stay rare)."""
        if self._wants_any or (tag is not None and tag in self._wants):
            return
        directory = self._directory
        with directory.lock:
            if tag is None or len(self._wants) >= MAX_ADVERTISED:
                self._wants_any = True
            else:
                self._wants.add(tag)
            old = self.name
            if self._sock is None or old is None:
                return  # bind names it
            new = doorbell_name(self._stem, self._wants_any, self._wants)
            try:
                os.rename(os.path.join(directory.path, old), os.path.join(directory.path, new))
            except OSError:
                return  # deleted under us: the fallback poll makes a new one
            self.name = self._holder[0] = new
            self.address = directory.address_of(new)
        directory.bump_generation()

    def intact(self) -> bool:
        """False when the doorbell's file was removed or replaced (then make a new one)."""
        name = self.name
        if name is None or self._directory.fd is None:
            return False
        try:
            return os.stat(os.path.join(self._directory.path, name)).st_ino == self._ino
        except OSError:
            return False

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a ring; True when one is queued."""
        return bool(self._poller.poll(max(0.0, timeout) * 1000))  # type: ignore[union-attr]

    def drain(self) -> tuple[int, set[bytes] | None]:
        """Read every pending ring: (how many were read, their tags or None for "anything")."""
        sock, poller = self._sock, self._poller
        tags: set[bytes] | None = set()
        got = 0
        while sock is not None:
            try:
                data = sock.recv(4096)
            except OSError:  # BlockingIOError (empty), InterruptedError, closed
                break
            got += 1
            if got >= OVERFLOW:
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

    def kick(self, payload: bytes) -> bool:
        """Ring this doorbell (this process's own commit). False when there is none to ring:
        the caller then wakes its waiters directly."""
        sender, address = self._directory.sender, self.address
        if sender is not None and address is not None:
            try:
                sender.sendto(payload, address)
                return True
            except BlockingIOError:
                return True  # full: its reader will count the overflow as "anything"
            except OSError:
                pass
        return False
