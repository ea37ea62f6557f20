"""The TLV codec (SPEC 1): interop vectors packed with struct, round trips under any
chunking, every error with its offset, limits, EOF, and layout validation."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import pickle
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlvproxy.framing import (
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
    FrameDecoder,
    FramingError,
    HeaderField,
    HeaderLayout,
    LayoutError,
    LengthTooSmall,
    RequestEncoder,
    TruncatedFrame,
    default_layout,
    encode_frame,
    iter_frames,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType

# The SPEC 1 default header, written out independently of the codec.
DEFAULT_HEADER = struct.Struct(">BBHIIIHH")
LAYOUT = default_layout()


def packed(
    command: int,
    seq: int,
    body: bytes = b"",
    *,
    uid: int = 0,
    flags: int = 0,
    status: int = 0,
    version: int = 1,
    reserved: int = 0,
) -> bytes:
    header = DEFAULT_HEADER.pack(version, flags, command, seq, uid, len(body), status, reserved)
    return b"\x09" + header + body + b"\x0a"


def frame(command: int = 0x1001, seq: int = 1, body: bytes = b"", **fields: Any) -> Frame:
    """A default-layout frame as the decoder returns it (version 1, reserved 0)."""
    fields.setdefault("extra", (1, 0))
    return Frame(command=command, seq=seq, body=body, **fields)


def drain(decoder: FrameDecoder) -> list[Frame | ConnectionClosed]:
    """Every event until NEED_DATA or ConnectionClosed (included)."""
    events: list[Frame | ConnectionClosed] = []
    while (event := decoder.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def feed(decoder: FrameDecoder, *chunks: bytes) -> list[Frame | ConnectionClosed]:
    """Feed each chunk and drain after each; every event but NEED_DATA, in order."""
    events: list[Frame | ConnectionClosed] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += drain(decoder)
    return events


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# ---------------------------------------------------------------- interop vectors


def test_constants_are_spec_bytes() -> None:
    assert (START_BYTE, END_BYTE) == (0x09, 0x0A)
    assert (FLAG_RESPONSE, FLAG_PUSH) == (0b01, 0b10)
    assert LAYOUT.header_size == 20
    assert LAYOUT.max_body == 1024 * 1024
    assert LAYOUT.max_frame == 1024 * 1024 + 22


def test_encode_matches_a_hand_written_vector() -> None:
    wire = encode_frame(
        LAYOUT,
        Frame(command=0x1001, seq=0x01020304, uid=42, flags=FLAG_RESPONSE, status=3, body=b"hi"),
    )
    assert wire == bytes.fromhex(
        "09"  # start
        "01"  # version
        "01"  # flags
        "1001"  # command
        "01020304"  # seq
        "0000002a"  # uid
        "00000002"  # length
        "0003"  # status
        "0000"  # reserved
        "6869"  # body
        "0a"  # end
    )


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        ({}, b""),
        ({"uid": 7, "flags": FLAG_PUSH, "status": 2}, b"\x08\x96\x01"),
        ({"uid": 2**32 - 1, "flags": 255, "status": 2**16 - 1}, bytes(range(256))),
        ({"version": 9, "reserved": 0xBEEF}, b"\x09\x0a\x09"),
    ],
)
def test_struct_packed_frames_decode_and_re_encode(fields: dict[str, int], body: bytes) -> None:
    wire = packed(0xFFFF, 2**32 - 1, body, **fields)
    version, reserved = fields.pop("version", 1), fields.pop("reserved", 0)
    expected = frame(0xFFFF, 2**32 - 1, body, extra=(version, reserved), **fields)
    assert iter_frames(LAYOUT, [wire]) == [expected]
    assert encode_frame(LAYOUT, expected) == wire


def test_empty_extra_sends_the_fixed_values() -> None:
    assert encode_frame(LAYOUT, Frame(command=5, seq=6, body=b"x")) == packed(5, 6, b"x")


def test_request_encoder_matches_struct() -> None:
    encoder = RequestEncoder(LAYOUT)
    assert encoder.encode(0x1002, 9, 77, b"{}") == packed(0x1002, 9, b"{}", uid=77)
    assert encoder.encode(1, 2, 0, b"", flags=FLAG_PUSH) == packed(1, 2, flags=FLAG_PUSH)


def test_little_endian_frame_counted_layout_against_struct() -> None:
    layout = HeaderLayout(
        fields=(
            HeaderField(name="magic", type="u32", value=0xDEADBEEF),
            HeaderField(name="command", type="u64"),
            HeaderField(name="length", type="u16"),
            HeaderField(name="seq", type="u8"),
        ),
        byte_order="little",
        length_counts="frame",
    )
    assert layout.header_size == 15
    assert layout.extra_names == ("magic",)
    assert not layout.has("uid")
    assert layout.field_max("seq") == 255
    body = b"payload"
    wire = b"\x09" + struct.pack("<IQHB", 0xDEADBEEF, 2**64 - 1, 17 + len(body), 200) + body
    wire += b"\x0a"
    decoded = Frame(command=2**64 - 1, seq=200, body=body, extra=(0xDEADBEEF,))
    assert iter_frames(layout, bytewise(wire)) == [decoded]
    assert encode_frame(layout, Frame(command=2**64 - 1, seq=200, body=body)) == wire
    assert RequestEncoder(layout).encode(2**64 - 1, 200, 55, body) == wire  # no uid field


def test_fields_the_layout_lacks_decode_as_zero_and_are_not_sent() -> None:
    layout = HeaderLayout(
        fields=(
            HeaderField(name="command", type="u16"),
            HeaderField(name="seq", type="u16"),
            HeaderField(name="length", type="u16"),
        )
    )
    wire = encode_frame(layout, Frame(command=1, seq=2, uid=3, flags=4, status=5, body=b"b"))
    assert wire == b"\x09" + struct.pack(">HHH", 1, 2, 1) + b"b\x0a"
    assert iter_frames(layout, [wire]) == [Frame(command=1, seq=2, body=b"b")]


def test_frame_is_an_immutable_value() -> None:
    one = frame(body=b"x", flags=FLAG_RESPONSE | FLAG_PUSH)
    assert one == frame(body=b"x", flags=3)
    assert hash(one) == hash(frame(body=b"x", flags=3))
    assert one != frame(body=b"y", flags=3)
    assert one.is_response
    assert one.is_push
    assert not frame().is_response
    assert not frame().is_push
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        one.seq = 2  # type: ignore[misc]  # the point: it is frozen
    assert attrs.evolve(one, seq=2).seq == 2
    assert copy.deepcopy(one) == one
    assert pickle.loads(pickle.dumps(one)) == one


def test_decoded_frames_are_ordinary_frames() -> None:
    (decoded,) = iter_frames(LAYOUT, [packed(3, 4, b"abc", uid=5)])
    built = frame(3, 4, b"abc", uid=5)
    assert type(decoded) is Frame
    assert decoded == built
    assert hash(decoded) == hash(built)
    assert repr(decoded) == repr(built)
    assert type(decoded.body) is bytes
    assert attrs.evolve(decoded, seq=9) == attrs.evolve(built, seq=9)


def test_decoder_copies_mutable_input() -> None:
    chunk = bytearray(packed(1, 2, b"abcd"))
    decoder = FrameDecoder(LAYOUT)
    decoder.receive_data(chunk)  # type: ignore[arg-type]  # a bytearray, as sockets may give
    chunk[:] = bytes(len(chunk))
    assert decoder.next_event() == frame(1, 2, b"abcd")


# ---------------------------------------------------------------- round trips


@st.composite
def layouts(draw: st.DrawFn) -> HeaderLayout:
    names = ["command", "seq", "length"]
    names += [n for n in ("uid", "flags", "status") if draw(st.booleans())]
    names += [f"x{i}" for i in range(draw(st.integers(0, 3)))]
    names = draw(st.permutations(names))
    types = st.sampled_from(["u8", "u16", "u32", "u64"])
    fields = []
    for name in names:
        # A u8 length could not count a frame-counted header plus a body.
        kind = draw(st.sampled_from(["u16", "u32", "u64"]) if name == "length" else types)
        value = None
        if name.startswith("x") and draw(st.booleans()):
            value = draw(st.integers(0, 255))
        fields.append(HeaderField(name=name, type=kind, value=value))
    return HeaderLayout(
        fields=tuple(fields),
        byte_order=draw(st.sampled_from(["big", "little"])),
        length_counts=draw(st.sampled_from(["body", "frame"])),
        max_body=draw(st.integers(0, 300)),
    )


def frames_for(layout: HeaderLayout) -> st.SearchStrategy[Frame]:
    def value(name: str) -> st.SearchStrategy[int]:
        return st.integers(0, layout.field_max(name)) if layout.has(name) else st.just(0)

    return st.builds(
        Frame,
        command=value("command"),
        seq=value("seq"),
        uid=value("uid"),
        flags=value("flags"),
        status=value("status"),
        body=st.binary(max_size=layout.max_body),
        extra=st.tuples(*(value(name) for name in layout.extra_names)),
    )


@st.composite
def streams(draw: st.DrawFn) -> tuple[HeaderLayout, list[Frame], bytes]:
    layout = draw(layouts())
    sent = draw(st.lists(frames_for(layout), max_size=6))
    return layout, sent, b"".join(encode_frame(layout, f) for f in sent)


@given(streams(), st.lists(st.integers(0, 3000), max_size=40))
def test_round_trip_under_any_chunking(
    stream: tuple[HeaderLayout, list[Frame], bytes], cuts: list[int]
) -> None:
    layout, sent, wire = stream
    assert len(wire) == sum(len(f.body) + layout.frame_overhead for f in sent)
    assert iter_frames(layout, split(wire, cuts)) == sent
    assert iter_frames(layout, bytewise(wire)) == sent


@given(streams(), st.lists(st.tuples(st.integers(0, 3000), st.booleans()), max_size=30))
def test_round_trip_when_draining_is_skipped_between_chunks(
    stream: tuple[HeaderLayout, list[Frame], bytes], plan: list[tuple[int, bool]]
) -> None:
    # A caller may feed several chunks before draining; nothing is lost or reordered.
    layout, sent, wire = stream
    chunks = split(wire, [cut for cut, _ in plan])
    drains = [drain_now for _, drain_now in plan] + [False] * len(chunks)
    decoder = FrameDecoder(layout)
    received: list[Frame | ConnectionClosed] = []
    for chunk, drain_now in zip(chunks, drains, strict=False):
        decoder.receive_data(chunk)
        if drain_now:
            received += drain(decoder)
    assert decoder.buffered == len(wire) - sum(
        len(f.body) + layout.frame_overhead for f in received if isinstance(f, Frame)
    )
    received += feed(decoder, b"")
    assert received == [*sent, ConnectionClosed()]
    assert decoder.buffered == 0


def test_a_large_frame_one_byte_at_a_time() -> None:
    # The trickle path: a frame arriving a byte at a time is held compactly and
    # joined once; fed this way, a quadratic decoder would take minutes.
    body = bytes(range(256)) * 256
    wire = packed(7, 8, body)
    decoder = FrameDecoder(LAYOUT)
    events = []
    for i, byte in enumerate(bytewise(wire)):
        events += feed(decoder, byte)
        assert decoder.buffered == (i + 1) % len(wire)
    assert events == [frame(7, 8, body)]


def test_buffering_is_bounded_by_one_frame_and_one_chunk() -> None:
    layout = default_layout(max_body=4096)
    wire = b"".join(packed(1, n, bytes(4096)) for n in range(20))
    decoder = FrameDecoder(layout)
    chunk_size = 1000
    for chunk in split(wire, range(0, len(wire), chunk_size)):
        decoder.receive_data(chunk)
        assert decoder.buffered <= layout.max_frame + chunk_size
        drain(decoder)
        assert decoder.buffered < layout.max_frame


# ---------------------------------------------------------------- errors and limits


def first_error(layout: HeaderLayout, chunks: Sequence[bytes]) -> FramingError:
    with pytest.raises(FramingError) as caught:
        iter_frames(layout, chunks)
    return caught.value


CHUNKINGS = [
    pytest.param(lambda data: [data], id="one-chunk"),
    pytest.param(bytewise, id="bytewise"),
    pytest.param(lambda data: split(data, range(0, len(data), 7)), id="7-byte-chunks"),
]
# The metric labels (tlvproxy_frames_rejected_total{reason}) are part of the contract.
REASONS = {
    BadStartByte: "bad_start_byte",
    BadEndByte: "bad_end_byte",
    BodyTooLarge: "body_too_large",
    LengthTooSmall: "length_too_small",
    TruncatedFrame: "truncated_frame",
}


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(
    ("stream", "kind", "offset"),
    [
        pytest.param(b"\x0a" + packed(1, 1), BadStartByte, 0, id="bad-start"),
        pytest.param(packed(1, 1, b"ok") + b"GET / HTTP/1.1\r\n", BadStartByte, 24, id="http"),
        pytest.param(packed(1, 1, b"abc")[:-1] + b"\x0b", BadEndByte, 24, id="bad-end"),
        pytest.param(
            packed(1, 1) + packed(2, 2, b"xy")[:-1] + b"\x00", BadEndByte, 45, id="second-end"
        ),
        pytest.param(packed(1, 1)[:-1] + b"\x09", BadEndByte, 21, id="empty-body-end"),
        pytest.param(packed(1, 1, b"abc")[:10], TruncatedFrame, 10, id="eof-in-header"),
        pytest.param(packed(1, 1, b"abc")[:-1], TruncatedFrame, 24, id="eof-before-end"),
        pytest.param(packed(1, 1) + b"\x09", TruncatedFrame, 23, id="eof-after-start"),
    ],
)
def test_errors_name_their_kind_and_offset(
    chunking: Callable[[bytes], list[bytes]],
    stream: bytes,
    kind: type[FramingError],
    offset: int,
) -> None:
    error = first_error(LAYOUT, chunking(stream))
    assert type(error) is kind
    assert error.offset == offset
    assert error.reason == REASONS[kind]
    assert f"at stream offset {offset}" in str(error)


def test_frames_before_an_error_are_delivered_first() -> None:
    decoder = FrameDecoder(LAYOUT)
    decoder.receive_data(packed(1, 1) + packed(2, 2) + b"\xff")
    assert decoder.next_event() == frame(1, 1)
    assert decoder.next_event() == frame(2, 2)
    with pytest.raises(BadStartByte, match="start byte 0xff"):
        decoder.next_event()


def test_body_of_exactly_max_body_is_accepted() -> None:
    layout = default_layout(max_body=100)
    body = b"b" * 100
    assert iter_frames(layout, [packed(1, 1, body)]) == [frame(1, 1, body)]
    assert encode_frame(layout, frame(1, 1, body)) == packed(1, 1, body)


def test_body_over_max_body_is_refused_once_the_header_is_in() -> None:
    layout = default_layout(max_body=100)
    wire = packed(1, 1, b"b" * 101)
    decoder = FrameDecoder(layout)
    header = wire[:21]
    for byte in bytewise(header[:-1]):
        decoder.receive_data(byte)
        assert decoder.next_event() is NEED_DATA
    decoder.receive_data(header[-1:])  # no body byte has arrived yet
    with pytest.raises(BodyTooLarge, match="body length 101 is over max_body 100") as caught:
        decoder.next_event()
    assert caught.value.offset == 1 + 12  # the length field
    assert caught.value.reason == "body_too_large"


def test_a_huge_declared_length_is_refused_without_buffering() -> None:
    wire = b"\x09" + DEFAULT_HEADER.pack(1, 0, 1, 1, 0, 2**32 - 1, 0, 0)
    decoder = FrameDecoder(LAYOUT)
    decoder.receive_data(wire)
    with pytest.raises(BodyTooLarge):
        decoder.next_event()
    assert decoder.buffered == 0


def frame_counted(max_body: int) -> HeaderLayout:
    return HeaderLayout(fields=LAYOUT.fields, length_counts="frame", max_body=max_body)


def counted(command: int, seq: int, body: bytes, length: int | None = None) -> bytes:
    length = 22 + len(body) if length is None else length
    return b"\x09" + DEFAULT_HEADER.pack(1, 0, command, seq, 0, length, 0, 0) + body + b"\x0a"


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_length_counting_the_frame(chunking: Callable[[bytes], list[bytes]]) -> None:
    layout = frame_counted(max_body=10)
    wire = counted(1, 1, b"") + counted(2, 2, b"x" * 10)
    assert iter_frames(layout, chunking(wire)) == [frame(1, 1), frame(2, 2, b"x" * 10)]
    assert encode_frame(layout, frame(2, 2, b"x" * 10)) == counted(2, 2, b"x" * 10)

    too_small = first_error(layout, chunking(counted(1, 1, b"", length=21)))
    assert type(too_small) is LengthTooSmall
    assert too_small.offset == 13
    assert too_small.reason == "length_too_small"
    assert "below the 22-byte minimum" in str(too_small)

    too_large = first_error(layout, chunking(wire + counted(3, 3, b"x" * 11)))
    assert type(too_large) is BodyTooLarge
    assert too_large.offset == len(wire) + 13


def test_eof_between_frames_is_a_clean_close() -> None:
    decoder = FrameDecoder(LAYOUT)
    assert decoder.next_event() is NEED_DATA
    assert feed(decoder, packed(1, 1), b"") == [frame(1, 1), ConnectionClosed()]
    assert decoder.next_event() == ConnectionClosed()  # and it stays closed
    decoder.receive_data(b"")  # a second EOF changes nothing
    assert decoder.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError, match="data received after EOF"):
        decoder.receive_data(b"\x09")


def test_eof_on_an_empty_stream() -> None:
    assert feed(FrameDecoder(LAYOUT), b"") == [ConnectionClosed()]
    assert iter_frames(LAYOUT, []) == []


def test_a_failed_decoder_stays_broken() -> None:
    decoder = FrameDecoder(LAYOUT)
    decoder.receive_data(packed(1, 1) + b"\x00" + packed(2, 2))
    assert decoder.next_event() == frame(1, 1)
    with pytest.raises(BadStartByte) as caught:
        decoder.next_event()
    first = caught.value
    for attempt in (decoder.next_event, lambda: decoder.receive_data(packed(3, 3))):
        with pytest.raises(DecoderBroken) as again:
            attempt()
        assert again.value.cause is first
        assert again.value.offset == first.offset == 22
        assert again.value.reason == "decoder_broken"
    assert decoder.buffered == 0  # nothing is kept for a resynchronisation


# ---------------------------------------------------------------- encoding errors


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Frame(command=1, seq=1, body=bytes(101)), "body of 101 bytes is over max_body 100"),
        (Frame(command=2**16, seq=1), "does not fit the layout"),
        (Frame(command=1, seq=-1), "does not fit the layout"),
        (Frame(command=1, seq=1, uid=2**32), "does not fit the layout"),
        (Frame(command=1, seq=1, extra=(1,)), "carries 1 extra header values, the layout has 2"),
        (Frame(command=1, seq=1, extra=(256, 0)), "does not fit the layout"),
    ],
)
def test_encode_refuses_what_the_layout_cannot_carry(bad: Frame, message: str) -> None:
    layout = default_layout(max_body=100)
    with pytest.raises(ValueError, match=message):
        encode_frame(layout, bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 1, 0, bytes(101)), "body of 101 bytes is over max_body 100"),
        ((2**16, 1, 0, b""), "does not fit the layout"),
        ((1, 2**32, 0, b""), "does not fit the layout"),
        ((1, 1, -1, b""), "does not fit the layout"),
    ],
)
def test_request_encoder_refuses_like_encode_frame(
    args: tuple[int, int, int, bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RequestEncoder(default_layout(max_body=100)).encode(*args)
    with pytest.raises(ValueError, match="does not fit the layout"):
        RequestEncoder(LAYOUT).encode(1, 1, 0, b"", flags=256)


def test_encode_refuses_extra_values_on_a_layout_without_extra_fields() -> None:
    layout = HeaderLayout(
        fields=tuple(f for f in LAYOUT.fields if f.name not in ("version", "reserved"))
    )
    with pytest.raises(ValueError, match="carries 2 extra header values, the layout has 0"):
        encode_frame(layout, frame())


# ---------------------------------------------------------------- layout validation


def field(name: str, kind: str = "u32", value: int | None = None) -> HeaderField:
    return HeaderField(name=name, type=kind, value=value)  # type: ignore[arg-type]  # bad types are tested


REQUIRED = (field("command"), field("seq"), field("length"))
WIDE = tuple(field(f"x{i}", "u64") for i in range(31))  # 248 bytes of header


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fields": (field("command"), field("seq"))}, "the header needs a 'length' field"),
        ({"fields": ()}, "the header needs a 'command' field; the header needs a 'seq' field"),
        ({"fields": (*REQUIRED, field("seq"))}, "duplicate header field 'seq'"),
        ({"fields": (*REQUIRED, field("x", "u24"))}, "field 'x': unknown type 'u24'"),
        ({"fields": (*REQUIRED, field("x", "u8", 256))}, "field 'x': value 256 does not fit u8"),
        ({"fields": (*REQUIRED, field("x", "u8", -1))}, "field 'x': value -1 does not fit u8"),
        ({"fields": (*REQUIRED, field("uid", "u8", 1))}, "'uid' is filled by the gateway"),
        ({"fields": REQUIRED, "byte_order": "middle"}, "byte_order must be big or little"),
        ({"fields": REQUIRED, "length_counts": "words"}, "length_counts must be body or frame"),
        ({"fields": REQUIRED, "max_body": -1}, "max_body cannot be negative"),
        (
            {
                "fields": (*REQUIRED[:2], field("length", "u8"), *WIDE),
                "length_counts": "frame",
            },
            "a u8 length cannot count even an empty 259-byte frame",
        ),
    ],
)
def test_layout_errors_say_what_is_wrong(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        HeaderLayout(**kwargs)


def test_layout_is_a_hashable_value() -> None:
    as_list = HeaderLayout(fields=list(LAYOUT.fields))  # type: ignore[arg-type]  # lists are converted
    assert as_list == default_layout()
    assert hash(as_list) == hash(LAYOUT)
    assert default_layout(max_body=10) != LAYOUT
    with pytest.raises(KeyError):
        LAYOUT.field_max("nope")


# ---------------------------------------------------------------- the fuzz property


def load_fuzz_target() -> ModuleType:
    path = Path(__file__).parent.parent / "fuzz" / "fuzz_decoder.py"
    spec = importlib.util.spec_from_file_location("fuzz_decoder", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = load_fuzz_target()


@st.composite
def fuzz_inputs(draw: st.DrawFn) -> tuple[int, bytes, list[int]]:
    """A layout choice, then bytes: random, or valid frames with a few bytes mutated."""
    choice = draw(st.integers(0, len(FUZZ.LAYOUTS) - 1))
    layout = FUZZ.LAYOUTS[choice]
    if draw(st.booleans()):
        data = draw(st.binary(max_size=300))
    else:
        sent = draw(st.lists(frames_for(layout), max_size=4))
        data = bytearray(b"".join(encode_frame(layout, f) for f in sent))
        for _ in range(draw(st.integers(0, 3))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data[: draw(st.integers(0, len(data)))])
    return choice, data, draw(st.lists(st.integers(0, 300), max_size=20))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs())
def test_fuzz_property(case: tuple[int, bytes, list[int]]) -> None:
    choice, data, cuts = case
    FUZZ.one_input(bytes([choice]) + data)
    whole = FUZZ.check_stream(FUZZ.LAYOUTS[choice], data, [data] if data else [])
    chunked = FUZZ.check_stream(FUZZ.LAYOUTS[choice], data, split(data, cuts))
    assert FUZZ.outcome(chunked) == FUZZ.outcome(whole)


def test_fuzz_seed_corpus_passes() -> None:
    seeds = sorted((Path(__file__).parent.parent / "fuzz" / "corpus" / "decoder").iterdir())
    assert len(seeds) >= 8
    outcomes = set()
    for seed in seeds:
        data = seed.read_bytes()
        FUZZ.one_input(data)
        layout = FUZZ.LAYOUTS[data[0] % len(FUZZ.LAYOUTS)]
        _, error = FUZZ.check_stream(layout, data[1:], [data[1:]])
        outcomes.add(None if error is None else type(error))
    # The seeds cover every outcome, so the fuzzer starts from each branch.
    assert outcomes == {
        None,
        BadStartByte,
        BadEndByte,
        BodyTooLarge,
        LengthTooSmall,
        TruncatedFrame,
    }
