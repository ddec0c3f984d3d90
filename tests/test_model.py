"""A Hypothesis state machine drives one inbox (publish with priorities and TTLs, receive, ack,
fail, advance a fake clock) and checks every answer against a plain Python model of the queue:
delivery order, attempts, lease loss, retry due times, TTL expiry and dead letters."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import postgres_server
import probes
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import sqlbus

# Hypothesis runs 50 programs of 50 steps: out of make test-fast. Once per backend.
pytestmark = [pytest.mark.slow, pytest.mark.backends]

MAX_ATTEMPTS = 3
LEASE_MS = 10_000
BACKOFF_BASE_MS = 1_000
BACKOFF_CAP_MS = 4_000
START_MS = 1_800_000_000_000

QUEUED, SCHEDULED, ACKED, DEAD = "queued", "scheduled", "acked", "dead"


@dataclass
class Row:
    """The model of one message in bob's inbox, mirroring what SPEC 4 promises."""

    order: int
    priority: int
    expires_at: int | None
    state: str = QUEUED
    visible_at: int = 0  # queued: ready at / leased until; scheduled: due at
    attempts: int = 0
    claims: int = 0
    dead_reason: str | None = None
    dead_attempts: int | None = None


class Clock:
    def __init__(self) -> None:
        self.ms = START_MS

    def __call__(self) -> float:
        return self.ms / 1000


class QueueMachine(RuleBasedStateMachine):
    backend = "sqlite"  # or "postgres": each program gets a fresh file, or a fresh schema

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sqlbus-model-")
        self.clock = Clock()
        policy = dict(clock=self.clock, lease=LEASE_MS / 1000, max_attempts=MAX_ATTEMPTS,
                      backoff_base=BACKOFF_BASE_MS / 1000, backoff_cap=BACKOFF_CAP_MS / 1000)
        self.schema: str | None = None
        if self.backend == "postgres":
            self.schema = f"t_{secrets.token_hex(6)}"
            self.bus = sqlbus.connect(postgres_server.URL, schema=self.schema, **policy)
            self.probe = probes.PostgresProbe(postgres_server.URL, self.schema)
        else:
            self.bus = sqlbus.connect(Path(self.dir) / "model.db", **policy)
            self.probe = probes.SQLiteProbe(Path(self.dir) / "model.db")
        self.alice = self.bus.agent("alice")
        self.bob = self.bus.agent("bob")
        self.rows: dict[str, Row] = {}
        self.held: list[tuple[sqlbus.Delivery, int]] = []  # (delivery, its claim number)

    def teardown(self) -> None:
        self.bus.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.schema is not None:
            admin = postgres_server.connect()
            try:
                admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                admin.close()

    # -- the model's own rules ------------------------------------------------------------------

    def _claimable(self) -> list[tuple[str, Row]]:
        now = self.clock.ms
        ready = [
            (mid, row) for mid, row in self.rows.items()
            if row.state in (QUEUED, SCHEDULED) and row.visible_at <= now
        ]
        return sorted(ready, key=lambda item: (-item[1].priority, item[1].order))

    def _model_claim(self, limit: int) -> list[tuple[str, int]]:
        now = self.clock.ms
        delivered = []  # (a due retry is ready where it is; only a claim changes its row)
        for mid, row in self._claimable():
            if len(delivered) == limit:
                break
            row.attempts += 1
            row.claims += 1
            if row.expires_at is not None and now > row.expires_at:
                event("expired at claim")
                row.state, row.dead_reason, row.dead_attempts = DEAD, "expired", row.attempts - 1
            elif row.attempts > MAX_ATTEMPTS:
                event("lease ran out max_attempts times")
                row.state, row.dead_reason, row.dead_attempts = (
                    DEAD, "max_attempts", row.attempts - 1)
            else:
                row.state, row.visible_at = QUEUED, now + LEASE_MS
                delivered.append((mid, row.attempts))
        return delivered

    def _lease_held(self, mid: str, claims: int) -> bool:
        row = self.rows[mid]
        return row.state == QUEUED and row.claims == claims

    # -- rules ----------------------------------------------------------------------------------

    @rule(priority=st.integers(1, 5), ttl=st.sampled_from([0, 0, 0, 3_000, 20_000]))
    def publish(self, priority: int, ttl: int) -> None:
        mid = self.alice.publish("bob", "notification", {"n": len(self.rows)},
                                 priority=priority, ttl=ttl)
        now = self.clock.ms
        self.rows[mid] = Row(order=len(self.rows), priority=priority,
                             expires_at=now + ttl if ttl else None, visible_at=now)

    @rule(limit=st.integers(1, 3))
    def receive(self, limit: int) -> None:
        expected = self._model_claim(limit)
        got = self.bob.receive(limit=limit)
        assert [(d.message.id, d.attempts) for d in got] == expected
        for d in got:
            assert d.message.headers.retry_count == d.attempts - 1
            self.held.append((d, self.rows[d.message.id].claims))
        del self.held[:-12]  # forget old handles (their leases may still matter; fine)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 11))
    def ack(self, index: int) -> None:
        d, claims = self.held.pop(index % len(self.held))
        mid = d.message.id
        if self._lease_held(mid, claims):
            d.ack()
            self.rows[mid].state = ACKED
        else:
            event("late ack refused")
            with pytest.raises(sqlbus.LeaseLostError):
                d.ack()

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 11))
    def fail(self, index: int) -> None:
        d, claims = self.held.pop(index % len(self.held))
        mid = d.message.id
        row = self.rows[mid]
        if not self._lease_held(mid, claims):
            event("late fail refused")
            with pytest.raises(sqlbus.LeaseLostError):
                d.fail(RuntimeError("model failure"))
            return
        d.fail(RuntimeError("model failure"))
        if row.attempts >= MAX_ATTEMPTS:
            event("dead letter after max_attempts failures")
            row.state, row.dead_reason, row.dead_attempts = DEAD, "max_attempts", row.attempts
        else:
            backoff = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** (row.attempts - 1))
            row.state, row.visible_at = SCHEDULED, self.clock.ms + backoff

    @rule(seconds=st.sampled_from([0.001, 0.5, 1, 2, 4, 10, 25]))
    def advance(self, seconds: float) -> None:
        self.clock.ms += int(seconds * 1000)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def dead_letters_match_the_model(self) -> None:
        got = {x.message.id: (x.reason, x.attempts) for x in self.bus.dead_letters(limit=1000)}
        want = {mid: (row.dead_reason, row.dead_attempts)
                for mid, row in self.rows.items() if row.state == DEAD}
        assert got == want

    @invariant()
    def every_row_has_the_models_state_and_attempts(self) -> None:
        # the model's "queued" is the row's queued or leased: a lease is a queued row whose
        # visible_at lies ahead
        states = {probes.QUEUED: QUEUED, probes.LEASED: QUEUED, probes.ACKED: ACKED,
                  probes.DEAD: DEAD, probes.SCHEDULED: SCHEDULED}
        rows = self.probe.inbox_rows(agent="bob")
        got = {row.message_id: (states[row.state], row.attempts) for row in rows}
        assert got == {mid: (row.state, row.attempts) for mid, row in self.rows.items()}

SETTINGS = settings(max_examples=50, stateful_step_count=50, deadline=None)


def test_the_queue_behaves_like_its_model(backend: str) -> None:
    if backend == "postgres":
        postgres_server.connect().close()  # a server that does not answer: skip, or fail in CI
    machine = type(f"QueueMachine_{backend}", (QueueMachine,), {"backend": backend})
    run_state_machine_as_test(machine, settings=SETTINGS)
