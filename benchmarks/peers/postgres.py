"""What the PostgreSQL systems share: the server, a fresh schema per store, and one
``synchronous_commit`` for all of them.

The server is ``COMPARE_POSTGRES`` (default: the local test server, trust auth). Every store is
a new schema ``cmp_<hex>``, dropped at teardown. Every system runs at the same
``synchronous_commit`` (``COMPARE_PG_SYNC``, default ``off``: sqlbus's default durability,
``"normal"``); the peers get it through the conninfo ``options``, so their own code is
untouched. After a prefill every table of the store is ANALYZEd, as autovacuum would do
soon after a bulk load: without statistics the peers' claims ran 20-40x slower at 100,000
waiting (pgqueuer 19/s -> 411/s, procrastinate 9/s -> 389/s), sqlbus's did not change.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

from . import Peer, Unavailable

URL = os.environ.get("COMPARE_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SYNC = os.environ.get("COMPARE_PG_SYNC", "off")


def dsn(schema: str | None = None) -> str:
    """The server's URL with this run's synchronous_commit (and ``schema`` first on the
    search_path, for peers that have no schema option)."""
    options = f"-csynchronous_commit={SYNC}"
    if schema is not None:
        options += f" -csearch_path={schema}"
    joiner = "&" if "?" in URL else "?"
    return f"{URL}{joiner}options={quote(options)}"


def admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(URL, autocommit=True, connect_timeout=3)


class PostgresPeer(Peer):
    """A system whose store is a schema on the server."""

    postgres = True
    module = "psycopg"
    package = "psycopg"

    def check(self) -> None:
        super().check()
        try:
            admin().close()
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot run here
            raise Unavailable(f"no PostgreSQL server answers at {URL} ({exc}); skipped") from exc

    def new_schema(self, create: bool = True) -> str:
        name = f"cmp_{secrets.token_hex(5)}"
        if create:
            with admin() as conn:
                conn.execute(f'CREATE SCHEMA "{name}"')
        return name

    def fill(self, store: str, queue: str, ids: range) -> None:
        """The untimed prefill itself (the peer's batch API by default)."""
        Peer.prefill(self, store, queue, ids)

    def prefill(self, store: str, queue: str, ids: range) -> None:
        self.fill(store, queue, ids)
        with admin() as conn:
            tables = conn.execute(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables"
                " WHERE schemaname = %s", (store,)).fetchall()
            for (table,) in tables:
                conn.execute(f"ANALYZE {table}")

    def teardown(self, store: str) -> None:
        with admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{store}" CASCADE')

    def server_settings(self) -> str:
        with admin() as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        return f"PostgreSQL {version}, synchronous_commit={SYNC} (COMPARE_PG_SYNC)"
