"""The MCP server (SPEC 13): ``sqlbus mcp`` started as a subprocess and driven over stdio by
the official ``mcp`` client, on SQLite files (and one test on PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from postgres_server import URL, pg_schema  # noqa: E402

import sqlbus  # noqa: E402

__all__ = ["pg_schema"]  # fixtures

TOOLS = {"send", "broadcast", "receive", "ack", "fail", "extend", "reply", "request",
         "state_get", "state_set", "state_list", "emit_event", "subscribe", "agents",
         "inbox_stats", "dead_letters", "requeue"}
READ_TOOLS = {"state_get", "state_list", "agents", "inbox_stats", "dead_letters"}


@asynccontextmanager
async def server(db: str, agent: str, *options: str) -> AsyncIterator[ClientSession]:
    """A session with ``sqlbus mcp --db DB --agent AGENT OPTIONS`` (the child gets only a few
    environment variables: the ones it needs are passed on)."""
    env = {k: os.environ[k] for k in ("SQLBUS_TEST_POSTGRES", "COVERAGE_PROCESS_START")
           if k in os.environ}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "sqlbus", "mcp", "--db", db, "--agent", agent,
                                      *options], env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, args: dict[str, Any] | None = None,
               **kw: Any) -> dict[str, Any]:
    """The tool's structured output; fails the test on a tool error."""
    result = await session.call_tool(tool, args or {}, **kw)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, args: dict[str, Any]) -> str:
    """The text of the tool error ``tool`` gives (fails the test when it succeeds)."""
    result = await session.call_tool(tool, args)
    assert result.is_error, result.structured_content
    return result.content[0].text  # type: ignore[union-attr]


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Any) -> str:
    path = str(tmp_path / "team.db")
    sqlbus.connect(path).close()
    return path


def test_the_server_lists_every_tool_with_an_input_and_an_output_schema(db: str) -> None:
    async def main() -> None:
        async with server(db, "alice") as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert set(tools) == TOOLS
            for tool in tools.values():
                assert tool.input_schema["type"] == "object"
                assert tool.output_schema and tool.output_schema["type"] == "object"
                assert tool.description and len(tool.description) > 40
            props = tools["receive"].input_schema["properties"]
            assert props["wait_seconds"]["default"] == 20 and props["limit"]["default"] == 5
            assert "deliveries" in tools["receive"].output_schema["properties"]

    run(main)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_message_sent_by_alice_is_received_and_acked_by_bob(
    backend: str, request: pytest.FixtureRequest, db: str
) -> None:
    options: tuple[str, ...] = ()
    if backend == "postgres":
        db, options = URL, ("--schema", request.getfixturevalue("pg_schema"))

    async def main() -> None:
        async with server(db, "alice", *options) as alice, server(db, "bob", *options) as bob:
            sent = await call(alice, "send", {"to": "bob", "type": "task_assignment",
                                              "payload": {"task": {"id": "t1", "type": "fix"}},
                                              "priority": 4})
            got = (await call(bob, "receive", {"wait_seconds": 5}))["deliveries"]
            assert len(got) == 1
            message = got[0]["message"]
            assert message["id"] == sent["id"] and message["from"] == "alice"
            assert message["payload"] == {"task": {"id": "t1", "type": "fix"}}
            assert message["priority"] == 4 and message["truncated"] is False
            assert got[0]["attempts"] == 1 and got[0]["lease_until"].endswith("Z")
            assert len(got[0]["token"]) >= 22  # >= 128 random bits, url-safe base64
            assert await call(bob, "ack", {"token": got[0]["token"]}) == {"message_id": sent["id"]}
            stats = await call(bob, "inbox_stats")
            assert stats["agent"] == "bob" and stats["ready"] == stats["leased"] == 0
            # a token is valid only in the server that issued it
            assert "unknown delivery token" in await refused(alice, "ack", {"token": got[0]["token"]})

    run(main)


