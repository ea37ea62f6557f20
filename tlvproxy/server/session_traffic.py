"""A json-mode session's message of a command with `split`, `mirror` or
`fallback`, whichever session carries it: a WebSocket's (`server/ws_traffic.py`)
or a push session's (`server/push_traffic.py`) (docs/websocket.md "Split,
mirror, fallback", docs/push-sessions.md "Split, mirror, fallback").

Owns: sending the message as the command a split chose (on the session's own
upstream connection when that command is on the session's upstream, else on
the pool in force of its upstream, like a REST request: a reload may have
retired the pools of the session's table, docs/operations.md "Reload"),
then the mirror's copy; and the message's outcome: its answer under the
`cmd` the client used, rendered with the codec of the command it was sent
as, with last good answers kept, or a fallback answer (marked `"fallback"`)
in the upstream's place, or its per-message error, handed to the session's
`Carrier`.
Must not: decide splits, shares or fallbacks (`server/traffic.py` does), touch
a message of a command without rules or a binary-mode frame (passed through
as it is, docs/websocket.md "binary mode"), or know how a session writes an
answer or closes (its `Carrier` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tlvproxy.errors import (
    BadRequest,
    GatewayError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tlvproxy.server import ws_json
from tlvproxy.server.mirror import MirroredCall
from tlvproxy.server.traffic import reencode, timeout_of

if TYPE_CHECKING:
    import logging

    from tlvproxy.config.model import CommandSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.last_good import AnswerKey
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.session_core import SessionSpec
    from tlvproxy.server.traffic import CommandTraffic
    from tlvproxy.server.view import RequestContext
    from tlvproxy.upstream.pool import Session


class Opened(Protocol):
    """What a message with rules reads of its session: what it was opened
    with (the request that opened it, its uid, its table)."""

    @property
    def runtime(self) -> TableRuntime: ...
    @property
    def context(self) -> RequestContext: ...
    @property
    def spec(self) -> SessionSpec: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def request_id(self) -> str: ...
    @property
    def metrics(self) -> Metrics: ...


class Carrier(Protocol):
    """How a session carries one message with rules: what it hears of the
    message, and how its answer reaches the client. Each method is called
    from the session's reading side, or from an upstream connection's reader
    or the deadline timer, and must not raise."""

    @property
    def log(self) -> logging.Logger:
        """Where a bug answering the message is logged (the session's logger)."""

    @property
    def answering(self) -> bool:
        """Whether the session still takes answers (a closing WebSocket does not)."""

    def refused(self, error: GatewayError, seq: int) -> None:
        """The message was never sent: its body does not fit the command a
        split chose, or the session's own connection would not take it."""

    def submitted(self) -> None:
        """The message was sent: it waits for its answer."""

    def settled(self) -> None:
        """The message got its outcome, which `answer` (or `upstream_lost`) follows."""

    def answer(self, text: bytes, fallback: str | None) -> None:
        """The text answering the message: its response, a fallback's (`fallback`
        names its kind) or its per-message error."""

    def upstream_lost(self, error: GatewayError, seq: int) -> bool:
        """The session's own connection ended with the message on it: lost or
        broken by the upstream, or closed by the session's own end. True when
        the session has dealt with the message (settled it, and answered it
        or not), False when it is answered like any failed message, its
        fallback included."""

    def internal_error(self, seq: int) -> None:
        """A bug rendering the message's answer (logged already)."""


def send_with_rules(
    carrier: Carrier,
    session: Opened,
    request: ws_json.JsonRequest,
    connection: Session,
    received_at: float,
) -> None:
    """Send an admitted json-mode request of a command with rules, which came
    at `received_at` on `session` (whose own upstream connection is
    `connection`), then its mirror's copy; `carrier` gets the answer when it
    comes."""
    command, seq = request.command, request.seq
    runtime, context, uid = session.runtime, session.context, session.uid or 0
    table = runtime.table
    traffic = runtime.traffic[command.name]
    sent = traffic.route(context)
    try:
        body = reencode(table, command, sent, request.body)
    except BadRequest as exc:
        carrier.refused(exc, seq)
        return
    timeout = timeout_of(sent, table)
    assert sent.upstream is not None  # request commands always name one
    pooled = sent.upstream != session.spec.upstream
    answer_key = traffic.last_good_key(context, uid, body)
    call = _TrafficCall(
        carrier,
        session.metrics,
        command,
        sent,
        seq,
        received_at + timeout,
        timeout,
        traffic,
        answer_key,
        pooled=pooled,
    )
    if pooled:
        # Counted first: the pool may settle the call before it returns.
        carrier.submitted()
        pool = traffic.pool(sent.upstream)
        if pool is None:
            # A reload removed the upstream: answered like a failed message.
            call.on_error(UpstreamUnavailable(f"upstream {sent.upstream!r} left the table"))
        else:
            traffic.sent(sent)
            hash_on = pool.spec.hash_on
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
        try:
            connection.submit(call, sent.command, body, uid=uid)
        except GatewayError as exc:
            carrier.refused(exc, seq)  # never sent: not split, nothing to copy
            return
        carrier.submitted()
        traffic.sent(sent)
    if traffic.mirror is not None:
        # After the message is sent: the copy's body is not the session's to wait for.
        def encode(to: CommandSpec) -> bytes:
            return reencode(table, command, to, request.body)

        traffic.mirror_after(call, sent, session.request_id, encode, uid, context)


class _TrafficCall(MirroredCall):
    """One message of a command with rules on its way: a `Waiter` on the
    session's connection, or a `Completion` of another upstream's pool.

    Exactly one outcome comes, from the connection's reader, the deadline
    timer, the pool or the connection's end; none may raise, and each tells
    the mirror's copy.
    """

    __slots__ = (
        "answer_key",
        "carrier",
        "command",
        "deadline",
        "metrics",
        "pooled",
        "sent",
        "seq",
        "timeout",
        "traffic",
    )

    def __init__(
        self,
        carrier: Carrier,
        metrics: Metrics,
        command: CommandSpec,
        sent: CommandSpec,
        seq: int,
        deadline: float,
        timeout: float,
        traffic: CommandTraffic,
        answer_key: AnswerKey | None,
        *,
        pooled: bool,
    ) -> None:
        super().__init__()
        self.carrier = carrier
        self.metrics = metrics
        self.command = command  # the `cmd` the client sent
        self.sent = sent  # the command the message was sent as
        self.seq = seq
        self.deadline = deadline
        self.timeout = timeout
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
            if self.pooled or not self.carrier.upstream_lost(error, self.seq):
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
        carrier = self.carrier
        carrier.settled()
        if carrier.answering:
            try:
                text, fallback = self._render(frame)
            except Exception:  # runs in the upstream reader: a bug costs this answer
                carrier.log.exception("rendering the answer to %s failed", self.sent.name)
                carrier.internal_error(self.seq)
            else:
                carrier.answer(text, fallback)

    def _failed(self, error: GatewayError) -> None:
        """No answer (a timeout, or the upstream's failure): a fallback's, or
        the per-message error; the session goes on."""
        carrier = self.carrier
        carrier.settled()
        if carrier.answering:
            carrier.answer(*self._fallback_or_error(error))

    def _render(self, frame: Frame) -> tuple[bytes, str | None]:
        sent = self.sent
        codec = self.traffic.table.codecs[sent.name]
        if frame.status != 0:
            try:
                value = codec.decode_response(frame.body) if frame.body else None
            except UpstreamProtocolError:
                value = None  # the body only when it decodes (docs/websocket.md "json mode")
            return ws_json.render_response(self.command, self.seq, frame.status, value), None
        try:
            body = ws_json.body_json(codec, frame.body)
        except UpstreamProtocolError as exc:
            self.metrics.frames_rejected.labels(exc.reason).inc()
            return self._fallback_or_error(exc)
        self.traffic.remember(self.answer_key, sent, frame.body)
        return ws_json.render_response_json(self.command, self.seq, 0, body), None

    def _fallback_or_error(self, error: GatewayError) -> tuple[bytes, str | None]:
        """The text of the fallback's answer to `error` and its kind, or of the
        per-message error (and None) when the error stands."""
        codecs = self.traffic.table.codecs

        def render(command: CommandSpec, body: bytes) -> bytes:
            return ws_json.body_json(codecs[command.name], body)

        found = self.traffic.fallback(error, self.answer_key, render)
        if found is None:
            return ws_json.render_error(error, self.seq), None
        kind, body = found
        return ws_json.render_fallback_json(self.command, self.seq, body, kind), kind
