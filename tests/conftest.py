"""Shared fixtures: a fake clock, a bus on a real database, the probe that looks at what the bus
stored (tests/probes.py), and helpers for the tests about the SQLite file itself.

One behaviour suite, two backends (as huey's storage tests or River's driver conformance
suite): a module that sets ``pytestmark = pytest.mark.backends`` runs each of its tests that
uses the ``backend`` fixture (``make_bus``, ``bus``, ``probe``, ``database`` use it) once per
backend, with ids ``[sqlite]`` and ``[postgres]``. A test of such a module that checks
something only SQLite has takes ``@sqlite_only("why")`` and runs as ``[sqlite]`` only; one whose
``[postgres]`` run meets a bug of the PostgreSQL backend takes ``@pg_bug(PG_BUG_...)``, a
strict xfail of that run naming the bug. Every other module runs on SQLite alone, as before.

On PostgreSQL each test's bus lives in a fresh schema of the test server
(tests/postgres_server.py), dropped after the test. :class:`Database` (fixture ``database``)
says where a test's buses live, for what ``make_bus`` does not cover: a bus opened by hand,
in a child process (``place()``), by the CLI (``cli_args()``), and the application's own SQL
(``own_sql``: ``?`` or ``%s``, and where its tables go).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import grouping
import postgres_server
import pytest
from probes import PostgresProbe, SQLiteProbe

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


# -- the backend a test runs on ------------------------------------------------------------

BACKENDS = ("sqlite", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    grouping.install()  # SQLBUS_TEST_GROUP_COMMIT: the behaviour tests on group commit's path
    config.addinivalue_line(
        "markers", "backends: run each test of the module that uses the backend fixture once "
        "per backend ([sqlite], [postgres])")
    config.addinivalue_line(
        "markers", "sqlite_only(reason): in a backends module, a test of something only the "
        "SQLite backend has; it runs as [sqlite] alone")
    config.addinivalue_line(
        "markers", "pg_bug(reason, strict): the [postgres] run is an xfail: a PostgreSQL backend bug")


def sqlite_only(reason: str) -> pytest.MarkDecorator:
    """Mark a test of a backends module as one of the SQLite backend alone, saying why."""
    return pytest.mark.sqlite_only(reason=reason)


# The PostgreSQL backend's bugs that [postgres] runs show (pg_bug): none known today; name
# each as a constant here, with what fails and why, when one turns up.


def pg_bug(reason: str, *, strict: bool = True) -> pytest.MarkDecorator:
    """Mark a test whose [postgres] run fails because of a bug of the PostgreSQL backend (the
    [sqlite] run is unchanged): an xfail, strict unless the bug shows only sometimes, so that
    the fix is noticed and the mark removed."""
    return pytest.mark.pg_bug(reason=reason, strict=strict)


def pg_xfail(reason: str, *, strict: bool = True) -> pytest.MarkDecorator:
    """The xfail a [postgres] run gets for a PostgreSQL backend bug (for one case of a
    parametrized test: ``request.applymarker(pg_xfail(PG_BUG_...))``)."""
    return pytest.mark.xfail(strict=strict, reason=f"PG backend bug: {reason}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("backends") is None:
        return  # a SQLite-only module: the backend fixture's default, no id
    only = metafunc.definition.get_closest_marker("sqlite_only")
    if only is not None and not (only.kwargs.get("reason") or only.args):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: sqlite_only needs a reason")
    backends = ["sqlite"] if only is not None else list(BACKENDS)
    bug = metafunc.definition.get_closest_marker("pg_bug")
    params = [
        pytest.param(name, marks=pg_xfail(bug.kwargs["reason"], strict=bug.kwargs["strict"]))
        if name == "postgres" and bug is not None else name
        for name in backends
    ]
    metafunc.parametrize("backend", params, indirect=True, ids=backends)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or "postgres": where the test's bus lives ("sqlite" outside backends modules)."""
    return getattr(request, "param", "sqlite")


