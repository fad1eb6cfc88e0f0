"""Sizes and durations as users write them, and sizes as users read them.

Sizes are bytes with K/M/G/T suffixes in powers of 1024 (`4M`, `4MiB`, `4mb`
all mean 4194304); durations are seconds with ms/s/m suffixes. Parsers return
exact values or raise `ValueError` whose message quotes the input and says
what is expected, so callers (the config loader, the command line) can prefix
where the value came from. This module never logs and never does I/O.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# number, then an optional K/M/G/T, then an optional "B" or "iB" ("iB" only
# after a multiplier: "4iB" is not a size).
_SIZE_RE = re.compile(
    r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?:(?P<unit>[kmgt])(?:i?b)?|b)?", re.IGNORECASE
)

_DURATION_FACTORS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "": Fraction(1)}
_DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>ms|s|m)?", re.IGNORECASE)

_SIZE_NAMES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(value: str | int) -> int:
    """Bytes from `value`: an int (bytes) or text like `512`, `64K`, `1.5G`,
    `4MiB`. The result is a whole, non-negative number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"bad size {value!r} (use a number with K/M/G/T)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"bad size {value} (must not be negative)")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"bad size {value!r} (must not be negative)")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad size {value!r} (use a number with K/M/G/T)")
    unit = (match["unit"] or "").lower()
    exact = Fraction(match["number"]) * _SIZE_FACTORS[unit]
    if exact.denominator != 1:
        raise ValueError(f"bad size {value!r} (not a whole number of bytes)")
    return int(exact)


def parse_duration(value: str | int | float) -> float:
    """Seconds from `value`: a number (seconds) or text like `250ms`, `2s`,
    `1.5m`, `3`. The result is finite and non-negative."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"bad duration {value!r} (use a number with ms/s/m)")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"bad duration {value!r} (must be finite)")
        if value < 0:
            raise ValueError(f"bad duration {value!r} (must not be negative)")
        return float(value)
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"bad duration {value!r} (must not be negative)")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad duration {value!r} (use a number with ms/s/m)")
    unit = (match["unit"] or "").lower()
    return float(Fraction(match["number"]) * _DURATION_FACTORS[unit])


def format_size(size: int) -> str:
    """`size` bytes for people: `512 B`, `4.0 KiB`, `10.0 GiB` (one decimal,
    largest unit that keeps the number >= 1)."""
    if size < 0:
        return "-" + format_size(-size)
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for name in _SIZE_NAMES[1:]:
        value /= 1024
        if value < 1024 or name == _SIZE_NAMES[-1]:
            break
    # Rounding may carry to 1024.0 (e.g. 1 MiB - 1 byte); move up a unit then.
    if round(value, 1) >= 1024 and name != _SIZE_NAMES[-1]:
        return f"1.0 {_SIZE_NAMES[_SIZE_NAMES.index(name) + 1]}"
    return f"{value:.1f} {name}"
