"""The MCP server (SPEC 13): ``sqlbus mcp`` lets an LLM agent (Claude Code, Codex, Cursor...)
join the bus as one agent, over stdio, with the official ``mcp`` SDK (the extra
``sqlbus[mcp]``).

A thin layer over the public API: each tool is one library call, its errors become MCP tool
errors with the sqlbus error's one line. A received message is held as a :class:`Delivery`
behind an opaque token (128+ random bits) that only this server knows; settling it (ack,
fail, reply) drops the token, and on shutdown the unsettled ones are released for redelivery.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field, ValidationError
from typing_extensions import TypedDict

from .agent import Agent
from .bus import Bus
from .delivery import Delivery, settled
from .errors import SqlbusError
from .messages import Message, MessageType, iso_ms
from .records import DeadLetter, Subscription

__all__ = ["serve", "McpBus", "MAX_JSON_BYTES"]

log = logging.getLogger("sqlbus.mcp")

MAX_JSON_BYTES = 16_384  # a returned JSON value above this (compact) is cut to a string
PROGRESS_EVERY = 1.0  # s between progress notifications (SPEC: at most 5 s); also the
# longest a waiting receive holds its thread, so a shutdown is never kept waiting longer

# ---------------------------------------------------------------------------------------------
# Outputs: TypedDicts give each tool an output schema (typing_extensions: on 3.11 the typing one
# nested in a list fails in pydantic). "from" is a keyword, hence the functional form.

MessageOut = TypedDict("MessageOut", {
    "id": str, "from": str, "to": "str | list[str]", "type": str, "timestamp": str,
    "priority": int, "correlation_id": "str | None", "requires_ack": bool, "payload": Any,
    "truncated": bool,
})


class DeliveryOut(TypedDict):
    token: str
    message: MessageOut
    attempts: int
    lease_until: str


class Received(TypedDict):
    deliveries: list[DeliveryOut]


class Sent(TypedDict):
    id: str


class Broadcast(TypedDict):
    id: str
    recipients: list[str]


class Settled(TypedDict):
    message_id: str


class Failed(TypedDict):
    message_id: str
    outcome: Literal["retrying", "dead_lettered"]


class Extended(TypedDict):
    message_id: str
    lease_until: str


class Replied(TypedDict):
    message_id: str
    response_id: str


class Answer(TypedDict):
    data: Any
    truncated: bool


class EntryOut(TypedDict):
    key: str
    value: Any
    version: int
    updated_by: str | None
    updated_at: str
    truncated: bool


class StateGot(TypedDict):
    entry: EntryOut | None


class StateSet(TypedDict):
    key: str
    version: int


class ListedEntry(TypedDict):
    key: str
    version: int
    updated_by: str | None
    updated_at: str


class StateListed(TypedDict):
    entries: list[ListedEntry]


class SubscriptionOut(TypedDict):
    kind: str
    pattern: str


class Subscriptions(TypedDict):
    subscriptions: list[SubscriptionOut]


class AgentOut(TypedDict):
    id: str
    status: str
    alive: bool
    last_seen: str
    subscriptions: list[SubscriptionOut]


class AgentsOut(TypedDict):
    agents: list[AgentOut]


class InboxStats(TypedDict):
    agent: str
    ready: int
    leased: int
    retrying: int
    scheduled: int
    expired: int
    dead: int
    oldest_ready_age_seconds: float


class DeadLetterOut(TypedDict):
    ref: int
    agent: str
    message: MessageOut
    reason: str
    error_name: str | None
    error_message: str | None
    failed_at: str
    attempts: int


class DeadLetters(TypedDict):
    dead_letters: list[DeadLetterOut]


class AgentError(Exception):
    """What an MCP client's ``fail`` records: its ``error`` text, named ``AgentError``."""


# Input types: pydantic turns the bounds into the input schema and refuses values outside.
Priority = Annotated[int, Field(ge=1, le=5, description="1 (lowest) to 5 (highest)")]
Seconds = Annotated[float, Field(ge=0)]
Token = Annotated[str, Field(description="A delivery token returned by receive")]


