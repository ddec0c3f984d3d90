"""Bad input at scale: Hypothesis over every public entry point.

For each call: it either succeeds, or raises one of the typed errors (``ValidationError`` and
its subclass ``PayloadTooLargeError``, ``ValueError``, ``TypeError``, ``KeyError`` where the
docs say so) and then wrote nothing (the row counts of every table are unchanged). Every
accepted payload, state value and agent id comes back exactly (same types, not just ``==``).

``SQLBUS_FUZZ_EXAMPLES`` sets the examples per test (default 200); the number of cases run is
printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import fnmatch
import math
import os
import string
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from probes import SQLiteProbe

import sqlbus

EXAMPLES = int(os.environ.get("SQLBUS_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TYPED_ERRORS = (sqlbus.ValidationError, ValueError, TypeError)
CASES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()

# -- strategies ---------------------------------------------------------------------------------

def good_text(**kwargs: Any) -> st.SearchStrategy[str]:
    """Text a caller may give: no NUL and no lone surrogate (SPEC 1.1)."""
    return st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), **kwargs
    )


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), good_text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(good_text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
# Things that are not JSON, or would not come back the same.
non_json = st.one_of(
    st.just(float("nan")), st.just(float("inf")), st.binary(max_size=5), st.tuples(st.integers()),
    st.sets(st.integers(), max_size=2), st.just(object()), st.integers(min_value=2**64),
    st.integers(max_value=-(2**63) - 1), st.complex_numbers(allow_nan=False),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
)
any_values = st.one_of(json_values, non_json, st.lists(non_json, min_size=1, max_size=2),
                       st.dictionaries(st.text(max_size=5), non_json, min_size=1, max_size=2))
payloads = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    st.dictionaries(st.text(max_size=5), any_values, max_size=3),
    any_values, st.none(),
)
agent_ids = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.:/@", min_size=1, max_size=20),
    st.text(max_size=220), st.sampled_from(["bob", "*", "bo?", "[b]ob", "", " ", "\n", "a" * 201]),
    st.integers(), st.none(), st.binary(max_size=4),
)
message_types = st.one_of(st.sampled_from(sorted(sqlbus.MESSAGE_TYPES)), st.text(max_size=12),
                          st.integers())
ints_and_junk = st.one_of(st.integers(min_value=-3, max_value=8), st.integers(), st.booleans(),
                          st.floats(), st.text(max_size=3), st.none())
durations = st.one_of(st.floats(min_value=0, max_value=5), st.floats(), st.integers(-5, 5),
                      st.booleans(), st.text(max_size=3), st.none())
message_ids = st.one_of(
    st.none(), st.from_regex(r"msg-[0-9]{13}-[a-z0-9]{9}", fullmatch=True), st.text(max_size=30),
    st.integers(),
)


def strictly_equal(a: Any, b: Any) -> bool:
    """``==`` that also insists on the same types all the way down (1 is not 1.0 or True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strictly_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strictly_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


# -- the bus under test --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_bus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[sqlbus.Bus, FakeClock, SQLiteProbe]]:
    path = tmp_path_factory.mktemp("fuzz") / "bus.db"
    clock = FakeClock()
    bus = sqlbus.connect(path, clock=clock, max_payload_bytes=4096)
    yield bus, clock, SQLiteProbe(path)
    bus.close()
    print(f"\nfuzz: {sum(CASES.values())} cases run: {dict(CASES)}; outcomes {dict(OUTCOMES)}")


def rejected(name: str, exc: BaseException) -> None:
    assert isinstance(exc, TYPED_ERRORS), f"{name} raised {type(exc).__name__}: {exc}"
    OUTCOMES[f"{name}: {type(exc).__name__}"] += 1


def drain(agent: sqlbus.Agent) -> list[sqlbus.Delivery]:
    got = []
    while batch := agent.receive(limit=100):
        agent.ack(batch)
        got.extend(batch)
    return got


# -- publish -------------------------------------------------------------------------------------

valid_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"),
                           blacklist_characters="*?["),
    min_size=1, max_size=30,
).filter(lambda s: s.isprintable())
GOOD_PUBLISH = {
    "to": st.one_of(st.just("bob"), valid_ids, st.lists(valid_ids, min_size=1, max_size=3)),
    "type": st.sampled_from(sorted(sqlbus.MESSAGE_TYPES - {"task_assignment", "task_result",
                                                          "status_update"})),
    "payload": st.one_of(st.dictionaries(good_text(max_size=10), json_values, max_size=6), st.none()),
    "priority": st.integers(1, 5),
    "ttl": st.one_of(st.just(0), st.integers(200_000, 10**12)),  # outlives the delay
    "requires_ack": st.booleans(),
    "correlation_id": st.one_of(st.none(), good_text(max_size=10)),
    "delay": st.floats(0, 100),
    "id": st.one_of(st.none(), st.from_regex(r"msg-[0-9]{13}-[a-z0-9]{9}", fullmatch=True)),
}
BAD_PUBLISH = {
    "to": st.one_of(agent_ids, st.lists(agent_ids, max_size=3)),
    "type": message_types,
    "payload": payloads,
    "priority": ints_and_junk,
    "ttl": ints_and_junk,
    "requires_ack": ints_and_junk,
    "correlation_id": st.one_of(st.integers(), st.binary(max_size=3), st.lists(st.text(), max_size=1)),
    "delay": durations,
    "id": message_ids,
    "unknown": st.integers(),
}
# Each example spoils at most one argument (or none, a third of the time): a call with one
# bad argument must name it; a call with none must succeed and round-trip.
spoiled = st.sampled_from([None] * 5 + sorted(BAD_PUBLISH))


