"""Push sessions: json-mode sessions reached over plain HTTP (docs/push-sessions.md).

Owns: one worker's push sessions (`PushSessions`: by id, their lifetimes,
the budget of the pushes they keep, and their drain), and each session
(`PushSession`): its dedicated upstream connection, the numbering of its
pushes, the one stream or poll that receives them (a `Listener`), the
messages on their way upstream, idle expiry, closing, and the access record
written when it ends.
Must not: read HTTP, write to clients (a listener does: an event stream,
`push_stream.py`, or a long poll, `push_poll.py`), keep pushes itself
(`push_kept.py` bounds them), decide what a request may do
(`push_http.py`), hold the json-mode policy and rendering
(`session_core.py`), or split, mirror or fall back (`push_traffic.py`).

A session is state, not tasks (docs/reference.md "How a request flows"): its
one task holds the upstream connection open and sleeps until the next
deadline of the session (its idle expiry, or the poll waiting) or until it
closes. Pushes come from the connection's reader (`on_push`), which stores
them and hands them to the listener; a message's answer is written by the
same reader (`_MessageCall`). An idle session thus costs one task here plus
the upstream connection's reader and writer, and no client socket at all.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final, Protocol

import trio

from tlvproxy.errors import (
    GatewayError,
    Overloaded,
    ShuttingDown,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tlvproxy.logs import ACCESS_LOGGER
from tlvproxy.server import push_traffic, push_wire, session_core, ws_json
from tlvproxy.server.push_kept import Kept, KeptBudget
from tlvproxy.server.push_poll import Poll

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.auth.identity import Identity
    from tlvproxy.config.model import CommandSpec, Limits, SessionsSpec
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.admission import Admission, Refusal
    from tlvproxy.server.push_kept import Gap
    from tlvproxy.server.push_traffic import MessageReply
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.server.view import RequestContext
    from tlvproxy.upstream.pool import Pool, Session

# Messages of one session waiting for their answers; more get `overloaded`.
MAX_IN_FLIGHT: Final = 32

# Why a session (or the delivery of one stream or poll) ended: the `closed`
# of a poll's answer and of `event: close` (docs/push-sessions.md "Close reasons").
UPSTREAM_LOST: Final = "upstream_lost"
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
IDLE: Final = "idle_timeout"
DELETED: Final = "deleted"
SHUTTING_DOWN: Final = "shutting_down"
REPLACED: Final = "replaced"  # another stream or poll took over; the session goes on

log = logging.getLogger("tlvproxy.sessions")
_access = logging.getLogger(ACCESS_LOGGER)


class Listener(Protocol):
    """The one stream or poll a session's pushes go to."""

    # When the session must end it (`end(None)`): a poll's timeout; inf for a stream.
    deadline: float

    def deliver(self, push_id: int, text: bytes) -> None:
        """A new push, already kept by the session."""

    def end(self, reason: str | None) -> None:
        """Stop: the session closed or another listener took over (`reason`),
        or `deadline` passed (None). The session has let go of it already."""