def test_a_request_from_a_python_agent_is_answered_through_the_reply_tool(db: str) -> None:
    answers: list[Any] = []
    bus = sqlbus.connect(db)
    asker = bus.agent("planner")

    async def main() -> None:
        async with server(db, "coder") as coder:
            thread = threading.Thread(
                target=lambda: answers.append(asker.request("coder", {"q": 2}, timeout=10)))
            thread.start()
            got = (await call(coder, "receive", {"wait_seconds": 5}))["deliveries"]
            assert got[0]["message"]["type"] == "request"
            assert got[0]["message"]["payload"] == {"q": 2}
            replied = await call(coder, "reply", {"token": got[0]["token"], "data": {"a": 4}})
            assert replied["message_id"] == got[0]["message"]["id"]
            await asyncio.to_thread(thread.join, 10)

    try:
        run(main)
        assert answers == [{"a": 4}]
        assert bus.stats() and all(s.leased == 0 for s in bus.stats())
    finally:
        bus.close()


def test_a_lease_that_runs_out_is_delivered_again_and_its_token_is_refused(db: str) -> None:
    async def main() -> None:
        async with server(db, "bob", "--lease", "0.5") as bob:
            with sqlbus.connect(db) as bus:
                bus.agent("alice").publish("bob", "notification", {"n": 1})
            first = (await call(bob, "receive", {"wait_seconds": 5}))["deliveries"][0]
            await asyncio.sleep(0.7)
            text = await refused(bob, "ack", {"token": first["token"]})
            assert "lease" in text and "ran out" in text
            again = (await call(bob, "receive", {"wait_seconds": 5}))["deliveries"][0]
            assert again["message"]["id"] == first["message"]["id"] and again["attempts"] == 2
            extended = await call(bob, "extend", {"token": again["token"], "lease_seconds": 60})
            assert extended["lease_until"] > again["lease_until"]
            await asyncio.sleep(0.7)  # the old lease's end: extended, it still holds
            await call(bob, "ack", {"token": again["token"]})

    run(main)


def test_a_wrong_token_or_a_bad_argument_is_a_tool_error_and_the_server_keeps_serving(
    db: str,
) -> None:
    async def main() -> None:
        async with server(db, "bob") as bob:
            assert "unknown delivery token" in await refused(bob, "ack", {"token": "forged"})
            assert "unknown delivery token" in await refused(
                bob, "fail", {"token": "A" * 32, "error": "x"})
            bad_priority = await refused(bob, "send", {"to": "alice", "priority": 9})
            assert bad_priority.startswith("priority: ") and "\n" not in bad_priority
            bad_limit = await refused(bob, "receive", {"limit": 0})
            assert bad_limit.startswith("limit: ") and "\n" not in bad_limit
            assert "NotFoundError" in await refused(bob, "requeue", {"ref": 12345})
            assert "VersionConflictError" in await refused(
                bob, "state_set", {"key": "k", "value": 1, "expected_version": 3})
            assert (await call(bob, "send", {"to": "bob"}))["id"]
            assert len((await call(bob, "receive", {"wait_seconds": 0}))["deliveries"]) == 1

    run(main)


def test_receive_with_nothing_to_do_returns_empty_after_the_wait_with_progress(db: str) -> None:
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total))

    async def main() -> float:
        async with server(db, "bob", "--max-wait", "3") as bob:
            start = time.monotonic()
            got = await call(bob, "receive", {"wait_seconds": 40}, progress_callback=on_progress)
            assert got == {"deliveries": []}
            return time.monotonic() - start

    took = run(main)
    assert 2.9 <= took < 4.5  # 40 s was lowered to --max-wait
    assert len(progress) >= 2 and all(total == 3 for _, total in progress)
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)


