"""The shape of the library stays as issue 14 left it: tools/figures.py measures it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

spec = importlib.util.spec_from_file_location("figures", ROOT / "tools" / "figures.py")
assert spec is not None and spec.loader is not None
figures = importlib.util.module_from_spec(spec)
sys.modules["figures"] = figures
spec.loader.exec_module(figures)

MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80
MAX_ALLOWED_REACHES = 5


def test_no_import_cycle_among_library_modules() -> None:
    assert figures.figures()["cycles"] == []


def test_no_module_reaches_another_modules_private_names_but_a_commented_few() -> None:
    reaches = figures.figures()["reaches"]
    assert [r for r in reaches if not r["allowed"]] == []
    assert len(reaches) <= MAX_ALLOWED_REACHES


def test_no_library_module_is_over_800_lines() -> None:
    sizes = figures.figures()["sizes"]
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_80_lines() -> None:
    longest = figures.figures()["longest_functions"]
    assert [f for f in longest if f["lines"] > MAX_FUNCTION_LINES] == []


def test_the_figures_see_a_cycle_a_reach_and_a_long_function(tmp_path: Path) -> None:
    # The rules themselves, on a made-up package: so a passing test above means something.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert figures.cycles(graph) == [["a", "b", "c"]]
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "one.py").write_text("from .two import _hidden\n\ndef f(x):\n    return x._secret\n")
    (package / "two.py").write_text("_hidden = 1\n")
    found = figures.ModuleFacts("pkg.one", package / "one.py", {"pkg.one", "pkg.two"})
    found.visit(figures.ast.parse((package / "one.py").read_text()))
    reaches = [r["reach"] for r in found.reaches()]
    assert reaches == ["from pkg.two import _hidden", "x._secret"]
    assert found.functions == [(2, "f")]
