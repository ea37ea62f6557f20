"""One multiplexed TLV connection to an upstream node (docs/protocol.md).

Owns: a trio stream to one node, its reader task (frames decoded with
`FrameDecoder`, each response handed to the waiter of its seq), its writer
task (the rest of a write the socket did not take at once), seq allocation,
the in-flight cap, the deadlines of the requests it carries, and push
delivery; and `Sender`, one task for many connections that writes, once a
scheduler pass is over, the frames each queued in it.
Must not: choose nodes, count health or retry: the pool does.

Requests are state, not tasks (docs/reference.md "How a request flows"): a
`Waiter` is submitted with its deadline; the reader calls it with the
response, the timer (one `DeadlineTimer` task for many connections) when its
deadline passes first, and the end of the connection with the reason. The
deadlines sit in a heap here, so an answered request costs the timer nothing
(its entry goes stale). `request` is the same for a task that awaits the
answer: its cancel scope owns the time, and the seq is freed either way.

Matching (docs/protocol.md "Sequence numbers, multiplexing and pushes"): a frame
with the push flag is a push. Any other frame is the response to the request in
flight with its seq; without a `flags` field, a frame whose seq is not in flight
is a push. A response nobody waits for (it came after its request timed out, or
never had one) is counted in
`tlvproxy_frames_rejected_total{reason="unknown_seq"}` and dropped. A push goes
to the connection's `PushReceiver`, called by the reader as it decodes the frame
(a WebSocket session renders and writes it there and then); a push on a
connection without one (a pooled REST connection) is counted as
`reason="unexpected_push"` and dropped.

When the connection breaks (EOF, reset, a FramingError), every waiter fails at
once: `SendFailed` if its bytes never reached the socket, `ConnectionLost` if they
may have, and the connection is finished for good (`closed` is set, `error` says
why). A FramingError's `reason` is counted in `tlvproxy_frames_rejected_total`.
"""

from __future__ import annotations

import heapq
import math
import os
from typing import TYPE_CHECKING, Final, Protocol

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
from tlvproxy.timer import DeadlineTimer

if TYPE_CHECKING:
    from collections.abc import Callable

    from tlvproxy.metrics import Metrics

RECEIVE_SIZE: Final = 65536
# The deadline heap is rebuilt from its live entries past this size (or four
# times the live entries of the last rebuild).
_PRUNE_MIN: Final = 256
# Frames queued in one scheduler pass that are sent at once, before the pass
# ends (see `_queue`).
_EARLY_SEND: Final = 16


class SendFailed(UpstreamUnavailable):
    """The request never left the gateway (no connection, connection already
    broken, in-flight cap reached): retrying it elsewhere is always safe
    (docs/reference.md "Retries")."""


class ConnectionLost(UpstreamUnavailable):
    """The connection broke after the request was written: it may have been executed."""


class Waiter(Protocol):
    """One request waiting on a connection for its response (`submit`).

    Exactly one of the three is called, once, from the connection's reader,
    its timer or whoever closes it; never from inside `submit`. A waiter must
    not raise: it runs in the connection's own tasks.
    """

    @property
    def deadline(self) -> float:
        """When the request gives up (`math.inf`: never); read once, at `submit`."""

    def on_response(self, frame: Frame) -> None:
        """The response frame arrived."""

    def on_error(self, error: GatewayError) -> None:
        """The connection ended first: SendFailed when the request was never
        written, else ConnectionLost or UpstreamProtocolError."""

    def on_timeout(self) -> None:
        """`deadline` passed first; the seq is free and a late answer is dropped."""


class PushReceiver(Protocol):
    """Where a dedicated connection delivers its pushes (`Connection(receiver=...)`).

    Both are called from the connection's own tasks, so neither may raise or wait.
    """

    def on_push(self, frame: Frame) -> None:
        """One upstream-initiated frame, as the reader decodes it."""

    def on_end(self, error: GatewayError) -> None:
        """The connection ended (`error` is `Connection.error`): no push follows.
        Called once, after the waiters have failed."""