def publish_arguments(data: st.DataObject) -> tuple[str | None, dict[str, Any]]:
    bad = data.draw(spoiled, label="spoiled")
    args = {name: data.draw(GOOD_PUBLISH[name], label=name) for name in GOOD_PUBLISH}
    if bad is not None:
        args[bad] = data.draw(BAD_PUBLISH[bad], label=f"bad {bad}")
    return bad, args


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_publish_accepts_good_input_exactly_and_rejects_bad_input_without_writing(
    fuzz_bus: Any, data: st.DataObject,
) -> None:
    bus, clock, probe = fuzz_bus
    CASES["publish"] += 1
    alice = bus.agent("alice")
    bad, args = publish_arguments(data)
    to, type_, payload = args.pop("to"), args.pop("type"), args.pop("payload")
    if args.get("id") is not None and bad != "id":
        args["id"] = args["id"][:-9] + data.draw(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=9, max_size=9))
    before = probe.row_counts()
    existed = isinstance(args.get("id"), str) and bool(probe.inbox_rows(args["id"]))
    try:
        mid = alice.publish(to, type_, payload, **args)
    except Exception as exc:
        rejected("publish", exc)
        assert probe.row_counts() == before, "a rejected publish wrote something"
        # a wrong (but known) type is reported against the payload it does not fit
        named = ("type", "payload") if bad == "type" else (bad,)
        assert bad is not None and any(n in str(exc) for n in named), (
            f"the error does not name {bad}: {exc}")
        return
    OUTCOMES["publish: accepted" + (" (spoiled " + bad + ")" if bad else "")] += 1
    if args.get("id") is not None:
        assert mid == args["id"]
    if existed:  # an id drawn twice: the idempotent publish wrote nothing the second time
        assert probe.row_counts() == before
        return
    recipients = [to] if isinstance(to, str) else list(dict.fromkeys(to))
    clock.advance(float(args.get("delay") or 0) + 0.001)
    # The clock moved delay + 1 ms, and ttl counts from when a delayed message becomes
    # visible: a ttl shorter than 1 ms would have expired it (dead letter, never delivered).
    # Within 2 ms of that edge the float clock may round either way.
    edge = 1
    expires = bool(args["ttl"]) and args["ttl"] < edge - 2
    ambiguous = bool(args["ttl"]) and abs(args["ttl"] - edge) <= 2
    for recipient in recipients:
        got = drain(bus.agent(recipient))
        mine = [d for d in got if d.message.id == mid]
        if ambiguous:
            continue
        if expires:
            assert mine == []
            dead = [x for x in bus.dead_letters(agent=recipient, limit=5) if x.message.id == mid]
            assert [x.reason for x in dead] == ["expired"]
            continue
        assert len(mine) == 1, (recipient, mid, got)
        expected = {} if payload is None else payload
        assert strictly_equal(mine[0].message.payload, expected), (mine[0].message.payload, expected)
        assert mine[0].message.sender == "alice"
        assert mine[0].message.type == type_
        headers = mine[0].message.headers
        assert (headers.priority, headers.ttl, headers.requires_ack) == (
            args["priority"], args["ttl"], args["requires_ack"])


