"""JSON text as every codec reads it (docs/reference.md "Mapping")."""

from __future__ import annotations

import pytest

from tlvproxy.schema.json_text import loads


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