class _TaskWaiter:
    """The waiter of `Connection.request`: the task awaiting the response."""

    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task: trio.lowlevel.Task | None = task

    deadline = math.inf  # the awaiting task's cancel scopes own its time

    def on_response(self, frame: Frame) -> None:
        self._resume(outcome.Value(frame))

    def on_error(self, error: GatewayError) -> None:
        self._resume(outcome.Error(error))

    def on_timeout(self) -> None:
        raise AssertionError("a task waiter has no deadline")  # pragma: no cover

    def _resume(self, result: outcome.Outcome[Frame]) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    def abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # Cancelled: nothing may reschedule this task any more.
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Sender:
    """Writes the frames connections queued in a scheduler pass once the pass
    is over: each connection's in one write, from one task (`run`) for all of
    them. A connection queues its first frame of a pass with `schedule`.

    Why one task and not a writer per connection: a session has a connection
    of its own, so a writer per connection woke once per request, where this
    task wakes once per pass however many connections queued in it. The
    gateway runs one per worker, as it does the `DeadlineTimer`: a session's
    connection outlives the pool it came from.
    """

    def __init__(self) -> None:
        self._due: list[Connection] = []
        self._wake = trio.Event()
        self._idle = False

    def schedule(self, conn: Connection) -> None:
        """Write what `conn` queued when this pass is over."""
        self._due.append(conn)
        if self._idle:
            self._idle = False
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write each pass's frames, until cancelled."""
        task_status.started()
        while True:
            due = self._due
            if not due:
                self._wake = trio.Event()
                self._idle = True
                await self._wake.wait()
                continue
            self._due = []
            for conn in due:
                conn._send_due()


