"""Decode the PCI configuration header from a config-space dump (read-only).

Input is the ``bytes`` a ``config`` file gives (64 bytes unprivileged, 256 for PCI, 4096 for
PCIe and PCI-X mode 2). Register offsets carry the names of Linux's ``uapi/linux/pci_regs.h``;
layouts follow the PCI Local Bus Specification 3.0 §6.1-6.2 (common and type 0 header) and
the PCI-to-PCI Bridge Architecture Specification 1.2 §3.2 (type 1 header).

BAR *sizes* are not in a dump: finding one takes the sizing write of all ones (PCI 3.0
§6.2.5.1), which this module never does. Sizes come from sysfs ``resource`` instead
(:mod:`udrv.pci.sysfs`); :func:`with_sizes` merges them in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from udrv.errors import ConfigSpaceError

if TYPE_CHECKING:
    from udrv.pci.capabilities import Capability, ExtCapability

PCI_CFG_SPACE_SIZE = 256
PCI_CFG_SPACE_EXP_SIZE = 4096
PCI_STD_HEADER_SIZEOF = 64

# Common header, PCI 3.0 §6.1 figure 6-1.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A  # subclass; 0x0B is the base class
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_MASK = 0x7F
PCI_HEADER_TYPE_MULTIFUNCTION = 0x80
PCI_HEADER_TYPE_NORMAL = 0
PCI_HEADER_TYPE_BRIDGE = 1
PCI_HEADER_TYPE_CARDBUS = 2
PCI_BIST = 0x0F
PCI_BIST_CODE_MASK = 0x0F
PCI_BIST_START = 0x40
PCI_BIST_CAPABLE = 0x80

# Type 0 header, PCI 3.0 §6.2.5 (BARs), §6.2.5.2 (expansion ROM), §6.2.4.
PCI_BASE_ADDRESS_0 = 0x10
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F

# BAR register bits, PCI 3.0 §6.2.5.1.
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x06
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_TYPE_1M = 0x02  # "below 1 MiB", reserved since PCI 2.2
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_MEM_MASK = ~0x0F
PCI_BASE_ADDRESS_IO_MASK = ~0x03
PCI_ROM_ADDRESS_ENABLE = 0x01
PCI_ROM_ADDRESS_MASK = ~0x7FF

# Type 1 header, PCI-to-PCI Bridge Architecture Spec 1.2 §3.2.
PCI_PRIMARY_BUS = 0x18
PCI_SECONDARY_BUS = 0x19
PCI_SUBORDINATE_BUS = 0x1A
PCI_SEC_LATENCY_TIMER = 0x1B
PCI_IO_BASE = 0x1C
PCI_IO_LIMIT = 0x1D
PCI_IO_RANGE_TYPE_MASK = 0x0F
PCI_IO_RANGE_TYPE_16 = 0x00
PCI_IO_RANGE_TYPE_32 = 0x01
PCI_SEC_STATUS = 0x1E
PCI_MEMORY_BASE = 0x20
PCI_MEMORY_LIMIT = 0x22
PCI_PREF_MEMORY_BASE = 0x24
PCI_PREF_MEMORY_LIMIT = 0x26
PCI_PREF_RANGE_TYPE_MASK = 0x0F
PCI_PREF_RANGE_TYPE_64 = 0x01
PCI_PREF_BASE_UPPER32 = 0x28
PCI_PREF_LIMIT_UPPER32 = 0x2C
PCI_IO_BASE_UPPER16 = 0x30
PCI_IO_LIMIT_UPPER16 = 0x32
PCI_ROM_ADDRESS1 = 0x38
PCI_BRIDGE_CONTROL = 0x3E

# Type 2 (CardBus bridge) header: only where its capability pointer is.
PCI_CB_CAPABILITY_LIST = 0x14


class Command(enum.IntFlag):
    """Command register (offset 0x04), PCI 3.0 §6.2.2."""

    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    SPECIAL_CYCLES = 1 << 3
    MEMORY_WRITE_INVALIDATE = 1 << 4
    VGA_PALETTE_SNOOP = 1 << 5
    PARITY_ERROR_RESPONSE = 1 << 6
    IDSEL_STEPPING = 1 << 7  # hardwired 0 since PCI 3.0
    SERR_ENABLE = 1 << 8
    FAST_B2B_ENABLE = 1 << 9
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    """Status register (offset 0x06), PCI 3.0 §6.2.3; bit 0 from PCIe Base 4.0 §7.5.1.1.4.

    Bits 10:9 are the DEVSEL timing field (see :attr:`Header.devsel`), not flags.
    """

    IMMEDIATE_READINESS = 1 << 0
    INTERRUPT_STATUS = 1 << 3
    CAP_LIST = 1 << 4
    CAPABLE_66MHZ = 1 << 5
    UDF = 1 << 6
    FAST_B2B_CAPABLE = 1 << 7
    MASTER_DATA_PARITY_ERROR = 1 << 8
    DEVSEL_MEDIUM = 1 << 9
    DEVSEL_SLOW = 1 << 10
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


class BridgeControl(enum.IntFlag):
    """Bridge Control register (type 1 offset 0x3E), PCI-to-PCI Bridge Spec 1.2 §3.2.5.18."""

    PARITY_ERROR_RESPONSE = 1 << 0
    SERR_ENABLE = 1 << 1
    ISA_ENABLE = 1 << 2
    VGA_ENABLE = 1 << 3
    VGA_16BIT_DECODE = 1 << 4
    MASTER_ABORT_MODE = 1 << 5
    SECONDARY_BUS_RESET = 1 << 6
    FAST_B2B_ENABLE = 1 << 7
    PRIMARY_DISCARD_TIMEOUT = 1 << 8
    SECONDARY_DISCARD_TIMEOUT = 1 << 9
    DISCARD_TIMER_STATUS = 1 << 10
    DISCARD_TIMER_SERR_ENABLE = 1 << 11


DEVSEL_TIMING = ("fast", "medium", "slow", "reserved")
INTERRUPT_PINS = {0: None, 1: "A", 2: "B", 3: "C", 4: "D"}


class ConfigBytes:
    """Bounds-checked little-endian reads from a config-space dump.

    Every read outside the buffer raises :class:`ConfigSpaceError` naming the offset, the
    width and what was being read, never ``IndexError``.
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = bytes(data)

    def __len__(self) -> int:
        return len(self.data)

    def read(self, offset: int, width: int, what: str = "") -> int:
        if offset < 0 or offset + width > len(self.data):
            where = f" ({what})" if what else ""
            raise ConfigSpaceError(
                f"config space read of {width} byte(s) at {offset:#x}{where} is past its end "
                f"(a {len(self.data)}-byte dump: truncated, or read without root?)"
            )
        return int.from_bytes(self.data[offset : offset + width], "little")

    def u8(self, offset: int, what: str = "") -> int:
        return self.read(offset, 1, what)

    def u16(self, offset: int, what: str = "") -> int:
        return self.read(offset, 2, what)

    def u32(self, offset: int, what: str = "") -> int:
        return self.read(offset, 4, what)

    def u64(self, offset: int, what: str = "") -> int:
        return self.read(offset, 8, what)