def test_read_only_offers_only_the_reading_tools_and_refuses_send(db: str) -> None:
    async def main() -> None:
        async with server(db, "watcher", "--read-only") as w:
            assert {t.name for t in (await w.list_tools()).tools} == READ_TOOLS
            await refused(w, "send", {"to": "bob"})
            assert (await call(w, "agents"))["agents"] == []  # not even registered

    run(main)


def test_a_payload_above_16384_bytes_is_truncated_with_a_flag(db: str) -> None:
    async def main() -> None:
        async with server(db, "bob") as bob:
            await call(bob, "send", {"to": "bob", "payload": {"text": "é" * 20_000}})
            message = (await call(bob, "receive", {"wait_seconds": 1}))["deliveries"][0]["message"]
            assert message["truncated"] is True and isinstance(message["payload"], str)
            assert message["payload"].startswith('{"text":"éé')
            assert 16_383 <= len(message["payload"].encode()) <= 16_384
            await call(bob, "state_set", {"key": "big", "value": list(range(10_000))})
            entry = (await call(bob, "state_get", {"key": "big"}))["entry"]
            assert entry["truncated"] is True and len(entry["value"]) == 16_384

    run(main)


def test_fail_without_retry_dead_letters_with_the_error_and_requeue_brings_it_back(
    db: str,
) -> None:
    async def main() -> None:
        async with server(db, "bob") as bob:
            await call(bob, "send", {"to": "bob", "payload": {"n": 1}})
            token = (await call(bob, "receive", {}))["deliveries"][0]["token"]
            failed = await call(bob, "fail", {"token": token, "error": "cannot", "retry": False})
            assert failed["outcome"] == "dead_lettered"
            dead = (await call(bob, "dead_letters"))["dead_letters"]
            assert [(d["reason"], d["error_name"], d["error_message"]) for d in dead] == [
                ("discarded", "AgentError", "cannot")]
            assert (await call(bob, "requeue", {"ref": dead[0]["ref"]}))["message_id"] == \
                failed["message_id"]
            token = (await call(bob, "receive", {}))["deliveries"][0]["token"]
            retried = await call(bob, "fail", {"token": token, "error": "later"})
            assert retried["outcome"] == "retrying"

    run(main)


def test_stdin_eof_releases_the_unsettled_deliveries_at_once(db: str) -> None:
    async def main() -> float:
        async with server(db, "bob") as bob:
            await call(bob, "send", {"to": "bob", "payload": {"n": 1}})
            assert (await call(bob, "receive", {}))["deliveries"]
            start = time.monotonic()
        return time.monotonic() - start

    took = run(main)
    assert took < 1.9  # before stdio_client's 2 s: exited, not killed
    with sqlbus.connect(db) as bus:
        again = bus.agent("bob").receive(wait=0)
        assert len(again) == 1 and again[0].attempts == 2


def test_subscribe_agents_and_events_reach_the_interested_agents(db: str) -> None:
    async def main() -> None:
        async with server(db, "alice") as alice, server(db, "bob") as bob:
            subs = await call(bob, "subscribe", {"events": ["build.*"]})
            assert subs == {"subscriptions": [{"kind": "event", "pattern": "build.*"}]}
            agents = {a["id"]: a for a in (await call(alice, "agents"))["agents"]}
            assert set(agents) == {"alice", "bob"} and agents["bob"]["alive"] is True
            await call(alice, "emit_event", {"name": "build.finished", "data": {"ok": True}})
            got = (await call(bob, "receive", {"wait_seconds": 5}))["deliveries"]
            assert got[0]["message"]["type"] == "event"
            sent = await call(alice, "broadcast", {"payload": {"hello": 1}})
            assert sent["recipients"] == ["bob"]

    run(main)


def test_without_the_mcp_extra_the_command_names_it_and_exits_1(db: str) -> None:
    code = ("import sys; sys.modules['mcp'] = None; from sqlbus.cli import main; "
            f"main(['mcp', '--db', {db!r}, '--agent', 'a'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert "sqlbus[mcp]" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""

