"""One agent's inbox as its receivers see it: looking for work, and claims that lease messages
(dead-lettering on the way those that cannot be delivered). Used by :meth:`Agent.receive`, the
run loop (:mod:`sqlbus.worker`) and the asyncio API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .delivery import Delivery, ack_in, ack_notices, mark_settled, settling
from .encoding import encode_json
from .engine import Engine, Tx
from .messages import ENVELOPE_ALLOWANCE, Message, decode_stored

if TYPE_CHECKING:
    from .agent import Agent

TOUCH_EVERY_MS = 1_000  # a claim refreshes the agent's last_seen at most this often


class Claimed(NamedTuple):
    """What a claim found; when nothing, what a wait needs: the data_version of the look and
    the agent's next due time in ms (None: nothing pending, or not asked for)."""

    deliveries: list[Delivery]
    baseline: int | None
    due: int | None


class Inbox:
    """Claims for one agent object: ``more`` says the last claim left ready messages behind
    (a hint, not a promise), so a waiting receiver may claim without reading first."""

    def __init__(self, agent: Agent, engine: Engine, *, max_attempts: int, max_payload_bytes: int) -> None:
        self.agent = agent
        self.id = agent.id
        self.engine = engine
        self.max_attempts = max_attempts
        self.max_payload_bytes = max_payload_bytes
        self.touched_at = 0
        self.more = False

    def skip_json(self) -> str | None:
        """The responses a request of this process awaits for this agent (JSON list), which its
        claims leave alone, or None."""
        skip = self.engine.awaiting.get(self.id)
        return encode_json(list(skip)).decode() if skip else None

    def look(self, types_json: str | None = None) -> tuple[int, bool, int | None]:
        """One read before claiming: (data_version, work waiting, next due time in ms)."""
        engine = self.engine
        before = engine.token_before_look()
        with engine.reading() as conn:
            version, work, due = engine.storage.look(
                conn, self.id, engine.now_ms(), types_json, self.skip_json()
            )
        return (version if before is None else before), work, due

    def seconds_until(self, due: int | None) -> float:
        """Seconds until ``due`` (ms; None: nothing pending), at least 1 ms."""
        if due is None:
            return 3600.0
        return max(0.001, (due - self.engine.now_ms()) / 1000)

    def until_due(self) -> float:
        """Seconds until one of this agent's retries, delayed messages or leases comes due."""
        with self.engine.reading() as conn:
            return self.seconds_until(self.engine.storage.next_due(conn, self.id))

    def claim(
        self,
        limit: int,
        lease_ms: int,
        types_json: str | None = None,
        *,
        acking: Sequence[Delivery] = (),
    ) -> Claimed:
        """Lease up to ``limit`` messages in one write transaction, after acking ``acking``
        (a run loop's last delivery: one transaction instead of two). When nothing is found,
        the result carries what a wait needs, read in the same transaction (data_version and
        the next due time), so that no commit after this look is missed."""
        with settling(acking):
            return self._claim_settling(limit, lease_ms, types_json, acking)

    def _claim_settling(
        self, limit: int, lease_ms: int, types_json: str | None, acking: Sequence[Delivery]
    ) -> Claimed:
        engine = self.engine
        now = engine.now_ms()
        lease_until = now + lease_ms
        notices = ack_notices(acking, now)
        claimed: list[tuple[Any, ...]] = []
        before = engine.token_before_look()

        def claim(tx: Tx) -> tuple[bool, Any, Any]:
            if acking:
                ack_in(tx, self.id, acking, notices, now)
            else:
                tx.mark_quiet()  # a claim makes no work for anyone: its commit rings nobody
            while True:
                rows, more = tx.storage.claim(
                    tx.conn, self.id, now, lease_until, limit - len(claimed), types_json,
                    self.skip_json(), engine.max_body,
                )
                for row in rows:
                    seq, claims, attempts, _priority, expires_at, _sent_at, body = row
                    if expires_at is not None and now > expires_at:
                        tx.storage.dead_letter(tx.conn, seq, None, now, "expired",
                                               attempts=attempts - 1, failed_at=expires_at)
                    elif attempts > self.max_attempts:
                        self._dead_letter_worn_out(tx, seq, attempts, now)
                    else:
                        message = self._readable(tx, seq, body, now, attempts)
                        if message is not None:
                            claimed.append((message, seq, claims, attempts))
                if len(claimed) >= limit or not more:
                    break
            baseline = due = None
            if not claimed:
                baseline, due = tx.storage.wait_point(tx.conn, self.id)
                if before is not None:
                    baseline = before
            if now - self.touched_at >= TOUCH_EVERY_MS:
                tx.storage.touch_agent(tx.conn, self.id, now)
                self.touched_at = now
            return more, baseline, due

        # In turn with the bus's grouped writes, never shared: it reads its own connection's
        # change counter (the wait point).
        more, baseline, due = engine.grouped(claim, solo=True)
        mark_settled(acking, "acked")
        self.more = more
        deliveries = []
        for message, seq, claims, attempts in claimed:
            message.headers.retry_count = attempts - 1
            deliveries.append(Delivery(self.agent, message, seq, claims, attempts, lease_until / 1000))
        return Claimed(deliveries, baseline, due)

    def _readable(
        self, tx: Tx, seq: int, body: bytes | None, now: int, attempts: int
    ) -> Message | None:
        """The message of a row just claimed, or None when it cannot be delivered: a body
        above this bus's limit (``body`` None: it was not read) or one that cannot be decoded
        (SQLite keeps no page checksums, so damage inside a body goes unseen until here) is
        dead-lettered in the claim's transaction, so it never strands the batch, fails the
        inbox or stops a loop."""
        if body is not None:
            message = decode_stored(body)
            if type(message) is Message:
                return message  # type: ignore[return-value]
            reason, error_name, error_message = "corrupt", "DecodeError", (
                f"the stored message cannot be decoded ({message})")
        else:
            length = tx.storage.body_length(tx.conn, seq)
            reason, error_name, error_message = "too_large", "PayloadTooLargeError", (
                f"the stored message is {length} bytes, more than this receiver reads "
                f"(max_payload_bytes={self.max_payload_bytes} plus {ENVELOPE_ALLOWANCE} for "
                "the envelope); it was not loaded")
        tx.storage.dead_letter(tx.conn, seq, None, now, reason, error_name, error_message,
                               attempts=attempts - 1)  # no handler saw it: not an attempt
        return None

    def _dead_letter_worn_out(
        self, tx: Tx, seq: int, attempts: int, now: int
    ) -> None:
        """Dead-letter a row claimed once more than ``max_attempts`` allow, with the error of
        its last attempt as it happened: the one recorded when the attempt ended (e.g. a loop
        interrupted in its handler), else its lease ran out."""
        last_error = tx.storage.last_error(tx.conn, seq)
        error_name, _, error_message = (last_error or "").partition(": ")
        if not last_error:
            error_name = "LeaseExpired"
            error_message = f"the lease ran out {attempts - 1} times without an ack"
        tx.storage.dead_letter(tx.conn, seq, None, now, "max_attempts", error_name=error_name,
                               error_message=error_message, attempts=attempts - 1)