def config_bytes(data: bytes | bytearray | memoryview | ConfigBytes) -> ConfigBytes:
    """Wrap a dump, checking its size (64 to 4096 bytes).

    Raises:
        ConfigSpaceError: too short for the standard header, or longer than 4 KiB.
    """
    if isinstance(data, ConfigBytes):
        return data
    cfg = ConfigBytes(data)
    if len(cfg) < PCI_STD_HEADER_SIZEOF:
        raise ConfigSpaceError(
            f"config space dump of {len(cfg)} bytes is shorter than the 64-byte header; "
            f"read /sys/bus/pci/devices/ADDR/config"
        )
    if len(cfg) > PCI_CFG_SPACE_EXP_SIZE:
        raise ConfigSpaceError(
            f"config space dump of {len(cfg)} bytes is longer than the 4096 bytes of PCIe "
            f"config space; pass one function's config only"
        )
    return cfg


class _Sized(Protocol):
    """What :func:`with_sizes` needs from a sysfs resource."""

    @property
    def index(self) -> int: ...

    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class Bar:
    """One Base Address Register as decoded from its raw value (PCI 3.0 §6.2.5.1).

    Attributes:
        index: BAR number (0-5; a 64-bit BAR also occupies ``index + 1``).
        offset: config offset of its (low) register.
        raw: the register value; for a 64-bit BAR both halves, high half in bits 63:32.
        is_io: I/O space (bit 0 set) rather than memory space.
        is_64bit: memory type 10b: a 64-bit address, the next BAR holds the high half.
        prefetchable: memory BAR with bit 3 set.
        address: the base address with the flag bits masked off.
        size: bytes decoded, when known from sysfs (see :func:`with_sizes`), else ``None``.
    """

    index: int
    offset: int
    raw: int
    is_io: bool
    is_64bit: bool
    prefetchable: bool
    address: int
    size: int | None = None

    @property
    def kind(self) -> str:
        return "io" if self.is_io else "memory"

    @property
    def io(self) -> bool:
        """The same as ``is_io``."""
        return self.is_io

    @property
    def below_1m(self) -> bool:
        """Memory type 01b (PCI 2.1 "locate below 1 MiB"; reserved since 2.2)."""
        return not self.is_io and self.raw & PCI_BASE_ADDRESS_MEM_TYPE_MASK == 0x02


