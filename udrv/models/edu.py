"""QEMU's edu device as a model, after ``docs/specs/edu.rst`` (and hw/misc/edu.c where the
text is silent): identification, liveness, factorial with status and interrupt, the
interrupt status/raise/acknowledge registers, and the DMA engine with its 4 KiB buffer at
0x40000, the 28-bit DMA mask and the completion interrupt. MSI (one vector) or INTx.

The register constants are written here from the specification, not imported from the
driver (:mod:`udrv.drivers.edu.regs`): a model that shared the driver's numbers could not
catch a wrong one.
"""

from __future__ import annotations

from udrv.models.base import PciModel
from udrv.models.pci import ConfigSpace

# "PCI specs"
VENDOR_ID, DEVICE_ID = 0x1234, 0x11E8
REVISION = 0x10
CLASS_CODE = 0x00FF00  # PCI_CLASS_OTHERS, as edu.c
BAR0_SIZE = 1 << 20  # "PCI Region 0: I/O memory, 1 MB in size"

# "MMIO area spec"
IDENT = 0x00  # RO 0xRRrr00ed
IDENT_VALUE = 0x010000ED  # version 1.0
LIVENESS = 0x04
FACTORIAL = 0x08
STATUS = 0x20
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
INTR_STATUS = 0x24
INTR_RAISE = 0x60
INTR_ACK = 0x64
DMA_SRC = 0x80
DMA_DST = 0x88
DMA_COUNT = 0x90
DMA_CMD = 0x98
DMA_CMD_START = 0x1
DMA_CMD_TO_RAM = 0x2  # direction: 0 RAM -> edu, 1 edu -> RAM
DMA_CMD_IRQ = 0x4
INTR_FACTORIAL = 0x001
INTR_DMA = 0x100

# "DMA controller"
DMA_BUFFER = 0x40000
DMA_BUFFER_SIZE = 4096
DMA_MASK_BITS = 28  # edu.c "dma_mask" property default

#: Delays that let a driver observe the busy states (edu.c runs DMA from a 100 ms timer;
#: a shorter one keeps tests fast).
DMA_DELAY = 0.001


