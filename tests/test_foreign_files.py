"""SPEC 2.1, 2.2 and 10: files that are not ours are never changed. Another application's
SQLite file (a user_version, a table, an application_id of its own, a WAL not yet
checkpointed) is refused by ``connect`` and by every CLI command before SQLite opens it, and
it, its -wal and its -shm stay byte for byte the same; a path that is not a regular file is
refused with nothing created beside it; backup refuses every name SQLite would use; a
read-only file and a read-only directory are each reported as such."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest
from click.testing import CliRunner
from conftest import file_sha256

import sqlbus
from sqlbus.cli import cli

NOBODY = 65534  # uid and gid of the unprivileged user 'nobody'


def run_cli(db: Path | str, *args: str):
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sqlbus: error: "), result.stderr
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry of ``directory`` with the sha256 of its bytes (a symlink by its target)."""
    return {
        p.name: file_sha256(p) if p.is_file() and not p.is_symlink() else f"-> {os.readlink(p)}"
        if p.is_symlink() else "dir"
        for p in directory.iterdir()
    }


def run_as(uid: int, action: Callable[[], object]) -> str:
    """Run ``action`` in a forked child as ``uid`` (gid 'nogroup', no other groups); return
    what it returned, or ``ExceptionName: text`` of what it raised. Forked, not executed: the
    interpreter lives where that user cannot read."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(uid)
            try:
                out = str(action())
            except BaseException as exc:
                out = f"{type(exc).__name__}: {exc}"
            os.write(write, out.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that other users can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="sqlbus-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.rglob("*"):
            if child.is_dir() and not child.is_symlink():
                child.chmod(0o755)
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# Another application's SQLite file


def _sqlite(path: Path, *statements: str) -> apsw.Connection:
    conn = apsw.Connection(str(path))
    for statement in statements:
        conn.execute(statement).fetchall()
    return conn


def make_foreign(kind: str, path: Path) -> None:
    if kind == "user_version":  # nothing in it but a user_version of its own
        _sqlite(path, "PRAGMA user_version = 7").close()
    elif kind == "table":
        _sqlite(path, "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)",
                "INSERT INTO invoices (total) VALUES (9.5)").close()
    elif kind == "application_id":
        _sqlite(path, "PRAGMA application_id = 305419896").close()
    else:
        # WAL mode, with everything after the switch still in the WAL: the file's own page 1
        # is blank; the table (or the user_version) is only in the -wal. The files are copied
        # while the writer has them open, as a backup tool or a crash would leave them.
        writer = path.with_name("writer.db")
        statements = (
            ("CREATE TABLE t (x)", "INSERT INTO t VALUES (1)") if kind == "wal-table"
            else ("PRAGMA user_version = 7",)
        )
        conn = _sqlite(writer, "PRAGMA journal_mode = WAL", "PRAGMA wal_autocheckpoint = 0",
                       *statements)
        try:
            for suffix in ("", "-wal", "-shm"):
                shutil.copyfile(f"{writer}{suffix}", f"{path}{suffix}")
        finally:
            conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{writer}{suffix}").unlink(missing_ok=True)
        assert os.path.getsize(f"{path}-wal") > 32  # frames not yet checkpointed


FOREIGN = ["user_version", "table", "application_id", "wal-table", "wal-user_version"]

# Every command, the read-only ones first (SPEC 10: they never create or change a file).
READ_ONLY = 10
COMMANDS = [
    ["stats"], ["agents"], ["peek", "bob"], ["metrics"], ["check"], ["state", "list"],
    ["state", "get", "k"], ["dead-letters", "list"], ["dead-letters", "show", "1"],
    ["tail", "--timeout", "0"],
    ["init"], ["send", "--from", "a", "--to", "b", "--type", "notification"],
    ["state", "set", "k", "1"], ["prune"], ["dead-letters", "purge", "--all"],
    ["dead-letters", "requeue", "--all"], ["vacuum"], ["backup", "BACKUP"],
]


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_sqlite_file_is_refused_by_connect_and_stays_byte_for_byte_the_same(
    tmp_path: Path, kind: str
) -> None:
    db = tmp_path / "other.db"
    make_foreign(kind, db)
    before = snapshot(tmp_path)
    for _ in range(2):  # the second time finds exactly what the first left
        with pytest.raises(sqlbus.DatabaseError) as caught:
            sqlbus.connect(db)
        text = str(caught.value)
        assert "not a sqlbus database" in text or "another application" in text, text
        assert snapshot(tmp_path) == before


def test_the_refusal_says_what_makes_the_file_foreign(tmp_path: Path) -> None:
    reasons = {"user_version": "user_version 7", "table": "it has tables",
               "application_id": "application_id 0x12345678", "wal-table": "it has tables",
               "wal-user_version": "user_version 7"}
    for kind, reason in reasons.items():
        directory = tmp_path / kind
        directory.mkdir()
        make_foreign(kind, directory / "x.db")
        with pytest.raises(sqlbus.DatabaseError, match=reason):
            sqlbus.connect(directory / "x.db")


@pytest.mark.parametrize("kind", FOREIGN)
def test_no_cli_command_changes_a_foreign_sqlite_file_or_its_wal(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "other.db"
    make_foreign(kind, db)
    before = snapshot(tmp_path)
    for number, args in enumerate(COMMANDS):
        args = [str(tmp_path / "copy.db") if a == "BACKUP" else a for a in args]
        line = one_line_error(run_cli(db, *args))
        if number < READ_ONLY:  # (a destructive command may first ask for confirmation)
            assert "not a sqlbus database" in line or "another application" in line, line
        assert snapshot(tmp_path) == before, args


def test_read_only_commands_do_not_make_a_database_of_an_empty_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "blank.db"
    _sqlite(db, "PRAGMA journal_mode = WAL").close()  # a SQLite file, no tables, no marks
    before = snapshot(tmp_path)
    for args in COMMANDS[:READ_ONLY]:
        line = one_line_error(run_cli(db, *args))
        assert "not a sqlbus database" in line and "sqlbus init" in line, line
        assert snapshot(tmp_path) == before, args
    assert run_cli(db, "init").exit_code == 0  # init is the command that makes one


def test_read_only_commands_never_create_a_file(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    for args in COMMANDS[:READ_ONLY]:
        one_line_error(run_cli(db, *args))
    assert list(tmp_path.iterdir()) == []


def test_a_healthy_sqlbus_database_whose_schema_is_only_in_the_wal_opens(tmp_path: Path) -> None:
    # A new database before its first checkpoint: the schema is in the -wal only, as it is
    # when another process has just made it. It is ours, not a blank or foreign file.
    db = tmp_path / "team.db"
    first = sqlbus.connect(db)
    try:
        first.agent("alice").publish("bob", "notification", {"n": 1})
        copy = tmp_path / "copy"
        copy.mkdir()
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(f"{db}{suffix}", copy / f"team.db{suffix}")
    finally:
        first.close()
    with open(copy / "team.db", "rb") as handle:
        assert handle.read(100)[68:72] == b"\0\0\0\0"  # the file's page 1: no mark yet
    with sqlbus.connect(copy / "team.db") as bus:
        assert [d.message.payload for d in bus.agent("bob").receive()] == [{"n": 1}]


# ---------------------------------------------------------------------------------------------
# Paths that are not regular files


def test_dev_null_is_refused_and_nothing_is_created_beside_it(tmp_path: Path) -> None:
    journal = Path("/dev/null-journal")
    assert not journal.exists()
    try:
        with pytest.raises(sqlbus.DatabaseError, match="not a regular file"):
            sqlbus.connect("/dev/null")
        line = one_line_error(run_cli("/dev/null", "stats"))
        assert "not a regular file" in line
        assert not journal.exists() and not Path("/dev/null-wal").exists()
    finally:
        for suffix in ("-journal", "-wal", "-shm"):
            Path(f"/dev/null{suffix}").unlink(missing_ok=True)


def test_a_fifo_as_the_database_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    code = f"import sqlbus\ntry:\n    sqlbus.connect({str(fifo)!r})\nexcept sqlbus.DatabaseError as e:\n    print(e)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "not a regular file" in proc.stdout, proc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.db"]


def test_a_dangling_symlink_is_a_database_error_and_its_target_is_not_created(
    tmp_path: Path,
) -> None:
    link = tmp_path / "team.db"
    link.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(sqlbus.DatabaseError, match="dangling symbolic link"):
        sqlbus.connect(link)
    for args in (["stats"], ["init"]):
        one_line_error(run_cli(link, *args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.db"]


def test_a_directory_as_the_database_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "team.db").mkdir()
    with pytest.raises(sqlbus.DatabaseError, match="is a directory"):
        sqlbus.connect(tmp_path / "team.db")
    one_line_error(run_cli(tmp_path / "team.db", "stats"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.db"]


# ---------------------------------------------------------------------------------------------
# Backup refuses every name SQLite would use


@pytest.mark.parametrize("planted", ["-journal", "-wal", "-shm", "symlink", "dangling symlink"])
def test_backup_refuses_a_destination_whose_files_exist_and_leaves_them_alone(
    tmp_path: Path, planted: str
) -> None:
    db, dest = tmp_path / "team.db", tmp_path / "out" / "copy.db"
    dest.parent.mkdir()
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"precious")
    if planted == "symlink":
        dest.symlink_to(victim)
    elif planted == "dangling symlink":
        dest.symlink_to(tmp_path / "nowhere.db")
    else:
        Path(f"{dest}{planted}").write_bytes(b"planted")
    before, victim_before = snapshot(dest.parent), file_sha256(victim)
    with sqlbus.connect(db) as bus:
        bus.agent("alice").publish("bob", "notification", {"n": 1})
        with pytest.raises(sqlbus.DatabaseError, match="exists"):
            bus.backup(dest)
    line = one_line_error(run_cli(db, "backup", str(dest)))
    assert "exists" in line and "not an error" not in line, line
    assert snapshot(dest.parent) == before
    assert file_sha256(victim) == victim_before
    assert not (tmp_path / "nowhere.db").exists()


# ---------------------------------------------------------------------------------------------
# Read-only file, read-only directory (as an unprivileged user: root may write anything)


def _make_owned_database(path: Path, uid: int) -> None:
    sqlbus.connect(path).close()
    os.chown(path, uid, NOBODY)
    os.chown(path.parent, uid, NOBODY)


def test_a_read_only_directory_holding_a_writable_file_is_reported_as_a_read_only_directory(
    shared_dir: Path,
) -> None:
    home = shared_dir / "home"
    home.mkdir()
    db = home / "team.db"
    _make_owned_database(db, NOBODY)
    home.chmod(0o555)
    before = snapshot(home)
    out = run_as(NOBODY, lambda: sqlbus.connect(db).agent("alice"))
    assert out.startswith("DatabaseError: "), out
    assert f"directory {home} is read-only" in out, out
    assert f"{db} is read-only" not in out, out
    assert snapshot(home) == before


def test_a_read_only_file_in_a_writable_directory_is_reported_as_a_read_only_file(
    shared_dir: Path,
) -> None:
    home = shared_dir / "home"
    home.mkdir()
    db = home / "team.db"
    _make_owned_database(db, NOBODY)
    db.chmod(0o400)
    out = run_as(NOBODY, lambda: sqlbus.connect(db).agent("alice"))
    assert out.startswith("DatabaseError: "), out
    assert f"{db} is read-only" in out and "directory" not in out, out
