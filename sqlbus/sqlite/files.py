"""The database file on disk: who may open it, making a new one, and what an SQLite error means
for the user, in one line."""

from __future__ import annotations

import os
import pwd
import stat as stat_module

import apsw

from ..errors import DatabaseError


def create_file(path: str, mode: int) -> bool:
    """Create ``path`` with permissions ``mode`` (whatever the umask) unless something is there;
    True when this call created it."""
    if os.path.lexists(path):
        return False
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise DatabaseError(f"cannot create {path}: directory {directory} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False  # another process created it first
    except OSError as exc:
        raise DatabaseError(f"cannot create {path}: {exc.strerror}{read_only_directory(path)}") from exc
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_paths(path: str) -> None:
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
                f"{path}: {what} is owned by {owner_name(info.st_uid)}, not by this user "
                f"({owner_name(user)}); refusing to open it"
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
                f"{real}{suffix} is owned by {owner_name(info.st_uid)}, not by this user "
                f"({owner_name(user)}); refusing to open {path}"
            )


def read_only_directory(path: str) -> str:
    """``"; its directory is read-only"`` when this user cannot make files beside ``path``."""
    directory = os.path.dirname(path) or "."
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        return f"; its directory {directory} is read-only"
    return ""


def database_error(path: str, busy_timeout: float, exc: apsw.Error) -> DatabaseError:
    """Say in one line what an apsw error means for the user."""
    if isinstance(exc, apsw.BusyError):
        return DatabaseError(
            f"{path}: database is locked: another writer held it for more than "
            f"busy_timeout={busy_timeout}s; nothing was written"
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
        if read_only_directory(path):
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


def file_sizes(path: str) -> tuple[int, int]:
    """(database bytes, WAL bytes) of the file at ``path`` (0 for a missing WAL)."""

    def size(name: str) -> int:
        try:
            return os.path.getsize(name)
        except OSError:
            return 0

    return size(path), size(path + "-wal")
