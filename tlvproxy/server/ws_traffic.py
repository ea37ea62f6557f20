"""A json-mode WebSocket message of a command with `split`, `mirror` or
`fallback` (docs/websocket.md "Split, mirror, fallback").

Owns: sending the message as the command a split chose (on the session's own
upstream connection when that command is on the session's upstream, else on
the pool of its upstream, like a REST request), then the mirror's copy; and
answering it under the `cmd` the client used, rendered with the codec of the
command it was sent as, with last good answers kept and a fallback answer
(marked `"fallback"`) in the upstream's place.
Must not: decide splits, shares or fallbacks (`server/traffic.py` does), touch
a message of a command without rules, or a binary-mode frame (passed through
as it is, docs/websocket.md "binary mode").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from tlvproxy.errors import BadRequest, GatewayError, UpstreamProtocolError, UpstreamTimeout
from tlvproxy.server import ws_json
from tlvproxy.server.mirror import MirroredCall
from tlvproxy.server.traffic import reencode, timeout_of
from tlvproxy.server.ws_wire import TEXT
from tlvproxy.server.ws_wire import frame as wire_frame

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec, WebSocketSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.last_good import AnswerKey
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.traffic import CommandTraffic
    from tlvproxy.server.view import RequestContext
    from tlvproxy.upstream.pool import Session

log = logging.getLogger("tlvproxy.websocket")


class _Session(Protocol):
    """What a message with rules needs of its json-mode session (websocket.py's
    session, which imports this module: named here by what it does)."""

    _table: CompiledTable
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

    def _send_error(self, error: GatewayError, seq: int | str | None) -> None: ...

    def _refused(self, error: GatewayError, seq: int) -> None: ...

    def _internal_error(self) -> None: ...

    def _upstream_lost(self, error: GatewayError) -> None: ...

    def _settled(self) -> None: ...


def send_with_traffic(session: _Session, request: ws_json.JsonRequest) -> None:
    """Send an admitted json-mode request of a command with rules, then its
    mirror's copy; the answer goes to the client when it comes."""
    command, seq = request.command, request.seq
    table, runtime, context = session._table, session._runtime, session._context
    traffic = runtime.traffic[command.name]
    sent = traffic.route(context)
    try:
        body = reencode(table, command, sent, request.body)
    except BadRequest as exc:
        session._send_error(exc, seq)
        return
    timeout = timeout_of(sent, table)
    uid = session._uid or 0
    assert sent.upstream is not None  # request commands always name one
    pooled = sent.upstream != session._spec.upstream
    answer_key = traffic.last_good_key(context, uid, body)
    call = _TrafficCall(session, command, sent, seq, timeout, traffic, answer_key, pooled=pooled)
    if pooled:
        pool = runtime.pools[sent.upstream]
        hash_on = pool.spec.hash_on
        # Counted first: the pool may settle the call before it returns.
        session._in_flight += 1
        traffic.sent(sent)
        pool.submit(
            call,
            sent.command,
            body,
            uid=uid,
            key=None if hash_on is None else hash_on.evaluate(context),
            idempotent=sent.idempotent,
            deadline=call.deadline,
        )
    else:
        upstream = session._upstream
        assert upstream is not None  # messages are read only while the session serves
        try:
            upstream.submit(call, sent.command, body, uid=uid)
        except GatewayError as exc:
            session._refused(exc, seq)  # never sent: not split, nothing to copy
            return
        session._in_flight += 1
        traffic.sent(sent)
    if traffic.mirror is not None:
        # After the message is sent: the copy's body is not the session's to wait for.
        def encode(to: CommandSpec) -> bytes:
            return reencode(table, command, to, request.body)

        traffic.mirror_after(call, sent, session._request_id, encode, uid, context)


