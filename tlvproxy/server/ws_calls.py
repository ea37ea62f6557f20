"""A WebSocket session's request on its way back (docs/reference.md "How a request flows").

Owns: the `Waiter` a session submits to its dedicated upstream connection for
each request, and what its outcome sends the client: the answer rendered (json
mode: the reply's text; binary mode: the upstream's frame carrying the
client's seq), an upstream timeout as a per-message error, a lost connection
as the session's end (1011).
Must not: write to the client or close the session itself (the session does,
through what `_Session` names), or wait: it runs in the connection's reader,
the worker's deadline timer or the connection's end.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

import attrs

from tlvproxy.errors import UpstreamTimeout
from tlvproxy.framing import encode_frame
from tlvproxy.server import session_core
from tlvproxy.server.ws_wire import BINARY, TEXT
from tlvproxy.server.ws_wire import frame as wire_frame

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec
    from tlvproxy.errors import GatewayError
    from tlvproxy.framing import Frame
    from tlvproxy.metrics import Metrics

log = logging.getLogger("tlvproxy.websocket")


class _Session(Protocol):
    """What a request needs of its session (ws_session.py, whose parts import
    this module: named here by what it does)."""

    _table: CompiledTable
    _metrics: Metrics
    close_code: int | None

    def _send(self, data: bytes) -> None: ...

    def _send_error(self, error: GatewayError, seq: int | str | None) -> None: ...

    def _internal_error(self) -> None: ...

    def _upstream_lost(self, error: GatewayError) -> None: ...

    def _settled(self) -> None: ...

    def _timeout(self, command: CommandSpec) -> float: ...


class _Call(ABC):
    """One client request on its way: a `Waiter` on the dedicated connection.

    Exactly one of the three is called, from the connection's reader, the
    worker's deadline timer or the connection's end; so none may raise: a bug
    in rendering is logged and closes the session with 1011.
    """

    __slots__ = ("command", "deadline", "seq", "session")

    def __init__(self, session: _Session, command: CommandSpec, seq: int, deadline: float) -> None:
        self.session = session
        self.command = command
        self.seq = seq  # the client's
        self.deadline = deadline

    def on_response(self, frame: Frame) -> None:
        session = self.session
        session._settled()
        if session.close_code is not None:
            return
        try:
            data = self._render(frame)
        except Exception:  # runs in the upstream reader: a bug costs the session, not the reader
            log.exception("rendering the answer to %s failed", self.command.name)
            session._internal_error()
            return
        session._send(data)

    def on_error(self, error: GatewayError) -> None:
        self.session._upstream_lost(error)

    def on_timeout(self) -> None:
        session = self.session
        session._settled()
        command = self.command
        error = UpstreamTimeout(
            f"upstream {command.upstream!r} did not answer {command.name!r} "
            f"within {session._timeout(command):g} s"
        )
        session._send_error(error, self.seq)

    @abstractmethod
    def _render(self, frame: Frame) -> bytes:
        """The WebSocket frame that answers the client with `frame`."""


class JsonCall(_Call):
    """A json-mode request: answered with the text of the reply."""

    __slots__ = ()

    def _render(self, frame: Frame) -> bytes:
        session = self.session
        text = session_core.render_reply(
            session._table, session._metrics, self.command, self.seq, frame
        )
        return wire_frame(TEXT, text)


class BinaryCall(_Call):
    """A binary-mode request: answered with the upstream's frame, carrying the client's seq."""

    # Binary mode has no error frame: per-message errors go back as the
    # json-mode text error, carrying the frame's seq.
    __slots__ = ()

    def _render(self, frame: Frame) -> bytes:
        layout = self.session._table.framing
        return wire_frame(BINARY, encode_frame(layout, attrs.evolve(frame, seq=self.seq)))
