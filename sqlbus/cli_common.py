"""What the ``sqlbus`` commands share: argument types, opening the database, asking for
confirmation, and printing tables and JSON."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import msgspec
from click.core import ParameterSource

from .bus import Bus, connect, is_postgres_url
from .errors import DatabaseError
from .sqlite.schema import check_file  # the CLI checks a file by path before opening a bus

__all__ = [
    # argument types
    "parse_duration",
    "duration_text",
    "DURATION",
    "JSON",
    "COUNT",
    "options_given",
    # opening the database
    "Config",
    "pass_config",
    "json_option",
    "yes_option",
    "confirm",
    # output
    "fail",
    "json_out",
    "table",
    "cell",
    "shorten",
]

# ---------------------------------------------------------------------------------------------
# Argument types

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(text: str) -> float | None:
    """``7d``, ``12h``, ``30m``, ``45s``, ``250ms`` or a number of seconds, in seconds;
    ``never`` (or ``none``) is None."""
    if text.strip().lower() in ("never", "none"):
        return None
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"expected a duration like 7d, 12h, 30m, 45s, 250ms or 'never', got {text!r}"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


class _Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | None:
        if value is None or isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Json(click.ParamType):
    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            self.fail(f"expected JSON (quote a string: '\"text\"'), got {value!r}", param, ctx)


class _Count(click.ParamType):
    name = "N"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("none", "never"):
            return None
        if not text.isdigit():
            self.fail(f"expected a whole number >= 0 or 'none' (no bound), got {value!r}", param, ctx)
        return int(text)


DURATION = _Duration()
JSON = _Json()
COUNT = _Count()


def duration_text(seconds: float | None) -> str:
    """A duration as people write it (``7d``, ``12h``, ``90s``), or ``never``."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def options_given(*names: str) -> list[str]:
    """Which of the current command's options ``names`` were given (not their defaults):
    ``never`` gives None, like an option left out, and means something else."""
    ctx = click.get_current_context()
    return [name for name in names if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]


# ---------------------------------------------------------------------------------------------
# Opening the database


class Config:
    """The global options (``--db``): the group makes one, each command opens the bus with it."""

    def __init__(self, db: str | None, schema: str | None = None) -> None:
        self.db = db
        self.schema = schema

    def path(self) -> str:
        if not self.db:
            raise click.UsageError("no database given: use --db PATH|URL or set SQLBUS_DB")
        if self.schema is not None and not is_postgres_url(self.db):
            raise click.UsageError("--schema (SQLBUS_SCHEMA) is for a postgresql:// URL, not a file")
        return self.db

    def schema_name(self) -> str:
        """The PostgreSQL schema (checked; ValueError: exit 2 saying the rule)."""
        from .postgres.schema import check_schema_name

        return check_schema_name(self.schema or "sqlbus")

    def is_url(self) -> bool:
        return is_postgres_url(self.path())

    def connect(self, **policy: Any) -> Bus:
        """Open (or create) the bus: a file, or the schema of a PostgreSQL database."""
        if self.is_url():
            policy["schema"] = self.schema
        return connect(self.path(), **policy)

    @contextmanager
    def bus(self) -> Iterator[Bus]:
        """Open an existing sqlbus database (never create one: that is ``init``'s job)."""
        path = self.path()
        if self.is_url():
            schema = self.schema_name()
            if not bus_in_schema(path, schema):
                raise click.ClickException(
                    f"no sqlbus bus in schema {schema!r} of {redact(path)} "
                    f"(create it with: sqlbus --db URL --schema {schema} init)"
                )
            with self.connect() as bus:
                yield bus
            return
        if not os.path.lexists(path):
            raise click.ClickException(
                f"{path}: no such database (create it with: sqlbus --db {path} init)"
            )
        # connect() would make a sqlbus database of an empty file (or of an empty SQLite one),
        # and the library has no open-existing-only call: storage's check of the file's header
        # tells them apart without opening it.
        kind = check_file(path) if os.path.isfile(path) else "sqlbus"  # connect refuses the rest
        if kind != "sqlbus":
            what = "an empty file" if kind == "empty" else "a SQLite database without tables"
            raise click.ClickException(
                f"{path} is {what}, not a sqlbus database (create one with: sqlbus init)"
            )
        bus = connect(path)
        try:
            yield bus
        finally:
            bus.close()


pass_config = click.make_pass_decorator(Config)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
yes_option = click.option("--yes", "-y", is_flag=True,
                          help="Do not ask for confirmation (required without a terminal).")


def confirm(question: str, yes: bool) -> None:
    """Go on only with --yes or a yes typed on the terminal; else exit 1, nothing changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(f"{question} Refused: no terminal to ask on; give --yes")
    if not click.confirm(question, default=False, err=True):
        raise click.ClickException("not confirmed: nothing changed")


def bus_in_schema(url: str, schema: str) -> bool:
    """Whether ``schema`` of the database at ``url`` holds a bus (created by ``init``)."""
    try:
        from .postgres.schema import bus_version
    except ImportError as exc:
        raise click.ClickException(
            f"a postgresql:// URL needs the extra sqlbus[postgres] ({exc})") from exc
    try:
        return bus_version(url, schema) is not None
    except DatabaseError as exc:
        raise click.ClickException(f"{redact(url)}: {exc}") from exc


def redact(url: str) -> str:
    """The URL without its password."""
    from .postgres.engine import redact as redact_url

    return redact_url(url)


# ---------------------------------------------------------------------------------------------
# Output


def fail(message: str, code: int) -> int:
    """Print ``message`` as the one line of an error on stderr; return the exit ``code``."""
    click.echo(f"sqlbus: error: {_one_line(message)}", err=True)
    return code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def json_out(value: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as aligned columns (``(none)`` when there are no rows)."""
    if not rows:
        click.echo("(none)")
        return
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value % 1 else str(int(value))
    if isinstance(value, (dict, list)):
        return shorten(json.dumps(value, separators=(",", ":")))
    return str(value)


def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
