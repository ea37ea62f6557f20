"""REST translation: one HTTP request + its route -> one TLV request -> one answer
(docs/reference.md "Mapping").

Owns: building the request body (JSON body, then query, then path parameters,
then `fields`), the uid and hash key, policy checks, the upstream deadline, the
status mapping, the envelope, the error rendering and the access record.
Must not: parse HTTP (the driver did), pick nodes (the pool does) or wait: a
request is submitted, and completed by whichever task has its answer
(docs/reference.md "How a request flows").
"""

from __future__ import annotations

import json
import logging
import re
import time
from base64 import b64encode
from collections.abc import Callable, Mapping
from functools import partial
from random import getrandbits
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

from tlvproxy.errors import (
    Forbidden,
    GatewayError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    error_body,
    status_of,
)
from tlvproxy.logs import access_record
from tlvproxy.passes import PassSignal
from tlvproxy.server import cors
from tlvproxy.server.fill import field_values, read_numbers, uid_of
from tlvproxy.server.http_conn import Answer, Request, Response
from tlvproxy.server.rest_traffic import forward_traffic
from tlvproxy.server.runtime import TableRuntime
from tlvproxy.server.static import demo_response
from tlvproxy.server.view import RequestContext, client_address
from tlvproxy.stores.limits import Pending

if TYPE_CHECKING:
    from tlvproxy.auth.identity import Identity
    from tlvproxy.config.model import CommandSpec, CorsSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics, RequestTally
    from tlvproxy.policy.ratelimit import Refusal
    from tlvproxy.server.access_log import AccessLog
    from tlvproxy.stores.limits import RateLimits

_JSON = "application/json"
# A caller's request id that can be echoed as a header value as it is.
_REQUEST_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,198}[\x21-\x7e])?")
_waf_log = logging.getLogger("tlvproxy.waf")
_log = logging.getLogger("tlvproxy.rest")
_T = TypeVar("_T")


def request_id_of(request: Request | None) -> str:
    """The caller's X-Request-Id, or a new one.

    A caller's id is kept when it can go back as a header as it is: printable
    ASCII, at most 200 characters (docs/reference.md "Request ids"); another
    gets a new id instead of breaking the answer. A new id is 128
    random bits in hex, like a uuid4's: unique, but drawn from `random`
    (reseeded in every forked worker), because os.urandom costs a system call
    per request and a request id is not a secret.
    """
    given = request.header("x-request-id") if request is not None else None
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return f"{getrandbits(128):032x}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def render_error(error: GatewayError, request_id: str, *, envelope: bool) -> Response:
    """The error answer, or its envelope form (docs/reference.md "Errors")."""
    status = status_of(error)
    headers = [("Content-Type", _JSON), ("X-Request-Id", request_id), *error.headers()]
    if envelope:
        code = error.status if isinstance(error, UpstreamStatus) else status
        data = error.body if isinstance(error, UpstreamStatus) else None
        body = _dumps({"code": code, "msg": error.message, "data": data})
        return Response(status=200, headers=headers, body=body, checked=True)
    body = _dumps(error_body(error, request_id))
    return Response(status=status, headers=headers, body=body, checked=True)


RuntimeSource = Callable[[], TableRuntime]
ErrorHandler = Callable[[GatewayError, Request | None], Response]


def waf_inspect(runtime: TableRuntime, metrics: Metrics, request: Request) -> None:
    """The WAF on a REST request or a WebSocket handshake (docs/configuration.md
    `waf`): each match counted, a `log` match logged, a `deny` raised as 403
    `forbidden`."""
    matches = runtime.waf.inspect_request(
        path=request.path,
        query=request.query_string,
        body=request.body,
        headers=request.headers,
    )
    for found in matches:
        metrics.waf_blocked.labels(found.rule).inc()
        if found.action == "deny":
            raise found.error()
        _waf_log.warning("waf rule matched", extra={"rule": found.rule, "location": found.location})


