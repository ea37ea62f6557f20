"""A small HTTP/1.1 client on trio + h11 for end-to-end tests.

It is an independent implementation of the client side (h11's), so the
gateway's parser seam is tested against something it did not write.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import h11
import trio


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """One keep-alive connection; `request` sends one request and reads its answer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, address: Any) -> HttpClient:
        return cls(await trio.open_tcp_stream(address.host, address.port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        if isinstance(body, dict):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else (body or b"")
        all_headers = [("Host", "gateway.test"), ("Content-Length", str(len(data)))]
        all_headers += list((headers or {}).items())
        wire = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        wire += self.conn.send(h11.Data(data=data)) if data else b""
        wire += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(wire)
        return await self._read_answer()

    async def _read_answer(self) -> Answer:
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the gateway closed the connection")
        assert response is not None
        headers = {k.decode().lower(): v.decode() for k, v in response.headers}
        return Answer(status=response.status_code, headers=headers, body=b"".join(chunks))


async def fetch(
    address: Any,
    method: str,
    target: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on a connection of its own."""
    client = await HttpClient.connect(address)
    try:
        return await client.request(method, target, body, headers)
    finally:
        await client.aclose()
