"""``sqlbus``: the admin command line, a thin skin over the library.

Each command opens the bus (``--db PATH`` or ``SQLBUS_DB``), makes one library call and
prints what it returns: a table for people, ``--json`` for scripts (stable keys, the same
numbers as the library's structs). Errors are one line on stderr and exit code 1 (the
database or the operation failed) or 2 (bad arguments); no traceback, and no file is created
or changed on the way: only ``init`` creates a database.

This module holds the group, its error handling and the commands that use a bus (init,
stats, agents, peek, send, tail, worker); :mod:`sqlbus.cli_admin` the commands that look after
one; :mod:`sqlbus.cli_common` what they share.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, get_args

import click
import msgspec

from . import __version__
from .agent import Agent
from .bus import Bus
from .cli_admin import COMMANDS
from .cli_common import (
    DURATION,
    JSON,
    Config,
    bus_in_schema,
    fail,
    json_option,
    json_out,
    parse_duration,
    pass_config,
    shorten,
    table,
)
from .encoding import check_agent_id
from .errors import SqlbusError, ValidationError
from .messages import Message, MessageType
from .records import AgentInfo
from .worker import MAX_CONCURRENCY

__all__ = ["cli", "main", "parse_duration"]

# The --type choices, in SPEC 1.2's order (MESSAGE_TYPES is a set: its order changes per run)
TYPES = get_args(MessageType)

log = logging.getLogger("sqlbus")

# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 1 or 2, never a traceback


# click >= 8.2 raises this for a group called without a command: show its help.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


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
            code = fail(f"{exc.format_message()}{hint}", 2)
        except click.ClickException as exc:
            code = fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            code = fail("aborted", 1)
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
            code = fail(str(exc), 2)
        except SqlbusError as exc:
            code = fail(str(exc), 1)
        except KeyError as exc:
            code = fail(str(exc.args[0]) if exc.args else "not found", 1)
        except (ValueError, TypeError) as exc:
            code = fail(str(exc), 2)
        except Exception as exc:  # the promise is: never a traceback
            code = fail(f"unexpected {type(exc).__name__}: {exc}", 1)
        if not standalone_mode:
            return code
        sys.exit(code)


def _set_db(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--db`` after the command name: it wins over one before it and over SQLBUS_DB."""
    if value is not None:
        ctx.ensure_object(Config).db = value