@dataclass(frozen=True)
class ExpansionRom:
    """Expansion ROM Base Address register (PCI 3.0 §6.2.5.2)."""

    offset: int
    raw: int
    address: int
    enabled: bool
    size: int | None = None


@dataclass(frozen=True)
class Window:
    """An address window a bridge forwards downstream (PCI-to-PCI Bridge Spec 1.2 §3.2.5).

    Attributes:
        kind: ``"io"``, ``"memory"`` or ``"prefetchable"``.
        base, limit: first and last address forwarded (limit inclusive).
        wide: 32-bit I/O addressing or 64-bit prefetchable addressing is implemented.
    """

    kind: str
    base: int
    limit: int
    wide: bool

    @property
    def enabled(self) -> bool:
        """A window with base above limit forwards nothing (bridge spec §3.2.5.6)."""
        return self.base <= self.limit

    @property
    def size(self) -> int:
        return self.limit - self.base + 1 if self.enabled else 0


@dataclass(frozen=True)
class Type0:
    """The rest of a type 0 (endpoint) header, PCI 3.0 §6.1."""

    bars: tuple[Bar, ...]
    cardbus_cis: int
    subsystem_vendor_id: int
    subsystem_id: int
    rom: ExpansionRom
    capabilities_pointer: int
    interrupt_line: int
    interrupt_pin: int
    min_gnt: int
    max_lat: int


@dataclass(frozen=True)
class Type1:
    """The rest of a type 1 (PCI-to-PCI bridge) header, Bridge Spec 1.2 §3.2."""

    bars: tuple[Bar, ...]
    primary_bus: int
    secondary_bus: int
    subordinate_bus: int
    secondary_latency_timer: int
    io_window: Window | None  # None when the I/O base/limit registers are not implemented
    memory_window: Window
    prefetchable_window: Window | None  # None when not implemented
    secondary_status: Status
    rom: ExpansionRom
    capabilities_pointer: int
    interrupt_line: int
    interrupt_pin: int
    bridge_control: BridgeControl


@dataclass(frozen=True)
class Header:
    """The standard 64-byte header.

    Attributes:
        header_type: layout, bits 6:0 of offset 0x0E (0 endpoint, 1 PCI bridge, 2 CardBus).
        multifunction: bit 7 of offset 0x0E: the device has functions other than 0.
        body: the type-specific part for types 0 and 1, else ``None``.
    """

    vendor_id: int
    device_id: int
    command: Command
    status: Status
    revision: int
    prog_if: int
    subclass: int
    base_class: int
    cache_line_size: int
    latency_timer: int
    header_type: int
    multifunction: bool
    bist: int
    body: Type0 | Type1 | None

    @property
    def class_code(self) -> int:
        """The 24-bit class code: base class, subclass, programming interface."""
        return self.base_class << 16 | self.subclass << 8 | self.prog_if

    @property
    def devsel(self) -> str:
        """DEVSEL timing from status bits 10:9: ``fast``, ``medium`` or ``slow``."""
        return DEVSEL_TIMING[(self.status >> 9) & 3]

    @property
    def capabilities_pointer(self) -> int | None:
        """Offset of the first capability, or ``None`` when status says there is no list."""
        if not self.status & Status.CAP_LIST:
            return None
        if isinstance(self.body, Type0 | Type1):
            return self.body.capabilities_pointer
        return None

    @property
    def bars(self) -> tuple[Bar, ...]:
        return self.body.bars if self.body is not None else ()

    @property
    def rom(self) -> ExpansionRom | None:
        return self.body.rom if self.body is not None else None

    @property
    def interrupt_pin(self) -> str | None:
        """``"A"``-``"D"``, or ``None`` for no INTx pin."""
        if self.body is None:
            return None
        return INTERRUPT_PINS.get(self.body.interrupt_pin, f"?{self.body.interrupt_pin}")


