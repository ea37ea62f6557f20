"""A push session's message of a command with `split`, `mirror` or `fallback`
(docs/push-sessions.md "Split, mirror, fallback").

Owns: how a push session carries such a message (`_PushCarrier`): every
outcome answers the message's own HTTP request, since that request waits
whatever becomes of the session: the loss of the session's upstream
connection included (a fallback's answer with `X-Fallback`, or the
per-message error), and the session's own end, which closes that connection
though no upstream failed (the per-message error, never a fallback).
Must not: send the message or work out its answer (`server/session_traffic.py`
does, for WebSocket sessions too), check the session's state or bounds
(`PushSession.send` does, before), or write HTTP (the reply does).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, Protocol

import trio

from tlvproxy.errors import GatewayError
from tlvproxy.server import ws_json
from tlvproxy.server.session_traffic import Opened, send_with_rules

if TYPE_CHECKING:
    from tlvproxy.upstream.pool import Session

_log: Final = logging.getLogger("tlvproxy.sessions")


class MessageReply(Protocol):
    """Who answers a message's HTTP request: with the json-mode text, and the
    kind of fallback that gave it (the `X-Fallback` header), if one did."""

    def __call__(self, text: bytes, fallback: str | None = None) -> None: ...


class _Session(Opened, Protocol):
    """What a message with rules needs of its push session (push_sessions.py's
    PushSession, which imports this module: named here by what it does)."""

    _in_flight: int
    closed: str | None  # why the session ended; None while it is open


def send_with_traffic(
    session: _Session, connection: Session, request: ws_json.JsonRequest, reply: MessageReply
) -> None:
    """Send an admitted json-mode request of a command with rules on `session`,
    whose upstream connection is `connection`, then its mirror's copy; `reply`
    gets the answer when it comes."""
    carrier = _PushCarrier(session, reply)
    send_with_rules(carrier, session, request, connection, trio.current_time())


class _PushCarrier:
    """A push session's side of one message with rules (a `Carrier`)."""

    __slots__ = ("reply", "session")

    log = _log
    answering = True  # the message's request waits, whatever becomes of the session

    def __init__(self, session: _Session, reply: MessageReply) -> None:
        self.session = session
        self.reply = reply

    def refused(self, error: GatewayError, seq: int) -> None:
        self.reply(ws_json.render_error(error, seq))

    def submitted(self) -> None:
        self.session._in_flight += 1

    def settled(self) -> None:
        self.session._in_flight -= 1

    def answer(self, text: bytes, fallback: str | None) -> None:
        self.reply(text, fallback)

    def upstream_lost(self, error: GatewayError, seq: int) -> bool:
        if self.session.closed is None:
            # Lost or broken by the upstream (the session ends after, `on_end`):
            # answered like any failed message, by its fallback if one applies.
            return False
        # The session ended first (deleted, drained, idle) and closed the
        # connection: no upstream failed, so no fallback answers
        # (docs/push-sessions.md "Split, mirror, fallback").
        self.settled()
        self.reply(ws_json.render_error(error, seq))
        return True

    def internal_error(self, seq: int) -> None:
        self.reply(ws_json.render_error(GatewayError("internal error"), seq))
