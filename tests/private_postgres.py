"""A PostgreSQL server of a test's own (initdb in a temporary directory, a free port), which
the test may stop, restart or kill without disturbing the shared server other tests use.

Run as root, the server runs as the ``postgres`` user (PostgreSQL refuses root). Under
``CI=true`` a machine without the PostgreSQL 15 binaries fails the test; elsewhere it skips,
saying why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

BIN = os.environ.get("SQLBUS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateServer:
    """``start()``, ``stop(mode)``, ``restart()``; ``url`` reaches database ``postgres``."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="sqlbus-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(BIN, tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l",
                  os.path.join(self.root, "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self, down_for: float = 0.0) -> None:
        self.stop("immediate")  # like a crash: nothing is flushed politely
        time.sleep(down_for)
        self.start()

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    """A started PostgreSQL server of this test's own, removed afterwards."""
    if not os.path.exists(os.path.join(BIN, "initdb")):
        why = f"no PostgreSQL binaries in {BIN} (set SQLBUS_TEST_PG_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(f"SKIPPED, NOT PASSED: {why}")
    server = PrivateServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()
