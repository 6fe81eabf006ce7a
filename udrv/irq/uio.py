"""INTx through UIO (``uio_pci_generic``): ``dev.irq`` of a UIO device.

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

from udrv.core.device import Device
from udrv.core.interrupts import Interrupts
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


class UioInterrupts(Interrupts):
    """The one INTx vector of a UIO device; ``disable()`` restores Interrupt Disable.

    Args:
        device: the UIO device.
        uio_fd: its open ``/dev/uioN`` (owned by the device).
        uio_name: ``uioN``.
    """

    not_offered_hint = "; uio_pci_generic gives INTx only: open it with backend='vfio' for MSI"

    def __init__(self, device: Device, uio_fd: int, uio_name: str) -> None:
        super().__init__(device)
        self.uio_fd, self.uio_name = uio_fd, uio_name
        self._last = 0
        self._was_disabled = False

    def available(self) -> dict[str, int]:
        pin = self.device.config.read8(PCI_INTERRUPT_PIN)
        return {"intx": 1 if pin else 0, "msi": 0, "msix": 0}

    def _enable(self, kind: str, count: int) -> list[Vector]:
        # available() offers INTx only, so the base class refused anything else already.
        dev = self.device
        # Counting starts now: events before enable() are not reported by the first wait.
        self._last = event_count(self.uio_name)
        # Non-blocking reads: a wait can try a read first, and asyncio needs it anyway.
        os.set_blocking(self.uio_fd, False)
        cmd = dev.config.read16(PCI_COMMAND)
        self._was_disabled = bool(cmd & PCI_COMMAND_INTX_DISABLE)
        vec = Vector(
            self.uio_fd,
            name=f"INTx of {dev.address} (/dev/{self.uio_name})",
            read_count=self._count,
            rearm=self._unmask,
        )
        self._unmask()
        return [vec]

    def _count(self, fd: int) -> int:
        try:
            data = os.read(fd, 4)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise IrqError(f"read of /dev/{self.uio_name} failed", errno=exc.errno) from None
        if len(data) != 4:
            raise IrqError(f"short read of {len(data)} bytes from /dev/{self.uio_name}")
        total = int.from_bytes(data, "little")
        n = (total - self._last) & 0xFFFF_FFFF  # the kernel's counter is 32 bits and wraps
        self._last = total
        return n

    def _unmask(self) -> None:
        self.device.config.clear_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)

    def _disable(self) -> None:
        # uio_pci_generic keeps its handler registered, so even an unmasked line cannot storm:
        # the kernel masks it again on the next assertion. The fd stays open (the device's).
        with contextlib.suppress(Exception):
            if self._was_disabled:
                self.device.config.set_bits(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, width=2)
            else:
                self._unmask()
