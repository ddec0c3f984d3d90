"""The dashboard's Starlette app (SPEC 14): small route functions over the public library API,
one template per page. No SQL here: every figure comes from a :class:`sqlbus.Bus` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import msgspec
from anyio import to_thread
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..bus import Bus
from ..cli_common import parse_duration
from ..errors import NotFoundError, SqlbusError
from ..metrics import to_prometheus
from ..ops import PEEK_STATUSES
from .guard import Gate, csrf_of, same
from .live import Sampler, chart_points
from .streams import overview_events, tail_events

HERE = Path(__file__).parent
PAGE = 50  # rows a page
SCAN = 2_000  # rows a filtered inbox page looks at, at most (about 100 ms), before it stops


def _templates() -> Jinja2Templates:
    # autoescape for every template whatever its name (Jinja2Templates' default escapes only
    # .html/.htm/.xml names: FIELD-NOTES 4); undefined names fail loudly in tests.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["pretty"] = _pretty
    return Jinja2Templates(env=env)


def _pretty(value: Any) -> str:
    """Indented JSON of a payload, context or state value (escaped by the template)."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


class Dashboard:
    """The routes' shared state: the bus, the token's CSRF field, read-only, the sampler."""

    def __init__(self, bus: Bus, token: str, read_only: bool) -> None:
        self.bus = bus
        self.csrf = csrf_of(token)
        self.read_only = read_only
        self.sampler = Sampler(bus)
        self.templates = _templates()

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.update(csrf=self.csrf, read_only=self.read_only, path=request.url.path)
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    async def run(self, fn: Any, *args: Any) -> Any:
        """A blocking library call, in a worker thread."""
        return await to_thread.run_sync(lambda: fn(*args))

    async def action_form(self, request: Request) -> FormData | Response:
        """The form of an allowed POST, or the 403 that refuses it (nothing changed)."""
        if self.read_only:
            return PlainTextResponse("403 forbidden: the dashboard is read-only", 403)
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            return PlainTextResponse("403 forbidden: cross-origin request", 403)
        form = await request.form()
        if request.scope["state"].get("auth") != "bearer":
            given = form.get("csrf")
            if not same(given if isinstance(given, str) else None, self.csrf):
                return PlainTextResponse("403 forbidden: missing or wrong csrf field", 403)
        return form

    # -- pages --------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        latest = await self.sampler.latest()
        rates = self.sampler.rates()
        return self.page(request, "overview.html", figures=latest, points=chart_points(rates),
                         rates=" ".join(f"{r:.3f}" for r in rates))

    async def agents(self, request: Request) -> Response:
        infos, stats = await self.run(lambda: (self.bus.agents(), self.bus.stats()))
        depth = {s.agent: s for s in stats}
        rows = [(info, depth.get(info.id)) for info in infos]
        known = {info.id for info in infos}
        rows += [(None, s) for s in stats if s.agent not in known]  # recipients never registered
        return self.page(request, "agents.html", rows=rows)

    async def inbox(self, request: Request) -> Response:
        agent = request.path_params["agent"]
        q = request.query_params
        filters = {k: q.get(k, "") for k in ("type", "state", "priority", "q")}
        try:
            page = await self.run(lambda: self.bus.peek_page(
                agent, after=q.get("after") or None, limit=PAGE, type=filters["type"] or None,
                status=filters["state"] or None, priority=_priority(filters["priority"]),
                text=filters["q"] or None, scan=SCAN))
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        kept = {k: v for k, v in filters.items() if v}
        more = None if page.after is None else "?" + urlencode({**kept, "after": page.after})
        first = None if not q.get("after") else "?" + urlencode(kept)
        return self.page(request, "inbox.html", agent=agent, rows=page.entries,
                         filters=filters, states=PEEK_STATUSES, more=more, first=first,
                         scan=SCAN)

    async def message(self, request: Request) -> Response:
        message_id = request.path_params["id"]
        try:
            trace = await self.run(self.bus.trace, message_id)
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        if trace is None:
            return self.page(request, "error.html", 404, message=f"no message {message_id}")
        return self.page(request, "message.html", trace=trace, message=trace.message)

    async def leases(self, request: Request) -> Response:
        agent = request.query_params.get("agent") or None
        try:
            rows = await self.run(self.bus.leases, agent, PAGE * 4)
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        return self.page(request, "leases.html", rows=rows, agent=agent or "", limit=PAGE * 4)

    async def dead_letters(self, request: Request) -> Response:
        q = request.query_params
        agent = q.get("agent") or None
        reason = q.get("reason") or None
        try:
            after = int(q["after"]) if q.get("after") else None
            rows = await self.run(lambda: self.bus.dead_letters(
                agent, PAGE, reason=reason, after=after))
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        more = None if len(rows) < PAGE else "?" + urlencode(
            {**({"agent": agent} if agent else {}), **({"reason": reason} if reason else {}),
             "after": rows[-1].id})
        return self.page(request, "dead_letters.html", rows=rows, agent=agent or "",
                         reason=reason or "", more=more)

    async def dead_letter(self, request: Request) -> Response:
        number = request.path_params["n"]
        found = await self.run(self.bus.dead_letter, number)
        if found is None:
            return self.page(request, "error.html", 404, message=f"no dead letter {number}")
        return self.page(request, "dead_letter.html", dead=found)

    async def state(self, request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        try:
            entries = await self.run(self.bus.state.items, prefix)
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        return self.page(request, "state.html", entries=entries, prefix=prefix)

    async def state_key(self, request: Request) -> Response:
        key = request.path_params["key"]
        try:
            entry = await self.run(self.bus.state.get, key)
            history = await self.run(self.bus.state.history, key, PAGE)
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        if entry is None and not history:
            return self.page(request, "error.html", 404, message=f"no state key {key}")
        return self.page(request, "state_key.html", key=key, entry=entry, history=history)

    async def tail(self, request: Request) -> Response:
        agent = request.query_params.get("agent", "")
        type_ = request.query_params.get("type", "")
        return self.page(request, "tail.html", agent=agent, type=type_)

    # -- actions ------------------------------------------------------------------------------

    async def requeue_one(self, request: Request) -> Response:
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        try:
            await self.run(self.bus.requeue, request.path_params["n"])
        except NotFoundError as exc:
            return self.page(request, "error.html", 404, message=str(exc))
        return RedirectResponse("/dead-letters", status_code=303)

    async def requeue_all(self, request: Request) -> Response:
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        agent = str(form.get("agent") or "") or None
        reason = str(form.get("reason") or "") or None
        try:
            await self.run(self.bus.requeue_dead_letters, agent, reason)
        except (ValueError, SqlbusError) as exc:
            return self.page(request, "error.html", 400, message=str(exc))
        return RedirectResponse("/dead-letters", status_code=303)

    async def purge(self, request: Request) -> Response:
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        if form.get("confirm") != "purge":
            return self.page(request, "error.html", 400,
                             message="a purge needs the field confirm=purge")
        older_than: float | None = None
        if form.get("all") != "1":
            try:
                older_than = parse_duration(str(form.get("older_than") or ""))
            except ValueError as exc:
                return self.page(request, "error.html", 400, message=str(exc))
            if older_than is None:
                return self.page(request, "error.html", 400,
                                 message="older_than must be a duration; all=1 purges all")
        await self.run(self.bus.purge_dead_letters, older_than)
        return RedirectResponse("/dead-letters", status_code=303)

    # -- machine routes -----------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        m = await self.sampler.latest_metrics()  # the overview's read: one for all callers
        return PlainTextResponse(to_prometheus(m), media_type="text/plain; version=0.0.4")

    async def healthz(self, request: Request) -> Response:
        try:
            version = await self.run(self.bus.schema_version)
        except Exception:  # any failure is the one answer: not healthy, nothing more said
            return JSONResponse({"status": "error"}, status_code=503)
        return JSONResponse({"status": "ok", "schema_version": version})

    async def sse_overview(self, request: Request) -> Response:
        return EventSourceResponse(overview_events(request, self.sampler), ping=15,
                                   send_timeout=30)

    async def sse_tail(self, request: Request) -> Response:
        agent = request.query_params.get("agent") or None
        type_ = request.query_params.get("type") or None
        try:  # check the filters now: a bad one is a 400, not a broken stream
            self.bus.tail(agent, [type_] if type_ else None, timeout=0)
        except (ValueError, SqlbusError) as exc:
            return PlainTextResponse(f"400 bad request: {exc}", 400)
        return EventSourceResponse(tail_events(request, self.bus, agent, type_), ping=15,
                                   send_timeout=30)


def _priority(text: str) -> int | None:
    """The priority filter of a query string: empty for any, else 1..5."""
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"priority must be 1..5, got {text!r}")
    return int(text)


