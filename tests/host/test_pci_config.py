"""Config space decoding: lab dumps against lspci, synthetic headers built byte by byte, fuzzing."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lspci_oracle import compare
from udrv.errors import ConfigSpaceError
from udrv.pci.config import (
    BridgeControl,
    Command,
    Status,
    Type0,
    Type1,
    decode,
    decode_header,
    describe,
    header_lines,
    human_size,
    walk_capabilities,
    walk_extended,
)
from udrv.pci.sysfs import read_resources

DATA = Path(__file__).parent / "data" / "pci"
# Whatever dumps the lab captured (NAME.config + NAME.lspci [+ NAME.resource]).
DUMPS = sorted(p.stem for p in DATA.glob("*.config"))


class Cfg(bytearray):
    """A config space built register by register (little-endian, as on the bus)."""

    def __init__(self, size: int = 256) -> None:
        super().__init__(size)

    def put(self, off: int, fmt: str, value: int) -> Cfg:
        struct.pack_into("<" + fmt, self, off, value)
        return self


def edu_like() -> Cfg:
    """QEMU's edu: 1234:11e8 rev 10, class 00ff00, one 1 MiB 32-bit BAR, MSI at 0x40."""
    c = Cfg()
    c.put(0x00, "H", 0x1234).put(0x02, "H", 0x11E8).put(0x04, "H", 0x0103)
    c.put(0x06, "H", 0x0010).put(0x08, "B", 0x10).put(0x0A, "H", 0x00FF)
    c.put(0x10, "I", 0xFE400000).put(0x2C, "H", 0x1AF4).put(0x2E, "H", 0x1100)
    c.put(0x34, "B", 0x40).put(0x3C, "B", 10).put(0x3D, "B", 1)
    c.put(0x40, "B", 0x05).put(0x41, "B", 0).put(0x42, "H", 0x0080)  # MSI, 64-bit capable
    return c


def test_dumps_exist() -> None:
    assert {"edu", "e1000", "e1000e", "nvme", "rtl8139", "pcie-root-port"} <= set(DUMPS)


@pytest.mark.parametrize("name", DUMPS)
def test_decoding_agrees_with_lspci(name: str) -> None:
    cs = decode((DATA / f"{name}.config").read_bytes())
    compare(cs, (DATA / f"{name}.lspci").read_text())


@pytest.mark.parametrize("name", DUMPS)
def test_describe_reproduces_lspci_lines(name: str) -> None:
    """Control/Status, Region, Bus, capability title and MSI/MSI-X/PM detail lines are
    character for character what lspci -vvv printed for the same device."""
    raw = (DATA / f"{name}.config").read_bytes()
    lspci = (DATA / f"{name}.lspci").read_text()
    res = DATA / f"{name}.resource"
    resources = read_resources(res) if res.exists() else []
    ours = {line.strip() for line in describe(decode(raw), resources=resources)}
    want = [
        line.strip()
        for line in lspci.splitlines()
        if re.match(
            r"\t(Control|Status|Region \d|Bus|Expansion ROM|Capabilities: \[[0-9a-f]+( v\d)?\] "
            r"(MSI|MSI-X|Power Management|Device Serial|Advanced Error|Access Control))"
            r"|\t\t(Flags: PMEClk|Status: D\d|Address: |Vector table|PBA: )",
            line,
        )
    ]
    assert want  # every dump has at least Control and Status
    missing = [line for line in want if line not in ours]
    assert not missing, (missing, sorted(ours))


@pytest.mark.parametrize("name", DUMPS)
def test_lspci_hex_dump_is_the_config_file(name: str) -> None:
    """The captured NAME.lspci and NAME.config are the same device (guards the fixtures)."""
    raw = (DATA / f"{name}.config").read_bytes()
    text = (DATA / f"{name}.lspci").read_text()
    hexed = bytearray()
    for m in re.finditer(r"^([0-9a-f]{2,3}): ((?:[0-9a-f]{2} ?){16})$", text, re.M):
        hexed += bytes.fromhex(m[2])
    assert bytes(hexed) == raw


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


def test_root_port_bridge_windows() -> None:
    h = decode_header((DATA / "pcie-root-port.config").read_bytes())
    assert isinstance(h.body, Type1)
    b = h.body
    assert (b.primary_bus, b.secondary_bus, b.subordinate_bus) == (0, 1, 1)
    assert b.io_window and (b.io_window.base, b.io_window.limit, b.io_window.wide) == (
        0x1000,
        0x1FFF,
        False,
    )
    assert (b.memory_window.base, b.memory_window.limit) == (0xFE200000, 0xFE3FFFFF)
    assert b.prefetchable_window and b.prefetchable_window.size == 2 << 20
    assert b.prefetchable_window.wide  # type nibble 1: 64-bit capable (bridge spec 3.2.5.9)
    assert BridgeControl.SERR_ENABLE in b.bridge_control


def test_edu_like_header_byte_by_byte() -> None:
    h = decode_header(bytes(edu_like()))
    assert (h.vendor_id, h.device_id, h.revision, h.class_code) == (0x1234, 0x11E8, 0x10, 0x00FF00)
    assert h.command == Command.IO_SPACE | Command.MEMORY_SPACE | Command.SERR_ENABLE
    assert Status.CAP_LIST in h.status and h.devsel == "fast"
    assert h.header_type == 0 and not h.multifunction
    assert isinstance(h.body, Type0)
    assert (h.body.subsystem_vendor_id, h.body.subsystem_id) == (0x1AF4, 0x1100)
    assert h.interrupt_pin == "A" and h.body.interrupt_line == 10
    assert h.capabilities_pointer == 0x40
    (bar,) = h.bars
    assert (bar.index, bar.kind, bar.is_64bit, bar.prefetchable, bar.address) == (
        0,
        "memory",
        False,
        False,
        0xFE400000,
    )
    [msi] = walk_capabilities(bytes(edu_like()))
    assert msi.name == "MSI" and msi.fields["is_64bit"]


