"""The PostgreSQL backend (the extra ``sqlbus[postgres]``: psycopg 3 and psycopg_pool), for
agents on many hosts: ``sqlbus.connect("postgresql://...", schema="sqlbus")``.

Its engine half is :class:`sqlbus.postgres.engine.PostgresEngine` (a pool per bus, the
server's clock, fork safety) with :mod:`sqlbus.postgres.wakeup` (LISTEN/NOTIFY). Its verbs are
one object, :class:`sqlbus.postgres.storage.PostgresStorage` (one bus per schema), split by
concern as the SQLite backend's: ``schema`` (tables, the check that a schema is ours, shared
SQL fragments), ``connection`` (transactions, lock waits, checks), ``queue`` (publish, claim,
settle), ``responses`` (request/response), ``agents`` (registry, interests), ``admin`` (dead
letters, archive, peek, tail), ``retention`` (policy, pruning, expiry, counters), ``stats``
(figures) and ``state`` (shared state). docs/postgres.md describes the design."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mypy checks that PostgresStorage has every verb, typed as the Protocol
    from typing import Any

    import psycopg

    from ..backend import Storage
    from .storage import PostgresStorage

    _conforms: Storage[psycopg.Connection[Any]] = PostgresStorage("x")
