"""The chunked body decoder both parsers share (docs/reference.md "Limits")."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlvproxy.errors import BadRequest, HeadersTooLarge, PayloadTooLarge
from tlvproxy.server.chunked import MAX_CHUNK_LINE, ChunkedBody

MAX_BODY = 4096
MAX_TRAILERS = 512


def decode(wire: bytes, cuts: list[int]) -> tuple[ChunkedBody, bytes]:
    """Feed `wire` cut at `cuts` as a parser does (keeping what is not used);
    the decoder and the bytes left once it is done."""
    decoder = ChunkedBody(max_body=MAX_BODY, max_trailer_bytes=MAX_TRAILERS)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(wire)), len(wire)]
    kept = b""
    for a, b in itertools.pairwise(bounds):
        data = kept + wire[a:b]
        used = decoder.consume(data, 0)
        kept = data[used:]
        if decoder.done:
            return decoder, kept + wire[b:]
    return decoder, kept


_EXTENSIONS = st.sampled_from([b"", b";a", b";a=b", b';name="quoted \\" value"', b";x;y=z"])


@st.composite
def chunked(draw):
    body = draw(st.binary(max_size=MAX_BODY))
    sizes = draw(st.lists(st.integers(1, 700), max_size=12))
    wire, rest = b"", body
    for size in [*sizes, len(body)]:
        if rest:
            piece, rest = rest[:size], rest[size:]
            digits = b"%x" % len(piece)
            if draw(st.booleans()):
                digits = digits.upper().rjust(draw(st.integers(len(digits), 16)), b"0")
            wire += digits + draw(_EXTENSIONS) + b"\r\n" + piece + b"\r\n"
    wire += b"0" + draw(_EXTENSIONS) + b"\r\n"
    wire += b"".join(draw(st.lists(st.sampled_from([b"X-T: 1\r\n", b"Y:\t a b \r\n"]))))
    return body, wire + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(chunked(), st.lists(st.integers(0, 6000), max_size=20))
def test_any_body_under_any_cuts_is_decoded_to_its_end(case, cuts):
    body, wire = case
    decoder, rest = decode(wire + b"NEXT", cuts)
    assert decoder.done
    assert decoder.body == body
    assert rest == b"NEXT"


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"", b"5\r\nhello\r\n", b"5;a=b\r\nhel", b"0\r\n", b"0\r\nX: 1\r\n"]),
    st.binary(max_size=300),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_arbitrary_bytes_give_progress_or_a_gateway_error(prefix, junk, cuts):
    try:
        decoder, _ = decode(prefix + junk, cuts)
    except (BadRequest, PayloadTooLarge, HeadersTooLarge):
        return
    assert len(decoder.body) <= MAX_BODY


def test_one_byte_chunks_make_one_buffer():
    decoder, rest = decode(b"1\r\na\r\n" * 4000 + b"0\r\n\r\n", list(range(0, 24_005, 1000)))
    assert decoder.done
    assert rest == b""
    assert type(decoder.body) is bytearray
    assert decoder.body == b"a" * 4000


def test_a_chunk_over_the_limit_is_refused_before_its_data():
    decoder = ChunkedBody(max_body=MAX_BODY, max_trailer_bytes=MAX_TRAILERS)
    assert decoder.consume(b"800\r\n" + b"x" * 0x800 + b"\r\n", 0) == 0x800 + 7
    with pytest.raises(PayloadTooLarge):
        decoder.consume(b"801\r\n", 0)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"5;x=" + b"e" * (MAX_CHUNK_LINE - 6) + b"\r\nhello\r\n0\r\n\r\n", None),
        (b"5;x=" + b"e" * (MAX_CHUNK_LINE - 5) + b"\r\nhello\r\n0\r\n\r\n", BadRequest),
        # Incomplete, but already longer than a chunk-size line may be.
        (b"5;x=" + b"e" * MAX_CHUNK_LINE, BadRequest),
        (b"0\r\nX: " + b"t" * (MAX_TRAILERS - 7) + b"\r\n\r\n", None),
        (b"0\r\nX: " + b"t" * (MAX_TRAILERS - 6) + b"\r\n\r\n", HeadersTooLarge),
        (b"0\r\nX: " + b"t" * MAX_TRAILERS, HeadersTooLarge),
        (b"5\r\nhello\r0\r\n\r\n", BadRequest),
        (b"5\r\nhelloX", BadRequest),  # the CR after the data, found wrong at once
    ],
)
def test_lines_are_bounded(wire, error):
    for cuts in ([], list(range(len(wire)))):
        if error is None:
            decoder, rest = decode(wire, cuts)
            assert decoder.done
            assert rest == b""
        else:
            with pytest.raises(error):
                decode(wire, cuts)
