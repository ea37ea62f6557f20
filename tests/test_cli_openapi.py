"""`tlvproxy openapi` (SPEC 2): the OpenAPI document on stdout, or the table's errors."""

from __future__ import annotations

import json
import shutil

from openapi_spec_validator import validate

from tests.cli import REPO, run_cli
from tests.fixtures import FIXTURE_TABLE


def openapi(*args, cwd=REPO):
    return run_cli("openapi", *args, cwd=cwd)


def test_prints_a_valid_document_of_the_demo_table():
    result = openapi("-c", str(FIXTURE_TABLE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    validate(document)
    operation = document["paths"]["/v1/messages"]["post"]
    assert operation["operationId"] == "send_message"


def test_reads_commands_yaml_in_the_current_directory_by_default(tmp_path):
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    text = FIXTURE_TABLE.read_text().replace("paths: [../../proto]", "paths: [proto]")
    (tmp_path / "commands.yaml").write_text(text)
    result = openapi(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "/v1/users/{user_id}/profile" in json.loads(result.stdout)["paths"]


def test_a_bad_table_exits_1_with_every_error_located(tmp_path):
    table = tmp_path / "bad.yaml"
    table.write_text("workers: zero\nbogus: 1\n")
    result = openapi("-c", str(table))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{table}:1:") and "workers" in line for line in lines), lines
    assert any("bogus" in line for line in lines), lines
    assert lines[-1] == f"2 error(s) in {table}"


def test_a_missing_table_exits_1(tmp_path):
    result = openapi("-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "cannot read the table" in result.stderr
