"""A key set fetched from a URL (docs/security.md "JWT"), from a real HTTP server."""

from __future__ import annotations

import trio

from tests.auth.keys import jwks, rsa_jwk
from tests.ops.auth_helpers import KeyServer
from tests.ops.procs import free_port
from tlvproxy.auth.remote_keys import KID_REFETCH, RemoteKeys


async def wait_until(predicate, seconds: float = 5.0) -> None:
    # Polled: the key server is a thread, with nothing to wake a trio Event.
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


async def test_a_set_that_failed_first_is_fetched_again_when_a_token_comes() -> None:
    # Found by the docs review: without a set, the next try came `refresh` later.
    server = KeyServer()
    try:
        keys = RemoteKeys(server.url("/late.json"), ("RS256",), refresh=600)
        async with trio.open_nursery() as nursery:
            await nursery.start(keys.run)  # the first fetch: 404
            assert keys.current is None
            server.documents["/late.json"] = jwks(rsa_jwk())
            keys.unknown_kid()  # what a token does while there is no set
            await wait_until(lambda: keys.current is not None)
            assert "r1" in keys.current
            nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_without_a_set_failed_fetches_are_retried_every_30_s(autojump_clock) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nobody listens
    keys = RemoteKeys(url, ("RS256",), refresh=3600)
    fetches = []
    fetch = keys._fetch

    async def counted(client) -> None:
        fetches.append(trio.current_time())
        await fetch(client)

    keys._fetch = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(keys.run)
        await trio.sleep(3 * KID_REFETCH + 1)
        nursery.cancel_scope.cancel()
    assert len(fetches) == 4
    assert fetches[-1] - fetches[0] >= 3 * KID_REFETCH