def clip(value: Any) -> tuple[Any, bool]:
    """``value``, or the first 16,384 bytes of its compact JSON as a str (cut at a character
    boundary) and True when it is longer."""
    encoded = msgspec.json.encode(value)
    if len(encoded) <= MAX_JSON_BYTES:
        return value, False
    return encoded[:MAX_JSON_BYTES].decode("utf-8", "ignore"), True


def message_out(m: Message) -> MessageOut:
    payload, cut = clip(m.payload)
    h = m.headers
    return {
        "id": m.id, "from": m.sender, "to": m.to, "type": m.type, "timestamp": m.timestamp,
        "priority": h.priority,
        "correlation_id": h.correlation_id if isinstance(h.correlation_id, str) else None,
        "requires_ack": h.requires_ack, "payload": payload, "truncated": cut,
    }


def subscriptions_out(subs: list[Subscription]) -> list[SubscriptionOut]:
    return [{"kind": s.kind, "pattern": s.pattern} for s in subs]


def dead_letter_out(d: DeadLetter) -> DeadLetterOut:
    return {
        "ref": d.id, "agent": d.agent, "message": message_out(d.message), "reason": d.reason,
        "error_name": d.error_name, "error_message": d.error_message, "failed_at": d.failed_at,
        "attempts": d.attempts,
    }


def iso_seconds(epoch_seconds: float) -> str:
    return iso_ms(round(epoch_seconds * 1000))


@contextmanager
def tool_errors() -> Iterator[None]:
    """Library errors as MCP tool errors with their one line (any other exception would show
    the client only 'Error executing tool')."""
    try:
        yield
    except ToolError:
        raise
    except (SqlbusError, ValueError, TypeError, KeyError, OSError) as exc:
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ToolError(f"{type(exc).__name__}: {text}".splitlines()[0]) from exc