def decode_bars(cfg: ConfigBytes, count: int, base: int = PCI_BASE_ADDRESS_0) -> tuple[Bar, ...]:
    """Decode ``count`` consecutive BAR registers starting at ``base``.

    Registers reading 0 are left out (not implemented, or unassigned 32-bit memory BARs:
    a dump cannot tell them apart). A 64-bit memory BAR takes the next register as its
    high half (PCI 3.0 §6.2.5.1).

    Raises:
        ConfigSpaceError: a 64-bit BAR in the last slot (its high half would be outside).
    """
    bars: list[Bar] = []
    i = 0
    while i < count:
        off = base + 4 * i
        raw = cfg.u32(off, f"BAR{i}")
        if raw & PCI_BASE_ADDRESS_SPACE_IO:
            bars.append(Bar(i, off, raw, True, False, False, raw & PCI_BASE_ADDRESS_IO_MASK))
            i += 1
            continue
        is64 = raw & PCI_BASE_ADDRESS_MEM_TYPE_MASK == PCI_BASE_ADDRESS_MEM_TYPE_64
        if is64:
            if i + 1 >= count:
                raise ConfigSpaceError(
                    f"BAR{i} at {off:#x} is a 64-bit memory BAR in the last BAR slot: "
                    f"it has no register for its upper half (PCI 3.0 §6.2.5.1); "
                    f"the device or dump is broken"
                )
            raw |= cfg.u32(off + 4, f"BAR{i + 1} (upper half of BAR{i})") << 32
        if raw:
            pf = bool(raw & PCI_BASE_ADDRESS_MEM_PREFETCH)
            bars.append(Bar(i, off, raw, False, is64, pf, raw & PCI_BASE_ADDRESS_MEM_MASK))
        i += 2 if is64 else 1
    return tuple(bars)


def _rom(cfg: ConfigBytes, off: int) -> ExpansionRom:
    raw = cfg.u32(off, "expansion ROM BAR")
    return ExpansionRom(off, raw, raw & PCI_ROM_ADDRESS_MASK & 0xFFFFFFFF, bool(raw & 1))


def _bridge_windows(cfg: ConfigBytes) -> tuple[Window | None, Window, Window | None]:
    # I/O: 4 KiB granular; type nibble 1 means the upper-16 registers hold bits 31:16 (§3.2.5.6).
    io_base, io_limit = cfg.u8(PCI_IO_BASE), cfg.u8(PCI_IO_LIMIT)
    io: Window | None = None
    if io_base or io_limit:
        wide = io_base & PCI_IO_RANGE_TYPE_MASK == PCI_IO_RANGE_TYPE_32
        base, limit = (io_base & 0xF0) << 8, (io_limit & 0xF0) << 8 | 0xFFF
        if wide:
            base |= cfg.u16(PCI_IO_BASE_UPPER16) << 16
            limit |= cfg.u16(PCI_IO_LIMIT_UPPER16) << 16
        io = Window("io", base, limit, wide)
    # Memory: 1 MiB granular, 32-bit only (§3.2.5.8).
    mem = Window(
        "memory",
        (cfg.u16(PCI_MEMORY_BASE) & 0xFFF0) << 16,
        (cfg.u16(PCI_MEMORY_LIMIT) & 0xFFF0) << 16 | 0xFFFFF,
        False,
    )
    # Prefetchable memory: 1 MiB granular, optionally 64-bit (§3.2.5.9-10).
    pbase, plimit = cfg.u16(PCI_PREF_MEMORY_BASE), cfg.u16(PCI_PREF_MEMORY_LIMIT)
    pref: Window | None = None
    if pbase or plimit:
        wide = pbase & PCI_PREF_RANGE_TYPE_MASK == PCI_PREF_RANGE_TYPE_64
        base, limit = (pbase & 0xFFF0) << 16, (plimit & 0xFFF0) << 16 | 0xFFFFF
        if wide:
            base |= cfg.u32(PCI_PREF_BASE_UPPER32) << 32
            limit |= cfg.u32(PCI_PREF_LIMIT_UPPER32) << 32
        pref = Window("prefetchable", base, limit, wide)
    return io, mem, pref


