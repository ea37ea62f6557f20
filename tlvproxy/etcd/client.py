"""A small etcd v3 client over the JSON gateway, on httpx (docs/operations.md
"Running a fleet").

Owns: the HTTP requests to one or more etcd endpoints (`/v3/kv/range`,
`/v3/kv/txn`, `/v3/kv/put`, `/v3/watch` read as a stream of JSON lines,
`/v3/lease/grant|keepalive|revoke`), the bounds on what is read back, and the
translation of every transport failure into `EtcdUnavailable`, once, here.
Must not: set deadlines (the caller's cancel scope owns the time: a watch waits
for ever), retry (the watcher decides), or trust what it reads (`wire.py`
parses it strictly).

With several endpoints, a request that cannot reach one moves on to the next
for the following requests: one dead member never blocks the others. A
request that the caller's deadline cancelled is this client's to know of only
when the caller says so (`failed`): every caller that times a request out
calls it, so a member that takes connections and never answers (stopped,
black-holed) is left too.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import httpx
import orjson

from tlvproxy.etcd import wire
from tlvproxy.etcd.wire import EtcdRefused, MalformedAnswer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from tlvproxy.etcd.wire import RangeAnswer, WatchAnswer

# The largest answer read (a range of a whole prefix, base64 inflating its
# values by 4/3) and the longest watch line (one transaction's events).
MAX_ANSWER: Final = 32 * 1024 * 1024
MAX_WATCH_LINE: Final = 32 * 1024 * 1024
# gRPC codes that mean "not now" rather than "no": UNAVAILABLE, DEADLINE_EXCEEDED.
_TRANSIENT_CODES: Final = frozenset({14, 4})


class EtcdUnavailable(Exception):
    """No answer from etcd: unreachable, reset, not the v3 gateway, or overloaded.
    `str()` names the endpoint and the reason."""


class EtcdClient:
    """Requests to etcd. Build it with `open_etcd`."""

    def __init__(self, http: httpx.AsyncClient, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._http = http
        self.endpoints = tuple(endpoints)
        self._current = 0

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to."""
        return self.endpoints[self._current]

    def failed(self, endpoint: str) -> None:
        """`endpoint` did not answer in time: the next request goes to the
        next endpoint (unless an earlier failure moved it on already)."""
        self._next_endpoint(endpoint)

    # ------------------------------------------------------------ kv

    async def range_prefix(
        self, prefix: bytes, *, revision: int = 0, limit: int = 0, keys_only: bool = False
    ) -> RangeAnswer:
        """Every key under `prefix` (at `revision`; 0: the latest), at most `limit`.

        Raises EtcdUnavailable, EtcdRefused (code 11 when `revision` is
        compacted), MalformedAnswer."""
        request = wire.range_request(prefix, revision=revision, limit=limit, keys_only=keys_only)
        return wire.parse_range(await self._call("/v3/kv/range", request))

    async def txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]]
    ) -> tuple[bool, int]:
        """Run one transaction; (whether the compares held, the store revision)."""
        answer = await self._call("/v3/kv/txn", {"compare": compare, "success": success})
        return wire.parse_txn(answer)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write one key; the revision it was written at."""
        request = wire.put_op(key, value, lease)["request_put"]
        return wire.revision_of(await self._call("/v3/kv/put", request))

    # ------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        lease, _ = wire.parse_lease(await self._call("/v3/lease/grant", {"TTL": ttl}))
        return lease

    async def keepalive(self, lease: int) -> int:
        """Renew `lease` once; the seconds it now has (0: it has expired)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return wire.parse_lease(answer)[1]

    async def revoke(self, lease: int) -> None:
        """Revoke `lease`: every key put with it is deleted."""
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # ------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchAnswer]]:
        """The watch answers of `prefix` from `start_revision` on, as etcd sends them.

        The iterator ends when etcd closes the stream. Raises EtcdUnavailable,
        EtcdRefused, MalformedAnswer (from the iterator too)."""
        endpoint = self.endpoint
        body = orjson.dumps(wire.watch_request(prefix, start_revision))
        try:
            async with self._http.stream("POST", endpoint + "/v3/watch", content=body) as response:
                if response.status_code != 200:
                    await self._refusal(endpoint, response)
                yield self._lines(endpoint, response)
        except httpx.HTTPError as exc:
            raise self._unavailable(endpoint, exc) from None

    async def _lines(self, endpoint: str, response: httpx.Response) -> AsyncIterator[WatchAnswer]:
        buffer = bytearray()
        try:
            async for chunk in response.aiter_raw():
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if line.strip():
                        yield wire.parse_watch_line(line)
                if len(buffer) > MAX_WATCH_LINE:
                    raise MalformedAnswer(f"a watch line is longer than {MAX_WATCH_LINE} bytes")
        except httpx.HTTPError as exc:
            raise self._unavailable(endpoint, exc) from None
        if buffer.strip():
            yield wire.parse_watch_line(bytes(buffer))

    # ------------------------------------------------------------ plumbing

    async def _call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        endpoint = self.endpoint
        try:
            async with self._http.stream(
                "POST", endpoint + path, content=orjson.dumps(request)
            ) as response:
                if response.status_code != 200:
                    await self._refusal(endpoint, response)
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise MalformedAnswer(f"an answer is larger than {MAX_ANSWER} bytes")
        except httpx.HTTPError as exc:
            raise self._unavailable(endpoint, exc) from None
        return wire.parse_json(bytes(body))

    async def _refusal(self, endpoint: str, response: httpx.Response) -> None:
        """Raise what a non-200 answer means: EtcdRefused with etcd's own error,
        or EtcdUnavailable when it is not etcd's or says "try later"."""
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > 65536:
                break
        try:
            wire.parse_json(bytes(body))
        except EtcdRefused as exc:
            if exc.code in _TRANSIENT_CODES:
                self._next_endpoint(endpoint)
                raise EtcdUnavailable(f"etcd at {endpoint}: {exc}") from None
            raise
        except MalformedAnswer:
            pass
        self._next_endpoint(endpoint)
        raise EtcdUnavailable(f"etcd at {endpoint}: HTTP {response.status_code}")

    def _unavailable(self, endpoint: str, exc: httpx.HTTPError) -> EtcdUnavailable:
        self._next_endpoint(endpoint)
        reason = str(exc) or type(exc).__name__
        return EtcdUnavailable(f"etcd at {endpoint} cannot be reached: {reason}")

    def _next_endpoint(self, failed: str) -> None:
        if self.endpoint == failed:
            self._current = (self._current + 1) % len(self.endpoints)


@asynccontextmanager
async def open_etcd(endpoints: Sequence[str]) -> AsyncIterator[EtcdClient]:
    """A client of the etcd cluster at `endpoints` (`http(s)://HOST:PORT` each,
    as `config.upstreams.etcd_endpoint` checks them)."""
    # No timeout of httpx's: the caller's cancel scope owns the time of every
    # request, and a watch waits for as long as nothing changes.
    async with httpx.AsyncClient(
        timeout=None,
        follow_redirects=False,
        # Answers are read as sent (aiter_raw), their size bounded: no compression.
        headers={"Content-Type": "application/json", "Accept-Encoding": "identity"},
        trust_env=False,
    ) as http:
        yield EtcdClient(http, endpoints)
