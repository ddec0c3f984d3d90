"""The README and docs/ say what the code does: their examples run, their links resolve, every
CLI command has a row, and the licence is the one pyproject.toml names."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

import sqlbus
from sqlbus.cli import cli as sqlbus_cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# The README's ```python blocks, by the heading of their section, and the example script
# that holds the same code.
SNIPPETS = {
    "Quick start": "quickstart.py",
    "Two agents: a run loop, a request, an event": "two_agents.py",
    "asyncio": "asyncio_agents.py",
    "PostgreSQL: agents on many hosts": "postgres.py",  # runs on the test server
}


def python_blocks(markdown: str) -> dict[str, str]:
    """Every ```python block, keyed by the ``## `` heading it is under (one block each)."""
    blocks: dict[str, str] = {}
    heading = ""
    for part in re.split(r"^(## .*)$", markdown, flags=re.M):
        if part.startswith("## "):
            heading = part[3:].strip()
            continue
        found = re.findall(r"^```python\n(.*?)^```$", part, flags=re.M | re.S)
        assert len(found) <= 1, f"section {heading!r} has {len(found)} python blocks"
        if found:
            blocks[heading] = found[0]
    return blocks


def run_python(code_or_script: str | Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable]
    command += [str(code_or_script)] if isinstance(code_or_script, Path) else ["-c", code_or_script]
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def assert_ran(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout + done.stderr
    # a handler's failure is logged with its traceback (the demo's are deliberate); no other
    logged = re.findall(r"^sqlbus: agent .+, attempt \d+: ", done.stderr, re.M)
    assert done.stderr.count("Traceback") == len(logged), done.stderr


README_BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_the_runnable_examples_and_nothing_else_in_python():
    assert set(README_BLOCKS) == set(SNIPPETS)


@pytest.mark.parametrize("heading", sorted(SNIPPETS))
def test_each_readme_example_is_also_a_script_in_examples(heading):
    script = EXAMPLES / SNIPPETS[heading]
    assert README_BLOCKS[heading] == script.read_text()


@pytest.mark.parametrize("heading", sorted(SNIPPETS))
def test_each_readme_python_block_runs_as_written_in_a_new_directory(heading, tmp_path):
    assert_ran(run_python(README_BLOCKS[heading], tmp_path))


# demo.py runs its agents as processes for seconds: slow; the others take a fraction of one.
@pytest.mark.parametrize("script", [
    pytest.param(name, marks=pytest.mark.slow) if name == "demo.py" else name
    for name in sorted(p.name for p in EXAMPLES.glob("*.py"))
])
def test_every_example_script_runs_to_the_end(script, tmp_path):
    # demo.py takes its database path; the others make theirs in the working directory
    args = [str(tmp_path / "demo.db")] if script == "demo.py" else []
    assert_ran(run_python(EXAMPLES / script, tmp_path, *args))


def test_the_quick_start_runs_twice_on_the_same_database(tmp_path):
    code = README_BLOCKS["Quick start"]
    first = run_python(code, tmp_path)
    second = run_python(code, tmp_path)
    assert_ran(first)
    assert_ran(second)
    assert "jobs done: 1 dead letters: 0" in first.stdout
    assert "jobs done: 2 dead letters: 0" in second.stdout


def test_the_readme_keeps_both_make_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_the_readme_has_no_references_a_newcomer_cannot_follow():
    text = README.read_text()
    assert not re.search(r"\bSPEC\b", text)
    assert "seed" not in text.lower()
    assert not re.search(r"\bissue \d", text)


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) < 300


def leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            names += leaf_commands(command, f"{prefix}{name} ")
        else:
            names.append(f"{prefix}{name}")
    return names


@pytest.mark.parametrize("command", sorted(leaf_commands(sqlbus_cli)))
def test_every_cli_command_has_a_row_in_the_readme(command):
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `sqlbus ")]
    assert any(row.startswith(f"| `sqlbus {command}") for row in rows), command


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page.name == "security.md"
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {link}"


def test_the_licence_is_mit_as_pyproject_says():
    pyproject = (ROOT / "pyproject.toml").read_text()
    licence = (ROOT / "LICENSE").read_text()
    assert re.search(r'^license = "MIT"$', pyproject, flags=re.M)
    assert licence.startswith("MIT License\n")
    assert "Copyright (c) 2026 the sqlbus authors" in licence
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in licence


def run_demo(tmp_path: Path) -> subprocess.CompletedProcess:
    """``make demo``'s run, with the temp directory (where its database goes) in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k != "SQLBUS_DEMO_STARTED"}
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run([sys.executable, str(EXAMPLES / "demo.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_demo_reuses_one_database_path_says_where_it_is_and_how_to_look_inside(tmp_path):
    path = tmp_path / f"sqlbus-demo-{os.getuid()}" / "team.db"
    first = run_demo(tmp_path)
    assert_ran(first)
    assert f"The database is {path}" in first.stdout
    with sqlbus.connect(path) as bus:  # something the next run must not find
        bus.state.set("left-by-an-earlier-run", True, notify=False)

    second = run_demo(tmp_path)
    assert_ran(second)
    assert f"The database is {path}" in second.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.parent.name]
    with sqlbus.connect(path) as bus:
        assert bus.state.get("left-by-an-earlier-run") is None
    sent = [re.search(r"messages sent +(\d+)", run.stdout).group(1) for run in (first, second)]
    assert sent[0] == sent[1]

    suggested = [line.strip() for line in second.stdout.splitlines()
                 if line.strip().endswith(f"--db {path} stats")]
    assert len(suggested) == 1
    looked = subprocess.run(shlex.split(suggested[0]), cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert looked.returncode == 0, looked.stderr
    assert re.search(r"^worker-3 .* 1 ", looked.stdout, flags=re.M), looked.stdout