class PushRoutes(Protocol):
    """The push-session endpoints as REST hands them a request (server/push_http.py,
    which imports this module)."""

    def submit(
        self,
        runtime: TableRuntime,
        request: Request,
        answer: Answer,
        request_id: str,
        client_ip: str,
        cors: list[tuple[str, str]] | None,
    ) -> bool:
        """Answer `request`, now or later; False when it is not a push session's."""


class RestHandler:
    """Answers REST requests on whatever table `runtime()` returns at the time.

    A `Submitter` (server/http_conn.py): `submit` takes the request and
    queues it; `run`'s task, after the scheduler pass, does the work of every
    request the pass queued, up to the upstream frame, and hands each to the
    pool; the upstream connection's reader (or its timer) completes the
    `Exchange`, which renders the answer.

    Why a queue: done in between the reading and parsing of each connection,
    a request's policy, routing and conversion find their code and tables
    cold in the CPU caches; done back to back for the requests of a pass,
    one kind of work at a time (`flush`), they do not. On the json route (1
    worker, wrk -c64, 2-core development box) that took the gateway's CPU
    per request from 55 to 44 us, and the added cost of 10 rate limits and
    50 WAF rules from 16.5 to 6-8.5 us.
    """

    def __init__(
        self,
        runtime: RuntimeSource,
        metrics: Metrics,
        access_log: AccessLog,
        tally: RequestTally,
        push: PushRoutes | None = None,
    ) -> None:
        # Each request reads `runtime()` once and keeps it: in-flight requests
        # finish on the table they started with (docs/operations.md "Reload").
        self._runtime = runtime
        self._metrics = metrics
        self._access_log = access_log
        # Requests are counted in plain numbers, published once per pass.
        self._tally = tally
        # The requests under `sessions.path` (docs/push-sessions.md).
        self._push = push
        # Requests taken in this scheduler pass, for `run`'s task (each
        # exchange holds its request).
        self._queued: list[tuple[Exchange, TableRuntime]] = []
        self._wake = PassSignal()
        # The rate limits with checks held in this sweep (RateLimits.check(held=True)),
        # and the requests that wait for them.
        self._holding: set[RateLimits] = set()
        self._held: list[
            tuple[Pending, Exchange, TableRuntime, CommandSpec, RequestContext, float]
        ] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Work on the requests each scheduler pass queues, after it; until
        cancelled, then on those still queued."""
        task_status.started()
        try:
            await self._wake.each_pass(self.flush)
        finally:
            self.flush()

    def flush(self) -> None:
        """Work on every queued request now."""
        while self._queued:
            queued, self._queued = self._queued, []
            # Three sweeps over the pass's requests, one kind of work each, so
            # that each finds its code and tables warm: the WAF; the route,
            # credentials and rate limits; the frame and the pool.
            inspected = [item for item in queued if _guarded(self._inspected, *item)]
            admitted = [
                (item, found) for item in inspected if (found := _guarded(self._admitted, *item))
            ]
            # The rate-limit checks the sweep held for the store of several
            # workers, made together: their requests go on now, but those
            # that wait for Redis, which go on when it answers.
            for limiter in self._holding:
                limiter.make_held()
            self._holding.clear()
            held, self._held = self._held, []
            for pending, exchange, runtime, command, context, now in held:
                if not pending.done:
                    pending.then(partial(self._resume, exchange, runtime, command, context, now))
                elif pending.verdict is None:
                    admitted.append(((exchange, runtime), (command, context, now)))
                else:
                    _guarded(self._refuse, exchange, pending.verdict)
            for (exchange, runtime), (command, context, now) in admitted:
                _guarded(self._forward, exchange, runtime, command, context, now)

    def submit(self, request: Request, answer: Answer) -> None:
        """Answer `request` through `answer`, now or when the upstream replies."""
        runtime: TableRuntime = self._runtime()
        table = runtime.table
        if table.demo and (page := demo_response(request.path, request.method)) is not None:
            answer.set(page)
            return
        exchange = Exchange(self, runtime, request, answer)
        if table.cors is not None and (origin := request.header("origin")) is not None:
            # A browser page of another origin (docs/configuration.md "cors").
            asked = request.header("access-control-request-method")
            if request.method == "OPTIONS" and asked is not None:
                exchange.preflight(table.cors, origin, asked)
                return
            exchange.cors = cors.answer_headers(table.cors, origin)
        sessions = table.sessions
        if (
            sessions is not None
            and request.path.startswith(sessions.path)
            and self._push is not None
            and self._push.submit(
                runtime, request, answer, exchange.request_id, exchange.client_ip, exchange.cors
            )
        ):
            # A push session's request: checked by the worker that holds the
            # session, wherever the connection landed.
            return
        queued = self._queued
        queued.append((exchange, runtime))
        if len(queued) == 1:
            self._wake.set()

    def _inspected(self, exchange: Exchange, runtime: TableRuntime) -> bool:
        """The WAF on a queued request: True when it goes on, False when it
        was refused (and answered)."""
        # The WAF sees every request, routed or not: probes of unknown paths
        # are refused (and counted) like any other (docs/reference.md "Mapping").
        if runtime.waf.inspects_requests:
            try:
                self._inspect(runtime, exchange.request)
            except GatewayError as error:
                exchange.on_error(error, None)
                return False
        return True

    def _admitted(
        self, exchange: Exchange, runtime: TableRuntime
    ) -> tuple[CommandSpec, RequestContext, float] | None:
        """A queued request's route, credentials and rate limits: the command,
        the request's view and its submission time when it goes to the pool
        now; None when it was answered (an error), or goes on when its rate
        limits' store answers."""
        request = exchange.request
        table = runtime.table
        try:
            assert table.router is not None  # the loader always builds one
            match = table.router.match(request.method, request.path)
            command = exchange.command = match.route.command
            context = RequestContext(
                remote_addr=exchange.client_ip,
                headers=request.headers,
                query_string=request.query_string,
                path_params=match.params,
            )
            if command.auth is not None:
                # Who the caller is, before anything is read from the request on
                # its behalf (docs/security.md).
                context.identity = exchange.identity = runtime.auth.authenticate(
                    command.auth,
                    context,
                    request.method,
                    request.target,
                    request.body,
                    time.time(),
                    command.claims,
                )
            if command.numeric_keys:
                read_numbers(command, context)
            now = exchange.submitted
            limiter = runtime.limiter
            if limiter.applies(command.name):
                verdict = limiter.check(command.name, context, held=True)
                if isinstance(verdict, Pending):
                    # The LMDB store of several workers answers at the end
                    # of this sweep (`make_held`, in `flush`), Redis on its
                    # own task: the request goes on then, and this connection
                    # reads on meanwhile.
                    self._holding.add(limiter)
                    self._held.append((verdict, exchange, runtime, command, context, now))
                    return None
                if verdict is not None:
                    raise self._refused(verdict)
        except GatewayError as error:
            exchange.on_error(error, None)
            return None
        return command, context, now

    def _resume(
        self,
        exchange: Exchange,
        runtime: TableRuntime,
        command: CommandSpec,
        context: RequestContext,
        now: float,
        verdict: Refusal | None,
    ) -> None:
        """Go on with a request whose rate limits waited for their store (in
        the store's task: a bug costs this one answer)."""
        if verdict is None:
            _guarded(self._forward, exchange, runtime, command, context, now)
        else:
            _guarded(self._refuse, exchange, verdict)

    def _refuse(self, exchange: Exchange, verdict: Refusal) -> None:
        exchange.on_error(self._refused(verdict), None)

    def _forward(
        self,
        exchange: Exchange,
        runtime: TableRuntime,
        command: CommandSpec,
        context: RequestContext,
        now: float,
    ) -> None:
        """Build the request's frame and hand it to the pool (`now`: when the
        request was submitted, from which its deadline runs)."""
        if command.traffic is not None:
            # Split, mirror, fallback (docs/configuration.md): a command without
            # them pays this one test.
            forward_traffic(exchange, runtime, command, context, now)
            return
        table = runtime.table
        try:
            codec = table.codecs[command.name]
            body = exchange.request.body
            if codec.uses_overlays:
                overlays: list[Mapping[str, str]] = [context.query, context.path_params]
                if command.fields:
                    overlays.append(field_values(command, context))
                frame_body = codec.encode_request(body, overlays)
            else:
                frame_body = codec.encode_request(body, ())
            uid = 0 if command.uid is None else uid_of(command, context)
            assert command.upstream is not None  # routed commands always name one
            pool = runtime.pools[command.upstream]
            spec = pool.spec
            key = None if spec.hash_on is None else spec.hash_on.evaluate(context)
            timeout = spec.timeout if command.timeout is None else command.timeout
            exchange.timeout = timeout
        except GatewayError as error:
            exchange.on_error(error, None)
            return
        pool.submit(
            exchange,
            command.command,
            frame_body,
            uid=uid,
            key=key,
            idempotent=command.idempotent,
            deadline=now + timeout,
        )

    def _inspect(self, runtime: TableRuntime, request: Request) -> None:
        waf_inspect(runtime, self._metrics, request)

    def _refused(self, refusal: Refusal) -> GatewayError:
        self._metrics.rate_limited.labels(refusal.rule).inc()
        return refusal.error()


