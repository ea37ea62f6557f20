"""JSON text as every codec reads it (docs/reference.md "Mapping")."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlvproxy.schema.json_text import dumps, loads


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
