"""edu registers, from QEMU docs/specs/edu.rst ("MMIO area spec"), all in BAR0 (1 MiB).

Only 4-byte accesses are allowed below 0x80; 4 or 8 bytes from 0x80 on (the DMA registers
are declared 8 bytes wide). Reset values are those of hw/misc/edu.c (QEMU 7.2), whose state
starts zeroed. The flat constants (``STATUS``, ``DMA_CMD_START``...) are derived from
:class:`EduRegs`.
"""

from __future__ import annotations

import enum

from udrv.core.regmap import Field, Register, RegisterMap

VENDOR_ID = 0x1234  # "PCI specs": PCI ID 1234:11e8
DEVICE_ID = 0x11E8
BAR = 0  # "PCI Region 0: I/O memory, 1 MB in size"

INTR_FACTORIAL = 0x001  # edu.c: the cause the factorial completion raises
INTR_DMA = 0x100  # "raise interrupt 0x100 after finishing the DMA"


class DmaDirection(enum.IntEnum):
    """DMA_CMD bit 1: "direction (0: from RAM to EDU, 1: from EDU to RAM)"."""

    FROM_RAM = 0
    TO_RAM = 1


_CAUSES = {
    "FACTORIAL": Field(0, doc="factorial done (STATUS.IRQFACT)"),
    "DMA": Field(8, doc="DMA transfer done (DMA_CMD.IRQ)"),
}


class EduRegs(RegisterMap):
    """edu.rst "MMIO area spec", BAR0."""

    SIZE = 1 << 20
    IDENT = Register(
        0x00,
        4,
        access="ro",
        reset=0x010000ED,
        doc="identification: 0xRRrr00ed, RR major and rr minor version",
        fields={
            "MAGIC": Field(0, 8, doc="0xed"),
            "MINOR": Field(16, 8, doc="minor version (rr)"),
            "MAJOR": Field(24, 8, doc="major version (RR)"),
        },
    )
    LIVENESS = Register(
        0x04, 4, doc="card liveness check: reads back the bitwise inversion of what was written"
    )
    FACTORIAL = Register(
        0x08, 4, reset=0, doc="factorial computation: n in, n! out once STATUS.COMPUTING clears"
    )
    STATUS = Register(
        0x20,
        4,
        reset=0,
        doc="status register",
        fields={
            "COMPUTING": Field(0, access="ro", doc="factorial in progress (0x01, read-only)"),
            "IRQFACT": Field(7, doc="raise interrupt 0x01 after finishing the factorial (0x80)"),
        },
    )
    INTR_STATUS = Register(
        0x24,
        4,
        access="ro",
        reset=0,
        doc="interrupt status: the causes that raised the interrupt",
        fields=_CAUSES,
    )
    INTR_RAISE = Register(
        0x60, 4, access="wo", doc="raise an interrupt: the value is ORed into INTR_STATUS"
    )
    INTR_ACK = Register(
        0x64,
        4,
        access="wo",
        doc="interrupt acknowledge: clears these bits of INTR_STATUS (the ISR must, MSI too)",
        fields=_CAUSES,
    )
    DMA_SRC = Register(0x80, 8, reset=0, doc="DMA source address")
    DMA_DST = Register(0x88, 8, reset=0, doc="DMA destination address")
    DMA_COUNT = Register(0x90, 8, reset=0, doc="DMA transfer count (bytes)")
    DMA_CMD = Register(
        0x98,
        8,
        reset=0,
        doc="DMA command register",
        fields={
            "START": Field(0, doc="start transfer; reads 1 until it is done"),
            "DIRECTION": Field(1, enum=DmaDirection),
            "IRQ": Field(2, doc="raise interrupt 0x100 after finishing the DMA"),
        },
    )


_STATUS, _DMA_CMD = EduRegs.STATUS.fields, EduRegs.DMA_CMD.fields

IDENT = EduRegs.IDENT.offset  # RO: 0xRRrr00ed, RR major and rr minor version
IDENT_MAGIC_MASK = EduRegs.IDENT.fields["MAGIC"].mask
IDENT_MAGIC = 0xED
LIVENESS = EduRegs.LIVENESS.offset
FACTORIAL = EduRegs.FACTORIAL.offset
STATUS = EduRegs.STATUS.offset
STATUS_COMPUTING = _STATUS["COMPUTING"].mask
STATUS_IRQFACT = _STATUS["IRQFACT"].mask
INTR_STATUS = EduRegs.INTR_STATUS.offset
INTR_RAISE = EduRegs.INTR_RAISE.offset
INTR_ACK = EduRegs.INTR_ACK.offset
DMA_SRC = EduRegs.DMA_SRC.offset
DMA_DST = EduRegs.DMA_DST.offset
DMA_COUNT = EduRegs.DMA_COUNT.offset
DMA_CMD = EduRegs.DMA_CMD.offset
DMA_CMD_START = _DMA_CMD["START"].mask
DMA_CMD_TO_RAM = _DMA_CMD["DIRECTION"].value(DmaDirection.TO_RAM)
DMA_CMD_IRQ = _DMA_CMD["IRQ"].mask
assert (_CAUSES["FACTORIAL"].mask, _CAUSES["DMA"].mask) == (INTR_FACTORIAL, INTR_DMA)

DMA_BUFFER = 0x40000  # "DMA controller": one 4096-byte buffer at this device address
DMA_BUFFER_SIZE = 4096
#: What a transfer may really use. QEMU's edu_check_range() (hw/misc/edu.c, QEMU 7.2) treats
#: a range that ends exactly at the end of the buffer as out of bounds and calls hw_error(),
#: which aborts the whole VM; so the last byte is unusable and the driver never touches it.
DMA_BUFFER_USABLE = DMA_BUFFER_SIZE - 1
DMA_MASK_BITS = 28  # "the device supports only 28 bits (256 MiB) by default"
