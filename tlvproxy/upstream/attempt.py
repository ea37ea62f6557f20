"""One request of `Pool.submit` on its way, and who learns its outcome.

Owns: `Completion` (the caller's side: `on_reply` or `on_error`, once),
`TaskCompletion` (a task awaiting the outcome: `Pool.request`), and `Attempt`,
the connection's `Waiter` for the request: it counts each outcome on its node
(metrics, health) and applies the retry policy (docs/reference.md "Retries")
through its `Dispatcher`, the pool.
Must not: choose nodes or open connections: the dispatcher does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

import attrs
import outcome
import trio

from tlvproxy.errors import GatewayError, NoHealthyNode, UpstreamTimeout
from tlvproxy.upstream.connection import SendFailed

if TYPE_CHECKING:
    from tlvproxy.config.model import UpstreamSpec
    from tlvproxy.framing import Frame
    from tlvproxy.upstream.connection import Connection
    from tlvproxy.upstream.node import Node

# How often one request may be put on a new connection of the same node after
# the one it was queued on went down before writing it.
_MAX_RESENDS: Final = 2


@attrs.frozen(slots=True)
class Reply:
    """A response frame and the node ("host:port") that answered it."""

    frame: Frame
    node: str


class Dispatcher(Protocol):
    """What an attempt needs of its pool to be sent again."""

    spec: UpstreamSpec
    hash_requests: bool

    def send(self, attempt: Attempt, node: Node) -> None:
        """Put `attempt` on a connection of `node`."""

    def next_node(self, key: str | None, tried: list[Node]) -> Node | None:
        """An eligible node not in `tried`, or None."""

    def timed_out(self, node: Node) -> None:
        """A request's deadline passed on `node`."""


class Completion(Protocol):
    """Who learns the outcome of `Pool.submit`; called once, and must not raise."""

    def on_reply(self, frame: Frame, node: str) -> None:
        """The response frame, and the node ("host:port") that answered."""

    def on_error(self, error: GatewayError, node: str | None) -> None:
        """Why there is no response, and the node last tried (None: none was)."""


class TaskCompletion:
    """The completion of `Pool.request`: the task awaiting the reply."""

    __slots__ = ("result", "task")

    def __init__(self) -> None:
        # The task once it waits; until then an outcome is kept in `result`
        # (`submit` may settle before returning).
        self.task: trio.lowlevel.Task | None = None
        self.result: outcome.Outcome[Reply] | None = None

    def on_reply(self, frame: Frame, node: str) -> None:
        self._resume(outcome.Value(Reply(frame, node)))

    def on_error(self, error: GatewayError, node: str | None) -> None:
        self._resume(outcome.Error(error))

    def _resume(self, result: outcome.Outcome[Reply]) -> None:
        task = self.task
        if task is None:
            self.result = result
        else:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> Reply:
        if self.result is not None:
            await trio.lowlevel.checkpoint()
            return self.result.unwrap()
        self.task = trio.lowlevel.current_task()
        reply: Reply = await trio.lowlevel.wait_task_rescheduled(self._abort)
        return reply

    def _abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self.task = None  # an outcome after this is kept in `result`, unread
        return trio.lowlevel.Abort.SUCCEEDED


class _Settled:
    """The completion of a settled attempt: it hears nothing more."""

    def on_reply(self, frame: Frame, node: str) -> None:
        raise AssertionError("a settled attempt was answered")  # pragma: no cover

    def on_error(self, error: GatewayError, node: str | None) -> None:
        raise AssertionError("a settled attempt failed")  # pragma: no cover


_SETTLED: Final = _Settled()


