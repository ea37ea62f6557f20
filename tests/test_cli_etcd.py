"""The etcd options of the command line (docs/reference.md "Command line"):
bad endpoints and prefixes are usage errors, and `publish` writes nothing when
the table is broken or etcd cannot be reached."""

from __future__ import annotations

from tests.cli import REPO, run_cli
from tests.ops.procs import free_port


def test_an_endpoint_must_be_a_url_of_a_host_and_a_port() -> None:
    for endpoint in ("127.0.0.1:2379", "ftp://h:1", "http://h:1/v3", "http://user@h:1", "http://h"):
        result = run_cli("publish", "--etcd", endpoint, cwd=REPO)
        assert result.returncode == 2, endpoint
        assert "expected an etcd endpoint like http://127.0.0.1:2379" in result.stderr


def test_a_prefix_is_slash_separated_names() -> None:
    for prefix in ("tlvproxy", "/a//b", "/a/../b", "/a b", "/"):
        result = run_cli("serve", "--etcd", "http://127.0.0.1:1", "--etcd-prefix", prefix, cwd=REPO)
        assert result.returncode == 2, prefix
        assert "expected a key prefix like /tlvproxy" in result.stderr


def test_register_needs_a_prefix() -> None:
    result = run_cli("mock-upstream", "--register", "http://127.0.0.1:1", cwd=REPO)
    assert result.returncode == 2
    assert "--register and --prefix go together" in result.stderr


def test_a_broken_table_is_not_published(tmp_path) -> None:
    table = tmp_path / "commands.yaml"
    table.write_text("commands: [\n")
    result = run_cli("publish", "-c", str(table), "--etcd", "http://127.0.0.1:1", cwd=REPO)
    assert result.returncode == 1
    assert "invalid YAML" in result.stderr
    assert "1 error(s)" in result.stderr


def test_publish_to_an_etcd_out_of_reach_says_so(tmp_path) -> None:
    table = tmp_path / "commands.yaml"
    table.write_text("upstreams: {im: {nodes: [127.0.0.1:7001]}}\n")
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_cli("publish", "-c", str(table), "--etcd", endpoint, cwd=REPO)
    assert result.returncode == 1
    assert f"tlvproxy publish: etcd at {endpoint} cannot be reached" in result.stderr
    assert result.stderr.rstrip().endswith("nothing written")