class _TrafficCall(MirroredCall):
    """One message of a command with rules on its way: a `Waiter` on the
    session's connection, or a `Completion` of another upstream's pool.

    Exactly one outcome comes, from the connection's reader, the deadline
    timer, the pool or the connection's end; none may raise, and each tells
    the mirror's copy.
    """

    __slots__ = (
        "answer_key",
        "command",
        "deadline",
        "pooled",
        "sent",
        "seq",
        "session",
        "timeout",
        "traffic",
    )

    def __init__(
        self,
        session: _Session,
        command: CommandSpec,
        sent: CommandSpec,
        seq: int,
        timeout: float,
        traffic: CommandTraffic,
        answer_key: AnswerKey | None,
        *,
        pooled: bool,
    ) -> None:
        super().__init__()
        self.session = session
        self.command = command  # the `cmd` the client sent
        self.sent = sent  # the command the message was sent as
        self.seq = seq
        self.timeout = timeout
        self.deadline = session._received_at + timeout
        self.traffic = traffic
        self.answer_key = answer_key  # what its answer is kept for, with `last_good`
        self.pooled = pooled  # sent on another upstream's pool, not the session's connection

    # The session's connection (`Waiter`) and the pool (`Completion`) alike.

    def on_response(self, frame: Frame) -> None:
        try:
            self._answered(frame)
        finally:
            self.settled(frame)

    def on_reply(self, frame: Frame, node: str) -> None:
        try:
            self._answered(frame)
        finally:
            self.settled(frame)

    def on_timeout(self) -> None:
        try:
            self._failed(self._timed_out())
        finally:
            self.settled(None)

    def on_error(self, error: GatewayError, node: str | None = None) -> None:
        try:
            if not self.pooled:
                # The session's own connection is lost or broken: it cannot go on.
                self.session._upstream_lost(error)
            else:
                self._failed(self._timed_out() if isinstance(error, UpstreamTimeout) else error)
        finally:
            self.settled(None)

    # Outcomes.

    def _timed_out(self) -> UpstreamTimeout:
        sent = self.sent
        return UpstreamTimeout(
            f"upstream {sent.upstream!r} did not answer {sent.name!r} within {self.timeout:g} s"
        )

    def _answered(self, frame: Frame) -> None:
        session = self.session
        session._settled()
        if session.close_code is None:
            try:
                text = self._render(frame)
            except Exception:  # runs in the upstream reader: a bug costs the session
                log.exception("rendering the answer to %s failed", self.sent.name)
                session._internal_error()
            else:
                session._send(wire_frame(TEXT, text))

    def _failed(self, error: GatewayError) -> None:
        """No answer (a timeout, or the other upstream's failure): a fallback's,
        or the per-message error; the session goes on."""
        session = self.session
        session._settled()
        if session.close_code is None:
            session._send(wire_frame(TEXT, self._fallback_or_error(error)))

    def _render(self, frame: Frame) -> bytes:
        sent, session = self.sent, self.session
        codec = session._table.codecs[sent.name]
        if frame.status != 0:
            try:
                value = codec.decode_response(frame.body) if frame.body else None
            except UpstreamProtocolError:
                value = None  # the body only when it decodes (docs/websocket.md "json mode")
            return ws_json.render_response(self.command, self.seq, frame.status, value)
        try:
            body = ws_json.body_json(codec, frame.body)
        except UpstreamProtocolError as exc:
            session._metrics.frames_rejected.labels(exc.reason).inc()
            return self._fallback_or_error(exc)
        self.traffic.remember(self.answer_key, sent, frame.body)
        return ws_json.render_response_json(self.command, self.seq, 0, body)

    def _fallback_or_error(self, error: GatewayError) -> bytes:
        codecs = self.traffic.table.codecs

        def render(command: CommandSpec, body: bytes) -> bytes:
            return ws_json.body_json(codecs[command.name], body)

        found = self.traffic.fallback(error, self.answer_key, render)
        if found is None:
            return ws_json.render_error(error, self.seq)
        kind, body = found
        return ws_json.render_fallback_json(self.command, self.seq, body, kind)