class PushSessions:
    """One worker's push sessions, by id; `run()` is their lifetime, and
    `drain()` closes them all (docs/operations.md "Drain")."""

    def __init__(self, metrics: Metrics, admission: Admission, worker: int = 0) -> None:
        self.metrics = metrics
        self.worker = worker  # the owner index every id of this worker carries
        self._admission = admission
        self.kept = KeptBudget()  # the pushes every session of this worker keeps
        self._open: dict[str, PushSession] = {}
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._drained = trio.Event()

    def __len__(self) -> int:
        """The sessions open now (or opening)."""
        return len(self._open)

    def is_draining(self) -> bool:
        return self._draining

    def get(self, session_id: str) -> PushSession | None:
        """The open session `session_id` of this worker, or None."""
        return self._open.get(session_id)

    def admit(self, address: str, limits: Limits) -> Refusal | None:
        """Count a new session against the connection limits (it holds an
        upstream connection), from the client `address`; else why not."""
        return self._admission.admit_push_session(address, limits)

    def start(
        self,
        session: PushSession,
        pool: Pool,
        key: str | None,
        opened: Callable[[GatewayError | None], None],
    ) -> None:
        """Run `session` (admitted by `admit`) until it closes; `opened` is
        told once its upstream connection is open (None) or could not be."""
        assert self._nursery is not None, "push sessions are not running"
        self._open[session.id] = session
        session._opened = opened
        self._nursery.start_soon(session.run, pool, key)

    def drain(self) -> None:
        """Close every session (`shutting_down`); refuse new ones."""
        self._draining = True
        self._drained.set()
        for session in list(self._open.values()):
            session.close(SHUTTING_DOWN)

    def _forget(self, session: PushSession) -> None:
        if self._open.get(session.id) is session:
            del self._open[session.id]

    def _ended(self, session: PushSession) -> None:
        self._admission.release_push_session(session.address)
        kept = session._kept
        if kept is not None:
            kept.clear()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the sessions' tasks until drained and every session ended."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._drained.wait()


