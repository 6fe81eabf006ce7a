"""Walk and decode PCI capabilities and PCIe extended capabilities (read-only).

The standard list starts at the header's Capabilities Pointer (0x34; 0x14 for CardBus) and
lives in 0x40-0xFF; each entry is an ID byte and a next-pointer byte (PCI Local Bus Spec 3.0
§6.7). The extended list starts at 0x100 of the 4 KiB PCIe config space; each entry starts
with a dword of ID (15:0), version (19:16) and next offset (31:20) (PCIe Base Spec 3.0
§7.9.3). IDs are those of the PCI Code and ID Assignment Specification (and Linux's
``pci_regs.h``, whose names the constants here carry).

Config space is data from a device or a file, so the walkers treat it as hostile: a loop,
a pointer into the header or outside the dump, or a body cut off by the end of the dump
raises :class:`~udrv.errors.ConfigSpaceError` naming the offset, never hangs or
``IndexError``. Following the spec, the two low bits of every pointer are reserved and
masked off before use (PCI 3.0 §6.7; PCIe 3.0 §7.9.3), as the kernel does.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from udrv.errors import ConfigSpaceError
from udrv.pci.config import (
    Bar,
    ConfigBytes,
    capability_list_start,
    config_bytes,
    decode_bars,
    decode_header,
)

PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_FLAGS = 2
#: Standard capabilities live after the 64-byte header and below 0x100 (PCI 3.0 §6.7).
CAP_MIN_OFFSET = 0x40
CAP_MAX_OFFSET = 0xFC
#: Extended capabilities start here and stay below 4 KiB (PCIe 3.0 §7.9.1).
PCI_EXT_CAP_START = 0x100


class CapId(enum.IntEnum):
    """Capability IDs, PCI Code and ID Assignment Spec §2 (``PCI_CAP_ID_*``)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14
    FPB = 0x15


CAP_NAMES: dict[int, str] = {
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "Vital Product Data",
    0x04: "Slot Identification",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific Information",
    0x0A: "Debug port",
    0x0B: "CompactPCI Central Resource Control",
    0x0C: "PCI Standard Hot-Plug Controller",
    0x0D: "Bridge Subsystem Vendor ID",
    0x0E: "AGP 8x",
    0x0F: "Secure Device",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA HBA",
    0x13: "PCI Advanced Features",
    0x14: "Enhanced Allocation",
    0x15: "Flattening Portal Bridge",
}


class ExtCapId(enum.IntEnum):
    """Extended capability IDs, PCI Code and ID Assignment Spec §3 (``PCI_EXT_CAP_ID_*``)."""

    NULL = 0x00
    ERR = 0x01
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    RCLD = 0x05
    RCILC = 0x06
    RCEC = 0x07
    MFVC = 0x08
    VC9 = 0x09
    RCRB = 0x0A
    VNDR = 0x0B
    CAC = 0x0C
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    MRIOV = 0x11
    MCAST = 0x12
    PRI = 0x13
    REBAR = 0x15
    DPA = 0x16
    TPH = 0x17
    LTR = 0x18
    SECPCI = 0x19
    PMUX = 0x1A
    PASID = 0x1B
    LNR = 0x1C
    DPC = 0x1D
    L1SS = 0x1E
    PTM = 0x1F
    DVSEC = 0x23
    DLF = 0x25
    PL_16GT = 0x26
    DOE = 0x2E


EXT_CAP_NAMES: dict[int, str] = {
    0x00: "Null",
    0x01: "Advanced Error Reporting",
    0x02: "Virtual Channel",
    0x03: "Device Serial Number",
    0x04: "Power Budgeting",
    0x05: "Root Complex Link",
    0x06: "Root Complex Internal Link Control",
    0x07: "Root Complex Event Collector",
    0x08: "Multi-Function Virtual Channel",
    0x09: "Virtual Channel",
    0x0A: "Root Complex Register Block",
    0x0B: "Vendor Specific Information",
    0x0C: "Configuration Access Correlation",
    0x0D: "Access Control Services",
    0x0E: "Alternative Routing-ID Interpretation (ARI)",
    0x0F: "Address Translation Service (ATS)",
    0x10: "Single Root I/O Virtualization (SR-IOV)",
    0x11: "Multi-Root I/O Virtualization (MR-IOV)",
    0x12: "Multicast",
    0x13: "Page Request Interface (PRI)",
    0x14: "Reserved for AMD",
    0x15: "Physical Resizable BAR",
    0x16: "Dynamic Power Allocation",
    0x17: "Transaction Processing Hints",
    0x18: "Latency Tolerance Reporting",
    0x19: "Secondary PCI Express",
    0x1A: "Protocol Multiplexing",
    0x1B: "Process Address Space ID (PASID)",
    0x1C: "LN Requester",
    0x1D: "Downstream Port Containment",
    0x1E: "L1 PM Substates",
    0x1F: "Precision Time Measurement",
    0x20: "PCI Express over M-PHY",
    0x21: "FRS Queueing",
    0x22: "Readiness Time Reporting",
    0x23: "Designated Vendor-Specific",
    0x24: "VF Resizable BAR",
    0x25: "Data Link Feature",
    0x26: "Physical Layer 16.0 GT/s",
    0x27: "Lane Margining at the Receiver",
    0x28: "Hierarchy ID",
    0x29: "Native PCIe Enclosure Management",
    0x2A: "Physical Layer 32.0 GT/s",
    0x2B: "Alternate Protocol",
    0x2C: "System Firmware Intermediary",
    0x2D: "Shadow Functions",
    0x2E: "Data Object Exchange",
}


def cap_name(cap_id: int) -> str:
    """The name of a standard capability ID; unknown ones as ``"Capability 0x42"``."""
    return CAP_NAMES.get(cap_id, f"Capability {cap_id:#04x}")


