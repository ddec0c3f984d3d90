"""Security on one host: private files, no code-executing deserialisers, SQL with bound
parameters only, and agent ids / patterns that never become file paths."""

from __future__ import annotations

import ast
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

import sqlbus

PACKAGE = Path(sqlbus.__file__).resolve().parent
# Subpackages too (sqlbus/sqlite/...): a module moved into one must not leave the scans.
SOURCES = sorted(PACKAGE.rglob("*.py"))

# f-strings, `%`, `.format()` and `+` that build SQL may splice in only:
# 1. a *fixed fragment*: a module-level name bound once to a string built from literals and
#    other fixed fragments only, in the same module or in a sibling it is imported from
#    (found and checked by `_fixed_fragments`, e.g. admin._DEAD, schema.BODY,
#    schema.APPLICATION_ID), or
# 2. one of these expressions, each a value the library itself checked (never user data).
#    Key: (module's path in the package, the expression as ast.unparse prints it) -> why it
#    is safe.
ALLOWED_SQL_INTERPOLATIONS: dict[tuple[str, str], str] = {
    ("sqlite/connection.py", "synchronous"): "open_connection asserts it is NORMAL or FULL",
    ("sqlite/connection.py", "mode"): "checkpoint asserts it is one of four keywords",
    ("sqlite/connection.py", "int(max_errors)"): "an int",
}
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|CREATE|DROP|ALTER|WHERE|VALUES|VACUUM|ATTACH)\b"
)


