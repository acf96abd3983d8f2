"""Parsers for the quantities of a budget file: sizes, durations, counts, FLOPs.

Pure functions. Each raises ValueError with a message that says what was wrong and what a
valid value looks like, so the loader can put it after `file:line: key:` unchanged.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from trainwarden.controller.schema import MemoryCap

# A number as people write it in a config file: 24, 1.5, .5, 2e9, 1_000_000.
_NUMBER = r"[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?"
_NUMBER_UNIT = re.compile(rf"^({_NUMBER})([A-Za-z]*)$")
_NUMBER_SPACE_UNIT = re.compile(rf"^({_NUMBER})\s+([A-Za-z]+)$")

_BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}
#: Kubernetes spells the binary units without the B.
_KUBERNETES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_BYTE_UNITS: dict[str, int] = {"B": 1, **_BINARY, **_DECIMAL, **_KUBERNETES}
_BYTE_UNITS_LOWER = {unit.lower(): factor for unit, factor in _BYTE_UNITS.items()}
_BYTES_HELP = "use KiB, MiB, GiB, TiB (or KB, MB, GB, TB); e.g. 24GiB"
MEMORY_CAP_HELP = "write 24GiB for bytes or 0.9 for a fraction of the device"

_COUNT_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT_HELP = "write a whole number like 50000000, 50M, 1.5B or 2e9 (suffixes k, M, B or G, T)"
_FLOPS_SUFFIXES = {**_COUNT_SUFFIXES, "P": 10**15, "E": 10**18}
_FLOPS_HELP = "write a number like 3e18, 1.2e21 or 5P (suffixes k, M, G, T, P, E)"

_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "ms": Decimal("0.001")}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|d|h|m|s)")
_DURATION_HELP = "write 30s, 90m, 6h, 1h30m or 2d (a bare number is seconds)"


#: Largest count, size or number of bytes a budget file may give (and the controller can use).
_MAX_INT = 2**63 - 1


def _show(value: object) -> str:
    """`value` as messages quote it: its repr, cut to 60 characters."""
    try:
        shown = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return "a number with thousands of digits"
    return shown if len(shown) <= 60 else shown[:56] + "...'"


def _out_of_range(help_text: str):  # type: ignore[no-untyped-def]
    """Decimal arithmetic signals Overflow / InvalidOperation (ArithmeticErrors), and float() of
    a huge int raises OverflowError: all of them become the ValueError the loader reports."""
    import functools

    def wrap(parse):  # type: ignore[no-untyped-def]
        @functools.wraps(parse)
        def checked(value):  # type: ignore[no-untyped-def]
            try:
                return parse(value)
            except ArithmeticError:
                raise ValueError(f"{_show(value)} is out of range; {help_text}") from None

        return checked

    return wrap


def _decimal(number: str) -> Decimal:
    return Decimal(number.replace("_", ""))


def _split(text: str) -> tuple[Decimal, str] | None:
    """`1.5GiB` -> (Decimal('1.5'), 'GiB'); None when `text` is not a number and a unit."""
    match = _NUMBER_UNIT.match(text.strip())
    if not match:
        return None
    try:
        return _decimal(match.group(1)), match.group(2)
    except InvalidOperation:
        return None


def _reject_bool(value: object, what: str, help_text: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not {what}; {help_text}")


@_out_of_range(_BYTES_HELP)
def parse_bytes(text: str | int | float) -> int:
    """A size in bytes: `24GiB`, `512MiB`, `1.5GiB`, SI `1GB` (10**9), or a plain integer of bytes."""
    _reject_bool(text, "a size", _BYTES_HELP)
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text != int(text):
            raise ValueError(f"{_show(text)} is not a whole number of bytes; {_BYTES_HELP}")
        if abs(text) > _MAX_INT:
            raise ValueError(f"{_show(text)} is too large; {_BYTES_HELP}")
        return _positive_bytes(int(text), _show(text))
    if not isinstance(text, str):
        raise ValueError(f"{_show(text)} is not a size; {_BYTES_HELP}")
    return _parse_byte_text(text, _BYTES_HELP)


def _parse_byte_text(text: str, help_text: str) -> int:
    if _NUMBER_SPACE_UNIT.match(text.strip()):
        raise ValueError(f"{_show(text)} is not a size; {help_text}")
    split = _split(text)
    if split is None:
        raise ValueError(f"{_show(text)} is not a size; {help_text}")
    number, unit = split
    factor = _BYTE_UNITS.get(unit) or _BYTE_UNITS_LOWER.get(unit.lower())
    if unit == "":
        factor = 1
    if factor is None:
        if unit.upper() in ("K", "M", "G", "T", "P"):
            u = unit.upper()
            raise ValueError(
                f"{_show(text)} is ambiguous: write {number}{u}iB (binary, 2^n) "
                f"or {number}{u}B (decimal, 10^n)"
            )
        raise ValueError(f"{_show(text)} has an unknown unit {unit!r}; {help_text}")
    if number * factor > _MAX_INT:
        raise ValueError(f"{_show(text)} is too large; {help_text}")
    return _positive_bytes(int(number * factor), _show(text), number)


def _positive_bytes(n: int, shown: str, number: Decimal | None = None) -> int:
    if (number if number is not None else n) <= 0:
        raise ValueError(f"{shown} is not a size: it must be positive; {_BYTES_HELP}")
    if n == 0:
        raise ValueError(f"{shown} is less than one byte; {_BYTES_HELP}")
    return n


@_out_of_range(MEMORY_CAP_HELP)
def parse_memory_cap(value: str | int | float) -> MemoryCap:
    """A device memory cap: a number in (0, 1] is a fraction of the device, `24GiB` is bytes."""
    _reject_bool(value, "a size", MEMORY_CAP_HELP)
    if isinstance(value, str):
        stripped = value.strip()
        try:
            number = float(stripped) if re.fullmatch(_NUMBER, stripped) else None
        except ValueError:
            number = None
        if number is None:
            return MemoryCap(bytes=_parse_byte_text(value, MEMORY_CAP_HELP))
        value = number
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_show(value)} is not a size; {MEMORY_CAP_HELP}")
    if value <= 0:
        raise ValueError(f"{_show(value)} is not a size: it must be positive; {MEMORY_CAP_HELP}")
    if value > 1:
        raise ValueError(
            f"{_show(value)} has no unit, and a bare number is a fraction of the device in (0, 1]; "
            f"{MEMORY_CAP_HELP}"
        )
    return MemoryCap(fraction=float(value))


@_out_of_range(_DURATION_HELP)
def parse_duration(value: str | int | float) -> float:
    """Seconds from `30s`, `90m`, `6h`, `1h30m`, `2d`, `500ms`; a bare number is seconds."""
    _reject_bool(value, "a duration", _DURATION_HELP)
    if isinstance(value, (int, float)):
        return _positive_seconds(float(value), _show(value))
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not a duration; {_DURATION_HELP}")
    text = value.strip()
    if re.fullmatch(_NUMBER, text):
        return _positive_seconds(float(_decimal(text)), _show(value))
    if text.startswith("-"):
        raise ValueError(f"{_show(value)} is not a duration: it must be positive; {_DURATION_HELP}")
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{_show(value)} is not a duration; {_DURATION_HELP}")
    order = list(_DURATION_UNITS)
    units = [u for _, u in parts]
    if len(set(units)) != len(units) or units != sorted(units, key=order.index):
        raise ValueError(
            f"{_show(value)} is not a duration: give each unit once, largest first (d, h, m, s, ms); "
            f"{_DURATION_HELP}"
        )
    seconds = sum(Decimal(n) * _DURATION_UNITS[u] for n, u in parts)
    return _positive_seconds(float(seconds), _show(value))


def _positive_seconds(seconds: float, shown: str) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"{shown} is not a duration; {_DURATION_HELP}")
    if seconds <= 0:
        raise ValueError(f"{shown} is not a duration: it must be positive; {_DURATION_HELP}")
    return seconds


def _parse_scaled(
    value: str | int | float, suffixes: dict[str, int], what: str, help_text: str
) -> tuple[Decimal, str]:
    """(number x suffix, shown) for counts and FLOPs; checks positive and finite."""
    _reject_bool(value, what, help_text)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_show(value)} is not {what}; {help_text}")
        number, shown = Decimal(value), _show(value)
    elif isinstance(value, str):
        split = _split(value)
        if split is None:
            raise ValueError(f"{_show(value)} is not {what}; {help_text}")
        n, suffix = split
        if suffix not in suffixes:
            hint = f" (did you mean {n}{suffix.upper()}?)" if suffix.upper() in suffixes else ""
            raise ValueError(f"{_show(value)} has an unknown suffix {suffix!r}{hint}; {help_text}")
        number, shown = n * suffixes[suffix], _show(value)
    else:
        raise ValueError(f"{_show(value)} is not {what}; {help_text}")
    if number <= 0:
        raise ValueError(f"{shown} is not {what}: it must be positive; {help_text}")
    return number, shown


@_out_of_range(_COUNT_HELP)
def parse_count(value: str | int | float) -> int:
    """A positive whole count: `50M`, `2e9`, `1.5B`, `10k`, `1T` (decimal suffixes) or an int."""
    number, shown = _parse_scaled(value, _COUNT_SUFFIXES, "a count", _COUNT_HELP)
    if number != number.to_integral_value():
        value_is = f" is {number.normalize():f}," if isinstance(value, str) else " is"
        raise ValueError(f"{shown}{value_is} not a whole number; {_COUNT_HELP}")
    if number > _MAX_INT:
        raise ValueError(f"{shown} is too large; {_COUNT_HELP}")
    return int(number)


@_out_of_range(_FLOPS_HELP)
def parse_float_quantity(value: str | int | float) -> float:
    """A positive amount such as FLOPs: `3e18`, `1.2e21`, `5P` (peta), `2E` (exa)."""
    number, _ = _parse_scaled(value, _FLOPS_SUFFIXES, "a number", _FLOPS_HELP)
    result = float(number)
    if not math.isfinite(result):
        raise ValueError(f"{_show(value)} is too large; {_FLOPS_HELP}")
    if result <= 0:
        raise ValueError(f"{_show(value)} is too small; {_FLOPS_HELP}")
    return result


def format_bytes(n: int | float) -> str:
    """`1.2 GiB`, `512 MiB`, `100 B`: binary units, one decimal below 100."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n:.0f} B"
    value = float(n)
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    index = 0
    value /= 1024
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    unit = units[index]
    number = f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    return f"{sign}{number} {unit}"


def format_duration(seconds: float) -> str:
    """`4.2s`, `45s`, `5m03s`, `1h02m`, `2d03h`: two units at most, for status lines."""
    if not math.isfinite(seconds):
        return "∞" if seconds > 0 else "-∞" if seconds < 0 else "?"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 10:
        return f"{sign}{s:.1f}s"
    total = round(s)
    if total < 60:
        return f"{sign}{total}s"
    if total < 3600:
        return f"{sign}{total // 60}m{total % 60:02d}s"
    minutes = round(s / 60)
    if minutes < 24 * 60:
        return f"{sign}{minutes // 60}h{minutes % 60:02d}m"
    hours = round(s / 3600)
    return f"{sign}{hours // 24}d{hours % 24:02d}h"