def decode_header(data: bytes | bytearray | memoryview | ConfigBytes) -> Header:
    """Decode the standard header of a config-space dump.

    Args:
        data: 64 to 4096 bytes of config space, from offset 0.

    Returns:
        The common header; ``body`` holds the type 0 or type 1 part.

    Raises:
        ConfigSpaceError: the dump is too short or too long, or a BAR is malformed.
    """
    cfg = config_bytes(data)
    ht = cfg.u8(PCI_HEADER_TYPE)
    layout = ht & PCI_HEADER_TYPE_MASK
    body: Type0 | Type1 | None = None
    if layout == PCI_HEADER_TYPE_NORMAL:
        body = Type0(
            bars=decode_bars(cfg, 6),
            cardbus_cis=cfg.u32(PCI_CARDBUS_CIS),
            subsystem_vendor_id=cfg.u16(PCI_SUBSYSTEM_VENDOR_ID),
            subsystem_id=cfg.u16(PCI_SUBSYSTEM_ID),
            rom=_rom(cfg, PCI_ROM_ADDRESS),
            capabilities_pointer=cfg.u8(PCI_CAPABILITY_LIST),
            interrupt_line=cfg.u8(PCI_INTERRUPT_LINE),
            interrupt_pin=cfg.u8(PCI_INTERRUPT_PIN),
            min_gnt=cfg.u8(PCI_MIN_GNT),
            max_lat=cfg.u8(PCI_MAX_LAT),
        )
    elif layout == PCI_HEADER_TYPE_BRIDGE:
        io, mem, pref = _bridge_windows(cfg)
        body = Type1(
            bars=decode_bars(cfg, 2),
            primary_bus=cfg.u8(PCI_PRIMARY_BUS),
            secondary_bus=cfg.u8(PCI_SECONDARY_BUS),
            subordinate_bus=cfg.u8(PCI_SUBORDINATE_BUS),
            secondary_latency_timer=cfg.u8(PCI_SEC_LATENCY_TIMER),
            io_window=io,
            memory_window=mem,
            prefetchable_window=pref,
            secondary_status=Status(cfg.u16(PCI_SEC_STATUS)),
            rom=_rom(cfg, PCI_ROM_ADDRESS1),
            capabilities_pointer=cfg.u8(PCI_CAPABILITY_LIST),
            interrupt_line=cfg.u8(PCI_INTERRUPT_LINE),
            interrupt_pin=cfg.u8(PCI_INTERRUPT_PIN),
            bridge_control=BridgeControl(cfg.u16(PCI_BRIDGE_CONTROL)),
        )
    return Header(
        vendor_id=cfg.u16(PCI_VENDOR_ID),
        device_id=cfg.u16(PCI_DEVICE_ID),
        command=Command(cfg.u16(PCI_COMMAND)),
        status=Status(cfg.u16(PCI_STATUS)),
        revision=cfg.u8(PCI_REVISION_ID),
        prog_if=cfg.u8(PCI_CLASS_PROG),
        subclass=cfg.u8(PCI_CLASS_DEVICE),
        base_class=cfg.u8(PCI_CLASS_DEVICE + 1),
        cache_line_size=cfg.u8(PCI_CACHE_LINE_SIZE),
        latency_timer=cfg.u8(PCI_LATENCY_TIMER),
        header_type=layout,
        multifunction=bool(ht & PCI_HEADER_TYPE_MULTIFUNCTION),
        bist=cfg.u8(PCI_BIST),
        body=body,
    )


def capability_list_start(header: Header, cfg: ConfigBytes) -> int | None:
    """Where the capability pointer is to be read from, given the header layout."""
    if not header.status & Status.CAP_LIST:
        return None
    if header.header_type == PCI_HEADER_TYPE_CARDBUS:
        return cfg.u8(PCI_CB_CAPABILITY_LIST, "CardBus capability pointer")
    if header.body is None:
        return None
    return header.body.capabilities_pointer