class McpBus:
    """One MCP server's agent on the bus: its options, the bus (opened in the background so
    that ``initialize`` is answered first) and the deliveries it holds, by token."""

    def __init__(self, open_bus: Callable[[], Bus], agent_id: str, *, lease: float = 300.0,
                 max_wait: float = 50.0, read_only: bool = False) -> None:
        self.agent_id = agent_id
        self.lease = lease
        self.max_wait = max_wait
        self.read_only = read_only
        self._open_bus = open_bus
        self._bus: Bus | None = None
        self._agent: Agent | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, Delivery] = {}

    # -- the bus, opened once ---------------------------------------------------------------

    def start(self) -> None:
        """Open the bus and register the agent (not when read-only) in a thread of its own."""
        threading.Thread(target=self._open, name="sqlbus-mcp-open", daemon=True).start()

    def _open(self) -> None:
        try:
            self._bus = self._open_bus()
            if not self.read_only:
                self._agent = self._bus.agent(self.agent_id)
        except BaseException as exc:  # kept and reported by every tool call
            self._error = exc
            log.error("sqlbus mcp: cannot open the bus: %s", exc)
        finally:
            self._ready.set()

    def bus(self) -> Bus:
        self._ready.wait()
        if self._bus is None:
            raise ToolError(f"the bus could not be opened: {self._error}".splitlines()[0])
        return self._bus

    def agent(self) -> Agent:
        self.bus()
        if self._agent is None:  # read-only offers no tool that asks for it
            raise ToolError(f"the bus could not be opened: {self._error}".splitlines()[0])
        return self._agent

    def close(self) -> None:
        """Release every unsettled delivery (for redelivery) and close the bus."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for d in held:
            try:
                d.release()
            except Exception as exc:  # settled or lost meanwhile: nothing to give back
                log.debug("release of %r: %s", d, exc)
        if self._ready.wait(1.0) and self._bus is not None:
            self._bus.close()

    # -- tokens -----------------------------------------------------------------------------

    def hold(self, deliveries: list[Delivery]) -> list[DeliveryOut]:
        out: list[DeliveryOut] = []
        with self._lock:
            for d in deliveries:
                token = secrets.token_urlsafe(24)  # 192 random bits
                self._held[token] = d
                out.append({"token": token, "message": message_out(d.message),
                            "attempts": d.attempts, "lease_until": iso_seconds(d.lease_until)})
        return out

    def held(self, token: str) -> Delivery:
        """The delivery ``token`` stands for; a tool error when it is unknown (forged, another
        server's or agent's, settled) or its lease ran out."""
        with self._lock:
            d = self._held.get(token)
            if d is None:
                raise ToolError(f"unknown delivery token: it was not issued by this server "
                                f"(agent {self.agent_id!r}), or its delivery was settled already")
            if d.lease_until <= self.now():
                del self._held[token]
                raise ToolError(
                    f"the lease of this delivery token ran out at {iso_seconds(d.lease_until)}: "
                    f"message {d.message.id} may be delivered again; receive it again")
            return d

    def drop(self, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)

    def give_back(self, tokens: list[str]) -> None:
        """Release the deliveries of ``tokens`` now (a receive whose caller went away)."""
        with self._lock:
            given = [self._held.pop(token) for token in tokens if token in self._held]
        for d in given:
            try:
                d.release()
            except Exception as exc:  # settled or lost meanwhile: nothing to give back
                log.debug("release of %r: %s", d, exc)

    def now(self) -> float:
        """The bus's time in epoch seconds (on PostgreSQL the server's, as lease ends are)."""
        return self.bus().engine.now_ms() / 1000

    @contextmanager
    def settling(self, token: str) -> Iterator[Delivery]:
        """The delivery of ``token``; its token goes once it is settled (or lost)."""
        d = self.held(token)
        with tool_errors():
            try:
                yield d
            finally:
                if settled(d) is not None or d.lease_until <= self.now():
                    self.drop(token)

    # -- waiting ----------------------------------------------------------------------------

    def claim(self, limit: int, wait: float, lease: float, types: list[str] | None,
              ) -> list[DeliveryOut]:
        """Claim (waiting up to ``wait`` s) and hold the claims, in the worker thread, so that a
        cancelled call never drops a claim between the library and the token table."""
        return self.hold(self.agent().receive(limit, wait=wait, lease=lease, types=types))

    def claim_into(self, out: list[DeliveryOut], limit: int, wait: float, lease: float,
                   types: list[str] | None) -> None:
        """:meth:`claim`, its deliveries appended to ``out`` (which the caller keeps even if
        its await is cancelled meanwhile)."""
        out.extend(self.claim(limit, wait, lease, types))

    def clamp(self, seconds: float) -> float:
        return min(seconds, self.max_wait)


# ---------------------------------------------------------------------------------------------
# The tools. Their docstrings are the descriptions an LLM reads: what, when, units.


def messaging_tools(s: McpBus) -> list[Callable[..., Any]]:
    """send, broadcast, request and emit_event: the tools that publish."""

    def send(
        to: Annotated[str | list[str], Field(description="An agent id, or a list of them")],
        type: MessageType = "notification",
        payload: dict[str, Any] | None = None,
        priority: Priority = 3,
        ttl_seconds: Annotated[Seconds, Field(description="0: never expires")] = 0,
        requires_ack: bool = False,
        correlation_id: str | None = None,
        delay_seconds: Seconds = 0,
    ) -> Sent:
        """Send a message to another agent (or a list of agents) on the bus: hand over work
        (type task_assignment), tell about progress (status_update) or anything else. It is
        durable: the recipient gets it when it next calls receive, even if it is not running
        now. payload is a JSON object (default {}); ttl_seconds 0 = never expires;
        delay_seconds holds it back that long. Returns the message id."""
        with tool_errors():
            return {"id": s.agent().publish(
                to, type, payload or {}, priority=priority, ttl=round(ttl_seconds * 1000),
                requires_ack=requires_ack, correlation_id=correlation_id, delay=delay_seconds)}

    def broadcast(
        type: MessageType = "broadcast",
        payload: dict[str, Any] | None = None,
        pattern: Annotated[str, Field(description="Shell pattern of agent ids: *, ?, [..]")] = "*",
        priority: Priority = 3,
        ttl_seconds: Seconds = 0,
    ) -> Broadcast:
        """Send one message to every registered agent whose id matches pattern (default:
        all), except yourself. Returns its id and who got it. ttl_seconds 0 = never expires."""
        with tool_errors():
            bus, agent = s.bus(), s.agent()
            message_id = agent.broadcast(type, payload or {}, pattern=pattern,
                                         priority=priority, ttl=round(ttl_seconds * 1000))
            sent = bus.sent(agent.id, limit=20)
            recipients = next((r.recipients for r in sent if r.message.id == message_id), [])
            return {"id": message_id, "recipients": recipients}

    async def request(
        ctx: Context,
        to: str,
        data: Any = None,
        timeout_seconds: Annotated[Seconds, Field(description="Capped at --max-wait")] = 30,
    ) -> Answer:
        """Ask agent `to` something and wait (up to timeout_seconds, capped by the server)
        for its answer: the other agent receives a message of type request and answers it
        with reply. Use it when you need the result before you go on; for work that can take
        long, send a task_assignment instead. Returns the answer's data."""
        timeout = s.clamp(timeout_seconds)

        def ask() -> Any:
            try:
                return s.agent().request(to, data, timeout=timeout)
            except BaseException as exc:  # carried out of the thread, raised below
                return exc

        with tool_errors():
            result = await waiting(ctx, timeout, ask)
            if isinstance(result, BaseException):
                raise result
        value, cut = clip(result)
        return {"data": value, "truncated": cut}

    def emit_event(
        name: str,
        data: Any = None,
        targets: list[str] | None = None,
    ) -> Sent:
        """Emit an event (a fact others may care about, e.g. 'build.finished') to the agents
        in targets, or, without targets, to every agent subscribed to a matching event
        pattern (see subscribe). Returns the message id."""
        with tool_errors():
            return {"id": s.agent().events.emit(name, data, targets)}

    return [send, broadcast, request, emit_event]


