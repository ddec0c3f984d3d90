"""The schema of a bus on PostgreSQL (SPEC 12): created once on first connect under an
advisory lock, its version recorded; a schema not sqlbus's, or newer, refused unchanged."""

from __future__ import annotations

import threading

import pytest
from postgres_server import connect, pg_schema

import sqlbus
from sqlbus.postgres.schema import SCHEMA_VERSION, check_schema_name, ensure_schema

__all__ = ["pg_schema"]  # a fixture


def tables(conn, schema: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [row[0] for row in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (schema,))]


def test_the_first_connect_creates_the_bus_and_records_its_version(pg_schema: str) -> None:
    with connect() as conn:
        assert ensure_schema(conn, pg_schema) == SCHEMA_VERSION
        assert "message" in tables(conn, pg_schema) and "sqlbus_meta" in tables(conn, pg_schema)
        meta = dict(conn.execute(f'SELECT key, value FROM "{pg_schema}".sqlbus_meta').fetchall())
        assert meta == {"application": "sqlbus", "schema_version": str(SCHEMA_VERSION)}
        retention = conn.execute(f'SELECT archive_ms, dead_ms, archive_max_messages '
                                 f'FROM "{pg_schema}".retention').fetchall()
        assert retention == [(7 * 86_400_000, 30 * 86_400_000, 1_000_000)]
        assert ensure_schema(conn, pg_schema) == SCHEMA_VERSION  # the second finds it


def test_many_connecting_at_once_create_it_once(pg_schema: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def first_connect() -> None:
        try:
            with connect() as conn:
                start.wait()
                ensure_schema(conn, pg_schema)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_connect) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with connect() as conn:
        rows = conn.execute(f'SELECT count(*) FROM "{pg_schema}".sqlbus_meta').fetchone()
        assert rows == (2,)


def test_a_schema_holding_other_tables_is_refused_and_left_unchanged(pg_schema: str) -> None:
    with connect() as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id int)')
        with pytest.raises(sqlbus.DatabaseError, match="not a sqlbus bus; .*nothing was changed"):
            ensure_schema(conn, pg_schema)
        assert tables(conn, pg_schema) == ["orders"]


def test_a_schema_of_a_newer_sqlbus_is_refused_and_left_unchanged(pg_schema: str) -> None:
    with connect() as conn:
        ensure_schema(conn, pg_schema)
        conn.execute(f"UPDATE \"{pg_schema}\".sqlbus_meta SET value = %s WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION + 1),))
        before = tables(conn, pg_schema)
        with pytest.raises(sqlbus.DatabaseError, match="newer sqlbus"):
            ensure_schema(conn, pg_schema)
        assert tables(conn, pg_schema) == before


def test_an_empty_schema_made_for_the_bus_is_filled(pg_schema: str) -> None:
    with connect() as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        assert ensure_schema(conn, pg_schema) == SCHEMA_VERSION
        assert "message" in tables(conn, pg_schema)


@pytest.mark.parametrize("name", ["", "Sqlbus", "1bus", "a-b", "a" * 64, "x;drop", None, 7])
def test_a_schema_name_outside_the_pattern_is_refused(name: object) -> None:
    with pytest.raises(ValueError, match=r"schema must match"):
        check_schema_name(name)
