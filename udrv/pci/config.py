"""Config space decoding: headers (type 0 and 1), BARs, the capability lists.

Input is the bytes of config space (64, 256 or 4096 of them), e.g. from sysfs or VFIO. Every
pointer is checked: a truncated buffer, a capability pointer out of range or unaligned, or a
list that loops ends with ConfigSpaceError, never a hang or an IndexError.

References: PCI Local Bus Spec 3.0 (PCI) 6.1-6.8, PCI Express Base Spec 4.0 (PCIe) 7.5-7.9.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from udrv.errors import ConfigSpaceError

CAP_NAMES = {  # PCI Code and ID Assignment Spec 1.11, 2.1
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "VPD",
    0x04: "Slot ID",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific",
    0x0A: "Debug Port",
    0x0B: "CompactPCI Resource Control",
    0x0C: "PCI Hot-Plug",
    0x0D: "Bridge Subsystem Vendor ID",
    0x0E: "AGP 8x",
    0x0F: "Secure Device",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA",
    0x13: "Advanced Features",
    0x14: "Enhanced Allocation",
    0x15: "Flattening Portal Bridge",
}
EXT_CAP_NAMES = {  # PCI Code and ID Assignment Spec 1.11, 3.1
    0x0001: "Advanced Error Reporting", 0x0002: "Virtual Channel", 0x0003: "Device Serial Number",
    0x0004: "Power Budgeting", 0x0005: "Root Complex Link Declaration",
    0x0006: "Root Complex Internal Link Control", 0x0007: "Root Complex Event Collector",
    0x0008: "Multi-Function VC Arbitration", 0x0009: "Virtual Channel (MFVC)", 0x000A: "RCRB Header",
    0x000B: "Vendor Specific Extended", 0x000C: "Configuration Access Correlation",
    0x000D: "Access Control Services", 0x000E: "Alternative Routing-ID", 0x000F: "Address Translation",
    0x0010: "SR-IOV", 0x0011: "MR-IOV", 0x0012: "Multicast", 0x0013: "Page Request",
    0x0015: "Resizable BAR", 0x0016: "Dynamic Power Allocation", 0x0017: "TPH Requester",
    0x0018: "Latency Tolerance Reporting", 0x0019: "Secondary PCI Express", 0x001A: "PMUX",
    0x001B: "PASID", 0x001C: "LN Requester", 0x001D: "Downstream Port Containment",
    0x001E: "L1 PM Substates", 0x001F: "Precision Time Measurement", 0x0023: "Designated Vendor-Specific",
    0x0025: "Data Link Feature", 0x0026: "Physical Layer 16.0 GT/s",
}  # fmt: skip


class Command(enum.IntFlag):
    """Command register (PCI 6.2.2)."""

    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    SPECIAL_CYCLES = 1 << 3
    MWI_ENABLE = 1 << 4
    VGA_PALETTE_SNOOP = 1 << 5
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR_ENABLE = 1 << 8
    FAST_BACK_TO_BACK = 1 << 9
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    """Status register (PCI 6.2.3)."""

    INTERRUPT_STATUS = 1 << 3
    CAP_LIST = 1 << 4
    MHZ66 = 1 << 5
    FAST_BACK_TO_BACK = 1 << 7
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


@dataclass(frozen=True)
class Bar:
    """A BAR as its register(s) describe it (PCI 6.2.5.1); the size needs the sizing dance,
    so it comes from sysfs instead."""

    index: int
    io: bool
    is_64bit: bool
    prefetchable: bool
    address: int


@dataclass
class Capability:
    id: int
    offset: int
    name: str
    extended: bool = False
    version: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConfigSpace:
    vendor: int
    device: int
    command: Command
    status: Status
    revision: int
    class_code: int
    header_type: int
    multifunction: bool
    bars: list[Bar]
    interrupt_line: int
    interrupt_pin: int
    subsystem_vendor: int | None
    subsystem_device: int | None
    capabilities: list[Capability]
    bridge: dict[str, int] = field(default_factory=dict)
    capabilities_unreadable: bool = False  # a 64-byte (unprivileged) dump

    def cap(self, name_or_id: str | int) -> Capability | None:
        for c in self.capabilities:
            if c.name == name_or_id or (c.id == name_or_id and not c.extended):
                return c
        return None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def u(self, off: int, n: int) -> int:
        if off < 0 or off + n > len(self.data):
            raise ConfigSpaceError(
                f"config space read of {n} bytes at {off:#x} is past its end "
                f"({len(self.data)} bytes; truncated dump or unprivileged read?)"
            )
        return int.from_bytes(self.data[off : off + n], "little")


def decode(data: bytes) -> ConfigSpace:
    """Decode a config space dump.

    Raises:
        ConfigSpaceError: the dump is shorter than the header, or a capability list is broken.
    """
    if len(data) < 64:
        raise ConfigSpaceError(
            f"config space dump of {len(data)} bytes is shorter than the 64-byte header"
        )
    r = _Reader(data)
    htype = r.u(0x0E, 1)
    kind = htype & 0x7F
    nbars = 6 if kind == 0 else 2 if kind == 1 else 0
    bars = decode_bars([r.u(0x10 + 4 * i, 4) for i in range(nbars)])
    status = Status(r.u(0x06, 2))
    cs = ConfigSpace(
        vendor=r.u(0, 2), device=r.u(2, 2), command=Command(r.u(4, 2) & 0x7FF), status=status,
        revision=r.u(8, 1), class_code=r.u(9, 3), header_type=kind, multifunction=bool(htype & 0x80),
        bars=bars, interrupt_line=r.u(0x3C, 1), interrupt_pin=r.u(0x3D, 1),
        subsystem_vendor=r.u(0x2C, 2) if kind == 0 else None,
        subsystem_device=r.u(0x2E, 2) if kind == 0 else None,
        capabilities=[],
    )  # fmt: skip
    if kind == 1:  # PCI-to-PCI Bridge Architecture Spec 1.2, 3.2
        cs.bridge = {
            "primary_bus": r.u(0x18, 1), "secondary_bus": r.u(0x19, 1),
            "subordinate_bus": r.u(0x1A, 1), "io_base": (r.u(0x1C, 1) & 0xF0) << 8,
            "io_limit": ((r.u(0x1D, 1) & 0xF0) << 8) | 0xFFF,
            "memory_base": (r.u(0x20, 2) & 0xFFF0) << 16,
            "memory_limit": ((r.u(0x22, 2) & 0xFFF0) << 16) | 0xFFFFF,
            "prefetch_base": ((r.u(0x24, 2) & 0xFFF0) << 16) | (r.u(0x28, 4) << 32),
            "prefetch_limit": ((r.u(0x26, 2) & 0xFFF0) << 16) | 0xFFFFF | (r.u(0x2C, 4) << 32),
        }  # fmt: skip
    if status & Status.CAP_LIST and len(data) == 64:
        cs.capabilities_unreadable = True  # sysfs gives unprivileged readers the header only
    elif status & Status.CAP_LIST:
        cs.capabilities = list(walk_capabilities(data))
        if len(data) >= 4096 and any(c.id == 0x10 for c in cs.capabilities):
            cs.capabilities += list(walk_extended(data))
    return cs


def decode_bars(regs: list[int]) -> list[Bar]:
    bars, i = [], 0
    while i < len(regs):
        v = regs[i]
        if v == 0:  # unimplemented (or unassigned): nothing to describe
            i += 1
            continue
        if v & 1:
            bars.append(Bar(i, True, False, False, v & ~0x3))
            i += 1
            continue
        is64 = (v >> 1) & 3 == 2
        addr = v & ~0xF
        if is64 and i + 1 < len(regs):
            addr |= regs[i + 1] << 32
        bars.append(Bar(i, False, is64, bool(v & 8), addr))
        i += 2 if is64 else 1
    return bars


def walk_capabilities(data: bytes) -> list[Capability]:
    """The standard list from the pointer at 0x34 (PCI 6.7); at most 48 entries fit."""
    r = _Reader(data)
    out: list[Capability] = []
    seen: set[int] = set()
    ptr = r.u(0x34, 1) & 0xFC
    while ptr:
        if ptr < 0x40:
            raise ConfigSpaceError(f"capability pointer {ptr:#x} points into the header")
        if ptr in seen:
            raise ConfigSpaceError(f"capability list loops back to {ptr:#x}")
        seen.add(ptr)
        cid, nxt = r.u(ptr, 1), r.u(ptr + 1, 1)
        cap = Capability(cid, ptr, CAP_NAMES.get(cid, f"Unknown capability {cid:#04x}"))
        _decode_cap(r, cap)
        out.append(cap)
        if nxt & 3:
            raise ConfigSpaceError(f"capability at {ptr:#x} has an unaligned next pointer {nxt:#x}")
        ptr = nxt
    return out


def walk_extended(data: bytes) -> list[Capability]:
    """The extended list from 0x100 (PCIe 7.6.3): 32-bit headers, id/version/next."""
    r = _Reader(data)
    out: list[Capability] = []
    seen: set[int] = set()
    ptr = 0x100
    while ptr:
        if ptr < 0x100 or ptr & 3:
            raise ConfigSpaceError(f"extended capability pointer {ptr:#x} is invalid")
        if ptr in seen:
            raise ConfigSpaceError(f"extended capability list loops back to {ptr:#x}")
        seen.add(ptr)
        hdr = r.u(ptr, 4)
        if hdr in (0, 0xFFFFFFFF):
            break
        cid, ver, nxt = hdr & 0xFFFF, (hdr >> 16) & 0xF, hdr >> 20
        cap = Capability(cid, ptr, EXT_CAP_NAMES.get(cid, f"Unknown extended capability {cid:#06x}"),
                         extended=True, version=ver)  # fmt: skip
        if cid == 0x0003:
            cap.fields["serial"] = r.u(ptr + 4, 8)
        elif cid == 0x0010:  # SR-IOV (PCIe 9.3.3)
            cap.fields.update(initial_vfs=r.u(ptr + 0x0C, 2), total_vfs=r.u(ptr + 0x0E, 2),
                              num_vfs=r.u(ptr + 0x10, 2), vf_offset=r.u(ptr + 0x14, 2),
                              vf_stride=r.u(ptr + 0x16, 2), vf_device=r.u(ptr + 0x1A, 2))  # fmt: skip
        out.append(cap)
        ptr = nxt
    return out


def _decode_cap(r: _Reader, cap: Capability) -> None:
    p, f = cap.offset, cap.fields
    if cap.id == 0x01:  # PM (PCI PM Spec 1.2, 3.2)
        pmc = r.u(p + 2, 2)
        f.update(version=pmc & 7, d1=bool(pmc & 0x200), d2=bool(pmc & 0x400),
                 pme_support=pmc >> 11, power_state=r.u(p + 4, 2) & 3)  # fmt: skip
    elif cap.id == 0x05:  # MSI (PCI 6.8.1)
        ctl = r.u(p + 2, 2)
        is64 = bool(ctl & 0x80)
        f.update(enabled=bool(ctl & 1), multiple_message_capable=1 << ((ctl >> 1) & 7),
                 multiple_message_enable=1 << ((ctl >> 4) & 7), is_64bit=is64,
                 per_vector_masking=bool(ctl & 0x100))  # fmt: skip
        f["address"] = r.u(p + 4, 4) | (r.u(p + 8, 4) << 32 if is64 else 0)
        f["data"] = r.u(p + (12 if is64 else 8), 2)
    elif cap.id == 0x11:  # MSI-X (PCI 6.8.2)
        ctl = r.u(p + 2, 2)
        table, pba = r.u(p + 4, 4), r.u(p + 8, 4)
        f.update(enabled=bool(ctl & 0x8000), function_mask=bool(ctl & 0x4000),
                 table_size=(ctl & 0x7FF) + 1, table_bar=table & 7, table_offset=table & ~7,
                 pba_bar=pba & 7, pba_offset=pba & ~7)  # fmt: skip
    elif cap.id == 0x10:  # PCI Express (PCIe 7.5.3)
        caps = r.u(p + 2, 2)
        devcap = r.u(p + 4, 4)
        f.update(version=caps & 0xF, port_type=(caps >> 4) & 0xF,
                 max_payload=128 << (devcap & 7), flr=bool(devcap & (1 << 28)))  # fmt: skip
        if f["port_type"] not in (9,):  # root complex integrated endpoints have no link regs
            link_cap, link_sta = r.u(p + 0x0C, 4), r.u(p + 0x12, 2)
            f.update(link_max_speed=link_cap & 0xF, link_max_width=(link_cap >> 4) & 0x3F,
                     link_speed=link_sta & 0xF, link_width=(link_sta >> 4) & 0x3F)  # fmt: skip
    elif cap.id == 0x09:
        f["length"] = r.u(p + 2, 1)


PORT_TYPES = {0: "Endpoint", 1: "Legacy Endpoint", 4: "Root Port", 5: "Upstream Port",
              6: "Downstream Port", 7: "PCI-Express to PCI/PCI-X Bridge", 8: "PCI/PCI-X to PCI-Express Bridge",
              9: "Root Complex Integrated Endpoint", 10: "Root Complex Event Collector"}  # fmt: skip


def describe(cs: ConfigSpace) -> list[str]:
    """Lines in the spirit of ``lspci -vvv`` (used by `udrv info`)."""
    lines = [
        f"Vendor/device: {cs.vendor:04x}:{cs.device:04x} rev {cs.revision:02x}, class {cs.class_code:06x}, "
        f"header type {cs.header_type}{' (multifunction)' if cs.multifunction else ''}",
        f"Command: {cs.command!r}",
        f"Status: {cs.status!r}",
    ]
    if cs.subsystem_vendor is not None:
        lines.append(f"Subsystem: {cs.subsystem_vendor:04x}:{cs.subsystem_device:04x}")
    if cs.interrupt_pin:
        lines.append(f"Interrupt: pin {'ABCD'[cs.interrupt_pin - 1] if cs.interrupt_pin <= 4 else '?'} "
                     f"line {cs.interrupt_line}")  # fmt: skip
    for b in cs.bars:
        kind = (
            "I/O ports"
            if b.io
            else f"Memory ({'64' if b.is_64bit else '32'}-bit, "
            + ("prefetchable)" if b.prefetchable else "non-prefetchable)")
        )
        lines.append(f"BAR{b.index}: {kind} at {b.address:#x}")
    if cs.capabilities_unreadable:
        lines.append("Capabilities: <access denied: run as root to read all of config space>")
    for c in cs.capabilities:
        at = f"[{c.offset:x}{f' v{c.version}' if c.extended else ''}]"
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in c.fields.items())
        lines.append(f"Capabilities: {at} {c.name}{': ' + detail if detail else ''}")
    return lines


def _fmt(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) and v > 9 else str(v)
