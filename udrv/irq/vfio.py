"""Interrupts through VFIO: ``VFIO_DEVICE_SET_IRQS`` with one eventfd per vector.

INTx is level-triggered; vfio-pci masks it when it fires (``VFIO_IRQ_INFO_AUTOMASKED``:
with the PCI 2.3 Interrupt Disable bit where the device has it, else by disabling the host
line), so after the driver acknowledged the device it must unmask (:meth:`Vector.rearm`
does ``VFIO_IRQ_SET_ACTION_UNMASK``). MSI and MSI-X are messages: no unmask. vfio-pci
programs the MSI/MSI-X capability itself (include/uapi/linux/vfio.h, VFIO_DEVICE_SET_IRQS).
Only one index (INTx, MSI or MSI-X) can be enabled at a time.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from udrv.backends.vfio import VfioDevice
from udrv.errors import IrqError
from udrv.irq.vector import Vector, eventfd_count
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import ioctl

KINDS = {"intx": V.VfioPciIrq.INTX, "msi": V.VfioPciIrq.MSI, "msix": V.VfioPciIrq.MSIX}


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info`` of one index, decoded."""

    kind: str
    count: int
    eventfd: bool
    maskable: bool
    automasked: bool
    noresize: bool


def irq_info(dev: VfioDevice, kind: str) -> IrqInfo:
    """VFIO_DEVICE_GET_IRQ_INFO for ``kind`` ("intx", "msi", "msix")."""
    if kind not in KINDS:
        raise IrqError(f"unknown interrupt kind {kind!r}; use intx, msi or msix")
    info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=KINDS[kind])
    ioctl(
        dev.device_fd,
        V.VFIO_DEVICE_GET_IRQ_INFO,
        info,
        what=f"VFIO_DEVICE_GET_IRQ_INFO {kind} of {dev.address}",
        error=IrqError,
    )
    f = int(info.flags)
    return IrqInfo(
        kind=kind,
        count=int(info.count),
        eventfd=bool(f & V.VFIO_IRQ_INFO_EVENTFD),
        maskable=bool(f & V.VFIO_IRQ_INFO_MASKABLE),
        automasked=bool(f & V.VFIO_IRQ_INFO_AUTOMASKED),
        noresize=bool(f & V.VFIO_IRQ_INFO_NORESIZE),
    )


def counts(dev: VfioDevice) -> dict[str, int]:
    """Vectors the device offers per kind (0: not offered)."""
    return {k: irq_info(dev, k).count for k in KINDS}


class VfioIrqs:
    """The enabled vectors of one kind on one device; ``disable()`` restores the device."""

    def __init__(self, dev: VfioDevice, kind: str, count: int) -> None:
        offered = irq_info(dev, kind).count
        if count < 1 or count > offered:
            raise IrqError(
                f"{dev.address} offers {offered} {kind.upper()} vector(s); cannot enable {count}"
            )
        self.dev, self.kind, self.index = dev, kind, KINDS[kind]
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self._set(V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, self.fds)
        except IrqError as exc:
            for fd in self.fds:
                os.close(fd)
            if exc.errno == errno.EINVAL:
                raise IrqError(
                    f"{dev.address}: VFIO refused to enable {count} {kind.upper()} vector(s) "
                    "(another interrupt kind is still enabled? disable it first)",
                    errno=exc.errno,
                ) from None
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
        """Tear the vectors down: the device goes back to no interrupts (MSI/MSI-X Enable
        cleared by vfio-pci, INTx masked again)."""
        if not self.enabled:
            return
        self.enabled = False
        for v in self.vectors:
            v.close()
        try:
            if self.dev.device_fd >= 0:
                # DATA_NONE + TRIGGER with count 0 disables the whole index (vfio.h).
                self._set(V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
