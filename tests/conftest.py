"""Shared fixtures: a fake clock, a bus on a real SQLite file in tmp_path, the probe that looks at
what the bus stored (tests/probes.py), and helpers for the tests about the file itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from probes import SQLiteProbe

import sqlbus

# 2027-01-15T08:00:00Z: a fixed, whole-second start so expected timestamps are easy to write.
START = 1_800_000_000.0


class FakeClock:
    """A clock the test moves by hand: ``clock()`` returns epoch seconds."""

    def __init__(self, start: float = START) -> None:
        self.start = start
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Escape lone surrogates in a test's captured output (tests feed them to the library on
    purpose, and it logs them): pytest-xdist sends reports between processes as UTF-8."""
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "bus.db"


@pytest.fixture
def make_bus(db_path: Path, clock: FakeClock) -> Iterator[Callable[..., sqlbus.Bus]]:
    """``make_bus(**policy)``: a bus on ``db_path`` driven by the fake clock (closed at the end)."""
    opened: list[sqlbus.Bus] = []

    def make(path: Path | None = None, **policy: object) -> sqlbus.Bus:
        policy.setdefault("clock", clock)
        bus = sqlbus.connect(path or db_path, **policy)  # type: ignore[arg-type]
        opened.append(bus)
        return bus

    yield make
    for bus in opened:
        bus.close()


@pytest.fixture
def bus(make_bus: Callable[..., sqlbus.Bus]) -> sqlbus.Bus:
    return make_bus()


@pytest.fixture
def probe(db_path: Path) -> SQLiteProbe:
    """Named looks at what the test's bus stored (``probe.message_states(id)``, ...)."""
    return SQLiteProbe(db_path)


# For the tests about the file itself, on any path (a copy, a file another process made).


def table_counts(path: Path | str) -> dict[str, int]:
    """Row count of every table in the file, read through a connection of our own."""
    return SQLiteProbe(path).row_counts()


def query(path: Path | str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run a read-only query on the file through a connection of our own."""
    return SQLiteProbe(path).sql(sql, params)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