class PushSession:
    """One push session. It is its upstream connection's `PushReceiver`:
    `on_push` and `on_end` run in that connection's reader."""

    __slots__ = (
        "_active_at",
        "_in_flight",
        "_kept",
        "_listener",
        "_opened",
        "_registry",
        "_started_at",
        "_upstream",
        "_wake",
        "address",
        "closed",
        "context",
        "id",
        "messages_in",
        "messages_out",
        "metrics",
        "node",
        "opened_by",
        "path",
        "pushes",
        "request_id",
        "runtime",
        "spec",
        "status",
        "uid",
    )

    def __init__(
        self,
        *,
        registry: PushSessions,
        runtime: TableRuntime,
        spec: SessionsSpec,
        context: RequestContext,
        uid: int | None,
        request_id: str,
        path: str,
    ) -> None:
        self._registry = registry
        self.id = push_wire.new_session_id(registry.worker)
        self.metrics = registry.metrics
        # The table the session opened on stays its own, as a WebSocket
        # session's does (docs/operations.md "Reload").
        self.runtime = runtime
        self.spec = spec
        self.context = context  # the opening request: fields and rate-limit keys read it
        self.opened_by = session_core.bound_to(spec, context.identity)
        self.uid = uid
        self.request_id = request_id
        self.path = path
        self.address = context.remote_addr
        self.node: str | None = None
        self.closed: str | None = None
        self.status = 0  # what the create request was answered, once it is
        self.messages_in = 0
        self.messages_out = 0
        self.pushes = 0  # pushes so far: the id of the latest
        self._upstream: Session | None = None
        # Who hears that the session opened (the create request's answer);
        # let go of once told, with the HTTP connection it answers on.
        self._opened: Callable[[GatewayError | None], None] | None = None
        # The pushes kept, made with the first one: an idle session has none.
        self._kept: Kept | None = None
        self._listener: Listener | None = None
        self._in_flight = 0
        self._started_at = self._active_at = trio.current_time()
        self._wake: trio.CancelScope | None = None  # the sleep of `_live`

    def belongs_to(self, identity: Identity | None) -> bool:
        """Whether a request with `identity` may use the session: one that
        yields what the session is bound to (`session_core.bound_to`)."""
        return self.opened_by == session_core.bound_to(self.spec, identity)

    @property
    def last_push_id(self) -> int:
        """The id of the latest push (0 before the first)."""
        return self.pushes

    # ------------------------------------------------------------ life cycle

    async def run(self, pool: Pool, key: str | None) -> None:
        """The session's whole life; then the access record."""
        metrics = self.metrics
        metrics.push_sessions.inc()
        try:
            async with pool.open_session(key=key, receiver=self) as upstream:
                self.node = upstream.node
                self._upstream = upstream
                self._active_at = trio.current_time()
                if self.closed is not None:
                    # The gateway started draining while the connection opened.
                    self._tell_opened(ShuttingDown("the gateway is shutting down"))
                    return
                self._tell_opened(None)
                while self.closed is None:
                    # Until the next deadline: a waiting poll's, or idle expiry.
                    with trio.CancelScope(deadline=self._deadline()) as self._wake:
                        await trio.sleep_forever()
                    self._wake = None
                    self._expire(trio.current_time())
        except UpstreamUnavailable as exc:
            self.close(UPSTREAM_UNAVAILABLE)
            self._tell_opened(exc)
        except Exception:  # the top of a session's task: a bug costs this session, not the worker
            log.exception("push session failed")
        finally:
            self._upstream = None
            if self.closed is None:
                # Cancelled from outside (the drain's deadline passed) or a bug.
                self.close(SHUTTING_DOWN)
            # Never opened (cancelled first, or a bug): the create request hears so.
            self._tell_opened(ShuttingDown("the session could not be opened; try again"))
            metrics.push_sessions.dec()
            self._registry._ended(self)
            self._log_access()

    def _tell_opened(self, error: GatewayError | None) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            self.status = 201 if error is None else error.http_status
            opened(error)

    def _deadline(self) -> float:
        if self.closed is not None:
            return -math.inf
        listener = self._listener
        if listener is None:
            return self._active_at + self.spec.idle_timeout
        return listener.deadline

    def _expire(self, now: float) -> None:
        listener = self._listener
        if listener is not None:
            if now >= listener.deadline:
                self.detach(listener)
                listener.end(None)
        elif self.closed is None and now >= self._active_at + self.spec.idle_timeout:
            self.close(IDLE)

    def _rearm(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.deadline = self._deadline()

    def touch(self) -> None:
        """A stream, poll or message of this session: the idle clock starts again.
        (The sleep's deadline is not moved: when it passes, `_expire` looks again.)"""
        self._active_at = trio.current_time()

    def close(self, reason: str) -> None:
        """End the session (the first reason wins): its listener hears why, its
        id is forgotten at once, and its task closes the upstream connection."""
        if self.closed is not None:
            return
        self.closed = reason
        self._registry._forget(self)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.end(reason)
        wake = self._wake
        if wake is not None:
            wake.cancel()

    def _log_access(self) -> None:
        identity = self.context.identity
        _access.info(
            "push session",
            extra={
                **({} if identity is None else identity.log_fields()),
                "request_id": self.request_id,
                "client_ip": self.context.remote_addr,
                "method": "POST",
                "path": self.path,
                "status": self.status,
                "upstream_node": self.node,
                "uid": self.uid,
                "closed": self.closed,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "pushes": self.pushes,
                "duration_ms": round((trio.current_time() - self._started_at) * 1000, 3),
            },
        )

    # ------------------------------------------------------------ listeners

    def attach(self, listener: Listener) -> None:
        """Make `listener` the one the pushes go to; the one before it ends
        (`replaced`): one stream or poll at a time."""
        previous, self._listener = self._listener, listener
        self.touch()
        if previous is not None:
            previous.end(REPLACED)
        self._rearm()

    def detach(self, listener: Listener) -> None:
        """`listener` is done (if it still is the session's): the idle clock starts."""
        if self._listener is listener:
            self._listener = None
            self.touch()
            self._rearm()

    def poll(self, after: int, reply: Callable[[bytes], None]) -> None:
        """A long poll for the pushes after id `after`: answered at once when
        some are kept, else by the first push, or empty after `poll_timeout`.
        Either way it ends the stream or poll before it."""
        poll = Poll(self, after, trio.current_time() + self.spec.poll_timeout, reply)
        self.attach(poll)
        if after < self.pushes:  # pushes came since, kept or lost: a gap to tell
            self.detach(poll)
            poll.answer(None)

    def kept_after(self, after: int) -> tuple[Gap | None, list[tuple[int, bytes]]]:
        """The pushes kept after id `after`, and the ids no longer kept between
        `after` and the first of them (None when nothing was lost)."""
        kept = self._kept
        if kept is None:
            return None, []
        return kept.after(after, self.pushes)

    # ------------------------------------------------------------ the upstream's side

    def on_push(self, frame: Frame) -> None:
        """A push, from the dedicated connection's reader: kept and delivered."""
        if self.closed is not None:
            return
        try:
            text = session_core.render_push(
                self.runtime.table, self.metrics, self.spec.upstream, frame
            )
            if text is not None:
                self._keep(text)
        except Exception:  # runs in the upstream reader: a bug costs one push, not the reader
            log.exception("delivering a push failed", extra={"command": frame.command})

    def _keep(self, text: bytes) -> None:
        """Keep one rendered push (within the worker's budget: the worker's
        oldest may go), and hand it to the listener."""
        push_id = self.pushes = self.pushes + 1
        kept = self._kept
        if kept is None:
            kept = self._kept = Kept(self._registry.kept)
        spec = self.spec
        kept.add(push_id, text, spec.max_buffered)
        self._registry.kept.trim(spec.max_buffered_per_worker)
        listener = self._listener
        if listener is not None:
            listener.deliver(push_id, text)

    def on_end(self, error: GatewayError) -> None:
        """The dedicated connection ended; unless the session ended it, `upstream_lost`."""
        self.close(UPSTREAM_LOST)

    # ------------------------------------------------------------ messages

    def send(self, request: ws_json.JsonRequest, reply: MessageReply) -> None:
        """Send one admitted json-mode request; `reply` gets the text of its
        answer or per-message error, once (docs/websocket.md "json mode")."""
        command, seq = request.command, request.seq
        upstream = self._upstream
        if upstream is None or self.closed is not None:
            reply(ws_json.render_error(UpstreamUnavailable("the session is closed"), seq))
            return
        if self._in_flight >= MAX_IN_FLIGHT:
            error = Overloaded(f"the session has {MAX_IN_FLIGHT} messages waiting for answers")
            reply(ws_json.render_error(error, seq))
            return
        if command.traffic is not None:
            # Split, mirror, fallback (docs/push-sessions.md): the one test a
            # command without them pays.
            push_traffic.send_with_traffic(self, upstream, request, reply)
            return
        timeout = session_core.command_timeout(self.runtime.table, self.spec.upstream, command)
        call = _MessageCall(self, command, seq, trio.current_time() + timeout, reply)
        try:
            upstream.submit(call, command.command, request.body, uid=self.uid or 0)
        except GatewayError as exc:
            reply(ws_json.render_error(exc, seq))
            return
        self._in_flight += 1


class _MessageCall:
    """One message on its way: a `Waiter` on the dedicated connection. Exactly
    one of the three is called, from the connection's reader, the worker's
    deadline timer or the connection's end; none may raise."""

    __slots__ = ("command", "deadline", "reply", "seq", "session")

    def __init__(
        self,
        session: PushSession,
        command: CommandSpec,
        seq: int,
        deadline: float,
        reply: Callable[[bytes], None],
    ) -> None:
        self.session = session
        self.command = command
        self.seq = seq
        self.deadline = deadline
        self.reply = reply

    def on_response(self, frame: Frame) -> None:
        session = self.session
        session._in_flight -= 1
        try:
            text = session_core.render_reply(
                session.runtime.table, session.metrics, self.command, self.seq, frame
            )
        except Exception:  # runs in the upstream reader: a bug costs one answer
            log.exception("rendering the answer to %s failed", self.command.name)
            text = ws_json.render_error(GatewayError("internal error"), self.seq)
        self.reply(text)

    def on_error(self, error: GatewayError) -> None:
        # The connection is lost or broken: the session ends too (`on_end`).
        self.session._in_flight -= 1
        self.reply(ws_json.render_error(error, self.seq))

    def on_timeout(self) -> None:
        session = self.session
        session._in_flight -= 1
        command = self.command
        timeout = session_core.command_timeout(
            session.runtime.table, session.spec.upstream, command
        )
        error = UpstreamTimeout(
            f"upstream {command.upstream!r} did not answer {command.name!r} within {timeout:g} s"
        )
        self.reply(ws_json.render_error(error, self.seq))