def _set_schema(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--schema`` after the command name: it wins over one before it and SQLBUS_SCHEMA."""
    if value is not None:
        ctx.ensure_object(Config).schema = value


db_after_command = click.Option(
    ["--db"], metavar="PATH|URL", expose_value=False, callback=_set_db,
    help="The database file or postgresql:// URL (also before the command; default: SQLBUS_DB).",
)
schema_after_command = click.Option(
    ["--schema"], metavar="NAME", expose_value=False, callback=_set_schema,
    help="PostgreSQL: the bus's schema (also before the command; default: SQLBUS_SCHEMA or sqlbus).",
)


# ---------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="SQLBUS_DB",
    metavar="PATH|URL",
    help="The database file or postgresql:// URL (default: the SQLBUS_DB environment variable).",
)
@click.option(
    "--schema",
    envvar="SQLBUS_SCHEMA",
    metavar="NAME",
    help="PostgreSQL: the bus's schema (default: SQLBUS_SCHEMA, else sqlbus).",
)
@click.version_option(__version__, prog_name="sqlbus")
@click.pass_context
def cli(ctx: click.Context, db: str | None, schema: str | None) -> None:
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
    ctx.obj = Config(db, schema)


@cli.command()
@pass_config
def init(config: Config) -> None:
    """Create a sqlbus database (WAL mode, schema); harmless on an existing one.

    \b
    Example:
        sqlbus --db team.db init
    """
    path = config.path()
    if config.is_url():
        existed = bus_in_schema(path, config.schema_name())
    else:
        existed = os.path.exists(path) and os.path.getsize(path) > 0
    with config.connect() as bus:
        pass
    verb = "is already" if existed else "created"
    click.echo(f"{bus.path}: {verb} a sqlbus database")


@cli.command()
@json_option
@pass_config
def stats(config: Config, as_json: bool) -> None:
    """Per-agent inbox depths: ready, leased, retrying, scheduled, expired, dead, oldest ready age.

    \b
    Example:
        sqlbus --db team.db stats --json
    """
    with config.bus() as bus:
        rows = bus.stats()
    if as_json:
        json_out(rows)
        return
    table(
        ["agent", "ready", "leased", "retrying", "scheduled", "expired", "dead", "oldest_ready_ms"],
        [(s.agent, s.ready, s.leased, s.retrying, s.scheduled, s.expired, s.dead,
          s.oldest_ready_age_ms) for s in rows],
    )


@cli.command()
@json_option
@pass_config
def agents(config: Config, as_json: bool) -> None:
    """The agent registry: id, status, alive (seen in the last 60 s), last seen, registered,
    and subscriptions (message types, and event patterns as event:PATTERN).

    \b
    Example:
        sqlbus --db team.db agents
    """
    with config.bus() as bus:
        rows = bus.agents()
    if as_json:
        json_out(rows)
        return
    table(
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
def peek(config: Config, agent: str, limit: int, as_json: bool) -> None:
    """Look at AGENT's inbox without claiming anything (receive's order, then by due time).

    \b
    Example:
        sqlbus --db team.db peek worker-1 --limit 5
    """
    with config.bus() as bus:
        entries = bus.peek(agent, limit)
        _warn_unregistered(bus, [agent])
    if as_json:
        json_out(entries)
        return
    table(
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
    config: Config, sender: str, to: tuple[str, ...], type_: str, payload: Any, priority: int,
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
        json_out({"id": message_id})
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
    config: Config, agent: str | None, types: tuple[str, ...], count: int | None,
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
                        f"{m.type}  {m.id}  {shorten(json.dumps(m.payload, separators=(',', ':')))}"
                    )
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how tail ends


def _recipients(to: str | list[str]) -> str:
    return to if isinstance(to, str) else ",".join(to) or "(nobody)"


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
    config: Config, target: str, agent_id: str, types: tuple[str, ...], concurrency: int
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


@cli.command()
@click.option("--agent", "agent_id", required=True, help="The agent id the server acts as.")
@click.option("--lease", type=DURATION, default=300.0, show_default=True,
              help="Default lease of a received message (e.g. 5m).")
@click.option("--max-wait", type=DURATION, default=50.0, show_default=True,
              help="Cap on receive's wait_seconds and request's timeout_seconds.")
@click.option("--read-only", is_flag=True, help="Offer only the tools that read; write nothing.")
@pass_config
def mcp(config: Config, agent_id: str, lease: float | None, max_wait: float | None,
        read_only: bool) -> None:
    """Run an MCP server over stdio that acts as AGENT (for Claude Code, Codex, Cursor...).

    Tools: send, broadcast, receive, ack, fail, extend, reply, request, state_get/set/list,
    emit_event, subscribe, agents, inbox_stats, dead_letters, requeue. Needs the extra
    sqlbus[mcp]. On stdin EOF it gives back the messages it holds and exits 0.

    \b
    Example:
        sqlbus --db team.db mcp --agent claude-1
    """
    check_agent_id(agent_id, "--agent")
    if not lease or not max_wait:
        raise click.BadParameter("must be a positive duration", param_hint="--lease/--max-wait")
    try:
        from .mcp_server import serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("mcp", "pydantic", "anyio"):
            raise
        raise click.ClickException(
            "sqlbus mcp needs the MCP SDK: pip install 'sqlbus[mcp]'") from exc
    config.path()  # a missing --db is a usage error now, not a tool error later
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # stdout is the protocol's
    serve(config.connect, agent_id, lease=lease, max_wait=max_wait, read_only=read_only)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on; not a loopback one only with a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8642, show_default=True)
@click.option("--token", envvar="SQLBUS_DASHBOARD_TOKEN", metavar="T",
              help="The access token, 16 characters or more (default: SQLBUS_DASHBOARD_TOKEN, "
                   "else a random one).")
@click.option("--read-only", is_flag=True, help="Show no actions; refuse every POST.")
@pass_config
def dashboard(config: Config, host: str, port: int, token: str | None, read_only: bool) -> None:
    """Serve the web dashboard: overview, agents and inboxes, dead letters, state, live tail.

    Prints the URL to open, with ?token=. Needs the extra sqlbus[web]. Listens on 127.0.0.1
    unless --host says otherwise (then --token is required).

    \b
    Example:
        sqlbus --db team.db dashboard --port 8642
    """
    try:
        from .dashboard.guard import choose_token
        from .dashboard.serve import serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("starlette", "uvicorn", "sse_starlette",
                                                  "jinja2", "multipart", "anyio"):
            raise
        raise click.ClickException(
            "sqlbus dashboard needs its web packages: pip install 'sqlbus[web]'") from exc
    chosen = choose_token(host, token)  # TokenError (a ValueError): one line, exit 2
    serve(config.bus, host, port, chosen, read_only)


for _admin_command in COMMANDS:  # dead letters, state, metrics, retention, check, backup, vacuum
    cli.add_command(_admin_command)


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
    # The admin commands are shared by every copy of this module (``python -m sqlbus.cli``
    # runs one as __main__ beside any import of sqlbus.cli): give each one --db once.
    if _command is not cli and not any(param.name == "db" for param in _command.params):
        _command.params.append(db_after_command)
        _command.params.append(schema_after_command)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``sqlbus`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="sqlbus")


if __name__ == "__main__":
    main()
