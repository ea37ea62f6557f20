"""A json-mode WebSocket message of a command with `split`, `mirror` or
`fallback` (docs/websocket.md "Split, mirror, fallback").

Owns: how a WebSocket session carries such a message (`_WebSocketCarrier`):
its answer is a text message, unless the session is closing; a message its
own upstream connection would not take, or that connection's loss, closes the
session (1011), as for any message.
Must not: send the message or work out its answer (`server/session_traffic.py`
does, for push sessions too), or touch a binary-mode frame (passed through as
it is, docs/websocket.md "binary mode").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, Protocol

from tlvproxy.server.session_traffic import send_with_rules
from tlvproxy.server.ws_wire import TEXT
from tlvproxy.server.ws_wire import frame as wire_frame

if TYPE_CHECKING:
    from tlvproxy.config.model import WebSocketSpec
    from tlvproxy.errors import GatewayError
    from tlvproxy.metrics import Metrics
    from tlvproxy.server import ws_json
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.view import RequestContext
    from tlvproxy.upstream.pool import Session

_log: Final = logging.getLogger("tlvproxy.websocket")


class _Session(Protocol):
    """What a message with rules needs of its json-mode session (ws_session.py's
    WebSocketSession, whose ws_requests.py part imports this module: named here
    by what it does)."""

    _runtime: TableRuntime
    _context: RequestContext
    _spec: WebSocketSpec
    _metrics: Metrics
    _request_id: str
    _uid: int | None
    _upstream: Session | None
    _in_flight: int
    _received_at: float
    close_code: int | None

    def _send(self, data: bytes) -> None: ...

    def _refused(self, error: GatewayError, seq: int) -> None: ...

    def _internal_error(self) -> None: ...

    def _upstream_lost(self, error: GatewayError) -> None: ...

    def _settled(self) -> None: ...


def send_with_traffic(session: _Session, request: ws_json.JsonRequest) -> None:
    """Send an admitted json-mode request of a command with rules, then its
    mirror's copy; the answer goes to the client when it comes."""
    upstream = session._upstream
    assert upstream is not None  # messages are read only while the session serves
    carrier = _WebSocketCarrier(session)
    send_with_rules(carrier, carrier, request, upstream, session._received_at)


class _WebSocketCarrier:
    """A WebSocket session's side of one message with rules: what it was
    opened with (`Opened`), and how it carries the message (`Carrier`)."""

    __slots__ = ("session",)

    log = _log

    def __init__(self, session: _Session) -> None:
        self.session = session

    # `Opened`.

    @property
    def runtime(self) -> TableRuntime:
        return self.session._runtime

    @property
    def context(self) -> RequestContext:
        return self.session._context

    @property
    def spec(self) -> WebSocketSpec:
        return self.session._spec

    @property
    def uid(self) -> int | None:
        return self.session._uid

    @property
    def request_id(self) -> str:
        return self.session._request_id

    @property
    def metrics(self) -> Metrics:
        return self.session._metrics

    # `Carrier`.

    @property
    def answering(self) -> bool:
        return self.session.close_code is None

    def refused(self, error: GatewayError, seq: int) -> None:
        # A per-message error, or 1011 when the session's connection is closed or full.
        self.session._refused(error, seq)

    def submitted(self) -> None:
        self.session._in_flight += 1

    def settled(self) -> None:
        self.session._settled()

    def answer(self, text: bytes, fallback: str | None) -> None:
        # A fallback's answer says so in its `"fallback"` member (docs/websocket.md).
        self.session._send(wire_frame(TEXT, text))

    def upstream_lost(self, error: GatewayError, seq: int) -> bool:
        # The session cannot go on without its connection: it closes 1011.
        self.session._upstream_lost(error)
        return True

    def internal_error(self, seq: int) -> None:
        self.session._internal_error()  # 1011
