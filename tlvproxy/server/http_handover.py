"""How HTTP ends on a connection another handler takes (docs/reference.md
"Keep-alive and pipelining", docs/websocket.md, docs/push-sessions.md).

Owns: the `HandOver` part of a connection: which requests are upgrades the
gateway takes (a GET with `Upgrade: websocket`, when an upgrade handler is
given), and handing the connection over, once every earlier answer is
written, with the request and the bytes read past it: to the upgrade
handler, or to the handler a Submitter gave `Answer.take_over` (a push
session's event stream, or its owner in another worker), which a drain
overtakes with a 503.
Must not: run the handler (`serve_http_connection` does, after the
connection's HTTP state is gone), or read or parse requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tlvproxy.errors import ShuttingDown
from tlvproxy.server.parsers import comma_tokens

if TYPE_CHECKING:
    from collections import deque

    from tlvproxy.server.http_answers import Answer
    from tlvproxy.server.http_types import ErrorHandler, Request, UpgradeHandler
    from tlvproxy.server.parsers import RequestHead, RequestParser


class HandingOverConnection(Protocol):
    """What a hand-over needs of its connection, the `self` of `HandOver`'s
    methods (http_conn.py, which imports this module, checks that its
    connection is one)."""

    _parser: RequestParser
    _error_handler: ErrorHandler
    _upgrade: UpgradeHandler | None
    _order: deque[Answer]
    _closing: bool
    _taken: tuple[Answer, UpgradeHandler] | None
    _handover: tuple[UpgradeHandler, Request, bytes] | None

    def _is_draining(self) -> bool: ...

    async def _settle(self, owed: int) -> None: ...

    def _write_ready(self) -> None: ...


class HandOver:
    """A connection's hand-over to the handler that takes it; a base of
    http_conn.py's connection, which holds the state."""

    # What these methods set, declared for the type checker: the attribute is
    # the connection's.
    _handover: tuple[UpgradeHandler, Request, bytes] | None

    def _wants_upgrade(self: HandingOverConnection, head: RequestHead) -> bool:
        return (
            self._upgrade is not None
            and head.method == "GET"
            and "websocket" in comma_tokens(head.headers, "upgrade")
        )

    async def _hand_over(self: HandingOverConnection, request: Request) -> None:
        # Once every earlier answer is written, the request and the bytes past
        # it go to the upgrade handler, run after this connection has ended.
        assert self._upgrade is not None  # checked by _wants_upgrade
        await self._settle(0)
        if self._closing:
            return
        self._handover = (self._upgrade, request, self._parser.trailing_data())

    async def _hand_over_taken(self: HandingOverConnection, request: Request) -> None:
        # The same for a request whose Submitter took the connection over. Its
        # answer, not set, stays last in the order while the earlier ones are
        # written, so that none of them closes the connection as the drain's
        # last answer would; then it leaves the order, or, once draining, is
        # answered 503 as any request the drain overtakes (docs/operations.md
        # "Drain").
        assert self._taken is not None  # the caller checked
        answer, handler = self._taken
        await self._settle(1)
        if self._closing:
            return  # an earlier answer closed the connection: nothing may follow
        if self._is_draining():
            answer.keep_alive = False
            error = ShuttingDown("the gateway is shutting down; retry on a new connection")
            answer.set(self._error_handler(error, request))
            # Written now, by this task, before the connection closes: another
            # task's answers wait for the end of the pass (ReadyAnswers).
            self._write_ready()
            return
        self._order.pop()  # the last, and now the only one
        await self._settle(0)  # its bytes out (no answer is owed: none can close)
        self._handover = (handler, request, self._parser.trailing_data())
