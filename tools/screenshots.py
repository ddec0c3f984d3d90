"""Screenshots of every dashboard view, for docs/img/ (the README shows the overview).

    .venv/bin/python tools/screenshots.py            # writes docs/img/dashboard-*.png

It fills a new bus with a small team's traffic (a planner handing tasks to two workers, one
failing now and then, shared state, a few dead letters), serves it with ``sqlbus dashboard``,
keeps traffic flowing for ``--seconds`` so the overview's chart has a line, and saves each view
with headless Chromium (Playwright, ``/usr/bin/chromium``).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import sqlbus

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "screenshots-token-of-32-chars-ok"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def fill(bus: sqlbus.Bus) -> None:
    planner, coder, tester = bus.agent("planner"), bus.agent("coder"), bus.agent("tester")
    coder.subscribe("task_assignment")
    tester.subscribe("task_assignment")
    tester.subscribe("event")
    for i in range(30):
        planner.publish("coder" if i % 3 else "tester", "task_assignment",
                        {"task": {"id": f"ticket-{100 + i}", "type": "resize",
                                  "description": "resize the thumbnails",
                                  "parameters": {"width": 640, "height": 480}}},
                        priority=1 + i % 5, ttl=0)
    for d in tester.receive(limit=4):
        d.fail(ValueError(f"fixture {d.message.payload['task']['id']} is missing"),
               retryable=False)
    coder.receive(limit=3, lease=300)
    bus.state.set("team/plan", {"sprint": 14, "goal": "ship the dashboard", "owners": ["coder"]})
    bus.state.set("team/plan", {"sprint": 14, "goal": "ship the dashboard",
                                "owners": ["coder", "tester"]})
    bus.state.set("build/status", {"green": True, "commit": "6e0980c"})


def traffic(path: Path, stop: threading.Event) -> None:
    with sqlbus.connect(path) as bus:
        planner, worker = bus.agent("planner"), bus.agent("reviewer")
        rng = random.Random(7)
        while not stop.is_set():
            n = rng.randint(5, 40)
            planner.publish_many([{"to": "reviewer", "type": "request",
                                   "payload": {"review": i}} for i in range(n)])
            for d in worker.receive(limit=n):
                d.ack()
            time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--seconds", type=float, default=25.0, help="traffic before the overview")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "team.db"
        with sqlbus.connect(db) as bus:
            fill(bus)
            dead = bus.dead_letters()[0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "SQLBUS_DASHBOARD_TOKEN": TOKEN}
        server = subprocess.Popen([sys.executable, "-m", "sqlbus", "--db", str(db), "dashboard",
                                   "--port", str(port)], stdout=subprocess.DEVNULL, env=env)
        base = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        flow = threading.Thread(target=traffic, args=(db, stop), daemon=True)
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(base + "/healthz", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            flow.start()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                page.goto(f"{base}/?token={TOKEN}")
                page.wait_for_timeout(args.seconds * 1000)
                views = [("overview", "/"), ("agents", "/agents"), ("inbox", "/agents/coder"),
                         ("message", f"/messages/{dead.message.id}"), ("leases", "/leases"),
                         ("dead-letters", "/dead-letters"), ("state", "/state/team/plan"),
                         ("tail", "/tail")]
                for name, url in views:
                    page.goto(base + url)
                    page.wait_for_timeout(2500 if name == "tail" else 300)
                    target = args.out / f"dashboard-{name}.png"
                    page.screenshot(path=str(target))
                    print(target.relative_to(ROOT) if target.is_relative_to(ROOT) else target)
                browser.close()
        finally:
            stop.set()
            flow.join(5)
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
