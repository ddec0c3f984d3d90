"""`make demo`: examples/demo.py runs as separate processes and exits 0 with a readable story."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"

# The demo's agents run as processes for seconds: out of make test-fast.
pytestmark = pytest.mark.slow


def test_the_demo_runs_to_the_end_and_tells_what_happened(tmp_path):
    env = dict(os.environ)
    env.pop("SQLBUS_DEMO_STARTED", None)
    done = subprocess.run([sys.executable, str(DEMO), str(tmp_path / "team.db")],
                          capture_output=True, text=True, timeout=120, env=env)
    out = done.stdout

    assert done.returncode == 0, done.stdout + done.stderr
    # its deliberate handler failures are logged with their tracebacks (SPEC 5); nothing else
    logged = re.findall(r"^sqlbus: agent .+, attempt \d+: ", done.stderr, re.M)
    assert done.stderr.count("Traceback") == len(logged), done.stderr
    assert "assigned 7 tasks to 3 workers" in out
    # worker-1 takes its tasks in priority order: 5, then 3, then 1
    starts = re.findall(r"worker-1 +starts (\S+) \(priority (\d)", out)
    assert [priority for _, priority in starts] == ["5", "3", "1"]
    assert "fetch-prices (priority 4, attempt 2)" in out  # the retried task
    assert "result from worker-2: fetch-prices completed" in out
    assert "dead letter: parse-upload for worker-3 after 3 attempts" in out
    assert "response from worker-2: {'agent': 'worker-2'" in out
    assert len(re.findall(r"got event 'all.done' from coordinator", out)) == 3
    assert re.search(r"messages sent +\d+", out)
    assert re.search(r"failed attempts +4 \(3 retried, 1 dead-lettered\)", out)
    assert "tasks completed          6 of 7" in out
    assert "workers exited cleanly   yes" in out
