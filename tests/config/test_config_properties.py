"""Property tests for the scalar parsers: durations, sizes and listen addresses."""

from __future__ import annotations

import ipaddress
import math
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config import Address, parse_address, parse_duration, parse_size

DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
                  "d": Decimal(86400)}  # fmt: skip
SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}

# Decimal numbers as people write them: "30", "1.5", "0.25"
numbers = st.decimals(min_value=0, max_value=10**9, places=3, allow_nan=False).map(
    lambda d: format(d.normalize(), "f")
)


@given(number=numbers, unit=st.sampled_from(sorted(DURATION_UNITS)))
@example(number="500", unit="ms")
@example(number="1.5", unit="s")
@example(number="7", unit="d")
def test_duration_is_number_times_unit(number: str, unit: str) -> None:
    expected = float(Decimal(number) * DURATION_UNITS[unit])
    assert parse_duration(f"{number}{unit}") == expected
    assert parse_duration(f" {number} {unit} ") == expected


@given(number=numbers)
def test_duration_without_unit_is_refused(number: str) -> None:
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration(number)


@given(text=st.text(max_size=30))
def test_duration_is_a_finite_non_negative_float_or_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert math.isfinite(seconds) and seconds >= 0


@pytest.mark.parametrize("digits", [400, 1_000_001])
def test_huge_duration_is_refused(digits: int) -> None:
    """A million digits once overflowed decimal's exponent and raised decimal.Overflow."""
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * digits + "d")


@pytest.mark.parametrize("digits", [400, 1_000_001])
def test_huge_size_is_refused(digits: int) -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("9" * digits + "GiB")


@given(count=st.integers(min_value=0, max_value=2**40), unit=st.sampled_from(sorted(SIZE_UNITS)))
def test_size_is_count_times_unit(count: int, unit: str) -> None:
    assert parse_size(f"{count}{unit}") == count * SIZE_UNITS[unit]
    assert parse_size(str(count)) == count


@given(
    halves=st.integers(min_value=0, max_value=10**6),
    unit=st.sampled_from(["KiB", "MiB", "GiB"]),
)
def test_fractional_sizes_in_binary_units_are_exact(halves: int, unit: str) -> None:
    text = f"{halves // 2}.5{unit}" if halves % 2 else f"{halves // 2}{unit}"
    assert parse_size(text) == halves * SIZE_UNITS[unit] // 2


@given(text=st.text(max_size=30))
def test_size_is_a_non_negative_int_or_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(size, int) and size >= 0


hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a)))
ports = st.integers(min_value=0, max_value=65535)


@given(host=st.one_of(hostnames, ipv4), port=ports)
def test_address_round_trip(host: str, port: int) -> None:
    assert parse_address(f"{host}:{port}") == Address(host, port)


@given(host=ipv6, port=ports)
def test_ipv6_address_round_trip(host: str, port: int) -> None:
    assert parse_address(f"[{host}]:{port}") == Address(host, port)


@given(host=st.one_of(hostnames, ipv4), port=st.integers(min_value=65536, max_value=10**6))
def test_port_out_of_range_is_refused(host: str, port: int) -> None:
    with pytest.raises(ValueError, match="0 to 65535"):
        parse_address(f"{host}:{port}")