def _guarded(step: Callable[..., _T], exchange: Exchange, *args: Any) -> _T | None:
    """`step(exchange, *args)`, one stage of a queued request's work; a bug
    in it answers that request 500 and is logged, and None is returned: it
    costs its own request, never the others of the pass."""
    try:
        return step(exchange, *args)
    except Exception:  # noqa: BLE001 - logged and answered
        request = exchange.request
        # The path, not the target: a query may hold a token (docs/security.md).
        _log.exception("handler failed on %s %s", request.method, request.path)
        # The connection closes after this answer, whatever state the bug left.
        exchange.answer.keep_alive = False
        try:
            exchange.on_error(GatewayError("internal error"), None)
        except Exception:  # noqa: BLE001 - the error answer failed too
            _log.exception("answering %s %s after a failure failed", request.method, request.path)
            exchange.answer.set(exchange.internal_error())
        return None


class Exchange:
    """One REST request from its submission to its answer: the pool's `Completion`.

    Its `on_reply` and `on_error` run in the upstream connection's tasks (or
    in `submit`), so they never raise: a bug answers 500 and is logged.
    """

    __slots__ = (
        "answer",
        "client_ip",
        "command",
        "cors",
        "handler",
        "identity",
        "request",
        "request_id",
        "submitted",
        "table",
        "timeout",
    )

    def __init__(
        self, handler: RestHandler, runtime: TableRuntime, request: Request, answer: Answer
    ) -> None:
        self.handler = handler
        self.table = runtime.table
        self.request = request
        self.answer = answer
        # When the whole request was read and handed over: its deadline
        # counts from then (docs/reference.md "Timeouts").
        self.submitted = trio.current_time()
        self.request_id = request_id_of(request)
        trusted = self.table.trusted_proxies
        self.client_ip = (
            client_address(request.remote_addr, request.headers, trusted)
            if trusted
            else request.remote_addr
        )
        self.command: CommandSpec | None = None
        self.identity: Identity | None = None
        self.timeout = 0.0
        self.cors: list[tuple[str, str]] | None = None  # headers for a cross-origin page

    def on_reply(self, frame: Frame, node: str) -> None:
        command = self.command
        assert command is not None  # only a routed request reaches the pool
        try:
            response = self.render(command, frame.status, frame.body)
        except GatewayError as error:
            response = render_error(error, self.request_id, envelope=self.table.envelope)
        except Exception:  # noqa: BLE001 - runs in the upstream reader: a bug costs one answer
            _log.exception("rendering the answer to %s failed", command.name)
            response = self.internal_error()
        self.finish(response, node, frame.status)

    def on_error(self, error: GatewayError, node: str | None) -> None:
        command = self.command
        if isinstance(error, UpstreamTimeout) and command is not None:
            error = UpstreamTimeout(
                f"upstream {command.upstream!r} did not answer {command.name!r} "
                f"within {self.timeout:g} s"
            )
        self.finish(self.error_response(error), node, None)

    def error_response(self, error: GatewayError) -> Response:
        """The answer to `error` (docs/reference.md "Errors")."""
        return render_error(error, self.request_id, envelope=self.table.envelope)

    def internal_error(self) -> Response:
        """The 500 answer to a bug of the gateway's (logged by the caller)."""
        return Response(
            status=500,
            headers=[("Content-Type", _JSON), ("X-Request-Id", self.request_id)],
            body=_dumps(error_body(GatewayError("internal error"), self.request_id)),
        )

    def preflight(self, spec: CorsSpec, origin: str, method: str) -> None:
        """Answer a CORS preflight: 204 with what the page may send, or 403."""
        try:
            headers = cors.preflight_headers(spec, origin, method)
        except Forbidden as refused:
            self.on_error(refused, None)
            return
        headers.append(("X-Request-Id", self.request_id))
        self.finish(Response(status=204, headers=headers, checked=True), None, None)

    def finish(
        self,
        response: Response,
        node: str | None,
        upstream_status: int | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Count, log and write `response`; `extra` overrides or adds fields of
        the access record (docs/operations.md "Access records")."""
        if self.cors is not None:
            response = attrs.evolve(response, headers=[*response.headers, *self.cors])
        request = self.request
        command = self.command
        handler = self.handler
        status = response.status
        route = "unmatched" if command is None else command.name
        duration = trio.current_time() - request.received_at
        handler._tally.count(route, request.method, status, duration)
        record = access_record(
            request_id=self.request_id,
            client_ip=self.client_ip,
            method=request.method,
            path=request.path,
            route=None if command is None else route,
            command=None if command is None else command.command,
            node=node,
            status=status,
            upstream_status=upstream_status,
            duration_ms=duration * 1000,
            identity=self.identity,
        )
        if extra is not None:
            record.update(extra)
        handler._access_log.add(record)
        self.answer.set(response)

    def render(self, command: CommandSpec, status: int, body: bytes) -> Response:
        """The answer to a response frame of `command` (its codec renders it).

        Raises UpstreamStatus for a non-zero status, UpstreamProtocolError
        (counted) for a body that does not render."""
        table = self.table
        codec = table.codecs[command.name]
        if status != 0:
            try:
                decoded = codec.decode_response(body) if body else None
            except UpstreamProtocolError:
                decoded = None
            raise UpstreamStatus(
                f"upstream answered status {status} to {command.name!r}",
                status=status,
                http_status=table.status_map.get(status, 500),
                body=decoded,
            )
        request_id = self.request_id
        try:
            payload = codec.response_json(body)
        except UpstreamProtocolError as exc:
            # undecodable_body, or answer_too_large (docs/reference.md).
            self.handler._metrics.frames_rejected.labels(exc.reason).inc()
            raise
        if table.envelope:
            # {code, msg, data} (docs/reference.md "Mapping"); a raw body has no JSON
            # form, so it goes as base64.
            data = payload if codec.content_type == _JSON else _dumps(b64encode(payload).decode())
            return Response(
                status=200,
                headers=[("Content-Type", _JSON), ("X-Request-Id", request_id)],
                body=b'{"code":0,"msg":"ok","data":' + data + b"}",
                checked=True,
            )
        headers = [("Content-Type", codec.content_type), ("X-Request-Id", request_id)]
        return Response(status=200, headers=headers, body=payload, checked=True)


def error_response_for(runtime: RuntimeSource, metrics: Metrics) -> ErrorHandler:
    """The HTTP driver's error handler: renders errors it detects itself (400, 408, ...)."""

    def handle(error: GatewayError, request: Request | None) -> Response:
        method = request.method if request is not None else "-"
        metrics.http_requests.labels("unmatched", method, str(status_of(error))).inc()
        return render_error(error, request_id_of(request), envelope=runtime().table.envelope)

    return handle
