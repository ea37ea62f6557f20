"""One HTTP/1.1 connection: read requests, call the handler, write the answers.

Owns: the connection's life (SPEC 4.3): keep-alive, pipelining (answers in
order, several in one send when they are ready together), `100 Continue`,
the time limits (`header_timeout` for each request's head and body,
`keepalive_timeout` between requests, SPEC 4.2 408; fired by trio deadlines,
or by a `DeadlineTimer` shared by a worker's connections), draining (503 for a new
request, idle connections closed at once, SPEC 7), the handover of an upgraded
connection, and closing the stream whatever happens.
Must not: parse HTTP itself (a `RequestParser` from `parsers.py` does that, h11
or httptools alike), know routes or JSON (`rest.py` does, through `handler`
and `error_handler`), or start tasks: a connection is one task.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from tlvproxy.errors import GatewayError, RequestTimeout, ShuttingDown
from tlvproxy.server.parsers import (
    NEED_DATA,
    InvalidResponse,
    RequestEnd,
    RequestHead,
    comma_tokens,
    new_parser,
    split_target,
)

if TYPE_CHECKING:
    from tlvproxy.config.model import Limits
    from tlvproxy.server.parsers import RequestParser

log = logging.getLogger("tlvproxy.http")

_RECEIVE_SIZE = 65536
# Pipelined answers wait in memory until the next read, or until this many bytes.
_MAX_BATCH = 65536
# After the last answer of a closing connection, what the peer still sends is
# read and dropped for a moment, so that closing with unread bytes does not
# reset the connection and destroy the answer in flight (RFC 9112 9.6).
_LINGER_TIMEOUT = 1.0
_LINGER_MAX = 1024 * 1024
# A read that found its bytes already there yields to the scheduler only once
# in this many in a row (see `_Connection._read_now`).
_FAST_READS = 16
# The timer's heap is rebuilt from its live entries past this size (or four
# times the live entries of the last rebuild).
_PRUNE_MIN = 1024


@attrs.frozen(slots=True, kw_only=True)
class Request:
    """One complete request as the handler sees it."""

    method: str
    target: str  # raw request target, e.g. "/v1/users/7/profile?x=1"
    path: str  # percent-decoded path, without the query
    query_string: str  # raw query, without "?"
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes
    http_version: str  # "1.1" or "1.0"
    remote_addr: str  # the peer's IP address
    received_at: float  # trio.current_time() when the head arrived

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        key = name.lower()
        for header_name, value in self.headers:
            if header_name == key:
                return value
        return None


@attrs.frozen(slots=True)
class Response:
    """A final answer. Content-Length and Connection are the driver's to add."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[GatewayError, Request | None], Response]
UpgradeHandler = Callable[[Request, trio.abc.Stream, bytes], Awaitable[None]]


@attrs.frozen(slots=True, kw_only=True)
class HttpSettings:
    """The limits (SPEC 3 `limits`) and the parser one connection runs with."""

    max_header_bytes: int
    max_request_body: int
    header_timeout: float
    keepalive_timeout: float
    parser: Literal["h11", "httptools"]

    @classmethod
    def from_limits(cls, limits: Limits, parser: Literal["h11", "httptools"]) -> HttpSettings:
        """Settings from the table's `limits` and a resolved parser name."""
        return cls(
            max_header_bytes=limits.max_header_bytes,
            max_request_body=limits.max_request_body,
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            parser=parser,
        )


class DrainSignal:
    """Tells every connection sharing it that the gateway drains (SPEC 7).

    Once `set()`, a new request gets 503 and closes the connection, and idle
    connections close at once: `set()` wakes those waiting for a next request.
    """

    def __init__(self) -> None:
        self._set = False
        self._idle: set[trio.CancelScope] = set()

    def is_set(self) -> bool:
        """True once `set()` was called."""
        return self._set

    def set(self) -> None:
        """Start draining and wake every idle connection so it closes."""
        self._set = True
        for scope in self._idle:
            scope.cancel()


