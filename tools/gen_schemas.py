"""Write schemas/*.schema.json (JSON Schema draft-07) from the msgspec structs of sqlbus.messages.

    python tools/gen_schemas.py            # (re)write the files
    python tools/gen_schemas.py --check    # exit 1 and name the stale files, write nothing

The structs are the source of truth; these files are generated for other languages and tools,
and tests/test_schemas.py fails when one is out of date.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlbus.messages import Message, StatusUpdate, TaskAssignment, TaskResult  # noqa: E402

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
SCHEMA_DIR = ROOT / "schemas"

# file name (without .schema.json) -> the struct it describes
STRUCTS: dict[str, type[msgspec.Struct]] = {
    "message": Message,
    "task_assignment": TaskAssignment,
    "task_result": TaskResult,
    "status_update": StatusUpdate,
}


def schema_for(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The draft-07 schema of one struct: the struct itself at the top, nested structs under
    ``definitions`` (draft-07's place for them; draft-07 ignores keywords beside a top-level
    ``$ref``, so the root is inlined rather than referenced)."""
    (_root,), components = msgspec.json.schema_components(
        [struct], ref_template="#/definitions/{name}"
    )
    top = components.pop(struct.__name__)
    schema: dict[str, Any] = {"$schema": DRAFT_07}
    schema.update(top)
    if components:
        schema["definitions"] = dict(sorted(components.items()))
    return _clean_descriptions(schema)


def _clean_descriptions(node: Any) -> Any:
    """Dedent every ``description`` the way ``inspect.cleandoc`` does. msgspec 0.23 started
    dedenting docstrings itself and older releases copy them verbatim; cleaning here keeps the
    files the same whichever release is installed."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


def render() -> dict[str, str]:
    """File name -> the exact text that file should hold."""
    return {
        f"{stem}.schema.json": json.dumps(schema_for(struct), indent=2, ensure_ascii=False) + "\n"
        for stem, struct in STRUCTS.items()
    }


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of the schema files that are missing or differ from what the structs produce."""
    stale = []
    for name, text in render().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a file is stale, without writing"
    )
    parser.add_argument(
        "--dir", type=Path, default=SCHEMA_DIR, help="output directory (default: schemas/)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        if stale:
            print(
                f"stale schema files in {args.dir}: {', '.join(stale)}; "
                "run: python tools/gen_schemas.py",
                file=sys.stderr,
            )
            return 1
        print(f"{len(STRUCTS)} schema files in {args.dir} are up to date")
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (args.dir / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
