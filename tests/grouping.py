"""Run the behaviour tests on group commit's path (sqlbus/sqlite/group.py).

    SQLBUS_TEST_GROUP_COMMIT=companion pytest tests/test_publish.py   # every write in a group
    SQLBUS_TEST_GROUP_COMMIT=always pytest ...      # every write in a savepoint, on its thread
    SQLBUS_TEST_GROUP_COMMIT=off pytest ...         # no grouping: each write its own transaction

``companion``: each grouped write of the test joins a group that another thread leads (a
companion write that waits, inside its transaction, until the test's write has queued), so
the test's write runs on the companion's thread and connection, inside a savepoint, and its
result or error crosses back: what happens to a write that meets concurrent ones. Tests that
count threads or connections do not hold in this mode (a companion thread per write).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlbus.engine import Tx
from sqlbus.sqlite.group import MODES, GroupCommit

ENV = "SQLBUS_TEST_GROUP_COMMIT"


def install(mode: str | None = None) -> str | None:
    """Apply ``mode`` (default: the environment's ``SQLBUS_TEST_GROUP_COMMIT``) to every bus
    opened from now on in this process."""
    mode = os.environ.get(ENV) if mode is None else mode
    if not mode:
        return None
    if mode == "companion":
        GroupCommit.mode = "always"
        GroupCommit.write = _with_companion(GroupCommit.write)  # type: ignore[method-assign]
    elif mode in MODES:
        GroupCommit.mode = mode
    else:
        raise ValueError(f"{ENV} must be companion or one of {MODES}, got {mode!r}")
    return mode


def _with_companion(write: Callable[..., Any]) -> Any:
    def write_in_company(self: GroupCommit, fn: Callable[[Tx], Any], solo: bool = False) -> Any:
        if self.engine.closed or solo:  # a solo write (a claim) never shares a transaction
            return write(self, fn, solo)
        leading = threading.Event()

        def wait_for_company(tx: Tx) -> None:
            leading.set()
            deadline = time.monotonic() + 1.0
            while not self._queue and time.monotonic() < deadline:
                time.sleep(0.0002)  # the test's write queues behind this one and joins it
            tx.mark_quiet()

        def companion() -> None:
            try:
                write(self, wait_for_company)
            except Exception:
                pass  # the bus closed meanwhile: the test's own write says so

        thread = threading.Thread(target=companion, name="sqlbus-test-companion", daemon=True)
        thread.start()
        leading.wait(1.0)
        try:
            return write(self, fn)
        finally:
            thread.join()

    return write_in_company
