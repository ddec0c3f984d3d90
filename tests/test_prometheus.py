"""Prometheus exposition (SPEC 8): the text format and OpenMetrics, each checked with
prometheus_client's own parser, with exactly the metric names the SPEC lists."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sqlbus.cli import cli
from sqlbus.metrics import to_openmetrics, to_prometheus

pytestmark = pytest.mark.backends

text_parser = pytest.importorskip("prometheus_client.parser")
openmetrics_parser = pytest.importorskip("prometheus_client.openmetrics.parser")

COUNTERS = {
    "sqlbus_messages_sent", "sqlbus_messages_received", "sqlbus_messages_failed",
    "sqlbus_messages_dead_lettered", "sqlbus_messages_expired", "sqlbus_messages_unhandled",
    "sqlbus_late_responses", "sqlbus_errors", "sqlbus_agent_messages",
}
GAUGES = {
    "sqlbus_average_delivery_seconds", "sqlbus_throughput_per_second", "sqlbus_success_ratio",
    "sqlbus_queue_depth", "sqlbus_oldest_ready_age_seconds", "sqlbus_wal_bytes",
    "sqlbus_db_bytes",
}
ODD = 'we"ird\\agent with {braces}, commas=and # hashes'


@pytest.fixture
def metrics(make_bus, clock):
    bus = make_bus(max_attempts=1)
    alice, odd = bus.agent("alice"), bus.agent(ODD)
    for _ in range(3):
        alice.publish(ODD, "notification", {})
    clock.advance(0.25)
    first, second = odd.receive(limit=2)
    first.ack()
    second.fail(ValueError("x"))
    return bus.metrics()


def samples(families) -> dict[str, dict[tuple, float]]:
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in families
    }


def test_the_text_format_parses_with_prometheus_client_and_types_every_counter(metrics):
    text = to_prometheus(metrics)
    families = list(text_parser.text_string_to_metric_families(text))
    kinds = {f.name: f.type for f in families}
    assert len(kinds) == len(families), "a family appears twice"
    assert kinds == {**dict.fromkeys(COUNTERS, "counter"), **dict.fromkeys(GAUGES, "gauge")}
    # the text format names a counter family with its _total (the parser drops it)
    typed = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE ")}
    assert typed == {**{f"{c}_total": "counter" for c in COUNTERS}, **dict.fromkeys(GAUGES, "gauge")}
    got = samples(families)
    assert got["sqlbus_messages_sent"] == {("sqlbus_messages_sent_total", ()): 3}
    assert got["sqlbus_messages_received"] == {("sqlbus_messages_received_total", ()): 1}
    assert got["sqlbus_errors"] == {("sqlbus_errors_total", (("error", "ValueError"),)): 1}
    assert got["sqlbus_agent_messages"][
        ("sqlbus_agent_messages_total", (("agent", "alice"), ("direction", "sent")))] == 3
    assert got["sqlbus_queue_depth"][
        ("sqlbus_queue_depth", (("agent", ODD), ("state", "dead")))] == 1
    assert got["sqlbus_average_delivery_seconds"] == {("sqlbus_average_delivery_seconds", ()): 0.25}
    assert set(got["sqlbus_throughput_per_second"]) == {
        ("sqlbus_throughput_per_second", (("window", "1s"),)),
        ("sqlbus_throughput_per_second", (("window", "1m"),)),
    }
    assert got["sqlbus_success_ratio"] == {("sqlbus_success_ratio", ()): 0.5}


def test_openmetrics_parses_with_the_openmetrics_parser_and_ends_with_eof(metrics):
    text = to_openmetrics(metrics)
    assert text.endswith("# EOF\n")
    families = list(openmetrics_parser.text_string_to_metric_families(text))
    assert {f.name: f.type for f in families} == {
        **dict.fromkeys(COUNTERS, "counter"), **dict.fromkeys(GAUGES, "gauge")}
    got = samples(families)
    assert got["sqlbus_messages_sent"] == {("sqlbus_messages_sent_total", ()): 3}
    assert got["sqlbus_queue_depth"][
        ("sqlbus_queue_depth", (("agent", ODD), ("state", "ready")))] == 1
    assert got["sqlbus_oldest_ready_age_seconds"] == {("sqlbus_oldest_ready_age_seconds", ()): 0.25}


def test_neither_parser_accepts_the_other_format(metrics):
    with pytest.raises(ValueError):
        list(openmetrics_parser.text_string_to_metric_families(to_prometheus(metrics)))
    assert "# EOF" not in to_prometheus(metrics)


def test_an_empty_bus_still_exposes_every_family(bus):
    families = list(openmetrics_parser.text_string_to_metric_families(to_openmetrics(bus.metrics())))
    assert {f.name for f in families} == COUNTERS | GAUGES


def test_the_metrics_command_prints_both_formats_and_json(metrics, database):
    runner = CliRunner()
    for fmt, parser in (("prometheus", text_parser), ("openmetrics", openmetrics_parser)):
        result = runner.invoke(cli, [*database.cli_args(), "metrics", "--format", fmt])
        assert result.exit_code == 0, result.stderr
        assert {f.name for f in parser.text_string_to_metric_families(result.stdout)}
    as_json = runner.invoke(cli, [*database.cli_args(), "metrics", "--json"])
    as_format = runner.invoke(cli, [*database.cli_args(), "metrics", "--format", "json"])
    assert as_json.exit_code == 0 and as_json.stdout.startswith("{")
    assert as_json.stdout.split('"timestamp"')[0] == as_format.stdout.split('"timestamp"')[0]
    clash = runner.invoke(cli, [*database.cli_args(), "metrics", "--json", "--format", "table"])
    assert clash.exit_code == 2
