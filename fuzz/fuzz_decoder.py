"""Fuzz target for the TLV decoder (docs/protocol.md), shaped like h11's fuzz/afl-server.py.

Run with `python fuzz/fuzz_decoder.py -max_total_time=60 fuzz/corpus/decoder`
(`make fuzz`). An input's first byte picks one of LAYOUTS; the rest is the stream.
It is decoded as one big chunk, then one byte at a time, and `check_stream` holds
for both: the decoder only yields frames, NEED_DATA and ConnectionClosed or raises
a FramingError at the right offset, every frame re-encodes to exactly the bytes it
came from, and the chunking changes nothing. Any other exception is a crash.

tests/test_framing.py runs the same property under hypothesis, so CI exercises it
without atheris; importing this file does not import atheris.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from tlvproxy.framing import (
    NEED_DATA,
    BadEndByte,
    BadStartByte,
    BodyTooLarge,
    ConnectionClosed,
    DecoderBroken,
    Frame,
    FrameDecoder,
    FramingError,
    HeaderField,
    HeaderLayout,
    LengthTooSmall,
    TruncatedFrame,
    default_layout,
    encode_frame,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

# Small max_body values, so random lengths hit both sides of the limit.
LAYOUTS = (
    default_layout(max_body=64),
    HeaderLayout(
        fields=(
            HeaderField(name="magic", type="u16", value=0xCAFE),
            HeaderField(name="length", type="u64"),
            HeaderField(name="seq", type="u64"),
            HeaderField(name="command", type="u32"),
        ),
        byte_order="little",
        length_counts="frame",
        max_body=40,
    ),
    HeaderLayout(
        fields=(
            HeaderField(name="command", type="u8"),
            HeaderField(name="seq", type="u8"),
            HeaderField(name="length", type="u8"),
        ),
        max_body=16,
    ),
)


def length_offset(layout: HeaderLayout) -> int:
    """Where the length field starts in the header, counted independently of the codec."""
    names = [f.name for f in layout.fields]
    return sum(int(f.type[1:]) // 8 for f in layout.fields[: names.index("length")])


def decode(
    layout: HeaderLayout, chunks: Sequence[bytes]
) -> tuple[list[Frame], FramingError | None]:
    """Feed `chunks` then EOF, draining after each; the frames and the error, if any."""
    decoder = FrameDecoder(layout)
    frames: list[Frame] = []
    error: FramingError | None = None
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            if _drain(decoder, frames):
                assert chunk == b"", "ConnectionClosed before EOF"
                assert decoder.buffered == 0
                return frames, None
    except FramingError as exc:
        error = exc
    assert error is not None, "EOF was fed but the decoder neither closed nor failed"
    assert not isinstance(error, DecoderBroken), error
    broken: DecoderBroken | None = None
    try:
        decoder.next_event()
    except DecoderBroken as exc:
        broken = exc
    assert broken is not None, "a failed decoder went on decoding"
    assert broken.offset == error.offset
    return frames, error


def _drain(decoder: FrameDecoder, frames: list[Frame]) -> bool:
    # Appends the frames ready; True once the decoder reports ConnectionClosed.
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, ConnectionClosed):
            return True
        assert isinstance(event, Frame), event
        frames.append(event)
    return False


def check_stream(
    layout: HeaderLayout, data: bytes, chunks: Sequence[bytes]
) -> tuple[list[Frame], FramingError | None]:
    """Decode `chunks` (which join to `data`) and check every promise of docs/protocol.md."""
    assert b"".join(chunks) == data
    frames, error = decode(layout, chunks)
    wire = b"".join(encode_frame(layout, frame) for frame in frames)
    assert data.startswith(wire), "a frame does not re-encode to the bytes it came from"
    if error is None:
        assert wire == data
        return frames, None
    at, frame_start = error.offset, len(wire)
    match error:
        case BadStartByte():
            assert at == frame_start
            assert data[at] != 0x09
        case BodyTooLarge() | LengthTooSmall():
            assert frame_start + 1 + layout.header_size <= len(data)
            assert at == frame_start + 1 + length_offset(layout)
        case BadEndByte():
            assert frame_start < at < len(data)
            assert data[at] != 0x0A
        case TruncatedFrame():
            assert at == len(data) > frame_start
        case _:
            raise AssertionError(f"unexpected error kind {error!r}")
    return frames, error


def outcome(result: tuple[list[Frame], FramingError | None]) -> object:
    """What must not depend on the chunking: the frames, the error kind and offset."""
    frames, error = result
    return frames, None if error is None else (type(error), error.offset)


def one_input(data: bytes) -> None:
    """The atheris entry point: one big chunk, then one byte at a time."""
    if not data:
        return
    layout = LAYOUTS[data[0] % len(LAYOUTS)]
    stream = data[1:]
    whole = check_stream(layout, stream, [stream] if stream else [])
    bytewise = check_stream(layout, stream, [stream[i : i + 1] for i in range(len(stream))])
    assert outcome(whole) == outcome(bytewise), "the chunking changed the outcome"


def main() -> None:
    # Imported here: only a fuzzing run needs atheris, and the tests import this file.
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
