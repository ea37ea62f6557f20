"""The table's units (SPEC 3): durations, sizes and rates, and what bad input says."""

from __future__ import annotations

import re

import pytest

from tlvproxy.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (3, 3.0),
        (0, 0.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("3s", 3.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 30s ", 30.0),
        ("10 s", 10.0),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3d", "unknown duration unit 'd' (use ms, s, m or h)"),
        ("3S", "unknown duration unit 'S'"),
        ("fast", "expected a duration like 500ms, 3s or 2m, got 'fast'"),
        ("-3s", "expected a duration like 500ms, 3s or 2m, got '-3s'"),
        ("", "expected a duration like 500ms, 3s or 2m, got ''"),
        (None, "expected a duration like 500ms, 3s or 2m, got None"),
        (True, "expected a duration like 500ms, 3s or 2m, got True"),
        ([1], "expected a duration like 500ms, 3s or 2m, got [1]"),
        (-1, "a duration cannot be negative, got -1"),
        (-0.5, "a duration cannot be negative, got -0.5"),
    ],
)
def test_bad_durations(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (65536, 65536),
        ("512", 512),
        ("512B", 512),
        ("64 KiB", 65536),
        ("64kib", 65536),
        ("1 MiB", 1024 * 1024),
        ("1 GiB", 1024**3),
        ("2 KB", 2000),
        ("2k", 2000),
        ("3 MB", 3_000_000),
        ("1 G", 10**9),
        ("1.5 KiB", 1536),
        ("0.5 MiB", 512 * 1024),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 TiB", "unknown size unit 'TiB' (use B, KiB, MiB or GiB)"),
        ("10 bytes", "unknown size unit 'bytes'"),
        ("1.3 B", "a size must be a whole number of bytes, got '1.3 B'"),
        ("1.0001 KiB", "a size must be a whole number of bytes"),
        ("big", "expected a size like 65536, 64 KiB or 1 MiB, got 'big'"),
        ("-1 KiB", "expected a size like 65536, 64 KiB or 1 MiB, got '-1 KiB'"),
        (1.5, "expected a size like 65536, 64 KiB or 1 MiB, got 1.5"),
        (False, "expected a size like 65536, 64 KiB or 1 MiB, got False"),
        (None, "expected a size like 65536, 64 KiB or 1 MiB, got None"),
        (-1, "a size cannot be negative, got -1"),
    ],
)
def test_bad_sizes(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/s", 10.0),
        ("600/m", 10.0),
        ("3600/h", 1.0),
        ("1/m", 1 / 60),
        ("0.5/s", 0.5),
        (" 20 / s ", 20.0),
    ],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10/d", "unknown rate unit 'd' (use /s, /m or /h)"),
        ("10/", "unknown rate unit ''"),
        ("ten/s", "expected a rate like 10/s or 600/m, got 'ten/s'"),
        ("10", "expected a rate like 10/s or 600/m, got '10'"),
        (10, "expected a rate like 10/s or 600/m, got 10"),
        (None, "expected a rate like 10/s or 600/m, got None"),
        ("0/s", "a rate must be positive, got '0/s'"),
        ("-5/s", "a rate must be positive, got '-5/s'"),
    ],
)
def test_bad_rates(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_rate(text)