def ext_cap_name(cap_id: int) -> str:
    """The name of an extended capability ID; unknown ones as ``"Extended Capability 0x0042"``."""
    return EXT_CAP_NAMES.get(cap_id, f"Extended Capability {cap_id:#06x}")


def _pm(flag: object) -> str:
    return "+" if flag else "-"


def _fields(cap: object) -> dict[str, Any]:
    skip = ("offset", "id", "next", "version")
    return {f.name: getattr(cap, f.name) for f in dataclasses.fields(cap) if f.name not in skip}  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Standard capabilities


@dataclass(frozen=True)
class Capability:
    """One entry of the standard capability list.

    Attributes:
        offset: where the capability starts in config space.
        id: the capability ID byte (see :class:`CapId`).
        next: the (masked) next-pointer byte; 0 ends the list.
    """

    offset: int
    id: int
    next: int

    @property
    def name(self) -> str:
        return cap_name(self.id)

    @property
    def extended(self) -> bool:
        """False: a standard capability (see :class:`ExtCapability`)."""
        return False

    @property
    def fields(self) -> dict[str, Any]:
        """The decoded registers by name (empty for capabilities known by name only)."""
        return _fields(self)

    def lines(self) -> list[str]:
        """The capability as ``lspci -vvv`` style lines; the first is the title."""
        return [self.name]


@dataclass(frozen=True)
class PowerManagement(Capability):
    """PCI Power Management Capability, PCI Bus Power Management Interface Spec 1.2 §3.2.

    ``pmc`` is the PMC register (+2), ``pmcsr`` the control/status register (+4).
    """

    version: int
    pme_clock: bool
    dsi: bool
    aux_current_ma: int
    d1: bool
    d2: bool
    pme_support: int  # 5 bits: PME# from D0, D1, D2, D3hot, D3cold
    power_state: int  # 0-3 for D0-D3hot
    no_soft_reset: bool
    pme_enable: bool
    pme_status: bool
    data_select: int
    data_scale: int

    # PMC bits 8:6: 3.3Vaux current (PM 1.2 §3.2.3)
    AUX_CURRENT = (0, 55, 100, 160, 220, 270, 320, 375)

    def lines(self) -> list[str]:
        pme = ",".join(
            f"{s}{_pm(self.pme_support & (1 << i))}"
            for i, s in enumerate(("D0", "D1", "D2", "D3hot", "D3cold"))
        )
        return [
            f"Power Management version {self.version}",
            f"\tFlags: PMEClk{_pm(self.pme_clock)} DSI{_pm(self.dsi)} D1{_pm(self.d1)} "
            f"D2{_pm(self.d2)} AuxCurrent={self.aux_current_ma}mA PME({pme})",
            f"\tStatus: D{self.power_state} NoSoftRst{_pm(self.no_soft_reset)} "
            f"PME-Enable{_pm(self.pme_enable)} DSel={self.data_select} DScale={self.data_scale} "
            f"PME{_pm(self.pme_status)}",
        ]


@dataclass(frozen=True)
class Msi(Capability):
    """MSI capability, PCI 3.0 §6.8.1.

    Attributes:
        multiple_message_capable: vectors the function can request (1-32).
        multiple_message_enable: vectors software allocated (1-32).
        mask_bits, pending_bits: present only with per-vector masking.
    """

    enabled: bool
    multiple_message_capable: int
    multiple_message_enable: int
    is_64bit: bool
    per_vector_masking: bool
    address: int
    data: int
    mask_bits: int | None
    pending_bits: int | None

    def lines(self) -> list[str]:
        out = [
            f"MSI: Enable{_pm(self.enabled)} Count={self.multiple_message_enable}/"
            f"{self.multiple_message_capable} Maskable{_pm(self.per_vector_masking)} "
            f"64bit{_pm(self.is_64bit)}",
            f"\tAddress: {self.address:0{16 if self.is_64bit else 8}x}  Data: {self.data:04x}",
        ]
        if self.mask_bits is not None:
            out.append(f"\tMasking: {self.mask_bits:08x}  Pending: {self.pending_bits or 0:08x}")
        return out


@dataclass(frozen=True)
class MsiX(Capability):
    """MSI-X capability, PCI 3.0 §6.8.2.

    Attributes:
        table_size: number of vectors (the field plus one).
        table_bar, pba_bar: BAR indicator (BIR) (0-5) of the vector table and pending bit array.
        table_offset, pba_offset: byte offsets into those BARs (8-byte aligned).
    """

    enabled: bool
    function_mask: bool
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def lines(self) -> list[str]:
        return [
            f"MSI-X: Enable{_pm(self.enabled)} Count={self.table_size} "
            f"Masked{_pm(self.function_mask)}",
            f"\tVector table: BAR={self.table_bar} offset={self.table_offset:08x}",
            f"\tPBA: BAR={self.pba_bar} offset={self.pba_offset:08x}",
        ]


class PortType(enum.IntEnum):
    """PCI Express Capabilities register bits 7:4, PCIe Base 3.0 §7.8.2."""

    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    ROOT_PORT = 0x4
    UPSTREAM_PORT = 0x5
    DOWNSTREAM_PORT = 0x6
    PCIE_TO_PCI_BRIDGE = 0x7
    PCI_TO_PCIE_BRIDGE = 0x8
    RC_INTEGRATED_ENDPOINT = 0x9
    RC_EVENT_COLLECTOR = 0xA


PORT_TYPE_NAMES = {
    0x0: "Endpoint",
    0x1: "Legacy Endpoint",
    0x4: "Root Port",
    0x5: "Upstream Port",
    0x6: "Downstream Port",
    0x7: "PCI-Express to PCI/PCI-X Bridge",
    0x8: "PCI/PCI-X to PCI-Express Bridge",
    0x9: "Root Complex Integrated Endpoint",
    0xA: "Root Complex Event Collector",
}

