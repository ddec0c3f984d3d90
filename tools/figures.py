"""Print the shape figures of the library: module sizes, import cycles, reaches into another
module's private names, and the longest functions.

    python tools/figures.py            # the report
    python tools/figures.py --json     # the same figures as JSON (tests/test_figures.py reads them)

Rules the figures follow:
- an import is an edge between two sqlbus modules wherever it is written (module level or inside
  a function), except under ``if TYPE_CHECKING:``, which never runs;
- a private reach is ``from .module import _name``, ``module._name`` on an imported sqlbus
  module, or ``expr._name`` where ``expr`` is not ``self``/``cls`` and ``_name`` is not defined in
  the module doing the reaching (a class reading another instance of itself is not a reach).
  A reach on a line carrying the comment ``# reach:`` (which says why) is counted as allowed;
- a function's length is its lines from ``def`` to its last line, decorators excluded.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sqlbus"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


class ModuleFacts(ast.NodeVisitor):
    def __init__(self, name: str, path: Path, modules: set[str]) -> None:
        self.name = name
        self.is_package = path.name == "__init__.py"
        self.modules = modules
        self.source_lines = path.read_text().splitlines()
        self.imports: set[str] = set()
        self.module_aliases: dict[str, str] = {}
        self.own_private: set[str] = set()
        self.candidate_reaches: list[tuple[int, str]] = []
        self.functions: list[tuple[int, str]] = []
        self._scope: list[str] = []

    # imports
    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith("sqlbus"):
                self._edge(alias.name)
                self.module_aliases[alias.asname or alias.name] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            target = _resolve(self.name, self.is_package, node.level, node.module)
        elif node.module and node.module.startswith("sqlbus"):
            target = node.module
        else:
            return
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in self.modules:
                self._edge(submodule)
                self.module_aliases[alias.asname or alias.name] = submodule
            else:
                self._edge(target)
                if _private(alias.name):
                    self.candidate_reaches.append((node.lineno, f"from {target} import {alias.name}"))

    def _edge(self, target: str) -> None:
        while target and target not in self.modules:
            target = target.rpartition(".")[0]
        if target and target != self.name:
            self.imports.add(target)

    # definitions and reaches
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if _private(node.name):
            self.own_private.add(node.name)
        self._scope.append(node.name)
        self.functions.append((node.end_lineno - node.lineno + 1, ".".join(self._scope)))  # type: ignore[operator]
        self.generic_visit(node)
        self._scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if _private(node.name):
            self.own_private.add(node.name)
        self._scope.append(node.name)
        self.generic_visit(node)
        self._scope.pop()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store) and _private(node.id):
            self.own_private.add(node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr):
            if isinstance(node.ctx, ast.Store) or _is_self(node.value):
                self.own_private.add(node.attr)
            else:
                self.candidate_reaches.append((node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
        self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> None:
        if _private(node.arg):
            self.own_private.add(node.arg)

    def reaches(self) -> list[dict[str, object]]:
        found = []
        for line, text in self.candidate_reaches:
            attr = text.rpartition(".")[2].rpartition(" ")[2]
            head = text.partition(".")[0]
            on_module = head in self.module_aliases
            if not text.startswith("from ") and not on_module and attr in self.own_private:
                continue
            allowed = "# reach:" in self.source_lines[line - 1]
            found.append({"module": self.name, "line": line, "reach": text, "allowed": allowed})
        return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def figures() -> dict[str, object]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    facts = {}
    for path in paths:
        name = module_name(path)
        visitor = ModuleFacts(name, path, modules)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        facts[name] = (path, visitor)
    graph = {name: v.imports for name, (_, v) in facts.items()}
    functions = sorted(
        ((length, f"{name}.{func}") for name, (_, v) in facts.items() for length, func in v.functions),
        reverse=True,
    )
    reaches = [r for _, v in facts.values() for r in v.reaches()]
    return {
        "sizes": {name: len(v.source_lines) for name, (_, v) in sorted(facts.items())},
        "imports": {name: sorted(targets) for name, targets in sorted(graph.items())},
        "cycles": cycles(graph),
        "reaches": reaches,
        "longest_functions": [{"lines": n, "function": f} for n, f in functions[:15]],
    }


def report(data: dict[str, object]) -> str:
    sizes: dict[str, int] = data["sizes"]  # type: ignore[assignment]
    reaches: list[dict[str, object]] = data["reaches"]  # type: ignore[assignment]
    out = ["Module sizes (lines):"]
    out += [f"  {n:>6}  {m}" for m, n in sorted(sizes.items(), key=lambda kv: -kv[1])]
    out.append(f"  {sum(sizes.values()):>6}  in all")
    out.append("\nImport cycles:")
    out += [f"  {' <-> '.join(c)}" for c in data["cycles"]] or ["  none"]  # type: ignore[attr-defined]
    unexplained = [r for r in reaches if not r["allowed"]]
    out.append(f"\nPrivate reaches: {len(unexplained)} unexplained, {len(reaches) - len(unexplained)} allowed (# reach:)")
    out += [f"  {r['module']}:{r['line']}  {r['reach']}{'  (allowed)' if r['allowed'] else ''}" for r in reaches]
    out.append("\nLongest functions (lines):")
    out += [f"  {f['lines']:>6}  {f['function']}" for f in data["longest_functions"]]  # type: ignore[attr-defined]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    data = figures()
    print(json.dumps(data, indent=2) if args.json else report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