good_items = st.fixed_dictionaries(
    {"to": st.one_of(st.just("bob"), valid_ids), "type": GOOD_PUBLISH["type"]},
    optional={"payload": GOOD_PUBLISH["payload"], "priority": GOOD_PUBLISH["priority"],
              "ttl": GOOD_PUBLISH["ttl"], "requires_ack": GOOD_PUBLISH["requires_ack"]},
)
bad_items = st.one_of(
    st.fixed_dictionaries({"to": agent_ids, "type": message_types},
                          optional={"payload": payloads, "priority": ints_and_junk,
                                    "ttl": ints_and_junk, "bogus": st.integers()}),
    st.fixed_dictionaries({"type": GOOD_PUBLISH["type"]}),
    st.integers(), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=1),
)


@pytest.mark.slow
@FUZZ
@given(items=st.lists(good_items, max_size=6), bad=st.one_of(st.none(), bad_items),
       where=st.integers(0, 6))
def test_publish_many_writes_the_whole_batch_or_nothing(
    fuzz_bus: Any, items: list[Any], bad: Any, where: int,
) -> None:
    bus, clock, probe = fuzz_bus
    CASES["publish_many"] += 1
    alice = bus.agent("alice")
    if bad is not None:
        where = min(where, len(items))
        items.insert(where, bad)
    before = probe.row_counts()
    try:
        ids = alice.publish_many(items)
    except Exception as exc:
        rejected("publish_many", exc)
        assert probe.row_counts() == before, "a rejected publish_many wrote something"
        if isinstance(exc, sqlbus.ValidationError):
            assert str(exc).startswith("["), f"the error does not name the element: {exc}"
        return
    OUTCOMES["publish_many: accepted" + (" (with a spoiled item)" if bad is not None else "")] += 1
    assert len(ids) == len(items) == len(set(ids))
    clock.advance(0.001)
    by_id: dict[str, sqlbus.Message] = {}
    for recipient in {item["to"] for item in items}:
        by_id.update({d.message.id: d.message for d in drain(bus.agent(recipient))})
    for mid, item in zip(ids, items, strict=True):
        assert strictly_equal(by_id[mid].payload, item.get("payload") or {})
        headers = by_id[mid].headers
        assert (headers.priority, headers.ttl, headers.requires_ack) == (
            item.get("priority", 3), item.get("ttl", 30_000), item.get("requires_ack", False))
        assert by_id[mid].to == item["to"] and by_id[mid].sender == "alice"


# -- receive, agents, broadcast -----------------------------------------------------------------

GOOD_RECEIVE = {
    "limit": st.integers(1, 20),
    "wait": st.just(0.0),
    "lease": st.one_of(st.none(), st.floats(0.001, 1e6)),
    "types": st.one_of(st.none(), st.lists(st.sampled_from(sorted(sqlbus.MESSAGE_TYPES)),
                                           min_size=1, max_size=3)),
}
BAD_RECEIVE = {
    "limit": ints_and_junk,
    "wait": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.text(max_size=2),
                      st.booleans(), st.none()),
    "lease": durations,
    "types": st.one_of(st.lists(message_types, max_size=3), message_types, st.integers()),
}


@pytest.mark.slow
@FUZZ
@given(data=st.data(), bad=st.sampled_from([None, None, None, *sorted(BAD_RECEIVE)]))
def test_receive_rejects_bad_arguments_without_claiming(
    fuzz_bus: Any, data: st.DataObject, bad: str | None,
) -> None:
    bus, clock, probe = fuzz_bus
    CASES["receive"] += 1
    args = {name: data.draw(GOOD_RECEIVE[name], label=name) for name in GOOD_RECEIVE}
    if bad is not None:
        args[bad] = data.draw(BAD_RECEIVE[bad], label=f"bad {bad}")
    alice, carol = bus.agent("alice"), bus.agent(f"carol-{CASES['receive']}")
    alice.publish(carol.id, "notification", {"n": 1})
    before = probe.row_counts()
    try:
        got = carol.receive(**args)
    except Exception as exc:
        rejected("receive", exc)
        assert probe.row_counts() == before
        assert bad is not None and bad in str(exc), f"the error does not name {bad}: {exc}"
        assert len(drain(carol)) >= 1  # the message is still there for a good call
        return
    OUTCOMES["receive: accepted" + (f" (spoiled {bad})" if bad else "")] += 1
    types = args["types"]
    wanted = types is None or "notification" in ([types] if isinstance(types, str) else types)
    assert len(got) == (1 if wanted else 0)
    for d in got:
        assert d.message.payload == {"n": 1}
        d.ack()
    drain(carol)


