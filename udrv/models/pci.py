"""A PCI function's config space as a device model sees it: the type 0 header, BARs that
size themselves, and the MSI and MSI-X capabilities.

Writes go through a per-byte write mask, as in hardware: read-only fields (ids, class,
capability pointers) ignore writes, a BAR keeps the low bits that give its size and type
(writing all-ones and reading back is how software sizes it, PCI 3.0 §6.2.5.1), and the
MSI/MSI-X control words change only in their enable and mask bits (PCI 3.0 §6.8.1, §6.8.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from udrv.errors import ModelError
from udrv.pci.capabilities import CapId
from udrv.pci.config import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)

PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04  # PCI 3.0 §6.2.5.1: bits 2:1 = 10b
PCI_COMMAND_IO = 0x1  # PCI 3.0 §6.2.2
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x08  # PCI 3.0 §6.2.3: INTx asserted
PCI_STATUS_CAP_LIST = 0x10

# MSI (PCI 3.0 §6.8.1): Message Control at +2.
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E  # Multiple Message Capable, log2
PCI_MSI_FLAGS_QSIZE = 0x0070  # Multiple Message Enable, log2
PCI_MSI_FLAGS_64BIT = 0x0080
# MSI-X (PCI 3.0 §6.8.2): Message Control at +2, Table at +4, PBA at +8.
PCI_MSIX_FLAGS_QSIZE = 0x07FF  # Table Size - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

FIRST_CAP = 0x40


@dataclass(frozen=True)
class BarLayout:
    """Where a BAR is and what it decodes: enough to build its config register."""

    index: int
    size: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        minimum = 4 if self.io else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ModelError(
                f"BAR{self.index}: size {self.size:#x} must be a power of two of at least "
                f"{minimum} bytes (PCI 3.0 §6.2.5.1)"
            )
        if not 0 <= self.index <= (4 if self.is_64bit else 5):
            raise ModelError(f"BAR{self.index}: no such BAR (0-5; a 64-bit BAR takes two)")
        if self.io and (self.is_64bit or self.prefetchable):
            raise ModelError(f"BAR{self.index}: an I/O BAR is neither 64-bit nor prefetchable")

    @property
    def type_bits(self) -> int:
        if self.io:
            return PCI_BASE_ADDRESS_SPACE_IO
        bits = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64bit else 0
        return bits | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class MsiX:
    """Where the MSI-X table and PBA live (in a BAR) and how many vectors there are."""

    vectors: int
    bar: int
    table_offset: int
    pba_offset: int
    cap_offset: int


class ConfigSpace:
    """256 bytes of config space with a write mask.

    Args:
        vendor_id, device_id, class_code (24 bits: base, sub, prog-if), revision,
        subsystem_vendor_id, subsystem_id: the identification fields (PCI 3.0 §6.2.1).
        interrupt_pin: 1 (INTA#) or 0 for none.
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 1,
    ) -> None:
        self.data = bytearray(PCI_CFG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CFG_SPACE_SIZE)
        self.put(PCI_VENDOR_ID, 2, vendor_id)
        self.put(PCI_DEVICE_ID, 2, device_id)
        self.put(PCI_REVISION_ID, 1, revision)
        self.put(PCI_CLASS_PROG, 3, class_code)
        self.put(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.put(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self.put(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self.set_wmask(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)  # fmt: skip
        self.set_wmask(PCI_INTERRUPT_LINE, 1, 0xFF)
        self.bars: dict[int, BarLayout] = {}
        self.msi_offset: int | None = None
        self.msi_vectors = 0
        self.msix: MsiX | None = None
        self._next_cap = FIRST_CAP
        self._last_cap_ptr = PCI_CAPABILITY_LIST
        self._reset_image = b""

    # -- raw access ------------------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Set a field regardless of the write mask (the device itself)."""
        self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def read(self, offset: int, count: int) -> bytes:
        """Bytes as software sees them.

        Raises:
            ModelError: outside the 256 bytes.
        """
        self._check(offset, count)
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """A write by software: only the bits in the write mask change.

        Raises:
            ModelError: outside the 256 bytes.
        """
        self._check(offset, len(data))
        for i, byte in enumerate(data):
            m = self.wmask[offset + i]
            old = self.data[offset + i]
            self.data[offset + i] = (old & ~m) | (byte & m)

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count <= 0 or offset + count > len(self.data):
            raise ModelError(
                f"config space access of {count} bytes at {offset:#x} is outside the "
                f"{len(self.data)} bytes"
            )

    # -- building ------------------------------------------------------------------------

    def add_bar(self, bar: BarLayout) -> None:
        """Declare a BAR: its type bits read back, its size shows in the write mask."""
        reg = PCI_BASE_ADDRESS_0 + 4 * bar.index
        if bar.index in self.bars or (
            bar.index - 1 in self.bars and self.bars[bar.index - 1].is_64bit
        ):
            raise ModelError(f"BAR{bar.index} is declared twice (or overlaps a 64-bit BAR)")
        self.bars[bar.index] = bar
        # An address as firmware would assign it (lspci and `udrv info` show unassigned
        # BARs as absent); the driver never uses it: regions are reached by index.
        base = (0xC000 if bar.io else 0xC000_0000) + bar.index * (0x100 if bar.io else 0x0100_0000)
        base = (base + bar.size - 1) & ~(bar.size - 1)
        self.put(reg, 4, (base & 0xFFFF_FFFF) | bar.type_bits)
        low_bits = 0x3 if bar.io else 0xF
        self.set_wmask(reg, 4, ~(bar.size - 1) & ~low_bits & 0xFFFF_FFFF)
        if bar.is_64bit:
            self.set_wmask(reg + 4, 4, (~(bar.size - 1) >> 32) & 0xFFFF_FFFF)

    def _add_cap(self, cap_id: int, size: int) -> int:
        off = self._next_cap
        if off + size > PCI_CFG_SPACE_SIZE:
            raise ModelError(f"capability {cap_id:#x} does not fit in config space")
        self.put(off, 1, cap_id)
        self.put(self._last_cap_ptr, 1, off)
        self._last_cap_ptr = off + 1
        self.put(PCI_STATUS, 2, self.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._next_cap = (off + size + 3) & ~3
        return off

    def add_msi(self, vectors: int = 1) -> int:
        """An MSI capability with 64-bit addresses for ``vectors`` (1-32, a power of two)."""
        if vectors < 1 or vectors > 32 or vectors & (vectors - 1):
            raise ModelError(f"MSI offers 1, 2, 4, 8, 16 or 32 vectors, not {vectors}")
        off = self._add_cap(CapId.MSI, 14)
        self.put(off + 2, 2, PCI_MSI_FLAGS_64BIT | ((vectors.bit_length() - 1) << 1))
        self.set_wmask(off + 2, 2, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        self.set_wmask(off + 4, 4, 0xFFFF_FFFC)  # Message Address (dword aligned)
        self.set_wmask(off + 8, 4, 0xFFFF_FFFF)  # Message Upper Address
        self.set_wmask(off + 12, 2, 0xFFFF)  # Message Data
        self.msi_offset, self.msi_vectors = off, vectors
        return off

    def add_pcix(self, mmrbc: int = 0) -> int:
        """A PCI-X capability (PCI-X 2.0 §7.2): Command with the Maximum Memory Read Byte
        Count field (bits 3:2: 512 << mmrbc bytes) set to ``mmrbc``, as firmware left it."""
        if not 0 <= mmrbc <= 3:
            raise ModelError(f"PCI-X MMRBC is 0-3 (512-4096 bytes), not {mmrbc}")
        off = self._add_cap(CapId.PCIX, 8)
        self.put(off + 2, 2, mmrbc << 2)
        self.set_wmask(off + 2, 2, 0x007F)  # DPERE, ERO, MMRBC, MOST
        self.put(off + 4, 4, 3 << 21)  # Status: designed MMRBC 4096 bytes
        return off

    def add_msix(self, vectors: int, bar: int, table_offset: int, pba_offset: int) -> MsiX:
        """An MSI-X capability: ``vectors`` (1-2048) with table and PBA in BAR ``bar``."""
        if not 1 <= vectors <= 2048:
            raise ModelError(f"MSI-X offers 1 to 2048 vectors, not {vectors}")
        if table_offset % 8 or pba_offset % 8:
            raise ModelError("the MSI-X table and PBA offsets must be multiples of 8")
        off = self._add_cap(CapId.MSIX, 12)
        self.put(off + 2, 2, vectors - 1)
        self.set_wmask(off + 2, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self.put(off + 4, 4, table_offset | bar)
        self.put(off + 8, 4, pba_offset | bar)
        self.msix = MsiX(vectors, bar, table_offset, pba_offset, off)
        return self.msix

    def seal(self) -> None:
        """Remember the built image: :meth:`reset` returns to it."""
        self._reset_image = bytes(self.data)

    def reset(self) -> None:
        self.data[:] = self._reset_image

    # -- state software set ----------------------------------------------------------------

    @property
    def command(self) -> int:
        return self.get(PCI_COMMAND, 2)

    @property
    def msi_enabled(self) -> bool:
        return self.msi_offset is not None and bool(
            self.get(self.msi_offset + 2, 2) & PCI_MSI_FLAGS_ENABLE
        )

    def set_msi_enabled(self, on: bool, vectors: int = 1) -> None:
        """What vfio-pci does to the capability when MSI is enabled through SET_IRQS."""
        if self.msi_offset is None:
            return
        ctrl = self.get(self.msi_offset + 2, 2) & ~(PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        if on:
            ctrl |= PCI_MSI_FLAGS_ENABLE | ((max(vectors, 1) - 1).bit_length() << 4)
        self.put(self.msi_offset + 2, 2, ctrl)

    @property
    def msi_enabled_vectors(self) -> int:
        if self.msi_offset is None:
            return 0
        return 1 << ((self.get(self.msi_offset + 2, 2) & PCI_MSI_FLAGS_QSIZE) >> 4)

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and bool(
            self.get(self.msix.cap_offset + 2, 2) & PCI_MSIX_FLAGS_ENABLE
        )

    @property
    def msix_masked(self) -> bool:
        return self.msix is not None and bool(
            self.get(self.msix.cap_offset + 2, 2) & PCI_MSIX_FLAGS_MASKALL
        )

    def set_msix_enabled(self, on: bool) -> None:
        if self.msix is None:
            return
        ctrl = self.get(self.msix.cap_offset + 2, 2) & ~PCI_MSIX_FLAGS_ENABLE
        self.put(self.msix.cap_offset + 2, 2, ctrl | (PCI_MSIX_FLAGS_ENABLE if on else 0))

    def set_intx_status(self, asserted: bool) -> None:
        status = self.get(PCI_STATUS, 2) & ~PCI_STATUS_INTERRUPT
        self.put(PCI_STATUS, 2, status | (PCI_STATUS_INTERRUPT if asserted else 0))