def with_sizes(header: Header, resources: Iterable[_Sized]) -> Header:
    """A copy of ``header`` whose BARs and ROM carry sizes from sysfs ``resource`` lines.

    Args:
        resources: objects with ``index`` (0-5 BARs, 6 ROM) and ``size``, such as
            :class:`udrv.pci.sysfs.Resource`.
    """
    sizes = {r.index: r.size for r in resources}
    if header.body is None:
        return header
    bars = tuple(replace(b, size=sizes.get(b.index)) for b in header.body.bars)
    rom = replace(header.body.rom, size=sizes.get(6))
    return replace(header, body=replace(header.body, bars=bars, rom=rom))


def human_size(size: int) -> str:
    """``128K``, ``1M``, ``4G`` as lspci prints sizes (exact powers of 1024 only)."""
    for unit in ("", "K", "M", "G", "T"):
        if size < 1024 or size % 1024:
            return f"{size}{unit}"
        size //= 1024
    return f"{size}P"


def _flags(value: int, names: Sequence[tuple[int, str]]) -> str:
    return " ".join(f"{name}{'+' if value & bit else '-'}" for bit, name in names)


_COMMAND_NAMES = (
    (Command.IO_SPACE, "I/O"),
    (Command.MEMORY_SPACE, "Mem"),
    (Command.BUS_MASTER, "BusMaster"),
    (Command.SPECIAL_CYCLES, "SpecCycle"),
    (Command.MEMORY_WRITE_INVALIDATE, "MemWINV"),
    (Command.VGA_PALETTE_SNOOP, "VGASnoop"),
    (Command.PARITY_ERROR_RESPONSE, "ParErr"),
    (Command.IDSEL_STEPPING, "Stepping"),
    (Command.SERR_ENABLE, "SERR"),
    (Command.FAST_B2B_ENABLE, "FastB2B"),
    (Command.INTX_DISABLE, "DisINTx"),
)


def _window_line(title: str, w: Window | None) -> str | None:
    if w is None:
        return None
    width = 4 if w.kind == "io" and not w.wide else 8 if not w.wide or w.kind == "io" else 16
    bits = (
        ("32-bit" if w.wide else "16-bit") if w.kind == "io" else "64-bit" if w.wide else "32-bit"
    )
    if not w.enabled:
        return f"{title}: [disabled] [{bits}]"
    return f"{title}: {w.base:0{width}x}-{w.limit:0{width}x} [size={human_size(w.size)}] [{bits}]"


def header_lines(header: Header) -> list[str]:
    """The header rendered like the first lines of ``lspci -vvv`` (without names)."""
    s = header.status
    lines = [
        f"Control: {_flags(header.command, _COMMAND_NAMES)}",
        "Status: "
        + _flags(
            s,
            (
                (Status.CAP_LIST, "Cap"),
                (Status.CAPABLE_66MHZ, "66MHz"),
                (Status.UDF, "UDF"),
                (Status.FAST_B2B_CAPABLE, "FastB2B"),
                (Status.MASTER_DATA_PARITY_ERROR, "ParErr"),
            ),
        )
        + f" DEVSEL={header.devsel} "
        + " ".join(
            f"{n}{'+' if s & b else '-'}"
            for b, n in (
                (Status.SIGNALED_TARGET_ABORT, ">TAbort"),
                (Status.RECEIVED_TARGET_ABORT, "<TAbort"),
                (Status.RECEIVED_MASTER_ABORT, "<MAbort"),
                (Status.SIGNALED_SYSTEM_ERROR, ">SERR"),
                (Status.DETECTED_PARITY_ERROR, "<PERR"),
                (Status.INTERRUPT_STATUS, "INTx"),
            )
        ),
    ]
    if header.command & Command.BUS_MASTER:
        lines.append(f"Latency: {header.latency_timer}")
    if header.interrupt_pin is not None and header.body is not None:
        lines.append(
            f"Interrupt: pin {header.interrupt_pin} routed to IRQ {header.body.interrupt_line}"
        )
    for bar in header.bars:
        size = f" [size={human_size(bar.size)}]" if bar.size else ""
        if bar.is_io:
            lines.append(f"Region {bar.index}: I/O ports at {bar.address:04x}{size}")
        else:
            bits = "64-bit" if bar.is_64bit else "low-1M" if bar.below_1m else "32-bit"
            pf = "prefetchable" if bar.prefetchable else "non-prefetchable"
            lines.append(f"Region {bar.index}: Memory at {bar.address:08x} ({bits}, {pf}){size}")
    body = header.body
    if isinstance(body, Type1):
        lines.append(
            f"Bus: primary={body.primary_bus:02x}, secondary={body.secondary_bus:02x}, "
            f"subordinate={body.subordinate_bus:02x}, "
            f"sec-latency={body.secondary_latency_timer}"
        )
        for title, w in (
            ("I/O behind bridge", body.io_window),
            ("Memory behind bridge", body.memory_window),
            ("Prefetchable memory behind bridge", body.prefetchable_window),
        ):
            line = _window_line(title, w)
            if line:
                lines.append(line)
    rom = header.rom
    if rom is not None and (rom.raw or rom.size):
        size = f" [size={human_size(rom.size)}]" if rom.size else ""
        state = "" if rom.enabled else " [disabled]"
        lines.append(f"Expansion ROM at {rom.address:08x}{state}{size}")
    return lines