class EduModel(PciModel):
    """The edu device.

    Args:
        dma_mask_bits: addresses are clamped to this many bits (edu.c clamps and prints).
        strict_buffer_end: refuse a transfer that ends exactly at the end of the buffer, as
            edu.c's ``edu_check_range`` does (it aborts QEMU; the model records a fault and
            drops the transfer: no completion, no interrupt).
    """

    name = "edu"

    def __init__(
        self, *, dma_mask_bits: int = DMA_MASK_BITS, strict_buffer_end: bool = True
    ) -> None:
        super().__init__(
            ConfigSpace(
                vendor_id=VENDOR_ID,
                device_id=DEVICE_ID,
                class_code=CLASS_CODE,
                revision=REVISION,
                subsystem_vendor_id=0x1AF4,  # QEMU's default subsystem ids
                subsystem_id=0x1100,
            )
        )
        self.add_bar(0, BAR0_SIZE, read=self.mmio_read, write=self.mmio_write)
        self.config.add_msi(1)
        self.seal()
        self.dma_mask = (1 << dma_mask_bits) - 1
        self.strict_buffer_end = strict_buffer_end
        self.reset()

    def reset(self) -> None:
        self.addr4 = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_cnt = self.dma_cmd = 0
        self.buffer = bytearray(DMA_BUFFER_SIZE)

    # -- MMIO ------------------------------------------------------------------------------

    def mmio_read(self, offset: int, width: int) -> int:
        # edu.c: only 4-byte accesses below 0x80, 4 or 8 from there; others read all-ones.
        if (offset < 0x80 and width != 4) or (offset >= 0x80 and width not in (4, 8)):
            return (1 << (8 * width)) - 1
        if offset == IDENT:
            return IDENT_VALUE
        if offset == LIVENESS:
            return self.addr4  # stored inverted on write
        if offset == FACTORIAL:
            return self.fact
        if offset == STATUS:
            return self.status
        if offset == INTR_STATUS:
            return self.irq_status
        regs = {DMA_SRC: self.dma_src, DMA_DST: self.dma_dst, DMA_COUNT: self.dma_cnt, DMA_CMD: self.dma_cmd}  # fmt: skip
        if offset in regs:
            return regs[offset] & ((1 << (8 * width)) - 1)
        return (1 << (8 * width)) - 1

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if (offset < 0x80 and width != 4) or (offset >= 0x80 and width not in (4, 8)):
            return
        if offset == LIVENESS:
            self.addr4 = ~value & 0xFFFF_FFFF
        elif offset == FACTORIAL:
            if self.status & STATUS_COMPUTING:
                return  # edu.c: ignored while computing
            self.fact = value
            self.status |= STATUS_COMPUTING
            self.defer(self._compute)
        elif offset == STATUS:
            self.status = (self.status & ~STATUS_IRQFACT) | (value & STATUS_IRQFACT)
        elif offset == INTR_RAISE:
            self._raise(value)
        elif offset == INTR_ACK:
            self._lower(value)
        elif offset in (DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD):
            if self.dma_cmd & DMA_CMD_START:
                return  # edu.c dma_rw: registers are frozen while a transfer runs
            if offset == DMA_SRC:
                self.dma_src = value
            elif offset == DMA_DST:
                self.dma_dst = value
            elif offset == DMA_COUNT:
                self.dma_cnt = value
            else:
                self.dma_cmd = value
                if value & DMA_CMD_START:
                    self.defer(self._dma, DMA_DELAY)

    # -- device work -----------------------------------------------------------------------

    def _raise(self, cause: int) -> None:
        self.irq_status |= cause
        if self.irq_status:
            self.raise_irq(0)

    def _lower(self, cause: int) -> None:
        self.irq_status &= ~cause
        if not self.irq_status and not self.config.msi_enabled:
            self.set_intx(False)

    def _compute(self) -> None:
        n, result = self.fact, 1
        for i in range(2, n + 1):
            result = (result * i) & 0xFFFF_FFFF
            if result == 0:
                break  # stays 0 from here on: 34! and beyond are multiples of 2**32
        self.fact = result
        self.status &= ~STATUS_COMPUTING
        if self.status & STATUS_IRQFACT:
            self._raise(INTR_FACTORIAL)

    def _in_buffer(self, addr: int, size: int) -> bool:
        end, limit = addr + size, DMA_BUFFER + DMA_BUFFER_SIZE
        if self.strict_buffer_end:
            return DMA_BUFFER <= addr < limit and addr < end < limit
        return addr >= DMA_BUFFER and addr < end <= limit

    def _dma(self) -> None:
        if not self.dma_cmd & DMA_CMD_START:
            return
        size = self.dma_cnt
        to_ram = bool(self.dma_cmd & DMA_CMD_TO_RAM)
        dev_addr = self.dma_src if to_ram else self.dma_dst
        ram = (self.dma_dst if to_ram else self.dma_src) & self.dma_mask
        if not self._in_buffer(dev_addr, size):
            self.dma_cmd &= ~DMA_CMD_START
            self.fault(
                f"edu: DMA of {size:#x} bytes at device address {dev_addr:#x} is outside the "
                f"buffer {DMA_BUFFER:#x}-{DMA_BUFFER + DMA_BUFFER_SIZE - 1:#x}; transfer dropped "
                "(QEMU aborts here)"
            )
            return
        at = dev_addr - DMA_BUFFER
        try:
            if to_ram:
                self.dma_write(ram, bytes(self.buffer[at : at + size]))
            else:
                self.buffer[at : at + size] = self.dma_read(ram, size)
        finally:
            self.dma_cmd &= ~DMA_CMD_START
        if self.dma_cmd & DMA_CMD_IRQ:
            self._raise(INTR_DMA)
