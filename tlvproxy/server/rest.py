"""REST translation: one HTTP request + its route -> one TLV request -> one answer (SPEC 4).

Owns: building the request body (JSON body, then query, then path parameters,
then `fields`), the uid and hash key, policy checks, the upstream deadline, the
status mapping, the envelope, the error rendering and the access record.
Must not: parse HTTP (the driver did) or pick nodes (the pool does).
"""

from __future__ import annotations

import json
import logging
from base64 import b64encode
from collections.abc import Callable, Mapping
from random import getrandbits
from typing import TYPE_CHECKING, Any

import trio

from tlvproxy.errors import (
    BadRequest,
    GatewayError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    error_body,
    status_of,
)
from tlvproxy.logs import access_record
from tlvproxy.server.http_conn import Request, Response
from tlvproxy.server.runtime import TableRuntime
from tlvproxy.server.static import demo_response
from tlvproxy.server.view import RequestContext, client_address

if TYPE_CHECKING:
    from tlvproxy.config.model import CommandSpec, Table
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.access_log import AccessLog

_JSON = "application/json"
_waf_log = logging.getLogger("tlvproxy.waf")


def request_id_of(request: Request | None) -> str:
    """The caller's X-Request-Id, or a new one (SPEC 4.1).

    A new id is 128 random bits in hex, like a uuid4's: unique, but drawn from
    `random` (reseeded in every forked worker), because os.urandom costs a
    system call per request and a request id is not a secret.
    """
    given = request.header("x-request-id") if request is not None else None
    return given if given else f"{getrandbits(128):032x}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def render_error(error: GatewayError, request_id: str, *, envelope: bool) -> Response:
    """The SPEC 4.2 error answer (or its SPEC 4.2 envelope form)."""
    status = status_of(error)
    headers = [("Content-Type", _JSON), ("X-Request-Id", request_id), *error.headers()]
    if envelope:
        code = error.status if isinstance(error, UpstreamStatus) else status
        data = error.body if isinstance(error, UpstreamStatus) else None
        body = _dumps({"code": code, "msg": error.message, "data": data})
        return Response(status=200, headers=headers, body=body)
    return Response(status=status, headers=headers, body=_dumps(error_body(error, request_id)))


RuntimeSource = Callable[[], TableRuntime]
ErrorHandler = Callable[[GatewayError, Request | None], Response]


