"""Durations and sizes as admins write them in the config file, and back.

Rules this module keeps:

- Durations are seconds as a float. A number means seconds; a string is a number followed by one
  unit: ``ms``, ``s``, ``m``, ``h`` or ``d`` (``250ms``, ``30s``, ``5m``, ``2h``, ``7d``). One unit
  per value: ``1h30m`` is refused rather than half-understood; write ``90m``.
- Sizes are whole bytes. Decimal units are powers of 1000 (``kB``, ``MB``, ``GB``), binary units
  powers of 1024 (``KiB``, ``MiB``, ``GiB``), ``B`` is bytes; units are case-insensitive, so ``kb``
  and ``KB`` are both 1000 bytes.
- Negative values, NaN, infinity and booleans are refused with a ValueError that says what is
  accepted: the caller (config validation) turns it into a ``key.path: reason`` line.
- Rates are a whole count per duration, ``100/1m`` or ``100/m`` (one of the unit): at most 100
  per one-minute window. ``0`` or ``off`` is no limit (None).
- ``format_duration`` and ``format_size`` pick the largest unit that represents the value exactly,
  so ``parse(format(x)) == x`` for every value the parsers return.

Stdlib only; nothing here knows about the config models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

__all__ = [
    "Rate",
    "format_duration",
    "format_rate",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

# Largest unit first: format_* walks these in order and takes the first exact fit.
_DURATION_UNITS: tuple[tuple[str, float], ...] = (
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
_DURATION_FACTORS = dict(_DURATION_UNITS)

_SIZE_FACTORS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
# Binary units first when formatting: limits are usually set in KiB/MiB.
_SIZE_FORMAT_UNITS: tuple[tuple[str, int], ...] = (
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("kB", 1000),
)

_NUMBER_UNIT = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")

_DURATION_HELP = "a number of seconds or a number with ms, s, m, h or d (e.g. 30s, 5m, 2h, 7d)"
_SIZE_HELP = "a number of bytes or a number with B, kB, MB, GB, KiB, MiB or GiB (e.g. 50MiB)"


def parse_duration(value: str | int | float) -> float:
    """Return `value` in seconds; raise ValueError if it is not a non-negative duration."""
    # bool is an int subclass; "timeout: true" is a mistake, not one second.
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_HELP}, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match is None:
            raise ValueError(f"expected {_DURATION_HELP}, got {value!r}")
        unit = match["unit"].lower() or "s"
        factor = _DURATION_FACTORS.get(unit)
        if factor is None:
            raise ValueError(
                f"unknown duration unit {match['unit']!r} in {value!r}: {_DURATION_HELP}"
            )
        seconds = float(match["number"]) * factor
    else:
        raise ValueError(f"expected {_DURATION_HELP}, got {type(value).__name__}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def parse_size(value: str | int) -> int:
    """Return `value` in bytes; raise ValueError if it is not a non-negative whole byte count."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_SIZE_HELP}, got a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match is None:
            raise ValueError(f"expected {_SIZE_HELP}, got {value!r}")
        unit = match["unit"].lower() or "b"
        factor = _SIZE_FACTORS.get(unit)
        if factor is None:
            raise ValueError(f"unknown size unit {match['unit']!r} in {value!r}: {_SIZE_HELP}")
        number = match["number"]
        if "." in number:
            # Decimal fractions are allowed ("1.5GiB") as long as they land on a whole byte;
            # integer arithmetic on the digits avoids float rounding deciding that.
            whole, _, frac = number.partition(".")
            scaled = int(whole or "0") * 10 ** len(frac) + int(frac)
            size, remainder = divmod(scaled * factor, 10 ** len(frac))
            if remainder:
                raise ValueError(f"{value!r} is not a whole number of bytes")
        else:
            size = int(number) * factor
    else:
        raise ValueError(f"expected {_SIZE_HELP}, got {type(value).__name__}")
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """Render `seconds` with the largest unit that is exact: 300 -> "5m", 0.25 -> "250ms"."""
    if seconds == 0:
        return "0s"
    for unit, factor in _DURATION_UNITS:
        count = seconds / factor
        # round() guards against 0.001 not being exact in binary; the check after it makes sure
        # the rendered text parses back to exactly the same float.
        whole = round(count)
        if whole >= 1 and math.isclose(count, whole, rel_tol=0, abs_tol=1e-9):
            text = f"{whole}{unit}"
            if parse_duration(text) == seconds:
                return text
    # Decimal keeps repr's shortest round-tripping digits but never writes an exponent, which
    # parse_duration does not accept.
    return f"{Decimal(repr(seconds)):f}s"


def format_size(size: int) -> str:
    """Render `size` bytes with the largest unit that is exact: 52428800 -> "50MiB"."""
    for unit, factor in _SIZE_FORMAT_UNITS:
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `count` events per `window` seconds."""

    count: int
    window: float


_RATE_HELP = "a count per duration such as 100/1m, 20/h or 5000/1d, or off"


def parse_rate(value: str | int) -> Rate | None:
    """Parse ``N/DURATION`` (``100/1m``, ``20/h``); ``off`` or ``0`` mean no limit (None)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_RATE_HELP}, got a boolean")
    if value == 0 or (isinstance(value, str) and value.strip().lower() in {"0", "off"}):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected {_RATE_HELP}, got {value!r}")
    count_text, slash, window_text = value.partition("/")
    count_text, window_text = count_text.strip(), window_text.strip()
    # isascii(): str.isdigit() also says yes to superscript and non-Latin digits.
    if not slash or not (count_text.isascii() and count_text.isdigit()) or not window_text:
        raise ValueError(f"expected {_RATE_HELP}, got {value!r}")
    if window_text.isalpha():  # "20/h": one of the unit
        window_text = "1" + window_text
    try:
        window = parse_duration(window_text)
    except ValueError as error:
        raise ValueError(f"{value!r}: {error}") from None
    count = int(count_text)
    if count < 1 or window <= 0:
        raise ValueError(f"{value!r}: the count and the duration must be above zero, or say off")
    return Rate(count, window)


def format_rate(rate: Rate | None) -> str:
    """The inverse of parse_rate: Rate(100, 60.0) -> "100/1m", None -> "off"."""
    if rate is None:
        return "off"
    return f"{rate.count}/{format_duration(rate.window)}"
