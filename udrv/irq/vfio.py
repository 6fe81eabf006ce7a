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

from udrv.core.device import Device
from udrv.core.interrupts import INTX_BUSY, Interrupts
from udrv.core.interrupts import KINDS as KIND_NAMES
from udrv.errors import IrqError
from udrv.irq.affinity import vfio_irq_name
from udrv.irq.vector import Vector, eventfd_count
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import ioctl

#: VFIO's irq index of each kind (include/uapi/linux/vfio.h, VFIO_PCI_*_IRQ_INDEX).
KINDS = {"intx": V.VfioPciIrq.INTX, "msi": V.VfioPciIrq.MSI, "msix": V.VfioPciIrq.MSIX}
assert tuple(KINDS) == KIND_NAMES


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info`` of one index, decoded."""

    kind: str
    count: int
    eventfd: bool
    maskable: bool
    automasked: bool
    noresize: bool


def irq_info(device_fd: int, address: str, kind: str) -> IrqInfo:
    """VFIO_DEVICE_GET_IRQ_INFO for ``kind`` ("intx", "msi", "msix") of the device open as
    ``device_fd``."""
    if kind not in KINDS:
        raise IrqError(f"unknown interrupt kind {kind!r}; use intx, msi or msix")
    info = V.vfio_irq_info(argsz=ctypes.sizeof(V.vfio_irq_info), index=KINDS[kind])
    ioctl(
        device_fd,
        V.VFIO_DEVICE_GET_IRQ_INFO,
        info,
        what=f"VFIO_DEVICE_GET_IRQ_INFO {kind} of {address}",
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


class VfioInterrupts(Interrupts):
    """``dev.irq`` of a VFIO device: one eventfd per vector; ``disable()`` restores the
    device (vfio-pci clears MSI/MSI-X Enable, INTx is masked again).

    Args:
        device: the VFIO device.
        device_fd: its VFIO device fd (valid until the device closes, which disables first).
    """

    def __init__(self, device: Device, device_fd: int) -> None:
        super().__init__(device)
        self.device_fd = device_fd
        self.index = -1
        self.fds: list[int] = []

    def info(self, kind: str) -> IrqInfo:
        """What VFIO says about ``kind`` (count, maskable, automasked...)."""
        return irq_info(self.device_fd, self.device.address, kind)

    def available(self) -> dict[str, int]:
        return {k: self.info(k).count for k in KINDS}

    def _enable(self, kind: str, count: int) -> list[Vector]:
        addr = self.device.address
        self.index = KINDS[kind]
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self._set(kind, V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, self.fds)
        except IrqError as exc:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            if exc.errno == errno.EINVAL:
                raise IrqError(
                    f"{addr}: VFIO refused to enable {count} {kind.upper()} vector(s) "
                    "(is it enabled by another user of the device?)",
                    errno=exc.errno,
                ) from None
            if exc.errno == errno.EBUSY and kind == "intx":
                raise IrqError(INTX_BUSY.format(address=addr), errno=exc.errno) from None
            raise
        rearm = self._unmask_intx if kind == "intx" else None
        return [
            Vector(
                fd,
                name=f"{kind.upper()} {i} of {addr}",
                read_count=eventfd_count,
                rearm=rearm,
                irq_name=vfio_irq_name(kind, i, addr),
            )
            for i, fd in enumerate(self.fds)
        ]

    def _set(
        self, kind: str, flags: int, fds: list[int] | None = None, count: int | None = None
    ) -> None:
        arg = V.irq_set(KINDS[kind], flags, 0, fds, count)
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_SET_IRQS,
            arg,
            what=f"VFIO_DEVICE_SET_IRQS {kind} of {self.device.address}",
            error=IrqError,
        )

    def _unmask_intx(self) -> None:
        self._set("intx", V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK, count=1)

    def _disable(self) -> None:
        kind = next(k for k, i in KINDS.items() if i == self.index)
        try:
            # DATA_NONE + TRIGGER with count 0 disables the whole index (vfio.h).
            self._set(kind, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
