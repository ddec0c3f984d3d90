"""The PostgreSQL server the tests use: ``SQLBUS_TEST_POSTGRES`` or the one this machine runs
on 127.0.0.1:5432 (trust auth, database ``test``; ``make test`` starts it when it is down).

Each test gets a schema of its own, dropped afterwards. Under ``CI=true`` a server that does
not answer fails the test; elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

URL = os.environ.get("SQLBUS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def connect(url: str = URL):  # type: ignore[no-untyped-def]
    """An autocommit connection to the test server, or a failure (CI) / skip saying why."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - the dev setup installs it
        _unavailable(f"psycopg is not installed ({exc}); run make test, which installs sqlbus[postgres]")
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL at {url} does not answer ({str(exc).strip()}); "
                     "start it: pg_ctlcluster --skip-systemctl-redirect 15 main start")


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(f"SKIPPED, NOT PASSED: {why}")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name on the test server (not created), dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    admin = connect()
    try:
        yield name
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.close()


@pytest.fixture
def pg_bus(pg_schema: str) -> Iterator[tuple[Any, str]]:
    """(an autocommit connection, the name of a schema holding a new bus), for the storage
    verbs of the PostgreSQL backend; the schema is dropped afterwards."""
    from sqlbus.postgres.schema import ensure_schema

    conn = connect()
    ensure_schema(conn, pg_schema)
    yield conn, pg_schema
    conn.close()
