"""Parsing of the table's units: durations, sizes and rates (docs/configuration.md).

Owns: the text forms "500ms", "3s", "2m", "64 KiB", "1 MiB", "10/s", "600/m".
Must not: know about YAML or the table; callers attach locations to the ValueError.
"""

from __future__ import annotations

import re

# A bare number is seconds, as an unquoted YAML number is, so "7" means 7s.
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "500ms", "3s", "2m", "1h".

    Raises ValueError for anything else or a negative duration.
    """
    if _is_number(value):
        seconds = float(value)  # type: ignore[arg-type]  # checked by _is_number
    elif isinstance(value, str) and (match := _NUMBER_UNIT.fullmatch(value)):
        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {unit!r} (use ms, s, m or h)")
        seconds = float(number) * _DURATION_UNITS[unit]
    else:
        raise ValueError(f"expected a duration like 500ms, 3s or 2m, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a byte count or a string like "64 KiB", "1 MiB", "512".

    Raises ValueError for anything else, a negative or a fractional byte count.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _NUMBER_UNIT.fullmatch(value)):
        number, unit = match.groups()
        factor = _SIZE_UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(f"unknown size unit {unit!r} (use B, KiB, MiB or GiB)")
        exact = float(number) * factor
        if exact != int(exact):
            raise ValueError(f"a size must be a whole number of bytes, got {value!r}")
        size = int(exact)
    else:
        raise ValueError(f"expected a size like 65536, 64 KiB or 1 MiB, got {value!r}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def parse_rate(value: object) -> float:
    """Events per second from a string like "10/s", "600/m" or "5/h".

    Raises ValueError for anything else or a rate that is not positive.
    """
    if isinstance(value, str) and "/" in value:
        count, _, unit = value.partition("/")
        unit = unit.strip()
        if unit not in _RATE_UNITS:
            raise ValueError(f"unknown rate unit {unit!r} (use /s, /m or /h)")
        try:
            per_unit = float(count.strip())
        except ValueError:
            raise ValueError(f"expected a rate like 10/s or 600/m, got {value!r}") from None
        if per_unit <= 0:
            raise ValueError(f"a rate must be positive, got {value!r}")
        return per_unit / _RATE_UNITS[unit]
    raise ValueError(f"expected a rate like 10/s or 600/m, got {value!r}")
