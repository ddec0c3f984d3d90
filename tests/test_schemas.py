"""schemas/*.schema.json are generated from the structs by tools/gen_schemas.py and kept current."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import msgspec
import pytest

import sqlbus

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "gen_schemas.py"
EXPECTED_FILES = {
    "message.schema.json",
    "task_assignment.schema.json",
    "task_result.schema.json",
    "status_update.schema.json",
}


def load_tool():
    spec = importlib.util.spec_from_file_location("gen_schemas", TOOL)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_schema_file_in_the_checkout_is_up_to_date():
    stale = load_tool().stale_files(ROOT / "schemas")
    assert stale == [], f"regenerate with: python tools/gen_schemas.py (stale: {stale})"


def test_the_tool_writes_the_four_draft_07_schema_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--dir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES
    for path in tmp_path.iterdir():
        schema = json.loads(path.read_text())
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.slow
def test_check_exits_non_zero_and_names_the_file_when_a_schema_is_stale(tmp_path):
    subprocess.run([sys.executable, str(TOOL), "--dir", str(tmp_path)], check=True,
                   capture_output=True)
    ok = subprocess.run([sys.executable, str(TOOL), "--check", "--dir", str(tmp_path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    path = tmp_path / "task_result.schema.json"
    schema = json.loads(path.read_text())
    del schema["properties"]["artifacts"]
    path.write_text(json.dumps(schema, indent=2) + "\n")
    before = path.read_bytes()
    stale = subprocess.run([sys.executable, str(TOOL), "--check", "--dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert stale.returncode != 0
    assert "task_result.schema.json" in stale.stderr
    assert path.read_bytes() == before, "--check must not rewrite anything"


def test_check_fails_when_a_schema_file_is_missing(tmp_path):
    subprocess.run([sys.executable, str(TOOL), "--dir", str(tmp_path)], check=True,
                   capture_output=True)
    (tmp_path / "status_update.schema.json").unlink()
    assert load_tool().stale_files(tmp_path) == ["status_update.schema.json"]


def test_the_message_schema_names_the_json_key_from_and_lists_all_thirteen_types():
    schema = json.loads((ROOT / "schemas" / "message.schema.json").read_text())
    assert "from" in schema["properties"] and "sender" not in schema["properties"]
    assert set(schema["required"]) >= {"id", "from", "to", "type", "timestamp", "payload"}
    assert set(schema["properties"]["type"]["enum"]) == set(sqlbus.MESSAGE_TYPES)
    assert len(sqlbus.MESSAGE_TYPES) == 13


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        (
            "task_assignment",
            {"task": {"id": "t1", "type": "build", "priority": 5,
                      "resources": {"timeout": 60}}},
            {"task": {"id": "t1", "type": "build", "priority": 9}},
        ),
        (
            "task_result",
            {"task_id": "t1", "status": "failed", "error": {"code": "E1", "message": "boom"},
             "metrics": {"execution_time": 12, "cpu_used": 0.5}, "artifacts": ["/tmp/a"]},
            {"task_id": "t1", "status": "exploded"},
        ),
        (
            "status_update",
            {"agent_status": "busy", "progress": {"percentage": 40},
             "health": {"cpu_usage": 0.3}},
            {"agent_status": "busy", "progress": {"percentage": 140}},
        ),
    ],
)
def test_payload_schemas_agree_with_the_structs_on_good_and_bad_payloads(name, good, bad):
    schema = json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())
    struct = {"task_assignment": sqlbus.TaskAssignment, "task_result": sqlbus.TaskResult,
              "status_update": sqlbus.StatusUpdate}[name]
    jsonschema.validate(good, schema, cls=jsonschema.Draft7Validator)
    msgspec.convert(good, struct)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, struct)
