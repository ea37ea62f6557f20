"""A REST request of a command with `split`, `mirror` or `fallback`
(docs/configuration.md "split, mirror, fallback").

Owns: building the frame for the command a split chose (from the same JSON
body, query and path, with the `fields` and uid of the command the caller
called), submitting it and then the mirror's copy, and completing the
request: its answer rendered with the codec of the command it was sent as,
last good answers kept, a fallback answer (200 with `X-Fallback`) in the
upstream's place, and the access record naming the command sent.
Must not: decide splits, shares or fallbacks (`server/traffic.py` does), or
touch a request of a command without rules: `RestHandler._forward` sends
those itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from tlvproxy.errors import GatewayError, UpstreamProtocolError, UpstreamTimeout
from tlvproxy.server.fill import field_values, uid_of
from tlvproxy.server.mirror import MirroredCall
from tlvproxy.server.traffic import same_request, timeout_of

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.framing import Frame
    from tlvproxy.policy.last_good import AnswerKey
    from tlvproxy.server.http_conn import Request, Response
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.traffic import CommandTraffic
    from tlvproxy.server.view import RequestContext

_log = logging.getLogger("tlvproxy.rest")


class Exchange(Protocol):
    """What a REST request with rules needs of its exchange (rest.py's
    Exchange, which imports this module: named here by what it does)."""

    @property
    def request(self) -> Request: ...

    @property
    def request_id(self) -> str: ...

    def on_error(self, error: GatewayError, node: str | None) -> None: ...

    def error_response(self, error: GatewayError) -> Response: ...

    def internal_error(self) -> Response: ...

    def render(self, command: CommandSpec, status: int, body: bytes) -> Response: ...

    def finish(
        self,
        response: Response,
        node: str | None,
        upstream_status: int | None,
        extra: dict[str, Any] | None = None,
    ) -> None: ...


def forward_traffic(
    exchange: Exchange,
    runtime: TableRuntime,
    command: CommandSpec,
    context: RequestContext,
    now: float,
) -> None:
    """Send the request of `command` where its split says, then its mirror's
    copy; `exchange` gets the answer (`now`: when the request was submitted)."""
    table = runtime.table
    traffic = runtime.traffic[command.name]
    sent = traffic.route(context)
    body = exchange.request.body
    try:
        overlays: list[Mapping[str, str]] = [context.query, context.path_params]
        if command.fields:
            overlays.append(field_values(command, context))
        frame_body = _encode(table, sent, body, overlays)
        uid = 0 if command.uid is None else uid_of(command, context)
        assert sent.upstream is not None  # routed and `to` commands always name one
        pool = runtime.pools[sent.upstream]
        hash_on = pool.spec.hash_on
        key = None if hash_on is None else hash_on.evaluate(context)
        timeout = timeout_of(sent, table)
    except GatewayError as error:
        exchange.on_error(error, None)
        return
    answer_key = traffic.last_good_key(context, uid, frame_body)
    call = _RestCall(exchange, traffic, sent, timeout, answer_key)
    traffic.sent(sent)  # before `submit`, which may complete the request
    pool.submit(
        call,
        sent.command,
        frame_body,
        uid=uid,
        key=key,
        idempotent=sent.idempotent,
        deadline=now + timeout,
    )
    if traffic.mirror is not None:
        # After the caller's request: the copy's body is not the caller's to wait for.
        def encode(to: CommandSpec) -> bytes:
            return frame_body if same_request(sent, to) else _encode(table, to, body, overlays)

        traffic.mirror_after(call, sent, exchange.request_id, encode, uid, context)


def _encode(
    table: CompiledTable, command: CommandSpec, body: bytes, overlays: list[Mapping[str, str]]
) -> bytes:
    codec = table.codecs[command.name]
    return codec.encode_request(body, overlays if codec.uses_overlays else ())


class _RestCall(MirroredCall):
    """The pool's `Completion` of a request with rules: it completes the
    `Exchange`, applying the fallback, and tells the mirror's copy."""

    __slots__ = ("answer_key", "exchange", "sent", "timeout", "traffic")

    def __init__(
        self,
        exchange: Exchange,
        traffic: CommandTraffic,
        sent: CommandSpec,
        timeout: float,
        answer_key: AnswerKey | None,
    ) -> None:
        super().__init__()
        self.exchange = exchange
        self.traffic = traffic
        self.sent = sent  # the command the request was sent as
        self.timeout = timeout
        self.answer_key = answer_key  # what its answer is kept for, with `last_good`

    # Both outcomes tell the mirror's copy, whatever happens in between.

    def on_reply(self, frame: Frame, node: str) -> None:
        try:
            self._answered(frame, node)
        finally:
            self.settled(frame)

    def on_error(self, error: GatewayError, node: str | None) -> None:
        try:
            self._failed(error, node)
        finally:
            self.settled(None)

    def _answered(self, frame: Frame, node: str) -> None:
        exchange, sent = self.exchange, self.sent
        extra = self._record()
        try:
            response = exchange.render(sent, frame.status, frame.body)
        except UpstreamProtocolError as error:
            response = self._fallback(error, extra) or exchange.error_response(error)
        except GatewayError as error:
            response = exchange.error_response(error)
        except Exception:  # noqa: BLE001 - runs in the upstream reader: a bug costs one answer
            _log.exception("rendering the answer to %s failed", sent.name)
            response = exchange.internal_error()
        else:
            if frame.status == 0:
                self.traffic.remember(self.answer_key, sent, frame.body)
        exchange.finish(response, node, frame.status, extra)

    def _failed(self, error: GatewayError, node: str | None) -> None:
        sent = self.sent
        if isinstance(error, UpstreamTimeout):
            error = UpstreamTimeout(
                f"upstream {sent.upstream!r} did not answer {sent.name!r} within {self.timeout:g} s"
            )
        extra = self._record()
        response = self._fallback(error, extra) or self.exchange.error_response(error)
        self.exchange.finish(response, node, None, extra)

    def _record(self) -> dict[str, Any]:
        """The access record's fields for the command sent (docs/operations.md
        "Access records")."""
        sent = self.sent
        extra: dict[str, Any] = {"command": f"0x{sent.command:04x}"}
        if sent is not self.traffic.command:
            extra["sent_command"] = sent.name
        return extra

    def _fallback(self, error: GatewayError, extra: dict[str, Any]) -> Response | None:
        """The fallback's answer to `error`, or None when the error stands."""
        exchange = self.exchange

        def render(command: CommandSpec, body: bytes) -> Response:
            return exchange.render(command, 0, body)

        found = self.traffic.fallback(error, self.answer_key, render)
        if found is None:
            return None
        kind, response = found
        extra["fallback"] = kind
        extra["upstream_error"] = error.code
        return attrs.evolve(response, headers=[*response.headers, ("X-Fallback", kind)])
