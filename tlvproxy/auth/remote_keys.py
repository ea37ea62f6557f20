"""A key set fetched from a URL, kept fresh off the hot path (docs/security.md "JWT").

Owns: the fetch loop of one JWKS URL: fetched when the gateway starts (or a
reload first names it), then every `refresh` (every `KID_REFETCH` seconds at
most while no fetch has succeeded yet), and sooner when a token names a `kid`
the set lacks, or comes while there is no set, at most once per `KID_REFETCH`
seconds. A fetch that
fails (unreachable, an HTTP error, a body over `MAX_BODY`, a set that does
not parse) keeps the last good set and is logged.
Must not: verify tokens; `tokens.py` reads `current`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

import httpx
import trio

from tlvproxy.config.jwks import parse_key_set

if TYPE_CHECKING:
    from tlvproxy.config.jwks import KeySet

KID_REFETCH: Final = 30.0
FETCH_TIMEOUT: Final = 5.0
MAX_BODY: Final = 1024 * 1024

log = logging.getLogger("tlvproxy.auth")


class RemoteKeys:
    """The key set at `url`; `run()` keeps it fresh (a `tokens.KeySource`)."""

    def __init__(self, url: str, algorithms: tuple[str, ...], refresh: float) -> None:
        self.url = url
        self._algorithms = algorithms
        self._refresh = refresh
        self.current: KeySet | None = None
        self._wake = trio.Event()
        self._kid_fetch_at = -math.inf

    def unknown_kid(self) -> None:
        """Fetch again now, unless a token's unknown `kid` did so in the last 30 s."""
        now = trio.current_time()
        if now - self._kid_fetch_at >= KID_REFETCH:
            self._kid_fetch_at = now
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch now (started once this first fetch is over, whatever its result),
        then on every `refresh` and every wake-up, until cancelled."""
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client:
            await self._fetch(client)
            task_status.started()
            while True:
                # Without any set yet, a failed fetch is tried again sooner.
                wait = (
                    self._refresh if self.current is not None else min(self._refresh, KID_REFETCH)
                )
                with trio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self._fetch(client)

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        try:
            body = await _get(client, self.url)
            key_set = parse_key_set(body, self._algorithms)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning(
                "fetching a JWT key set failed; the last good set stays",
                extra={"url": self.url, "error": str(exc), "keys": len(self.current or ())},
            )
            return
        self.current = key_set
        log.info("JWT key set fetched", extra={"url": self.url, "keys": len(key_set)})


async def _get(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.status_code != 200:
            raise ValueError(f"the key set URL answered HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_BODY:
                raise ValueError(f"the key set is larger than {MAX_BODY} bytes")
        return bytes(body)
