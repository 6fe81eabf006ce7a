"""INTx through UIO (``uio_pci_generic``).

``read(/dev/uioN)`` blocks until an interrupt and returns the 4-byte total event count.
uio_pci_generic masks INTx by setting the Interrupt Disable bit (PCI command register bit
10) when it fires; it has no ``irqcontrol``, so writing 1 to the fd does nothing. The driver
re-enables by clearing that bit through config space once it acknowledged the device.
"""

from __future__ import annotations

import os

from udrv.backends.uio import UioDevice
from udrv.errors import IrqError
from udrv.irq.vector import Vector

PCI_COMMAND = 0x04  # PCI Local Bus Spec 3.0, 6.2.2
PCI_COMMAND_INTX_DISABLE = 1 << 10


class UioIrqs:
    def __init__(self, dev: UioDevice) -> None:
        self.dev = dev
        if dev.config.read8(0x3D) == 0:  # Interrupt Pin: 0 means no INTx
            raise IrqError(f"{dev.address} has no INTx pin; UIO offers no other interrupts")
        self._last = 0  # the total event count /dev/uioN last reported
        self.vectors = [
            Vector(
                dev.uio_fd,
                name=f"INTx of {dev.address} (/dev/{dev.uio_name})",
                read_count=self._count,
                rearm=self._unmask,
            )
        ]
        self._unmask()
        self.enabled = True
        dev.on_close(self.disable)

    def _count(self, fd: int) -> int:
        data = os.read(fd, 4)
        if len(data) != 4:
            raise IrqError(f"short read of {len(data)} bytes from /dev/{self.dev.uio_name}")
        total = int.from_bytes(data, "little")
        n = total - self._last if self._last else 1
        self._last = total
        return max(n, 1)

    def _unmask(self) -> None:
        self.dev.config.clear_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)

    def disable(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        for v in self.vectors:
            v.close()
        # Leave INTx masked: no interrupt storm once nobody listens.
        self.dev.config.set_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)
