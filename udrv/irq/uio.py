"""INTx through UIO (``uio_pci_generic``).

``read(/dev/uioN)`` blocks until an interrupt and returns the 4-byte total event count
(Documentation/driver-api/uio-howto.rst, "Reading from /dev/uioX"). uio_pci_generic's
handler masks INTx by setting Interrupt Disable (PCI command register bit 10) when its
device asserts the line; it has no ``irqcontrol``, so writing 1 to the fd fails. The driver
re-enables by clearing that bit through config space once it acknowledged the device.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from udrv.backends.uio import UioDevice
from udrv.errors import IrqError
from udrv.irq.vector import Vector

PCI_COMMAND = 0x04  # PCI Local Bus Spec 3.0, 6.2.2
PCI_COMMAND_INTX_DISABLE = 1 << 10
PCI_INTERRUPT_PIN = 0x3D  # 6.2.4: 0 = no INTx pin, 1-4 = INTA#-INTD#
UIO_CLASS = Path("/sys/class/uio")


def event_count(uio_name: str, root: Path | None = None) -> int:
    """The total interrupt count UIO has seen (``/sys/class/uio/uioN/event``)."""
    path = (root or UIO_CLASS) / uio_name / "event"
    try:
        return int(path.read_text())
    except (OSError, ValueError) as exc:
        raise IrqError(f"cannot read the UIO event count from {path}: {exc}") from None


class UioIrqs:
    """The one INTx vector of a UIO device. ``disable()`` restores Interrupt Disable."""

    def __init__(self, dev: UioDevice) -> None:
        self.dev = dev
        if dev.config.read8(PCI_INTERRUPT_PIN) == 0:
            raise IrqError(f"{dev.address} has no INTx pin; UIO offers no other interrupts")
        # Counting starts now: events before enable() are not reported by the first wait.
        self._last = event_count(dev.uio_name)
        # Non-blocking reads: a wait can try a read first, and asyncio needs it anyway.
        os.set_blocking(dev.uio_fd, False)
        cmd = dev.config.read16(PCI_COMMAND)
        self._was_disabled = bool(cmd & PCI_COMMAND_INTX_DISABLE)
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
        try:
            data = os.read(fd, 4)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise IrqError(f"read of /dev/{self.dev.uio_name} failed", errno=exc.errno) from None
        if len(data) != 4:
            raise IrqError(f"short read of {len(data)} bytes from /dev/{self.dev.uio_name}")
        total = int.from_bytes(data, "little")
        n = (total - self._last) & 0xFFFF_FFFF  # the kernel's counter is 32 bits and wraps
        self._last = total
        return n

    def _unmask(self) -> None:
        self.dev.config.clear_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)

    def disable(self) -> None:
        """Stop the vector and put Interrupt Disable back as it was before enable."""
        if not self.enabled:
            return
        self.enabled = False
        for v in self.vectors:
            v.close()
        # uio_pci_generic keeps its handler registered, so even an unmasked line cannot storm:
        # the kernel masks it again on the next assertion.
        with contextlib.suppress(Exception):
            if self._was_disabled:
                self.dev.config.set_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)
            else:
                self._unmask()
