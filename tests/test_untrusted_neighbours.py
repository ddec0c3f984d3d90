"""SPEC 2.1: files and directories planted by others are never trusted. We run as root, so
"another user" is uid 65534 ('nobody'): planted files are chowned to it.

- ``<db>.doorbells`` is used only when it is a real directory of this user with mode 0700; a
  file there is opened without following links or blocking, and only this user's regular
  files are mapped and only this user's sockets rung. Otherwise waiters poll and one WARNING
  is logged; the bus never writes through a link, blocks or crashes (SIGBUS).
- A database, -journal, -wal or -shm of another user is refused, naming the owner.
- What the bus creates is 0600 (directories 0700) under any umask.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import probes
import pytest
from conftest import file_sha256
from test_foreign_files import NOBODY, one_line_error, run_as, run_cli, shared_dir, snapshot

import sqlbus

__all__ = ["shared_dir"]  # a fixture, imported for the tests that run as another user

NOTIFY = ["send", "--from", "alice", "--to", "bob", "--type", "notification"]


def doorbell_dir(db: Path) -> Path:
    return probes.doorbell_dir(db)


def plant_doorbells(db: Path, *, owner: int = NOBODY, mode: int = 0o777) -> Path:
    """Make ``<db>.doorbells`` as someone else would: another owner, or a looser mode."""
    directory = doorbell_dir(db)
    directory.mkdir()
    directory.chmod(mode)
    os.chown(directory, owner, NOBODY if owner == NOBODY else 0)
    return directory


def make_doorbells(db: Path, kind: str) -> Path:
    """A doorbell directory that is another user's ("planted") or this user's 0700 ("ours")."""
    if kind == "planted":
        return plant_doorbells(db)
    directory = doorbell_dir(db)
    directory.mkdir(mode=0o700)
    return directory


def bound_socket(path: Path, owner: int | None = None) -> socket.socket:
    """Bind a datagram socket at ``path`` through /proc/self/fd (as the bus does): a tmp_path
    can make the full path longer than the 108 bytes AF_UNIX takes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)
    if owner is not None:
        os.chown(path, owner, owner)
    return sock


def doorbell_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sqlbus" and r.levelno == logging.WARNING and "doorbell" in r.getMessage()]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "team.db"
    sqlbus.connect(path).close()
    yield path


# A publisher in a process of its own: publish (which rings, mapping what it maps), say
# "ready", wait for a line on stdin, publish again, exit 0. A SIGBUS shows in its exit code.
PUBLISHER = """
import sys, sqlbus
bus = sqlbus.connect(sys.argv[1])
alice = bus.agent("alice")
alice.publish("bob", "notification", {"n": 1})
print("ready", flush=True)
sys.stdin.readline()
alice.publish("bob", "notification", {"n": 2})
bus.close()
"""


def publish_around(db: Path, between) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.stderr
        between()
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------
# The doorbell directory


@pytest.mark.parametrize("kind", ["planted", "ours"])
def test_a_generation_symlink_in_the_doorbell_directory_is_never_written_through(
    db: Path, kind: str
) -> None:
    secret = db.parent / "secret"
    secret.write_bytes(b"root's own file, mode 0600")
    secret.chmod(0o600)
    directory = make_doorbells(db, kind)
    (directory / probes.GENERATION).symlink_to(secret)
    with sqlbus.connect(db) as bus:
        alice, bob = bus.agent("alice"), bus.agent("bob")
        assert bob.receive(wait=0.1) == []  # a waiter binds a doorbell and leaves
        alice.publish("bob", "notification", {"n": 1})  # a ringer
        assert len(bob.receive(wait=0.1)) == 1
    assert secret.read_bytes() == b"root's own file, mode 0600"


def test_a_symlinked_doorbell_directory_is_not_used_and_nothing_is_made_where_it_points(
    db: Path,
) -> None:
    elsewhere = db.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    doorbell_dir(db).symlink_to(elsewhere)
    with sqlbus.connect(db) as bus:
        bus.agent("bob").receive(wait=0.1)
        bus.agent("alice").publish("bob", "notification")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("owner, mode", [(NOBODY, 0o700), (0, 0o755), (0, 0o777)])