# --------------------------------------------------------------------------------------------
# The whole of config space: header and both capability lists


@dataclass(frozen=True)
class ConfigSpace:
    """A decoded config-space dump: the header and the capabilities, standard then extended.

    Attributes:
        header: the decoded 64-byte header.
        capabilities: standard capabilities in list order, then extended ones.
        size: length of the dump (64, 256 or 4096).
        capabilities_unreadable: the Capabilities List bit is set but the dump is only the
            64-byte header (what sysfs gives a reader who is not root).
    """

    header: Header
    capabilities: list[Capability | ExtCapability]
    size: int
    capabilities_unreadable: bool = False

    vendor = property(lambda self: self.header.vendor_id)
    device = property(lambda self: self.header.device_id)
    command = property(lambda self: self.header.command)
    status = property(lambda self: self.header.status)
    revision = property(lambda self: self.header.revision)
    class_code = property(lambda self: self.header.class_code)
    header_type = property(lambda self: self.header.header_type)
    multifunction = property(lambda self: self.header.multifunction)

    @property
    def bars(self) -> list[Bar]:
        return list(self.header.bars)

    @property
    def interrupt_line(self) -> int:
        return self.header.body.interrupt_line if self.header.body is not None else 0

    @property
    def interrupt_pin(self) -> int:
        """0 for none, 1-4 for INTA-INTD."""
        return self.header.body.interrupt_pin if self.header.body is not None else 0

    @property
    def subsystem_vendor(self) -> int | None:
        body = self.header.body
        return body.subsystem_vendor_id if isinstance(body, Type0) else None

    @property
    def subsystem_device(self) -> int | None:
        body = self.header.body
        return body.subsystem_id if isinstance(body, Type0) else None

    @property
    def bridge(self) -> dict[str, Any]:
        """Bus numbers and windows of a type 1 header (empty for other types)."""
        body = self.header.body
        if not isinstance(body, Type1):
            return {}
        return {
            "primary_bus": body.primary_bus,
            "secondary_bus": body.secondary_bus,
            "subordinate_bus": body.subordinate_bus,
            "io_window": body.io_window,
            "memory_window": body.memory_window,
            "prefetchable_window": body.prefetchable_window,
        }

    @property
    def standard(self) -> list[Capability]:
        """The standard capabilities only."""
        from udrv.pci.capabilities import Capability

        return [c for c in self.capabilities if isinstance(c, Capability)]

    @property
    def extended(self) -> list[ExtCapability]:
        """The extended capabilities only."""
        from udrv.pci.capabilities import ExtCapability

        return [c for c in self.capabilities if isinstance(c, ExtCapability)]

    def cap(self, name_or_id: str | int) -> Capability | ExtCapability | None:
        """The first capability with this name, or this standard capability ID."""
        for c in self.capabilities:
            if c.name == name_or_id or (c.id == name_or_id and not c.extended):
                return c
        return None

    def ext_cap(self, cap_id: int) -> ExtCapability | None:
        """The first extended capability with this ID."""
        return next((c for c in self.extended if c.id == cap_id), None)


def walk_capabilities(data: bytes | bytearray | memoryview | ConfigBytes) -> list[Capability]:
    """The standard capability list; see :func:`udrv.pci.capabilities.walk_capabilities`."""
    from udrv.pci import capabilities

    return capabilities.walk_capabilities(data)