async def waiting(ctx: Context, total: float, work: Callable[[], Any]) -> Any:
    """Run ``work`` in a thread while reporting progress every second (seconds waited of
    ``total``); the thread is abandoned if the call is cancelled (a request has no claim to
    lose)."""
    done = anyio.Event()
    start = time.monotonic()

    async def tick() -> None:
        while not done.is_set():
            with anyio.move_on_after(PROGRESS_EVERY):
                await done.wait()
            if not done.is_set():
                await ctx.report_progress(time.monotonic() - start, total, "waiting")

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        finally:
            done.set()


def delivery_tools(s: McpBus) -> list[Callable[..., Any]]:
    """receive and the tools that settle what it returned."""

    async def receive(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=50)] = 5,
        wait_seconds: Annotated[Seconds, Field(description="Capped at --max-wait")] = 20,
        lease_seconds: Annotated[float | None, Field(gt=0)] = None,
        types: list[str] | None = None,
    ) -> Received:
        """Check your inbox: claim up to limit messages sent to you, highest priority first.
        Waits up to wait_seconds for one to arrive (returns at once when there is one; after
        the wait with an empty list). Each delivery has a token: when done, call ack (or
        reply to a request, or fail); the message is leased to you for lease_seconds
        (default: the server's --lease) and goes back to the inbox if you do not settle it
        in time (call extend for more time). types keeps only those message types."""
        wait = s.clamp(wait_seconds)
        lease = s.lease if lease_seconds is None else lease_seconds
        start = time.monotonic()
        with tool_errors():
            while True:
                waited = time.monotonic() - start
                step = max(0.0, min(PROGRESS_EVERY, wait - waited))
                got: list[DeliveryOut] = []
                try:
                    # The thread finishes even if the call is cancelled meanwhile: what it
                    # claimed is then given back at once, not left to its lease.
                    await anyio.to_thread.run_sync(s.claim_into, got, limit, step, lease, types)
                except anyio.get_cancelled_exc_class():
                    s.give_back([d["token"] for d in got])
                    raise
                if got or waited + step >= wait:
                    return {"deliveries": got}
                await ctx.report_progress(time.monotonic() - start, wait, "waiting for messages")

    def ack(token: Token) -> Settled:
        """Acknowledge a delivery: the message is done and leaves your inbox for good."""
        with s.settling(token) as d:
            d.ack()
            return {"message_id": d.message.id}

    def fail(token: Token, error: str, retry: bool = True) -> Failed:
        """Report that you could not handle a delivery. retry=true: it comes back after a
        backoff (and goes to dead letters after the last attempt); retry=false: it goes to
        dead letters now. error says why (kept in the dead letter)."""
        with s.settling(token) as d:
            if retry:
                d.fail(AgentError(error))
            else:
                d.dead_letter("discarded", error=AgentError(error))
            if settled(d) == "retrying":
                return {"message_id": d.message.id, "outcome": "retrying"}
            return {"message_id": d.message.id, "outcome": "dead_lettered"}

    def extend(token: Token, lease_seconds: Annotated[float | None, Field(gt=0)] = None) -> Extended:
        """Keep a delivery leased to you for lease_seconds more from now (default: the
        server's --lease), when its work takes longer than its lease."""
        with s.settling(token) as d:
            d.extend(s.lease if lease_seconds is None else lease_seconds)
            return {"message_id": d.message.id, "lease_until": iso_seconds(d.lease_until)}

    def reply(token: Token, data: Any = None, success: bool = True,
              error: str | None = None) -> Replied:
        """Answer a delivered request (type request) and ack it, in one step: the asker gets
        data (or, with success=false, the error text)."""
        with s.settling(token) as d:
            response_id = d.reply(data, success=success,
                                  error=None if success else (error or "failed"))
            d.ack()
            return {"message_id": d.message.id, "response_id": response_id}

    return [receive, ack, fail, extend, reply]


