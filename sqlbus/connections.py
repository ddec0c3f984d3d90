"""Who is inside SQLite, and what a forked child does with the connections it inherits.

SQLite keeps, per process, one record per open database file (keyed by device and inode) that
every connection to that file shares: which POSIX locks the process holds on the file and on
its ``-shm``, how many connections hold each, and the mutexes that guard those books. A forked
child inherits the books but not the locks (POSIX locks belong to a process), and inherits
the mutexes in whatever state the parent's threads left them. Two things follow:

- A thread of the parent that is inside SQLite at the moment of the fork may hold one of its
  mutexes (the memory allocator's, the file record's), and in the child nobody ever releases
  it: the child's first statement, or closing a connection, hangs for ever. So a fork waits
  until no thread of this process is inside SQLite on a bus connection (:data:`inside`, a
  gate every use of a connection passes; the busy handler steps out while it sleeps, so a
  fork never waits for another writer).
- A connection that the parent holds inside a transaction (an open ``agent.transaction()``
  block, say) is booked as holding the WAL's write lock, so every connection the child opens
  on the file is refused that lock by its own books ("database is locked"), and a connection
  booked as holding a shared lock makes the child's new connections skip taking a real one
  (then the parent, closing last, would delete the WAL under the child). The child must not
  roll such a connection back (the rollback would edit the WAL index the parent is still
  writing) nor even close it (closing runs that rollback, and closing an idle one goes
  through the same books). So the child never calls into an inherited connection again: it
  only takes the inherited connections out of the books (:func:`release_inherited`: the
  shared-memory handle is let go and the file lock booked as released, straight through the
  VFS methods, which touch nothing on disk and nothing shared) and parks the connection
  objects for ever (never deallocated, so never closed). Its new connections then take real
  locks of their own, as in a fresh process.

The same gate lets ``Bus.close()`` close connections that other threads may be using: it waits
until none of them is inside SQLite (:func:`exclusive`), and their next call finds the bus
closed.
"""

from __future__ import annotations

import ctypes
import os
import threading

import apsw

__all__ = ["inside", "exclusive", "step_out", "close", "file_pointer", "release_inherited",
           "park", "generation"]

_lock = threading.Lock()
_changed = threading.Condition(_lock)
_inside = 0  # threads of this process inside SQLite on a bus connection
_held = False  # a fork or a close waits for them to leave, and keeps new ones out meanwhile
_turn = threading.Lock()  # one fork or close at a time
_depth = threading.local()  # per thread: how deep in the gate (uses nest)
# Bumped in each forked child: a connection opened under an older generation is the parent's.
generation = 0


class _Inside:
    """``with inside:`` around every use of a bus connection (reentrant within a thread)."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _inside
        depth = getattr(_depth, "n", 0)
        if depth:
            _depth.n = depth + 1
            return
        with _lock:
            while _held:
                _changed.wait()
            _inside += 1
        _depth.n = 1

    def __exit__(self, *exc: object) -> None:
        global _inside
        depth = _depth.n - 1
        _depth.n = depth
        if depth == 0:
            with _lock:
                _inside -= 1
                if _held:
                    _changed.notify_all()


inside = _Inside()


class step_out:  # noqa: N801 - used like the context manager it is
    """``with step_out():`` inside the gate, for a wait that holds no SQLite mutex (the busy
    handler's sleep): a fork or a close may go ahead meanwhile."""

    __slots__ = ("depth",)

    def __enter__(self) -> None:
        global _inside
        self.depth = getattr(_depth, "n", 0)
        if self.depth:
            _depth.n = 0
            with _lock:
                _inside -= 1
                if _held:
                    _changed.notify_all()

    def __exit__(self, *exc: object) -> None:
        global _inside
        if self.depth:
            with _lock:
                while _held:
                    _changed.wait()
                _inside += 1
            _depth.n = self.depth


def _hold() -> None:
    """Wait until no other thread is inside SQLite, and keep them out until :func:`_let_go`."""
    global _held
    _turn.acquire()
    mine = 1 if getattr(_depth, "n", 0) else 0
    with _lock:
        _held = True
        while _inside > mine:
            _changed.wait()


def _let_go() -> None:
    global _held
    with _lock:
        _held = False
        _changed.notify_all()
    _turn.release()


class exclusive:  # noqa: N801 - used like the context manager it is
    """``with exclusive():`` no other thread of this process is inside SQLite meanwhile."""

    __slots__ = ()

    def __enter__(self) -> None:
        _hold()

    def __exit__(self, *exc: object) -> None:
        _let_go()


def close(conn: apsw.Connection) -> None:
    """Close a connection that no thread uses any more. Safe in a thread's last moments (its
    thread-local storage being torn down): it touches no thread-local state."""
    global _inside
    with _lock:
        while _held:
            _changed.wait()
        _inside += 1
    try:
        conn.close()
    except apsw.Error:
        pass
    finally:
        with _lock:
            _inside -= 1
            if _held:
                _changed.notify_all()


def _in_child() -> None:
    """After a fork, in the child: only this thread exists; fresh locks, nobody inside."""
    global _lock, _changed, _inside, _held, _turn, generation
    _lock = threading.Lock()
    _changed = threading.Condition(_lock)
    _turn = threading.Lock()
    _held = False
    _inside = 1 if getattr(_depth, "n", 0) else 0
    generation += 1


os.register_at_fork(before=_hold, after_in_parent=_let_go, after_in_child=_in_child)


# -- inherited connections ---------------------------------------------------------------------
# sqlite3_file starts with a pointer to its sqlite3_io_methods: an int (iVersion, padded to a
# pointer) and then function pointers in a fixed, documented order (SQLite's stable ABI).
_X_UNLOCK = 8
_X_SHM_UNMAP = 16
_UNLOCK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_SHM_UNMAP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_NO_LOCK = 0


def file_pointer(conn: apsw.Connection) -> int:
    """The address of ``conn``'s main database file object (``sqlite3_file*``), read once at
    open so a forked child never has to ask the connection itself."""
    pointer = ctypes.c_void_p()
    conn.file_control("main", apsw.SQLITE_FCNTL_FILE_POINTER, ctypes.addressof(pointer))
    return pointer.value or 0


def release_inherited(file: int) -> None:
    """In a forked child: take an inherited connection's file out of SQLite's books of this
    process (its shared-memory handle let go, its file lock booked as released). Nothing on
    disk or in shared memory changes: the child holds no lock to release, and the last
    handle's going only unmaps the WAL index from the child and closes the child's copy of
    the ``-shm`` descriptor."""
    if not file:
        return
    methods = ctypes.cast(file, ctypes.POINTER(ctypes.c_void_p))[0]
    if not methods:
        return  # the file was closed
    table = ctypes.cast(methods, ctypes.POINTER(ctypes.c_void_p))
    if ctypes.cast(methods, ctypes.POINTER(ctypes.c_int))[0] >= 2 and table[_X_SHM_UNMAP]:
        _SHM_UNMAP(table[_X_SHM_UNMAP])(file, 0)
    _UNLOCK(table[_X_UNLOCK])(file, _NO_LOCK)


def park(conn: apsw.Connection) -> None:
    """Keep an inherited connection object alive for ever: deallocating it would close it,
    and closing it would roll back a transaction that is the parent's."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
