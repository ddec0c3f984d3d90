"""Ringing the other processes' doorbells after a commit.

The ringer keeps a listing of the doorbells in the directory and re-lists only when the shared
generation counter moved (a doorbell was made, renamed or removed) or ``REFRESH_EVERY`` seconds
passed (the directory may have been recreated): with nobody waiting, ringing costs a memory
read and no system call. A process is rung only when its doorbell's name asks for one of the
agents the commit concerns and its awake flag is up (one of its threads waits now); a busy
process's next wait checks the database before sleeping, so it loses nothing.
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from typing import NamedTuple

from . import doorbell  # REFRESH_EVERY is read through it, so a test's setting applies
from .doorbell import COUNTER, OPEN_FLAGS, WAKE, Doorbell, DoorbellDirectory, own_file, stem_of

__all__ = ["Peer", "Ringer", "interest_of", "owner_alive"]


def interest_of(name: str) -> frozenset[bytes] | None:
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


def owner_alive(name: str) -> bool:
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


class Peer(NamedTuple):
    """Another process's doorbell, as the last listing found it."""

    name: str
    address: str
    wants: frozenset[bytes] | None  # the tags it asks for; None: every ring
    awake: mmap.mmap | None  # its awake flag; None: it has none, ring it always


class Ringer:
    """The other processes' doorbells in ``directory`` (all but ``own``), and their ringing."""

    def __init__(self, directory: DoorbellDirectory, own: Doorbell) -> None:
        self._directory = directory
        self._own = own
        self._seen_gen = -1
        self.peers: list[Peer] = []
        self._flags: dict[str, mmap.mmap] = {}  # the peers' awake flags, by stem
        self._refresh_at = 0.0

    def listing(self) -> list[Peer] | None:
        """The doorbells to consider ringing, re-listed if stale; None while the directory is
        not open."""
        counter = self._directory.counter
        if counter is None:
            return None
        # Reading the shared counter is a memory read: no system call unless someone waits.
        current = COUNTER.unpack_from(counter, 0)[0]
        if current != self._seen_gen or time.monotonic() >= self._refresh_at:
            self._refresh(current)
        return self.peers

    def reset(self) -> None:
        """Forget the listing (the directory is being released: its addresses die with it)."""
        self.peers = []
        self._seen_gen = -1
        flags, self._flags = self._flags, {}
        for flag in flags.values():
            flag.close()

    def ring(self, peers: list[Peer], tags: set[bytes] | None, payload: bytes) -> None:
        """Send ``payload`` to each of ``peers`` that waits now for one of ``tags`` (None:
        anything may have changed). A doorbell nobody is bound to any more is removed."""
        sender = self._directory.sender
        if sender is None:
            return
        gone: list[Peer] = []
        for peer in peers:
            _, address, wants, awake = peer
            if tags is not None and wants is not None and wants.isdisjoint(tags):
                continue  # a process that waits for none of these agents sleeps on
            if awake is not None and not awake[0]:
                continue  # nobody there waits now: its next wait checks the database first
            try:
                sender.sendto(payload, address)
            except BlockingIOError:
                pass  # full: its reader will see the overflow and treat it as "anything"
            except ConnectionRefusedError:
                gone.append(peer)  # nobody bound: the process that made it died
                self._directory.remove(peer.name)
            except OSError:
                gone.append(peer)  # removed meanwhile (or not ours to ring): skip until refresh
        if gone:
            self.peers = [peer for peer in peers if peer not in gone]

    def _refresh(self, current: int) -> None:
        """Re-list the doorbells (the generation changed, or REFRESH_EVERY passed)."""
        self._refresh_at = time.monotonic() + doorbell.REFRESH_EVERY
        directory = self._directory
        with directory.lock:
            names = directory.listing()
            if names is None:
                self.reset()  # the directory was released with it
                return
            self._seen_gen = current
            own = self._own.name
            peers = []
            flags: dict[str, mmap.mmap] = {}
            for name in names:
                if name.endswith(WAKE) and not owner_alive(name):
                    directory.remove(name)  # the flag of a process that died while binding
                    continue
                if not name.endswith(".sock") or name == own:
                    continue
                if not self._is_own_socket(name):
                    continue  # rung only if it is this user's socket: nobody else hears rings
                if not owner_alive(name):
                    directory.remove(name)  # left by a process that died without closing
                    continue
                stem = stem_of(name)
                flag = self._flags.pop(stem, None) or self._map_flag(stem)
                if flag is not None:
                    flags[stem] = flag
                peers.append(Peer(name, directory.address_of(name), interest_of(name), flag))
            for gone in self._flags.values():
                gone.close()
            self._flags = flags
            self.peers = peers

    def _is_own_socket(self, name: str) -> bool:
        """Whether ``name`` is a socket of this user (nobody else may hear rings)."""
        try:
            info = os.stat(name, dir_fd=self._directory.fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid()

    def _map_flag(self, stem: str) -> mmap.mmap | None:
        """Map another process's awake flag for reading (None: it has none, ring it always).

        Only a regular file of this user that already holds its byte is mapped: reading a
        mapping past the end of a file that was cut short kills the process (SIGBUS), and in
        our 0700 directory only this user can cut it."""
        try:
            fd = os.open(stem + WAKE, os.O_RDONLY | OPEN_FLAGS, dir_fd=self._directory.fd)
        except OSError:
            return None
        try:
            if own_file(fd).st_size < 1:
                return None  # empty (being made): ring it
            return mmap.mmap(fd, 1, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