def state_tools(s: McpBus) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """(read tools, write tools) of the shared state."""

    def state_get(key: str) -> StateGot:
        """Read a key of the bus's shared, versioned key-value state (shared by all agents:
        plans, claims on files, results). entry is null when the key is absent."""
        with tool_errors():
            e = s.bus().state.get(key)
        if e is None:
            return {"entry": None}
        value, cut = clip(e.value)
        return {"entry": {"key": e.key, "value": value, "version": e.version,
                          "updated_by": e.updated_by, "updated_at": e.updated_at,
                          "truncated": cut}}

    def state_set(key: str, value: Any,
                  expected_version: Annotated[int | None, Field(ge=0)] = None) -> StateSet:
        """Write value (any JSON) as the next version of key in the shared state. With
        expected_version (0: the key must be absent) the write happens only if the key is
        still at that version, else a VersionConflictError: use it to claim things safely."""
        with tool_errors():
            version = s.agent().state.set(key, value, expected_version=expected_version)
        return {"key": key, "version": version}

    def state_list(prefix: str = "",
                   limit: Annotated[int, Field(ge=1, le=1000)] = 100) -> StateListed:
        """List the keys of the shared state that start with prefix (sorted, without their
        values: read one with state_get)."""
        with tool_errors():
            entries = s.bus().state.items(prefix)[:limit]
        return {"entries": [{"key": e.key, "version": e.version, "updated_by": e.updated_by,
                             "updated_at": e.updated_at} for e in entries]}

    return [state_get, state_list], [state_set]