@dataclass
class Database:
    """Where a test's buses live: SQLite files in tmp_path, or fresh schemas on the PostgreSQL
    test server (made on first use, dropped at the end of the test).

    ``place(path)`` maps the SQLite tests' paths: ``None`` or ``db_path`` is the test's own
    database; any other path is another database (a schema of its own on PostgreSQL), the
    same one each time it is named."""

    backend: str
    db_path: Path
    schemas: dict[str, str] = field(default_factory=dict)  # path -> schema (PostgreSQL)

    @property
    def postgres(self) -> bool:
        return self.backend == "postgres"

    def place(self, path: Path | str | None = None) -> tuple[Any, dict[str, Any]]:
        """(what to pass ``sqlbus.connect`` first, the keywords that go with it)."""
        path = Path(path or self.db_path)
        if not self.postgres:
            return path, {}
        schema = self.schemas.setdefault(str(path), f"t_{secrets.token_hex(6)}")
        return postgres_server.URL, {"schema": schema}

    def connect(self, path: Path | str | None = None, **policy: Any) -> sqlbus.Bus:
        """A bus on the database (``sqlbus.connect``), not closed for the caller."""
        where, keywords = self.place(path)
        return sqlbus.connect(where, **keywords, **policy)

    async def aio_connect(self, path: Path | str | None = None, **policy: Any) -> Any:
        """An asyncio bus on the database (``sqlbus.aio.connect``)."""
        import sqlbus.aio

        where, keywords = self.place(path)
        return await sqlbus.aio.connect(where, **keywords, **policy)

    def probe(self, path: Path | str | None = None) -> SQLiteProbe | PostgresProbe:
        """The probe of the database at ``path`` (the test's own by default)."""
        where, keywords = self.place(path)
        if self.postgres:
            return PostgresProbe(where, keywords["schema"])
        return SQLiteProbe(where)

    def cli_args(self, path: Path | str | None = None) -> list[str]:
        """The CLI's options that open this database: ``--db PATH`` or ``--db URL --schema S``."""
        where, keywords = self.place(path)
        if self.postgres:
            return ["--db", where, "--schema", keywords["schema"]]
        return ["--db", str(where)]

    def own_sql(self, query: str) -> str:
        """The application's own SQL (``tx.execute``) for the backend: ``?`` becomes psycopg's
        ``%s`` on PostgreSQL, and ``{db}`` names where the test's own tables go: ``main`` on
        SQLite (the bus's file), the bus's schema on PostgreSQL (a statement there runs with
        the server's default search path; in the schema the table goes with the test)."""
        if not self.postgres:
            return query.format(db="main")
        schema = self.place()[1]["schema"]
        return query.replace("?", "%s").format(db=f'"{schema}"')

    def fingerprint(self) -> str:
        """A digest of everything the database holds: equal before and after a call that
        changed nothing (the file's bytes; on PostgreSQL every row of every table of the bus)."""
        if not self.postgres:
            return file_sha256(self.db_path)
        probe = self.probe()
        tables = sorted(probe.row_counts())
        rows = [probe.sql(f'SELECT md5(coalesce(string_agg(t::text, \',\' ORDER BY t::text), \'\'))'
                          f' FROM "{table}" AS t') for table in tables]
        return hashlib.sha256(repr(list(zip(tables, rows, strict=True))).encode()).hexdigest()

    @contextlib.contextmanager
    def transaction_elsewhere(self) -> Iterator[None]:
        """Inside: a write transaction of someone else runs on another database of the same
        server (PostgreSQL: the ``postgres`` database, with a transaction id; SQLite: another
        file, its write lock held)."""
        if self.postgres:
            import psycopg

            other = psycopg.connect(postgres_server.URL.rsplit("/", 1)[0] + "/postgres")
            try:
                other.execute("SELECT pg_current_xact_id()")  # now it has an id, as a writer
                yield
            finally:
                other.rollback()
                other.close()
            return
        other = SQLiteProbe(self.db_path.with_name("elsewhere.db"))
        other.write("CREATE TABLE IF NOT EXISTS t (x)")
        conn = apsw.Connection(str(other.path))
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (1)")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def drop(self) -> None:
        """Drop the schemas the test made (PostgreSQL); files go with tmp_path."""
        if not self.schemas:
            return
        admin = postgres_server.connect()
        try:
            for schema in self.schemas.values():
                admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            admin.close()


@pytest.fixture
def database(backend: str, db_path: Path) -> Iterator[Database]:
    """The test's database on its backend (``database.connect(**policy)``, ``.probe()``)."""
    if backend == "postgres":
        postgres_server.connect().close()  # a server that does not answer: skip, or fail in CI
    db = Database(backend, db_path)
    yield db
    db.drop()


@pytest.fixture
def make_bus(database: Database, clock: FakeClock) -> Iterator[Callable[..., sqlbus.Bus]]:
    """``make_bus(path=None, **policy)``: a bus on the test's database (another database for
    another path) driven by the fake clock; closed at the end."""
    opened: list[sqlbus.Bus] = []

    def make(path: Path | None = None, **policy: object) -> sqlbus.Bus:
        policy.setdefault("clock", clock)
        bus = database.connect(path, **policy)
        opened.append(bus)
        return bus

    yield make
    for bus in opened:
        bus.close()


@pytest.fixture
def bus(make_bus: Callable[..., sqlbus.Bus]) -> sqlbus.Bus:
    return make_bus()


@pytest.fixture
def probe(database: Database) -> SQLiteProbe | PostgresProbe:
    """Named looks at what the test's bus stored (``probe.message_states(id)``, ...)."""
    return database.probe()


@pytest.fixture
def own_sql(database: Database) -> Callable[[str], str]:
    """``own_sql("INSERT INTO {db}.orders (item) VALUES (?)")``: the application's own SQL for
    ``tx.execute`` on the test's backend (:meth:`Database.own_sql`)."""
    return database.own_sql


# For the tests about the file itself, on any path (a copy, a file another process made).


def table_counts(path: Path | str) -> dict[str, int]:
    """Row count of every table in the file, read through a connection of our own."""
    return SQLiteProbe(path).row_counts()


def query(path: Path | str, sql: str, params: tuple = ()) -> list[tuple]:
    """Run a read-only query on the file through a connection of our own."""
    return SQLiteProbe(path).sql(sql, params)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