def test_a_doorbell_directory_not_ours_alone_is_left_empty_and_waiters_still_wake(
    db: Path, caplog: pytest.LogCaptureFixture, owner: int, mode: int
) -> None:
    directory = plant_doorbells(db, owner=owner, mode=mode)
    caplog.set_level(logging.WARNING, logger="sqlbus")
    received: list[object] = []
    with sqlbus.connect(db) as bus:
        bob = bus.agent("bob")

        def wait_for_three() -> None:
            while len(received) < 3:
                received.extend(d.message.payload for d in bob.receive(wait=30.0))

        waiter = threading.Thread(target=wait_for_three)
        waiter.start()
        for n in range(3):  # from other processes: only the fallback poll can see them
            proc = subprocess.run([sys.executable, "-m", "sqlbus.cli", "--db", str(db), *NOTIFY,
                                   "--payload", f'{{"n": {n}}}'], capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
        waiter.join(timeout=60)
        assert not waiter.is_alive()
    assert sorted(p["n"] for p in received) == [0, 1, 2]  # type: ignore[index]
    assert list(directory.iterdir()) == []  # nothing made in it, by anyone
    assert len(doorbell_warnings(caplog)) == 1, doorbell_warnings(caplog)


def test_a_truncated_generation_file_of_another_user_does_not_kill_the_publisher(
    db: Path,
) -> None:
    directory = plant_doorbells(db)
    generation = directory / probes.GENERATION
    generation.write_bytes(bytes(8))
    generation.chmod(0o666)
    os.chown(generation, NOBODY, NOBODY)
    done = publish_around(db, lambda: os.truncate(generation, 0))
    assert done.returncode == 0, (done.returncode, done.stderr)  # SIGBUS: -7


def test_a_truncated_awake_flag_of_another_user_does_not_kill_the_publisher(db: Path) -> None:
    directory = make_doorbells(db, "ours")
    stem = f"{os.getpid()}-{'a' * 12}"  # a live pid: the doorbell is not removed as stale
    listener = bound_socket(directory / f"{stem}.any.sock")
    flag = directory / f"{stem}{probes.WAKE}"
    flag.write_bytes(b"\x01")
    os.chown(flag, NOBODY, NOBODY)
    try:
        done = publish_around(db, lambda: os.truncate(flag, 0))
    finally:
        listener.close()
    assert done.returncode == 0, (done.returncode, done.stderr)  # SIGBUS: -7


@pytest.mark.parametrize("kind", ["planted", "ours"])
def test_a_fifo_named_like_an_awake_flag_does_not_block_a_publisher(db: Path, kind: str) -> None:
    directory = make_doorbells(db, kind)
    stem = "1-aaaaaaaaaaaa"  # pid 1 is alive: the doorbell is never removed as stale
    os.mkfifo(directory / f"{stem}{probes.WAKE}")
    listener = None
    if kind == "planted":
        (directory / f"{stem}.any.sock").touch()
    else:
        listener = bound_socket(directory / f"{stem}.any.sock")
    try:
        proc = subprocess.run([sys.executable, "-m", "sqlbus.cli", "--db", str(db), *NOTIFY],
                              capture_output=True, text=True, timeout=60)
    finally:
        if listener is not None:
            listener.close()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", ["planted", "ours"])
def test_a_socket_of_another_user_in_the_doorbell_directory_hears_no_ring(
    db: Path, kind: str
) -> None:
    directory = make_doorbells(db, kind)
    spy = bound_socket(directory / f"{os.getpid()}-{'b' * 12}.any.sock", owner=NOBODY)
    try:
        with sqlbus.connect(db) as bus:
            alice = bus.agent("alice")
            for n in range(3):
                alice.publish("bob", "notification", {"n": n})
        with pytest.raises(BlockingIOError):
            spy.recv(4096)
    finally:
        spy.close()


def test_our_own_sockets_are_still_rung_in_our_own_directory(db: Path) -> None:
    # The checks keep rings for this user's processes: a doorbell of ours hears them.
    directory = make_doorbells(db, "ours")
    ours = bound_socket(directory / f"{os.getpid()}-{'c' * 12}.any.sock")
    try:
        with sqlbus.connect(db) as bus:
            bus.agent("alice").publish("bob", "notification")
        assert ours.recv(4096) is not None
    finally:
        ours.close()


# ---------------------------------------------------------------------------------------------
# A database, -journal, -wal or -shm of another user


def test_an_empty_database_file_planted_by_another_user_is_refused_naming_the_owner(
    tmp_path: Path,
) -> None:
    db = tmp_path / "team.db"
    db.touch()
    db.chmod(0o666)
    os.chown(db, NOBODY, NOBODY)
    with pytest.raises(sqlbus.DatabaseError, match=r"owned by nobody \(uid 65534\)"):
        sqlbus.connect(db)
    line = one_line_error(run_cli(db, "init"))
    assert "nobody" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.db"]
    assert db.stat().st_size == 0


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_wal_shm_or_journal_planted_by_another_user_is_refused_and_left_alone(
    db: Path, suffix: str
) -> None:
    planted = Path(f"{db}{suffix}")
    planted.write_bytes(b"")
    planted.chmod(0o666)
    os.chown(planted, NOBODY, NOBODY)
    before = snapshot(db.parent)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        with sqlbus.connect(db) as bus:
            bus.agent("alice").publish("bob", "notification", {"secret": "payload"})
    assert f"{planted} is owned by nobody" in str(caught.value)
    assert snapshot(db.parent) == before
    assert planted.read_bytes() == b""


def test_a_planted_wal_is_refused_by_an_unprivileged_user_too(shared_dir: Path) -> None:
    home = shared_dir / "shared"
    home.mkdir(mode=0o1777)
    home.chmod(0o1777)  # like /tmp: anyone may add files, only their owner may remove them
    db = home / "team.db"
    assert run_as(NOBODY, lambda: sqlbus.connect(db).close()) == "None"
    for suffix in ("-wal", "-shm"):  # planted by root, readable and writable by everyone
        Path(f"{db}{suffix}").touch()
        Path(f"{db}{suffix}").chmod(0o666)
    out = run_as(NOBODY, lambda: sqlbus.connect(db).agent("alice").publish(
        "bob", "notification", {"secret": "payload"}))
    assert out.startswith("DatabaseError: ") and "owned by root (uid 0)" in out, out
    for suffix in ("-wal", "-shm"):
        assert Path(f"{db}{suffix}").read_bytes() == b""


def test_a_symlink_of_another_user_to_our_database_is_refused(db: Path) -> None:
    link = db.parent / "link.db"
    link.symlink_to(db)
    os.lchown(link, NOBODY, NOBODY)
    before = file_sha256(db)
    with pytest.raises(sqlbus.DatabaseError, match="symbolic link is owned by nobody"):
        sqlbus.connect(link)
    assert file_sha256(db) == before


def test_a_symlink_of_our_own_to_our_database_opens_it(db: Path) -> None:
    link = db.parent / "link.db"
    link.symlink_to(db)
    with sqlbus.connect(link) as bus:
        bus.agent("alice").publish("bob", "notification", {"n": 1})
    with sqlbus.connect(db) as bus:
        assert len(bus.agent("bob").receive()) == 1


# ---------------------------------------------------------------------------------------------
# Modes under any umask


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_what_the_bus_creates_is_0600_and_its_directories_0700_under_any_umask(
    tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        db = tmp_path / "team.db"
        bus = sqlbus.connect(db)
        try:
            bob = bus.agent("bob")
            waiter = threading.Thread(target=lambda: bob.receive(wait=30.0))
            waiter.start()
            while not list(doorbell_dir(db).glob("*.sock")):  # bob waits: a doorbell exists
                threading.Event().wait(0.01)
            bus.backup(tmp_path / "copy.db")
            modes = {p: (p.is_dir(), stat.S_IMODE(os.lstat(p).st_mode)) for p in tmp_path.rglob("*")}
            bus.agent("alice").publish("bob", "notification")
            waiter.join(timeout=60)
        finally:
            bus.close()
    finally:
        os.umask(old)
    names = {p.name for p in modes}
    assert {"team.db", "team.db-wal", "team.db-shm", "team.db.doorbells", "generation",
            "copy.db"} <= names, names
    assert any(name.endswith(probes.WAKE) for name in names), names
    for path, (is_dir, mode) in modes.items():
        assert mode == (0o700 if is_dir else 0o600), f"{path} is {oct(mode)}"