def create_app(bus: Bus, token: str, read_only: bool = False) -> Any:
    """The dashboard as an ASGI app over ``bus``: every route but ``/healthz`` needs
    ``token``; ``read_only`` shows no actions and refuses every POST (403)."""
    d = Dashboard(bus, token, read_only)
    routes = [
        Route("/", d.overview),
        Route("/agents", d.agents),
        Route("/agents/{agent}", d.inbox),
        Route("/messages/{id}", d.message),
        Route("/leases", d.leases),
        Route("/dead-letters", d.dead_letters),
        Route("/dead-letters/requeue", d.requeue_all, methods=["POST"]),
        Route("/dead-letters/purge", d.purge, methods=["POST"]),
        Route("/dead-letters/{n:int}", d.dead_letter),
        Route("/dead-letters/{n:int}/requeue", d.requeue_one, methods=["POST"]),
        Route("/state", d.state),
        Route("/state/{key:path}", d.state_key),
        Route("/tail", d.tail),
        Route("/sse/overview", d.sse_overview),
        Route("/sse/tail", d.sse_tail),
        Route("/metrics", d.metrics),
        Route("/healthz", d.healthz),
        Route("/favicon.ico", lambda r: RedirectResponse("/static/favicon.svg", 301)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = d
    return Gate(app, token)
