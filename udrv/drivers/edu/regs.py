"""edu registers, from QEMU docs/specs/edu.rst ("MMIO area spec"), all in BAR0 (1 MiB).

Only 4-byte accesses are allowed below 0x80; 4 or 8 bytes from 0x80 on.
"""

from __future__ import annotations

VENDOR_ID = 0x1234  # "PCI specs": PCI ID 1234:11e8
DEVICE_ID = 0x11E8
BAR = 0  # "PCI Region 0: I/O memory, 1 MB in size"

IDENT = 0x00  # RO: 0xRRrr00ed, RR major and rr minor version
IDENT_MAGIC_MASK = 0x0000_00FF
IDENT_MAGIC = 0xED
LIVENESS = 0x04  # RW: reads back the bitwise inversion of what was written
FACTORIAL = 0x08  # RW: n in, n! out (computed once STATUS.COMPUTING clears)
STATUS = 0x20  # RW
STATUS_COMPUTING = 0x01  # RO: factorial in progress
STATUS_IRQFACT = 0x80  # raise interrupt 0x01 when the factorial is done
INTR_STATUS = 0x24  # RO: the causes that raised the interrupt
INTR_RAISE = 0x60  # WO: OR the value into INTR_STATUS and raise the interrupt
INTR_ACK = 0x64  # WO: clear these bits from INTR_STATUS (the ISR must do it, MSI too)
DMA_SRC = 0x80  # RW 64-bit: source address
DMA_DST = 0x88  # RW 64-bit: destination address
DMA_COUNT = 0x90  # RW 64-bit: bytes to transfer
DMA_CMD = 0x98  # RW 64-bit
DMA_CMD_START = 0x01  # start; reads 1 until the transfer is done
DMA_CMD_TO_RAM = 0x02  # direction: 0 RAM -> edu, 1 edu -> RAM
DMA_CMD_IRQ = 0x04  # raise interrupt 0x100 when done

INTR_FACTORIAL = 0x001  # edu.c: the cause the factorial completion raises
INTR_DMA = 0x100  # "raise interrupt 0x100 after finishing the DMA"

DMA_BUFFER = 0x40000  # "DMA controller": one 4096-byte buffer at this device address
DMA_BUFFER_SIZE = 4096
#: What a transfer may really use. QEMU's edu_check_range() (hw/misc/edu.c, QEMU 7.2) treats
#: a range that ends exactly at the end of the buffer as out of bounds and calls hw_error(),
#: which aborts the whole VM; so the last byte is unusable and the driver never touches it.
DMA_BUFFER_USABLE = DMA_BUFFER_SIZE - 1
DMA_MASK_BITS = 28  # "the device supports only 28 bits (256 MiB) by default"
