"""Interrupts through VFIO: ``VFIO_DEVICE_SET_IRQS`` with one eventfd per vector.

INTx is level-triggered and shared by nature; vfio-pci masks it when it fires
(``VFIO_IRQ_INFO_AUTOMASKED``), so after the driver acknowledged the device it must unmask
(:meth:`Vector.rearm` does ``ACTION_UNMASK``). MSI and MSI-X are edge-like messages: no
unmask. VFIO programs the MSI/MSI-X capability itself.
"""

from __future__ import annotations

import ctypes
import os

from udrv.backends.vfio import VfioDevice
from udrv.errors import IrqError
from udrv.irq.vector import Vector, eventfd_count
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import ioctl

KINDS = {"intx": V.VfioPciIrq.INTX, "msi": V.VfioPciIrq.MSI, "msix": V.VfioPciIrq.MSIX}


def irq_info(dev: VfioDevice, kind: str) -> V.vfio_irq_info:
    info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=KINDS[kind])
    ioctl(
        dev.device_fd,
        V.VFIO_DEVICE_GET_IRQ_INFO,
        info,
        what=f"VFIO_DEVICE_GET_IRQ_INFO {kind} of {dev.address}",
        error=IrqError,
    )
    return info


def counts(dev: VfioDevice) -> dict[str, int]:
    """Vectors the device offers per kind (0: not offered)."""
    return {k: int(irq_info(dev, k).count) for k in KINDS}


class VfioIrqs:
    """The enabled vectors of one kind on one device; ``disable()`` restores the device."""

    def __init__(self, dev: VfioDevice, kind: str, count: int) -> None:
        if kind not in KINDS:
            raise IrqError(f"unknown interrupt kind {kind!r}; use intx, msi or msix")
        offered = int(irq_info(dev, kind).count)
        if count < 1 or count > offered:
            raise IrqError(
                f"{dev.address} offers {offered} {kind.upper()} vector(s); cannot enable {count}"
            )
        self.dev, self.kind, self.index = dev, kind, KINDS[kind]
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self._set(V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, self.fds)
        except IrqError:
            for fd in self.fds:
                os.close(fd)
            raise
        rearm = self._unmask if kind == "intx" else None
        self.vectors = [
            Vector(
                fd,
                name=f"{kind.upper()} {i} of {dev.address}",
                read_count=eventfd_count,
                rearm=rearm,
            )
            for i, fd in enumerate(self.fds)
        ]
        self.enabled = True
        dev.on_close(self.disable)

    def _set(self, flags: int, fds: list[int] | None = None, count: int | None = None) -> None:
        arg = V.irq_set(self.index, flags, 0, fds, count)
        ioctl(
            self.dev.device_fd,
            V.VFIO_DEVICE_SET_IRQS,
            arg,
            what=f"VFIO_DEVICE_SET_IRQS {self.kind} of {self.dev.address}",
            error=IrqError,
        )

    def _unmask(self) -> None:
        self._set(V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK, count=1)

    def disable(self) -> None:
        """Tear the vectors down (the device goes back to no interrupts)."""
        if not self.enabled:
            return
        self.enabled = False
        for v in self.vectors:
            v.close()
        if self.dev.device_fd >= 0:
            self._set(V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)
        for fd in self.fds:
            os.close(fd)
