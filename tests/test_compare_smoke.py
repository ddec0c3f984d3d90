"""A tiny run of benchmarks/compare.py on the systems that need nothing beyond sqlbus's own
dependencies (sqlbus, the raw apsw floor, the seed-like JSON files): every workload runs in
real processes, the report renders, and the lost/duplicate check both passes honest systems
and catches one that drops and duplicates messages. No wall-clock figure is asserted."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare  # noqa: E402
from benchmarks.peers import payload  # noqa: E402
from benchmarks.peers.raw_apsw import RawApswPeer, RawClient  # noqa: E402


def tiny_options(tmp_path, **overrides) -> compare.Options:
    options = compare.Options(
        n=40, batch=10, pingpong=5, procs_n=120, backlogs=(30, 60), sample=10, repeats=1,
        budget=30.0, procs_budget=60.0, prefill_budget=30.0, min_rate=0.0,
        workdir=str(tmp_path),
    )
    for name, value in overrides.items():
        setattr(options, name, value)
    return options


def test_the_payload_is_a_json_object_of_about_200_bytes_carrying_its_id():
    import json

    body = payload(12345)
    assert body["i"] == 12345
    assert 190 <= len(json.dumps(body, separators=(",", ":"))) <= 210


def test_the_delivery_check_counts_lost_duplicated_and_unknown_messages():
    check = compare.verify(range(5), [0, 1, 1, 3, 4, 4, 4, 9])
    assert check == {"lost": 1, "duplicates": 3, "unknown": 1}
    assert compare.verify(range(3), [2, 0, 1]) == {"lost": 0, "duplicates": 0, "unknown": 0}


@pytest.mark.slow
def test_a_small_run_of_sqlbus_raw_apsw_and_the_seed_design_loses_and_duplicates_nothing(tmp_path):
    options = tiny_options(tmp_path)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    report = compare.run_all(["sqlbus", "apsw"], list(compare.WORKLOADS), options, log=quiet)
    # The seed polls every second, so it skips ping-pong here to keep the test short.
    seed = compare.run_all(["seed"], ["1", "2", "3", "5", "6"], options, log=quiet)
    for w, by_system in seed["results"].items():
        report["results"][w].update(by_system)
    report["peers"].update(seed["peers"])

    results = report["results"]
    for name in ("sqlbus", "apsw", "seed"):
        (run,) = results["5"][name]
        assert run.cut is None, (name, run.cut)
        assert (run.values["lost"], run.values["duplicates"], run.values["unknown"]) == (0, 0, 0)
        assert run.values["msgs/s"] > 0
        assert results["1"][name][0].values["msgs/s"] > 0
        assert results["3"][name][0].values["msgs/s"] > 0
        assert results["3"][name][0].note is None  # every get found a message
        assert set(results["6"][name][0].values) == {"30", "60"}
    assert results["2"]["seed"][0].note == "no batch API"
    for name in ("sqlbus", "apsw"):
        (run,) = results["4"][name]
        assert run.note is None, run.note
        assert 0 < run.values["p50 ms"] <= run.values["p99 ms"]

    text = compare.render(report, compare.describe_machine())
    assert "No system lost or duplicated a message." in text
    for title in compare.TITLES.values():
        assert title in text
    assert "| sqlbus |" in text and "| raw apsw |" in text and "| seed-like JSON files |" in text


class LossyClient(RawClient):
    """Drops message 7 and sends message 8 twice: what the check must catch."""

    def put(self, queue: str, i: int) -> None:
        if i == 7:
            return
        super().put(queue, i)
        if i == 8:
            super().put(queue, i)


class LossyPeer(RawApswPeer):
    name = "lossy"
    label = "lossy"

    def open(self, store: str) -> LossyClient:
        return LossyClient(store)


@pytest.mark.slow
def test_the_two_by_two_run_reports_a_system_that_loses_and_duplicates(tmp_path):
    run = compare.w_procs(LossyPeer(), tiny_options(tmp_path, procs_n=60))
    assert run.values["lost"] == 1
    assert run.values["duplicates"] == 1
    assert run.note is not None and "LOST 1" in run.note and "DUPLICATED 1" in run.note


def test_unknown_systems_and_workloads_are_refused_with_the_choices():
    with pytest.raises(SystemExit):
        compare.parse_args(["--systems", "sqlbus,rabbit"])
    systems, workloads, options, _ = compare.parse_args(
        ["--quick", "--systems", "sqlbus,apsw", "--workloads", "produce,5", "--n", "50"]
    )
    assert systems == ["sqlbus", "apsw"] and workloads == ["1", "5"]
    assert options.n == 50 and options.repeats == 3


@pytest.mark.slow
def test_a_small_run_of_the_postgresql_systems_loses_and_duplicates_nothing(tmp_path):
    """sqlbus on PostgreSQL, pgqueuer and procrastinate (the bench extra) on the test server:
    produce, batch, consume and the 2x2 processes, each in a schema of its own, dropped after."""
    from postgres_server import URL, connect

    connect().close()  # skips (or fails under CI) with the reason when no server answers
    pytest.importorskip("sqlbus.postgres.engine")  # the PostgreSQL backend (issue 15)
    pytest.importorskip("pgqueuer")
    pytest.importorskip("procrastinate")
    from benchmarks.peers import postgres

    postgres.URL = URL
    options = tiny_options(tmp_path, procs_budget=60.0)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    systems = ["sqlbus-pg", "pgqueuer", "procrastinate"]
    report = compare.run_all(systems, ["1", "2", "3", "5"], options, log=quiet)
    assert report["skipped"] == {}
    results = report["results"]
    for name in systems:
        assert results["1"][name][0].values["msgs/s"] > 0, name
        assert results["2"][name][0].values["msgs/s"] > 0, name
        assert results["3"][name][0].note is None, (name, results["3"][name][0].note)
        (run,) = results["5"][name]
        assert run.cut is None, (name, run.cut)
        assert (run.values["lost"], run.values["duplicates"], run.values["unknown"]) == (0, 0, 0)
    text = compare.render(report, compare.describe_machine())
    assert "| sqlbus on PostgreSQL |" in text and "| pgqueuer |" in text
