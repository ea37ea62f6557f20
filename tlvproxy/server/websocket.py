"""Opening a WebSocket session (docs/websocket.md).

Owns: the RFC 6455 opening handshake after the HTTP driver hands over an
`Upgrade: websocket` request: the WAF's look at it, the endpoint, the
handshake's checks (`ws_wire`), the allowed origins (docs/security.md), the
session's credentials and uid (`session_core`); a refused handshake, answered
over HTTP and closed; an accepted one becomes a `ws_session.WebSocketSession`.
The entry point of WebSocket sessions: `serve_websocket`, and the registry
the drain closes them through (`WebSocketSessions`, from ws_drain.py).
Must not: parse HTTP (the driver did), or run a session (ws_session.py does).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

from tlvproxy.errors import BadRequest, Forbidden, GatewayError, RouteNotFound
from tlvproxy.server import session_core
from tlvproxy.server.rest import request_id_of, waf_inspect
from tlvproxy.server.view import RequestContext, client_address
from tlvproxy.server.ws_drain import WebSocketSessions
from tlvproxy.server.ws_session import CLOSE_TIMEOUT, WebSocketSession
from tlvproxy.server.ws_wire import handshake_problem, reject_bytes

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from tlvproxy.config.model import WebSocketSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.http_conn import Request
    from tlvproxy.server.read_hub import ReadHub
    from tlvproxy.server.runtime import TableRuntime

__all__ = ["WebSocketSessions", "serve_websocket"]

log = logging.getLogger("tlvproxy.websocket")


def _check_origin(spec: WebSocketSpec, request: Request) -> None:
    """Raise Forbidden for a browser page of an origin `allowed_origins` does not
    list; a client that sends no Origin is not a browser page (docs/security.md)."""
    if spec.allowed_origins is None:
        return
    origin = request.header("origin")
    if origin is not None and origin not in spec.allowed_origins:
        raise Forbidden(f"WebSocket connections from the origin {origin[:100]!r} are not allowed")


def serve_websocket(
    request: Request,
    stream: trio.abc.Stream,
    leftover: bytes,
    *,
    runtime: TableRuntime,
    metrics: Metrics,
    sessions: WebSocketSessions,
    read_hub: ReadHub | None = None,
) -> Awaitable[None]:
    """The WebSocket session on `stream`, to await: it runs until the session
    closes, then closes `stream`; it never raises for anything the client or
    the upstream does.

    `leftover` holds the bytes the HTTP driver read past the request head. A bad
    handshake is answered 400 (404 off `websocket.path`) and the stream closed.
    The session is one of `sessions` while it runs; its client's bytes are
    waited for by `read_hub` (a running `ReadHub`) when given and the stream
    is plain TCP. A plain function that
    returns the coroutine to await, so that no frame of its own stays on the
    stack of every idle session.
    """
    table = runtime.table
    spec = table.websocket
    # The caller's id only when it can go back in a header as it is
    # (docs/reference.md "Request ids").
    request_id = request_id_of(request)
    client_ip = client_address(request.remote_addr, request.headers, table.trusted_proxies)
    context = RequestContext(
        remote_addr=client_ip, headers=request.headers, query_string=request.query_string
    )
    try:
        if runtime.waf.inspects_requests:
            # The handshake is a request like any other, routed or not: its
            # query and headers reach the upstream as the session's uid and key.
            waf_inspect(runtime, metrics, request)
        if spec is None or request.path != spec.path:
            raise RouteNotFound(f"no WebSocket endpoint at {request.path!r}")
        problem = handshake_problem(request)
        if problem is not None:
            raise BadRequest(problem)
        _check_origin(spec, request)
        # The session closes when its credentials expire (1008), on trio's clock.
        expires = session_core.authenticate(runtime, spec, context, request)
        uid = session_core.session_uid(spec, context)
    except GatewayError as error:
        return _refuse(stream, error, request_id, client_ip)
    session = WebSocketSession(
        request=request,
        request_id=request_id,
        stream=stream,
        leftover=leftover,
        runtime=runtime,
        spec=spec,
        metrics=metrics,
        sessions=sessions,
        context=context,
        uid=uid,
        expires=expires,
        read_hub=read_hub,
    )
    return session.run()


async def _refuse(
    stream: trio.abc.Stream, error: GatewayError, request_id: str, client_ip: str
) -> None:
    log.info(
        "websocket handshake refused",
        extra={"request_id": request_id, "client_ip": client_ip, "error": error.message},
    )
    with trio.move_on_after(CLOSE_TIMEOUT):
        # A client gone already leaves nothing to do but close below.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(reject_bytes(error, request_id))
    await trio.aclose_forcefully(stream)
