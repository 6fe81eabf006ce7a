"""Config space decoding, against lspci output captured in the lab, and under fuzzing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lspci_oracle import compare
from udrv.errors import ConfigSpaceError
from udrv.pci.config import Command, decode, describe, walk_capabilities, walk_extended

DATA = Path(__file__).parent / "data" / "pci"
DUMPS = sorted(p.stem for p in DATA.glob("*.config"))


def test_dumps_exist() -> None:
    assert {"edu", "e1000", "e1000e", "nvme", "rtl8139", "pcie-root-port"} <= set(DUMPS)


@pytest.mark.parametrize("name", DUMPS)
def test_decoding_agrees_with_lspci(name: str) -> None:
    cs = decode((DATA / f"{name}.config").read_bytes())
    compare(cs, (DATA / f"{name}.lspci").read_text())


def test_details() -> None:
    e1000e = decode((DATA / "e1000e.config").read_bytes())
    assert (e1000e.vendor, e1000e.device, e1000e.class_code) == (0x8086, 0x10D3, 0x020000)
    assert [c.name for c in e1000e.capabilities] == [
        "Power Management", "MSI", "PCI Express", "MSI-X", "Advanced Error Reporting", "Device Serial Number",
    ]  # fmt: skip
    dsn = e1000e.cap("Device Serial Number")
    assert dsn and dsn.fields["serial"] == 0x525400FFFF123406
    bridge = decode((DATA / "pcie-root-port.config").read_bytes())
    assert bridge.header_type == 1 and bridge.subsystem_vendor is None
    assert bridge.bridge["secondary_bus"] == 1
    assert Command.INTX_DISABLE in bridge.command
    assert any("MSI-X" in line for line in describe(e1000e))


def test_truncated_dump_is_a_clear_error() -> None:
    data = (DATA / "e1000e.config").read_bytes()
    with pytest.raises(ConfigSpaceError, match="shorter than the 64-byte header"):
        decode(data[:32])
    header_only = decode(data[:64])  # what sysfs gives a user who is not root
    assert header_only.capabilities_unreadable and header_only.capabilities == []
    with pytest.raises(ConfigSpaceError, match="past its end"):
        decode(data[:0xC9])  # the PM capability at 0xc8 is cut off


def _with_caps(chain: list[tuple[int, int, int]]) -> bytearray:
    cfg = bytearray(256)
    cfg[6] = 0x10  # status: capability list
    cfg[0x34] = chain[0][0]
    for off, cid, nxt in chain:
        cfg[off], cfg[off + 1] = cid, nxt
    return cfg


def test_capability_loop_is_detected() -> None:
    cfg = _with_caps([(0x40, 0x05, 0x50), (0x50, 0x01, 0x40)])
    with pytest.raises(ConfigSpaceError, match="loops back to 0x40"):
        decode(bytes(cfg))


def test_pointer_into_header_is_rejected() -> None:
    with pytest.raises(ConfigSpaceError, match="points into the header"):
        decode(bytes(_with_caps([(0x40, 0x05, 0x10)])))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=64, max_size=4096))
def test_random_config_never_hangs_or_crashes(data: bytes) -> None:
    start = time.monotonic()
    for fn in (decode, walk_capabilities, walk_extended):
        try:
            fn(data)
        except ConfigSpaceError:
            pass
    assert time.monotonic() - start < 1.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0x40, 0xFC).map(lambda x: x & 0xFC), st.integers(0, 255)),
        min_size=1,
        max_size=60,
    )
)
def test_hostile_capability_chains_end(links: list[tuple[int, int]]) -> None:
    cfg = bytearray(256)
    cfg[6] = 0x10
    cfg[0x34] = links[0][0]
    for off, nxt in links:
        cfg[off], cfg[off + 1] = 0x09, nxt
    try:
        caps = walk_capabilities(bytes(cfg))
    except ConfigSpaceError:
        return
    assert len(caps) <= 48  # (0x100 - 0x40) / 4 distinct offsets at most
