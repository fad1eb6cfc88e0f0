"""Sizes and durations as users write them (dstfuse.units)."""

from __future__ import annotations

import pytest

from dstfuse.units import format_size, parse_duration, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("64K", 64 * K),
        ("64k", 64 * K),
        ("4M", 4 * M),
        ("4MB", 4 * M),
        ("4MiB", 4 * M),
        ("4mib", 4 * M),
        ("4 MiB", 4 * M),
        (" 10G ", 10 * G),
        ("2T", 2 * T),
        ("1.5K", 1536),
        ("0.5M", 512 * K),
        (".5G", 512 * M),
    ],
)
def test_parse_size_accepts_suffixes_in_powers_of_1024(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10Q", "bad size '10Q' (use a number with K/M/G/T)"),
        ("", "bad size '' (use a number with K/M/G/T)"),
        ("K", "bad size 'K' (use a number with K/M/G/T)"),
        ("4iB", "bad size '4iB' (use a number with K/M/G/T)"),
        ("4 M B", "bad size '4 M B' (use a number with K/M/G/T)"),
        ("1e3", "bad size '1e3' (use a number with K/M/G/T)"),
        ("-1", "bad size '-1' (must not be negative)"),
        ("-4K", "bad size '-4K' (must not be negative)"),
        (-1, "bad size -1 (must not be negative)"),
        ("0.1K", "bad size '0.1K' (not a whole number of bytes)"),
        ("1.5", "bad size '1.5' (not a whole number of bytes)"),
        (True, "bad size True (use a number with K/M/G/T)"),
        (1.5, "bad size 1.5 (use a number with K/M/G/T)"),
        (None, "bad size None (use a number with K/M/G/T)"),
    ],
)
def test_parse_size_rejects_with_clear_message(text, message):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (2, 2.0),
        (0.5, 0.5),
        ("3", 3.0),
        ("2s", 2.0),
        ("2S", 2.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1.5m", 90.0),
        ("0", 0.0),
        (" 5 s ", 5.0),
    ],
)
def test_parse_duration_accepts_ms_s_m(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5x", "bad duration '5x' (use a number with ms/s/m)"),
        ("1h", "bad duration '1h' (use a number with ms/s/m)"),
        ("s", "bad duration 's' (use a number with ms/s/m)"),
        ("", "bad duration '' (use a number with ms/s/m)"),
        ("-1s", "bad duration '-1s' (must not be negative)"),
        (-2, "bad duration -2 (must not be negative)"),
        (float("inf"), "bad duration inf (must be finite)"),
        (float("nan"), "bad duration nan (must be finite)"),
        (False, "bad duration False (use a number with ms/s/m)"),
    ],
)
def test_parse_duration_rejects_with_clear_message(text, message):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (4 * M, "4.0 MiB"),
        (10 * G, "10.0 GiB"),
        (M - 1, "1.0 MiB"),
        (3 * T, "3.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size_for_people(size, text):
    assert format_size(size) == text


@pytest.mark.parametrize("size", [0, 1, 4096, 10 * G, 3 * T])
def test_format_size_round_trips_through_parse_size_for_whole_units(size):
    number, unit = format_size(size).split()
    assert parse_size(f"{number.removesuffix('.0')}{unit}") == size
