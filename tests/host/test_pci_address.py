"""PCI addresses and selectors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.errors import AddressError
from udrv.pci.address import DeviceFilter, IdFilter, PciAddress, parse_selector


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_round_trip_and_short_form(d: int, b: int, s: int, f: int) -> None:
    addr = PciAddress(d, b, s, f)
    assert PciAddress.parse(str(addr)) == addr == parse_selector(str(addr).upper())
    assert addr.devfn == s << 3 | f and addr.device == s
    if d == 0:
        assert PciAddress.parse(str(addr)[5:]) == addr


def test_kernel_spelling() -> None:
    assert str(PciAddress.parse("0:4.0")) == "0000:00:04.0"
    assert str(PciAddress.parse(" 0001:3a:1f.7\n")) == "0001:3a:1f.7"
    assert sorted([PciAddress(0, 0, 5, 0), PciAddress(0, 0, 4, 1)])[0] == PciAddress(0, 0, 4, 1)


@pytest.mark.parametrize(
    "text",
    ["00:04", "0000:00:04.8", "zz:04.0", "00:20.0", "00000:00:04.0", "00:04.0.1", "00:04.0\nx"],
)
def test_bad_addresses_name_the_text_and_the_forms(text: str) -> None:
    with pytest.raises(AddressError) as err:
        PciAddress.parse(text)
    assert repr(text) in str(err.value) or "out of range" in str(err.value)
    assert "0000:00:04.0, 00:04.0, or a vendor:device id" in str(err.value)


def test_out_of_range_fields() -> None:
    with pytest.raises(AddressError, match="out of range"):
        PciAddress(0, 0x100, 0, 0)
    with pytest.raises(AddressError, match="functions 0-7"):
        PciAddress(0, 0, 0, 8)


def test_selector_kinds() -> None:
    assert parse_selector("1234:11e8") == IdFilter(0x1234, 0x11E8) == DeviceFilter(0x1234, 0x11E8)
    assert parse_selector("00:04.0") == PciAddress(0, 0, 4, 0)
    assert IdFilter(0x8086, 0x10D3).matches(0x8086, 0x10D3)
    assert not IdFilter(0x8086, 0x10D3).matches(0x8086, 0x100E)
    assert str(IdFilter(0x1AF4, 0x1)) == "1af4:0001"


@pytest.mark.parametrize(
    "text", ["1234:11e", "1234:11e8:0", "8086", "", "8086:10d3x", "0000:00:04"]
)
def test_bad_selectors(text: str) -> None:
    with pytest.raises(AddressError, match="neither a PCI address nor a vendor:device id"):
        parse_selector(text)


@given(st.text(max_size=20))
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    try:
        sel = parse_selector(text)
    except AddressError:
        return
    assert parse_selector(str(sel)) == sel  # whatever parses prints back to itself
