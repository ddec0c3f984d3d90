"""Run the dashboard with uvicorn (``sqlbus dashboard``): print the URL with its token once,
and log no request line (a query string may hold the token)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import uvicorn

from .app import create_app


def url_of(host: str, port: int, token: str) -> str:
    """The address to open, with ``?token=`` (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/?token={quote(token, safe='')}"


def serve(open_bus: Callable[[], Any], host: str, port: int, token: str, read_only: bool) -> None:
    """Serve the dashboard over the bus ``open_bus()`` returns until SIGINT or SIGTERM."""
    with open_bus() as bus:  # a Bus, or a context manager giving one
        app = create_app(bus, token, read_only)
        print(f"sqlbus dashboard{' (read-only)' if read_only else ''}: {url_of(host, port, token)}",
              flush=True)
        # access_log=False: uvicorn's access lines carry the query string, ?token= with it
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning",
                    server_header=False)
