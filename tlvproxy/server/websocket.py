"""One WebSocket session <-> one dedicated upstream connection (SPEC 5).

Owns: the RFC 6455 opening handshake after the HTTP driver hands over an
`Upgrade: websocket` request, the wsproto connection, the session's tasks (a
reader, one writer, a push pump, a drain watcher, a task per request), seq
mapping in binary mode, the per-message WAF and rate-limit seams (SPEC 4.4),
the close codes, backpressure and the per-session access record.
Must not: parse HTTP (the driver did), pick nodes or frame requests (the pool
does), or hold protocol logic of json mode (`ws_json.py` does).

Tasks and ownership: only the reader feeds wsproto and only the writer
serialises events, so `wsproto.Connection` has one owner per direction. Every
outgoing message (response, push, per-message error, pong) goes through one
bounded memory channel to the writer.

Close codes (SPEC 5): 1001 drain, 1008 policy (a WAF deny, an invalid binary
frame, a text message in binary mode, and a client that does not read: see
backpressure), 1009 message over `max_message`, 1011 upstream connection lost or
broken, 1013 no healthy node. A session idle for `idle_timeout` closes with 1000
(nothing went wrong; it just ended). A client's own close is answered with its
code.

Backpressure: the reader takes at most `MAX_IN_FLIGHT` requests at once (then
stops reading, so TCP pushes back on the client); responses and pushes wait in
a queue of `OUTGOING_QUEUE` messages. When that queue is full the client is not
reading what it asked for, so the session closes with 1008 ("client too slow")
and a warning is logged, instead of buffering without bound. Queued messages are
then flushed and the close frame sent within `CLOSE_TIMEOUT`, after which the TCP
connection is dropped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Final

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from tlvproxy.errors import (
    BadRequest,
    GatewayError,
    RouteNotFound,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from tlvproxy.framing import (
    ConnectionClosed,
    Frame,
    FrameDecoder,
    FramingError,
    encode_frame,
)
from tlvproxy.logs import ACCESS_LOGGER
from tlvproxy.server import ws_json
from tlvproxy.server.view import RequestContext, client_address

if TYPE_CHECKING:
    from tlvproxy.config.model import CommandSpec, WebSocketSpec
    from tlvproxy.metrics import Metrics
    from tlvproxy.server.http_conn import Request
    from tlvproxy.server.runtime import TableRuntime
    from tlvproxy.upstream.pool import Session

# Requests of one session in flight at once; past it the reader stops reading.
MAX_IN_FLIGHT: Final = 32
# Messages waiting for the writer; a full queue means the client does not read.
OUTGOING_QUEUE: Final = 64
# Pushes the pool may queue for the session before its reader waits for us.
PUSH_BUFFER: Final = 16
# Bound on the closing handshake: flushing, the close frame, the client's reply.
CLOSE_TIMEOUT: Final = 5.0
_READ_SIZE: Final = 65536

# Close codes (RFC 6455 7.4.1; which one when: SPEC 5).
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
POLICY: Final = 1008
TOO_BIG: Final = 1009
INTERNAL: Final = 1011
TRY_AGAIN_LATER: Final = 1013
ABNORMAL: Final = 1006  # no close frame: the client vanished (never sent on the wire)

_WS_VERSION: Final = "13"
_WS_KEY_BYTES: Final = 16

log = logging.getLogger("tlvproxy.websocket")
_access = logging.getLogger(ACCESS_LOGGER)


class _InvalidFrame(Exception):
    """A binary message that is not exactly one acceptable TLV frame (closes 1008)."""


# ---------------------------------------------------------------- handshake


def _handshake_problem(request: Request) -> str | None:
    """Why `request` is not a valid RFC 6455 opening handshake, or None."""
    connection_tokens: set[str] = set()
    upgrade = ""
    version = key = None
    for name, value in request.headers:
        if name == "connection":
            connection_tokens.update(t.strip().lower() for t in value.split(","))
        elif name == "upgrade":
            upgrade = value.strip().lower()
        elif name == "sec-websocket-version":
            version = value.strip()
        elif name == "sec-websocket-key":
            key = value.strip()
    if request.method != "GET":
        return "a WebSocket handshake must be a GET"
    if "upgrade" not in connection_tokens or upgrade != "websocket":
        return "a WebSocket handshake needs 'Connection: Upgrade' and 'Upgrade: websocket'"
    if version != _WS_VERSION:
        return f"unsupported Sec-WebSocket-Version {version!r}: only 13 is spoken"
    if key is None:
        return "the Sec-WebSocket-Key header is missing"
    try:
        nonce = base64.b64decode(key, validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != _WS_KEY_BYTES:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def _accept_head(request: Request, request_id: str) -> bytes:
    key = (request.header("sec-websocket-key") or "").strip().encode()
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n"
        b"X-Request-Id: " + request_id.encode() + b"\r\n\r\n"
    )


def _reject_bytes(error: GatewayError, request_id: str) -> bytes:
    # Sec-WebSocket-Version tells a client speaking another version what we speak
    # (RFC 6455 4.4); it is harmless on the other refusals.
    body = json.dumps(error_body(error, request_id), ensure_ascii=False).encode()
    return (
        f"HTTP/1.1 {error.http_status} {_REASONS.get(error.http_status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\nX-Request-Id: {request_id}\r\n"
        f"Sec-WebSocket-Version: {_WS_VERSION}\r\n\r\n"
    ).encode() + body


_REASONS: Final = {400: "Bad Request", 404: "Not Found"}


def _session_uid(spec: WebSocketSpec, context: RequestContext) -> int | None:
    """The session's uid from `websocket.uid`; None when the table names no key.

    Raises BadRequest for a value that is not an unsigned 32-bit integer.
    """
    if spec.uid is None:
        return None
    text = spec.uid.evaluate(context)
    if not text:
        return 0
    try:
        uid = int(text)
    except ValueError:
        raise BadRequest(
            f"{spec.uid}: expected a user id (an unsigned integer), got {text!r}"
        ) from None
    if not 0 <= uid <= 0xFFFFFFFF:
        raise BadRequest(f"{spec.uid}: user id {uid} is out of range (0 to 4294967295)")
    return uid


async def serve_websocket(
    request: Request,
    stream: trio.abc.Stream,
    leftover: bytes,
    *,
    runtime: TableRuntime,
    metrics: Metrics,
    shutdown: trio.Event,
) -> None:
    """Run one WebSocket session on `stream` until it closes, then close `stream`.

    `leftover` holds the bytes the HTTP driver read past the request head. A bad
    handshake is answered 400 (404 off `websocket.path`) and the stream closed.
    Never raises for anything the client or the upstream does.
    """
    table = runtime.table
    spec = table.websocket
    request_id = request.header("x-request-id") or uuid.uuid4().hex
    client_ip = client_address(request.remote_addr, request.headers, table.trusted_proxies)
    context = RequestContext(
        remote_addr=client_ip, headers=request.headers, query_string=request.query_string
    )
    try:
        if spec is None or request.path != spec.path:
            raise RouteNotFound(f"no WebSocket endpoint at {request.path!r}")
        problem = _handshake_problem(request)
        if problem is not None:
            raise BadRequest(problem)
        uid = _session_uid(spec, context)
    except GatewayError as error:
        log.info(
            "websocket handshake refused",
            extra={"request_id": request_id, "client_ip": client_ip, "error": error.message},
        )
        with trio.move_on_after(CLOSE_TIMEOUT):
            # A client gone already leaves nothing to do but close below.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(_reject_bytes(error, request_id))
        await trio.aclose_forcefully(stream)
        return

    session = _Session(
        stream=stream,
        leftover=leftover,
        runtime=runtime,
        spec=spec,
        metrics=metrics,
        shutdown=shutdown,
        context=context,
        uid=uid,
    )
    metrics.websocket_sessions.inc()
    try:
        await session.run(_accept_head(request, request_id))
    finally:
        metrics.websocket_sessions.dec()
        await trio.aclose_forcefully(stream)
        _access.info(
            "websocket session",
            extra={
                "request_id": request_id,
                "client_ip": client_ip,
                "method": request.method,
                "path": request.path,
                "status": 101,
                "upstream_node": session.node,
                "uid": uid,
                "close_code": session.close_code,
                "close_reason": session.close_reason,
                "messages_in": session.messages_in,
                "messages_out": session.messages_out,
                "duration_ms": round((trio.current_time() - request.received_at) * 1000, 3),
            },
        )


# ---------------------------------------------------------------- the session


class _Session:
    """One accepted session; `run()` is its whole life."""

    __slots__ = (
        "_client_gone",
        "_close_sent",
        "_conn",
        "_context",
        "_in_flight",
        "_leftover",
        "_metrics",
        "_outbox",
        "_outbox_closed",
        "_runtime",
        "_shutdown",
        "_slot_freed",
        "_spec",
        "_stream",
        "_table",
        "_uid",
        "_work",
        "_writer",
        "_writer_parked",
        "close_code",
        "close_reason",
        "messages_in",
        "messages_out",
        "node",
    )

    def __init__(
        self,
        *,
        stream: trio.abc.Stream,
        leftover: bytes,
        runtime: TableRuntime,
        spec: WebSocketSpec,
        metrics: Metrics,
        shutdown: trio.Event,
        context: RequestContext,
        uid: int | None,
    ) -> None:
        self._stream = stream
        self._leftover = leftover
        self._runtime = runtime
        self._table = runtime.table
        self._spec = spec
        self._metrics = metrics
        self._shutdown = shutdown
        self._context = context
        self._uid = uid
        self._conn = Connection(ConnectionType.SERVER)
        # The writer's queue, bounded by _enqueue; an idle writer parks itself in
        # _writer_parked. A list and a parked task cost a few bytes where a memory
        # channel costs 1.8 KiB, and idle sessions are many (issue 6: under 40 KiB
        # each, upstream connection included).
        self._outbox: list[Event] = []
        self._outbox_closed = False
        self._writer_parked: trio.lowlevel.Task | None = None
        self._in_flight = 0
        self._slot_freed: trio.Event | None = None
        # The session nursery's scope (set in _serve): cancelled when the session starts
        # closing, it stops the reader, the pump, the watcher and the requests.
        self._work: trio.CancelScope | None = None
        # The writer's scope is shielded from that cancellation, so that it can flush
        # what is queued and send the close frame; it gets CLOSE_TIMEOUT once closing
        # starts, and is cancelled at once when the client is gone or the session is
        # cancelled from outside. One nursery instead of two: idle sessions are many.
        self._writer = trio.CancelScope(shield=True)
        self._client_gone = False
        self._close_sent = False
        self.node: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.messages_in = 0
        self.messages_out = 0

    # ------------------------------------------------------------ life cycle

    async def run(self, accept_head: bytes) -> None:
        try:
            await self._stream.send_all(accept_head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._begin_close(ABNORMAL, "client gone before the handshake completed")
            return
        self._conn.receive_data(self._leftover)
        self._leftover = b""
        pool = self._runtime.pools[self._spec.upstream]
        key = None if self._spec.hash_on is None else self._spec.hash_on.evaluate(self._context)
        try:
            async with pool.open_session(key=key, push_buffer=PUSH_BUFFER) as upstream:
                self.node = upstream.node
                await self._serve(upstream)
        except UpstreamUnavailable as exc:
            # Opening failed: NoHealthyNode closes 1013, anything else 1011 (SPEC 5).
            self._begin_close(exc.ws_close or INTERNAL, exc.message)
        await self._finish()

    async def _serve(self, upstream: Session) -> None:
        async with trio.open_nursery() as nursery:
            self._work = nursery.cancel_scope
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._pump_pushes, upstream)
            nursery.start_soon(self._watch_shutdown)
            try:
                await self._read_loop(upstream, nursery)
            finally:
                if self.close_code is None:
                    # Cancelled from outside (the drain's deadline passed) or a bug:
                    # no closing handshake, the shielded writer must not linger.
                    self._writer.cancel()

    def _begin_close(self, code: int, reason: str) -> None:
        """Start closing with `code` (the first caller's code wins)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            # The writer flushes what is queued, then sends the close frame.
            self._outbox_closed = True
            self._wake_writer()
            self._writer.deadline = min(self._writer.deadline, trio.current_time() + CLOSE_TIMEOUT)
            if self._work is not None:
                self._work.cancel()
        if code == ABNORMAL:
            self._client_gone = True
            self._writer.cancel()

    async def _finish(self) -> None:
        """Close frame (if the writer could not send it) and the client's reply, bounded."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                if not self._close_sent and not self._writer.cancelled_caught:
                    await self._send_close_frame()
                conn = self._conn
                while self._close_sent and conn.state is ConnectionState.LOCAL_CLOSING:
                    # RFC 6455 7.1.1: wait for the client's close frame before dropping
                    # TCP, so the close frame is not lost to a reset; data is discarded.
                    data = await self._stream.receive_some(_READ_SIZE)
                    if not data:
                        return
                    conn.receive_data(bytes(data))
                    for _ in conn.events():
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._client_gone = True

    async def _send_close_frame(self) -> None:
        code = self.close_code
        if self._client_gone or code is None or code == ABNORMAL:
            return
        if self._conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        data = self._conn.send(CloseConnection(code=code, reason=self.close_reason))
        self._close_sent = True
        await self._stream.send_all(data)

    # ------------------------------------------------------------ writer

    def _enqueue(self, event: Event) -> None:
        if self._outbox_closed:
            return  # the close frame is on its way: nothing may follow it
        if len(self._outbox) >= OUTGOING_QUEUE:
            log.warning(
                "websocket client not reading: closing the session",
                extra={"queued": OUTGOING_QUEUE, "upstream_node": self.node},
            )
            self._begin_close(POLICY, f"client too slow: {OUTGOING_QUEUE} messages unread")
            return
        self._outbox.append(event)
        self._wake_writer()

    def _wake_writer(self) -> None:
        task = self._writer_parked
        if task is not None:
            self._writer_parked = None
            trio.lowlevel.reschedule(task)

    def _unpark_writer(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._writer_parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _write_loop(self) -> None:
        conn = self._conn
        send_all = self._stream.send_all
        counter = self._metrics.websocket_messages.labels("out")
        with self._writer:
            try:
                while self._outbox or not self._outbox_closed:
                    if not self._outbox:
                        self._writer_parked = trio.lowlevel.current_task()
                        await trio.lowlevel.wait_task_rescheduled(self._unpark_writer)
                        continue
                    # Everything queued goes out in one write. In flight at most: this
                    # write and OUTGOING_QUEUE more messages.
                    batch, self._outbox = self._outbox, []
                    data = bytearray()
                    messages = 0
                    for event in batch:
                        # After the client's close frame only our close may be sent.
                        if conn.state is ConnectionState.OPEN:
                            data += conn.send(event)
                            messages += isinstance(event, Message)
                    if data:
                        await send_all(data)
                        self.messages_out += messages
                        counter.inc(messages)
                await self._send_close_frame()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._begin_close(ABNORMAL, "client connection lost")

    # ------------------------------------------------------------ reader

    async def _read_loop(self, upstream: Session, work: trio.Nursery) -> None:
        conn = self._conn
        stream = self._stream
        max_message = self._spec.max_message
        idle_timeout = self._spec.idle_timeout
        counter = self._metrics.websocket_messages.labels("in")
        text_parts: list[str] = []
        byte_parts: list[bytes] = []
        size = 0
        idle_deadline = trio.current_time() + idle_timeout
        while True:
            for event in conn.events():
                if isinstance(event, Message):
                    data = event.data
                    size += (
                        len(data)
                        if isinstance(data, bytes) or data.isascii()
                        else len(data.encode())
                    )
                    if size > max_message:
                        self._begin_close(
                            TOO_BIG, f"message over max_message ({max_message} bytes)"
                        )
                        return
                    if isinstance(data, str):
                        text_parts.append(data)
                    else:
                        byte_parts.append(bytes(data))
                    if not event.message_finished:
                        continue
                    message: str | bytes
                    if isinstance(data, str):
                        message = "".join(text_parts)
                        text_parts.clear()
                    else:
                        message = b"".join(byte_parts)
                        byte_parts.clear()
                    size = 0
                    idle_deadline = trio.current_time() + idle_timeout
                    self.messages_in += 1
                    counter.inc()
                    await self._on_message(message, upstream, work)
                    if self.close_code is not None:
                        return
                elif isinstance(event, Ping):
                    idle_deadline = trio.current_time() + idle_timeout
                    self._enqueue(Pong(payload=event.payload))
                elif isinstance(event, CloseConnection):
                    # The client's close (answered with its code), its vanishing
                    # (1006), or wsproto's verdict on a protocol error (1002, 1007).
                    self._begin_close(event.code, event.reason or "")
                    return
            with trio.move_on_at(idle_deadline) as idle:
                try:
                    received = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    received = b""
            if idle.cancelled_caught:
                self._begin_close(NORMAL, f"idle for {idle_timeout:g} s")
                return
            # wsproto takes None for EOF where the stream gives b"" (STYLE 3).
            conn.receive_data(bytes(received) if received else None)

    async def _on_message(
        self, message: str | bytes, upstream: Session, work: trio.Nursery
    ) -> None:
        if isinstance(message, str):
            if not self._waf_admits(message):
                return
            if self._spec.mode == "binary":
                self._begin_close(POLICY, "binary mode takes binary messages, one TLV frame each")
                return
            try:
                request = ws_json.parse_request(
                    message, self._table, self._spec.upstream, self._context
                )
            except ws_json.MessageRejected as rejected:
                self._enqueue(TextMessage(data=ws_json.render_error(rejected.error, rejected.seq)))
                return
            if not self._rate_admits(request.command, request.seq):
                return
            await self._take_slot()
            work.start_soon(self._json_request, upstream, request)
            return
        if self._spec.mode == "json":
            error = BadRequest("json mode takes text messages (JSON objects)")
            self._enqueue(TextMessage(data=ws_json.render_error(error, None)))
            return
        try:
            frame, command = self._check_frame(message)
        except _InvalidFrame as exc:
            log.info("invalid binary frame from a websocket client", extra={"error": str(exc)})
            self._begin_close(POLICY, f"invalid frame: {exc}")
            return
        if not self._rate_admits(command, frame.seq):
            return
        await self._take_slot()
        work.start_soon(self._binary_request, upstream, frame, command)

    async def _take_slot(self) -> None:
        """Wait for one of the MAX_IN_FLIGHT request slots (the reader stops meanwhile)."""
        while self._in_flight >= MAX_IN_FLIGHT:
            self._slot_freed = trio.Event()
            await self._slot_freed.wait()
        self._in_flight += 1

    def _free_slot(self) -> None:
        self._in_flight -= 1
        if self._slot_freed is not None:
            self._slot_freed.set()

    # ------------------------------------------------------------ policy seams

    def _waf_admits(self, text: str) -> bool:
        """SPEC 4.4: WAF rules see each text message; a deny closes 1008."""
        for found in self._runtime.waf.inspect_message(text):
            self._metrics.waf_blocked.labels(found.rule).inc()
            if found.action == "deny":
                self._begin_close(POLICY, f"message refused by WAF rule {found.rule!r}")
                return False
            log.warning("waf rule matched a websocket message", extra={"rule": found.rule})
        return True

    def _rate_admits(self, command: CommandSpec, seq: int) -> bool:
        """SPEC 4.4: a refused message gets a per-message `rate_limited` error."""
        refusal = self._runtime.limiter.check(command.name, self._context, trio.current_time())
        if refusal is None:
            return True
        self._metrics.rate_limited.labels(refusal.rule).inc()
        self._enqueue(TextMessage(data=ws_json.render_error(refusal.error(), seq)))
        return False

    # ------------------------------------------------------------ requests

    def _timeout(self, command: CommandSpec) -> float:
        if command.timeout is not None:
            return command.timeout
        return self._table.upstreams[self._spec.upstream].timeout

    async def _json_request(self, upstream: Session, request: ws_json.JsonRequest) -> None:
        command = request.command
        try:
            timeout = self._timeout(command)
            with trio.move_on_after(timeout) as scope:
                reply = await upstream.request(command.command, request.body, uid=self._uid or 0)
            if scope.cancelled_caught:
                raise UpstreamTimeout(
                    f"upstream {self._spec.upstream!r} did not answer {command.name!r} "
                    f"within {timeout:g} s"
                )
            text = self._render_reply(command, request.seq, reply)
        except (UpstreamUnavailable, UpstreamProtocolError) as exc:
            # The dedicated connection is lost or broken: the session cannot go on.
            self._begin_close(INTERNAL, exc.message)
            return
        except GatewayError as exc:
            text = ws_json.render_error(exc, request.seq)
        finally:
            self._free_slot()
        self._enqueue(TextMessage(data=text))

    def _render_reply(self, command: CommandSpec, seq: int, reply: Frame) -> str:
        codec = self._table.codecs[command.name]
        try:
            body = codec.decode_response(reply.body) if reply.body or reply.status == 0 else None
        except UpstreamProtocolError as exc:
            if reply.status == 0:
                self._metrics.frames_rejected.labels("undecodable_body").inc()
                return ws_json.render_error(exc, seq)
            body = None  # SPEC 5: a non-zero status carries the body only when it decodes
        return ws_json.render_response(command, seq, reply.status, body)

    def _check_frame(self, data: bytes) -> tuple[Frame, CommandSpec]:
        """The one TLV frame `data` holds, checked (SPEC 5); raises _InvalidFrame."""
        decoder = FrameDecoder(self._table.framing)
        decoder.receive_data(data)
        decoder.receive_data(b"")
        try:
            frame = decoder.next_event()
            if not isinstance(frame, Frame):
                raise _InvalidFrame("an empty message")
            if not isinstance(decoder.next_event(), ConnectionClosed):
                raise _InvalidFrame("more than one frame in one message")
        except FramingError as exc:
            raise _InvalidFrame(str(exc)) from None
        command = self._table.commands_by_number.get(frame.command)
        if command is None:
            raise _InvalidFrame(f"command 0x{frame.command:04x} is not in the table")
        if command.push is not None or command.upstream != self._spec.upstream:
            raise _InvalidFrame(
                f"command {command.name!r} cannot be sent on this session's upstream"
            )
        return frame, command

    async def _binary_request(self, upstream: Session, frame: Frame, command: CommandSpec) -> None:
        # The session's uid, when the table names one, is what the gateway vouches
        # for: a client cannot speak for another user by writing its own uid.
        outgoing = frame if self._uid is None else attrs.evolve(frame, uid=self._uid)
        event: Event
        try:
            timeout = self._timeout(command)
            with trio.move_on_after(timeout) as scope:
                reply = await upstream.send_frame(outgoing)
            if scope.cancelled_caught:
                raise UpstreamTimeout(
                    f"upstream {self._spec.upstream!r} did not answer {command.name!r} "
                    f"within {timeout:g} s"
                )
            event = BytesMessage(
                data=encode_frame(self._table.framing, attrs.evolve(reply, seq=frame.seq))
            )
        except (UpstreamUnavailable, UpstreamProtocolError) as exc:
            self._begin_close(INTERNAL, exc.message)
            return
        except GatewayError as exc:
            # Binary mode has no error frame: per-message errors go back as the
            # json-mode text error, carrying the frame's seq.
            event = TextMessage(data=ws_json.render_error(exc, frame.seq))
        finally:
            self._free_slot()
        self._enqueue(event)

    # ------------------------------------------------------------ pushes, drain

    async def _pump_pushes(self, upstream: Session) -> None:
        layout = self._table.framing
        binary = self._spec.mode == "binary"
        async for frame in upstream.pushes:
            if binary:
                self._enqueue(BytesMessage(data=encode_frame(layout, frame)))
                continue
            text = self._render_push(frame)
            if text is not None:
                self._enqueue(TextMessage(data=text))
        # The connection closes the push channel when it ends (upstream/connection.py).
        self._begin_close(INTERNAL, "upstream connection lost")

    def _render_push(self, frame: Frame) -> str | None:
        command = self._table.commands_by_number.get(frame.command)
        if command is None or command.push is None:
            self._metrics.frames_rejected.labels("unknown_push").inc()
            log.warning("push of a command not in the table", extra={"command": frame.command})
            return None
        try:
            body = self._table.codecs[command.name].decode_response(frame.body)
        except UpstreamProtocolError as exc:
            self._metrics.frames_rejected.labels("undecodable_body").inc()
            log.warning(
                "undecodable push dropped", extra={"command": command.name, "error": exc.message}
            )
            return None
        return ws_json.render_push(command, body)

    async def _watch_shutdown(self) -> None:
        await self._shutdown.wait()
        self._begin_close(GOING_AWAY, "gateway shutting down")
