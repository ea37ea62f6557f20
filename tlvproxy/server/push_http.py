"""The HTTP endpoints of push sessions under `sessions.path` (docs/push-sessions.md).

Owns: what each request under the path may do and its answer: create a
session (201), stream its pushes (`events`: the connection is taken over by an
`EventStream`), poll them, send a json-mode message, delete it; the checks
every one of them passes (the WAF, the credentials of `sessions.auth`, the
session's identity: another identity's session is `session_not_found`, as an
unknown one is); and sending a request for another worker's session to that
worker (`Handoff`).
Must not: parse HTTP, keep sessions (`push_sessions.py`), or write an event
stream (`push_stream.py`).

Requests are state, not tasks, as on REST (docs/reference.md "How a request
flows"): `submit` answers at once, or leaves the answer to whoever has it (the
session's task once its upstream connection is open, the upstream
connection's reader for a message's answer or a poll's push).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Final

import attrs

from tlvproxy.config.push_sessions import CREATE_COMMAND
from tlvproxy.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    Overloaded,
    RouteNotFound,
    SessionNotFound,
    ShuttingDown,
)
from tlvproxy.server import push_wire, session_core, ws_json
from tlvproxy.server.http_conn import Response
from tlvproxy.server.push_sessions import DELETED, PushSession
from tlvproxy.server.push_stream import EventStream
from tlvproxy.server.rest import render_error, waf_inspect
from tlvproxy.server.view import RequestContext
from tlvproxy.stores.limits import Pending

if TYPE_CHECKING:
    import trio

    from tlvproxy.config.model import SessionsSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.ratelimit import Refusal
    from tlvproxy.server.handoff import Handoff
    from tlvproxy.server.http_conn import Answer, Request
    from tlvproxy.server.push_sessions import PushSessions
    from tlvproxy.server.runtime import TableRuntime

_JSON: Final = "application/json"

log = logging.getLogger("tlvproxy.sessions")


class _Reply:
    """How one request is answered: its answer slot, its id and the CORS
    headers a page of another origin needs."""

    __slots__ = ("answer", "cors", "request_id")

    def __init__(self, answer: Answer, request_id: str, cors: list[tuple[str, str]] | None) -> None:
        self.answer = answer
        self.request_id = request_id
        self.cors = cors

    def headers(self) -> list[tuple[str, str]]:
        headers = [("X-Request-Id", self.request_id)]
        if self.cors is not None:
            headers += self.cors
        return headers

    def json(self, status: int, body: bytes, *extra: tuple[str, str]) -> None:
        headers = [("Content-Type", _JSON), *self.headers(), *extra]
        self.answer.set(Response(status=status, headers=headers, body=body, checked=True))

    def empty(self, status: int) -> None:
        self.answer.set(Response(status=status, headers=self.headers(), checked=True))

    def error(self, error: GatewayError) -> None:
        response = render_error(error, self.request_id, envelope=False)
        if self.cors is not None:
            response = Response(
                status=response.status,
                headers=[*response.headers, *self.cors],
                body=response.body,
                checked=True,
            )
        self.answer.set(response)


@attrs.frozen(slots=True, kw_only=True)
class _Creation:
    """A create request that passed its checks, on its way to opening."""

    runtime: TableRuntime
    spec: SessionsSpec
    path: str
    reply: _Reply
    context: RequestContext
    uid: int | None
    key: str | None


class PushEndpoints:
    """Answers the requests under `sessions.path` of the table they come with."""

    def __init__(
        self, sessions: PushSessions, metrics: Metrics, handoff: Handoff | None = None
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._handoff = handoff  # None: one worker, which owns every session
        self._in = metrics.push_messages.labels("in", "http")
        self._out = metrics.push_messages.labels("out", "http")

    def submit(
        self,
        runtime: TableRuntime,
        request: Request,
        answer: Answer,
        request_id: str,
        client_ip: str,
        cors: list[tuple[str, str]] | None,
    ) -> bool:
        """Answer `request` through `answer`, now or later; False when its path
        only starts like `sessions.path` (`/v1/sessionsX`), for REST to route."""
        spec = runtime.table.sessions
        assert spec is not None  # the caller checked
        try:
            target = push_wire.parse_target(spec.path, request.path)
        except LookupError:
            reply = _Reply(answer, request_id, cors)
            error = RouteNotFound(f"no route for {request.path}")
            self._refused(reply, request.method, request.path, client_ip, error)
            return True
        if target is None:
            return False
        reply = _Reply(answer, request_id, cors)
        try:
            method = push_wire.METHODS[target.action]
            if request.method != method:
                raise MethodNotAllowed(
                    f"{request.method} is not allowed on {request.path}; use {method}",
                    allow=(method,),
                )
            if target.session_id is None:
                self._create(runtime, spec, request, reply, client_ip)
                return True
            owner = push_wire.owner_of(target.session_id)
            if owner is None:
                raise SessionNotFound(f"no push session {target.session_id[:64]!r}")
            if owner != self._sessions.worker:
                if self._handoff is None:
                    raise SessionNotFound(f"no push session {target.session_id!r}")
                # Served by the worker that holds it, on this very connection
                # (docs/push-sessions.md "Workers").
                answer.take_over(self._handoff.handler(owner, request_id))
                return True
            self._serve(runtime, spec, request, reply, client_ip, target)
        except GatewayError as error:
            self._refused(reply, request.method, request.path, client_ip, error)
        return True

    @staticmethod
    def _refused(
        reply: _Reply, method: str, path: str, client_ip: str, error: GatewayError
    ) -> None:
        log.info(
            "push session request refused",
            extra={
                "request_id": reply.request_id,
                "client_ip": client_ip,
                "method": method,
                "path": path,
                "error": error.message,
            },
        )
        reply.error(error)

    def _context(self, runtime: TableRuntime, request: Request, client_ip: str) -> RequestContext:
        if runtime.waf.inspects_requests:
            waf_inspect(runtime, self._metrics, request)
        return RequestContext(
            remote_addr=client_ip, headers=request.headers, query_string=request.query_string
        )

    # ------------------------------------------------------------ create

    def _create(
        self,
        runtime: TableRuntime,
        spec: SessionsSpec,
        request: Request,
        reply: _Reply,
        client_ip: str,
    ) -> None:
        if self._sessions.is_draining():
            raise ShuttingDown("the gateway is shutting down; open the session elsewhere")
        context = self._context(runtime, request, client_ip)
        session_core.authenticate(runtime, spec, context, request)
        if session_core.names_nobody(session_core.bound_to(spec, context.identity)):
            raise Forbidden(
                "the credentials name no subject (sub) or consumer the session could "
                "belong to: any other such credentials would reach it"
            )
        creation = _Creation(
            runtime=runtime,
            spec=spec,
            path=request.path,
            reply=reply,
            context=context,
            uid=session_core.session_uid(spec, context),
            key=session_core.hash_key(spec, context),
        )
        # The rate limits that name CREATE_COMMAND, or no command
        # (docs/configuration.md "rate_limits").
        limiter = runtime.limiter
        if limiter.applies(CREATE_COMMAND):
            verdict = limiter.check(CREATE_COMMAND, context)
            if isinstance(verdict, Pending):
                # The store answers on its own task (the LMDB store of
                # several workers, or Redis): the session opens there.
                verdict.then(partial(self._limited, creation))
                return
            if verdict is not None:
                raise session_core.refused(self._metrics, verdict)
        self._open(creation)

    def _limited(self, creation: _Creation, verdict: Refusal | None) -> None:
        """Go on with a create whose rate limits waited for their store."""
        try:
            if verdict is not None:
                raise session_core.refused(self._metrics, verdict)
            self._open(creation)
        except GatewayError as error:
            client_ip = creation.context.remote_addr
            self._refused(creation.reply, "POST", creation.path, client_ip, error)
        except Exception:  # runs in the rate-limit store's task: a bug costs one answer
            log.exception("opening a push session after its rate limits failed")
            creation.reply.error(GatewayError("internal error"))

    def _open(self, creation: _Creation) -> None:
        """Open the session `creation` asks for, if the limits admit it."""
        sessions = self._sessions
        if sessions.is_draining():  # since the request came, while its store answered
            raise ShuttingDown("the gateway is shutting down; open the session elsewhere")
        runtime, spec, context = creation.runtime, creation.spec, creation.context
        refusal = sessions.admit(context.remote_addr, runtime.table.limits)
        if refusal is not None:
            raise Overloaded(refusal.message)
        session = PushSession(
            registry=sessions,
            runtime=runtime,
            spec=spec,
            context=context,
            uid=creation.uid,
            request_id=creation.reply.request_id,
            path=creation.path,
        )
        sessions.start(
            session,
            runtime.pools[spec.upstream],
            creation.key,
            partial(self._opened, session, creation.reply),
        )

    def _opened(self, session: PushSession, reply: _Reply, error: GatewayError | None) -> None:
        if error is not None:
            reply.error(error)
            return
        base = f"{session.spec.path}/{session.id}"
        body = ws_json.dumps(
            {
                "session": session.id,
                "events": f"{base}/events",
                "poll": f"{base}/poll",
                "messages": f"{base}/messages",
            }
        )
        reply.json(201, body, ("Location", base))

    # ------------------------------------------------------------ a session's requests

    def _serve(
        self,
        runtime: TableRuntime,
        spec: SessionsSpec,
        request: Request,
        reply: _Reply,
        client_ip: str,
        target: push_wire.SessionTarget,
    ) -> None:
        context = self._context(runtime, request, client_ip)
        expires = session_core.authenticate(runtime, spec, context, request)
        session_id = target.session_id
        assert session_id is not None  # `create` has none, and went elsewhere
        session = self._sessions.get(session_id)
        if session is None or not session.belongs_to(context.identity):
            # Another identity's session is as unknown as one that never was.
            raise SessionNotFound(f"no push session {session_id!r}")
        session.touch()
        action = target.action
        if action == "events":
            given = request.header("last-event-id")
            if given is None:
                given, what = context.query.get("after"), "after"
            else:
                what = "Last-Event-ID"
            after = push_wire.parse_after(given, what)
            handler = partial(_serve_stream, session, after, expires, reply.headers())
            reply.answer.take_over(handler)
        elif action == "poll":
            after = push_wire.parse_after(context.query.get("after"), "after")
            last = session.last_push_id
            if after > last:
                # Waiting would answer push `last + 1` as if it came before
                # `after` (docs/push-sessions.md "Long polling").
                raise BadRequest(f"after {after} is beyond the session's last push, {last}")
            session.poll(after, partial(self._poll_answer, reply))
        elif action == "messages":
            self._message(session, request, reply)
        else:
            session.close(DELETED)
            reply.empty(204)

    @staticmethod
    def _poll_answer(reply: _Reply, body: bytes) -> None:
        reply.json(200, body)

    # ------------------------------------------------------------ messages

    def _message(self, session: PushSession, request: Request, reply: _Reply) -> None:
        """One json-mode request (docs/websocket.md "json mode"): answered 200
        with its response or its per-message error, as on a WebSocket."""
        session.messages_in += 1
        # Its answer, which every message gets once, counts in the session's
        # record now: it may come after the record is written, from another
        # upstream's pool or a rate-limit store's verdict (docs/operations.md
        # "Access records").
        session.messages_out += 1
        self._in.inc()
        answer = partial(self._message_answer, reply)
        try:
            text = request.body.decode()
        except UnicodeDecodeError:
            answer(ws_json.render_error(BadRequest("a message must be UTF-8 JSON text"), None))
            return
        runtime = session.runtime
        try:
            parsed = ws_json.parse_request(
                text, runtime.table, session.spec.upstream, session.context
            )
        except ws_json.MessageRejected as rejected:
            answer(ws_json.render_error(rejected.error, rejected.seq))
            return
        command, seq = parsed.command, parsed.seq
        refusal = session_core.identity_refusal(runtime, session.context, command)
        if refusal is not None:
            answer(ws_json.render_error(refusal, seq))
            return
        verdict = session_core.rate_verdict(runtime, self._metrics, session.context, command)
        if isinstance(verdict, Pending):
            # The store answers on its own task: the message goes on there.
            verdict.then(partial(self._admitted, session, parsed, answer))
        elif verdict is None:
            session.send(parsed, answer)
        else:
            answer(ws_json.render_error(verdict, seq))

    def _admitted(
        self,
        session: PushSession,
        request: ws_json.JsonRequest,
        answer: partial[None],
        refusal: Refusal | None,
    ) -> None:
        """Go on with a message whose rate limits waited for their store."""
        try:
            if refusal is None:
                session.send(request, answer)
            else:
                error = session_core.refused(self._metrics, refusal)
                answer(ws_json.render_error(error, request.seq))
        except Exception:  # runs in the rate-limit store's task: a bug costs one answer
            log.exception("a push-session message after its rate limits failed")
            answer(ws_json.render_error(GatewayError("internal error"), request.seq))

    def _message_answer(self, reply: _Reply, text: bytes, fallback: str | None = None) -> None:
        self._out.inc()
        if fallback is None:
            reply.json(200, text)
        else:
            # As a REST answer a fallback gives (docs/push-sessions.md "Split, mirror, fallback").
            reply.json(200, text, ("X-Fallback", fallback))


async def _serve_stream(
    session: PushSession,
    after: int,
    expires: float,
    headers: list[tuple[str, str]],
    request: Request,
    stream: trio.abc.Stream,
    leftover: bytes,
) -> None:
    """The event stream on the connection `events` took over (the request is
    answered by its head; bytes past it are not read)."""
    await EventStream(session, stream, expires).run(push_wire.stream_head(headers), after)