class Connection:
    """A multiplexed connection to the node `node` ("host:port") over `stream`.

    `run()` must be running (in a nursery) for requests to be answered. `receiver`,
    if given, is called with each upstream-initiated frame and told of the end. At most
    `max_in_flight` requests wait at once (capped by the seq space of the layout).
    The deadlines of submitted requests fire from `timer` (a running
    `DeadlineTimer`); without one, `run()` runs a timer of its own. Queued
    frames leave from `sender` (a running `Sender`), or from one `run()` runs.
    `after_read`, if given, is called once the frames of each read from the
    socket are dispatched, and when reading ends: what their waiters counted
    can be published then, once per read rather than once per frame.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        layout: HeaderLayout,
        metrics: Metrics,
        *,
        node: str,
        max_in_flight: int,
        timer: DeadlineTimer | None = None,
        sender: Sender | None = None,
        receiver: PushReceiver | None = None,
        after_read: Callable[[], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.node = node
        self.stream = stream
        self.layout = layout
        self._metrics = metrics
        self._encode = RequestEncoder(layout).encode
        self._seq_max = layout.field_max("seq")
        self._seq = 0
        self._has_flags = layout.has("flags")
        # A seq in flight is never reused, so the seq space bounds the waiters too.
        self.max_in_flight = min(max_in_flight, self._seq_max + 1)
        self._waiters: dict[int, Waiter] = {}
        # (deadline, seq, waiter) of the waiters with a deadline; an entry whose
        # waiter is no longer `_waiters[seq]` is stale (answered or withdrawn).
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._prune_at = _PRUNE_MIN
        self._timer = timer
        self._own_timer = timer is None
        self.timer_deadline = math.inf  # the deadline registered with the timer
        # Frames queued and not yet written. While it holds any and nobody is
        # `_sending`, the connection is due at `_sender`.
        self._outbox: list[bytes] = []
        self._outbox_seqs: list[int] = []
        self._sender = Sender() if sender is None else sender
        self._own_sender = sender is None
        self._writer_idle = False
        self._wake = trio.Event()
        self._fd = stream.socket.fileno()
        self._unsent = b""  # bytes of a write the socket did not take; the writer's
        self._sending = False  # the writer is sending `_unsent`: nobody else writes
        self._receiver = receiver
        self._after_read = after_read
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
    def last_deadline(self) -> float:
        """The latest deadline of the requests in flight that have one (-inf: none)."""
        return max(
            (w.deadline for w in self._waiters.values() if w.deadline != math.inf),
            default=-math.inf,
        )

    @property
    def usable(self) -> bool:
        """Whether a new request may be queued now (open and under the in-flight cap)."""
        return self.error is None and len(self._waiters) < self.max_in_flight

    # ------------------------------------------------------------ requests

    def submit(self, waiter: Waiter, command: int, body: bytes, uid: int = 0) -> int:
        """Queue one request frame for `waiter`; its seq. The frame leaves with
        every other frame queued on the connection in the same scheduler pass,
        in one send, once the pass is over.

        Raises, and then never calls `waiter`: SendFailed (closed, or the
        in-flight cap reached), PayloadTooLarge (body over the layout's
        max_body) or BadRequest (a header value that does not fit the layout,
        such as a uid too large).
        """
        if self.error is not None or len(self._waiters) >= self.max_in_flight:
            self._check_open()
        seq = self._allocate_seq()
        try:
            wire = self._encode(command, seq, uid, body)
        except ValueError as exc:
            raise self._encode_error(body, exc) from None
        self._queue(waiter, seq, wire)
        return seq

    def submit_frame(self, waiter: Waiter, frame: Frame) -> int:
        """Queue `frame` as it is but with a fresh seq (the one returned); the
        response frame carries that seq, the caller restores its own. Raises
        like `submit`."""
        self._check_open()
        seq = self._allocate_seq()
        try:
            wire = encode_frame(self.layout, attrs.evolve(frame, seq=seq))
        except ValueError as exc:
            raise self._encode_error(frame.body, exc) from None
        self._queue(waiter, seq, wire)
        return seq

    def withdraw(self, seq: int, waiter: Waiter) -> None:
        """Forget `waiter` (its caller gave up): its seq is free, a late answer is
        dropped and counted, and `waiter` is not called."""
        if self._waiters.get(seq) is waiter:
            del self._waiters[seq]

    async def request(self, command: int, body: bytes, uid: int = 0) -> Frame:
        """Send one request frame and return its response frame.

        Raises like `submit`, then ConnectionLost (lost before the response) or
        UpstreamProtocolError (the upstream sent a malformed frame). No deadline:
        the caller's cancel scope owns it, and cancellation frees the seq.
        """
        waiter = _TaskWaiter(trio.lowlevel.current_task())
        seq = self.submit(waiter, command, body, uid)
        return await self._wait(seq, waiter)

    async def _wait(self, seq: int, waiter: _TaskWaiter) -> Frame:
        try:
            frame: Frame = await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        finally:
            self.withdraw(seq, waiter)
        return frame

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

    def _queue(self, waiter: Waiter, seq: int, wire: bytes) -> None:
        self._waiters[seq] = waiter
        deadline = waiter.deadline
        if deadline != math.inf:
            heap = self._deadlines
            heapq.heappush(heap, (deadline, seq, waiter))
            if len(heap) > self._prune_at:
                self._prune()
            if deadline < self.timer_deadline:
                self._watch(deadline)
        outbox = self._outbox
        outbox.append(wire)
        self._outbox_seqs.append(seq)
        if self._sending:
            return  # the writer writes them after what it is writing
        if len(outbox) == 1:
            # The sender writes after this scheduler pass: every frame queued
            # in the pass leaves in one send.
            self._sender.schedule(self)
        elif len(outbox) >= _EARLY_SEND:
            # A long pass would hold the first frames back until its end: a
            # slow upstream would then see requests in waves and sit idle in
            # between. Send what has piled up now.
            self._send_queued()

    def _send_due(self) -> None:
        """The sender's call, once the pass that queued frames is over. It
        may come after they were sent early, or while the writer is writing
        (it writes them after): a write then would be out of turn."""
        if self._outbox and not self._sending:
            self._send_queued()

    def _send_queued(self) -> None:
        """Write the queued frames now without waiting; what the socket does
        not take is the writer's to send (`_sending` until it has)."""
        outbox = self._outbox
        data = b"".join(outbox) if len(outbox) > 1 else outbox[0]
        outbox.clear()
        self._outbox_seqs.clear()
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._finish(ConnectionLost(f"{self.node}: write failed: {exc}"), broken=True)
            return
        if sent < len(data):
            self._unsent = data[sent:]
            self._sending = True
            if self._writer_idle:
                self._writer_idle = False
                self._wake.set()

    # ------------------------------------------------------------ deadlines

    def _watch(self, deadline: float) -> None:
        self.timer_deadline = deadline
        if self._timer is not None:
            self._timer.watch(self, deadline)

    def expire(self, now: float) -> None:
        """The timer's call: every waiter whose deadline has passed times out."""
        heap = self._deadlines
        waiters = self._waiters
        while heap:
            deadline, seq, waiter = heap[0]
            if waiters.get(seq) is waiter:
                if deadline > now:
                    break
                del waiters[seq]
                heapq.heappop(heap)
                waiter.on_timeout()
            else:
                heapq.heappop(heap)
        # Register the earliest entry left; a stale one only wakes us early.
        self.timer_deadline = math.inf
        if heap:
            self._watch(heap[0][0])

    def _prune(self) -> None:
        # Answered requests leave stale entries behind; past four times the
        # live ones, keep only the live ones (amortised O(1) per request).
        waiters = self._waiters
        heap = [entry for entry in self._deadlines if waiters.get(entry[1]) is entry[2]]
        heapq.heapify(heap)
        self._deadlines = heap
        self._prune_at = max(_PRUNE_MIN, 4 * len(heap))

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
                if self._own_timer:
                    self._timer = DeadlineTimer()
                    await nursery.start(self._timer.run)
                    if self.timer_deadline != math.inf:
                        self._timer.watch(self, self.timer_deadline)
                if self._own_sender:
                    await nursery.start(self._sender.run)
                nursery.start_soon(self._write_loop)
                task_status.started()
                await self._read_loop()
        finally:
            self._finish(SendFailed(f"{self.node}: the connection was closed"), broken=False)
            await trio.aclose_forcefully(self.stream)

    async def _write_loop(self) -> None:
        # Writes the rest of a write the socket did not take at once, then
        # what was queued meanwhile: until the socket takes a write whole,
        # the frames wait here, in order, and not at the sender.
        send_all = self.stream.send_all
        try:
            while True:
                if not self._unsent:
                    self._wake = trio.Event()
                    self._writer_idle = True
                    await self._wake.wait()
                    continue
                data, self._unsent = self._unsent, b""
                await send_all(data)
                self._sending = False
                if self._outbox:
                    self._send_queued()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(ConnectionLost(f"{self.node}: write failed: {exc}"), broken=True)

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self.layout)
        fd = self.stream.socket.fileno()
        wait_readable = trio.lowlevel.wait_readable
        read = os.read
        waiters = self._waiters
        has_flags = self._has_flags
        after_read = self._after_read
        try:
            while True:
                if after_read is not None:
                    after_read()
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
                            broken=bool(waiters),
                        )
                        return
                    # A push flag makes a push; without a flags field, so does a seq
                    # that no request waits for (docs/protocol.md "Sequence numbers,
                    # multiplexing and pushes").
                    if not (has_flags and event.flags & FLAG_PUSH):
                        waiter = waiters.pop(event.seq, None)
                        if waiter is not None:
                            waiter.on_response(event)
                            continue
                        if has_flags:
                            self._metrics.frames_rejected.labels("unknown_seq").inc()
                            continue
                    if self._receiver is not None:
                        self._receiver.on_push(event)
                    else:
                        self._metrics.frames_rejected.labels("unexpected_push").inc()
        except FramingError as exc:
            self._metrics.frames_rejected.labels(exc.reason).inc()
            self._finish(
                UpstreamProtocolError(f"{self.node}: malformed frame from the upstream: {exc}"),
                broken=True,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(ConnectionLost(f"{self.node}: read failed: {exc}"), broken=True)
        finally:
            if after_read is not None:
                after_read()

    # ------------------------------------------------------------ ending

    def _finish(self, error: GatewayError, *, broken: bool) -> None:
        if self.error is not None:
            return
        self.error = error
        self.broken = broken
        unsent = set(self._outbox_seqs)
        self._outbox.clear()
        self._outbox_seqs.clear()
        waiters, self._waiters = self._waiters, {}
        self._deadlines = []
        self.timer_deadline = math.inf
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self.closed.set()
        # Last: a waiter may submit its request again elsewhere (the pool's
        # retries), and must find this connection finished.
        for seq, waiter in waiters.items():
            waiter.on_error(_waiter_error(error, seq in unsent))
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.on_end(error)


def _waiter_error(error: GatewayError, unsent: bool) -> GatewayError:
    # A fresh exception per waiter: one instance raised in many tasks would share
    # (and keep growing) a traceback.
    if unsent:
        return SendFailed(f"{error.message} (before the request was sent)")
    if isinstance(error, UpstreamProtocolError):
        return UpstreamProtocolError(error.message)
    return ConnectionLost(f"{error.message}: connection lost before the response")
