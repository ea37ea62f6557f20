"""Accepting and serving one worker's connections (docs/operations.md
"Connections and file descriptors", "Drain").

Owns: the accept loops of the HTTP, HTTPS and admin listeners, admitting
each connection once (answering the others 503 `overloaded`, or closing them
on the HTTPS listener), the TLS handshake, the HTTP connection with the
parser `http_parser` names, a WebSocket upgrade admitted as a session, and
the connections another worker hands over for a push session of this one.
Must not: read requests (server/http_conn.py does) or hold the table: it
reads the gateway's current runtime where a connection needs it, never per
request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import trio

from tlvproxy.errors import Overloaded
from tlvproxy.server.admission import (
    MAX_ADMIN_CONNECTIONS,
    Refusal,
    closing_answer,
    counted_address,
    refuse,
)
from tlvproxy.server.handoff import MAX_LEFTOVER
from tlvproxy.server.http_conn import HttpSettings, serve_http_connection
from tlvproxy.server.parser_choice import resolve_parser_name
from tlvproxy.server.rest import render_error, request_id_of
from tlvproxy.server.tls import handshake
from tlvproxy.server.view import client_address
from tlvproxy.server.websocket import serve_websocket

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.gateway.certificates import ServingCertificates
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.admission import Admission, Doorkeeper
    from tlvproxy.server.http_answers import ReadyAnswers
    from tlvproxy.server.http_conn import (
        DeadlineTimer,
        DrainSignal,
        ErrorHandler,
        Handler,
        Request,
        Submitter,
    )
    from tlvproxy.server.read_hub import ReadHub
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.websocket import WebSocketSessions

ParserChoice = Literal["auto", "h11", "httptools"]


class ClientConnections:
    """The connections of one worker: `accept` runs a listener's accept loop,
    `serve_handed` serves a connection another worker passed on. `current`
    is the gateway's current runtime; `admission` counts the connections and
    sessions against the limits; `door` accepts, and answers the refused."""

    def __init__(
        self,
        current: Callable[[], TableRuntime],
        metrics: Metrics,
        admission: Admission,
        door: Doorkeeper,
        *,
        timer: DeadlineTimer,
        ready_answers: ReadyAnswers,
        read_hub: ReadHub,
        drain_signal: DrainSignal,
        websockets: WebSocketSessions,
        certificates: ServingCertificates,
        http_parser: ParserChoice | None,
    ) -> None:
        self._current = current
        self._metrics = metrics
        self._admission = admission
        self.door = door
        self._timer = timer
        self._ready_answers = ready_answers
        self._read_hub = read_hub
        self._drain_signal = drain_signal
        self._websockets = websockets
        self._certificates = certificates
        self._http_parser = http_parser
        self._admin_connections = 0
        # The WebSocket sessions admitted, by their stream: the client address
        # each counts against when a trusted proxy forwarded it, else None.
        self._session_addresses: dict[trio.abc.Stream, str | None] = {}

    def _settings(self, table: CompiledTable) -> HttpSettings:
        parser = resolve_parser_name(self._http_parser or table.http_parser)
        return HttpSettings.from_limits(table.limits, parser)

    async def accept(
        self,
        listener: trio.SocketListener,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        public: bool,
        nursery: trio.Nursery,
        tls: bool = False,
    ) -> None:
        """Accept connections on `listener` until it closes: serve each one the
        limits admit (over TLS when `tls`), answer the others 503 `overloaded`
        (docs/operations.md "Connections and file descriptors"), or on the TLS
        listener close them: a handshake is the very work an overload must not
        buy."""
        while (accepted := await self.door.accept(listener)) is not None:
            stream, peer = accepted
            refusal: Refusal | None
            if public:
                table = self._current().table
                counted = counted_address(peer, table.trusted_proxies)
                refusal = self._admission.admit(counted, table.limits)
                if refusal is None:
                    nursery.start_soon(
                        self._serve_connection, stream, peer, counted, handler, errors, tls
                    )
                    continue
                if tls:
                    self.door.log_refusal(refusal, peer, answered=False)
                    stream.socket.close()
                    continue
            elif self._admin_connections < MAX_ADMIN_CONNECTIONS:
                self._admin_connections += 1
                nursery.start_soon(self._serve_admin_connection, stream, peer, handler, errors)
                continue
            else:
                refusal = Refusal(
                    "admin_connections",
                    f"the admin listener holds {MAX_ADMIN_CONNECTIONS} connections; "
                    "try again later",
                )
            answer = closing_answer(errors(Overloaded(refusal.message), None))
            self.door.refuse(nursery, stream, peer, refusal, answer)

    async def _serve_connection(
        self,
        stream: trio.SocketStream,
        peer: str,
        counted: str | None,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        tls: bool,
        received: bytes = b"",
    ) -> None:
        """Serve one admitted client connection, after a TLS handshake when
        `tls`; `counted` is the address it counts against (`counted_address`),
        released when it ends. `received`: what another worker read of it."""
        served: trio.abc.Stream = stream
        try:
            table = self._current().table
            if tls:
                certificates = self._certificates.current
                assert certificates is not None  # listen.https needs tls
                # The handshake has header_timeout, as the first request after
                # it does (docs/configuration.md "limits").
                deadline = trio.current_time() + table.limits.header_timeout
                wrapped = await handshake(
                    stream, peer, certificates, deadline, self._metrics, errors
                )
                if wrapped is None:
                    return
                served = wrapped
            upgrade = self._upgrade if table.websocket is not None else None
            await serve_http_connection(
                served,
                peer,
                self._settings(table),
                handler,
                errors,
                upgrade=upgrade,
                drain_signal=self._drain_signal,
                timer=self._timer,
                ready_answers=self._ready_answers,
                read_hub=self._read_hub,
                received=received,
            )
        finally:
            sessions = self._session_addresses
            if sessions and served in sessions:
                self._admission.release_session(sessions.pop(served))
            self._admission.release(counted)

    async def serve_handed(
        self,
        handler: Handler | Submitter,
        errors: ErrorHandler,
        stream: trio.SocketStream,
        peer: str,
        received: bytes,
    ) -> None:
        """Serve a connection another worker passed on for a push session of
        this one, as one accepted here (docs/push-sessions.md "Workers")."""
        table = self._current().table
        counted = counted_address(peer, table.trusted_proxies)
        refusal = self._admission.admit(counted, table.limits)
        if refusal is not None:
            answer = closing_answer(errors(Overloaded(refusal.message), None))
            await self.door.refuse_here(stream, peer, refusal, answer)
            return
        await self._serve_connection(stream, peer, counted, handler, errors, False, received)

    def handoff_bytes(self) -> int:
        """The most request bytes one handoff may carry: a whole request and
        what may follow it."""
        limits = self._current().table.limits
        return limits.max_header_bytes + limits.max_request_body + MAX_LEFTOVER + 1024

    async def _serve_admin_connection(
        self,
        stream: trio.SocketStream,
        peer: str,
        handler: Handler | Submitter,
        errors: ErrorHandler,
    ) -> None:
        # The admin listener keeps answering while draining: /readyz must say
        # 503 to the load balancer until the process exits (docs/operations.md "Drain").
        try:
            await serve_http_connection(
                stream,
                peer,
                self._settings(self._current().table),
                handler,
                errors,
                timer=self._timer,
            )
        finally:
            self._admin_connections -= 1

    def _upgrade(
        self, request: Request, stream: trio.abc.Stream, leftover: bytes
    ) -> Awaitable[None]:
        # A session holds a second descriptor, its upstream connection: admitted
        # here, released by _serve_connection. Through a trusted proxy it also
        # counts against the client the proxy forwarded.
        table = self._current().table
        address = None
        trusted = table.trusted_proxies
        if trusted and counted_address(request.remote_addr, trusted) is None:
            address = client_address(request.remote_addr, request.headers, trusted)
        refusal = self._admission.admit_session(address, table.limits)
        if refusal is not None:
            self.door.log_refusal(refusal, address or request.remote_addr)
            error = Overloaded(refusal.message)
            answer = render_error(error, request_id_of(request), envelope=False)
            return refuse(stream, closing_answer(answer))
        self._session_addresses[stream] = address
        # Returns the session's coroutine rather than awaiting it: no frame of
        # this method stays with every idle WebSocket session.
        return serve_websocket(
            request,
            stream,
            leftover,
            runtime=self._current(),
            metrics=self._metrics,
            sessions=self._websockets,
            read_hub=self._read_hub,
        )