def walk_extended(data: bytes | bytearray | memoryview | ConfigBytes) -> list[ExtCapability]:
    """The extended list; see :func:`udrv.pci.capabilities.walk_extended_capabilities`."""
    from udrv.pci import capabilities

    return capabilities.walk_extended_capabilities(data)


def decode(data: bytes | bytearray | memoryview) -> ConfigSpace:
    """Decode a whole config-space dump: header, capabilities, extended capabilities.

    The extended list is walked for PCI Express functions with a 4 KiB dump (only they
    have extended config space, PCIe 3.0 §7.2.2).

    Raises:
        ConfigSpaceError: the dump is too short, or a capability list is broken (loop,
            pointer out of range, capability cut off); the message names the offset.
    """
    from udrv.pci import capabilities as caps

    cfg = config_bytes(data)
    header = decode_header(cfg)
    if capability_list_start(header, cfg) is not None and len(cfg) <= PCI_STD_HEADER_SIZEOF:
        return ConfigSpace(header, [], len(cfg), capabilities_unreadable=True)
    found: list[Capability | ExtCapability] = list(caps.walk_capabilities(cfg))
    if len(cfg) > PCI_CFG_SPACE_SIZE and any(c.id == caps.CapId.EXP for c in found):
        found += caps.walk_extended_capabilities(cfg)
    return ConfigSpace(header, found, len(cfg))


def describe(
    cs: ConfigSpace | bytes, *, resources: Iterable[_Sized] = (), names: bool = False
) -> list[str]:
    """Lines in the spirit of ``lspci -vvv`` for one function (used by ``udrv info``).

    Args:
        cs: a decoded :class:`ConfigSpace`, or the raw dump (decoded here; a broken
            capability list then becomes a ``Capabilities: <broken: ...>`` line).
        resources: sysfs ``resource`` entries (:attr:`PciDeviceInfo.bars
            <udrv.pci.sysfs.PciDeviceInfo.bars>`) to show BAR and ROM sizes.
        names: look vendor/device/class names up in pci.ids (:mod:`udrv.pci.ids`).

    Returns:
        Lines without a trailing newline; continuation lines start with a tab.
    """
    from udrv.pci.capabilities import ExtCapability

    broken = None
    if not isinstance(cs, ConfigSpace):
        raw = cs
        try:
            cs = decode(raw)
        except ConfigSpaceError as exc:
            cs, broken = ConfigSpace(decode_header(raw), [], len(raw)), str(exc)
    h = with_sizes(cs.header, resources)
    lines = []
    if names:
        from udrv.pci import ids

        title = (
            f"{ids.class_name(h.class_code)}: {ids.device_description(h.vendor_id, h.device_id)}"
        )
    else:
        title = f"Class {h.class_code >> 8:04x}: Device {h.vendor_id:04x}:{h.device_id:04x}"
    if h.revision:
        title += f" (rev {h.revision:02x})"
    if h.prog_if:
        pi = None
        if names:
            from udrv.pci import ids

            pi = ids.prog_if_name(h.class_code)
        title += f" (prog-if {h.prog_if:02x}{f' [{pi}]' if pi else ''})"
    lines.append(title)
    if cs.subsystem_vendor is not None and (cs.subsystem_vendor or cs.subsystem_device):
        sv, sd = cs.subsystem_vendor, cs.subsystem_device or 0
        if names:
            from udrv.pci import ids

            sub = ids.subsystem_description(h.vendor_id, h.device_id, sv, sd)
        else:
            sub = f"Device {sv:04x}:{sd:04x}"
        lines.append(f"Subsystem: {sub}")
    if h.multifunction:
        lines.append("Multifunction: yes")
    lines += header_lines(h)
    if cs.capabilities_unreadable:
        lines.append("Capabilities: <access denied; run as root to read all of config space>")
    for c in cs.capabilities:
        at = f"[{c.offset:x} v{c.version}]" if isinstance(c, ExtCapability) else f"[{c.offset:x}]"
        first, *rest = c.lines()
        lines.append(f"Capabilities: {at} {first}")
        lines += [f"\t{line}" for line in rest]
    if broken:
        lines.append(f"Capabilities: <broken: {broken}>")
    return lines
