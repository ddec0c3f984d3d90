"""``sqlbus``: the admin command line, a thin skin over the library.

Each command opens the bus (``--db PATH`` or ``SQLBUS_DB``), makes one library call and
prints what it returns: a table for people, ``--json`` for scripts (stable keys, the same
numbers as the library's structs). Errors are one line on stderr and exit code 1 (the
database or the operation failed) or 2 (bad arguments); no traceback, and no file is created
or changed on the way: only ``init`` creates a database.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, get_args

import click
import msgspec
from click.core import ParameterSource

from . import __version__
from .bus import Agent, AgentInfo, Bus, connect
from .encoding import check_agent_id
from .errors import DatabaseError, SqlbusError, ValidationError
from .messages import Message, MessageType
from .metrics import to_openmetrics, to_prometheus
from .storage import check_file
from .worker import MAX_CONCURRENCY

__all__ = ["cli", "main", "parse_duration"]

# The --type choices, in SPEC 1.2's order (MESSAGE_TYPES is a set: its order changes per run)
TYPES = get_args(MessageType)

log = logging.getLogger("sqlbus")

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


def _duration_text(seconds: float | None) -> str:
    """A duration as people write it (``7d``, ``12h``, ``90s``), or ``never``."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _given(*names: str) -> list[str]:
    """Which of the current command's options ``names`` were given (not their defaults):
    ``never`` gives None, like an option left out, and means something else."""
    ctx = click.get_current_context()
    return [name for name in names if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT]


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 1 or 2, never a traceback


# click >= 8.2 raises this for a group called without a command: show its help.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    """A group whose errors are one line on stderr: 2 for bad arguments, 1 for the rest."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = 0
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except _NO_ARGS_IS_HELP as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "")
            code = 0
        except click.UsageError as exc:
            hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx else ""
            code = _fail(f"{exc.format_message()}{hint}", 2)
        except click.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            code = _fail("aborted", 1)
        except KeyboardInterrupt:
            code = 130
        except BrokenPipeError:
            # The reader of our output went away (| head): not an error worth a line.
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stop flush at exit failing
            except OSError:
                pass
            code = 1
        except ValidationError as exc:  # a value given on the command line broke a rule
            code = _fail(str(exc), 2)
        except SqlbusError as exc:
            code = _fail(str(exc), 1)
        except KeyError as exc:
            code = _fail(str(exc.args[0]) if exc.args else "not found", 1)
        except (ValueError, TypeError) as exc:
            code = _fail(str(exc), 2)
        except Exception as exc:  # the promise is: never a traceback
            code = _fail(f"unexpected {type(exc).__name__}: {exc}", 1)
        if not standalone_mode:
            return code
        sys.exit(code)


def _fail(message: str, code: int) -> int:
    click.echo(f"sqlbus: error: {_one_line(message)}", err=True)
    return code


# ---------------------------------------------------------------------------------------------
# Opening the database


class _Config:
    def __init__(self, db: str | None) -> None:
        self.db = db

    def path(self) -> str:
        if not self.db:
            raise click.UsageError("no database given: use --db PATH or set SQLBUS_DB")
        return self.db

    @contextmanager
    def bus(self) -> Iterator[Bus]:
        """Open an existing sqlbus database (never create one: that is ``init``'s job)."""
        path = self.path()
        if not os.path.lexists(path):
            raise click.ClickException(
                f"{path}: no such database (create it with: sqlbus --db {path} init)"
            )
        # connect() would make a sqlbus database of an empty file (or of an empty SQLite one)
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


pass_config = click.make_pass_decorator(_Config)


