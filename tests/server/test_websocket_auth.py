"""WebSocket sessions with credentials (docs/security.md "WebSocket"): in one
process, on trio's clock, against the real mock upstream."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.auth.keys import jwks, rsa_jwk, sha256_hex, token
from tests.server.test_websocket import PROTO_ROOT, TABLE, Client, open_gateway, upstream
from tlvproxy.config.loader import load_table

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.model import Table

__all__ = ["upstream"]  # the mock upstream fixture, shared with test_websocket

AUTH = """\
  auth: users
auth:
  - name: users
    type: jwt
    keys: {keys}
    token_from: [query.access_token]
  - name: partners
    type: api_key
    keys:
      acme: {{sha256: "{digest}"}}
"""


def table(tmp_path: Path, nodes: list[str], *, echo_auth: str = "none") -> Table:
    """The session tests' table, the session authenticated by `users` with its
    uid from the token, and the echo command's `auth` set to `echo_auth`."""
    keys = tmp_path / "jwks.json"
    keys.write_text(jwks(rsa_jwk()))
    text = TABLE.format(
        proto=PROTO_ROOT,
        nodes=", ".join(nodes),
        mode="json",
        max_message="64 KiB",
        idle_timeout="120s",
        timeout="3s",
        extra=AUTH.format(keys=keys, digest=sha256_hex("acme-key")),
        upstreams="",
        commands="",
    )
    text = text.replace("  uid: query.uid\n", "  uid: auth.sub\n")
    text = text.replace("    codec: json\n", f"    codec: json\n    auth: {echo_auth}\n")
    path = tmp_path / "commands.yaml"
    path.write_text(text)
    return load_table(path)


async def test_the_session_closes_1008_when_its_token_expires(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope], autojump_clock: Any
) -> None:
    expiry = int(time.time()) + 60
    async with open_gateway(table(tmp_path, [upstream[0]])) as gateway:
        started = trio.current_time()
        client = await Client.connect(
            gateway.port, f"/ws?did=a&access_token={token({'sub': '7', 'exp': expiry})}"
        )
        assert (await client.call("echo", 1, {"x": 1}))["status"] == 0
        closed = await client.expect_close()
    assert closed.code == 1008
    assert "credentials expired" in closed.reason
    # On trio's (jumping) clock, at the token's expiry, not at the idle timeout.
    assert trio.current_time() - started == pytest.approx(expiry - time.time(), abs=2)


async def test_a_command_of_another_authenticator_is_refused_per_message(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(table(tmp_path, [upstream[0]], echo_auth="partners")) as gateway:
        client = await Client.connect(gateway.port, f"/ws?did=a&uid=2&access_token={token()}")
        answer = await client.call("echo", 5, {"x": 1})
        assert answer["seq"] == 5
        assert answer["error"]["code"] == "forbidden"
        assert "partners" in answer["error"]["message"]
        # The session stays open for what it may send.
        profile = await client.call("get_profile", 6, {"user_id": 1})
        assert profile["status"] == 0
        await client.close()


async def test_a_handshake_without_a_valid_token_is_refused_401(
    tmp_path: Path, upstream: tuple[str, trio.CancelScope]
) -> None:
    async with open_gateway(table(tmp_path, [upstream[0]])) as gateway:
        for target in ("/ws?did=a&uid=2", "/ws?did=a&access_token=nope"):
            with pytest.raises(AssertionError, match="handshake rejected") as refused:
                await Client.connect(gateway.port, target)
            assert "status_code=401" in str(refused.value)
        failures = gateway.metrics.registry.get_sample_value(
            "tlvproxy_auth_failures_total", {"authenticator": "users", "reason": "missing"}
        )
        assert failures == 1
