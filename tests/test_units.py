"""The unit parsers of the budget file: what they accept, and what their refusals say."""

from __future__ import annotations

import math

import pytest

from trainwarden.policies.schema import MemoryCap
from trainwarden.policies.units import (
    format_bytes,
    format_duration,
    parse_bytes,
    parse_count,
    parse_duration,
    parse_float_quantity,
    parse_memory_cap,
)

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("100KiB", 102_400),
        ("2TiB", 2 * 2**40),
        ("1GB", 10**9),
        ("500MB", 500 * 10**6),
        ("1kB", 1000),
        ("24Gi", 24 * GiB),
        ("24gib", 24 * GiB),
        ("  8GiB ", 8 * GiB),
        ("4096", 4096),
        ("4096B", 4096),
        (4096, 4096),
        (1e9, 10**9),
    ],
)
def test_parse_bytes_accepts(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "24XB",
            ["'24XB' has an unknown unit 'XB'", "use KiB, MiB, GiB, TiB (or KB, MB, GB, TB); e.g. 24GiB"],
        ),
        ("lots", ["'lots' is not a size", "e.g. 24GiB"]),
        ("24 GB", ["'24 GB' is not a size", "e.g. 24GiB"]),
        ("-1GiB", ["'-1GiB' is not a size: it must be positive"]),
        ("0MiB", ["it must be positive"]),
        (0, ["0 is not a size: it must be positive"]),
        (-5, ["it must be positive"]),
        ("0.5B", ["'0.5B' is less than one byte"]),
        ("24G", ["'24G' is ambiguous: write 24GiB (binary, 2^n) or 24GB (decimal, 10^n)"]),
        (True, ["true is not a size"]),
        (1.5, ["1.5 is not a whole number of bytes"]),
        (math.inf, ["not a whole number of bytes"]),
    ],
)
def test_parse_bytes_refuses(text: object, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_bytes(text)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.9, MemoryCap(fraction=0.9)),
        (1, MemoryCap(fraction=1.0)),
        (1.0, MemoryCap(fraction=1.0)),
        ("0.5", MemoryCap(fraction=0.5)),
        ("24GiB", MemoryCap(bytes=24 * GiB)),
        ("512MiB", MemoryCap(bytes=512 * 2**20)),
        ("80GB", MemoryCap(bytes=80 * 10**9)),
    ],
)
def test_parse_memory_cap_accepts(value: object, expected: MemoryCap) -> None:
    assert parse_memory_cap(value) == expected  # type: ignore[arg-type]


def test_memory_cap_resolves_against_the_device() -> None:
    assert parse_memory_cap(0.5).resolve(80 * GiB) == 40 * GiB
    assert parse_memory_cap("24GiB").resolve(80 * GiB) == 24 * GiB


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("24 GB", "'24 GB' is not a size; write 24GiB for bytes or 0.9 for a fraction of the device"),
        (
            24,
            "24 has no unit, and a bare number is a fraction of the device in (0, 1]; "
            "write 24GiB for bytes or 0.9 for a fraction of the device",
        ),
        (1.5, "1.5 has no unit"),
        ("2", "2.0 has no unit"),
        (
            0,
            "0 is not a size: it must be positive; write 24GiB for bytes or 0.9 for a fraction of the device",
        ),
        (-0.5, "it must be positive"),
        (
            "24XB",
            "'24XB' has an unknown unit 'XB'; write 24GiB for bytes or 0.9 for a fraction of the device",
        ),
        (False, "false is not a size; write 24GiB for bytes or 0.9"),
        (math.nan, "is not a size; write 24GiB"),
    ],
)
def test_parse_memory_cap_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_memory_cap(value)  # type: ignore[arg-type]
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90m", 5400.0),
        ("6h", 21600.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1d2h3m4s", 93784.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("90", 90.0),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("-90m", ["'-90m' is not a duration: it must be positive", "write 30s, 90m, 6h, 1h30m or 2d"]),
        ("0s", ["it must be positive"]),
        (0, ["0 is not a duration: it must be positive"]),
        (-3, ["it must be positive"]),
        ("90 m", ["'90 m' is not a duration;", "write 30s, 90m"]),
        ("90min", ["'90min' is not a duration"]),
        ("soon", ["'soon' is not a duration", "(a bare number is seconds)"]),
        ("30m1h", ["give each unit once, largest first (d, h, m, s, ms)"]),
        ("1h1h", ["give each unit once"]),
        (True, ["true is not a duration"]),
        (math.inf, ["inf is not a duration"]),
    ],
)
def test_parse_duration_refuses(value: object, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(value)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("50M", 50_000_000),
        ("2e9", 2_000_000_000),
        ("1.5B", 1_500_000_000),
        ("1.5G", 1_500_000_000),
        ("10k", 10_000),
        ("10K", 10_000),
        ("1T", 10**12),
        ("1_000_000", 1_000_000),
        (123, 123),
        (2e9, 2_000_000_000),
    ],
)
def test_parse_count_accepts(value: object, count: int) -> None:
    result = parse_count(value)  # type: ignore[arg-type]
    assert result == count
    assert isinstance(result, int)


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("50m", ["'50m' has an unknown suffix 'm' (did you mean 50M?)", "suffixes k, M, B or G, T"]),
        ("5X", ["unknown suffix 'X'"]),
        ("1.2345k", ["'1.2345k' is 1234.5, not a whole number"]),
        (1.5, ["1.5 is not a whole number"]),
        ("-5M", ["'-5M' is not a count: it must be positive"]),
        (0, ["0 is not a count: it must be positive"]),
        ("many", ["'many' is not a count", "write a whole number like 50000000, 50M, 1.5B or 2e9"]),
        (True, ["true is not a count"]),
        (math.nan, ["nan is not a count"]),
    ],
)
def test_parse_count_refuses(value: object, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_count(value)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("value", "flops"),
    [("3e18", 3e18), ("1.2e21", 1.2e21), ("5P", 5e15), ("2E", 2e18), ("10T", 1e13), (3e18, 3e18), (7, 7.0)],
)
def test_parse_float_quantity_accepts(value: object, flops: float) -> None:
    assert parse_float_quantity(value) == pytest.approx(flops)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("5p", ["unknown suffix 'p' (did you mean 5P?)", "write a number like 3e18, 1.2e21 or 5P"]),
        ("-3e18", ["it must be positive"]),
        (0.0, ["0.0 is not a number: it must be positive"]),
        ("1e999", ["too large"]),
        ("lots", ["'lots' is not a number"]),
        (math.inf, ["inf is not a number"]),
    ],
)
def test_parse_float_quantity_refuses(value: object, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        parse_float_quantity(value)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (int(1.2 * GiB), "1.2 GiB"),
        (24 * GiB, "24.0 GiB"),
        (300 * 2**20, "300 MiB"),
        (3 * 2**40, "3.0 TiB"),
        (-2 * GiB, "-2.0 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0.0s"),
        (4.23, "4.2s"),
        (45, "45s"),
        (303, "5m03s"),
        (3720, "1h02m"),
        (2 * 86400 + 3 * 3600, "2d03h"),
        (-5, "-5.0s"),
        (math.inf, "∞"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_formats_round_trip_through_the_parsers() -> None:
    assert parse_bytes(format_bytes(24 * GiB).replace(" ", "")) == 24 * GiB
    assert parse_duration(format_duration(3720)) == 3720.0
