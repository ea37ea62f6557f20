"""`limits.max_connections` and `limits.max_connections_per_ip` (docs/configuration.md "limits")."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import Limits

REPO = Path(__file__).resolve().parents[2]

TABLE = """\
proto: {paths: [proto], files: [demo/im.proto]}
upstreams:
  im: {nodes: [127.0.0.1:7001]}
commands:
  - name: get_profile
    command: 0x1002
    upstream: im
    request: demo.im.GetProfileRequest
    response: demo.im.Profile
    http: {method: GET, path: "/v1/users/{user_id}/profile"}
"""


def load(tmp_path: Path, extra: str = "") -> Limits:
    (tmp_path / "proto" / "demo").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "proto" / "demo" / "im.proto", tmp_path / "proto" / "demo")
    path = tmp_path / "commands.yaml"
    path.write_text(TABLE + textwrap.dedent(extra))
    return load_table(path).limits


def test_the_defaults(tmp_path: Path) -> None:
    limits = load(tmp_path)
    assert (limits.max_connections, limits.max_connections_per_ip) == (10000, 256)


def test_both_are_read(tmp_path: Path) -> None:
    limits = load(tmp_path, "limits: {max_connections: 500, max_connections_per_ip: 20}\n")
    assert (limits.max_connections, limits.max_connections_per_ip) == (500, 20)
    assert limits.max_header_bytes == Limits().max_header_bytes


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "true"])
def test_each_must_be_a_whole_number_of_at_least_one(tmp_path: Path, value: str) -> None:
    with pytest.raises(TableError) as caught:
        load(tmp_path, f"limits: {{max_connections: {value}, max_connections_per_ip: {value}}}\n")
    problems = "\n".join(caught.value.problems)
    assert "limits.max_connections:" in problems
    assert "limits.max_connections_per_ip:" in problems