def admin_tools(s: McpBus) -> tuple[list[Callable[..., Any]], list[Callable[..., Any]]]:
    """(read tools, write tools) about agents, inboxes and dead letters."""

    def agents() -> AgentsOut:
        """List the agents on the bus: who is there, alive (seen in the last 60 s), and what
        each subscribed to. Use it to find whom to send work to."""
        with tool_errors():
            found = s.bus().agents()
        return {"agents": [{"id": a.id, "status": a.status, "alive": a.alive,
                            "last_seen": a.last_seen,
                            "subscriptions": subscriptions_out(a.subscriptions)}
                           for a in found]}

    def inbox_stats(agent: str | None = None) -> InboxStats:
        """How many messages wait in an agent's inbox (default: yours), by state: ready,
        leased (being handled), retrying, scheduled (delayed), expired, dead; and the age in
        seconds of the oldest ready one."""
        name = agent or s.agent_id
        with tool_errors():
            rows = [r for r in s.bus().stats() if r.agent == name]
        if not rows:
            return {"agent": name, "ready": 0, "leased": 0, "retrying": 0, "scheduled": 0,
                    "expired": 0, "dead": 0, "oldest_ready_age_seconds": 0.0}
        r = rows[0]
        return {"agent": r.agent, "ready": r.ready, "leased": r.leased, "retrying": r.retrying,
                "scheduled": r.scheduled, "expired": r.expired, "dead": r.dead,
                "oldest_ready_age_seconds": r.oldest_ready_age_ms / 1000}

    def dead_letters(agent: str | None = None,
                     limit: Annotated[int, Field(ge=1, le=100)] = 20) -> DeadLetters:
        """Messages that failed for good (or expired) in an agent's inbox (default: yours),
        newest first, with why. requeue puts one back."""
        with tool_errors():
            found = s.bus().dead_letters(agent or s.agent_id, limit=limit)
        return {"dead_letters": [dead_letter_out(d) for d in found]}

    def requeue(ref: Annotated[int | str, Field(
            description="A dead letter's ref (int), or a message id (str)")]) -> Settled:
        """Put a dead letter back in its inbox for another try (attempts reset)."""
        with tool_errors():
            return {"message_id": s.bus().requeue(ref)}

    def subscribe(types: list[str] | None = None, events: list[str] | None = None,
                  remove: bool = False) -> Subscriptions:
        """Record (remove=true: drop) your interest in message types and event-name patterns
        (shell patterns, e.g. 'build.*'); events and state changes sent to no one in
        particular go to the agents interested. Returns all your subscriptions; with both
        lists empty it only lists them."""
        with tool_errors():
            agent = s.agent()
            for type_ in types or []:
                (agent.unsubscribe if remove else agent.subscribe)(type_)
            for pattern in events or []:
                (agent.events.off if remove else agent.events.on)(pattern)
            return {"subscriptions": subscriptions_out(agent.subscriptions())}

    return [agents, inbox_stats, dead_letters], [requeue, subscribe]


INSTRUCTIONS = """\
You are one agent on a sqlbus message bus shared with other agents (other LLM sessions,
programs). Call receive to get work sent to you; ack each delivery when done (or reply to a
request, or fail it). Use send to hand work to another agent, agents to see who is there,
and state_get/state_set for shared facts. Tokens are valid only until their lease runs out."""


def argument_error(exc: ValidationError) -> str:
    """A rejected call's arguments in one line: the first field and its rule (pydantic's own
    text spans several lines and repeats the caller's values)."""
    errors = exc.errors()
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"]) or "arguments"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{field}: {first['msg']}{more}"


class SqlbusMCPServer(MCPServer):
    """The SDK's server, with a bad argument's tool error in one line (SPEC 13)."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(argument_error(exc.__cause__)) from exc.__cause__
            raise


def build_server(s: McpBus) -> MCPServer:
    """The MCP server with this agent's tools (only the reading ones when read-only)."""
    server = SqlbusMCPServer("sqlbus", instructions=INSTRUCTIONS)
    state_read, state_write = state_tools(s)
    admin_read, admin_write = admin_tools(s)
    tools = state_read + admin_read
    if not s.read_only:
        tools += messaging_tools(s) + delivery_tools(s) + state_write + admin_write
    for fn in tools:
        server.add_tool(fn, structured_output=True)
    return server


def serve(open_bus: Callable[[], Bus], agent_id: str, *, lease: float = 300.0,
          max_wait: float = 50.0, read_only: bool = False) -> None:
    """Run the MCP server over stdio until stdin ends (or SIGINT/SIGTERM), then release the
    unsettled deliveries and close the bus. ``lease``, ``max_wait``: seconds."""
    s = McpBus(open_bus, agent_id, lease=lease, max_wait=max_wait, read_only=read_only)
    server = build_server(s)
    s.start()  # after the tools exist, before run: initialize never waits for the database

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        s.close()