class Attempt:
    """One request of `Pool.submit` on its way: the connection's `Waiter`.

    It counts each outcome on its node (metrics, health) and applies the retry
    policy before its completion hears of it.
    """

    __slots__ = (
        "body",
        "command",
        "completion",
        "conn",
        "deadline",
        "idempotent",
        "key",
        "node",
        "pool",
        "resent",
        "seq",
        "settled",
        "tried",
        "uid",
    )

    def __init__(
        self,
        pool: Dispatcher,
        completion: Completion,
        command: int,
        body: bytes,
        uid: int,
        key: str | None,
        idempotent: bool,
        deadline: float,
    ) -> None:
        self.pool = pool
        self.completion = completion
        self.command = command
        self.body = body
        self.uid = uid
        self.key = key
        self.idempotent = idempotent
        self.deadline = deadline
        self.node: Node | None = None
        self.conn: Connection | None = None
        self.seq = 0
        self.tried: list[Node] = []
        self.resent = 0
        self.settled = False

    def put_on(self, conn: Connection) -> None:
        """Submit to `conn` (a usable connection of `self.node`)."""
        try:
            self.seq = conn.submit(self, self.command, self.body, self.uid)
        except SendFailed as exc:
            self.failed(exc)
            return
        except GatewayError as exc:  # PayloadTooLarge, BadRequest: no node would take it
            self._settle(exc)
            return
        self.conn = conn

    def withdraw(self) -> None:
        """The caller gave up: free the seq, report nothing."""
        self.settled = True
        if self.conn is not None:
            self.conn.withdraw(self.seq, self)

    # The Waiter side: called by the connection.

    def on_response(self, frame: Frame) -> None:
        node = self.node
        assert node is not None  # set before the request was put on a connection
        node.count_answer(frame)
        self.settled = True
        completion = self.completion
        self._release()
        completion.on_reply(frame, node.name)

    def on_error(self, error: GatewayError) -> None:
        node = self.node
        assert node is not None
        self.conn = None
        node.count_lost(error)
        if isinstance(error, SendFailed) and node.retired:
            self.elsewhere()  # never written, and its node left: not a try
            return
        if isinstance(error, SendFailed) and self.resent < _MAX_RESENDS:
            # Never written: the connection went down under it. Another
            # connection of the same node takes it, a new one if need be
            # (docs/reference.md "When an upstream connection goes down").
            self.resent += 1
            self.pool.send(self, node)
            return
        self.failed(error)

    def on_timeout(self) -> None:
        self.conn = None
        self.timed_out()

    # Outcomes.

    def timed_out(self) -> None:
        """The deadline passed: a timeout of the node (health), never retried."""
        node = self.node
        if node is not None:
            self.pool.timed_out(node)
        self._settle(
            UpstreamTimeout(f"upstream {self.pool.spec.name!r}: no answer before the deadline")
        )

    def failed(self, error: GatewayError) -> None:
        """Retry on another node when the policy allows, else report (docs/reference.md
        "Retries")."""
        node = self.node
        assert node is not None
        tried = self.tried
        tried.append(node)
        following = None
        pool = self.pool
        if len(tried) <= pool.spec.retries and (isinstance(error, SendFailed) or self.idempotent):
            following = pool.next_node(self.key if pool.hash_requests else None, tried)
        if following is None:
            self._settle(error)
            return
        pool.send(self, following)

    def abandon(self, error: GatewayError) -> None:
        """Report `error` without a retry: the pool can send nothing (it is closed)."""
        self._settle(error)

    def elsewhere(self) -> None:
        """Send again to another node: `self.node` left the upstream before
        the request was written (docs/configuration.md "discovery"). Not a
        try of the retry policy: nothing was sent."""
        pool = self.pool
        following = pool.next_node(self.key if pool.hash_requests else None, self.tried)
        if following is None:
            self._settle(NoHealthyNode(f"upstream {pool.spec.name!r}: no healthy node"))
            return
        pool.send(self, following)

    def _settle(self, error: GatewayError) -> None:
        if self.settled:
            return
        self.settled = True
        completion = self.completion
        self._release()
        completion.on_error(error, None if self.node is None else self.node.name)

    def _release(self) -> None:
        # Settled: a stale entry in a deadline heap may keep this attempt a
        # while; it must not keep the request and its answer (less garbage for
        # the collector to trace).
        self.completion = _SETTLED
        self.body = b""