class DeadlineTimer:
    """Fires the time limits of every connection given it, from one task (`run`).

    A connection waiting for bytes registers its deadline here (a heap push)
    rather than on its trio cancel scope, where setting and clearing a deadline
    costs several microseconds per wait; at the deadline the timer cancels the
    connection's scope, as trio would. Entries whose connection has
    moved on are dropped when they reach the top of the heap, and the heap is
    rebuilt from the live entries when stale ones pile up, so it stays about
    as large as the number of waiting connections.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Connection]] = []
        self._order = itertools.count()  # ties: never compare connections
        self._target = math.inf  # when the sleeping `run` wakes up by itself
        self._sleep: trio.CancelScope | None = None
        self._prune_at = _PRUNE_MIN

    def watch(self, connection: _Connection, deadline: float) -> None:
        """Cancel `connection`'s scope at `deadline` unless its wait is over."""
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._order), connection))
        if len(heap) > self._prune_at:
            self._prune()
        if deadline < self._target and self._sleep is not None:
            self._sleep.cancel()  # wake `run` to sleep until this earlier deadline

    async def run(self) -> None:
        """Cancel the connections whose deadline has passed, until cancelled."""
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap:
                deadline, _, connection = heap[0]
                if connection._deadline == deadline:
                    if deadline > now:
                        break
                    connection._scope.cancel()
                heapq.heappop(heap)
            self._target = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=self._target) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            self._target = math.inf

    def _prune(self) -> None:
        live = {
            id(connection): entry
            for entry in self._heap
            if (connection := entry[2])._deadline == entry[0]
        }
        self._heap[:] = live.values()
        heapq.heapify(self._heap)
        self._prune_at = max(_PRUNE_MIN, 4 * len(self._heap))


def _never() -> bool:
    return False


def _as_bytes(data: bytes | bytearray) -> bytes:
    # Socket streams give bytes; other streams (TLS, memory) may give a bytearray.
    return data if type(data) is bytes else bytes(data)


