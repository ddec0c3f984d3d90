"""The ``sqlbus`` commands that look after a bus: dead letters, shared state, metrics,
retention, check, backup and vacuum. :mod:`sqlbus.cli` adds them to its group."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import msgspec

from .cli_common import (
    COUNT,
    DURATION,
    JSON,
    Config,
    cell,
    confirm,
    duration_text,
    fail,
    json_option,
    json_out,
    options_given,
    pass_config,
    shorten,
    table,
    yes_option,
)
from .errors import DatabaseError
from .metrics import to_openmetrics, to_prometheus

__all__ = ["COMMANDS"]


# ---------------------------------------------------------------------------------------------
# Dead letters


def _agent_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An --agent filter names one agent: say so here, in the words of this option (the
    library's error speaks of publish and broadcast)."""
    if value is not None and re.search(r"[*?\[]", value):
        raise click.BadParameter(f"takes one agent id, not a pattern: {value!r}")
    return value


@click.group("dead-letters", cls=click.Group)
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
def dead_letters_list(config: Config, agent: str | None, limit: int, as_json: bool) -> None:
    """Dead letters, newest first: id, agent, reason, error, attempts, failed at.

    \b
    Example:
        sqlbus --db team.db dead-letters list --json
    """
    with config.bus() as bus:
        rows = bus.dead_letters(agent, limit)
    if as_json:
        json_out(rows)
        return
    table(
        ["id", "agent", "reason", "error", "attempts", "failed_at", "message"],
        [(d.id, d.agent, d.reason, shorten(f"{d.error_name}: {d.error_message}", 40)
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
def dead_letters_show(config: Config, ref: str, as_json: bool) -> None:
    """One dead letter in full: the message, the error and its traceback. REF is its number,
    or a message id (the newest of that message's dead letters).

    \b
    Example:
        sqlbus --db team.db dead-letters show 42
    """
    with config.bus() as bus:
        record = bus.dead_letter(_dead_letter_ref(ref))
    if record is None:
        raise click.ClickException(f"no dead letter {shorten(ref, 60)!r}")
    if as_json:
        json_out(record)
        return
    for name in ("id", "agent", "reason", "error_name", "error_message", "attempts", "failed_at"):
        click.echo(f"{name}: {cell(getattr(record, name))}")
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
    config: Config, dead_letter_id: str | None, all_: bool, agent: str | None,
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
        json_out({"requeued": ids})
    else:
        click.echo(f"requeued {len(ids)} message(s)")


@dead_letters.command("purge")
@click.option("--older-than", type=DURATION, default=None, help="Only those older (e.g. 30d).")
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@yes_option
@json_option
@pass_config
def dead_letters_purge(
    config: Config, older_than: float | None, all_: bool, yes: bool, as_json: bool
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
        confirm("Delete every dead letter for good?" if all_ else
                 f"Delete the dead letters older than {duration_text(older_than)} for good?", yes)
        deleted = bus.purge_dead_letters(older_than)
    if as_json:
        json_out({"purged": deleted})
    else:
        click.echo(f"purged {deleted} dead letter(s)")



# ---------------------------------------------------------------------------------------------
# Shared state


@click.group("state", cls=click.Group)
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
def state_get(config: Config, key: str, as_json: bool) -> None:
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
        json_out(entry)
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
    config: Config, key: str, value: Any, expected_version: int | None, no_notify: bool,
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
        json_out({"key": key, "version": version})
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
    config: Config, key: str, expected_version: int | None, no_notify: bool, yes: bool,
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
        confirm(f"Delete state key {key!r} (version {entry.version})?", yes)
        version = bus.state.delete(key, expected_version=expected_version,
                                   notify=not no_notify)
    if version == 0:
        raise click.ClickException(f"state key {key!r} is absent")
    if as_json:
        json_out({"key": key, "version": version})
    else:
        click.echo(str(version))


@state.command("list")
@click.option("--prefix", default="", help="Only keys starting with this.")
@json_option
@pass_config
def state_list(config: Config, prefix: str, as_json: bool) -> None:
    """Every live key under --prefix with its version, writer, time and value.

    \b
    Example:
        sqlbus --db team.db state list --prefix job/ --json
    """
    with config.bus() as bus:
        entries = bus.state.items(prefix)
    if as_json:
        json_out(entries)
        return
    table(
        ["key", "version", "updated_by", "updated_at", "value"],
        [(e.key, e.version, e.updated_by, e.updated_at, json.dumps(e.value)) for e in entries],
    )



# ---------------------------------------------------------------------------------------------
# Metrics, retention and upkeep of the file


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


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json", "prometheus", "openmetrics"]),
              default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as --format json).")
@pass_config
def metrics(config: Config, fmt: str, as_json: bool) -> None:
    """Bus-wide metrics: totals, throughput, delivery time, errors, depths, file sizes.

    json is the seed's generateReport; prometheus is the Prometheus text format, openmetrics
    is OpenMetrics (for a scrape that asks for application/openmetrics-text).

    \b
    Example:
        sqlbus --db team.db metrics --format prometheus
    """
    if as_json and options_given("fmt") and fmt != "json":
        raise click.UsageError(f"--json is --format json, not --format {fmt}")
    with config.bus() as bus:
        m = bus.metrics()
    if as_json or fmt == "json":
        json_out(m)
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
        click.echo(f"{key.ljust(width)}  {cell(value)}")
    click.echo("")
    names = sorted(set(m.agent_activity) | set(m.queue_depths))
    table(
        ["agent", "sent", "received", "ready", "leased", "retrying", "dead"],
        [(n, *(getattr(m.agent_activity.get(n), f, 0) for f in ("sent", "received")),
          *(getattr(m.queue_depths.get(n), f, 0) for f in ("ready", "leased", "retrying", "dead")))
         for n in names],
    )
    if m.error_rates:
        click.echo("")
        table(["error", "count"], sorted(m.error_rates.items()))


@click.command("config")
@click.option("--archive-retention", type=DURATION, default=None, metavar="D",
              help="Keep acked messages this long after their ack (e.g. 7d; 'never').")
@click.option("--dead-retention", type=DURATION, default=None, metavar="D",
              help="Keep dead letters this long after they failed (e.g. 30d; 'never').")
@click.option("--archive-max-messages", type=COUNT, default=None, metavar="N",
              help="Keep at most N acked messages, the oldest go first ('none': no bound).")
@json_option
@pass_config
def config_command(
    config: Config, archive_retention: float | None, dead_retention: float | None,
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
    changes: dict[str, Any] = {name: given[name] for name in options_given(*given)}
    with config.bus() as bus:
        policy = bus.set_retention(**changes) if changes else bus.retention()
    if as_json:
        json_out(policy)
        return
    for name, text in (
        ("archive_retention", duration_text(policy.archive_retention)),
        ("dead_retention", duration_text(policy.dead_retention)),
        ("archive_max_messages", "none" if policy.archive_max_messages is None
         else str(policy.archive_max_messages)),
    ):
        click.echo(f"{name.ljust(20)}  {text}")


@click.command()
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
    config: Config, sent_older_than: float | None, dead_older_than: float | None, yes: bool,
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
    overrides: dict[str, Any] = {name: ages[name] for name in options_given(*ages)}
    limits = ", ".join(f"{name.replace('_', ' ')} {duration_text(seconds)}"
                       for name, seconds in overrides.items()) or "by the stored policy"
    with config.bus() as bus:
        confirm(f"Delete old acked messages and dead letters for good ({limits})?", yes)
        with _progress("pruning") as progress:
            result = bus.prune(**overrides, progress=progress)
    if as_json:
        json_out(result)
    else:
        click.echo(f"pruned {result.acked} acked message(s) and {result.dead_letters} dead letter(s)")


@click.command()
@json_option
@pass_config
def check(config: Config, as_json: bool) -> int:
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
        json_out(report)
    else:
        click.echo(f"integrity:      {'ok' if report.integrity == ['ok'] else 'FAILED'}")
        click.echo(f"schema version: {report.schema_version} "
                   f"(this sqlbus reads {report.supported_schema_version})")
        click.echo(f"database:       {report.db_bytes} bytes")
        if report.pool is not None:
            pool = report.pool
            click.echo(f"pool:           {pool['pool_size']} of {pool['pool_max']} connections "
                       f"open, {pool['pool_available']} idle, {pool['requests_waiting']} "
                       f"waiting, {pool['connections_errors']} connection errors")
        else:
            click.echo(f"wal:            {report.wal_bytes} bytes, {report.wal_frames} frames, "
                       f"{report.wal_frames_checkpointed} checkpointed"
                       + (" - PINNED by a reader" if report.wal_pinned else ""))
        click.echo(f"expired leases: {report.expired_leases}")
        click.echo(f"expired messages not yet dead-lettered: {report.expired_messages}")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo("ok" if report.ok else "NOT OK")
    return 0 if report.ok else 1


@click.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@json_option
@pass_config
def backup(config: Config, dest: str, as_json: bool) -> None:
    """Copy the database, online and consistent, to the new file DEST (writers keep going).

    \b
    Example:
        sqlbus --db team.db backup /backups/team-$(date +%F).db
    """
    with config.bus() as bus, _progress("backing up") as progress:
        result = bus.backup(dest, progress=progress)
    if as_json:
        json_out(result)
    else:
        click.echo(f"backed up {result.pages} pages ({result.bytes} bytes) to {result.dest} "
                   f"in {result.seconds:.2f}s")


@click.command()
@json_option
@pass_config
def vacuum(config: Config, as_json: bool) -> int:
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
        json_out(result)
    elif result.shrunk:
        click.echo(f"vacuumed: {result.bytes_before} -> {result.bytes_after} bytes")
    if not result.shrunk:
        return fail(f"vacuum could not shrink the file: {result.reason}", 1)
    return 0


# Every command and group of this module, for sqlbus.cli's group
COMMANDS = [dead_letters, state, metrics, config_command, prune, check, backup, vacuum]
