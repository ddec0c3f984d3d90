"""Input validation and error translation (SPEC 1.1, 2, 4, 4.1, 6, 11): bad input is refused
with one-line sqlbus errors before anything is written, recorded text never fails the
recording, and control signals and dead-letter references cannot crash a caller or a loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import START, FakeClock
from probes import SQLiteProbe

import sqlbus
from sqlbus.cli import cli

pytestmark = pytest.mark.backends

SURROGATE = "\udcff"  # what os.listdir gives for the byte 0xff in a file name


def nested(depth: int) -> dict:
    """A dict nested ``depth`` levels deep (the outermost counts as 1)."""
    value: dict = {}
    inner = value
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return value


# ---------------------------------------------------------------------------------------------
# Lone surrogates: recorded escaped, refused where a caller names something (12.3)


def test_a_handler_error_holding_a_lone_surrogate_is_recorded_escaped_and_the_loop_goes_on(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    handled = []

    def handler(message: sqlbus.Message) -> None:
        if message.payload["n"] == 0:
            raise FileNotFoundError(f"cannot open report-{SURROGATE}.txt")
        handled.append(message.payload["n"])

    bob.subscribe("notification", handler)
    alice.publish("bob", "notification", {"n": 0})
    alice.publish("bob", "notification", {"n": 1})
    assert bob.run(until_idle=True) == 2
    assert handled == [1]
    [dead] = bus.dead_letters()
    assert dead.error_name == "FileNotFoundError"
    assert dead.error_message == "cannot open report-\\udcff.txt"
    assert "report-\\udcff.txt" in dead.traceback
    assert bus.stats()[0].leased == 0


def test_with_delivery_re_raises_the_handlers_own_exception_when_its_text_has_a_surrogate(
    bus: sqlbus.Bus,
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    [d] = bob.receive()
    with pytest.raises(OSError, match="bad name"):
        with d:
            raise OSError(f"bad name {SURROGATE}")
    [entry] = bus.peek("bob")
    assert entry.status == "retrying"  # not stuck under its lease


def test_a_request_handler_failing_with_a_surrogate_answers_the_requester_with_remote_error(
    make_bus: Callable[..., sqlbus.Bus], database
) -> None:
    server = database.connect()  # real clock: request() waits in real time
    client = database.connect()
    try:
        bob, alice = server.agent("bob"), client.agent("alice")

        def handler(message: sqlbus.Message) -> None:
            raise ValueError(f"no such file {SURROGATE}")

        bob.subscribe("request", handler)
        loop = threading.Thread(target=bob.run)
        loop.start()
        try:
            with pytest.raises(sqlbus.RemoteError) as caught:
                alice.request("bob", {"q": 1}, timeout=30.0)
            assert "no such file \\udcff" in str(caught.value)
        finally:
            bob.stop()
            loop.join()
    finally:
        server.close()
        client.close()


def test_dead_letter_reason_and_fail_context_with_surrogates_are_recorded_escaped(
    bus: sqlbus.Bus,
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"n": 1})
    alice.publish("bob", "notification", {"n": 2})
    first, second = bob.receive(limit=2)
    first.dead_letter(f"bad file {SURROGATE}", context={f"k{SURROGATE}": [f"v{SURROGATE}"]})
    second.fail(ValueError("x"), retryable=False, context={"file": f"a{SURROGATE}"})
    records = {d.message.payload["n"]: d for d in bus.dead_letters()}
    assert records[1].reason == "bad file \\udcff"
    assert records[1].context == {"k\\udcff": ["v\\udcff"]}
    assert records[2].context == {"file": "a\\udcff"}


@pytest.mark.parametrize(
    "call",
    [
        lambda bus, alice: alice.broadcast("notification", {}, pattern=f"w{SURROGATE}*"),
        lambda bus, alice: alice.broadcast("notification", {}, pattern="w\x00*"),
        lambda bus, alice: bus.state.keys(f"job{SURROGATE}"),
        lambda bus, alice: bus.state.items(f"job{SURROGATE}"),
        lambda bus, alice: next(iter(bus.state.watch(f"job{SURROGATE}"))),
        lambda bus, alice: bus.state.set(f"job{SURROGATE}", 1),
        lambda bus, alice: bus.state.set("job\x00", 1),
        lambda bus, alice: bus.state.set("job", {"a": "x\x00y"}),
        lambda bus, alice: alice.publish("bob", "notification", {f"k{SURROGATE}": 1}),
        lambda bus, alice: alice.publish("bob", "notification", {"k\x00": 1}),
        lambda bus, alice: alice.publish("bob", "notification", {"k": ["ok", "nul\x00"]}),
        lambda bus, alice: alice.publish_many([{"to": "bob", "type": "notification",
                                                 "payload": {"k": "nul\x00"}}]),
        lambda bus, alice: alice.publish("bob", "notification", {}, correlation_id="c\x00"),
        lambda bus, alice: alice.publish("bob", "notification", {},
                                         id=f"msg-1796000000000-abcdefgh{SURROGATE}"),
        lambda bus, alice: alice.events.emit(f"build{SURROGATE}", {}),
        lambda bus, alice: alice.events.emit("build\x00", {}),
    ],
)
def test_nul_and_lone_surrogates_in_names_keys_patterns_and_payloads_are_validation_errors(
    bus: sqlbus.Bus, probe: SQLiteProbe, call: Callable[..., object]
) -> None:
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError) as caught:
        call(bus, alice)
    assert "\n" not in str(caught.value)
    assert probe.row_counts() == before


def test_a_payload_string_holding_an_escaped_backslash_u0000_is_not_taken_for_nul(
    bus: sqlbus.Bus,
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {"text": "\\u0000"})
    assert bob.receive()[0].message.payload == {"text": "\\u0000"}


# ---------------------------------------------------------------------------------------------
# Deep payloads (12.7): at most 64 levels, refused at publish with the path


@pytest.mark.parametrize("depth", [65, 980, 1000, 100_000])
def test_a_payload_nested_deeper_than_64_levels_is_refused_naming_the_path(
    bus: sqlbus.Bus, probe: SQLiteProbe, depth: int
) -> None:
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    with pytest.raises(sqlbus.ValidationError, match=r"^payload(\.a){64}: nested deeper than 64"):
        alice.publish("bob", "notification", nested(depth))
    with pytest.raises(sqlbus.ValidationError, match=r"^\[0\]\.payload(\.a){64}: nested"):
        alice.publish_many([{"to": "bob", "type": "notification", "payload": nested(depth)}])
    with pytest.raises(sqlbus.ValidationError, match=r"^value(\.a){64}: nested"):
        bus.state.set("deep", {"a": nested(depth)}["a"])
    assert probe.row_counts() == before


def test_a_payload_nested_exactly_64_levels_and_lists_are_accepted_and_received(
    bus: sqlbus.Bus,
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    deep = nested(64)
    lists: list = []
    inner = lists
    for _ in range(62):
        inner.append([])
        inner = inner[0]
    alice.publish("bob", "notification", deep)
    alice.publish("bob", "notification", {"l": lists})  # 1 + 63 levels of arrays = 64
    got = bob.receive(limit=2)
    assert [d.message.payload for d in got] == [deep, {"l": lists}]
    with pytest.raises(sqlbus.ValidationError, match=r"payload\.l(\[0\]){63}: nested"):
        alice.publish("bob", "notification", {"l": [lists]})


def test_many_brackets_inside_strings_do_not_count_as_nesting(bus: sqlbus.Bus) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    payload = {"text": "[{" * 500, "items": [{"a": [1]} for _ in range(100)],
               'quote\\"[[': '\\\\"' + "[" * 100, "backslash\\": "\\" + "]" * 100}
    alice.publish("bob", "notification", payload)
    assert bob.receive()[0].message.payload == payload


# ---------------------------------------------------------------------------------------------
# Control signals (12.8)


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), 1e13, -1, True, "5"])
def test_retry_refuses_a_delay_that_is_not_a_duration(delay: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        sqlbus.Retry(delay)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", ["", None, 3])
def test_discard_refuses_a_reason_that_is_not_a_non_empty_str(reason: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        sqlbus.Discard(reason)  # type: ignore[arg-type]


def test_malformed_signals_are_the_handlers_failure_and_the_loop_goes_on(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    signals = [lambda: sqlbus.Discard(""), lambda: sqlbus.Retry(float("nan")),
               lambda: sqlbus.Retry(1e13)]

    def handler(message: sqlbus.Message) -> None:
        raise signals[message.payload["n"]]()

    bob.subscribe("notification", handler)
    for n in range(3):
        alice.publish("bob", "notification", {"n": n})
    assert bob.run(until_idle=True) == 3
    dead = bus.dead_letters()
    assert len(dead) == 3 and {d.error_name for d in dead} == {"ValueError"}


def test_a_signal_changed_after_construction_still_cannot_stop_the_loop(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")

    def handler(message: sqlbus.Message) -> None:
        signal = sqlbus.Discard("fine")
        signal.reason = ""
        raise signal

    bob.subscribe("notification", handler)
    alice.publish("bob", "notification", {})
    assert bob.run(until_idle=True) == 1
    assert bus.dead_letters()[0].error_name == "ValueError"


# ---------------------------------------------------------------------------------------------
# Dead-letter references (12.10, SPEC 4.1)


def dead_letter_one(bus: sqlbus.Bus, to: str | list[str] = "bob") -> str:
    alice = bus.agent("alice")
    mid = alice.publish(to, "notification", {})
    for agent in [to] if isinstance(to, str) else to:
        for d in bus.agent(agent).receive():
            d.dead_letter("test")
    return mid


def test_requeue_of_a_number_naming_nothing_raises_not_found_error(bus: sqlbus.Bus) -> None:
    with pytest.raises(sqlbus.NotFoundError) as caught:
        bus.requeue(12345)
    error = caught.value
    assert isinstance(error, KeyError) and isinstance(error, sqlbus.SqlbusError)
    assert str(error) == "no dead letter numbered 12345"
    assert "NotFoundError" in sqlbus.__all__


@pytest.mark.parametrize(
    "ref", [2**70, -(2**70), 10**5000, "nope", "msg-1796000000000-abcdefghi"],
    ids=["2**70", "-2**70", "10**5000", "not-an-id", "unknown-id"],
)
def test_a_ref_naming_nothing_gives_none_and_not_found_error_however_large(
    bus: sqlbus.Bus, ref: int | str
) -> None:
    dead_letter_one(bus)
    assert bus.dead_letter(ref) is None
    with pytest.raises(sqlbus.NotFoundError) as caught:
        bus.requeue(ref)
    assert len(str(caught.value)) < 200


def test_a_message_id_names_every_dead_letter_of_that_message(bus: sqlbus.Bus) -> None:
    mid = dead_letter_one(bus, ["bob", "carol"])
    records = bus.dead_letters()
    assert len(records) == 2
    newest = max(records, key=lambda d: d.id)
    found = bus.dead_letter(mid)
    assert found is not None and found.id == newest.id
    assert bus.requeue(mid) == mid
    assert bus.dead_letters() == []
    assert {e.message.id for agent in ("bob", "carol") for e in bus.peek(agent)} == {mid}
    with pytest.raises(sqlbus.NotFoundError):
        bus.requeue(mid)


def test_the_cli_shows_and_requeues_dead_letters_by_number_or_message_id(
    bus: sqlbus.Bus, database
) -> None:
    mid = dead_letter_one(bus)
    number = bus.dead_letters()[0].id
    runner = CliRunner()
    for ref in (str(number), mid):
        result = runner.invoke(cli, [*database.cli_args(), "dead-letters", "show", ref, "--json"])
        assert result.exit_code == 0, result.output
        assert mid in result.output
    result = runner.invoke(cli, [*database.cli_args(), "dead-letters", "requeue", mid])
    assert result.exit_code == 0, result.output
    assert bus.dead_letters() == []


@pytest.mark.parametrize(
    "ref", ["9" * 30, "9" * 5000, "12345", "msg-1796000000000-abcdefghi"],
    ids=["30-digits", "5000-digits", "12345", "unknown-id"],
)
def test_the_cli_says_in_one_line_that_a_ref_names_nothing(
    bus: sqlbus.Bus, database, ref: str
) -> None:
    dead_letter_one(bus)
    runner = CliRunner()
    for command in (["show", ref], ["requeue", ref]):
        result = runner.invoke(cli, [*database.cli_args(), "dead-letters", *command])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output and len(result.output) < 300
        assert "no dead letter" in result.output and "unexpected" not in result.output


def test_a_nan_in_fail_context_is_a_validation_error_and_leaves_the_delivery_unsettled(
    bus: sqlbus.Bus,
) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    [d] = bob.receive()
    with pytest.raises(sqlbus.ValidationError, match=r"context\.x"):
        d.fail(ValueError("boom"), context={"x": float("nan")})
    with pytest.raises(sqlbus.ValidationError, match="context"):
        d.dead_letter("why", context={"x": nested(100)})
    assert bus.dead_letters() == []
    d.fail(ValueError("boom"), retryable=False, context={"x": 1.5})
    assert bus.dead_letters()[0].context == {"x": 1.5}


# ---------------------------------------------------------------------------------------------
# The clock's range; what ended an attempt; subscribers=[] (12.11)


@pytest.mark.parametrize("now", [-1.0, 10_000_000_000.0, float("nan"), float("inf")])
def test_a_clock_outside_the_id_range_is_refused_at_connect_and_nothing_is_created(
    db_path: Path, now: float
) -> None:
    with pytest.raises(ValueError, match="clock"):
        sqlbus.connect(db_path, clock=lambda: now)
    assert not db_path.exists()


def test_a_clock_that_leaves_the_range_later_is_refused_at_first_use_writing_nothing(
    make_bus: Callable[..., sqlbus.Bus], clock: FakeClock, probe: SQLiteProbe
) -> None:
    bus = make_bus()
    alice = bus.agent("alice")
    bus.agent("bob")
    before = probe.row_counts()
    clock.now = 10_000_000_000.0  # 2286-11-20T17:46:40Z: the first moment past 13 digits
    with pytest.raises(ValueError, match="2286-11-20T17:46:39.999Z"):
        alice.publish("bob", "notification", {})
    assert probe.row_counts() == before
    clock.now = 9_999_999_999.999  # the last moment that fits: works
    alice.publish("bob", "notification", {})
    assert bus.agent("bob").receive()[0].message.id.startswith("msg-9999999999999-")


def test_messages_released_by_keyboard_interrupt_end_as_keyboard_interrupt_not_lease_expired(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_attempts=2)
    alice, bob = bus.agent("alice"), bus.agent("bob")

    def handler(message: sqlbus.Message) -> None:
        raise KeyboardInterrupt("operator pressed ctrl-c")

    bob.subscribe("notification", handler)
    alice.publish("bob", "notification", {})
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            bob.run(until_idle=True)
    assert bob.receive() == []  # the third claim dead-letters it
    [dead] = bus.dead_letters()
    assert dead.reason == "max_attempts" and dead.attempts == 2
    assert (dead.error_name, dead.error_message) == ("KeyboardInterrupt", "operator pressed ctrl-c")


def test_a_lease_that_ran_out_after_a_retry_is_blamed_on_the_lease_not_the_older_error(
    make_bus: Callable[..., sqlbus.Bus], clock: FakeClock
) -> None:
    bus = make_bus(max_attempts=2)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {}, ttl=0)
    bob.receive()[0].fail(ValueError("first attempt"))
    clock.advance(60)
    assert len(bob.receive(lease=1.0)) == 1  # the second attempt: its lease runs out
    clock.advance(60)
    assert bob.receive() == []
    [dead] = bus.dead_letters()
    assert dead.error_name == "LeaseExpired" and "lease ran out" in dead.error_message


def test_a_with_block_interrupted_by_keyboard_interrupt_keeps_that_as_the_error(
    make_bus: Callable[..., sqlbus.Bus],
) -> None:
    bus = make_bus(max_attempts=1)
    alice, bob = bus.agent("alice"), bus.agent("bob")
    alice.publish("bob", "notification", {})
    [d] = bob.receive()
    with pytest.raises(KeyboardInterrupt):
        with d:
            raise KeyboardInterrupt()
    assert bob.receive() == []
    assert bus.dead_letters()[0].error_name == "KeyboardInterrupt"


def test_state_set_with_an_empty_subscriber_list_notifies_nobody(
    bus: sqlbus.Bus, probe: SQLiteProbe
) -> None:
    bus.agent("bob")
    bob = bus.agent("bob")
    assert bus.state.set("plan", {"steps": 1}, subscribers=[]) == 1
    assert bus.state.delete("plan", subscribers=[]) == 2
    assert probe.inbox_count(type="state_change") == 0
    assert bob.receive() == []
    with pytest.raises(sqlbus.ValidationError, match=r"subscribers\[0\]"):
        bus.state.set("plan", 1, subscribers=["bad*"])


# ---------------------------------------------------------------------------------------------
# Prefixes match exactly (19.6)


def test_state_prefixes_match_exactly_and_nul_is_refused(bus: sqlbus.Bus) -> None:
    for key in ("job", "job/1", "job\u00e9", "jo", "jobs%", "job_", "JOB/1", "job\U0001f600x"):
        bus.state.set(key, 1)
    with pytest.raises(sqlbus.ValidationError, match="NUL"):
        bus.state.keys("job\x00")
    with pytest.raises(sqlbus.ValidationError, match="NUL"):
        list(bus.state.items("job\x00"))
    assert bus.state.keys("job") == sorted(["job", "job/1", "job\u00e9", "jobs%", "job_",
                                            "job\U0001f600x"])
    assert bus.state.keys("job%") == []
    assert bus.state.keys("job_") == ["job_"]
    assert bus.state.keys("job\U0001f600") == ["job\U0001f600x"]
    assert [e.key for e in bus.state.items("jo")] == bus.state.keys("jo")


def test_a_start_clock_far_from_the_limits_still_works(make_bus: Callable[..., sqlbus.Bus]) -> None:
    bus = make_bus(clock=lambda: START)
    assert bus.agent("alice").publish("alice", "notification", {}).startswith("msg-1800000000000-")


@pytest.mark.parametrize("key", ['k": {', "\\", '"', "a\nb"])
def test_nesting_is_measured_exactly_whatever_the_keys_hold(bus: sqlbus.Bus, key: str) -> None:
    alice, bob = bus.agent("alice"), bus.agent("bob")
    fits: dict = {}
    inner = fits
    for _ in range(62):
        inner[key] = {}
        inner = inner[key]  # level 63
    inner[key] = [[]] * 70  # 70 empty arrays at level 65: too deep, with brackets to spare
    with pytest.raises(sqlbus.ValidationError, match="nested deeper than 64") as caught:
        alice.publish("bob", "notification", fits)
    assert "\n" not in str(caught.value)
    inner[key] = [1] * 70  # the array itself is level 64
    alice.publish("bob", "notification", fits)
    assert bob.receive()[0].message.payload == fits
