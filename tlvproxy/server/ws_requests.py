"""A WebSocket session's messages on their way upstream (docs/websocket.md).

Owns: the `SessionRequests` part of a session: each whole message in the
session's mode (json mode: a text message, `ws_json.parse_request`; binary
mode: one TLV frame, `ws_binary.check_frame`, with the session's uid written
into it); what a WAF deny or a rate-limit refusal does to a session
(docs/configuration.md "waf" and "rate_limits"); submitting an admitted
request to the dedicated upstream connection as a waiter (`ws_calls`) whose
deadline is the command's timeout; and the count of requests in flight.
Must not: read or write the client's socket (ws_reading.py, ws_writing.py),
render answers (ws_calls.py), or hold the policy every json-mode session
shares (session_core.py).

A message whose rate limits ask Redis (`store: redis`) waits for its verdict
in the session's task (at most the store's 50 ms budget), and reading stops
meanwhile: the session's messages reach the upstream in the order they came.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Protocol

import attrs

from tlvproxy.errors import BadRequest, GatewayError, UpstreamUnavailable
from tlvproxy.server import session_core, ws_json
from tlvproxy.server.ws_binary import InvalidFrame, check_frame
from tlvproxy.server.ws_calls import BinaryCall, JsonCall
from tlvproxy.server.ws_traffic import send_with_traffic
from tlvproxy.server.ws_wire import INTERNAL, POLICY
from tlvproxy.stores.limits import Pending

if TYPE_CHECKING:
    from collections.abc import Callable

    import trio

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec, WebSocketSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.view import RequestContext
    from tlvproxy.upstream.pool import Session

log = logging.getLogger("tlvproxy.websocket")


class RequestsSession(Protocol):
    """What a message's way upstream needs of its session, the `self` of
    `SessionRequests`'s methods (ws_session.py, which imports this module,
    checks that its session is one)."""

    _runtime: TableRuntime
    _table: CompiledTable
    _spec: WebSocketSpec
    _binary: bool
    _metrics: Metrics
    _context: RequestContext
    _request_id: str
    _uid: int | None
    _upstream: Session | None
    _received_at: float
    _verdict: tuple[Pending, int, Callable[[], None]] | None
    _in_flight: int
    _slot_freed: trio.Event | None
    close_code: int | None

    def _closing(self) -> bool: ...

    def _begin_close(self, code: int, reason: str) -> None: ...

    def _send(self, data: bytes) -> None: ...

    def _send_error(self, error: GatewayError, seq: int | str | None) -> None: ...

    def _on_message(self, message: str | bytes) -> None: ...

    def _send_json(self, request: ws_json.JsonRequest) -> None: ...

    def _send_frame(self, frame: Frame, command: CommandSpec) -> None: ...

    def _refused(self, error: GatewayError, seq: int) -> None: ...

    def _internal_error(self) -> None: ...

    def _upstream_lost(self, error: GatewayError) -> None: ...

    def _settled(self) -> None: ...

    def _timeout(self, command: CommandSpec) -> float: ...

    def _waf_admits(self, text: str) -> bool: ...

    def _identity_admits(self, command: CommandSpec, seq: int) -> bool: ...

    def _rate_admits(self, command: CommandSpec, seq: int) -> bool | Pending: ...


class SessionRequests:
    """A session's messages on their way upstream; part of
    `ws_session.WebSocketSession`, whose slots hold the state (so that a
    session keeps no `__dict__`)."""

    __slots__ = ()

    # What these methods set, declared for the type checker: the slots are
    # the session's.
    _verdict: tuple[Pending, int, Callable[[], None]] | None
    _slot_freed: trio.Event | None

    def _on_message(self: RequestsSession, message: str | bytes) -> None:
        if isinstance(message, str):
            if not self._waf_admits(message):
                return
            if self._binary:
                self._begin_close(POLICY, "binary mode takes binary messages, one TLV frame each")
                return
            try:
                request = ws_json.parse_request(
                    message, self._table, self._spec.upstream, self._context
                )
            except ws_json.MessageRejected as rejected:
                self._send_error(rejected.error, rejected.seq)
                return
            command = request.command
            if not self._identity_admits(command, request.seq):
                return
            admits = self._rate_admits(command, request.seq)
            if admits is True:
                self._send_json(request)
            elif isinstance(admits, Pending):
                self._verdict = (admits, request.seq, partial(self._send_json, request))
            return
        if not self._binary:
            self._send_error(BadRequest("json mode takes text messages (JSON objects)"), None)
            return
        try:
            frame, command = check_frame(self._table, self._spec.upstream, message)
        except InvalidFrame as exc:
            log.info("invalid binary frame from a websocket client", extra={"error": str(exc)})
            self._begin_close(POLICY, f"invalid frame: {exc}")
            return
        if not self._identity_admits(command, frame.seq):
            return
        admits = self._rate_admits(command, frame.seq)
        if admits is True:
            self._send_frame(frame, command)
        elif isinstance(admits, Pending):
            self._verdict = (admits, frame.seq, partial(self._send_frame, frame, command))

    def _send_json(self: RequestsSession, request: ws_json.JsonRequest) -> None:
        """Send an admitted json-mode request upstream."""
        command = request.command
        if command.traffic is not None:
            # Split, mirror, fallback (docs/websocket.md): the one test a
            # command without them pays.
            send_with_traffic(self, request)
            return
        upstream = self._upstream
        assert upstream is not None  # messages are read only while the session serves
        deadline = self._received_at + self._timeout(command)
        try:
            upstream.submit(
                JsonCall(self, command, request.seq, deadline),
                command.command,
                request.body,
                uid=self._uid or 0,
            )
        except GatewayError as exc:
            self._refused(exc, request.seq)
            return
        self._in_flight += 1

    def _send_frame(self: RequestsSession, frame: Frame, command: CommandSpec) -> None:
        """Send an admitted binary-mode frame upstream."""
        upstream = self._upstream
        assert upstream is not None  # messages are read only while the session serves
        # The session's uid, when the table names one, is what the gateway vouches
        # for: a client cannot speak for another user by writing its own uid.
        outgoing = frame if self._uid is None else attrs.evolve(frame, uid=self._uid)
        deadline = self._received_at + self._timeout(command)
        try:
            upstream.submit_frame(BinaryCall(self, command, frame.seq, deadline), outgoing)
        except GatewayError as exc:
            self._refused(exc, frame.seq)
            return
        self._in_flight += 1

    def _refused(self: RequestsSession, error: GatewayError, seq: int) -> None:
        if isinstance(error, UpstreamUnavailable):
            # SendFailed: the dedicated connection is closed or at its cap (1011).
            self._begin_close(INTERNAL, error.message)
        else:
            self._send_error(error, seq)  # PayloadTooLarge, BadRequest: this message only

    def _internal_error(self: RequestsSession) -> None:
        """A bug answering a request (the caller logged it): the session closes 1011."""
        self._begin_close(INTERNAL, "internal error")

    def _upstream_lost(self: RequestsSession, error: GatewayError) -> None:
        """A request's outcome: the dedicated connection is lost or broken, and
        the session cannot go on (1011)."""
        self._settled()
        self._begin_close(INTERNAL, error.message)

    def _settled(self: RequestsSession) -> None:
        """A request got its outcome: its slot is free."""
        self._in_flight -= 1
        freed = self._slot_freed
        if freed is not None:
            self._slot_freed = None
            freed.set()

    def _timeout(self: RequestsSession, command: CommandSpec) -> float:
        return session_core.command_timeout(self._table, self._spec.upstream, command)

    def _waf_admits(self: RequestsSession, text: str) -> bool:
        """WAF rules see each text message; a deny closes 1008 (docs/configuration.md "waf")."""
        denial = session_core.waf_denial(self._runtime, self._metrics, text)
        if denial is not None:
            self._begin_close(POLICY, denial)
            return False
        return True

    def _identity_admits(self: RequestsSession, command: CommandSpec, seq: int) -> bool:
        """A command with an authenticator is sent only on a session that
        authenticator verified, holding the command's claims; otherwise the
        message gets a `forbidden` error (docs/security.md "WebSocket")."""
        refusal = session_core.identity_refusal(self._runtime, self._context, command)
        if refusal is not None:
            self._send_error(refusal, seq)
            return False
        return True

    def _rate_admits(self: RequestsSession, command: CommandSpec, seq: int) -> bool | Pending:
        """True when the message may be sent now; False when it was refused (it
        got a per-message `rate_limited` error, docs/configuration.md
        "rate_limits"); a Pending when the verdict waits for Redis: the caller
        holds the message in `_verdict` and reading stops until it comes. The
        local store answers at once: a session's messages come one at a time,
        and waiting a scheduler pass for each would slow the session down."""
        verdict = session_core.rate_verdict(
            self._runtime, self._metrics, self._context, command, at_once=True
        )
        if verdict is None:
            return True
        if isinstance(verdict, Pending):
            return verdict
        self._send_error(verdict, seq)
        return False

    async def _await_verdict(self: RequestsSession) -> None:
        """Wait for the verdict of the message whose rate limits asked Redis
        (at most its 50 ms budget), then send it or refuse it."""
        assert self._verdict is not None
        pending, seq, send = self._verdict
        verdict = await pending.wait()
        self._verdict = None
        if self._closing():
            return
        if verdict is None:
            send()
        else:
            self._send_error(session_core.refused(self._metrics, verdict), seq)