class RestHandler:
    """Answers REST requests on whatever table `runtime()` returns at the time."""

    def __init__(self, runtime: RuntimeSource, metrics: Metrics, access_log: AccessLog) -> None:
        # Each request reads `runtime()` once and keeps it (SPEC 7: in-flight
        # requests finish on the table they started with).
        self._runtime = runtime
        self._metrics = metrics
        self._access_log = access_log
        # Metric children by label values, looked up once: `.labels()` costs
        # more than the increment itself.
        self._count_children: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._time_children: dict[str, Callable[[float], None]] = {}

    async def __call__(self, request: Request) -> Response:
        runtime: TableRuntime = self._runtime()
        table = runtime.table
        if table.demo and (page := demo_response(request.path, request.method)) is not None:
            return page
        request_id = request_id_of(request)
        client_ip = client_address(request.remote_addr, request.headers, table.trusted_proxies)
        command: CommandSpec | None = None
        route_label = "unmatched"
        node: str | None = None
        upstream_status: int | None = None
        try:
            assert table.router is not None  # the loader always builds one
            # The WAF sees every request, routed or not: probes of unknown paths
            # are refused (and counted) like any other (SPEC 4.4).
            self._inspect(runtime, request)
            match = table.router.match(request.method, request.path)
            command = match.route.command
            route_label = command.name
            context = RequestContext(
                remote_addr=client_ip,
                headers=request.headers,
                query_string=request.query_string,
                path_params=match.params,
            )
            self._apply_policy(runtime, command, context)
            node, frame_status, reply_body = await self._forward(runtime, command, request, context)
            upstream_status = frame_status
            response = self._answer(table, command, frame_status, reply_body, request_id)
        except GatewayError as error:
            response = render_error(error, request_id, envelope=table.envelope)
        status = response.status
        duration = trio.current_time() - request.received_at
        self._count(route_label, request.method, status)
        self._time(route_label, duration)
        self._access_log.add(
            access_record(
                request_id=request_id,
                client_ip=client_ip,
                method=request.method,
                path=request.path,
                route=None if command is None else route_label,
                command=None if command is None else command.command,
                node=node,
                status=status,
                upstream_status=upstream_status,
                duration_ms=duration * 1000,
            ),
        )
        return response

    def _count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        inc = self._count_children.get(key)
        if inc is None:
            inc = self._metrics.http_requests.labels(route, method, str(status)).inc
            self._count_children[key] = inc
        inc()

    def _time(self, route: str, duration: float) -> None:
        observe = self._time_children.get(route)
        if observe is None:
            observe = self._metrics.http_request_duration.labels(route).observe
            self._time_children[route] = observe
        observe(duration)

    def _inspect(self, runtime: TableRuntime, request: Request) -> None:
        matches = runtime.waf.inspect_request(
            path=request.path,
            query=request.query_string,
            body=request.body,
            headers=request.headers,
        )
        for found in matches:
            self._metrics.waf_blocked.labels(found.rule).inc()
            if found.action == "deny":
                raise found.error()
            _waf_log.warning(
                "waf rule matched", extra={"rule": found.rule, "location": found.location}
            )

    def _apply_policy(
        self, runtime: TableRuntime, command: CommandSpec, context: RequestContext
    ) -> None:
        refusal = runtime.limiter.check(command.name, context, trio.current_time())
        if refusal is not None:
            self._metrics.rate_limited.labels(refusal.rule).inc()
            raise refusal.error()

    async def _forward(
        self,
        runtime: TableRuntime,
        command: CommandSpec,
        request: Request,
        context: RequestContext,
    ) -> tuple[str, int, bytes]:
        table = runtime.table
        codec = table.codecs[command.name]
        overlays: list[Mapping[str, str]] = [context.query, context.path_params]
        if command.fields:
            overlays.append(_field_values(command, context))
        body = codec.encode_request(request.body, overlays)
        uid = _uid(command, context)
        assert command.upstream is not None  # routed commands always name one
        pool = runtime.pools[command.upstream]
        spec = pool.spec
        key = spec.hash_on.evaluate(context) if spec.hash_on is not None else None
        timeout = command.timeout if command.timeout is not None else spec.timeout
        # A scope with an absolute deadline: the same as move_on_after(timeout),
        # without its extra call per request.
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            reply = await pool.request(
                command.command, body, uid=uid, key=key, idempotent=command.idempotent
            )
        if scope.cancelled_caught:
            raise UpstreamTimeout(
                f"upstream {command.upstream!r} did not answer {command.name!r} "
                f"within {timeout:g} s"
            )
        return reply.node, reply.frame.status, reply.frame.body

    def _answer(
        self,
        table: Table,
        command: CommandSpec,
        status: int,
        body: bytes,
        request_id: str,
    ) -> Response:
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
        headers = [("Content-Type", codec.content_type), ("X-Request-Id", request_id)]
        try:
            payload = codec.response_json(body)
        except UpstreamProtocolError:
            self._metrics.frames_rejected.labels("undecodable_body").inc()
            raise
        if table.envelope:
            # SPEC 4.2: {code, msg, data}; a raw body has no JSON form, so it goes as base64.
            data = payload if codec.content_type == _JSON else _dumps(b64encode(payload).decode())
            return Response(
                status=200,
                headers=[("Content-Type", _JSON), ("X-Request-Id", request_id)],
                body=b'{"code":0,"msg":"ok","data":' + data + b"}",
            )
        return Response(status=200, headers=headers, body=payload)


def _field_values(command: CommandSpec, context: RequestContext) -> dict[str, str]:
    values: dict[str, str] = {}
    for field, key in command.fields.items():
        value = key.evaluate(context)
        if value is not None:
            values[field] = value
    return values


def _uid(command: CommandSpec, context: RequestContext) -> int:
    if command.uid is None:
        return 0
    text = command.uid.evaluate(context)
    if text is None or text == "":
        return 0
    try:
        uid = int(text)
    except ValueError:
        raise BadRequest(
            f"{command.uid}: expected a user id (an unsigned integer), got {text!r}"
        ) from None
    if uid < 0 or uid > 0xFFFFFFFF:
        raise BadRequest(f"{command.uid}: user id {uid} is out of range (0 to 4294967295)")
    return uid


def error_response_for(runtime: RuntimeSource, metrics: Metrics) -> ErrorHandler:
    """The HTTP driver's error handler: renders errors it detects itself (400, 408, ...)."""

    def handle(error: GatewayError, request: Request | None) -> Response:
        method = request.method if request is not None else "-"
        metrics.http_requests.labels("unmatched", method, str(status_of(error))).inc()
        return render_error(error, request_id_of(request), envelope=runtime().table.envelope)

    return handle