@FUZZ
@given(agent_id=st.one_of(valid_ids, agent_ids))
def test_agent_ids_are_validated_and_come_back_exactly(fuzz_bus: Any, agent_id: Any) -> None:
    bus, clock, probe = fuzz_bus
    CASES["agent"] += 1
    before = probe.row_counts()
    try:
        agent = bus.agent(agent_id)
    except Exception as exc:
        rejected("agent", exc)
        assert probe.row_counts() == before
        return
    OUTCOMES["agent: accepted"] += 1
    assert agent.id == agent_id
    assert agent_id in [info.id for info in bus.agents()]
    bus.agent("alice").publish(agent_id, "notification", {"who": agent_id})
    got = drain(agent)
    assert [d.message.payload["who"] for d in got if d.message.type == "notification"] == [agent_id]


@pytest.mark.slow
@FUZZ
@given(pattern=st.one_of(st.text(max_size=8), st.sampled_from(["*", "b*", "?ob", "[a-c]*", "[", "]", "[!b]*"]),
                         st.integers(), st.none()),
       type_=st.one_of(st.sampled_from(["broadcast", "event", "notification"]), message_types))
def test_broadcast_patterns_match_registered_agents_like_fnmatch(
    fuzz_bus: Any, pattern: Any, type_: Any,
) -> None:
    bus, clock, probe = fuzz_bus
    CASES["broadcast"] += 1
    alice = bus.agent("alice")
    before = probe.row_counts()
    try:
        mid = alice.broadcast(type_, {"p": str(pattern)}, pattern=pattern)
    except Exception as exc:
        rejected("broadcast", exc)
        assert probe.row_counts() == before
        return
    OUTCOMES["broadcast: accepted"] += 1
    registered = [info.id for info in bus.agents()]
    expected = sorted(a for a in registered if a != "alice" and fnmatch.fnmatchcase(a, pattern))
    record = next(r for r in bus.sent(agent="alice", limit=5) if r.message.id == mid)
    assert sorted(record.recipients) == expected
    for agent_id in expected:  # keep inboxes small for later examples
        drain(bus.agent(agent_id))


# -- state ---------------------------------------------------------------------------------------

GOOD_STATE = {"key": good_text(min_size=1, max_size=40), "value": json_values,
              "expected_version": st.none()}
BAD_STATE = {
    "key": st.one_of(st.just(""), st.text(min_size=513, max_size=520), st.integers(), st.none(),
                     st.binary(max_size=3)),
    "value": st.one_of(non_json, st.lists(non_json, min_size=1, max_size=2),
                       st.dictionaries(st.text(max_size=5), non_json, min_size=1, max_size=2)),
    "expected_version": st.one_of(st.integers(max_value=-1), st.text(max_size=2), st.floats(),
                                  st.booleans()),
}


@pytest.mark.slow
@FUZZ
@given(data=st.data(), bad=st.sampled_from([None, None, None, *sorted(BAD_STATE)]))
def test_state_writes_come_back_exactly_or_write_nothing(
    fuzz_bus: Any, data: st.DataObject, bad: str | None,
) -> None:
    bus, clock, probe = fuzz_bus
    CASES["state.set"] += 1
    args = {name: data.draw(GOOD_STATE[name], label=name) for name in GOOD_STATE}
    if bad is not None:
        args[bad] = data.draw(BAD_STATE[bad], label=f"bad {bad}")
    before = probe.row_counts()
    try:
        version = bus.state.set(args["key"], args["value"],
                                expected_version=args["expected_version"], notify=False)
    except Exception as exc:
        rejected("state.set", exc)
        assert probe.row_counts() == before
        return
    OUTCOMES["state.set: accepted" + (f" (spoiled {bad})" if bad else "")] += 1
    entry = bus.state.get(args["key"])
    assert entry is not None and entry.version == version
    assert strictly_equal(entry.value, args["value"]), (entry.value, args["value"])


