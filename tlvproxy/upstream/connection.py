"""One multiplexed TLV connection to an upstream node (SPEC 1).

Owns: a trio stream to one node, its reader task (frames decoded with
`FrameDecoder`, each response handed to the request waiting on its seq), its
writer task (requests queued by any number of tasks, coalesced into one
`send_all`), seq allocation, the in-flight cap, and push delivery.
Must not: choose nodes, count health, retry, or set deadlines: the pool does the
first three and the caller owns time (STYLE 5). `request` waits until the answer
comes or the caller's cancel scope fires; the seq entry is removed either way.

Matching (SPEC 1): a frame with the push flag is a push. Any other frame is the
response to the request in flight with its seq; without a `flags` field, a frame
whose seq is not in flight is a push. A response nobody waits for (it came after
its request timed out, or never had one) is counted in
`tlvproxy_frames_rejected_total{reason="unknown_seq"}` and dropped. A push on a
connection without a push channel (a pooled REST connection) is counted as
`reason="unexpected_push"` and dropped.

When the connection breaks (EOF, reset, a FramingError), every waiter fails at
once: `SendFailed` if its bytes never reached the socket, `ConnectionLost` if they
may have, and the connection is finished for good (`closed` is set, `error` says
why). A FramingError's `reason` is counted in `tlvproxy_frames_rejected_total`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

import attrs
import outcome
import trio

from tlvproxy.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from tlvproxy.framing import (
    FLAG_PUSH,
    NEED_DATA,
    ConnectionClosed,
    Frame,
    FrameDecoder,
    FramingError,
    HeaderLayout,
    RequestEncoder,
    encode_frame,
)

if TYPE_CHECKING:
    from tlvproxy.metrics import Metrics

RECEIVE_SIZE: Final = 65536


class SendFailed(UpstreamUnavailable):
    """The request never left the gateway (no connection, connection already
    broken, in-flight cap reached): retrying it elsewhere is always safe (SPEC 4.5)."""


class ConnectionLost(UpstreamUnavailable):
    """The connection broke after the request was written: it may have been executed."""


class _Slot:
    """A one-shot slot for the task waiting on one seq."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task

    def abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # Cancelled: the reader must no longer reschedule this task.
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Connection:
    """A multiplexed connection to the node `node` ("host:port") over `stream`.

    `run()` must be running (in a nursery) for requests to be answered. `pushes`, if
    given, receives upstream-initiated frames and is closed when the connection ends
    (its receiver then gets EndOfChannel); the connection owns it. At most
    `max_in_flight` requests wait at once (capped by the seq space of the layout).
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        layout: HeaderLayout,
        metrics: Metrics,
        *,
        node: str,
        max_in_flight: int,
        pushes: trio.MemorySendChannel[Frame] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.node = node
        self.stream = stream
        self.layout = layout
        self._metrics = metrics
        self._encoder = RequestEncoder(layout)
        self._seq_max = layout.field_max("seq")
        self._seq = 0
        self._has_flags = layout.has("flags")
        # A seq in flight is never reused, so the seq space bounds the waiters too.
        self.max_in_flight = min(max_in_flight, self._seq_max + 1)
        self._waiters: dict[int, _Slot] = {}
        self._outbox: list[bytes] = []
        self._outbox_seqs: list[int] = []
        self._writer_idle = False
        self._wake = trio.Event()
        self._pushes = pushes
        self._cancel_scope: trio.CancelScope | None = None
        self.last_received = trio.current_time()
        self.closed = trio.Event()
        self.error: GatewayError | None = None
        self.broken = False  # the node broke it (not a local close or an idle EOF)

    @property
    def in_flight(self) -> int:
        """Requests waiting for their response on this connection."""
        return len(self._waiters)

    @property
    def usable(self) -> bool:
        """Whether a new request may be queued now (open and under the in-flight cap)."""
        return self.error is None and len(self._waiters) < self.max_in_flight

    # ------------------------------------------------------------ requests

    async def request(self, command: int, body: bytes, uid: int = 0) -> Frame:
        """Send one request frame and return its response frame.

        Raises SendFailed (never written), ConnectionLost (lost before the response),
        UpstreamProtocolError (the upstream sent a malformed frame), PayloadTooLarge
        (body over the layout's max_body) or BadRequest (a header value that does not
        fit the layout, such as a uid too large). Cancellation leaves no waiter behind.
        """
        if self.error is not None or len(self._waiters) >= self.max_in_flight:
            self._check_open()
        seq = self._allocate_seq()
        try:
            wire = self._encoder.encode(command, seq, uid, body)
        except ValueError as exc:
            raise self._encode_error(body, exc) from None
        return await self._roundtrip(seq, wire)

    async def send_frame(self, frame: Frame) -> Frame:
        """Send `frame` as it is but with a fresh seq; return the response frame (whose
        seq is the one sent: the caller restores its own). Raises like `request`."""
        self._check_open()
        seq = self._allocate_seq()
        try:
            wire = encode_frame(self.layout, attrs.evolve(frame, seq=seq))
        except ValueError as exc:
            raise self._encode_error(frame.body, exc) from None
        return await self._roundtrip(seq, wire)

    def close(self, error: GatewayError) -> None:
        """Finish the connection now: every waiter fails, `run()` returns."""
        self._finish(error, broken=False)

    def _check_open(self) -> None:
        # Raises when no request may be queued now; returns when one may.
        if self.error is not None:
            raise SendFailed(f"{self.node}: the connection is closed ({self.error.message})")
        if len(self._waiters) >= self.max_in_flight:
            raise SendFailed(
                f"{self.node}: {self.max_in_flight} requests already in flight on the connection"
            )

    def _encode_error(self, body: bytes, exc: ValueError) -> GatewayError:
        if len(body) > self.layout.max_body:
            return PayloadTooLarge(
                f"body of {len(body)} bytes is over the upstream frame limit of "
                f"{self.layout.max_body} bytes"
            )
        return BadRequest(f"the request does not fit the frame header: {exc}")

    def _allocate_seq(self) -> int:
        # Wraps at the seq field's maximum and skips every seq still in flight;
        # _check_open guarantees a free one exists.
        waiters = self._waiters
        seq_max = self._seq_max
        seq = self._seq
        while True:
            seq = seq + 1 if seq < seq_max else 0
            if seq not in waiters:
                self._seq = seq
                return seq

    async def _roundtrip(self, seq: int, wire: bytes) -> Frame:
        slot = _Slot(trio.lowlevel.current_task())
        waiters = self._waiters
        waiters[seq] = slot
        try:
            self._outbox.append(wire)
            self._outbox_seqs.append(seq)
            if self._writer_idle:
                self._writer_idle = False
                self._wake.set()
            frame: Frame = await trio.lowlevel.wait_task_rescheduled(slot.abort)
            return frame
        finally:
            del waiters[seq]

    # ------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and write until the connection ends, then close the stream.

        Returns once it has ended (see `error` and `broken`); raises only Cancelled,
        after failing every waiter.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                if self.error is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._write_loop)
                task_status.started()
                await self._read_loop()
        finally:
            self._finish(SendFailed(f"{self.node}: the connection was closed"), broken=False)
            if self._pushes is not None:
                self._pushes.close()
            await trio.aclose_forcefully(self.stream)

    async def _write_loop(self) -> None:
        outbox = self._outbox
        outbox_seqs = self._outbox_seqs
        send_all = self.stream.send_all
        fd = self.stream.socket.fileno()
        try:
            while True:
                if not outbox:
                    self._wake = trio.Event()
                    self._writer_idle = True
                    await self._wake.wait()
                    continue
                # Every request queued since the last write goes in one send.
                data = b"".join(outbox) if len(outbox) > 1 else outbox[0]
                outbox.clear()
                outbox_seqs.clear()
                # Written at once when the socket buffer takes it all (the usual
                # case): send_all would add a scheduler pass after the write,
                # and waiting for the next request is a checkpoint already.
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    await send_all(data[sent:])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(ConnectionLost(f"{self.node}: write failed: {exc}"), broken=True)

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self.layout)
        fd = self.stream.socket.fileno()
        wait_readable = trio.lowlevel.wait_readable
        read = os.read
        dispatch = self._dispatch
        try:
            while True:
                # Wait, then read: `receive_some` would try the read first, and
                # with the responses just dispatched that read is usually bound
                # to fail. The wait is this loop's checkpoint.
                await wait_readable(fd)
                try:
                    data = read(fd, RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                self.last_received = trio.current_time()
                decoder.receive_data(data)
                while True:
                    event = decoder.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, ConnectionClosed):
                        self._finish(
                            ConnectionLost(f"{self.node}: the upstream closed the connection"),
                            broken=bool(self._waiters),
                        )
                        return
                    if dispatch(event):
                        await self._deliver_push(event)
        except FramingError as exc:
            self._metrics.frames_rejected.labels(exc.reason).inc()
            self._finish(
                UpstreamProtocolError(f"{self.node}: malformed frame from the upstream: {exc}"),
                broken=True,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(ConnectionLost(f"{self.node}: read failed: {exc}"), broken=True)

    def _dispatch(self, frame: Frame) -> bool:
        """Hand a response to its waiter; True when `frame` is a push to deliver."""
        if self._has_flags and frame.flags & FLAG_PUSH:
            return True
        slot = self._waiters.get(frame.seq)
        task = None if slot is None else slot.task
        if task is None:
            if not self._has_flags:
                return True
            self._metrics.frames_rejected.labels("unknown_seq").inc()
            return False
        assert slot is not None
        slot.task = None
        trio.lowlevel.reschedule(task, outcome.Value(frame))
        return False

    async def _deliver_push(self, frame: Frame) -> None:
        pushes = self._pushes
        if pushes is None:
            self._metrics.frames_rejected.labels("unexpected_push").inc()
            return
        try:
            # Backpressure: a session that does not read its pushes stops this reader.
            await pushes.send(frame)
        except trio.BrokenResourceError:
            # The session stopped listening for pushes; later ones are dropped.
            self._pushes = None

    # ------------------------------------------------------------ ending

    def _finish(self, error: GatewayError, *, broken: bool) -> None:
        if self.error is not None:
            return
        self.error = error
        self.broken = broken
        unsent = set(self._outbox_seqs)
        self._outbox.clear()
        self._outbox_seqs.clear()
        for seq, slot in self._waiters.items():
            task = slot.task
            if task is None:
                continue
            slot.task = None
            trio.lowlevel.reschedule(task, outcome.Error(_waiter_error(error, seq in unsent)))
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self.closed.set()


def _waiter_error(error: GatewayError, unsent: bool) -> GatewayError:
    # A fresh exception per waiter: one instance raised in many tasks would share
    # (and keep growing) a traceback.
    if unsent:
        return SendFailed(f"{error.message} (before the request was sent)")
    if isinstance(error, UpstreamProtocolError):
        return UpstreamProtocolError(error.message)
    return ConnectionLost(f"{error.message}: connection lost before the response")
