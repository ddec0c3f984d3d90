"""The tables of a bus in a PostgreSQL schema, created on first connect, and the check that a
schema is one of ours.

>>> with psycopg.connect(url, autocommit=True) as conn:                   # doctest: +SKIP
...     ensure_schema(conn, "sqlbus")          # creates it, or checks and returns its version
1

One bus per schema. Creation runs in one transaction under an advisory lock keyed by the
schema's name, so any number of processes connecting at once create it once, and each finds
it whole. A schema holding anything but a bus (no ``sqlbus_meta`` marking it as ours), or one
written by a newer sqlbus, raises :class:`~sqlbus.errors.DatabaseError` and is left unchanged.

The tables mirror the SQLite file's (docs/design.md): times are epoch ms in ``bigint``, a
message body is the JSON bytes sqlbus encoded (``bytea``, so a body is stored and checked
byte for byte as on SQLite), and positions come from an identity column, which never gives a
number twice.
"""

from __future__ import annotations

import re
from functools import lru_cache

import psycopg
from psycopg import sql

from ..errors import DatabaseError

SCHEMA_VERSION = 1
APPLICATION = "sqlbus"
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# {s} is the schema's quoted name. The claim index holds queued rows only, in delivery order
# (agent, priority high first, position), as on SQLite: a claim reads the head of one agent's
# queue whatever the backlog or archive size.
TABLES = """
CREATE TABLE {s}.sqlbus_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE {s}.agents (
    id text PRIMARY KEY,
    registered_at bigint NOT NULL,
    last_seen bigint NOT NULL,
    status text NOT NULL DEFAULT 'active'
);
CREATE TABLE {s}.message_body (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body bytea NOT NULL
);
CREATE TABLE {s}.message (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL,
    sender text NOT NULL,
    agent text,
    type text NOT NULL,
    correlation_id text,
    priority smallint NOT NULL CHECK (priority BETWEEN 1 AND 5),
    state smallint NOT NULL CHECK (state BETWEEN 0 AND 4),
    visible_at bigint NOT NULL,
    expires_at bigint,
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims integer NOT NULL DEFAULT 0,
    sent_at bigint NOT NULL,
    done_at bigint,
    last_error text,
    body bytea,
    body_id bigint REFERENCES {s}.message_body (id),
    CHECK ((body IS NULL) <> (body_id IS NULL))
);
CREATE INDEX message_claim ON {s}.message (agent, priority DESC, seq) INCLUDE (visible_at)
    WHERE state = 0;
CREATE INDEX message_wait ON {s}.message (agent, visible_at) WHERE state IN (1, 4);
CREATE INDEX message_id ON {s}.message (message_id);
CREATE INDEX message_response ON {s}.message (agent, correlation_id) WHERE type = 'response';
CREATE INDEX message_body_id ON {s}.message (body_id) WHERE body_id IS NOT NULL;
CREATE TABLE {s}.dead_letter (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq bigint NOT NULL UNIQUE,
    reason text NOT NULL,
    error_name text,
    error_message text,
    traceback text,
    context text,
    failed_at bigint NOT NULL,
    attempts integer NOT NULL
);
CREATE INDEX dead_letter_failed_at ON {s}.dead_letter (failed_at);
CREATE TABLE {s}.retention (
    id smallint PRIMARY KEY CHECK (id = 1),
    archive_ms bigint CHECK (archive_ms >= 0),
    dead_ms bigint CHECK (dead_ms >= 0),
    archive_max_messages bigint CHECK (archive_max_messages >= 0)
);
CREATE TABLE {s}.state (
    key text PRIMARY KEY,
    value bytea NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    deleted boolean NOT NULL DEFAULT false,
    updated_by text,
    updated_at bigint NOT NULL
);
CREATE TABLE {s}.state_log (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    deleted boolean NOT NULL,
    updated_by text,
    updated_at bigint NOT NULL
);
CREATE TABLE {s}.error_counts (
    name text PRIMARY KEY,
    count bigint NOT NULL
);
CREATE TABLE {s}.counters (
    name text NOT NULL,
    agent text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, agent)
);
CREATE TABLE {s}.request_timeout (
    agent text NOT NULL,
    correlation_id text NOT NULL,
    timed_out_at bigint NOT NULL,
    PRIMARY KEY (agent, correlation_id)
);
CREATE TABLE {s}.interest (
    kind text NOT NULL CHECK (kind IN ('type', 'event')),
    pattern text NOT NULL,
    agent text NOT NULL,
    subscribed_at bigint NOT NULL,
    PRIMARY KEY (kind, pattern, agent)
);
"""