# -- the CLI -------------------------------------------------------------------------------------

CLI_WORDS = ["init", "stats", "agents", "peek", "send", "tail", "dead-letters", "list", "show",
             "requeue", "purge", "state", "get", "set", "metrics", "prune", "check", "vacuum",
             "--json", "--format", "json", "table", "prometheus", "--limit", "--help", "--type",
             "--priority", "--older-than", "bob", "alice", "{}", "{\"a\": 1}", "[1]", "-1", "0",
             "5", "1h", "nan", "--payload", "--yes", "--follow", "--timeout", "\x00", "--"]


CLI_VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "5", "9", "1h", "10s", "30d", "nan", "inf", "{}", '{"a": 1}',
                     "[1]", "null", "bob", "alice", "plan", "json", "table", "prometheus",
                     "notification", "request", "expired", "x.db", "*", "", " "]),
    st.text(max_size=8).filter(lambda t: "\x00" not in t and not t.startswith("/")),
)
HAS_CLI = (Path(sqlbus.__file__).parent / "cli.py").exists()


def _cli_leaves() -> list[tuple[list[str], Any]]:
    """(command path, command) of every runnable CLI command, except ``tail`` (it follows
    forever by design)."""
    import click

    from sqlbus.cli import cli

    leaves = []

    def walk(command: Any, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, path + [name])
        elif path and path[0] != "tail":
            leaves.append((path, command))

    walk(cli, [])
    return leaves


def _param_argv(param: Any) -> st.SearchStrategy[list[str]]:
    import click

    if isinstance(param, click.Argument):
        return st.lists(CLI_VALUES, min_size=0 if not param.required else 1, max_size=1)
    name = max(param.opts, key=len)
    if getattr(param, "is_flag", False):
        return st.sampled_from([[], [name]])
    if param.multiple:
        return st.lists(CLI_VALUES, max_size=2).map(lambda vs: [x for v in vs for x in (name, v)])
    return st.one_of(st.just([]), CLI_VALUES.map(lambda v: [name, v]))


@st.composite
def cli_command_lines(draw: Any) -> list[str]:
    """A command from the real CLI tree with random values for its own options/arguments."""
    path, command = draw(st.sampled_from(_cli_leaves()))
    argv = list(path)
    for param in command.params:
        if param.name == "help":
            continue
        argv += draw(_param_argv(param))
    return argv


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CLI, reason="sqlbus/cli.py does not exist yet")
@FUZZ
@given(argv=st.one_of(
    cli_command_lines() if HAS_CLI else st.nothing(),
    st.lists(st.one_of(st.sampled_from(CLI_WORDS), st.text(max_size=6)), max_size=6),
))
def test_the_cli_never_prints_a_traceback_and_rejected_commands_write_nothing(
    fuzz_bus: Any, argv: list[str],
) -> None:
    from click.testing import CliRunner

    from sqlbus.cli import cli

    bus, clock, probe = fuzz_bus
    # tail follows and dashboard serves until stopped: forever by design
    forever = ("tail", "--follow", "dashboard")
    if any(a in argv for a in forever):
        argv = [a for a in argv if a not in forever]
    argv = [a.replace("\x00", "") for a in argv]
    CASES["cli"] += 1
    before = probe.row_counts()
    runner = CliRunner()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:  # a DEST or stray path lands here
        os.chdir(scratch)
        try:
            result = runner.invoke(cli, argv, env={"SQLBUS_DB": str(probe.path)}, catch_exceptions=True)
        finally:
            os.chdir(cwd)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv, repr(result.exception))
    assert "Traceback" not in output, (argv, output)
    assert "error: unexpected " not in output, (argv, output)  # the CLI's catch-all for bugs
    OUTCOMES[f"cli: exit {result.exit_code}"] += 1
    if result.exit_code != 0:
        after = probe.row_counts()
        assert after == before, (argv, output, before, after)
