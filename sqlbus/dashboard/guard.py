"""Who may use the dashboard (SPEC 14): the token rules at start, and the gate every request
but ``/healthz`` passes (bearer header or cookie; ``?token=`` sets the cookie and redirects),
the CSRF field of the pages' forms, and the headers every response carries."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

COOKIE = "sqlbus_token"
MIN_TOKEN = 16  # characters a given token needs
OPEN_PATHS = frozenset({"/healthz"})  # the one route without a token
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # A page's address never leaves for another site; "no-referrer" would also make the
    # browser send "Origin: null" with the pages' own POSTs, which the origin check refuses.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class TokenError(ValueError):
    """The host and token given cannot be served (SPEC 14: exit 2)."""


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def choose_token(host: str, token: str | None) -> str:
    """The token to serve with: the one given (16 characters or more), or a random one of
    256 bits on a loopback host. Raises :class:`TokenError` for a non-loopback ``host``
    without a token, or a token that is too short."""
    if token is not None and len(token) < MIN_TOKEN:
        raise TokenError(f"the dashboard token must be at least {MIN_TOKEN} characters")
    if token is None and not is_loopback(host):
        raise TokenError(f"--host {host} is not a loopback address: give --token "
                         "(or SQLBUS_DASHBOARD_TOKEN), at least 16 characters")
    return token if token is not None else secrets.token_urlsafe(32)


def csrf_of(token: str) -> str:
    """The CSRF field the pages embed: an HMAC of the token (the token itself never goes in
    a page)."""
    return hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret with the expected one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _without_token(url: URL) -> str:
    query = [(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k != "token"]
    return url.path + (f"?{urlencode(query)}" if query else "")


class Gate:
    """ASGI middleware: the token on every route but ``/healthz``, and the security headers
    on every response. Sets ``scope["state"]["auth"]`` to ``"bearer"`` or ``"cookie"``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send_with_headers)
            return
        request = Request(scope)
        auth = self.authenticate(request)
        if auth == "query":
            response = RedirectResponse(_without_token(request.url), status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            await response(scope, receive, send_with_headers)
            return
        if auth is None:
            refusal = PlainTextResponse("401 unauthorized: open the URL with ?token= that "
                                        "sqlbus dashboard printed", status_code=401)
            await refusal(scope, receive, send_with_headers)
            return
        scope.setdefault("state", {})["auth"] = auth
        await self.app(scope, receive, send_with_headers)

    def authenticate(self, request: Request) -> str | None:
        """How the request proved it holds the token: ``"bearer"``, ``"cookie"``,
        ``"query"`` (``?token=``: set the cookie and redirect), or None."""
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer " and same(header[7:].strip(), self.token):
            return "bearer"
        if "token" in request.query_params:
            return "query" if same(request.query_params["token"], self.token) else None
        if same(request.cookies.get(COOKIE), self.token):
            return "cookie"
        return None