def _sql_constant_parts(node: ast.AST) -> str:
    """The literal text of a string expression (f-string parts, concatenated constants)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_sql_constant_parts(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _sql_constant_parts(node.left) + _sql_constant_parts(node.right)
    return ""


def _interpolated(node: ast.AST) -> list[ast.AST]:
    """The non-literal expressions spliced into a string built by f-string, %, + or format."""
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        parts = []
        for side in (node.left, node.right):
            if isinstance(side, (ast.JoinedStr, ast.BinOp)):
                parts.extend(_interpolated(side))
            elif not (isinstance(side, ast.Constant) and isinstance(side.value, str)):
                parts.append(side)
        return parts
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        right = node.right
        return list(right.elts) if isinstance(right, ast.Tuple) else [right]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"):
        return [*node.args, *(k.value for k in node.keywords)]
    return []


def _fixed_fragments(tree: ast.Module, imported: set[str] | None = None) -> set[str]:
    """Module-level names bound exactly once to an int or a string made of literals and other
    fixed fragments (so no user data can be in them); ``imported``: names imported from a
    sibling module where they are fixed fragments."""
    values: dict[str, list[ast.AST]] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        for target in targets:
            if isinstance(target, ast.Name):
                values.setdefault(target.id, []).append(node.value)  # type: ignore[arg-type]
    fixed: set[str] = set(imported or ())
    changed = True
    while changed:
        changed = False
        for name, assigned in values.items():
            if name in fixed or len(assigned) != 1:
                continue
            value = assigned[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, (str, int)):
                ok = True
            elif isinstance(value, (ast.JoinedStr, ast.BinOp)):
                ok = all(isinstance(e, ast.Name) and e.id in fixed for e in _interpolated(value))
            else:
                ok = False
            if ok:
                fixed.add(name)
                changed = True
    return fixed


def _package_fixed_fragments() -> dict[Path, tuple[ast.Module, set[str]]]:
    """Each module's tree and fixed fragments, counting those imported from a sibling module
    (``from .schema import BODY``) where they are fixed."""
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in SOURCES}
    fixed = {path: _fixed_fragments(tree) for path, tree in trees.items()}
    changed = True
    while changed:
        changed = False
        for path, tree in trees.items():
            imported = {
                alias.asname or alias.name
                for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
                for alias in node.names
                if alias.name in fixed.get(path.parent / f"{node.module}.py", set())
            }
            found = _fixed_fragments(tree, imported)
            if found != fixed[path]:
                fixed[path], changed = found, True
    return {path: (trees[path], fixed[path]) for path in SOURCES}


def _built_sql_strings() -> list[tuple[str, int, ast.AST, set[str]]]:
    """Every string *built* (not literal) in the package whose literal text looks like SQL."""
    found = []
    for path, (tree, fixed) in _package_fixed_fragments().items():
        for node in ast.walk(tree):
            built = isinstance(node, ast.JoinedStr) or (
                isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod))
            ) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "format")
            if not built:
                continue
            literal = _sql_constant_parts(node.func.value if isinstance(node, ast.Call) else node)
            if SQL_WORDS.search(literal) and literal.upper() != literal.lower() and (
                re.search(r"\b(FROM|SET|INTO|WHERE|PRAGMA|VALUES)\b", literal)
            ):
                found.append((path.relative_to(PACKAGE).as_posix(), node.lineno, node, fixed))
    return found


def test_sql_is_built_only_from_fixed_fragments_and_values_are_bound() -> None:
    built = _built_sql_strings()
    assert built, "the scan found no built SQL at all: the scanner is broken"
    offenders = []
    for module, line, node, fixed in built:
        for expr in _interpolated(node):
            text = ast.unparse(expr)
            if isinstance(expr, ast.Name) and expr.id in fixed:
                continue
            if (module, text) not in ALLOWED_SQL_INTERPOLATIONS:
                offenders.append(f"{module}:{line}: {text!r} spliced into SQL")
    assert not offenders, (
        "SQL built with expressions that are not in the allow-list (bind them as ? "
        "parameters, or add a fixed internal fragment to ALLOWED_SQL_INTERPOLATIONS with the "
        "reason it is safe):\n" + "\n".join(offenders)
    )


def test_the_sql_scanner_catches_user_data_spliced_into_a_query() -> None:
    # The scanner itself must be able to fail: a query built from an agent id is caught.
    node = ast.parse('conn.execute(f"SELECT * FROM message WHERE agent = \'{agent}\'")')
    call = node.body[0].value  # type: ignore[attr-defined]
    assert [ast.unparse(e) for e in _interpolated(call.args[0])] == ["agent"]
    assert ("sqlite/queue.py", "agent") not in ALLOWED_SQL_INTERPOLATIONS
    # and a module-level name that is not made of literals only is not a fixed fragment
    module = ast.parse('A = "x"\nB = f"{A} WHERE y"\nC = f"{A} {user}"\nD = "1"\nD = "2"')
    assert _fixed_fragments(module) == {"A", "B"}


def test_the_package_never_unpickles_evaluates_or_runs_strings_as_code() -> None:
    banned_modules = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "yaml"}
    banned_calls = {"eval", "exec", "compile", "__import__"}
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            if names & banned_modules:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: imports {names & banned_modules}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else (
                    func.attr if isinstance(func, ast.Attribute) else None)
                if name in banned_calls and not (
                    isinstance(func, ast.Attribute) and name == "compile"
                    and isinstance(func.value, ast.Name) and func.value.id == "re"
                ):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: calls {name}()")
                if any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value
                       for k in node.keywords):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: shell=True")
    assert not offenders, "\n".join(offenders)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.slow
def test_the_database_wal_shm_and_doorbells_are_private_to_the_owner(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # a common, permissive umask: the library must not rely on it
    try:
        db = tmp_path / "bus.db"
        bus = sqlbus.connect(db)
        try:
            alice, bob = bus.agent("alice"), bus.agent("bob")
            alice.publish("bob", "notification", {"n": 1})
            waiter = threading.Thread(target=lambda: bob.receive(wait=1.5, types=["heartbeat"]))
            waiter.start()
            time.sleep(0.3)  # bob now waits: a doorbell, if this version has them, exists
            created = [p for p in tmp_path.rglob("*")]
            assert {p.name for p in created} >= {"bus.db", "bus.db-wal", "bus.db-shm"}
            for path in created:
                if path.is_dir():
                    assert _mode(path) == 0o700, f"{path} is {oct(_mode(path))}"
                else:
                    assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
            doorbells = [p for p in created if stat.S_ISSOCK(os.stat(p).st_mode)]
            assert doorbells, "bob waits, but no doorbell socket was found"
            waiter.join()
        finally:
            bus.close()
    finally:
        os.umask(old_umask)


HOSTILE_IDS = [
    "../../escaped",
    "/tmp/absolute-escape",
    "..",
    ".",
    "a/../../b",
    "back\\slash",
    "nul\u2028line",  # printable? no: rejected by validation, which is fine too
    "con",
    "x" * 200,
    "dots...",
    "~root",
    "$HOME",
]


def test_agent_ids_and_patterns_never_become_file_paths(tmp_path: Path) -> None:
    home = tmp_path / "a" / "b"
    home.mkdir(parents=True)
    db = home / "bus.db"
    before = set(tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(home)  # a relative path built from an id would land here or above
    try:
        with sqlbus.connect(db) as bus:
            sender = bus.agent("sender")
            accepted = []
            for agent_id in HOSTILE_IDS:
                try:
                    agent = bus.agent(agent_id)
                except sqlbus.ValidationError:
                    continue
                accepted.append(agent)
                sender.publish(agent_id, "notification", {"to": agent_id})
                got = agent.receive(wait=0.05)
                assert [d.message.payload["to"] for d in got] == [agent_id]
                got[0].ack()
                agent.state.set("k/../../x", {"by": agent_id}, notify=False)
            assert len(accepted) >= 8
            for pattern in ["../*", "/*", "..", "*/../*", "[./]*"]:
                sender.broadcast("notification", {"p": pattern}, pattern=pattern)
            for agent in accepted:  # waiting makes doorbells, if any
                agent.receive(wait=0.02, types=["heartbeat"])
    finally:
        os.chdir(cwd)
    after = set(tmp_path.rglob("*"))
    new = sorted(str(p.relative_to(tmp_path)) for p in after - before)
    allowed = re.compile(r"^a/b/bus\.db(-wal|-shm|\.doorbells(/[0-9]+-[A-Za-z0-9_-]+\.sock|/generation)?)?$")
    assert all(allowed.match(name) for name in new), new
    for name in new:
        for agent_id in HOSTILE_IDS:
            assert agent_id not in name.split("/")[-1] or agent_id in ("."), (name, agent_id)
