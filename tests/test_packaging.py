"""The wheel holds every package of the library: a subpackage missing from pyproject's list
works in the editable install the tests use and is absent from a real ``pip install``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_library_is_listed_for_the_wheel():
    line = re.search(r"^packages = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line, "pyproject.toml lists its packages on one line"
    listed = set(ast.literal_eval(line.group(1)))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sqlbus").rglob("__init__.py")
    }
    assert found == listed
