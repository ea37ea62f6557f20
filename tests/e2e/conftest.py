"""End-to-end fixtures: the real mock upstream and the real gateway on 127.0.0.1.

`write_table` writes a copy of the tests' demo table (tests/fixtures/table.yaml)
with free ports, an absolute proto path and any overrides; the gateway loads it
like `tlvproxy serve` does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import yaml

from tests.fixtures import FIXTURE_TABLE
from tlvproxy.app import Gateway
from tlvproxy.config.loader import load_table
from tlvproxy.metrics import Metrics
from tlvproxy.mock_upstream import serve_mock_upstream

if TYPE_CHECKING:
    from tlvproxy.config.model import Table

ROOT = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load(FIXTURE_TABLE.read_text())


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` laid over `base`; nested mappings merge, a None value deletes."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_table(directory: Path, upstream: str | list[str], **overrides: Any) -> Path:
    """A demo table in `directory` pointing at `upstream` node(s); returns its path."""
    nodes = [upstream] if isinstance(upstream, str) else upstream
    document = merge(
        DEMO,
        {
            "listen": {"http": "127.0.0.1:0", "admin": "127.0.0.1:0"},
            "proto": {"paths": [str(ROOT / "proto")]},
            "upstreams": {"im": {"nodes": nodes}},
            "shutdown_timeout": "5s",
        },
    )
    document = merge(document, overrides)
    path = directory / "commands.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> str:
    """The demo IM service (the real mock upstream), as "host:port"."""
    demo = load_table(FIXTURE_TABLE)
    address: str = await nursery.start(serve_mock_upstream, "127.0.0.1", 0, demo)
    return address


@pytest.fixture(params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest) -> str:
    """Every end-to-end HTTP test runs with both parsers (issue 10)."""
    return str(request.param)


class GatewayFactory:
    def __init__(self, directory: Path, upstream: str, parser: str, nursery: trio.Nursery):
        self.directory = directory
        self.upstream = upstream
        self.parser = parser
        self.nursery = nursery

    def table(self, **overrides: Any) -> Table:
        return load_table(write_table(self.directory, self.upstream, **overrides))

    async def start(
        self, table: Table | None = None, *, runtime_dir: Path | None = None, **overrides: Any
    ) -> Gateway:
        """`runtime_dir`: as a worker of several has it (the `store: local`
        buckets in LMDB there); None: a gateway of one process."""
        table = table or self.table(**overrides)
        if runtime_dir is not None:
            await trio.Path(runtime_dir).mkdir(mode=0o700)  # the supervisor's, for its workers
        gateway = Gateway(
            table,  # type: ignore[arg-type]
            Metrics(),
            http_parser=self.parser,  # type: ignore[arg-type]
            runtime_dir=runtime_dir,
        )
        await self.nursery.start(gateway.run)
        return gateway


@pytest.fixture
async def gateways(tmp_path: Path, upstream: str, parser: str, nursery: trio.Nursery):
    """Starts gateways on the demo table (with overrides); they drain at teardown."""
    factory = GatewayFactory(tmp_path, upstream, parser, nursery)
    return factory


@pytest.fixture
async def gateway(gateways: GatewayFactory) -> Gateway:
    """A gateway on the demo table in front of the real mock upstream."""
    return await gateways.start()