async def serve_http_connection(
    stream: trio.abc.Stream,
    remote_addr: str,
    settings: HttpSettings,
    handler: Handler,
    error_handler: ErrorHandler,
    *,
    upgrade: UpgradeHandler | None = None,
    draining: Callable[[], bool] = _never,
    drain_signal: DrainSignal | None = None,
    timer: DeadlineTimer | None = None,
) -> None:
    """Serve HTTP/1.1 on `stream` until either side closes it; always close it.

    Errors the driver detects become answers through `error_handler` and close
    the connection (SPEC 4.2): BadRequest (malformed), HeadersTooLarge,
    PayloadTooLarge, RequestTimeout, ShuttingDown (a request while `draining()`
    or `drain_signal` is set). An exception from `handler` is logged and
    answered with error_handler(GatewayError("internal error"), request), then
    the connection closes; a GatewayError from `handler` is answered the same
    way but keeps the connection. A GET with `Upgrade: websocket` goes to
    `upgrade(request, stream, leftover)` when given, which owns the stream
    until it returns. `timer`, when given (and running), fires the time
    limits instead of trio deadlines, which is cheaper per request. Returns
    normally; only trio.Cancelled and KeyboardInterrupt get out.
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
        timer,
    )
    try:
        await connection.serve()
    except trio.BrokenResourceError:
        # The peer reset or vanished: there is nobody left to answer.
        log.debug("HTTP connection from %s lost", remote_addr)
    except Exception:
        # The one catch-all (STYLE 4): a bug here must cost one connection, not the worker.
        log.exception("HTTP connection from %s failed", remote_addr)
    finally:
        await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        remote_addr: str,
        settings: HttpSettings,
        handler: Handler,
        error_handler: ErrorHandler,
        upgrade: UpgradeHandler | None,
        draining: Callable[[], bool],
        drain_signal: DrainSignal | None,
        timer: DeadlineTimer | None,
    ) -> None:
        self._stream = stream
        # The socket's descriptor for `_flush`'s fast path; -1 for other streams.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._remote_addr = remote_addr
        self._settings = settings
        self._handler = handler
        self._error_handler = error_handler
        self._upgrade = upgrade
        self._draining = draining
        self._drain_signal = drain_signal
        self._parser: RequestParser = new_parser(
            settings.parser,
            max_header_bytes=settings.max_header_bytes,
            max_body=settings.max_request_body,
        )
        self._out: list[bytes] = []
        self._out_size = 0
        self._head: RequestHead | None = None
        self._received_at = 0.0
        self._fast_reads = 0  # reads in a row that found their bytes without waiting
        # The connection's one cancel scope: armed with a deadline only while it
        # waits for bytes (see `_wait_receive`), cancelled by the drain signal
        # only while idle.
        self._scope = trio.CancelScope()
        self._timer = timer
        self._deadline = math.inf  # when the wait under way must end; read by `timer`
        self._idle = True  # whether that wait is between requests

    def _is_draining(self) -> bool:
        signal = self._drain_signal
        return (signal is not None and signal.is_set()) or self._draining()

    async def serve(self) -> None:
        try:
            with self._scope:
                await self._serve_requests()
            if self._scope.cancelled_caught and not self._idle:
                # A deadline fired while a request was under way (SPEC 4.2 408).
                part = "head" if self._head is None else "body"
                raise RequestTimeout(
                    f"the request {part} did not arrive within {self._settings.header_timeout:g}s"
                )
            # Otherwise: idle too long, or draining: close without a word.
        except GatewayError as error:
            head = self._head
            request = None if head is None else self._request(head, b"")
            await self._answer_and_close(self._error_handler(error, request))

    async def _serve_requests(self) -> None:
        parser = self._parser
        header_timeout = self._settings.header_timeout
        # A new connection's first head must arrive within header_timeout of the
        # accept; later ones within header_timeout of their first byte (SPEC 3).
        idle_deadline = trio.current_time() + header_timeout
        header_deadline: float | None = idle_deadline
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                # Right after an answer, the peer has had no time to send more:
                # waiting at once saves a read bound to fail.
                answered = bool(self._out)
                if answered:
                    await self._flush()
                if self._head is None and not parser.has_partial_request:
                    if self._is_draining():
                        return
                    data = None if answered else await self._read_now()
                    if data is None:
                        data = await self._wait_receive(idle_deadline, idle=True)
                    if header_deadline is None:
                        header_deadline = trio.current_time() + header_timeout
                else:
                    if header_deadline is None:
                        header_deadline = trio.current_time() + header_timeout
                    if self._head is not None and parser.expects_continue:
                        self._out.append(parser.send_continue())
                        await self._flush()
                        answered = True
                    data = None if answered else await self._read_now()
                    if data is None:
                        data = await self._wait_receive(header_deadline, idle=False)
                parser.receive_data(data)
            elif type(event) is RequestHead:
                self._head = event
                self._received_at = trio.current_time()
                if self._is_draining():
                    raise ShuttingDown("the gateway is shutting down; retry on a new connection")
            elif type(event) is RequestEnd:
                head = self._head
                assert head is not None  # the parser yields a head before its end
                self._head = None
                request = self._request(head, event.body)
                if head.upgrade:
                    if self._wants_upgrade(head):
                        await self._hand_over(request)
                        return
                    # A switch we do not take leaves the parser past the end of
                    # HTTP on this connection: answer, then close (SPEC 4.3).
                    keep_alive = False
                else:
                    keep_alive = head.keep_alive
                if not await self._answer(request, keep_alive):
                    return
                header_deadline = None
                idle_deadline = trio.current_time() + self._settings.keepalive_timeout
            else:
                return  # the peer closed between requests

    async def _answer(self, request: Request, keep_alive: bool) -> bool:
        """Call the handler and queue its answer; False when the connection closed."""
        try:
            response = await self._handler(request)
        except GatewayError as error:
            response = self._error_handler(error, request)
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.target)
            await self._answer_and_close(self._internal_error(request))
            return False
        close = not keep_alive or self._is_draining()
        try:
            data = self._parser.send_response(
                response.status, response.headers, response.body, close=close
            )
        except InvalidResponse:
            log.exception("handler answered %s %s invalidly", request.method, request.target)
            await self._answer_and_close(self._internal_error(request))
            return False
        if close:
            self._out.append(data)
            await self._close_gracefully()
            return False
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size > _MAX_BATCH:
            await self._flush()
        return True

    def _internal_error(self, request: Request) -> Response:
        return self._error_handler(GatewayError("internal error"), request)

    async def _answer_and_close(self, response: Response) -> None:
        self._out.append(
            self._parser.send_response(response.status, response.headers, response.body, close=True)
        )
        await self._close_gracefully()

    def _wants_upgrade(self, head: RequestHead) -> bool:
        return (
            self._upgrade is not None
            and head.method == "GET"
            and "websocket" in comma_tokens(head.headers, "upgrade")
        )

    async def _hand_over(self, request: Request) -> None:
        assert self._upgrade is not None  # checked by _wants_upgrade
        if self._out:
            await self._flush()
        await self._upgrade(request, self._stream, self._parser.trailing_data())

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

    async def _read_now(self) -> bytes | None:
        """The bytes already received on the socket, without waiting; None when
        there are none yet (or the stream is not a socket): the caller then
        waits for them under its deadline (`_wait_receive`).

        Why this is safe: it is `SocketStream.receive_some`'s own sequence (a
        cancellation check, a non-blocking read, and on data a shielded yield)
        except that the yield after a successful read is taken only once every
        `_FAST_READS` reads in a row. The connection's next step usually yields
        anyway (the handler's upstream round trip, or a receive that waits), and
        the periodic yield keeps the worker fair to others when a peer's bytes
        are always there (pipelined requests answered without an upstream call).
        Deadlines behave as before: trio's receive also returns bytes already
        there without looking at a deadline; only waiting is bounded by it.
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

    async def _wait_receive(self, deadline: float, *, idle: bool) -> bytes:
        """The next bytes, waited for until `deadline`; past it (or once draining,
        when `idle`) the connection's scope is cancelled and `serve` decides: a
        408 when a request was under way, a silent close when idle.

        One scope for the connection's life, armed around each wait, instead of
        a new cancel scope per wait: entering and leaving a trio cancel scope
        costs about as much as parsing a request.
        """
        scope = self._scope
        self._idle = idle
        signal = self._drain_signal if idle else None
        if signal is not None:
            signal._idle.add(scope)
        self._arm(deadline)
        try:
            data = await self._receive_some()
        finally:
            self._disarm()
            if signal is not None:
                signal._idle.discard(scope)
        if scope.cancel_called:
            # The deadline or the drain signal fired as the bytes came in: they
            # are too late, and the handler must not run in a cancelled scope.
            await trio.lowlevel.checkpoint()
        return data

    def _arm(self, deadline: float) -> None:
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._scope.deadline = deadline
        else:
            timer.watch(self, deadline)

    def _disarm(self) -> None:
        self._deadline = math.inf
        if self._timer is None:
            self._scope.deadline = math.inf

    async def _receive_some(self) -> bytes:
        # A socket is waited on first: `_read_now` found nothing, or an answer
        # just went out and the peer had no time to send more, so trying the
        # read first, as `receive_some` does, is a system call bound to fail.
        fd = self._fd
        if fd < 0:
            return _as_bytes(await self._stream.receive_some(_RECEIVE_SIZE))
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, _RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    async def _flush(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        fd = self._fd
        if fd >= 0:
            # Fast path: the answer usually fits the socket buffer, so write it
            # now. SocketStream.send_all would also yield to the scheduler after
            # the write; that checkpoint is not needed here, because the
            # connection's next step (a receive, or the handler's upstream
            # round trip) is one. What did not fit goes through send_all.
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        await self._stream.send_all(data)

    async def _close_gracefully(self) -> None:
        """Send what is queued, half-close, and drop what the peer still sends."""
        await self._flush()
        stream = self._stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(_LINGER_TIMEOUT):
            dropped = 0
            while dropped < _LINGER_MAX:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                dropped += len(data)
