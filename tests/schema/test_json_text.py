"""JSON text as every codec reads it (docs/reference.md "Mapping")."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.schema.json_text import check_json, dumps, loads


# orjson reads an integer outside 64 bits as a float: such a body goes to the
# json module, which reads it exactly.
@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"18446744073709551616", 2**64),
        (b"-9223372036854775809", -(2**63) - 1),
        (b'{"n": [1, 123456789012345678901234567890]}', {"n": [1, 123456789012345678901234567890]}),
        (b"\n-99999999999999999999\n", -99999999999999999999),
    ],
)
def test_integers_outside_64_bits_are_read_exactly(text, value):
    assert loads(text) == value
    assert type(loads(text)) is type(value)


def test_shorter_digit_runs_and_digits_in_strings_read_as_usual():
    text = b'{"id": 123456789012345678, "s": "1234567890123456789012", "f": 1.5}'
    assert loads(text) == {"id": 123456789012345678, "s": "1234567890123456789012", "f": 1.5}


# Any value, with NaN, infinities, integers outside 64 bits, lone surrogates,
# keys that are not strings and a YAML table's dates among them.
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=8)
    | st.dates()
    | st.datetimes(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(_VALUES)
def test_dumps_writes_what_the_json_module_writes_and_refuses_what_it_refuses(value):
    # orjson writes most values; what it would write differently (NaN as
    # null) or refuses goes to the json module, the reference.
    try:
        expected = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (ValueError, TypeError) as refused:
        with pytest.raises(type(refused), match=re.escape(str(refused))):
            dumps(value)
        return
    text = dumps(value)
    assert json.loads(text) == json.loads(expected)


def test_dumps_refuses_nan_and_infinities_even_beside_a_null():
    for value in [float("nan"), [None, float("inf")], {"a": None, "b": -float("inf")}]:
        with pytest.raises(ValueError, match="not JSON compliant"):
            dumps(value)
    assert dumps({"a": None, "b": 1e-7}) in (b'{"a":null,"b":1e-07}', b'{"a":null,"b":1e-7}')


def test_dumps_refuses_deep_nesting_as_a_value_error():
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nests too deeply"):
        dumps(deep)


def _reference_error(body: bytes) -> str | None:
    """The json module's verdict, strictly (no NaN or Infinity): the reference.
    None when it reads `body`, else its error."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        json.JSONDecoder(parse_constant=refuse).decode(text)
    except ValueError as exc:  # UnicodeDecodeError is one
        return str(exc)
    except RecursionError:
        return "the JSON nests too deeply"
    return None


# Pieces of JSON text, valid and not, among them what simdjson refuses and the
# json module accepts (integers outside 64 bits, 1e400, lone surrogate escapes,
# a byte order mark) and what neither accepts (NaN, control characters, bad UTF-8).
_PIECES = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b" ",
        b"\n",
        b'"a"',
        b'"\\u00e9"',
        b'"\\ud800"',
        b'"\xc3\xa9"',
        b'"\xff"',
        b'"\x01"',
        b"\x00",
        b"\xef\xbb\xbf",
        b"0",
        b"-0",
        b"1.5",
        b"1e400",
        b"-1e-400",
        b"18446744073709551616",
        b"01",
        b"1.",
        b".5",
        b"true",
        b"null",
        b"NaN",
        b"Infinity",
        b'"',
        b"\\",
    ]
)


def _json_text(value: object) -> bytes:
    """`value` as the json module writes it, NaN, lone surrogates and all."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


@given(st.lists(_PIECES, max_size=12).map(b"".join) | _VALUES.map(_json_text))
def test_check_json_accepts_exactly_what_the_json_module_accepts(body):
    error = _reference_error(body)
    if error is None:
        check_json(body)
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            check_json(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": 18446744073709551616}',
        b"[1e400]",
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",
        '{"a": "\u00e9"}'.encode("utf-16"),
        b"[" * 900 + b"]" * 900,
    ],
)
def test_check_json_accepts_what_simdjson_refuses_and_the_json_module_accepts(body):
    check_json(body)
    check_json(b'{"after": true}')


# Bodies over the 16 KiB that simdjson checks, and one under it.
@pytest.mark.parametrize("size", [100, 16 * 1024 + 1, 200_000])
def test_check_json_decides_bodies_of_any_size(size):
    valid = b'{"s": "' + b"x" * size + b'"}'
    check_json(valid)
    with pytest.raises(ValueError, match="Unterminated string"):
        check_json(valid[:-2])
    with pytest.raises(ValueError, match="not valid JSON"):
        check_json(valid[:-1] + b", " + b'"n": NaN}')


def test_check_json_words_errors_as_the_json_module_does():
    with pytest.raises(ValueError, match="Expecting ',' delimiter: line 1 column 9"):
        check_json(b'{"a": 1 "b": 2}')
    with pytest.raises(ValueError, match="Expecting value"):
        check_json(b"")
    check_json(b"[1]")
