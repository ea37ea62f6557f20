"""JSON text: parsing and writing bodies, strictly and fast (docs/reference.md
"Mapping").

Owns: the one strict reading of JSON text every codec shares (no NaN or
Infinity literals, any integer size, UTF-8, -16 or -32), orjson first where it
reads the same value, the json module deciding and wording the rest; checking
JSON text without reading it (simdjson first, for the usual small bodies);
writing JSON text; and `show`, a value as an error message quotes it.
Must not: do I/O or know a codec.
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson
import simdjson

from tlvproxy.errors import BadRequest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Built once: json.loads/json.dumps with options build a new decoder/encoder on
# every call, which costs more than parsing a small body (issue 10).
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# orjson refusing dates, times, dataclasses and subclasses of the JSON types,
# which it would write and the json module writes otherwise or refuses. (It
# still writes a UUID or an Enum, which no parsed JSON or YAML value is.)
_NATIVE_ONLY: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


# Every digit as "0", every other byte as a space: 19 digits in a row are then 19 zeros.
_DIGITS_AS_ZEROS: Final = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGIT_RUN: Final = b"0" * 19


def has_long_digit_run(text: bytes) -> bool:
    """Whether `text` holds 19 digits in a row: maybe an integer outside 64
    bits (-9223372036854775809, 18446744073709551616), which orjson reads as a
    float. 0.27 us on a 200-byte body, where the regex \\d{19} took 1.83."""
    return _LONG_DIGIT_RUN in text.translate(_DIGITS_AS_ZEROS)


def loads(body: bytes) -> Any:
    """Parse JSON text strictly (no NaN/Infinity literals). Raises ValueError."""
    # orjson parses a typical body 4x faster, to the same value, unless it holds
    # an integer outside 64 bits. Such a body goes to the json module, as does
    # whatever orjson refuses (UTF-16, 1e400, a lone surrogate escape, nesting
    # over 1024, invalid JSON): the json module decides and words the error.
    if not has_long_digit_run(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32, found from the first bytes.
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


def loads_inexact(body: bytes) -> Any:
    """`loads` with orjson alone: an integer outside 64 bits comes back as the
    nearest float (10000000000000000000000 as 1e22). Only for a reader that
    takes a float of that size solely where such an integer would become that
    same float (a double field, as the protobuf readers do), and reads the
    body again with `loads` before it refuses anything. Raises ValueError
    (orjson's JSONDecodeError) for what orjson refuses, which `loads` may
    still read."""
    return orjson.loads(body)


def loads_text(text: str) -> Any:
    """Parse JSON text already decoded, strictly (no NaN/Infinity literals),
    with the json module: integers of any size are read exactly. Raises
    ValueError, or RecursionError for deep nesting."""
    return _DECODER.decode(text)


# The largest body simdjson checks. Its parser keeps the buffers of the largest
# document it has seen: under half a MiB for 16 KiB of text, measured at the
# worst (every byte a bracket or a comma). Larger bodies go to orjson.
_CHECKED_BY_SIMDJSON: Final = 16 * 1024
_CHECKER: Final = simdjson.Parser(max_capacity=_CHECKED_BY_SIMDJSON)


def check_json(body: bytes) -> None:
    """Raise ValueError unless `body` is JSON text (strictly, as `loads`).

    Only validity matters here, not the value. simdjson checks a body without
    making a Python object of it (0.2 us for 200 bytes, against 0.6 for
    orjson's `loads`, and more in a busy process, where each of its objects is
    a fresh allocation). It accepts only what `loads` accepts; whatever it
    refuses (a big integer, 1e400, a lone surrogate escape, UTF-16, text over
    its capacity, invalid JSON) goes to orjson and then to the json module,
    which decide, and word the error.
    """
    try:
        # The result, a proxy holding the parser until it is dropped, is dropped
        # at once: the parser refuses a new document while one is held.
        _CHECKER.parse(body)
        return
    except (ValueError, RuntimeError):
        pass
    # orjson reads an integer outside 64 bits as a float: still valid JSON.
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        loads(body)


def dumps(value: Any) -> bytes:
    """Compact JSON text (UTF-8) of `value`. Raises ValueError for NaN, an
    infinity, a lone surrogate or deep nesting, TypeError for what JSON
    cannot hold."""
    # orjson writes a message 4x faster, to the same JSON (floats may differ
    # in the form of their exponent: 1e-7, not 1e-07), but writes NaN and
    # the infinities as null: text holding a null goes to the json module,
    # as does whatever orjson refuses (an integer outside 64 bits, a key
    # that is not a string, a lone surrogate, deep nesting), and, by
    # _NATIVE_ONLY, the types it would write where the json module refuses
    # them (a YAML table's dates).
    try:
        text = orjson.dumps(value, option=_NATIVE_ONLY)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"null" not in text:
            return text
    try:
        return _ENCODER.encode(value).encode()
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


def dumps_converted(value: Any) -> bytes:
    """JSON text of a converter's output (str keys, no NaN floats: the proto3
    mapping writes those as strings): `dumps`, without looking for NaN."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer outside 64 bits, say
        return dumps(value)


def parse_body(body: bytes) -> Any:
    try:
        return loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


def show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode()
    except UnicodeEncodeError:
        # A lone surrogate cannot be written as UTF-8 in the error body: escape it.
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
