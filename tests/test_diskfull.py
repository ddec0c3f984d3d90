"""Disk full: a database on a 2 MiB tmpfs, filled until a write fails.

The test mounts the tmpfs itself, so it needs root (and a kernel that lets this process mount);
otherwise it is skipped with a message saying so.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from probes import ACKED, SQLiteProbe

import sqlbus


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted on a fresh directory; unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a 2 MiB tmpfs (run as root to include it)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"disk-full test could not mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_raises_a_clear_error_keeps_what_was_committed_and_recovers(
    small_disk: Path,
) -> None:
    db = small_disk / "bus.db"
    filler = small_disk / "filler"
    bus = sqlbus.connect(db)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    bob.subscribe("state_change")
    # Take 600 KiB with a filler file first: deleting it later is how space comes back.
    filler.write_bytes(b"\0" * (600 * 1024))
    confirmed: list[str] = []
    pad = "p" * 4000
    with pytest.raises(sqlbus.DatabaseError) as caught:
        for n in range(10_000):
            confirmed.append(alice.publish("bob", "notification", {"n": n, "pad": pad}, ttl=0))
    text = str(caught.value)
    assert "disk full" in text and "ENOSPC" in text, text
    assert len(confirmed) > 50
    print(f"disk full after {len(confirmed)} messages: {text}")

    # Everything confirmed is there, readable while the disk is still full.
    probe = SQLiteProbe(db)
    assert probe.inbox_count(agent="bob") == len(confirmed)
    # A state write fails the same clear way and writes nothing.
    with pytest.raises(sqlbus.DatabaseError, match="disk full"):
        bus.state.set("big", {"pad": "q" * 200_000})
    assert bus.state.get("big") is None

    # Free space: the same bus works again, no repair step.
    filler.unlink()
    later = alice.publish("bob", "notification", {"n": "after"}, ttl=0)
    bus.state.set("big", {"pad": "q" * 1000})
    got: list[sqlbus.Delivery] = []
    while batch := bob.receive(limit=100):
        bob.ack(batch)
        got.extend(batch)
    assert [d.message.id for d in got if d.message.type == "notification"] == confirmed + [later]
    # the failed state write sent no state_change; the one after the space came back did
    changes = [d.message.payload for d in got if d.message.type == "state_change"]
    assert [(c["key"], c["version"]) for c in changes] == [("big", 1)]
    bus.close()

    # And after closing and reopening, the file is healthy.
    with sqlbus.connect(db) as again:
        assert again.state.get("big") is not None
        assert probe.integrity() == ["ok"]
        assert probe.inbox_count(agent="bob", type="notification", state=ACKED) == len(confirmed) + 1