def _set_db(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--db`` after the command name: it wins over one before it and over SQLBUS_DB."""
    if value is not None:
        ctx.ensure_object(_Config).db = value


db_after_command = click.Option(
    ["--db"], metavar="PATH", expose_value=False, callback=_set_db,
    help="The database file (also before the command; default: SQLBUS_DB).",
)

yes_option = click.option("--yes", "-y", is_flag=True,
                          help="Do not ask for confirmation (required without a terminal).")


def _confirm(question: str, yes: bool) -> None:
    """Go on only with --yes or a yes typed on the terminal; else exit 1, nothing changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(f"{question} Refused: no terminal to ask on; give --yes")
    if not click.confirm(question, default=False, err=True):
        raise click.ClickException("not confirmed: nothing changed")


# ---------------------------------------------------------------------------------------------
# Output


def _json_out(value: Any) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as aligned columns (``(none)`` when there are no rows)."""
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value % 1 else str(int(value))
    if isinstance(value, (dict, list)):
        return _shorten(json.dumps(value, separators=(",", ":")))
    return str(value)


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _recipients(to: str | list[str]) -> str:
    return to if isinstance(to, str) else ",".join(to) or "(nobody)"


class _Progress:
    """A progress bar on stderr when it is a terminal; nothing when piped."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.length = max(total, 1)
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    progress = _Progress(label)
    try:
        yield progress
    finally:
        progress.close()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")


# ---------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="SQLBUS_DB",
    metavar="PATH",
    help="The database file (default: the SQLBUS_DB environment variable).",
)
@click.version_option(__version__, prog_name="sqlbus")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Inspect and repair a sqlbus database: depths, dead letters, metrics, backups.

    --db (or SQLBUS_DB) goes before or after the command. Exit codes: 0 success, 1 a failed
    operation (bad or missing database, not found, a refusal), 2 a bad argument.

    \b
    Shell completion (bash; zsh_source and fish_source likewise):
        eval "$(_SQLBUS_COMPLETE=bash_source sqlbus)"

    \b
    Example:
        sqlbus --db team.db stats
    """
    ctx.obj = _Config(db)


@cli.command()
@pass_config
def init(config: _Config) -> None:
    """Create a sqlbus database (WAL mode, schema); harmless on an existing one.

    \b
    Example:
        sqlbus --db team.db init
    """
    path = config.path()
    existed = os.path.exists(path) and os.path.getsize(path) > 0
    with connect(path) as bus:
        pass
    verb = "is already" if existed else "created"
    click.echo(f"{bus.path}: {verb} a sqlbus database")


@cli.command()
@json_option
@pass_config
def stats(config: _Config, as_json: bool) -> None:
    """Per-agent inbox depths: ready, leased, retrying, scheduled, expired, dead, oldest ready age.

    \b
    Example:
        sqlbus --db team.db stats --json
    """
    with config.bus() as bus:
        rows = bus.stats()
    if as_json:
        _json_out(rows)
        return
    _table(
        ["agent", "ready", "leased", "retrying", "scheduled", "expired", "dead", "oldest_ready_ms"],
        [(s.agent, s.ready, s.leased, s.retrying, s.scheduled, s.expired, s.dead,
          s.oldest_ready_age_ms) for s in rows],
    )


@cli.command()
@json_option
@pass_config
def agents(config: _Config, as_json: bool) -> None:
    """The agent registry: id, status, alive (seen in the last 60 s), last seen, registered,
    and subscriptions (message types, and event patterns as event:PATTERN).

    \b
    Example:
        sqlbus --db team.db agents
    """
    with config.bus() as bus:
        rows = bus.agents()
    if as_json:
        _json_out(rows)
        return
    _table(
        ["id", "status", "alive", "last_seen", "registered_at", "subscriptions"],
        [(a.id, a.status, a.alive, a.last_seen, a.registered_at, _subscriptions(a))
         for a in rows],
    )


def _warn_unregistered(bus: Bus, agents: Sequence[str]) -> None:
    """One line on stderr naming the agents no process has registered (most likely a typo)."""
    registered = {a.id for a in bus.agents()}
    unknown = sorted(set(agents) - registered)
    if unknown:
        click.echo(f"sqlbus: warning: not a registered agent: {', '.join(map(repr, unknown))}",
                   err=True)


def _subscriptions(agent: AgentInfo) -> str | None:
    return ", ".join(
        s.pattern if s.kind == "type" else f"event:{s.pattern}" for s in agent.subscriptions
    ) or None


@cli.command()
@click.argument("agent")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@json_option
@pass_config
def peek(config: _Config, agent: str, limit: int, as_json: bool) -> None:
    """Look at AGENT's inbox without claiming anything (receive's order, then by due time).

    \b
    Example:
        sqlbus --db team.db peek worker-1 --limit 5
    """
    with config.bus() as bus:
        entries = bus.peek(agent, limit)
        _warn_unregistered(bus, [agent])
    if as_json:
        _json_out(entries)
        return
    _table(
        ["status", "id", "type", "from", "priority", "attempts", "payload"],
        [(e.status, e.message.id, e.message.type, e.message.sender, e.message.headers.priority,
          e.attempts, e.message.payload) for e in entries],
    )


@cli.command()
@click.option("--from", "sender", required=True, help="The sending agent (registered if new).")
@click.option("--to", "to", required=True, multiple=True, help="A recipient (repeat for more).")
@click.option("--type", "type_", required=True, type=click.Choice(TYPES), help="Message type.")
@click.option("--payload", type=JSON, default="{}", show_default=True, help="Payload as JSON.")
@click.option("--priority", type=click.IntRange(1, 5), default=3, show_default=True)
@click.option("--ttl", type=click.IntRange(min=0), default=30_000, show_default=True,
              help="Time to live in ms (0 = never expires).")
@click.option("--requires-ack", is_flag=True, help="Ask for an acknowledgment.")
@click.option("--correlation-id", default=None)
@click.option("--delay", type=DURATION, default=None, help="Deliver after this long (e.g. 30s).")
@json_option
@pass_config
def send(
    config: _Config, sender: str, to: tuple[str, ...], type_: str, payload: Any, priority: int,
    ttl: int, requires_ack: bool, correlation_id: str | None, delay: float | None, as_json: bool,
) -> None:
    """Publish one message and print its id.

    \b
    Example:
        sqlbus --db team.db send --from ops --to worker-1 --type notification --payload '{"text": "hi"}'
    """
    with config.bus() as bus:
        # Publish first and register the sender after: a message that fails validation
        # writes nothing, not even the sender's registration.
        message_id = Agent(bus, check_agent_id(sender, "--from")).publish(
            to[0] if len(to) == 1 else list(to), type_, payload, priority=priority, ttl=ttl,
            requires_ack=requires_ack, correlation_id=correlation_id, delay=delay or 0.0,
        )
        bus.agent(sender)
        _warn_unregistered(bus, to)
    if as_json:
        _json_out({"id": message_id})
    else:
        click.echo(message_id)


@cli.command()
@click.option("--agent", default=None, help="Only messages sent by or to this agent.")
@click.option("--type", "types", multiple=True, type=click.Choice(TYPES),
              help="Only this type (repeat for more).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N messages.")
@click.option("--timeout", type=DURATION, default=None, help="Stop after this long (e.g. 10s).")
@json_option
@pass_config
def tail(
    config: _Config, agent: str | None, types: tuple[str, ...], count: int | None,
    timeout: float | None, as_json: bool,
) -> None:
    """Follow new messages as any process publishes them, until Ctrl-C.

    With --json, one JSON object per line: {"message", "recipients", "sent_at"}.

    \b
    Example:
        sqlbus --db team.db tail --agent worker-1 --type error
    """
    seen = 0
    with config.bus() as bus:
        try:
            for record in bus.tail(agent, list(types) or None, timeout=timeout):
                if as_json:
                    click.echo(msgspec.json.encode(record).decode())
                else:
                    m: Message = record.message
                    click.echo(
                        f"{record.sent_at}  {m.sender} -> {_recipients(record.recipients)}  "
                        f"{m.type}  {m.id}  {_shorten(json.dumps(m.payload, separators=(',', ':')))}"
                    )
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how tail ends


def _import_handler(target: str) -> Callable[..., Any]:
    """FUNCTION from MODULE (``pkg.mod:func`` or ``mod:Class.method``), the current directory
    first on sys.path as ``python -m`` has it."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"expected MODULE:FUNCTION, got {target!r}",
                                 param_hint="'MODULE:FUNCTION'")
    if sys.path[:1] != [os.getcwd()]:
        sys.path.insert(0, os.getcwd())
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise click.BadParameter(f"no module named {module_name!r} (in {os.getcwd()} or on "
                                     "sys.path)", param_hint="'MODULE:FUNCTION'") from exc
        raise click.ClickException(f"importing {module_name}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # the module itself fails: its error, in one line
        raise click.ClickException(f"importing {module_name}: {type(exc).__name__}: {exc}") from exc
    for name in attribute.split("."):
        if not hasattr(value, name):
            raise click.BadParameter(f"module {module_name!r} has no {attribute!r}",
                                     param_hint="'MODULE:FUNCTION'")
        value = getattr(value, name)
    if not callable(value):
        raise click.BadParameter(f"{target} is a {type(value).__name__}, not a function",
                                 param_hint="'MODULE:FUNCTION'")
    return value


@cli.command()
@click.argument("target", metavar="MODULE:FUNCTION")
@click.option("--agent", "agent_id", required=True, help="The agent id to receive as.")
@click.option("--type", "types", multiple=True, type=click.Choice(("*", *TYPES)),
              help="A message type to handle (repeat for more; default: * = every type).")
@click.option("--concurrency", type=click.IntRange(1, MAX_CONCURRENCY), default=1,
              show_default=True, help="Messages in handlers at once (threads); order holds only with 1.")
@pass_config
def worker(
    config: _Config, target: str, agent_id: str, types: tuple[str, ...], concurrency: int
) -> None:
    """Run FUNCTION from MODULE as AGENT's handler in a run loop until SIGINT or SIGTERM.

    FUNCTION(message) is called for each message of the --type(s); its return value answers
    a request. MODULE is imported with the current directory first on sys.path. Logs go to
    stderr; on SIGINT/SIGTERM the messages in handlers finish, then it exits 0.

    \b
    Example:
        sqlbus --db team.db worker jobs:handle --agent worker-1 --type task_assignment
    """
    handler = _import_handler(target)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with config.bus() as bus:
        agent = bus.agent(agent_id)
        for type_ in types or ("*",):
            agent.subscribe(type_, handler)
        log.info("sqlbus worker: agent %s runs %s for %s (concurrency %d)", agent_id, target,
                 ", ".join(types or ("*",)), concurrency)
        processed = agent.run(concurrency=concurrency)
    log.info("sqlbus worker: agent %s stopped after %d message(s)", agent_id, processed)


def _agent_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An --agent filter names one agent: say so here, in the words of this option (the
    library's error speaks of publish and broadcast)."""
    if value is not None and re.search(r"[*?\[]", value):
        raise click.BadParameter(f"takes one agent id, not a pattern: {value!r}")
    return value


@cli.group("dead-letters", cls=click.Group)
def dead_letters() -> None:
    """List, show, requeue and purge dead letters.

    \b
    Example:
        sqlbus --db team.db dead-letters list --agent worker-1
    """


@dead_letters.command("list")
@click.option("--agent", default=None, callback=_agent_id, help="Only this recipient's dead letters.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@json_option
@pass_config
def dead_letters_list(config: _Config, agent: str | None, limit: int, as_json: bool) -> None:
    """Dead letters, newest first: id, agent, reason, error, attempts, failed at.

    \b
    Example:
        sqlbus --db team.db dead-letters list --json
    """
    with config.bus() as bus:
        rows = bus.dead_letters(agent, limit)
    if as_json:
        _json_out(rows)
        return
    _table(
        ["id", "agent", "reason", "error", "attempts", "failed_at", "message"],
        [(d.id, d.agent, d.reason, _shorten(f"{d.error_name}: {d.error_message}", 40)
          if d.error_name else None, d.attempts, d.failed_at, d.message.id) for d in rows],
    )


def _dead_letter_ref(text: str) -> int | str:
    """A REF argument: digits are a dead-letter number (however many: one beyond any number
    names none), anything else a message id."""
    digits = text.strip()
    if digits.isdigit() and digits.isascii():
        return int(digits) if len(digits) <= 20 else 2**64  # 2**64: beyond SQLite's ids
    return text


@dead_letters.command("show")
@click.argument("ref", metavar="REF")
@json_option
@pass_config
def dead_letters_show(config: _Config, ref: str, as_json: bool) -> None:
    """One dead letter in full: the message, the error and its traceback. REF is its number,
    or a message id (the newest of that message's dead letters).

    \b
    Example:
        sqlbus --db team.db dead-letters show 42
    """
    with config.bus() as bus:
        record = bus.dead_letter(_dead_letter_ref(ref))
    if record is None:
        raise click.ClickException(f"no dead letter {_shorten(ref, 60)!r}")
    if as_json:
        _json_out(record)
        return
    for name in ("id", "agent", "reason", "error_name", "error_message", "attempts", "failed_at"):
        click.echo(f"{name}: {_cell(getattr(record, name))}")
    click.echo(f"context: {json.dumps(record.context)}")
    click.echo("message: " + msgspec.json.format(msgspec.json.encode(record.message), indent=2).decode())
    if record.traceback:
        click.echo("traceback:\n" + record.traceback.rstrip())


@dead_letters.command("requeue")
@click.argument("dead_letter_id", metavar="[REF]", required=False)
@click.option("--all", "all_", is_flag=True, help="Every dead letter matching the filters.")
@click.option("--agent", default=None, callback=_agent_id, help="With --all: only this recipient's (an agent id).")
@click.option("--reason", default=None, help="With --all: only this reason (e.g. expired).")
@json_option
@pass_config
def dead_letters_requeue(
    config: _Config, dead_letter_id: str | None, all_: bool, agent: str | None,
    reason: str | None, as_json: bool,
) -> None:
    """Put dead letters back in their inboxes (attempts reset, fresh TTL), by REF (a number, or
    a message id: all of its dead letters) or --all.

    \b
    Example:
        sqlbus --db team.db dead-letters requeue --all --agent worker-1 --reason max_attempts
    """
    if (dead_letter_id is None) == (not all_):
        raise click.UsageError("give a dead letter REF or --all (not both)")
    if dead_letter_id is not None and (agent or reason):
        raise click.UsageError("--agent and --reason filter --all; a REF names its dead letters")
    with config.bus() as bus:
        if dead_letter_id is not None:
            ids = [bus.requeue(_dead_letter_ref(dead_letter_id))]
        else:
            ids = bus.requeue_dead_letters(agent, reason)
    if as_json:
        _json_out({"requeued": ids})
    else:
        click.echo(f"requeued {len(ids)} message(s)")


@dead_letters.command("purge")
@click.option("--older-than", type=DURATION, default=None, help="Only those older (e.g. 30d).")
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@yes_option
@json_option
@pass_config
def dead_letters_purge(
    config: _Config, older_than: float | None, all_: bool, yes: bool, as_json: bool
) -> None:
    """Delete dead letters for good: those older than --older-than, or --all. Asks first on a
    terminal; --yes skips the question (and is required without a terminal).

    \b
    Example:
        sqlbus --db team.db dead-letters purge --older-than 30d --yes
    """
    if (older_than is None) == (not all_):
        raise click.UsageError("give --older-than DURATION or --all (not both)")
    with config.bus() as bus:
        _confirm("Delete every dead letter for good?" if all_ else
                 f"Delete the dead letters older than {_duration_text(older_than)} for good?", yes)
        deleted = bus.purge_dead_letters(older_than)
    if as_json:
        _json_out({"purged": deleted})
    else:
        click.echo(f"purged {deleted} dead letter(s)")


@cli.group("state", cls=click.Group)
def state() -> None:
    """Read and write the shared, versioned state.

    \b
    Example:
        sqlbus --db team.db state list --prefix job/
    """


@state.command("get")
@click.argument("key")
@json_option
@pass_config
def state_get(config: _Config, key: str, as_json: bool) -> None:
    """Print KEY's value (JSON) and version; exit 1 when it is absent.

    \b
    Example:
        sqlbus --db team.db state get plan --json
    """
    with config.bus() as bus:
        entry = bus.state.get(key)
    if entry is None:
        raise click.ClickException(f"state key {key!r} is absent")
    if as_json:
        _json_out(entry)
    else:
        click.echo(json.dumps(entry.value))
        click.echo(f"(version {entry.version}, by {entry.updated_by or '-'}, at {entry.updated_at})",
                   err=True)


@state.command("set")
@click.argument("key")
@click.argument("value", type=JSON)
@click.option("--expected-version", type=click.IntRange(min=0, max=2**63 - 1), default=None,
              help="Compare-and-set: write only if the version is this (0 = absent).")
@click.option("--no-notify", is_flag=True, help="Send no state_change message.")
@json_option
@pass_config
def state_set(
    config: _Config, key: str, value: Any, expected_version: int | None, no_notify: bool,
    as_json: bool,
) -> None:
    """Write VALUE (JSON) as KEY's next version and print the version.

    \b
    Example:
        sqlbus --db team.db state set plan '{"step": 2}' --expected-version 1
    """
    with config.bus() as bus:
        version = bus.state.set(key, value, expected_version=expected_version,
                                notify=not no_notify)
    if as_json:
        _json_out({"key": key, "version": version})
    else:
        click.echo(str(version))


@state.command("delete")
@click.argument("key")
@click.option("--expected-version", type=click.IntRange(min=1, max=2**63 - 1), default=None,
              help="Delete only if the version is this.")
@click.option("--no-notify", is_flag=True, help="Send no state_change message.")
@yes_option
@json_option
@pass_config
def state_delete(
    config: _Config, key: str, expected_version: int | None, no_notify: bool, yes: bool,
    as_json: bool,
) -> None:
    """Delete KEY and print the version of the deletion; exit 1 when it is absent. Asks first
    on a terminal; --yes skips the question (and is required without a terminal).

    \b
    Example:
        sqlbus --db team.db state delete plan --yes
    """
    with config.bus() as bus:
        entry = bus.state.get(key)
        if entry is None:
            raise click.ClickException(f"state key {key!r} is absent")
        _confirm(f"Delete state key {key!r} (version {entry.version})?", yes)
        version = bus.state.delete(key, expected_version=expected_version,
                                   notify=not no_notify)
    if version == 0:
        raise click.ClickException(f"state key {key!r} is absent")
    if as_json:
        _json_out({"key": key, "version": version})
    else:
        click.echo(str(version))


@state.command("list")
@click.option("--prefix", default="", help="Only keys starting with this.")
@json_option
@pass_config
def state_list(config: _Config, prefix: str, as_json: bool) -> None:
    """Every live key under --prefix with its version, writer, time and value.

    \b
    Example:
        sqlbus --db team.db state list --prefix job/ --json
    """
    with config.bus() as bus:
        entries = bus.state.items(prefix)
    if as_json:
        _json_out(entries)
        return
    _table(
        ["key", "version", "updated_by", "updated_at", "value"],
        [(e.key, e.version, e.updated_by, e.updated_at, json.dumps(e.value)) for e in entries],
    )


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json", "prometheus", "openmetrics"]),
              default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as --format json).")
@pass_config
def metrics(config: _Config, fmt: str, as_json: bool) -> None:
    """Bus-wide metrics: totals, throughput, delivery time, errors, depths, file sizes.

    json is the seed's generateReport; prometheus is the Prometheus text format, openmetrics
    is OpenMetrics (for a scrape that asks for application/openmetrics-text).

    \b
    Example:
        sqlbus --db team.db metrics --format prometheus
    """
    if as_json and _given("fmt") and fmt != "json":
        raise click.UsageError(f"--json is --format json, not --format {fmt}")
    with config.bus() as bus:
        m = bus.metrics()
    if as_json or fmt == "json":
        _json_out(m)
        return
    if fmt == "prometheus":
        click.echo(to_prometheus(m), nl=False)
        return
    if fmt == "openmetrics":
        click.echo(to_openmetrics(m), nl=False)
        return
    scalar = [
        (f.replace("_", " "), getattr(m, f))
        for f in m.__struct_fields__
        if not isinstance(getattr(m, f), (dict, msgspec.Struct))
    ]
    scalar.insert(scalar.index(("success rate", m.success_rate)),
                  ("throughput per second", m.throughput.per_second))
    scalar.insert(scalar.index(("success rate", m.success_rate)),
                  ("throughput per minute", m.throughput.per_minute))
    width = max(len(k) for k, _ in scalar)
    for key, value in scalar:
        click.echo(f"{key.ljust(width)}  {_cell(value)}")
    click.echo("")
    names = sorted(set(m.agent_activity) | set(m.queue_depths))
    _table(
        ["agent", "sent", "received", "ready", "leased", "retrying", "dead"],
        [(n, *(getattr(m.agent_activity.get(n), f, 0) for f in ("sent", "received")),
          *(getattr(m.queue_depths.get(n), f, 0) for f in ("ready", "leased", "retrying", "dead")))
         for n in names],
    )
    if m.error_rates:
        click.echo("")
        _table(["error", "count"], sorted(m.error_rates.items()))


@cli.command("config")
@click.option("--archive-retention", type=DURATION, default=None, metavar="D",
              help="Keep acked messages this long after their ack (e.g. 7d; 'never').")
@click.option("--dead-retention", type=DURATION, default=None, metavar="D",
              help="Keep dead letters this long after they failed (e.g. 30d; 'never').")
@click.option("--archive-max-messages", type=COUNT, default=None, metavar="N",
              help="Keep at most N acked messages, the oldest go first ('none': no bound).")
@json_option
@pass_config
def config_command(
    config: _Config, archive_retention: float | None, dead_retention: float | None,
    archive_max_messages: int | None, as_json: bool,
) -> None:
    """Show the retention policy stored in the database, or set the parts given.

    Every process that opens the database prunes by this policy (in the background, a small
    batch at a time); options left out keep their stored value.

    \b
    Example:
        sqlbus --db team.db config --archive-retention 1d --dead-retention never
    """
    given = {"archive_retention": archive_retention, "dead_retention": dead_retention,
             "archive_max_messages": archive_max_messages}
    changes: dict[str, Any] = {name: given[name] for name in _given(*given)}
    with config.bus() as bus:
        policy = bus.set_retention(**changes) if changes else bus.retention()
    if as_json:
        _json_out(policy)
        return
    for name, text in (
        ("archive_retention", _duration_text(policy.archive_retention)),
        ("dead_retention", _duration_text(policy.dead_retention)),
        ("archive_max_messages", "none" if policy.archive_max_messages is None
         else str(policy.archive_max_messages)),
    ):
        click.echo(f"{name.ljust(20)}  {text}")


@cli.command()
@click.option("--sent-older-than", type=DURATION, default=None, metavar="D",
              help="Delete acked messages acked longer ago than this ('never' keeps them; "
                   "default: the stored policy, see config).")
@click.option("--dead-older-than", type=DURATION, default=None, metavar="D",
              help="Delete dead letters older than this ('never' keeps them; default: the "
                   "stored policy).")
@yes_option
@json_option
@pass_config
def prune(
    config: _Config, sent_older_than: float | None, dead_older_than: float | None, yes: bool,
    as_json: bool,
) -> None:
    """Apply retention now: delete old acked messages (the sent archive) and dead letters.

    Without options, applies the policy stored in the database (see config), including its
    bound on the number of acked messages. Metrics totals keep counting what is deleted. Run
    vacuum afterwards to shrink the file. Asks first on a terminal; --yes skips the question
    (and is required without a terminal).

    \b
    Example:
        sqlbus --db team.db prune --sent-older-than 1d --dead-older-than 7d --yes
    """
    ages = {"sent_older_than": sent_older_than, "dead_older_than": dead_older_than}
    overrides: dict[str, Any] = {name: ages[name] for name in _given(*ages)}
    limits = ", ".join(f"{name.replace('_', ' ')} {_duration_text(seconds)}"
                       for name, seconds in overrides.items()) or "by the stored policy"
    with config.bus() as bus:
        _confirm(f"Delete old acked messages and dead letters for good ({limits})?", yes)
        with _progress("pruning") as progress:
            result = bus.prune(**overrides, progress=progress)
    if as_json:
        _json_out(result)
    else:
        click.echo(f"pruned {result.acked} acked message(s) and {result.dead_letters} dead letter(s)")


@cli.command()
@json_option
@pass_config
def check(config: _Config, as_json: bool) -> int:
    """Integrity check, schema version, WAL size and pinning, expired leases; exit 1 on problems.

    \b
    Example:
        sqlbus --db team.db check
    """
    try:
        with config.bus() as bus:
            report = bus.check()
    except DatabaseError as exc:
        # The file is too damaged to open or read: the library's advice (run this very
        # command) does not fit here; what does is the backup.
        what = [part for part in str(exc).split("; ") if "sqlbus check" not in part]
        if len(what) == len(str(exc).split("; ")):
            raise
        raise click.ClickException(
            "; ".join(what) + "; restore it from a backup (one 'sqlbus backup' made)"
        ) from exc
    if as_json:
        _json_out(report)
    else:
        click.echo(f"integrity:      {'ok' if report.integrity == ['ok'] else 'FAILED'}")
        click.echo(f"schema version: {report.schema_version} "
                   f"(this sqlbus reads {report.supported_schema_version})")
        click.echo(f"database:       {report.db_bytes} bytes")
        click.echo(f"wal:            {report.wal_bytes} bytes, {report.wal_frames} frames, "
                   f"{report.wal_frames_checkpointed} checkpointed"
                   + (" - PINNED by a reader" if report.wal_pinned else ""))
        click.echo(f"expired leases: {report.expired_leases}")
        click.echo(f"expired messages not yet dead-lettered: {report.expired_messages}")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo("ok" if report.ok else "NOT OK")
    return 0 if report.ok else 1


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@json_option
@pass_config
def backup(config: _Config, dest: str, as_json: bool) -> None:
    """Copy the database, online and consistent, to the new file DEST (writers keep going).

    \b
    Example:
        sqlbus --db team.db backup /backups/team-$(date +%F).db
    """
    with config.bus() as bus, _progress("backing up") as progress:
        result = bus.backup(dest, progress=progress)
    if as_json:
        _json_out(result)
    else:
        click.echo(f"backed up {result.pages} pages ({result.bytes} bytes) to {result.dest} "
                   f"in {result.seconds:.2f}s")


@cli.command()
@json_option
@pass_config
def vacuum(config: _Config, as_json: bool) -> int:
    """Rebuild the file to return the space of deleted rows (run after a large prune); exit 1
    when it could not shrink it (a reader pins the WAL).

    \b
    Example:
        sqlbus --db team.db vacuum
    """
    with config.bus() as bus:
        if sys.stderr.isatty():
            click.echo("vacuuming (holds writers back while it copies)...", err=True)
        result = bus.vacuum()
    if as_json:
        _json_out(result)
    elif result.shrunk:
        click.echo(f"vacuumed: {result.bytes_before} -> {result.bytes_after} bytes")
    if not result.shrunk:
        return _fail(f"vacuum could not shrink the file: {result.reason}", 1)
    return 0


def _commands(command: click.Command) -> Iterator[click.Command]:
    """Every command and group under ``command`` (itself included)."""
    yield command
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _commands(sub)


def _example_last(command: click.Command) -> None:
    # The docstrings end with their example; move it to the epilog so that --help ends with
    # it, after the options and subcommands.
    text = command.help or ""
    match = re.search(r"\n[ \t]*\x08[ \t]*\n[ \t]*Example:[ \t]*\n(.*)$", text, re.S)
    if match:
        command.help = text[: match.start()].rstrip()
        lines = [line.strip() for line in match.group(1).strip().splitlines()]
        command.epilog = "\b\nExample:\n" + "\n".join(f"    {line}" for line in lines)


for _command in _commands(cli):
    _example_last(_command)
    if _command is not cli:
        _command.params.append(db_after_command)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``sqlbus`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="sqlbus")


if __name__ == "__main__":
    main()
