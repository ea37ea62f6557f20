"""The sans-I/O TLV codec: `0x09 | header | body | 0x0A` (docs/protocol.md "Frames").

Three modules, by concept: `frame` (the `Frame` value, the decoder's events and
errors), `layout` (header layouts, each compiled once into its decoding and
encoding functions) and `decoder` (the incremental `FrameDecoder` and the
encoders). Callers import from here.
Must not: do I/O, await, read a clock or import trio; callers move the bytes.
"""

from tlvproxy.framing.decoder import FrameDecoder, RequestEncoder, encode_frame, iter_frames
from tlvproxy.framing.frame import (
    DEFAULT_MAX_BODY,
    END_BYTE,
    FLAG_PUSH,
    FLAG_RESPONSE,
    NEED_DATA,
    START_BYTE,
    BadEndByte,
    BadStartByte,
    BodyTooLarge,
    ConnectionClosed,
    DecoderBroken,
    Frame,
    FramingError,
    LengthTooSmall,
    NeedData,
    TruncatedFrame,
)
from tlvproxy.framing.layout import (
    FieldType,
    HeaderField,
    HeaderLayout,
    LayoutError,
    default_layout,
)

__all__ = [
    "DEFAULT_MAX_BODY",
    "END_BYTE",
    "FLAG_PUSH",
    "FLAG_RESPONSE",
    "NEED_DATA",
    "START_BYTE",
    "BadEndByte",
    "BadStartByte",
    "BodyTooLarge",
    "ConnectionClosed",
    "DecoderBroken",
    "FieldType",
    "Frame",
    "FrameDecoder",
    "FramingError",
    "HeaderField",
    "HeaderLayout",
    "LayoutError",
    "LengthTooSmall",
    "NeedData",
    "RequestEncoder",
    "TruncatedFrame",
    "default_layout",
    "encode_frame",
    "iter_frames",
]