def test_bar_kinds_and_64bit_pairs() -> None:
    c = Cfg()
    c.put(0x10, "I", 0xC001)  # BAR0: I/O at 0xc000
    c.put(0x14, "I", 0x0000000C).put(0x18, "I", 0x00000080)  # BAR1-2: 64-bit prefetchable
    c.put(0x1C, "I", 0xFEB00000)  # BAR3: 32-bit memory
    c.put(0x20, "I", 0)  # BAR4: not implemented
    c.put(0x24, "I", 0xFEC00002)  # BAR5: "below 1M" type (obsolete encoding)
    bars = decode_header(bytes(c)).bars
    assert [(b.index, b.kind, b.is_64bit, b.prefetchable, b.address) for b in bars] == [
        (0, "io", False, False, 0xC000),
        (1, "memory", True, True, 0x80_0000_0000),
        (3, "memory", False, False, 0xFEB00000),
        (5, "memory", False, False, 0xFEC00000),
    ]
    assert bars[1].raw == 0x80_0000_000C and bars[3].below_1m


def test_64bit_bar_in_the_last_slot_is_an_error() -> None:
    c = Cfg().put(0x24, "I", 0x4)
    with pytest.raises(ConfigSpaceError, match="BAR5 at 0x24 is a 64-bit memory BAR in the last"):
        decode_header(bytes(c))


def test_multifunction_bit_and_unknown_header_type() -> None:
    c = Cfg().put(0x0E, "B", 0x80)
    assert decode_header(bytes(c)).multifunction
    odd = decode_header(bytes(Cfg().put(0x0E, "B", 0x05)))
    assert odd.header_type == 5 and odd.body is None and odd.bars == ()


def test_sizes_from_sysfs_in_describe() -> None:
    lines = describe(bytes(edu_like()), resources=read_resources(DATA / "edu.resource"))
    assert "Region 0: Memory at fe400000 (32-bit, non-prefetchable) [size=1M]" in lines
    assert lines[0] == "Class 00ff: Device 1234:11e8 (rev 10)"
    assert "Subsystem: Device 1af4:1100" in lines


def test_describe_with_names_uses_pci_ids() -> None:
    from udrv.pci import ids

    lines = describe((DATA / "e1000e.config").read_bytes(), names=True)
    if ids.database().vendors:  # Debian's pci.ids is installed
        assert (
            lines[0] == "Ethernet controller: Intel Corporation 82574L Gigabit Network Connection"
        )
    else:
        assert lines[0] == "Class 0200: Device 8086:10d3"


def test_describe_reports_a_broken_list_instead_of_failing() -> None:
    c = edu_like().put(0x41, "B", 0x40)  # MSI's next pointer is itself
    lines = describe(bytes(c))
    assert lines[-1].startswith("Capabilities: <broken: capability list loops back to 0x40")
    assert any(line.startswith("Region 0") for line in lines)


def test_header_lines_flag_names() -> None:
    c = edu_like().put(0x04, "H", 0x0406).put(0x06, "H", 0x2218)
    text = "\n".join(header_lines(decode_header(bytes(c))))
    assert "I/O- Mem+ BusMaster+" in text and "DisINTx+" in text
    assert "DEVSEL=medium" in text and "<MAbort+" in text and "INTx+" in text


def test_human_size() -> None:
    assert [human_size(n) for n in (256, 4096, 128 << 10, 1 << 20, 3 << 30, 1000)] == [
        "256", "4K", "128K", "1M", "3G", "1000",
    ]  # fmt: skip


def test_truncated_dump_is_a_clear_error() -> None:
    data = (DATA / "e1000e.config").read_bytes()
    with pytest.raises(ConfigSpaceError, match="shorter than the 64-byte header"):
        decode(data[:32])
    header_only = decode(data[:64])  # what sysfs gives a user who is not root
    assert header_only.capabilities_unreadable and header_only.capabilities == []
    assert any("access denied" in line for line in describe(header_only))
    with pytest.raises(ConfigSpaceError, match="past its end"):
        decode(data[:0xC9])  # the PM capability at 0xc8 is cut off
    with pytest.raises(ConfigSpaceError, match="longer than the 4096"):
        decode(data + b"\0")


def _with_caps(chain: list[tuple[int, int, int]]) -> bytearray:
    cfg = bytearray(256)
    cfg[6] = 0x10  # status: capability list
    cfg[0x34] = chain[0][0]
    for off, cid, nxt in chain:
        cfg[off], cfg[off + 1] = cid, nxt
    return cfg


def test_capability_loop_is_detected() -> None:
    cfg = _with_caps([(0x40, 0x09, 0x50), (0x50, 0x09, 0x40)])
    with pytest.raises(ConfigSpaceError, match=r"loops back to 0x40 \(0x40 -> 0x50 -> 0x40\)"):
        decode(bytes(cfg))


def test_pointer_into_header_is_rejected() -> None:
    with pytest.raises(ConfigSpaceError, match="points into the header"):
        decode(bytes(_with_caps([(0x40, 0x09, 0x10)])))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=64, max_size=4096))
def test_random_config_never_hangs_or_crashes(data: bytes) -> None:
    start = time.monotonic()
    for fn in (decode, walk_capabilities, walk_extended, describe):
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
