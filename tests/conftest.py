"""Shared fixtures: a fake clock, a bus on a real SQLite file in tmp_path, and helpers that look
at the file from outside the library (row counts, file hashes)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

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


def table_counts(path: Path | str) -> dict[str, int]:
    """Row count of every table in the file, read through a connection of our own."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0] for t in tables}
    finally:
        conn.close()


def query(path: Path | str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run a read-only query on the file through a connection of our own."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def counts(db_path: Path) -> Callable[[], dict[str, int]]:
    """``counts()``: row counts of every table of the test's database file."""
    return lambda: table_counts(db_path)


@pytest.fixture
def sql(db_path: Path) -> Callable[..., list[tuple]]:
    """``sql(query, params)``: read the test's database file from outside the library."""
    return lambda q, params=(): query(db_path, q, params)

