"""What a json-mode session is, whatever carries it: a WebSocket
(`server/ws_session.py`) or plain HTTP, SSE and long polling
(`server/push_sessions.py`) (docs/websocket.md "json mode", docs/push-sessions.md).

Owns: a session's identity, uid and hash key, read once from the request
that opens it (docs/websocket.md "Authentication", docs/configuration.md
"Key expressions"); the policy each client message passes (the WAF, the
command's authenticator and claims, the rate limits: docs/configuration.md
"waf" and "rate_limits"); each command's deadline; and the text of answers
and pushes.
Must not: read or write a client, decide how a session closes, or keep
per-session state: these are plain functions, so a session pays no object of
its own for them (an idle session must stay light).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Protocol

import trio

from tlvproxy.config.keys import parse_number
from tlvproxy.errors import BadRequest, Forbidden, GatewayError, UpstreamProtocolError
from tlvproxy.server import ws_json
from tlvproxy.stores.limits import Pending

if TYPE_CHECKING:
    from tlvproxy.auth.identity import Identity
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.keys import KeyExpr
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.policy.ratelimit import Refusal
    from tlvproxy.server.http_conn import Request
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.view import RequestContext

log = logging.getLogger("tlvproxy.sessions")


class SessionSpec(Protocol):
    """What `websocket` and `sessions` share (docs/configuration.md)."""

    @property
    def upstream(self) -> str: ...
    @property
    def hash_on(self) -> KeyExpr | None: ...
    @property
    def uid(self) -> KeyExpr | None: ...
    @property
    def auth(self) -> str | None: ...


# ---------------------------------------------------------------- opening


def authenticate(
    runtime: TableRuntime, spec: SessionSpec, context: RequestContext, request: Request
) -> float:
    """Verify the opening request's credentials with `spec.auth` (none without
    it), leaving the identity in `context`; returns when they expire, on
    trio's clock (`math.inf`: never). Raises Unauthorized or Forbidden."""
    if spec.auth is None:
        return math.inf
    now = time.time()
    identity = context.identity = runtime.auth.authenticate(
        spec.auth, context, request.method, request.target, request.body, now
    )
    if identity.expires_at is None:
        return math.inf
    return trio.current_time() + identity.expires_at - now


def session_uid(spec: SessionSpec, context: RequestContext) -> int | None:
    """The session's uid from `spec.uid`; None when the table names no key.

    The value is read once as a number, and that number is what the session's
    rate-limit and hash keys see too (docs/configuration.md "Key expressions").
    Raises BadRequest for a value that is not an unsigned 32-bit integer, and
    Forbidden when the uid comes from the identity and the identity lacks it.
    """
    key = spec.uid
    if key is None:
        return None
    text = key.evaluate(context)
    if not text:
        if key.source == "auth":
            raise Forbidden(f"the caller's identity has no {key}, which the session's uid needs")
        return 0
    try:
        uid = parse_number(key, text)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not 0 <= uid <= 0xFFFFFFFF:
        raise BadRequest(f"{key}: user id {uid} is out of range (0 to 4294967295)")
    context.numbers = {key: str(uid)}
    return uid


def hash_key(spec: SessionSpec, context: RequestContext) -> str | None:
    """The key consistent hashing places the session's connection by."""
    hash_on = spec.hash_on
    return None if hash_on is None else hash_on.evaluate(context)


def bound_to(spec: SessionSpec, identity: Identity | None) -> tuple[str | None, ...] | None:
    """Who a push session opened by `identity` belongs to (docs/push-sessions.md
    "Identity"): the authenticator, the subject and consumer it verified, and
    every value the session's `uid` and `hash_on` read from it; None without
    `sessions.auth`. A request of the session must yield the same."""
    if identity is None:
        return None
    read = tuple(
        identity.value(key.name)
        for key in (spec.uid, spec.hash_on)
        if key is not None and key.source == "auth"
    )
    return (identity.authenticator, identity.sub, identity.consumer, *read)


def names_nobody(binding: tuple[str | None, ...] | None) -> bool:
    """Whether a binding (`bound_to`) tells no caller from another: an
    identity with no subject, no consumer and none of the values read."""
    return binding is not None and not any(binding[1:])


