"""TLV frames and the errors of a byte stream that is not one (docs/protocol.md
"Frames", "The decoder and its errors").

Owns: the `Frame` value, the start and end bytes and flags, the decoder's events
(`NEED_DATA`, `ConnectionClosed`) and its errors (`FramingError` and kin).
Must not: do I/O, import trio, or know a header layout (tlvproxy/framing/layout.py).
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

START_BYTE: Final = 0x09
END_BYTE: Final = 0x0A
DEFAULT_MAX_BODY: Final = 1024 * 1024

FLAG_RESPONSE: Final = 0x01
FLAG_PUSH: Final = 0x02


class NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


@attrs.frozen(slots=True)
class ConnectionClosed:
    """The peer closed the stream cleanly, between two frames."""


class FramingError(Exception):
    """A byte stream that is not valid TLV; `reason` is the metric label.

    `offset` is the position in the stream (counted from the first byte ever fed)
    of the byte that made the stream invalid.
    """

    reason: str = "malformed"

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at stream offset {offset}")
        self.offset = offset


class BadStartByte(FramingError):
    """A frame did not begin with 0x09; `offset` is that byte's."""

    reason = "bad_start_byte"


class BadEndByte(FramingError):
    """The byte after a body was not 0x0a; `offset` is that byte's."""

    reason = "bad_end_byte"


class BodyTooLarge(FramingError):
    """A header declared a body over max_body; `offset` is the length field's."""

    reason = "body_too_large"


class LengthTooSmall(FramingError):
    """With length_counts=frame, a length below start + header + end; `offset` is the
    length field's."""

    reason = "length_too_small"


class TruncatedFrame(FramingError):
    """The stream ended inside a frame; `offset` is the end of the stream."""

    reason = "truncated_frame"


class DecoderBroken(FramingError):
    """A call on a decoder that has already raised: it never resynchronises.

    `offset` is the failed error's; `cause` is that error.
    """

    reason = "decoder_broken"

    def __init__(self, cause: FramingError) -> None:
        super().__init__(f"the decoder already failed ({cause})", cause.offset)
        self.cause = cause


# ---------------------------------------------------------------- values


@attrs.frozen(slots=True, kw_only=True)
class Frame:
    """One TLV frame: the header fields the gateway knows, and the body.

    `extra` holds the values of the layout's other fields (version, reserved or
    custom ones) in layout order; an empty tuple means "send their `value` or 0".
    A field the layout lacks (uid, flags, status) decodes as 0 and is not sent.
    """

    command: int
    seq: int
    uid: int = 0
    flags: int = 0
    status: int = 0
    body: bytes = b""
    extra: tuple[int, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_push(self) -> bool:
        return bool(self.flags & FLAG_PUSH)