#: Link speed encodings (LnkCap 3:0, LnkSta 3:0), PCIe Base 3.0 §7.8.6, §7.8.8 (and later).
LINK_SPEEDS = {1: "2.5GT/s", 2: "5GT/s", 3: "8GT/s", 4: "16GT/s", 5: "32GT/s", 6: "64GT/s"}


def link_speed(code: int) -> str:
    return LINK_SPEEDS.get(code, f"unknown ({code})")


@dataclass(frozen=True)
class PcieLink:
    """Link Capabilities (+0x0C) and Link Status (+0x12), PCIe Base 3.0 §7.8.6, §7.8.8."""

    port_number: int
    max_speed: int  # encoding, see LINK_SPEEDS
    max_width: int
    aspm_support: int  # bits 11:10: 1 L0s, 2 L1, 3 both
    speed: int
    width: int
    training: bool
    dl_active: bool

    @property
    def max_speed_name(self) -> str:
        return link_speed(self.max_speed)

    @property
    def speed_name(self) -> str:
        return link_speed(self.speed)


@dataclass(frozen=True)
class PciExpress(Capability):
    """PCI Express Capability structure, PCIe Base 3.0 §7.8.

    Attributes:
        version: capability version (1 or 2).
        port_type: device/port type (:class:`PortType` value).
        max_payload_supported: bytes (DevCap 2:0).
        max_payload, max_read_request: bytes configured in DevCtl.
        link: present for types that have a link (not RC integrated endpoints or
            event collectors).
    """

    version: int
    port_type: int
    slot_implemented: bool
    interrupt_message: int
    max_payload_supported: int
    phantom_functions: int
    extended_tag: bool
    role_based_error_reporting: bool
    flr: bool
    devctl: int
    max_payload: int
    max_read_request: int
    devsta: int
    link: PcieLink | None

    @property
    def port_type_name(self) -> str:
        return PORT_TYPE_NAMES.get(self.port_type, f"Unknown type {self.port_type}")

    def lines(self) -> list[str]:
        slot = " (Slot+)" if self.slot_implemented else ""
        out = [
            f"Express (v{self.version}) {self.port_type_name}{slot}, "
            f"MSI {self.interrupt_message:02x}",
            f"\tDevCap:\tMaxPayload {self.max_payload_supported} bytes, "
            f"PhantFunc {self.phantom_functions}",
            f"\t\tExtTag{_pm(self.extended_tag)} RBE{_pm(self.role_based_error_reporting)} "
            f"FLReset{_pm(self.flr)}",
            f"\tDevCtl:\tMaxPayload {self.max_payload} bytes, "
            f"MaxReadReq {self.max_read_request} bytes",
        ]
        if self.link is not None:
            ln = self.link
            out.append(
                f"\tLnkCap:\tPort #{ln.port_number}, Speed {ln.max_speed_name}, "
                f"Width x{ln.max_width}"
            )
            out.append(f"\tLnkSta:\tSpeed {ln.speed_name}, Width x{ln.width}")
        return out


@dataclass(frozen=True)
class VendorSpecific(Capability):
    """Vendor-specific capability (ID 0x09), PCI 3.0 §6.7: byte +2 is its length."""

    length: int

    def lines(self) -> list[str]:
        return [f"Vendor Specific Information: Len={self.length:02x} <?>"]


@dataclass(frozen=True)
class BridgeSubsystem(Capability):
    """Bridge Subsystem Vendor ID capability (ID 0x0D), PCI-to-PCI Bridge Spec 1.2 §3.2.5.x."""

    subsystem_vendor_id: int
    subsystem_id: int

    def lines(self) -> list[str]:
        return [f"Subsystem: {self.subsystem_vendor_id:04x}:{self.subsystem_id:04x}"]