# ---------------------------------------------------------------- each message


def waf_denial(runtime: TableRuntime, metrics: Metrics, text: str) -> str | None:
    """The WAF on one client message: each match counted and a `log` match
    logged; the reason to give when a `deny` rule matched, else None."""
    for found in runtime.waf.inspect_message(text):
        metrics.waf_blocked.labels(found.rule).inc()
        if found.action == "deny":
            return f"message refused by WAF rule {found.rule!r}"
        log.warning("waf rule matched a session message", extra={"rule": found.rule})
    return None


def identity_refusal(
    runtime: TableRuntime, context: RequestContext, command: CommandSpec
) -> Forbidden | None:
    """Why a session may not send `command`, or None when it may: a command
    with an authenticator goes only on a session that authenticator verified,
    holding the command's claims (docs/security.md "WebSocket")."""
    if command.auth is None:
        return None
    identity = context.identity
    try:
        if identity is None or identity.authenticator != command.auth:
            raise Forbidden(
                f"{command.name!r} needs credentials of {command.auth!r}, "
                "which this session was not opened with"
            )
        if command.claims:
            runtime.auth.check_claims(command.auth, command.claims, identity)
    except Forbidden as refusal:
        return refusal
    return None


def rate_verdict(
    runtime: TableRuntime,
    metrics: Metrics,
    context: RequestContext,
    command: CommandSpec,
    *,
    at_once: bool = False,
) -> GatewayError | Pending | None:
    """The rate limits on one message: None when it may go now, the error it
    gets when refused (counted), or a Pending whose verdict waits for a
    store's task (`refused` turns that verdict into the error); `at_once`:
    only for Redis (`RateLimits.check`)."""
    limiter = runtime.limiter
    if not limiter.applies(command.name):
        return None
    verdict = limiter.check(command.name, context, at_once=at_once)
    if verdict is None or isinstance(verdict, Pending):
        return verdict
    return refused(metrics, verdict)


def refused(metrics: Metrics, refusal: Refusal) -> GatewayError:
    """The per-message `rate_limited` error of `refusal`, counted."""
    metrics.rate_limited.labels(refusal.rule).inc()
    return refusal.error()


def command_timeout(table: CompiledTable, upstream: str, command: CommandSpec) -> float:
    """How long the upstream has to answer `command` (its own timeout, else
    the upstream's)."""
    if command.timeout is not None:
        return command.timeout
    return table.upstreams[upstream].timeout


# ---------------------------------------------------------------- answers and pushes


def render_reply(
    table: CompiledTable, metrics: Metrics, command: CommandSpec, seq: int, reply: Frame
) -> bytes:
    """The json-mode text answering `seq`, from the response frame `reply`."""
    codec = table.codecs[command.name]
    if reply.status == 0:
        try:
            body = ws_json.body_json(codec, reply.body)
        except UpstreamProtocolError as exc:
            metrics.frames_rejected.labels(exc.reason).inc()
            return ws_json.render_error(exc, seq)
        return ws_json.render_response_json(command, seq, 0, body)
    try:
        value = codec.decode_response(reply.body) if reply.body else None
    except UpstreamProtocolError:
        # A non-zero status carries the body only when it decodes
        # (docs/websocket.md "json mode").
        value = None
    return ws_json.render_response(command, seq, reply.status, value)


def render_push(
    table: CompiledTable, metrics: Metrics, upstream: str, frame: Frame
) -> bytes | None:
    """The json-mode text of a push from `upstream`; None when it is dropped
    (a command not in the table, or a body that does not decode), counted and
    logged."""
    command = table.command_at(upstream, frame.command)
    if command is None or command.push is None:
        metrics.frames_rejected.labels("unknown_push").inc()
        log.warning("push of a command not in the table", extra={"command": frame.command})
        return None
    try:
        body = ws_json.body_json(table.codecs[command.name], frame.body)
    except UpstreamProtocolError as exc:
        metrics.frames_rejected.labels(exc.reason).inc()
        log.warning("push dropped", extra={"command": command.name, "error": exc.message})
        return None
    return ws_json.render_push_json(command, body)
