"""The web dashboard (SPEC 14) through Starlette's TestClient on a real SQLite file: every
route renders with data present, every refusal refuses and changes nothing, everything from
the bus comes out escaped, the actions act, the overview's stream sends counters; and the
``sqlbus dashboard`` command as a real process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the dashboard needs the extra sqlbus[web]")

from click.testing import CliRunner  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import sqlbus  # noqa: E402
from sqlbus.cli import cli  # noqa: E402
from sqlbus.dashboard.app import create_app  # noqa: E402
from sqlbus.dashboard.guard import COOKIE, TokenError, choose_token, csrf_of  # noqa: E402

TOKEN = "a-test-token-of-32-characters-ok"
EVIL = "<script>alert(1)</script>"
PAGES = ["/", "/agents", "/agents/bob", "/leases", "/dead-letters", "/state", "/state/team/plan",
         "/tail"]


@pytest.fixture
def bus(tmp_path: Path):
    """A bus with agents, queued messages, two dead letters, a state key, and ``<script>``
    in a payload, an error, a state value and an agent id."""
    with sqlbus.connect(tmp_path / "dash.db") as b:
        alice, bob = b.agent("alice"), b.agent("bob")
        b.agent("carol").subscribe("notification")
        alice.publish("bob", "notification", {"text": EVIL, "n": 1}, priority=5)
        alice.publish("bob", "request", {"task": "ship"})
        alice.publish(["bob", "carol"], "notification", {"text": "both"})
        for delivery in bob.receive(limit=2, types=["notification"]):
            delivery.fail(ValueError(EVIL), retryable=False)
        alice.publish("bob", "notification", {"text": EVIL, "n": 2})
        b.state.set("team/plan", {"step": EVIL})
        yield b


@pytest.fixture
def client(bus):
    with TestClient(create_app(bus, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def browser(bus, read_only: bool = False) -> TestClient:
    """A client that signs in as a browser does: ``?token=``, then the cookie."""
    c = TestClient(create_app(bus, TOKEN, read_only), base_url="http://127.0.0.1:8642")
    r = c.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303
    return c


def first_dead_id(bus) -> int:
    return bus.dead_letters()[0].id


# -- every route renders --------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_with_data_present_and_sends_the_csp(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-security-policy"] == "default-src 'self'"
    assert "<script>" not in r.text.replace('<script src="/static/live.js" defer></script>', "")


def test_the_detail_pages_render_a_dead_letter_and_its_message(client, bus):
    dead = bus.dead_letters()[0]
    r = client.get(f"/dead-letters/{dead.id}")
    assert r.status_code == 200 and "ValueError" in r.text and "Traceback" in r.text
    r = client.get(f"/messages/{dead.message.id}")
    assert r.status_code == 200 and dead.message.id in r.text
    queued = bus.peek("bob")[0].message.id
    r = client.get(f"/messages/{queued}")
    assert r.status_code == 200 and "ready" in r.text


def test_pages_show_the_figures_of_the_bus(client, bus):
    m = bus.metrics()
    assert f'data-key="sent">{m.messages_sent}<' in client.get("/").text
    assert f'data-key="dead_lettered">{m.messages_dead_lettered}<' in client.get("/").text
    agents = client.get("/agents").text
    assert all(name in agents for name in ("alice", "bob", "carol"))
    assert "type:notification" in agents


def test_the_inbox_filters_by_type_state_priority_and_text(client):
    assert "ship" in client.get("/agents/bob?type=request").text
    r = client.get("/agents/bob?q=ship")
    assert "ship" in r.text and "both" not in r.text
    assert "Nothing in this inbox matches" in client.get("/agents/bob?priority=1").text
    assert "Nothing in this inbox matches" in client.get("/agents/bob?state=leased").text


def next_link(html: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" rel="next">', html)
    return None if found is None else found.group(1).replace("&amp;", "&")


def test_the_inbox_pages_by_position_through_a_large_inbox_with_its_filters(client, bus):
    alice = bus.agent("alice")
    ids = alice.publish_many([{"to": "dave", "type": "request", "payload": {"i": i}}
                              for i in range(120)])
    seen, url, pages = [], "/agents/dave", 0
    while url is not None:
        html = client.get(url if url.startswith("/") else "/agents/dave" + url).text
        seen += re.findall(r'href="/messages/([^"]+)"', html)
        url, pages = next_link(html), pages + 1
    assert seen == ids and pages == 3
    assert "end of the inbox" in html
    html = client.get("/agents/dave?type=request&state=ready&priority=3").text
    assert "after=" in next_link(html) and "type=request" in next_link(html)
    assert client.get("/agents/dave?after=garbage").status_code == 400
    assert client.get("/agents/dave?priority=9").status_code == 400


def test_the_message_page_shows_each_inbox_with_its_error_and_traceback(client, bus):
    alice, bob, carol = bus.agent("alice"), bus.agent("bob"), bus.agent("carol")
    message_id = alice.publish(["bob", "carol"], "request", {"task": "two"})
    (d,) = bob.receive(types=["request"], limit=1) or [None]
    while d.message.id != message_id:  # the fixture's request comes first
        d.ack()
        (d,) = bob.receive(types=["request"])
    d.fail(KeyError("missing-part"), retryable=False)
    (c,) = carol.receive(types=["request"])
    html = client.get(f"/messages/{message_id}").text
    assert "dead (non_retryable)" in html and "KeyError" in html and "missing-part" in html
    assert "Traceback" in html and "leased" in html and c.message.id == message_id


def test_the_leases_page_lists_what_is_in_flight_soonest_first(client, bus):
    assert "No message is in flight" in client.get("/leases").text
    (d,) = bus.agent("bob").receive(lease=60)
    html = client.get("/leases").text
    assert d.message.id in html and "bob" in html
    assert "No message is in flight" in client.get("/leases?agent=carol").text


def test_dead_letters_page_by_number(client, bus):
    alice, erin = bus.agent("alice"), bus.agent("erin")
    alice.publish_many([{"to": "erin", "type": "request", "payload": {"i": i}}
                        for i in range(60)])
    for d in erin.receive(limit=60):
        d.fail(RuntimeError("no"), retryable=False)
    first = client.get("/dead-letters?agent=erin").text
    more = next_link(first)
    assert more is not None and "agent=erin" in more
    second = client.get("/dead-letters" + more).text
    numbers = [int(n) for n in re.findall(r'href="/dead-letters/(\d+)"', first + second)]
    assert len(numbers) == 60 == len(set(numbers)) and numbers == sorted(numbers, reverse=True)
    assert next_link(second) is None
    assert client.get("/dead-letters?after=x").status_code == 400


def test_a_state_key_shows_its_recent_changes(client, bus):
    bus.state.set("team/plan", {"step": "two"})
    bus.state.set("gone", 1)
    bus.state.delete("gone")
    html = client.get("/state/team/plan").text
    assert "Recent changes" in html and "two" in html and html.count("<tr><td>") >= 2
    html = client.get("/state/gone").text  # deleted, its history still shown
    assert "This key is deleted" in html and "deleted" in html


def test_dead_letters_filter_by_agent_and_reason(client):
    assert "non_retryable" in client.get("/dead-letters?agent=bob").text
    assert "No dead letters" in client.get("/dead-letters?agent=carol").text
    assert "No dead letters" in client.get("/dead-letters?reason=expired").text


def test_missing_things_are_404_and_bad_filters_400(client):
    assert client.get("/dead-letters/999999").status_code == 404
    assert client.get("/messages/nope").status_code == 404
    assert client.get("/state/no/such/key").status_code == 404
    assert client.get("/agents/" + "x" * 300).status_code == 400
    assert client.get("/sse/tail?type=nonsense").status_code == 400


def test_metrics_is_the_prometheus_text(client, bus):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == sqlbus.metrics.to_prometheus(bus.metrics()) or "sqlbus_" in r.text


def test_the_static_files_and_favicon_are_served(client):
    for path in ("/static/style.css", "/static/live.js", "/static/favicon.svg"):
        assert client.get(path).status_code == 200
    assert client.get("/favicon.ico").status_code == 200  # redirected to the svg


# -- escaping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/agents/bob", "/dead-letters", "/state", "/state/team/plan"])
def test_a_payload_holding_script_comes_out_escaped(client, path):
    text = client.get(path).text
    assert EVIL not in text
    assert "&lt;script&gt;" in text or "\\u003cscript\\u003e" in text


def test_the_detail_pages_escape_payload_error_and_traceback(client, bus):
    dead = next(d for d in bus.dead_letters() if d.message.payload["text"] == EVIL)
    for path in (f"/dead-letters/{dead.id}", f"/messages/{dead.message.id}"):
        text = client.get(path).text
        assert EVIL not in text and "&lt;script&gt;" in text


# -- healthz ------------------------------------------------------------------------------------


def test_healthz_needs_no_token_and_says_only_status_and_schema_version(bus):
    c = TestClient(create_app(bus, TOKEN))
    r = c.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "schema_version": bus.schema_version()}
    assert bus.schema_version() >= 1


def test_healthz_is_503_when_the_bus_cannot_be_read(tmp_path):
    b = sqlbus.connect(tmp_path / "gone.db")
    c = TestClient(create_app(b, TOKEN))
    b.close()
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "error"}


# -- the token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, "/metrics", "/sse/overview", "/static/style.css"])
def test_every_route_but_healthz_is_401_without_the_token(bus, path):
    c = TestClient(create_app(bus, TOKEN))
    r = c.get(path)
    assert r.status_code == 401
    assert TOKEN not in r.text


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong-token-of-enough-length"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Cookie": f"{COOKIE}=wrong"},
])
def test_a_wrong_token_is_401(bus, headers):
    c = TestClient(create_app(bus, TOKEN), headers=headers)
    assert c.get("/").status_code == 401


def test_a_wrong_query_token_is_401_and_sets_no_cookie(bus):
    c = TestClient(create_app(bus, TOKEN))
    r = c.get("/?token=wrong", follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers


def test_the_query_token_sets_a_strict_httponly_cookie_and_redirects_without_it(bus):
    c = TestClient(create_app(bus, TOKEN))
    r = c.get(f"/agents?token={TOKEN}&x=1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/agents?x=1"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert c.get("/agents").status_code == 200  # the cookie now


def test_the_pages_embed_the_csrf_field_never_the_token(bus):
    c = browser(bus)
    text = c.get("/dead-letters").text
    assert f'name="csrf" value="{csrf_of(TOKEN)}"' in text
    assert TOKEN not in text


# -- actions and their refusals -----------------------------------------------------------------


def test_requeue_one_moves_it_back_and_answers_303_to_the_list(bus):
    c = browser(bus)
    number = first_dead_id(bus)
    r = c.post(f"/dead-letters/{number}/requeue", data={"csrf": csrf_of(TOKEN)},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dead-letters"
    assert bus.dead_letter(number) is None
    assert len(bus.dead_letters()) == 1


def test_requeue_all_matching_moves_them_all_back(client, bus):
    r = client.post("/dead-letters/requeue", data={"agent": "bob"}, follow_redirects=False)
    assert r.status_code == 303  # bearer: no csrf field needed (a browser never sends one)
    assert bus.dead_letters() == []
    assert {e.status for e in bus.peek("bob", 10)} == {"ready"}


def test_requeue_all_keeps_those_of_another_reason(client, bus):
    client.post("/dead-letters/requeue", data={"reason": "expired"})
    assert len(bus.dead_letters()) == 2


def test_a_cookie_post_without_or_with_a_wrong_csrf_is_403_and_changes_nothing(bus):
    c = browser(bus)
    number = first_dead_id(bus)
    for data in ({}, {"csrf": "0" * 64}, {"csrf": TOKEN}):
        assert c.post(f"/dead-letters/{number}/requeue", data=data).status_code == 403
        assert c.post("/dead-letters/requeue", data=data).status_code == 403
        assert c.post("/dead-letters/purge", data={**data, "all": "1",
                                                   "confirm": "purge"}).status_code == 403
    assert len(bus.dead_letters()) == 2


def test_a_post_from_another_origin_is_403_even_with_the_csrf_field(bus):
    c = browser(bus)
    r = c.post("/dead-letters/requeue", data={"csrf": csrf_of(TOKEN)},
               headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and len(bus.dead_letters()) == 2


def test_a_post_without_the_token_is_401_and_changes_nothing(bus):
    c = TestClient(create_app(bus, TOKEN))
    assert c.post("/dead-letters/requeue", data={"csrf": csrf_of(TOKEN)}).status_code == 401
    assert len(bus.dead_letters()) == 2


def test_read_only_shows_no_actions_and_refuses_every_post(bus):
    c = browser(bus, read_only=True)
    text = c.get("/dead-letters").text
    assert 'method="post"' not in text and "read-only" in text
    number = first_dead_id(bus)
    csrf = {"csrf": csrf_of(TOKEN)}
    assert c.post(f"/dead-letters/{number}/requeue", data=csrf).status_code == 403
    assert c.post("/dead-letters/requeue", data=csrf).status_code == 403
    assert c.post("/dead-letters/purge", data={**csrf, "all": "1",
                                               "confirm": "purge"}).status_code == 403
    assert len(bus.dead_letters()) == 2


def test_purge_without_confirm_is_400_and_changes_nothing(client, bus):
    for data in ({"all": "1"}, {"all": "1", "confirm": "yes"}, {"older_than": "0s"}):
        assert client.post("/dead-letters/purge", data=data).status_code == 400
    assert len(bus.dead_letters()) == 2


def test_purge_with_a_bad_duration_is_400(client, bus):
    r = client.post("/dead-letters/purge", data={"older_than": "soon", "confirm": "purge"})
    assert r.status_code == 400 and len(bus.dead_letters()) == 2


def test_purge_older_than_keeps_the_new_ones_and_all_deletes_them(client, bus):
    r = client.post("/dead-letters/purge", data={"older_than": "1h", "confirm": "purge"},
                    follow_redirects=False)
    assert r.status_code == 303 and len(bus.dead_letters()) == 2
    client.post("/dead-letters/purge", data={"all": "1", "confirm": "purge"})
    assert bus.dead_letters() == []


def test_requeue_of_a_dead_letter_that_is_gone_is_404(client):
    assert client.post("/dead-letters/999999/requeue").status_code == 404


# -- server-sent events -----------------------------------------------------------------------


def test_the_overview_stream_sends_a_counters_event(client, bus):
    with client.stream("GET", "/sse/overview") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: counters"
        data = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
    assert data["sent"] == bus.metrics().messages_sent
    assert data["dead_lettered"] == 2


def test_the_tail_stream_sends_each_new_message(client, bus):
    alice = bus.agent("alice")
    with client.stream("GET", "/sse/tail?agent=carol") as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        time.sleep(0.3)  # the stream's follower starts from now
        alice.publish("bob", "notification", {"text": "not for carol"})
        alice.publish("carol", "notification", {"text": EVIL})
        data = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
    assert data["to"] == ["carol"] and EVIL in data["payload"]  # text for textContent


@pytest.mark.slow
def test_the_tail_stream_misses_nothing_across_its_one_second_slices(client, bus):
    alice = bus.agent("alice")
    with client.stream("GET", "/sse/tail?agent=frank") as r:
        lines = r.iter_lines()
        time.sleep(0.3)
        for i in range(8):  # 2.8 s: across at least two slices of the follower
            alice.publish("frank", "notification", {"i": i})
            time.sleep(0.35)
        got = []
        while len(got) < 8:
            line = next(lines)
            if line.startswith("data:"):
                got.append(json.loads(json.loads(line[5:])["payload"])["i"])
    assert got == list(range(8))


# -- the command -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.2", "::"])
def test_a_non_loopback_host_without_a_token_is_refused(host):
    with pytest.raises(TokenError):
        choose_token(host, None)


def test_tokens_are_long_random_or_given():
    made = choose_token("127.0.0.1", None)
    assert len(made) >= 32 and made != choose_token("localhost", None)
    assert choose_token("0.0.0.0", TOKEN) == TOKEN
    with pytest.raises(TokenError):
        choose_token("127.0.0.1", "short")


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--token", "fifteen-chars!!"]])
def test_the_command_refuses_a_bad_host_or_token_with_exit_2(tmp_path, args):
    sqlbus.connect(tmp_path / "x.db").close()
    result = CliRunner(env={"SQLBUS_DASHBOARD_TOKEN": None}).invoke(
        cli, ["--db", str(tmp_path / "x.db"), "dashboard", *args])
    assert result.exit_code == 2
    assert "token" in result.output.lower()


def test_without_the_web_extra_the_command_names_it_and_exits_1(tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name.startswith(("sqlbus.dashboard", "starlette")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "starlette", None)
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "x.db"), "dashboard"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "sqlbus[web]" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_prints_the_url_and_never_logs_the_token(tmp_path):
    db = tmp_path / "cmd.db"
    sqlbus.connect(db).close()
    port = _free_port()
    env = {**os.environ, "SQLBUS_DASHBOARD_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "sqlbus", "--db", str(db), "dashboard",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert re.search(rf"http://127\.0\.0\.1:{port}/\?token={TOKEN}", line), line
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("the dashboard did not start")
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(f"http://127.0.0.1:{port}/agents?token={TOKEN}", timeout=5) as r:
            assert r.status == 200 and r.url.endswith("/agents")  # redirected, with the cookie
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    assert TOKEN not in err


@pytest.mark.backends
def test_every_page_and_action_works_on_both_backends(database):
    """The dashboard over each backend: every page renders with data, a requeue acts."""
    b = database.connect()
    try:
        alice, bob = b.agent("alice"), b.agent("bob")
        alice.publish("bob", "notification", {"text": EVIL}, priority=5)
        alice.publish("bob", "request", {"task": "ship"})
        (d,) = bob.receive(types=["notification"])
        d.fail(ValueError(EVIL), retryable=False)
        (leased,) = bob.receive(lease=60)
        b.state.set("team/plan", {"step": 1})
        dead = b.dead_letters()[0]
        with TestClient(create_app(b, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            for path in [*PAGES, f"/messages/{dead.message.id}", f"/dead-letters/{dead.id}",
                         "/agents/bob?state=leased", "/metrics", "/healthz"]:
                r = c.get(path)
                assert r.status_code == 200, (path, r.text)
                assert "<script>alert" not in r.text
            assert leased.message.id in c.get("/leases").text
            r = c.post(f"/dead-letters/{dead.id}/requeue", follow_redirects=False)
            assert r.status_code == 303 and b.dead_letters() == []
    finally:
        b.close()


def test_the_sampler_reads_once_for_many_callers_and_waits_longer_after_a_slow_read(bus):
    import asyncio

    from sqlbus.dashboard.live import COST_FACTOR, Sampler

    sampler = Sampler(bus, interval=0.01)
    real = sampler.follower

    class Counting:  # the real follower, its reads counted and made slow
        calls = 0

        def read(self):
            Counting.calls += 1
            time.sleep(0.05)
            return real.read()

    sampler.follower = Counting()

    async def main():
        await asyncio.gather(*(sampler.latest() for _ in range(20)))
        assert Counting.calls == 1
        gap = sampler._next_read - time.monotonic()
        assert gap > (COST_FACTOR - 5) * 0.05  # not 0.01 s: 50 times the read's 0.05 s
        for _ in range(5):  # pages in the meantime are served from the sample
            assert (await sampler.latest())["sent"] == bus.metrics().messages_sent
        assert Counting.calls == 1

    asyncio.run(main())