def _decode_pm(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> PowerManagement:
    pmc, csr = cfg.u16(off + 2, "PM PMC"), cfg.u16(off + 4, "PM PMCSR")
    return PowerManagement(
        off,
        cid,
        nxt,
        version=pmc & 0x7,
        pme_clock=bool(pmc & 0x8),
        dsi=bool(pmc & 0x20),
        aux_current_ma=PowerManagement.AUX_CURRENT[(pmc >> 6) & 7],
        d1=bool(pmc & 0x200),
        d2=bool(pmc & 0x400),
        pme_support=pmc >> 11,
        power_state=csr & 3,
        no_soft_reset=bool(csr & 0x8),
        pme_enable=bool(csr & 0x100),
        pme_status=bool(csr & 0x8000),
        data_select=(csr >> 9) & 0xF,
        data_scale=(csr >> 13) & 3,
    )


def _decode_msi(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> Msi:
    ctrl = cfg.u16(off + 2, "MSI Message Control")
    is64, maskable = bool(ctrl & 0x80), bool(ctrl & 0x100)
    address = cfg.u32(off + 4, "MSI Message Address")
    if is64:
        address |= cfg.u32(off + 8, "MSI Message Upper Address") << 32
    data_off = off + (0x0C if is64 else 0x08)
    mask = pending = None
    if maskable:
        mask = cfg.u32(data_off + 4, "MSI Mask Bits")
        pending = cfg.u32(data_off + 8, "MSI Pending Bits")
    return Msi(
        off,
        cid,
        nxt,
        enabled=bool(ctrl & 1),
        # 3-bit log2 fields; 110b and 111b are reserved, clamp to the 32-vector maximum.
        multiple_message_capable=1 << min((ctrl >> 1) & 7, 5),
        multiple_message_enable=1 << min((ctrl >> 4) & 7, 5),
        is_64bit=is64,
        per_vector_masking=maskable,
        address=address,
        data=cfg.u16(data_off, "MSI Message Data"),
        mask_bits=mask,
        pending_bits=pending,
    )


def _decode_msix(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> MsiX:
    ctrl = cfg.u16(off + 2, "MSI-X Message Control")
    table, pba = cfg.u32(off + 4, "MSI-X Table Offset/BIR"), cfg.u32(off + 8, "MSI-X PBA")
    return MsiX(
        off,
        cid,
        nxt,
        enabled=bool(ctrl & 0x8000),
        function_mask=bool(ctrl & 0x4000),
        table_size=(ctrl & 0x7FF) + 1,
        table_bar=table & 7,
        table_offset=table & ~7,
        pba_bar=pba & 7,
        pba_offset=pba & ~7,
    )


def _decode_exp(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> PciExpress:
    flags = cfg.u16(off + 2, "PCIe Capabilities")
    devcap = cfg.u32(off + 4, "PCIe DevCap")
    devctl = cfg.u16(off + 8, "PCIe DevCtl")
    ptype = (flags >> 4) & 0xF
    link = None
    if ptype not in (PortType.RC_INTEGRATED_ENDPOINT, PortType.RC_EVENT_COLLECTOR):
        lnkcap = cfg.u32(off + 0x0C, "PCIe LnkCap")
        lnksta = cfg.u16(off + 0x12, "PCIe LnkSta")
        link = PcieLink(
            port_number=lnkcap >> 24,
            max_speed=lnkcap & 0xF,
            max_width=(lnkcap >> 4) & 0x3F,
            aspm_support=(lnkcap >> 10) & 3,
            speed=lnksta & 0xF,
            width=(lnksta >> 4) & 0x3F,
            training=bool(lnksta & 0x800),
            dl_active=bool(lnksta & 0x2000),
        )
    return PciExpress(
        off,
        cid,
        nxt,
        version=flags & 0xF,
        port_type=ptype,
        slot_implemented=bool(flags & 0x100),
        interrupt_message=(flags >> 9) & 0x1F,
        # Payload/read-request encodings 0-5 mean 128 << n bytes (§7.8.3, §7.8.4).
        max_payload_supported=128 << min(devcap & 7, 5),
        phantom_functions=(devcap >> 3) & 3,
        extended_tag=bool(devcap & 0x20),
        role_based_error_reporting=bool(devcap & 0x8000),
        flr=bool(devcap & 0x10000000),
        devctl=devctl,
        max_payload=128 << min((devctl >> 5) & 7, 5),
        max_read_request=128 << min((devctl >> 12) & 7, 5),
        devsta=cfg.u16(off + 0x0A, "PCIe DevSta"),
        link=link,
    )


def _decode_vndr(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> VendorSpecific:
    return VendorSpecific(off, cid, nxt, length=cfg.u8(off + 2, "vendor capability length"))


def _decode_ssvid(cfg: ConfigBytes, off: int, cid: int, nxt: int) -> BridgeSubsystem:
    return BridgeSubsystem(
        off, cid, nxt, cfg.u16(off + 4, "bridge subsystem vendor"), cfg.u16(off + 6, "subsystem")
    )


_CAP_DECODERS: dict[int, Callable[[ConfigBytes, int, int, int], Capability]] = {
    CapId.PM: _decode_pm,
    CapId.MSI: _decode_msi,
    CapId.EXP: _decode_exp,
    CapId.MSIX: _decode_msix,
    CapId.VNDR: _decode_vndr,
    CapId.SSVID: _decode_ssvid,
}


def _cap_pointers(cfg: ConfigBytes, first: int) -> Iterator[tuple[int, int, int]]:
    """(offset, id, next) of each standard capability, checking every pointer."""
    seen: dict[int, None] = {}  # ordered, for the loop message
    ptr = first & ~3
    while ptr:
        if not CAP_MIN_OFFSET <= ptr <= CAP_MAX_OFFSET:
            src = f"capability at {list(seen)[-1]:#x}" if seen else "the capabilities pointer"
            raise ConfigSpaceError(
                f"{src} points into the header ({ptr:#x}): capabilities must lie in "
                f"0x40-0xff (PCI 3.0 §6.7); the config space is corrupt"
            )
        if ptr in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, ptr])
            raise ConfigSpaceError(
                f"capability list loops back to {ptr:#x} ({chain}); the config space is corrupt"
            )
        seen[ptr] = None
        cid = cfg.u8(ptr + PCI_CAP_LIST_ID, f"capability ID at {ptr:#x}")
        nxt = cfg.u8(ptr + PCI_CAP_LIST_NEXT, f"capability next pointer at {ptr:#x}") & ~3
        yield ptr, cid, nxt
        ptr = nxt


def walk_capabilities(data: bytes | bytearray | memoryview | ConfigBytes) -> list[Capability]:
    """Decode the standard capability list of a config-space dump.

    Known IDs become their subclass (:class:`PowerManagement`, :class:`Msi`,
    :class:`PciExpress`, :class:`MsiX`, :class:`VendorSpecific`, :class:`BridgeSubsystem`);
    others a plain :class:`Capability` that knows its name.

    Returns:
        The capabilities in list order; empty when the Status register's Capabilities List
        bit is clear.

    Raises:
        ConfigSpaceError: a loop, a pointer into the header, or a capability cut off by the
            end of the dump (a 64-byte unprivileged read has no room for any).
    """
    cfg = config_bytes(data)
    first = capability_list_start(decode_header(cfg), cfg)
    if not first:
        return []
    out = []
    for off, cid, nxt in _cap_pointers(cfg, first):
        decoder = _CAP_DECODERS.get(cid)
        out.append(decoder(cfg, off, cid, nxt) if decoder else Capability(off, cid, nxt))
    return out


# --------------------------------------------------------------------------------------------
# Extended capabilities


@dataclass(frozen=True)
class ExtCapability:
    """One entry of the PCIe extended capability list (PCIe Base 3.0 §7.9.3).

    Attributes:
        offset: where the capability starts (0x100-0xFFC).
        id: the 16-bit extended capability ID (see :class:`ExtCapId`).
        version: capability version (4 bits).
        next: the (masked) next offset; 0 ends the list.
    """

    offset: int
    id: int
    version: int
    next: int

    @property
    def name(self) -> str:
        return ext_cap_name(self.id)

    @property
    def extended(self) -> bool:
        """True: an extended capability."""
        return True

    @property
    def fields(self) -> dict[str, Any]:
        """The decoded registers by name (empty for capabilities known by name only)."""
        return _fields(self)

    def lines(self) -> list[str]:
        return [self.name]


class UncorrectableError(enum.IntFlag):
    """AER Uncorrectable Error Status/Mask/Severity bits, PCIe Base 3.0 §7.10.2."""

    UNDEFINED = 1 << 0
    DATA_LINK_PROTOCOL = 1 << 4
    SURPRISE_DOWN = 1 << 5
    POISONED_TLP = 1 << 12
    FLOW_CONTROL_PROTOCOL = 1 << 13
    COMPLETION_TIMEOUT = 1 << 14
    COMPLETER_ABORT = 1 << 15
    UNEXPECTED_COMPLETION = 1 << 16
    RECEIVER_OVERFLOW = 1 << 17
    MALFORMED_TLP = 1 << 18
    ECRC = 1 << 19
    UNSUPPORTED_REQUEST = 1 << 20
    ACS_VIOLATION = 1 << 21
    INTERNAL = 1 << 22
    MC_BLOCKED_TLP = 1 << 23
    ATOMIC_EGRESS_BLOCKED = 1 << 24
    TLP_PREFIX_BLOCKED = 1 << 25


class CorrectableError(enum.IntFlag):
    """AER Correctable Error Status/Mask bits, PCIe Base 3.0 §7.10.5."""

    RECEIVER = 1 << 0
    BAD_TLP = 1 << 6
    BAD_DLLP = 1 << 7
    REPLAY_NUM_ROLLOVER = 1 << 8
    REPLAY_TIMER_TIMEOUT = 1 << 12
    ADVISORY_NON_FATAL = 1 << 13
    CORRECTED_INTERNAL = 1 << 14
    HEADER_LOG_OVERFLOW = 1 << 15


@dataclass(frozen=True)
class Aer(ExtCapability):
    """Advanced Error Reporting, PCIe Base 3.0 §7.10 (registers up to the header log)."""

    uncorrectable_status: UncorrectableError
    uncorrectable_mask: UncorrectableError
    uncorrectable_severity: UncorrectableError
    correctable_status: CorrectableError
    correctable_mask: CorrectableError
    first_error_pointer: int
    ecrc_generation_capable: bool
    ecrc_generation_enable: bool
    ecrc_check_capable: bool
    ecrc_check_enable: bool
    header_log: tuple[int, int, int, int]

    def lines(self) -> list[str]:
        return [
            "Advanced Error Reporting",
            f"\tUESta:\t{self.uncorrectable_status:#010x}  UEMsk: "
            f"{self.uncorrectable_mask:#010x}  UESvrt: {self.uncorrectable_severity:#010x}",
            f"\tCESta:\t{self.correctable_status:#010x}  CEMsk: {self.correctable_mask:#010x}",
            f"\tAERCap:\tFirst Error Pointer: {self.first_error_pointer:02x}, "
            f"ECRCGenCap{_pm(self.ecrc_generation_capable)} "
            f"ECRCGenEn{_pm(self.ecrc_generation_enable)} "
            f"ECRCChkCap{_pm(self.ecrc_check_capable)} ECRCChkEn{_pm(self.ecrc_check_enable)}",
            "\tHeaderLog: " + " ".join(f"{d:08x}" for d in self.header_log),
        ]


@dataclass(frozen=True)
class SerialNumber(ExtCapability):
    """Device Serial Number, PCIe Base 3.0 §7.12: a 64-bit IEEE EUI-64."""

    serial: int

    def lines(self) -> list[str]:
        return [f"Device Serial Number {self.serial_text}"]

    @property
    def serial_text(self) -> str:
        """The serial as lspci prints it: bytes most significant first, dash-separated."""
        return "-".join(f"{b:02x}" for b in self.serial.to_bytes(8, "big"))


@dataclass(frozen=True)
class PowerBudgeting(ExtCapability):
    """Power Budgeting, PCIe Base 3.0 §7.16: data register as selected by data select."""

    data_select: int
    data: int
    system_allocated: bool

    def lines(self) -> list[str]:
        return [f"Power Budgeting <DataSel={self.data_select} Data={self.data:08x}>"]


@dataclass(frozen=True)
class VirtualChannel(ExtCapability):
    """Virtual Channel, PCIe Base 3.0 §7.11 (port VC capability register 1 only)."""

    extended_vc_count: int
    low_priority_vc_count: int

    def lines(self) -> list[str]:
        return [
            f"Virtual Channel: ExtVC count={self.extended_vc_count} "
            f"LowPri VC count={self.low_priority_vc_count}"
        ]


class AcsFlags(enum.IntFlag):
    """ACS Capability/Control bits, PCIe Base 3.0 §7.16 (``PCI_ACS_*``)."""

    SOURCE_VALIDATION = 1 << 0
    TRANSLATION_BLOCKING = 1 << 1
    P2P_REQUEST_REDIRECT = 1 << 2
    P2P_COMPLETION_REDIRECT = 1 << 3
    UPSTREAM_FORWARDING = 1 << 4
    P2P_EGRESS_CONTROL = 1 << 5
    DIRECT_TRANSLATED_P2P = 1 << 6


_ACS_NAMES = (
    (AcsFlags.SOURCE_VALIDATION, "SrcValid"),
    (AcsFlags.TRANSLATION_BLOCKING, "TransBlk"),
    (AcsFlags.P2P_REQUEST_REDIRECT, "ReqRedir"),
    (AcsFlags.P2P_COMPLETION_REDIRECT, "CmpltRedir"),
    (AcsFlags.UPSTREAM_FORWARDING, "UpstreamFwd"),
    (AcsFlags.P2P_EGRESS_CONTROL, "EgressCtrl"),
    (AcsFlags.DIRECT_TRANSLATED_P2P, "DirectTrans"),
)


@dataclass(frozen=True)
class Acs(ExtCapability):
    """Access Control Services: what the port can and does isolate (affects IOMMU groups)."""

    capability: AcsFlags
    control: AcsFlags
    egress_control_vector_size: int

    def lines(self) -> list[str]:
        def fl(v: AcsFlags) -> str:
            return " ".join(f"{n}{_pm(v & b)}" for b, n in _ACS_NAMES)

        return [
            "Access Control Services",
            f"\tACSCap:\t{fl(self.capability)}",
            f"\tACSCtl:\t{fl(self.control)}",
        ]


@dataclass(frozen=True)
class Ari(ExtCapability):
    """Alternative Routing-ID Interpretation, PCIe Base 3.0 §7.23."""

    mfvc_function_groups: bool
    acs_function_groups: bool
    next_function: int
    control: int

    def lines(self) -> list[str]:
        return [f"Alternative Routing-ID Interpretation (ARI): NextFunction={self.next_function}"]


@dataclass(frozen=True)
class Ats(ExtCapability):
    """Address Translation Services, PCIe ATS Spec 1.1 §5.1."""

    invalidate_queue_depth: int  # 1-32 (the field's 0 means 32)
    page_aligned_request: bool
    enable: bool
    smallest_translation_unit: int  # log2(bytes) - 12

    def lines(self) -> list[str]:
        return [
            f"Address Translation Service (ATS): Enable{_pm(self.enable)} "
            f"InvQueue={self.invalidate_queue_depth} STU={self.smallest_translation_unit}"
        ]


@dataclass(frozen=True)
class SrIov(ExtCapability):
    """Single Root I/O Virtualization, SR-IOV Spec 1.1 §3.3 (``PCI_SRIOV_*``)."""

    capabilities: int
    control: int
    status: int
    initial_vfs: int
    total_vfs: int
    num_vfs: int
    function_dependency_link: int
    vf_offset: int
    vf_stride: int
    vf_device_id: int
    supported_page_sizes: int
    system_page_size: int
    vf_bars: tuple[Bar, ...]

    @property
    def vf_enable(self) -> bool:
        return bool(self.control & 1)

    def lines(self) -> list[str]:
        return [
            "Single Root I/O Virtualization (SR-IOV)",
            f"\tIOVCtl:\tEnable{_pm(self.vf_enable)} Migration{_pm(self.control & 2)} "
            f"MemorySpace{_pm(self.control & 8)} ARIHierarchy{_pm(self.control & 0x10)}",
            f"\tInitial VFs: {self.initial_vfs}, Total VFs: {self.total_vfs}, "
            f"Number of VFs: {self.num_vfs}, Function Dependency Link: "
            f"{self.function_dependency_link:02x}",
            f"\tVF offset: {self.vf_offset}, stride: {self.vf_stride}, "
            f"Device ID: {self.vf_device_id:04x}",
            f"\tSupported Page Size: {self.supported_page_sizes:08x}, "
            f"System Page Size: {self.system_page_size:08x}",
            *(
                f"\tVF Region {b.index}: Memory at {b.address:016x} "
                f"({'64' if b.is_64bit else '32'}-bit, "
                f"{'' if b.prefetchable else 'non-'}prefetchable)"
                for b in self.vf_bars
            ),
        ]


def ltr_ns(register: int) -> int:
    """Latency of an LTR register: value (9:0) times 32**scale (12:10) ns (PCIe 3.0 §7.25)."""
    return (register & 0x3FF) * (32 ** ((register >> 10) & 7))


@dataclass(frozen=True)
class Ltr(ExtCapability):
    """Latency Tolerance Reporting: max snoop / no-snoop latencies."""

    max_snoop_latency: int
    max_no_snoop_latency: int

    def lines(self) -> list[str]:
        return [
            f"Latency Tolerance Reporting: Max snoop latency: "
            f"{ltr_ns(self.max_snoop_latency)}ns, Max no snoop latency: "
            f"{ltr_ns(self.max_no_snoop_latency)}ns"
        ]


@dataclass(frozen=True)
class L1Substates(ExtCapability):
    """L1 PM Substates (PCIe ECN, Base 4.0 §7.8.3): supported substates and timings."""

    capability: int
    control1: int
    control2: int

    @property
    def supported(self) -> list[str]:
        bits = (
            (0x1, "PCI-PM_L1.2"),
            (0x2, "PCI-PM_L1.1"),
            (0x4, "ASPM_L1.2"),
            (0x8, "ASPM_L1.1"),
            (0x10, "L1_PM_Substates"),
        )
        return [n for b, n in bits if self.capability & b]

    def lines(self) -> list[str]:
        return ["L1 PM Substates", "\tL1SubCap: " + " ".join(self.supported)]


@dataclass(frozen=True)
class ResizableBarEntry:
    """One resizable BAR: which BAR, the sizes it supports, the size it has."""

    bar: int
    supported_sizes: tuple[int, ...]  # bytes
    current_size: int  # bytes


@dataclass(frozen=True)
class ResizableBar(ExtCapability):
    """Physical Resizable BAR, PCIe Base 3.0 §7.22."""

    bars: tuple[ResizableBarEntry, ...]

    def lines(self) -> list[str]:
        from udrv.pci.config import human_size

        return [
            "Physical Resizable BAR",
            *(
                f"\tBAR {e.bar}: current size: {human_size(e.current_size)}, supported: "
                + " ".join(human_size(s) for s in e.supported_sizes)
                for e in self.bars
            ),
        ]


@dataclass(frozen=True)
class Pasid(ExtCapability):
    """Process Address Space ID, PCIe Base 3.0 §7.29."""

    exec_permission: bool
    privileged_mode: bool
    max_pasid_width: int
    enable: bool

    def lines(self) -> list[str]:
        return [
            f"Process Address Space ID (PASID): Exec{_pm(self.exec_permission)} "
            f"Priv{_pm(self.privileged_mode)} Width={self.max_pasid_width} "
            f"Enable{_pm(self.enable)}"
        ]


@dataclass(frozen=True)
class VendorSpecificExt(ExtCapability):
    """Vendor-Specific Extended Capability (0x000B), PCIe Base 3.0 §7.20 (VSEC header)."""

    vsec_id: int
    vsec_rev: int
    length: int

    def lines(self) -> list[str]:
        return [
            f"Vendor Specific Information: ID={self.vsec_id:04x} Rev={self.vsec_rev} "
            f"Len={self.length:03x} <?>"
        ]


@dataclass(frozen=True)
class DesignatedVendorSpecific(ExtCapability):
    """Designated Vendor-Specific Extended Capability (0x0023), PCIe Base 4.0 §7.9.6."""

    dvsec_vendor_id: int
    dvsec_rev: int
    length: int
    dvsec_id: int

    def lines(self) -> list[str]:
        return [
            f"Designated Vendor-Specific: Vendor={self.dvsec_vendor_id:04x} "
            f"ID={self.dvsec_id:04x} Rev={self.dvsec_rev} Len={self.length}"
        ]


_ExtDecoder = Callable[[ConfigBytes, int, int, int, int], ExtCapability]


def _decode_aer(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Aer:
    cap = cfg.u32(off + 0x18, "AER Capabilities and Control")
    return Aer(
        off,
        cid,
        ver,
        nxt,
        uncorrectable_status=UncorrectableError(cfg.u32(off + 0x04, "AER UESta")),
        uncorrectable_mask=UncorrectableError(cfg.u32(off + 0x08, "AER UEMsk")),
        uncorrectable_severity=UncorrectableError(cfg.u32(off + 0x0C, "AER UESvrt")),
        correctable_status=CorrectableError(cfg.u32(off + 0x10, "AER CESta")),
        correctable_mask=CorrectableError(cfg.u32(off + 0x14, "AER CEMsk")),
        first_error_pointer=cap & 0x1F,
        ecrc_generation_capable=bool(cap & 0x20),
        ecrc_generation_enable=bool(cap & 0x40),
        ecrc_check_capable=bool(cap & 0x80),
        ecrc_check_enable=bool(cap & 0x100),
        header_log=(
            cfg.u32(off + 0x1C, "AER header log"),
            cfg.u32(off + 0x20, "AER header log"),
            cfg.u32(off + 0x24, "AER header log"),
            cfg.u32(off + 0x28, "AER header log"),
        ),
    )


def _decode_dsn(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> SerialNumber:
    return SerialNumber(off, cid, ver, nxt, serial=cfg.u64(off + 4, "device serial number"))


def _decode_pwr(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> PowerBudgeting:
    return PowerBudgeting(
        off,
        cid,
        ver,
        nxt,
        data_select=cfg.u8(off + 4, "power budget data select"),
        data=cfg.u32(off + 8, "power budget data"),
        system_allocated=bool(cfg.u8(off + 0x0C, "power budget capability") & 1),
    )


def _decode_vc(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> VirtualChannel:
    reg = cfg.u32(off + 4, "VC port capability 1")
    return VirtualChannel(off, cid, ver, nxt, reg & 7, (reg >> 4) & 7)


def _decode_acs(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Acs:
    cap = cfg.u16(off + 4, "ACS capability")
    return Acs(
        off,
        cid,
        ver,
        nxt,
        AcsFlags(cap & 0x7F),
        AcsFlags(cfg.u16(off + 6, "ACS control") & 0x7F),
        cap >> 8,
    )


def _decode_ari(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Ari:
    cap = cfg.u16(off + 4, "ARI capability")
    return Ari(
        off, cid, ver, nxt, bool(cap & 1), bool(cap & 2), cap >> 8, cfg.u16(off + 6, "ARI control")
    )


def _decode_ats(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Ats:
    cap, ctrl = cfg.u16(off + 4, "ATS capability"), cfg.u16(off + 6, "ATS control")
    return Ats(
        off, cid, ver, nxt, (cap & 0x1F) or 32, bool(cap & 0x20), bool(ctrl & 0x8000), ctrl & 0x1F
    )


def _decode_sriov(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> SrIov:
    def r16(o: int, what: str) -> int:
        return cfg.u16(off + o, f"SR-IOV {what}")

    return SrIov(
        off,
        cid,
        ver,
        nxt,
        capabilities=cfg.u32(off + 0x04, "SR-IOV capabilities"),
        control=r16(0x08, "control"),
        status=r16(0x0A, "status"),
        initial_vfs=r16(0x0C, "InitialVFs"),
        total_vfs=r16(0x0E, "TotalVFs"),
        num_vfs=r16(0x10, "NumVFs"),
        function_dependency_link=cfg.u8(off + 0x12, "SR-IOV function dependency link"),
        vf_offset=r16(0x14, "First VF Offset"),
        vf_stride=r16(0x16, "VF Stride"),
        vf_device_id=r16(0x1A, "VF Device ID"),
        supported_page_sizes=cfg.u32(off + 0x1C, "SR-IOV supported page sizes"),
        system_page_size=cfg.u32(off + 0x20, "SR-IOV system page size"),
        # VF BARs use the memory BAR encoding (SR-IOV 1.1 §3.3.14).
        vf_bars=decode_bars(cfg, 6, off + 0x24),
    )


def _decode_ltr(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Ltr:
    return Ltr(
        off,
        cid,
        ver,
        nxt,
        cfg.u16(off + 4, "LTR max snoop latency"),
        cfg.u16(off + 6, "LTR max no-snoop latency"),
    )


def _decode_l1ss(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> L1Substates:
    return L1Substates(
        off,
        cid,
        ver,
        nxt,
        cfg.u32(off + 4, "L1SS capability"),
        cfg.u32(off + 8, "L1SS control 1"),
        cfg.u32(off + 0x0C, "L1SS control 2"),
    )


def _decode_rebar(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> ResizableBar:
    # The first control register's bits 7:5 say how many BARs (1-6) follow (§7.22.3).
    count = (cfg.u32(off + 8, "resizable BAR control") >> 5) & 7
    entries = []
    for i in range(min(count, 6)):
        cap = cfg.u32(off + 4 + 8 * i, f"resizable BAR {i} capability")
        ctrl = cfg.u32(off + 8 + 8 * i, f"resizable BAR {i} control")
        # Capability bit n (4..23) set: 2**(n+16) bytes supported, i.e. bit 4 is 1 MiB.
        sizes = tuple(1 << (n + 16) for n in range(4, 32) if cap & (1 << n))
        entries.append(ResizableBarEntry(ctrl & 7, sizes, 1 << (((ctrl >> 8) & 0x1F) + 20)))
    return ResizableBar(off, cid, ver, nxt, tuple(entries))


def _decode_pasid(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> Pasid:
    cap, ctrl = cfg.u16(off + 4, "PASID capability"), cfg.u16(off + 6, "PASID control")
    return Pasid(
        off, cid, ver, nxt, bool(cap & 2), bool(cap & 4), (cap >> 8) & 0x1F, bool(ctrl & 1)
    )


def _decode_vsec(cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int) -> VendorSpecificExt:
    hdr = cfg.u32(off + 4, "VSEC header")
    return VendorSpecificExt(off, cid, ver, nxt, hdr & 0xFFFF, (hdr >> 16) & 0xF, hdr >> 20)


def _decode_dvsec(
    cfg: ConfigBytes, off: int, cid: int, ver: int, nxt: int
) -> DesignatedVendorSpecific:
    h1 = cfg.u32(off + 4, "DVSEC header 1")
    return DesignatedVendorSpecific(
        off,
        cid,
        ver,
        nxt,
        h1 & 0xFFFF,
        (h1 >> 16) & 0xF,
        h1 >> 20,
        cfg.u16(off + 8, "DVSEC header 2"),
    )


_EXT_DECODERS: dict[int, _ExtDecoder] = {
    ExtCapId.ERR: _decode_aer,
    ExtCapId.VC: _decode_vc,
    ExtCapId.VC9: _decode_vc,
    ExtCapId.DSN: _decode_dsn,
    ExtCapId.PWR: _decode_pwr,
    ExtCapId.ACS: _decode_acs,
    ExtCapId.ARI: _decode_ari,
    ExtCapId.ATS: _decode_ats,
    ExtCapId.SRIOV: _decode_sriov,
    ExtCapId.LTR: _decode_ltr,
    ExtCapId.L1SS: _decode_l1ss,
    ExtCapId.REBAR: _decode_rebar,
    ExtCapId.PASID: _decode_pasid,
    ExtCapId.VNDR: _decode_vsec,
    ExtCapId.DVSEC: _decode_dvsec,
}


def walk_extended_capabilities(
    data: bytes | bytearray | memoryview | ConfigBytes,
) -> list[ExtCapability]:
    """Decode the PCIe extended capability list (from 0x100) of a config-space dump.

    Returns:
        The extended capabilities in list order; empty for a dump of 256 bytes or less, and
        when the header at 0x100 is 0 or all ones (no extended capabilities; PCIe 3.0 §7.9.3).

    Raises:
        ConfigSpaceError: a loop, a next offset below 0x100, or a capability cut off by the
            end of the dump.
    """
    cfg = config_bytes(data)
    if len(cfg) < PCI_EXT_CAP_START + 4:
        return []
    out: list[ExtCapability] = []
    seen: dict[int, None] = {}  # ordered, for the loop message
    ptr = PCI_EXT_CAP_START
    while ptr:
        if ptr < PCI_EXT_CAP_START:
            raise ConfigSpaceError(
                f"extended capability at {list(seen)[-1]:#x} points into the 256-byte PCI "
                f"space ({ptr:#x}): "
                f"extended capabilities must lie in 0x100-0xfff (PCIe 3.0 §7.9.3); "
                f"the config space is corrupt"
            )
        if ptr in seen:
            chain = " -> ".join(f"{p:#x}" for p in [*seen, ptr])
            raise ConfigSpaceError(
                f"extended capability list loops back to {ptr:#x} ({chain}); "
                f"the config space is corrupt"
            )
        seen[ptr] = None
        hdr = cfg.u32(ptr, f"extended capability header at {ptr:#x}")
        if hdr in (0, 0xFFFFFFFF):
            # Nothing at 0x100 means no extended capabilities (§7.9.3); all ones is what a
            # missing function or a failed config read returns. Either ends the list.
            break
        cid, ver, nxt = hdr & 0xFFFF, (hdr >> 16) & 0xF, (hdr >> 20) & ~3
        decoder = _EXT_DECODERS.get(cid)
        out.append(
            decoder(cfg, ptr, cid, ver, nxt) if decoder else ExtCapability(ptr, cid, ver, nxt)
        )
        ptr = nxt
    return out


def find_capability(caps: Sequence[Capability], cap_id: int) -> Capability | None:
    """The first capability with ``cap_id``, or ``None``."""
    return next((c for c in caps if c.id == cap_id), None)


def find_extended_capability(caps: Sequence[ExtCapability], cap_id: int) -> ExtCapability | None:
    """The first extended capability with ``cap_id``, or ``None``."""
    return next((c for c in caps if c.id == cap_id), None)
