"""The pure modules never import trio (STYLE 2): checked in a fresh interpreter, where
no other test can have imported trio first."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

# These exist from the first commit on and must always be checked.
CORE = (
    "tlvproxy.framing",
    "tlvproxy.units",
    "tlvproxy.errors",
    "tlvproxy.config.model",
    "tlvproxy.config.keys",
)
# Pure modules that later issues add; each is checked once it exists.
LATER = (
    "tlvproxy.routing",
    "tlvproxy.config.loader",
    "tlvproxy.schema.protos",
    "tlvproxy.schema.codec",
    "tlvproxy.policy.ratelimit",
    "tlvproxy.policy.waf",
    "tlvproxy.stores.names",
    "tlvproxy.stores.local_store",
    "tlvproxy.stores.waiters",
    "tlvproxy.upstream.balance",
    "tlvproxy.upstream.health",
    "tlvproxy.openapi",
    "tlvproxy.auth.identity",
    "tlvproxy.config.jwks",
    "tlvproxy.auth.tokens",
    "tlvproxy.auth.api_keys",
    "tlvproxy.auth.signatures",
    "tlvproxy.auth.authenticators",
    "tlvproxy.config.auth",
    "tlvproxy.demo_keys",
    "tlvproxy.config.stored",
    "tlvproxy.config.source",
    "tlvproxy.etcd.wire",
    "tlvproxy.config.traffic",
    "tlvproxy.policy.split",
    "tlvproxy.policy.last_good",
    "tlvproxy.schema.compare",
    "tlvproxy.config.push_sessions",
    "tlvproxy.server.push_wire",
    "tlvproxy.config.listing",
    "tlvproxy.config.rate_limits",
    "tlvproxy.config.readiness",
    "tlvproxy.config.websocket",
    "tlvproxy.config.proto",
    "tlvproxy.config.commands",
    "tlvproxy.config.messages",
)


def present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package that does not exist yet
        return False


PURE = CORE + tuple(name for name in LATER if present(name))

PROBE = """
import importlib, sys
name = sys.argv[1]
importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "trio" or m.startswith("trio."))
print("trio" if leaked else "clean")
"""


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_not_import_trio(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean", f"{module} imports trio"


def test_the_probe_sees_trio_when_it_is_imported() -> None:
    # Guards the test above against passing vacuously.
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "trio.lowlevel"], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "trio"
