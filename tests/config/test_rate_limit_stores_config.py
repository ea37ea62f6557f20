"""`redis`, `rate_limits[].store` and `rate_limits[].on_store_error`
(docs/configuration.md "redis", "rate_limits")."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tests.config.test_loader import MINIMAL
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import RedisSpec, Table

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, extra: str) -> Table:
    (tmp_path / "proto" / "demo").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "proto" / "demo" / "im.proto", tmp_path / "proto" / "demo")
    path = tmp_path / "commands.yaml"
    path.write_text(MINIMAL + textwrap.dedent(extra))
    return load_table(path)


def problems(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(TableError) as caught:
        load(tmp_path, extra)
    return caught.value.problems


def test_the_defaults_keep_buckets_locally_and_allow_on_errors(tmp_path: Path) -> None:
    table = load(tmp_path, "rate_limits: [{name: r, key: remote_addr, rate: 1/s}]\n")
    [rule] = table.rate_limits
    assert (rule.store, rule.on_store_error) == ("local", "allow")
    assert table.redis is None


def test_a_redis_rule_and_its_redis(tmp_path: Path) -> None:
    table = load(
        tmp_path,
        """\
        redis: {url: "redis://:s3cret@10.1.2.3:6380/2"}
        rate_limits:
          - {name: shared, key: header.X-User-Id, rate: 5/s, store: redis, on_store_error: deny}
          - {name: mine, key: remote_addr, rate: 1/s, store: local}
        """,
    )
    shared, mine = table.rate_limits
    assert (shared.store, shared.on_store_error) == ("redis", "deny")
    assert (mine.store, mine.on_store_error) == ("local", "allow")
    assert table.redis == RedisSpec(url="redis://:s3cret@10.1.2.3:6380/2")
    assert "s3cret" not in repr(table.redis)  # tables are logged and shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "rediss://user:pw@redis.example.com:6380/1",
        "redis://[::1]:6379",
        "unix:///run/redis/redis.sock",
    ],
)
def test_accepted_urls(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f"redis: {{url: '{url}'}}\n").redis == RedisSpec(url=url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379", "unknown scheme 'http'"),
        ("//127.0.0.1:6379", "'//127.0.0.1:6379': no scheme"),
        ("redis://", "the host is missing"),
        ("redis://h:99999/0", "not a valid URL (Port out of range"),
        ("redis://h:port", "not a valid URL"),
        ("redis://h:0", "port 0 is not a port"),
        ("redis://h/zero", "the path must be a database number like /0"),
        ("redis://h/0?timeout=1", "a query or fragment is not accepted"),
        ("unix://host/sock", "expected unix:///ABSOLUTE/PATH"),
        ("", "expected a URL like redis://"),
    ],
)
def test_a_malformed_url_is_located(tmp_path: Path, url: str, message: str) -> None:
    [problem] = problems(tmp_path, f"redis: {{url: '{url}'}}\n")
    assert ":11:" in problem  # the line of `redis:`
    assert "redis.url: " in problem
    assert message in problem


def test_a_password_is_never_repeated_in_an_error(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, "redis: {url: 'redis://:hunter2@h/x'}\n")
    assert "hunter2" not in problem
    assert "redis://:***@h/x" in problem


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        (
            "redis: {url: 'redis://h', pool: 3}\n",
            "11:27",
            "redis.pool: unknown key (expected one of: url)",
        ),
        ("redis: {}\n", "11:8", "redis.url: required key is missing"),
        ("redis: redis://h\n", "11:8", "redis: expected a mapping"),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, store: foo}]\n",
            "11:61",
            "rate_limits[0].store: expected one of local, redis; got 'foo'",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, on_store_error: maybe}]\n",
            "11:70",
            "rate_limits[0].on_store_error: expected one of allow, deny; got 'maybe'",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, stor: redis}]\n",
            "11:54",
            "rate_limits[0].stor: unknown key",
        ),
        (
            "rate_limits: [{name: r, key: remote_addr, rate: 1/s, store: redis}]\n",
            "11:61",
            "rate_limits[0].store: store: redis needs the top-level `redis: {url: ...}` section",
        ),
    ],
)
def test_each_mistake_is_located(tmp_path: Path, extra: str, where: str, message: str) -> None:
    [problem] = problems(tmp_path, extra)
    assert f"commands.yaml:{where}: " in problem, problem
    assert message in problem
