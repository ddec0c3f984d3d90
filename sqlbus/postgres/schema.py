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

An identity value is taken at insert, not at commit, so a reader of "rows after position N"
could pass over a row that a slower transaction commits later with a smaller number. Two
readers need commit order and get it differently:

- ``state_log`` (``watch``): each entry gets ``pos`` from a sequence in a deferred constraint
  trigger, which runs at commit under an advisory lock keyed by the schema's name, held until
  the commit is visible; so ``pos`` grows in commit order. State writes are rare, and the lock
  is held only from the trigger to the commit.
- ``message`` (``tail``): each row keeps the id of the transaction that wrote it (``xact_id``,
  in a BRIN index: a btree cost publishes 15% and claims 7%); a tail's position is a
  transaction id, and :func:`sqlbus.postgres.admin.rows_after` reads the rows of the
  transactions between it and the oldest one still running, all of which have ended.

A statement-level trigger deletes a shared body (``message_body``) with the last row that
references it, whatever deletes the rows, as SQLite's ``message_body_release``; two
transactions deleting a body's last rows at once take turns on the body's row lock, so the
second frees it (in READ COMMITTED, the engine's level for writes).
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
    -- the writing transaction's id as a number (tail); BRIN-indexed: ids grow with the table
    xact_id bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    CHECK ((body IS NULL) <> (body_id IS NULL))
);
CREATE INDEX message_claim ON {s}.message (agent, priority DESC, seq) INCLUDE (visible_at)
    WHERE state = 0;
CREATE INDEX message_wait ON {s}.message (agent, visible_at) WHERE state IN (1, 4);
CREATE INDEX message_id ON {s}.message (message_id);
CREATE INDEX message_xact ON {s}.message USING brin (xact_id);
CREATE INDEX message_response ON {s}.message (agent, correlation_id) WHERE type = 'response';
CREATE INDEX message_body_id ON {s}.message (body_id) WHERE body_id IS NOT NULL;
CREATE FUNCTION {s}.message_body_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Lock the bodies first (in id order: no deadlock between two deleters), so a deleter of
    -- another of a body's rows waits here until this one commits; the DELETE's own snapshot,
    -- taken after, then sees that row gone (READ COMMITTED), and the last deleter frees it.
    PERFORM 1 FROM {s}.message_body WHERE id IN (SELECT body_id FROM gone) ORDER BY id FOR UPDATE;
    DELETE FROM {s}.message_body AS b WHERE b.id IN (SELECT body_id FROM gone)
        AND NOT EXISTS (SELECT 1 FROM {s}.message AS m WHERE m.body_id = b.id);
    RETURN NULL;
END $$;
CREATE TRIGGER message_body_release AFTER DELETE ON {s}.message
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION {s}.message_body_release();
CREATE FUNCTION {s}.body_ttl(body bytea) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN convert_from(body, 'UTF8')::jsonb -> 'headers' -> 'ttl';
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
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
    updated_at bigint NOT NULL,
    pos bigint UNIQUE
);
CREATE SEQUENCE {s}.state_log_pos AS bigint OWNED BY {s}.state_log.pos;
CREATE FUNCTION {s}.state_log_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('sqlbus state_log ' || TG_TABLE_SCHEMA, 0));
    UPDATE {s}.state_log SET pos = nextval('{s}.state_log_pos') WHERE seq = NEW.seq;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER state_log_position AFTER INSERT ON {s}.state_log
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.state_log_position();
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


# ---------------------------------------------------------------------------------------------
# Fragments of SQL that more than one module's statements are made of (as SQLite's)

# A row's body, in the row or shared (message_body); a shared body that is missing (a damaged
# schema: the foreign key was bypassed) reads as empty, which no decoder accepts.
BODY = (
    "coalesce(body, (SELECT b.body FROM {s}.message_body AS b WHERE b.id = body_id), ''::bytea)"
)
BODY_LENGTH = (
    "coalesce(octet_length(body),"
    " (SELECT octet_length(b.body) FROM {s}.message_body AS b WHERE b.id = body_id), 0)"
)
# What a listing reads of a message row (%(max_body)s: the reader's limit on a body's length):
# the columns that stand in for a body too long to load, its length, and the body only when
# within the limit (else NULL, never read).
LISTED = (
    "message_id, sender, type, priority, sent_at, " + BODY_LENGTH
    + " AS length, CASE WHEN " + BODY_LENGTH + " <= %(max_body)s THEN " + BODY + " END"
)
# How stats and peek name a row of an inbox at %(now)s, as SQLite's ``STATUS``.
STATUS = (
    "CASE WHEN expires_at < %(now)s AND NOT (state = 1 AND visible_at > %(now)s) THEN 'expired'"
    " WHEN state = 0 OR visible_at <= %(now)s THEN 'ready' WHEN state = 1 THEN 'leased'"
    " WHEN claims > 0 THEN 'retrying' ELSE 'scheduled' END"
)
# The wake-up token a look reads in its snapshot (SQLite's data_version): a hash of the
# snapshot (xmin:xmax:running xids), which every commit of a writing transaction changes: one
# running at the snapshot leaves the list, a later one raises xmax. Commits elsewhere in the
# cluster change it too: a waiter wakes for nothing and looks again.
TOKEN = "hashtextextended(pg_current_snapshot()::text, 0)"


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


def bus_version(url: str, schema: str, connect_timeout: float = 5.0) -> int | None:
    """The version of the bus in ``schema`` of the database at ``url``, or None when there is
    none yet; reads only (creates nothing). :class:`DatabaseError` when the server does not
    answer or the schema holds something else."""
    check_schema_name(schema)
    try:
        with psycopg.connect(url, autocommit=True,
                             connect_timeout=max(2, int(connect_timeout))) as conn:
            return _found_version(conn, schema)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatabaseError(f"cannot connect to the server ({first})") from exc


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
