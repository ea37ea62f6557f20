"""One HTTP/1.1 connection: read requests, submit them, write the answers in order.

Owns: the connection's life (docs/reference.md "Keep-alive and pipelining"):
keep-alive, pipelining (how many answers a connection may owe while it reads
on; the answers are written in request order, as soon as the one at the head
is ready, by its base `AnswerOrder`, http_answers.py), `100 Continue`, the
time limits (`header_timeout` for each request's head and body,
`keepalive_timeout` between requests, 408: docs/reference.md "Errors"; fired
by a `DeadlineTimer` shared by a worker's connections, through its base
`Waits`, http_waits.py), draining (503 for a new request, idle connections
closed at once, docs/operations.md "Drain"), running the handler a connection
is handed over to once its HTTP state is gone (its base `HandOver`,
http_handover.py, decides when), and closing the stream whatever happens.
Must not: parse HTTP itself (a `RequestParser` from `parsers.py` does that, h11
or httptools alike), or know routes or JSON (`rest.py` does, through `handler`
and `error_handler`). The values it shares with its callers and handlers
(`Request`, `Response`, `HttpSettings`, the handler types) are http_types.py's;
this module hands them on, so that its callers import the driver from one place.

Requests are state, not tasks (docs/reference.md "How a request flows"): the
connection reads, parses and hands each request to the handler with its
`Answer`, its place in the answer order. While it waits for its next request
its task is parked in the worker's `ReadHub` (read_hub.py), whose task
calls `on_readable` when bytes come: most requests are read, parsed and
submitted there, and the connection's task is woken only for what must wait
in it. A `Submitter` (the REST handler) sets the answer later, from
whichever task completes it (the upstream connection's reader, or its
timer): that task writes the answers now ready at the head of the order with
a non-blocking send, never waking this one for the answer. Only a send that
would block is left to a flush task started for it. An async `Handler` (the
admin API) is simply awaited.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import TYPE_CHECKING

import outcome
import trio

from tlvproxy.errors import GatewayError, RequestTimeout, ShuttingDown
from tlvproxy.server.http_answers import MAX_OUT, Answer, AnswerOrder, Submitter
from tlvproxy.server.http_handover import HandOver
from tlvproxy.server.http_types import (
    ErrorHandler,
    Handler,
    HttpSettings,
    Request,
    Response,
    UpgradeHandler,
)
from tlvproxy.server.http_waits import DrainSignal, Waits
from tlvproxy.server.parser_choice import new_parser
from tlvproxy.server.parsers import (
    NEED_DATA,
    Closed,
    NeedData,
    RequestEnd,
    RequestHead,
    split_target,
)
from tlvproxy.server.read_hub import Closes
from tlvproxy.timer import DeadlineTimer

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.server.http_answers import AnsweringConnection, ReadyAnswers
    from tlvproxy.server.http_handover import HandingOverConnection
    from tlvproxy.server.http_waits import WaitingConnection
    from tlvproxy.server.parsers import RequestParser
    from tlvproxy.server.read_hub import ReadHub

log = logging.getLogger("tlvproxy.http")

_RECEIVE_SIZE = 65536
# Answers a connection may owe at once: past this many pipelined requests it
# stops reading until some are answered (and the bytes a client does not read
# stop it past MAX_OUT), so a client cannot make it hold unbounded work.
_MAX_PIPELINED = 32
# After the last answer of a closing connection, what the peer still sends is
# read and dropped for a moment, so that closing with unread bytes does not
# reset the connection and destroy the answer in flight (RFC 9112 9.6).
_LINGER_TIMEOUT = 1.0
_LINGER_MAX = 1024 * 1024
# A read that found its bytes already there yields to the scheduler only once
# in this many in a row (see `_Connection._read_now`).
_FAST_READS = 16

__all__ = [
    "Answer",
    "DeadlineTimer",
    "DrainSignal",
    "ErrorHandler",
    "Handler",
    "HttpSettings",
    "Request",
    "Response",
    "Submitter",
    "UpgradeHandler",
    "serve_http_connection",
]


def _never() -> bool:
    return False


def _as_bytes(data: bytes | bytearray) -> bytes:
    # Socket streams give bytes; other streams (TLS, memory) may give a bytearray.
    return data if type(data) is bytes else bytes(data)


async def serve_http_connection(
    stream: trio.abc.Stream,
    remote_addr: str,
    settings: HttpSettings,
    handler: Handler | Submitter,
    error_handler: ErrorHandler,
    *,
    upgrade: UpgradeHandler | None = None,
    draining: Callable[[], bool] = _never,
    drain_signal: DrainSignal | None = None,
    timer: DeadlineTimer | None = None,
    ready_answers: ReadyAnswers | None = None,
    read_hub: ReadHub | None = None,
    received: bytes = b"",
) -> None:
    """Serve HTTP/1.1 on `stream` until either side closes it; always close it.

    Errors the driver detects become answers through `error_handler` and close
    the connection (docs/reference.md "Errors"): BadRequest (malformed), HeadersTooLarge,
    PayloadTooLarge, RequestTimeout, ShuttingDown (a request while `draining()`
    or `drain_signal` is set). An exception from an async `handler` is logged
    and answered with error_handler(GatewayError("internal error"), request),
    then the connection closes; a GatewayError from it is answered the same
    way but keeps the connection. A GET with `Upgrade: websocket` goes to
    `upgrade(request, stream, leftover)` when given, once every earlier answer
    is written; it owns the stream until it returns, and so does the handler
    a Submitter gives `Answer.take_over`. The time limits fire from
    `timer` (a running `DeadlineTimer`), or from a timer of the connection's
    own. Answers that other tasks set are written after their scheduler pass
    by `ready_answers` (a running `ReadyAnswers`), or at once without it.
    The waits for a next request are `read_hub`'s (a running `ReadHub`) on
    a plain socket, or the connection task's own without it.
    `received`: bytes of the connection read before (by another worker,
    which handed it over), parsed first. Returns normally; only
    trio.Cancelled and KeyboardInterrupt get out.
    """
    connection = _Connection(
        stream,
        remote_addr,
        settings,
        handler,
        error_handler,
        upgrade,
        draining,
        drain_signal,
    )
    connection._ready_answers = ready_answers
    connection._read_hub = read_hub
    if received:
        connection._parser.receive_data(received)
    if drain_signal is not None:
        drain_signal._connections.add(connection)
    try:
        try:
            async with trio.open_nursery() as nursery:
                connection._nursery = nursery
                if timer is None:
                    timer = DeadlineTimer()
                    await nursery.start(timer.run)
                connection._timer = timer
                try:
                    await connection.serve()
                except trio.BrokenResourceError:
                    # The peer reset or vanished: there is nobody left to answer.
                    log.debug("HTTP connection from %s lost", remote_addr)
                except Exception:
                    # The one catch-all: a bug here must cost one
                    # connection, not the worker.
                    log.exception("HTTP connection from %s failed", remote_addr)
                finally:
                    # The flush task and the connection's own timer end with it.
                    nursery.cancel_scope.cancel()
        finally:
            connection._closed = True
            if drain_signal is not None:
                drain_signal._connections.discard(connection)
            if read_hub is not None:
                read_hub.remove(connection._fd, connection)
        handover = connection._handover
        # An upgraded session keeps none of the HTTP state (an idle WebSocket
        # is light): the connection, its parser and its nursery go now.
        del connection, nursery
        if handover is not None:
            takes_over, request, leftover = handover
            try:
                await takes_over(request, stream, leftover)
            except Exception:
                log.exception("upgraded connection from %s failed", remote_addr)
    finally:
        await trio.aclose_forcefully(stream)


class _Connection(AnswerOrder, Waits, HandOver):
    def __init__(
        self,
        stream: trio.abc.Stream,
        remote_addr: str,
        settings: HttpSettings,
        handler: Handler | Submitter,
        error_handler: ErrorHandler,
        upgrade: UpgradeHandler | None,
        draining: Callable[[], bool],
        drain_signal: DrainSignal | None,
    ) -> None:
        self._stream = stream
        # The socket's descriptor for the non-blocking reads and writes; -1 for
        # other streams, which go through their own receive_some and send_all.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._remote_addr = remote_addr
        self._settings = settings
        if isinstance(handler, Submitter):
            self._submit: Callable[[Request, Answer], None] | None = handler.submit
            self._handler: Handler | None = None
        else:
            self._submit, self._handler = None, handler
        self._error_handler = error_handler
        self._upgrade = upgrade
        self._draining = None if draining is _never else draining
        self._drain_signal = drain_signal
        self._parser: RequestParser = new_parser(
            settings.parser,
            max_header_bytes=settings.max_header_bytes,
            max_body=settings.max_request_body,
        )
        self._pipelining = self._parser.can_pipeline
        self._head: RequestHead | None = None
        self._received_at = 0.0
        self._fast_reads = 0  # reads in a row that found their bytes without waiting
        self._nursery: trio.Nursery | None = None
        self._timer: DeadlineTimer | None = None
        # The answer order, and the bytes a blocked send left (a flush task
        # writes them; `_flushing` while it runs).
        self._order: deque[Answer] = deque()
        self._out = bytearray()
        self._flushing = False
        # Writes the answers other tasks set, after their pass (None: at once).
        self._ready_answers: ReadyAnswers | None = None
        self._write_queued = False  # in `_ready_answers`' queue
        # Waits for the next request, with one task for all connections (None:
        # this task waits itself).
        self._read_hub: ReadHub | None = None
        self.parked: trio.lowlevel.Task | None = None  # this task, parked in the hub
        self.missed = False  # the hub saw bytes come while this task was not parked
        # The deadline of the next request's head: None until its first byte.
        self._header_deadline: float | None = None
        # The deadline of the wait for the next request (see `_ended`).
        self._idle_deadline = math.inf
        self._in_batch = False  # this task is handling a batch: it writes at its end
        self._answered_at = -math.inf  # when the last answer was written
        self._settled: trio.Event | None = None  # set when the order or `_out` shrinks
        self._closing = False  # an answer with `Connection: close` went out
        self._close_after_answers = False  # draining: close once the order is empty
        self._broken = False  # a write failed: the peer is gone
        self._closed = False  # the stream is closed: late answers are dropped
        # What the connection is handed to once HTTP ends on it: the upgrade
        # handler (or a Submitter's, `Answer.take_over`), the request and the
        # bytes past it.
        self._handover: tuple[UpgradeHandler, Request, bytes] | None = None
        # The answer a Submitter gave `Answer.take_over`, and its handler.
        self._taken: tuple[Answer, UpgradeHandler] | None = None
        # The connection's one cancel scope: armed with a deadline only while it
        # waits for bytes (see `_serve_requests`), cancelled by the drain signal
        # only while idle.
        self._scope = trio.CancelScope()
        self._cancelled = False  # `_scope` was cancelled (cheaper to read than cancel_called)
        # The clock's own method: trio.current_time() is three calls deep.
        self._now = trio.lowlevel.current_clock().current_time
        # The deadline of the wait under way (inf: none), and the deadline of
        # this connection's entry in the timer (read by the timer; inf: none).
        # A later deadline does not push a new entry: the timer fires at the
        # old one and `expire` moves it on, so most waits cost no heap push.
        self._wanted = math.inf
        self.timer_deadline = math.inf
        self._idle = True  # whether that wait is between requests

    async def serve(self) -> None:
        try:
            graceful = False
            with self._scope:
                graceful = await self._serve_requests()
            if graceful or self._closing:
                # The last request asked to close, or an answer closed the
                # connection while this task waited for bytes.
                await self._close_gracefully()
            elif self._scope.cancelled_caught and not self._idle:
                # A deadline fired while a request was under way (408, docs/reference.md "Errors").
                part = "head" if self._head is None else "body"
                raise RequestTimeout(
                    f"the request {part} did not arrive within {self._settings.header_timeout:g}s"
                )
            # Otherwise: idle too long, or draining: close without a word.
        except GatewayError as error:
            head = self._head
            request = None if head is None else self._request(head, b"")
            await self._answer_and_close(self._error_handler(error, request))

    async def _serve_requests(self) -> bool:
        """Serve requests until the connection ends; True to close it gracefully."""
        parser = self._parser
        header_timeout = self._settings.header_timeout
        now = self._now
        signal = self._drain_signal
        draining = self._draining
        fd = self._fd
        stream = self._stream
        wait_readable = trio.lowlevel.wait_readable
        # A new connection's first head must arrive within header_timeout of the
        # accept; later ones within header_timeout of their first byte
        # (docs/configuration.md "limits"). Attributes, not locals: the read
        # hub's `on_readable` handles requests too.
        self._first_deadline(now() + header_timeout)
        # The read hub waits for a plain socket's next request when the parser
        # pipelines: with h11, which answers each request before it parses
        # the next, every request would wake this task anyway.
        hub = self._read_hub if fd >= 0 and self._pipelining else None
        if hub is not None and hub.running:
            try:
                hub.add(fd, self)
            except OSError:
                # The kernel refused the watch (its limit on them): this task
                # waits on its own.
                log.debug("HTTP connection from %s waits on its own", self._remote_addr)
        # An event the read hub took from the parser for this task to handle.
        pending: RequestHead | RequestEnd | Closed | Closes | None = None
        event: NeedData | RequestHead | RequestEnd | Closed | Closes
        while True:
            self._in_batch = True
            if pending is None:
                event = parser.next_event()
            else:
                event, pending = pending, None
            if event is NEED_DATA:
                self._in_batch = False
                # Right after an answer, the peer has had no time to send more:
                # waiting at once saves a read bound to fail.
                answered = self._answered
                if answered:
                    self._answered = False
                    self._write_ready()
                if self._closing:
                    return True
                idle = self._head is None and not parser.has_partial_request
                if idle:
                    if self._is_draining():
                        await self._settle(0)
                        return False
                    deadline = self._idle_deadline
                else:
                    if self._header_deadline is None:
                        # The request began with the bytes read last; the rest
                        # must follow within header_timeout.
                        self._header_deadline = now() + header_timeout
                    deadline = self._header_deadline
                    if self._head is not None and parser.expects_continue:
                        # After every earlier answer, as the order demands.
                        await self._settle(0)
                        self._send_now(parser.send_continue())
                        answered = True
                if self.missed:
                    # The read hub saw bytes come while this task was busy, or
                    # woke it: read until none are left (an edge-triggered
                    # readiness is reported once, the end of the stream too).
                    answered = False
                data = None if answered else await self._read_now()
                if data is None:
                    self.missed = False
                    # Wait for bytes until `deadline`; past it (or once
                    # draining, when idle) the timer cancels the connection's
                    # scope and `serve` decides: a 408 when a request was under
                    # way, a silent close when idle. One scope for the
                    # connection's life, armed by the timer around each wait:
                    # entering a trio cancel scope costs about as much as
                    # parsing a request. Written out here rather than in a
                    # method: every level of await is paid again on each
                    # wake-up.
                    self._idle = idle
                    self._arm(deadline)
                    try:
                        if fd < 0:
                            data = _as_bytes(await stream.receive_some(_RECEIVE_SIZE))
                        elif idle and hub is not None and hub.watches(fd, self):
                            # Parked until the hub's task has something for
                            # this one: most requests it handles itself.
                            woken = await hub.park(self)
                            if isinstance(woken, bytes):
                                data = woken
                            else:
                                pending = woken
                        else:
                            # Waited on first: `_read_now` found nothing, or an
                            # answer just went out and the peer had no time to
                            # send more, so a read first would mostly fail.
                            while True:
                                await wait_readable(fd)
                                try:
                                    data = os.read(fd, _RECEIVE_SIZE)
                                    break
                                except BlockingIOError:
                                    continue
                                except OSError as exc:
                                    raise trio.BrokenResourceError(
                                        f"receive failed: {exc}"
                                    ) from exc
                    finally:
                        self._wanted = math.inf
                    if self._cancelled:
                        # The deadline or the drain signal fired as the bytes
                        # came in: they are too late, and the handler must not
                        # run in a cancelled scope.
                        await trio.lowlevel.checkpoint()
                if data is not None:
                    parser.receive_data(data)
            elif type(event) is RequestHead:
                self._head = event
                self._received_at = now()
                if (signal is not None and signal._set) or (draining is not None and draining()):
                    raise ShuttingDown("the gateway is shutting down; retry on a new connection")
            elif type(event) is RequestEnd:
                head = self._head
                assert head is not None  # the parser yields a head before its end
                self._head = None
                request = self._request(head, event.body)
                if head.upgrade:
                    if self._wants_upgrade(head):
                        await self._hand_over(request)
                        return False
                    # A switch we do not take leaves the parser past the end of
                    # HTTP on this connection: answer, then close (docs/reference.md "Limits").
                    keep_alive = False
                else:
                    keep_alive = head.keep_alive
                if self._submit is not None:
                    if not self._submit_request(request, keep_alive):
                        return await self._closes(request)
                elif not await self._answer(request, keep_alive):
                    return True
                if (
                    len(self._order) >= _MAX_PIPELINED
                    or len(self._out) > MAX_OUT
                    or not self._pipelining
                ):
                    # h11 parses the next request only once this one is
                    # answered; httptools up to _MAX_PIPELINED answers ahead,
                    # and not while a client that does not read holds more
                    # than MAX_OUT of answers unsent.
                    await self._settle(_MAX_PIPELINED - 1 if self._pipelining else 0)
                    if self._closing:
                        return True
                self._ended(self._received_at)
            elif type(event) is Closes:
                return await self._closes(event.request)
            else:
                # The peer closed (or shut down its sending side) between
                # requests: the answers still owed are written first (a
                # pipelining parser reads the end before they are ready).
                return bool(self._order or self._out)

    def _first_deadline(self, deadline: float) -> None:
        # The first request's head must come by `deadline`.
        self._header_deadline = self._idle_deadline = deadline

    def _ended(self, received_at: float) -> None:
        # A request received at `received_at` was submitted: the next one's
        # head has header_timeout from its first byte, and the wait for it an
        # early deadline, which `expire` moves to keepalive_timeout after the
        # last answer.
        self._header_deadline = None
        self._idle_deadline = received_at + self._settings.keepalive_timeout

    async def _closes(self, request: Request) -> bool:
        # The answer to `request` closes the connection: hand it over when
        # the Submitter took it over (`Answer.take_over`); else True.
        if self._taken is not None:
            await self._hand_over_taken(request)
            return False
        return True

    def on_readable(self, ended: bool) -> None:
        """The read hub's call: bytes came while this connection's task is
        parked, waiting for its next request (`ended`: the stream ended after
        them). Read them and handle the requests they complete as
        `_serve_requests` would, without waking the task; wake it
        (`ReadHub.wake`) with what it must await itself: the end of the
        stream, a request under way (its header_timeout), an upgrade, a
        request that closes the connection or must wait for earlier answers,
        the drain. An exception (a malformed request) is the hub's to hand
        the task, which raises it."""
        try:
            data = os.read(self._fd, _RECEIVE_SIZE)
        except BlockingIOError:
            return  # the bytes of an earlier readiness, read already
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        hub = self._read_hub
        assert hub is not None  # only its hub calls this
        if ended or not data or len(data) == _RECEIVE_SIZE:
            # The end of the stream, or maybe more bytes behind these, which
            # would get no readiness of their own: the task's to read.
            hub.wake(self, outcome.Value(data))
            return
        parser = self._parser
        parser.receive_data(data)
        self._in_batch = True
        try:
            while True:
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is RequestHead:
                    if self._is_draining():
                        hub.wake(self, outcome.Value(event))  # a 503 and a close
                        return
                    self._head = event
                    self._received_at = self._now()
                elif type(event) is RequestEnd:
                    head = self._head
                    assert head is not None  # the parser yields a head before its end
                    if (
                        head.upgrade
                        or not head.keep_alive
                        or self._submit is None
                        or len(self._order) + 1 >= _MAX_PIPELINED
                        or len(self._out) > MAX_OUT
                    ):
                        hub.wake(self, outcome.Value(event))
                        return
                    self._head = None
                    request = self._request(head, event.body)
                    if not self._submit_request(request, True):
                        hub.wake(self, outcome.Value(Closes(request)))
                        return
                    self._ended(self._received_at)
                else:
                    hub.wake(self, outcome.Value(event))
                    return
        finally:
            self._in_batch = False
        if self._answered:
            self._answered = False
            self._write_ready()
        if self.parked is None:
            return  # an answer closed the connection: its task was cancelled
        if self._head is not None or parser.has_partial_request or self._is_draining():
            hub.wake(self, outcome.Value(None))

    _answered = False  # an answer was queued since the last write (see `_answer`)

    def _submit_request(self, request: Request, keep_alive: bool) -> bool:
        """Give `request` to the Submitter with its place in the answer order;
        False when the connection must close after this answer."""
        answer = Answer(self, request.method, keep_alive)
        self._order.append(answer)
        self._answered = True
        assert self._submit is not None  # the caller checked
        try:
            self._submit(request, answer)
        except Exception:
            # The path, not the target: a query may hold a token (docs/security.md).
            log.exception("handler failed on %s %s", request.method, request.path)
            self._taken = None
            answer.keep_alive = False
            answer.set(self._internal_error(request))
        return answer.keep_alive

    async def _answer(self, request: Request, keep_alive: bool) -> bool:
        """Await the async handler's answer to `request`, in its place in the
        answer order; False when the connection must close after it."""
        answer = Answer(self, request.method, keep_alive)
        self._order.append(answer)
        self._answered = True
        assert self._handler is not None  # one of the two is set
        try:
            response = await self._handler(request)
        except GatewayError as error:
            response = self._error_handler(error, request)
        except Exception:
            # The path, not the target: a query may hold a token (docs/security.md).
            log.exception("handler failed on %s %s", request.method, request.path)
            answer.keep_alive = False
            response = self._internal_error(request)
        answer.set(response)
        return answer.keep_alive

    def _internal_error(self, request: Request) -> Response:
        return self._error_handler(GatewayError("internal error"), request)

    async def _answer_and_close(self, response: Response) -> None:
        await self._settle(0)
        if self._closing:
            return  # an answer already closed the connection: nothing may follow
        self._send_now(
            self._parser.send_response(response.status, response.headers, response.body, close=True)
        )
        await self._close_gracefully()

    def _request(self, head: RequestHead, body: bytes) -> Request:
        path, query = split_target(head.target)
        return Request(
            method=head.method,
            target=head.target,
            path=path,
            query_string=query,
            headers=head.headers,
            body=body,
            http_version=head.http_version,
            remote_addr=self._remote_addr,
            received_at=self._received_at,
        )

    # ------------------------------------------------------------ reading

    async def _read_now(self) -> bytes | None:
        """The bytes already received on the socket, without waiting; None when
        there are none yet (or the stream is not a socket): the caller then
        waits for them under its deadline.

        Why this is safe: it is `SocketStream.receive_some`'s own sequence (a
        cancellation check, a non-blocking read, and on data a shielded yield)
        except that the yield after a successful read is taken only once every
        `_FAST_READS` reads in a row. The connection's next step usually yields
        anyway (a receive that waits), and the periodic yield keeps the worker
        fair to others when a peer's bytes are always there (pipelined
        requests). Deadlines behave as before: trio's receive also returns
        bytes already there without looking at a deadline; only waiting is
        bounded by it.
        """
        fd = self._fd
        if fd < 0:
            return None
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(fd, _RECEIVE_SIZE)
        except BlockingIOError:
            self._fast_reads = 0
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        self._fast_reads += 1
        if self._fast_reads >= _FAST_READS:
            self._fast_reads = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def _close_gracefully(self) -> None:
        """Send what is queued, half-close, and drop what the peer still sends."""
        await self._settle(0)
        self._closing = True
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            # TLS has no half-close. Over HTTPS the end of the connection is
            # the TCP one, without close_notify (as `https_compatible` reads
            # it too): the answers carry their lengths. What the peer still
            # sends is dropped unread, encrypted.
            stream = stream.transport_stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(_LINGER_TIMEOUT):
            dropped = 0
            while dropped < _LINGER_MAX:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                dropped += len(data)


if TYPE_CHECKING:

    def _parts_fit(
        connection: _Connection,
    ) -> tuple[AnsweringConnection, WaitingConnection, HandingOverConnection]:
        """The connection is what each of its parts needs: mypy compares a
        part's Protocol with the connection only where the part's methods are
        called on a connection, and some are called only by other parts."""
        return connection, connection, connection
