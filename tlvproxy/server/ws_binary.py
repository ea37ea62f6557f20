"""What a binary-mode WebSocket message must be (docs/websocket.md "binary mode").

Owns: the check of a client's binary message: exactly one TLV frame, of a
command of the session's upstream that the client may send (not a push
command); anything else raises `InvalidFrame`, whose text is the close reason.
Must not: do I/O, import trio, or close the session (`server/ws_requests.py`
closes it with 1008).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlvproxy.framing import ConnectionClosed, Frame, FrameDecoder, FramingError

if TYPE_CHECKING:
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.config.model import CommandSpec


class InvalidFrame(Exception):
    """A binary message that is not exactly one acceptable TLV frame (closes 1008)."""


def check_frame(table: CompiledTable, upstream: str, data: bytes) -> tuple[Frame, CommandSpec]:
    """The one TLV frame `data` holds, checked for a session on `upstream`
    (docs/websocket.md "binary mode"); raises InvalidFrame."""
    decoder = FrameDecoder(table.framing)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    try:
        frame = decoder.next_event()
        if not isinstance(frame, Frame):
            raise InvalidFrame("an empty message")
        if not isinstance(decoder.next_event(), ConnectionClosed):
            raise InvalidFrame("more than one frame in one message")
    except FramingError as exc:
        raise InvalidFrame(str(exc)) from None
    command = table.command_at(upstream, frame.command)
    if command is None:
        raise InvalidFrame(
            f"command 0x{frame.command:04x} is not in the table for upstream {upstream!r}"
        )
    if command.push is not None:
        raise InvalidFrame(
            f"command {command.name!r} cannot be sent: it is a push command, "
            "which only the upstream sends"
        )
    return frame, command