# What a new bus keeps (as a new SQLite file): acked messages 7 days, dead letters 30 days,
# at most 1,000,000 acked messages.
DEFAULT_RETENTION = (7 * 86_400_000, 30 * 86_400_000, 1_000_000)


@lru_cache(maxsize=512)
def statement(schema: str, template: str) -> sql.Composed:
    """``template`` with ``{s}`` the schema's quoted name, composed once per schema and text
    (the backend's statements name their tables ``{s}.message``, ...)."""
    return sql.SQL(template).format(s=sql.Identifier(schema))  # type: ignore[arg-type]


def check_schema_name(name: object) -> str:
    """``name`` when it is a schema name sqlbus accepts (``[a-z_][a-z0-9_]{0,62}``)."""
    if type(name) is not str or not SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"schema must match [a-z_][a-z0-9_]{{0,62}}, got {name!r}")
    return name


def ensure_schema(conn: psycopg.Connection, schema: str) -> int:
    """Create the bus in ``schema`` unless it is there, and return its schema version.

    ``conn`` must be in autocommit mode (this runs its own transaction). Raises
    :class:`DatabaseError`, changing nothing, for a schema that is not a bus's or that a newer
    sqlbus wrote."""
    check_schema_name(schema)
    quoted = sql.Identifier(schema)
    with conn.transaction():
        # One creator at a time per schema name, whatever database role or process.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                     (f"sqlbus schema {schema}",))
        version = _found_version(conn, schema)
        if version is not None:
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    f"PostgreSQL schema {schema!r} was written by a newer sqlbus (schema version "
                    f"{version}; this one reads {SCHEMA_VERSION}); upgrade sqlbus"
                )
            return version
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(quoted))
        conn.execute(sql.SQL(TABLES).format(s=quoted))  # type: ignore[arg-type]
        conn.execute(
            sql.SQL("INSERT INTO {}.sqlbus_meta (key, value) VALUES "
                    "('application', %s), ('schema_version', %s)").format(quoted),
            (APPLICATION, str(SCHEMA_VERSION)),
        )
        conn.execute(
            sql.SQL("INSERT INTO {}.retention (id, archive_ms, dead_ms, archive_max_messages) "
                    "VALUES (1, %s, %s, %s)").format(quoted),
            DEFAULT_RETENTION,
        )
    return SCHEMA_VERSION


def _found_version(conn: psycopg.Connection, schema: str) -> int | None:
    """The version of the bus in ``schema``; None when the schema is missing or empty; raises
    for a schema that holds anything else."""
    exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    if exists is None:
        return None
    meta = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".sqlbus_meta',)).fetchone()
    if meta is None or meta[0] is None:
        objects = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s", (schema,)).fetchone()
        if objects is not None and objects[0] == 0:
            return None  # an empty schema someone made for the bus: ours to fill
        raise DatabaseError(
            f"PostgreSQL schema {schema!r} holds other tables and is not a sqlbus bus; "
            "choose another schema (schema=...); nothing was changed"
        )
    rows: dict[str, str] = dict(conn.execute(
        sql.SQL("SELECT key, value FROM {}.sqlbus_meta").format(sql.Identifier(schema))
    ).fetchall())
    if rows.get("application") != APPLICATION or not str(rows.get("schema_version", "")).isdigit():
        raise DatabaseError(
            f"PostgreSQL schema {schema!r} has a sqlbus_meta table that is not sqlbus's; "
            "nothing was changed"
        )
    return int(rows["schema_version"])
