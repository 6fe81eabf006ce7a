"""Capability and extended-capability decoding, on config spaces built byte by byte."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udrv.errors import ConfigSpaceError
from udrv.pci.capabilities import (
    Acs,
    AcsFlags,
    Aer,
    Ari,
    Capability,
    CapId,
    ExtCapability,
    Msi,
    MsiX,
    PciExpress,
    PortType,
    PowerManagement,
    ResizableBar,
    SerialNumber,
    SrIov,
    UncorrectableError,
    VendorSpecific,
    cap_name,
    ext_cap_name,
    ltr_ns,
    walk_capabilities,
    walk_extended_capabilities,
)
from udrv.pci.config import decode, describe


class Cfg(bytearray):
    def __init__(self, size: int = 4096) -> None:
        super().__init__(size)
        self.put(0x06, "H", 0x0010)  # Status: Capabilities List

    def put(self, off: int, fmt: str, value: int) -> Cfg:
        struct.pack_into("<" + fmt, self, off, value)
        return self

    def cap(self, off: int, cid: int, nxt: int) -> Cfg:
        return self.put(off, "B", cid).put(off + 1, "B", nxt)

    def ext(self, off: int, cid: int, ver: int, nxt: int) -> Cfg:
        return self.put(off, "I", cid | ver << 16 | nxt << 20)


def e1000e_like() -> Cfg:
    """PM at 0xc8 -> MSI at 0xd0 -> PCIe at 0xe0 -> MSI-X at 0xa0; AER at 0x100 -> DSN at 0x140."""
    c = Cfg()
    c.put(0x34, "B", 0xC8)
    c.cap(0xC8, 0x01, 0xD0).put(0xCA, "H", 0xC822).put(0xCC, "H", 0x0103)  # PM v2, D3hot
    c.cap(0xD0, 0x05, 0xE0).put(0xD2, "H", 0x01A5)  # MSI: enabled, 4 of 8 vectors, 64-bit, maskable
    c.put(0xD4, "I", 0xFEE00000).put(0xD8, "I", 0x1).put(0xDC, "H", 0x4021)
    c.put(0xE0, "I", 0x0001).put(0xE4, "I", 0xFFFFFFFF)  # mask/pending at 0xe0/0xe4
    # ... the MSI body with masking runs to 0xe8, so PCIe goes at 0xe8 instead:
    c.cap(0xD0, 0x05, 0xE8)
    c.cap(0xE8, 0x10, 0xA0).put(0xEA, "H", 0x0002)  # v2 endpoint
    c.put(0xEC, "I", 0x10000022)  # DevCap: MPS 512, ExtTag, FLR
    c.put(0xF0, "H", 0x2030)  # DevCtl: MPS 256 (001b<<5), MRRS 512 (010b<<12)
    c.put(0xF4, "I", 0x05000411)  # LnkCap: port 5, ASPM L0s, x1, 2.5GT/s
    c.put(0xFA, "H", 0x2011)  # LnkSta: x1, 2.5GT/s, DL active
    c.cap(0xA0, 0x11, 0x00).put(0xA2, "H", 0xC004)  # MSI-X: enable, masked, 5 vectors
    c.put(0xA4, "I", 0x00000003).put(0xA8, "I", 0x00002003)  # table BAR3+0, PBA BAR3+0x2000
    c.ext(0x100, 0x0001, 2, 0x140)
    c.put(0x104, "I", 1 << 20).put(0x10C, "I", 0x00462030).put(0x118, "I", 0xA0)
    c.put(0x11C, "I", 0x4A000001)
    c.ext(0x140, 0x0003, 1, 0).put(0x144, "I", 0xFF123406).put(0x148, "I", 0x525400FF)
    return c


def test_e1000e_like_standard_list() -> None:
    caps = walk_capabilities(bytes(e1000e_like()))
    assert [(c.offset, c.id) for c in caps] == [(0xC8, 1), (0xD0, 5), (0xE8, 0x10), (0xA0, 0x11)]
    pm, msi, exp, msix = caps
    assert isinstance(pm, PowerManagement)
    assert (pm.version, pm.power_state, pm.pme_enable, pm.d1, pm.d2) == (2, 3, True, False, False)
    assert pm.aux_current_ma == 0 and pm.pme_support == 0b11001 and pm.dsi
    assert isinstance(msi, Msi)
    assert (msi.enabled, msi.multiple_message_capable, msi.multiple_message_enable) == (True, 4, 4)
    assert (msi.is_64bit, msi.per_vector_masking) == (True, True)
    assert (msi.address, msi.data, msi.mask_bits, msi.pending_bits) == (
        0x1_FEE00000,
        0x4021,
        1,
        0xFFFFFFFF,
    )
    assert isinstance(exp, PciExpress)
    assert (exp.version, exp.port_type, exp.port_type_name) == (2, PortType.ENDPOINT, "Endpoint")
    assert (exp.max_payload_supported, exp.max_payload, exp.max_read_request) == (512, 256, 512)
    assert exp.extended_tag and exp.flr and not exp.role_based_error_reporting
    assert exp.link is not None
    assert (exp.link.port_number, exp.link.max_width, exp.link.max_speed_name) == (5, 1, "2.5GT/s")
    assert (exp.link.width, exp.link.speed_name, exp.link.dl_active) == (1, "2.5GT/s", True)
    assert isinstance(msix, MsiX)
    assert (msix.enabled, msix.function_mask, msix.table_size) == (True, True, 5)
    assert (msix.table_bar, msix.table_offset, msix.pba_bar, msix.pba_offset) == (3, 0, 3, 0x2000)


def test_e1000e_like_extended_list() -> None:
    aer, dsn = walk_extended_capabilities(bytes(e1000e_like()))
    assert isinstance(aer, Aer) and (aer.offset, aer.version, aer.next) == (0x100, 2, 0x140)
    assert aer.uncorrectable_status == UncorrectableError.UNSUPPORTED_REQUEST
    assert UncorrectableError.MALFORMED_TLP in aer.uncorrectable_severity
    assert aer.ecrc_generation_capable and aer.ecrc_check_capable and not aer.ecrc_check_enable
    assert aer.header_log == (0x4A000001, 0, 0, 0)
    assert isinstance(dsn, SerialNumber) and dsn.serial == 0x525400FFFF123406
    assert dsn.lines() == ["Device Serial Number 52-54-00-ff-ff-12-34-06"]


def test_describe_renders_every_capability() -> None:
    lines = describe(bytes(e1000e_like()))
    text = "\n".join(lines)
    assert "Capabilities: [c8] Power Management version 2" in lines
    assert "Capabilities: [d0] MSI: Enable+ Count=4/4 Maskable+ 64bit+" in lines
    assert "Capabilities: [e8] Express (v2) Endpoint, MSI 00" in lines
    assert "Capabilities: [a0] MSI-X: Enable+ Count=5 Masked+" in lines
    assert "Capabilities: [100 v2] Advanced Error Reporting" in lines
    assert "\tLnkSta:\tSpeed 2.5GT/s, Width x1" in text


def test_msi_32bit_without_masking_layout() -> None:
    c = Cfg().put(0x34, "B", 0x40).cap(0x40, 0x05, 0).put(0x42, "H", 0x000E)  # 32 vectors capable
    c.put(0x44, "I", 0xFEE01000).put(0x48, "H", 0x0041)
    (msi,) = walk_capabilities(bytes(c))
    assert isinstance(msi, Msi)
    assert (msi.is_64bit, msi.multiple_message_capable, msi.multiple_message_enable) == (
        False,
        32,
        1,
    )
    assert (msi.address, msi.data, msi.mask_bits) == (0xFEE01000, 0x41, None)


def test_rc_integrated_endpoint_has_no_link_registers() -> None:
    c = Cfg(256).put(0x34, "B", 0x40).cap(0x40, 0x10, 0).put(0x42, "H", 0x0091)
    (exp,) = walk_capabilities(bytes(c))
    assert isinstance(exp, PciExpress) and exp.link is None
    assert exp.port_type == PortType.RC_INTEGRATED_ENDPOINT


def test_vendor_specific_and_named_only_capabilities() -> None:
    c = Cfg(256).put(0x34, "B", 0x40)
    c.cap(0x40, 0x09, 0x50).put(0x42, "B", 0x14)
    c.cap(0x50, 0x03, 0x54).cap(0x54, 0x12, 0x58).cap(0x58, 0x42, 0)
    vs, vpd, sata, unknown = walk_capabilities(bytes(c))
    assert isinstance(vs, VendorSpecific) and vs.length == 0x14
    assert type(vpd) is Capability and vpd.name == "Vital Product Data"
    assert sata.name == "SATA HBA" and unknown.name == "Capability 0x42"
    assert cap_name(CapId.AGP) == "AGP" and cap_name(CapId.HT) == "HyperTransport"


def test_sriov_acs_ari_rebar_ltr_and_unknown_extended() -> None:
    c = Cfg()
    c.ext(0x100, 0x0010, 1, 0x180)  # SR-IOV (SR-IOV 1.1 §3.3)
    c.put(0x108, "H", 0x0019).put(0x10C, "H", 8).put(0x10E, "H", 64).put(0x110, "H", 4)
    c.put(0x114, "H", 0x80).put(0x116, "H", 2).put(0x11A, "H", 0x10ED)
    c.put(0x11C, "I", 0x553).put(0x120, "I", 1)
    c.put(0x124, "I", 0x0000000C).put(0x128, "I", 0x00000001)  # VF BAR0-1: 64-bit prefetchable
    c.ext(0x180, 0x000D, 1, 0x190).put(0x184, "H", 0x005F).put(0x186, "H", 0x001D)  # ACS
    c.ext(0x190, 0x000E, 1, 0x1A0).put(0x194, "H", 0x0100)  # ARI, next function 1
    c.ext(0x1A0, 0x0015, 1, 0x1C0)  # Resizable BAR: one BAR (BAR 2), 1M-256M, now 16M
    c.put(0x1A4, "I", 0x1FF0).put(0x1A8, "I", (4 << 8) | (1 << 5) | 2)
    c.ext(0x1C0, 0x0018, 1, 0x1D0).put(0x1C4, "H", (2 << 10) | 3)  # LTR: 3 * 1024 ns
    c.ext(0x1D0, 0x0042, 1, 0)  # not a known ID
    sriov, acs, ari, rebar, ltr, unknown = walk_extended_capabilities(bytes(c))
    assert isinstance(sriov, SrIov)
    assert (sriov.total_vfs, sriov.initial_vfs, sriov.num_vfs) == (64, 8, 4)
    assert (sriov.vf_offset, sriov.vf_stride, sriov.vf_device_id) == (0x80, 2, 0x10ED)
    assert sriov.vf_enable and [
        (b.index, b.is_64bit, b.prefetchable, b.address) for b in sriov.vf_bars
    ] == [(0, True, True, 0x1_00000000)]
    assert isinstance(acs, Acs) and acs.capability == AcsFlags(0x5F)
    assert (
        AcsFlags.P2P_REQUEST_REDIRECT in acs.control
        and AcsFlags.TRANSLATION_BLOCKING not in acs.control
    )
    assert isinstance(ari, Ari) and ari.next_function == 1
    assert isinstance(rebar, ResizableBar)
    (entry,) = rebar.bars
    assert entry.bar == 2 and entry.current_size == 16 << 20
    assert entry.supported_sizes == tuple(1 << n for n in range(20, 29))
    assert ltr_ns(ltr.fields["max_snoop_latency"]) == 3 * 1024
    assert type(unknown) is ExtCapability and unknown.name == "Extended Capability 0x0042"
    assert ext_cap_name(0x0003) == "Device Serial Number"


def test_no_extended_capabilities() -> None:
    assert walk_extended_capabilities(bytes(Cfg(256))) == []  # conventional PCI: no 0x100+
    assert walk_extended_capabilities(bytes(Cfg())) == []  # header 0 at 0x100
    assert walk_extended_capabilities(bytes(Cfg().put(0x100, "I", 0xFFFFFFFF))) == []


def test_decode_walks_extended_only_for_pcie_functions() -> None:
    plain = Cfg().put(0x34, "B", 0x40).cap(0x40, 0x01, 0).ext(0x100, 0x0003, 1, 0)
    assert [c.id for c in decode(bytes(plain)).capabilities] == [1]
    pcie = Cfg().put(0x34, "B", 0x40).cap(0x40, 0x10, 0).put(0x42, "H", 0x92).ext(0x100, 3, 1, 0)
    cs = decode(bytes(pcie))
    assert [(c.id, c.extended) for c in cs.capabilities] == [(0x10, False), (3, True)]
    assert cs.ext_cap(3) is cs.extended[0] and cs.standard[0].name == "PCI Express"


def test_unaligned_pointers_are_masked_as_the_spec_says() -> None:
    # PCI 3.0 §6.7: the low two bits of a capability pointer are reserved; software masks them.
    c = Cfg(256).put(0x34, "B", 0x43).cap(0x40, 0x09, 0x51).cap(0x50, 0x09, 0)
    assert [c.offset for c in walk_capabilities(bytes(c))] == [0x40, 0x50]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda c: c.ext(0x100, 1, 1, 0x140).ext(0x140, 3, 1, 0x100), r"loops back to 0x100"),
        (lambda c: c.ext(0x100, 1, 1, 0x80), r"points into the 256-byte PCI space \(0x80\)"),
        (lambda c: c.ext(0x100, 3, 1, 0xFF8), r"read of 8 byte\(s\) at 0xffc .* past its end"),
    ],
)
def test_broken_extended_lists(setup, message: str) -> None:  # type: ignore[no-untyped-def]
    c = Cfg()
    setup(c)
    c.ext(0xFF8, 3, 1, 0)  # a DSN whose serial runs past 4 KiB
    with pytest.raises(ConfigSpaceError, match=message):
        walk_extended_capabilities(bytes(c))


def test_capability_cut_off_by_the_end_of_the_dump() -> None:
    c = Cfg(256).put(0x34, "B", 0xFC).cap(0xFC, 0x05, 0).put(0xFE, "H", 0x80)
    with pytest.raises(ConfigSpaceError, match=r"at 0x100 \(MSI Message Address\) is past its end"):
        walk_capabilities(bytes(c))


def _structured(data: bytes, first: int) -> bytes:
    """Random bytes that still say 'I have a capability list starting at first'."""
    buf = bytearray(data)
    buf[0x06] |= 0x10
    buf[0x0E] &= 0x7F
    buf[0x0E] %= 2  # type 0 or 1
    buf[0x34] = first
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=256, max_size=4096), st.integers(0x40, 0xFF))
def test_walkers_on_random_lists_return_or_raise_config_space_error(
    data: bytes, first: int
) -> None:
    cfg = _structured(data, first)
    start = time.monotonic()
    for walk in (walk_capabilities, walk_extended_capabilities):
        try:
            caps = walk(cfg)
        except ConfigSpaceError:
            continue
        offsets = [c.offset for c in caps]
        assert len(offsets) == len(set(offsets))  # no capability visited twice
        for c in caps:
            c.lines()  # every decoded capability renders
    assert time.monotonic() - start < 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0x40, 0x3FF).map(lambda x: x * 4), min_size=1, max_size=64))
def test_random_extended_chains_end(chain: list[int]) -> None:
    c = Cfg()
    offsets = [0x100, *[o for o in chain if o >= 0x100]]
    for here, nxt in zip(offsets, [*offsets[1:], 0], strict=True):
        c.ext(here, 0x0B, 1, nxt)  # vendor-specific: header + one dword
    try:
        caps = walk_extended_capabilities(bytes(c))
    except ConfigSpaceError as exc:
        assert "loops back" in str(exc) or "past its end" in str(exc)
        return
    assert len(caps) <= (4096 - 256) // 4
