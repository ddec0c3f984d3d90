"""Damaged and foreign files: a clear DatabaseError that says what is wrong and what to do,
and the file is never overwritten (its sha256 is the same afterwards).

What happens with a deleted ``-wal`` is different by nature: nothing in the main file records
that a WAL existed, so the database opens as it was at its last checkpoint. Commits that were
only in the deleted WAL are lost, and what remains is consistent (integrity ok). The test pins
that down.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import apsw
import pytest
from conftest import file_sha256, query

import sqlbus


def make_database(path: Path, messages: int = 300) -> None:
    """A healthy, cleanly closed sqlbus file (the WAL is checkpointed and removed on close)."""
    with sqlbus.connect(path) as bus:
        alice = bus.agent("alice")
        bus.agent("bob")
        alice.publish_many(
            [{"to": "bob", "type": "notification", "payload": {"n": n, "pad": "z" * 300}}
             for n in range(messages)]
        )
        bus.state.set("plan", {"steps": 3})
    assert not os.path.exists(f"{path}-wal")


def use_the_bus(path: Path) -> None:
    """Open the file and touch every kind of row, as an application would."""
    with sqlbus.connect(path) as bus:
        bus.agent("bob").receive(limit=1000)
        bus.sent(limit=10)
        bus.state.get("plan")


def page_size(path: Path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def test_flipped_bytes_in_the_schema_page_give_a_database_error_and_leave_the_file(
    db_path: Path,
) -> None:
    make_database(db_path)
    data = bytearray(db_path.read_bytes())
    # Page 1 holds the 100-byte file header, then the b-tree page of sqlite_schema: damage the
    # cell pointers of that page so the schema cannot be read.
    for offset in range(100 + 8, 100 + 24):
        data[offset] ^= 0xFF
    db_path.write_bytes(bytes(data))
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        use_the_bus(db_path)
    text = str(caught.value)
    assert "corrupt" in text or "malformed" in text, text
    assert "sqlbus check" in text and "backup" in text, text
    assert file_sha256(db_path) == before


def test_a_damaged_message_page_gives_a_database_error_naming_the_corruption(
    db_path: Path,
) -> None:
    make_database(db_path)
    root = query(db_path, "SELECT rootpage FROM sqlite_schema WHERE name = 'message'")[0][0]
    size = page_size(db_path)
    data = bytearray(db_path.read_bytes())
    start = (root - 1) * size
    page_before = bytes(data[start:start + size])
    data[start] = 0x00  # no valid b-tree page type is 0
    data[start + 3:start + 5] = b"\xff\xff"  # and an impossible cell count
    db_path.write_bytes(bytes(data))
    damaged_page = bytes(data[start:start + size])
    assert damaged_page != page_before
    with pytest.raises(sqlbus.DatabaseError) as caught:
        use_the_bus(db_path)
    text = str(caught.value)
    assert "corrupt" in text and "sqlbus check" in text and "backup" in text, text
    # sqlbus did not try to repair or rewrite the damaged page.
    assert db_path.read_bytes()[start:start + size] == damaged_page


@pytest.mark.slow
def test_random_bit_flips_surface_only_as_sqlbus_errors_when_receiving(tmp_path: Path) -> None:
    # SQLite keeps no page checksums, so a flipped bit inside a stored body is not noticed by
    # SQLite itself. Whatever it hits, receiving and acking must fail with sqlbus's own errors
    # (DatabaseError naming the corruption, or LeaseLostError for a row that changed under
    # its lease), never with a decoder's exception. A flip that lands in a payload string and
    # still decodes goes unseen: that is the limit of a file without checksums.
    base = tmp_path / "base.db"
    make_database(base)
    pristine = base.read_bytes()
    size = page_size(base)
    rng = random.Random(6)
    outcomes: Counter[str] = Counter()
    for attempt in range(60):
        data = bytearray(pristine)
        page = rng.randrange(1, len(data) // size)  # not page 1: that one is tested above
        for _ in range(rng.randint(1, 8)):
            data[page * size + rng.randrange(size)] ^= 1 << rng.randrange(8)
        db = tmp_path / f"flip{attempt}.db"
        db.write_bytes(bytes(data))
        try:
            with sqlbus.connect(db) as bus:
                bob = bus.agent("bob")
                while got := bob.receive(limit=100):
                    bob.ack(got)
                bus.state.get("plan")
            outcomes["no error"] += 1
        except sqlbus.DatabaseError:
            # (its text is SQLite's view of the damage: "malformed", "corrupt", or a STRICT
            # type check that found a BLOB in an INTEGER column)
            outcomes["DatabaseError"] += 1
        except sqlbus.LeaseLostError:
            outcomes["LeaseLostError"] += 1
    print("random flips:", dict(outcomes))
    assert outcomes["DatabaseError"] > 0


def test_a_truncated_file_gives_a_database_error_and_is_not_overwritten(db_path: Path) -> None:
    make_database(db_path)
    size = page_size(db_path)
    pages = db_path.stat().st_size // size
    assert pages > 4
    os.truncate(db_path, (pages // 2) * size)
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        use_the_bus(db_path)
    text = str(caught.value)
    assert "truncated" in text and "backup" in text, text
    assert file_sha256(db_path) == before


def test_a_file_cut_in_the_middle_of_a_page_gives_a_database_error(db_path: Path) -> None:
    make_database(db_path)
    os.truncate(db_path, db_path.stat().st_size - 1000)
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        sqlbus.connect(db_path)
    assert "truncated" in str(caught.value), str(caught.value)
    assert file_sha256(db_path) == before


def test_a_deleted_wal_loses_only_uncheckpointed_commits_and_leaves_a_consistent_file(
    db_path: Path,
) -> None:
    # A child commits 100 messages and checkpoints them into the main file, commits 50 more
    # (only in the WAL), then dies without closing. Someone deletes the -wal and -shm files.
    code = textwrap.dedent(
        """
        import os, signal, sys
        sys.path.insert(0, sys.argv[2])
        import sqlbus
        from probes import checkpoint, connection
        bus = sqlbus.connect(sys.argv[1])
        connection(bus).execute("PRAGMA wal_autocheckpoint=0")
        alice = bus.agent("alice"); bus.agent("bob")
        alice.publish_many([{"to": "bob", "type": "notification", "payload": {"n": n}, "ttl": 0}
                            for n in range(100)])
        checkpoint(bus, "TRUNCATE")
        for n in range(100, 150):
            alice.publish("bob", "notification", {"n": n}, ttl=0)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, str(db_path), str(Path(__file__).parent)],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.path.getsize(f"{db_path}-wal") > 0  # the last 50 commits are only there
    os.remove(f"{db_path}-wal")
    os.remove(f"{db_path}-shm")
    with sqlbus.connect(db_path) as bus:
        got = bus.agent("bob").receive(limit=1000)
        assert sorted(d.message.payload["n"] for d in got) == list(range(100))
        assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
        # and the bus works on from there
        bus.agent("alice").publish("bob", "notification", {"n": "after"})
        assert [d.message.payload["n"] for d in bus.agent("bob").receive()] == ["after"]


def test_a_foreign_sqlite_database_is_refused_and_not_changed(db_path: Path) -> None:
    conn = apsw.Connection(str(db_path))
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        sqlbus.connect(db_path)
    text = str(caught.value)
    assert "not a sqlbus database" in text or "another application" in text, text
    assert file_sha256(db_path) == before
    assert not os.path.exists(f"{db_path}-wal")


def test_a_file_that_is_not_sqlite_at_all_is_refused_and_not_changed(db_path: Path) -> None:
    db_path.write_text("name,age\nada,36\n" * 100)
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        sqlbus.connect(db_path)
    assert "not a SQLite database" in str(caught.value)
    assert file_sha256(db_path) == before


def test_a_file_from_a_newer_schema_version_is_refused_and_not_changed(db_path: Path) -> None:
    make_database(db_path, messages=10)
    conn = apsw.Connection(str(db_path))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = file_sha256(db_path)
    with pytest.raises(sqlbus.DatabaseError) as caught:
        sqlbus.connect(db_path)
    text = str(caught.value)
    assert "newer" in text and "99" in text and "upgrade" in text, text
    assert file_sha256(db_path) == before
