"""One HTTP connection's answers, written in request order (docs/reference.md
"Keep-alive and pipelining").

Owns: `Answer`, a request's place in its connection's answer order, set once
by the handler from whichever task completes the request (`Submitter`); the
`AnswerOrder` part of a connection: writing the answers ready at the head of
the order with a non-blocking send, so that the connection's task is not woken
for it; the flush task for what the socket does not take; `Connection: close`
on the last answer owed (and while draining); waiting until at most so many
answers are owed; and `ReadyAnswers`, which writes the answers other tasks set
in a scheduler pass after it, all together.
Must not: read or parse requests, or decide when a connection waits or ends
(http_conn.py does).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from tlvproxy.errors import GatewayError
from tlvproxy.passes import PassSignal
from tlvproxy.server.parsers import InvalidResponse

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    from tlvproxy.server.http_types import ErrorHandler, Request, Response, UpgradeHandler
    from tlvproxy.server.parsers import RequestParser

log = logging.getLogger("tlvproxy.http")

# Bytes of answers a client has not read past which its connection stops
# reading (see `_MAX_PIPELINED` in http_conn.py).
MAX_OUT = 1024 * 1024


class AnsweringConnection(Protocol):
    """What answers need of their connection, the `self` of `AnswerOrder`'s
    methods (http_conn.py, which imports this module, checks that its
    connection is one)."""

    _stream: trio.abc.Stream
    _fd: int
    _parser: RequestParser
    _error_handler: ErrorHandler
    _nursery: trio.Nursery | None
    _now: Callable[[], float]
    _order: deque[Answer]
    _out: bytearray
    _flushing: bool
    _in_batch: bool
    _answered_at: float
    _settled: trio.Event | None
    _closing: bool
    _close_after_answers: bool
    _broken: bool
    _closed: bool
    _taken: tuple[Answer, UpgradeHandler] | None
    _ready_answers: ReadyAnswers | None
    _write_queued: bool

    def _is_draining(self) -> bool: ...

    def _cancel(self) -> None: ...

    def _write_ready(self) -> None: ...

    def _send_now(self, data: bytes) -> None: ...

    async def _flush_out(self) -> None: ...

    def _break(self) -> None: ...

    def _notify_settled(self) -> None: ...

    async def _wait_settled(self, owed: int) -> None: ...


class Answer:
    """One request's place in its connection's answer order.

    The handler calls `set` once, from any task; the answer is written as soon
    as every earlier one has been.
    """

    __slots__ = ("_connection", "keep_alive", "method", "response")

    def __init__(self, connection: AnsweringConnection, method: str, keep_alive: bool) -> None:
        self._connection = connection
        self.method = method
        self.keep_alive = keep_alive
        self.response: Response | None = None

    def set(self, response: Response) -> None:
        """The final answer. Never raises: a connection gone meanwhile drops it."""
        self.response = response
        connection = self._connection
        order = connection._order
        if not connection._in_batch and order and order[0] is self:
            # Set outside the connection's batch, by another task: written
            # after this scheduler pass, with the others (within its batch,
            # the connection's own task writes at the batch's end).
            ready = connection._ready_answers
            if ready is None:
                connection._write_ready()
            elif not connection._write_queued:
                ready.add(connection)

    def take_over(self, handler: UpgradeHandler) -> None:
        """Instead of an answer, hand the connection to `handler(request,
        stream, leftover)` once every earlier answer is written (a stream of
        events, or a push session's owner in another worker): called by the
        Submitter from `submit`, it ends HTTP on this connection."""
        self.keep_alive = False
        self._connection._taken = (self, handler)


class ReadyAnswers:
    """The connections whose next answer another task set in this scheduler
    pass (an upstream connection's reader, the REST handler's task, the timer),
    written by `run`'s task after the pass: one worker's, for all its HTTP
    connections.

    Why after the pass: written as each is set, every answer's send (a system
    call) came in between the rendering of one answer and the next, and each
    rendering found its code and tables cold in the CPU caches. Rendered
    together, then written together, the protobuf route takes 54-56 us of CPU
    per request instead of 62-64, and with an upstream answering after 1 ms
    the gateway is busy 98% of the time instead of 87%, and serves 21,000
    requests/s instead of 17,000 (1 worker, wrk -c64, 2-core development box;
    docs/reference.md "Keep-alive and pipelining").
    """

    def __init__(self) -> None:
        self._queued: list[AnsweringConnection] = []
        self._wake = PassSignal()
        # Only while `run`'s task runs: before it starts and after it ends,
        # `add` writes at once.
        self._running = False

    def add(self, connection: AnsweringConnection) -> None:
        """Write `connection`'s ready answers after this pass (at once when
        `run`'s task is not running)."""
        if not self._running:
            connection._write_ready()
            return
        connection._write_queued = True
        queued = self._queued
        queued.append(connection)
        if len(queued) == 1:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the answers each pass queues, after it, until cancelled; then
        those still queued, and later ones at once."""
        self._running = True
        task_status.started()
        try:
            await self._wake.each_pass(self.flush)
        finally:
            self._running = False
            self.flush()

    def flush(self) -> None:
        """Write the ready answers of every queued connection now."""
        while self._queued:
            queued, self._queued = self._queued, []
            for connection in queued:
                connection._write_queued = False
                try:
                    connection._write_ready()
                except Exception:
                    # A bug costs this connection, never the other answers:
                    # nothing more is written to it, and it closes.
                    log.exception("writing an answer failed")
                    connection._break()
                    connection._cancel()


@runtime_checkable
class Submitter(Protocol):
    """A handler that answers later: `submit` returns at once, and the answer's
    `set` is called once, now or from another task. It must not raise."""

    def submit(self, request: Request, answer: Answer) -> None: ...


class AnswerOrder:
    """A connection's answers on their way out; a base of http_conn.py's
    connection, which holds the state."""

    # What these methods set, declared for the type checker: the attributes
    # are the connection's.
    _flushing: bool
    _in_batch: bool
    _answered_at: float
    _settled: trio.Event | None
    _closing: bool
    _broken: bool

    def _write_ready(self: AnsweringConnection) -> None:
        """Write the answers ready at the head of the order, without waiting.

        Called by this task at the end of a batch, and by whichever task sets
        the answer at the head. Never raises: a broken peer marks the
        connection broken, and this task finds out at its next read.
        """
        order = self._order
        if self._closed or not order or order[0].response is None:
            return
        parser = self._parser
        parts: list[bytes] = []
        while order and (answer := order[0]).response is not None:
            order.popleft()
            response = answer.response
            # While draining, the last answer owed closes the connection
            # (docs/operations.md "Drain").
            close = not answer.keep_alive or (
                not order and (self._close_after_answers or self._is_draining())
            )
            try:
                data = parser.send_response(
                    response.status,
                    response.headers,
                    response.body,
                    close=close,
                    method=answer.method,
                    checked=response.checked,
                )
            except InvalidResponse:
                log.exception("handler answered %s invalidly", answer.method)
                internal = self._error_handler(GatewayError("internal error"), None)
                close = True
                data = parser.send_response(
                    internal.status, internal.headers, internal.body, close=True
                )
            parts.append(data)
            if close:
                # Nothing may follow `Connection: close`; the requests after it
                # get no answer, as on any connection that closes.
                order.clear()
                self._closing = True
                if not self._in_batch:
                    self._cancel()  # this task waits for bytes: it closes now
                break
        self._answered_at = self._now()
        self._send_now(parts[0] if len(parts) == 1 else b"".join(parts))

    def _send_now(self: AnsweringConnection, data: bytes) -> None:
        """Send `data` after what is pending, without waiting; what does not
        fit goes to the flush task."""
        if self._broken:
            return
        out = self._out
        if not out and self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._break()
                return
            if sent == len(data):
                self._notify_settled()
                return
            data = data[sent:]
        out += data
        if not self._flushing:
            self._flushing = True
            assert self._nursery is not None  # set before serve() runs
            self._nursery.start_soon(self._flush_out)

    async def _flush_out(self: AnsweringConnection) -> None:
        out = self._out
        try:
            while out:
                if self._fd >= 0:
                    try:
                        sent = os.write(self._fd, out)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._fd)
                        continue
                    del out[:sent]
                else:
                    data = bytes(out)
                    out.clear()
                    await self._stream.send_all(data)
                self._notify_settled()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._break()
        finally:
            self._flushing = False
            self._notify_settled()

    def _break(self: AnsweringConnection) -> None:
        # The peer is gone: nothing more can be written.
        self._broken = True
        self._order.clear()
        self._out.clear()
        self._notify_settled()

    def _notify_settled(self: AnsweringConnection) -> None:
        event = self._settled
        if event is not None:
            self._settled = None
            event.set()
        if self._close_after_answers and not self._order and not self._out:
            self._cancel()

    async def _settle(self: AnsweringConnection, owed: int) -> None:
        """Write what is ready, then wait until at most `owed` answers are owed."""
        self._in_batch = False
        self._write_ready()
        await self._wait_settled(owed)

    async def _wait_settled(self: AnsweringConnection, owed: int) -> None:
        """Wait until at most `owed` answers are pending (and, for 0, every
        byte of them written). Raises BrokenResourceError once the peer is gone."""
        while True:
            if self._broken:
                raise trio.BrokenResourceError("the peer is gone")
            if len(self._order) <= owed and (
                not self._out if owed == 0 else len(self._out) <= MAX_OUT
            ):
                return
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()
