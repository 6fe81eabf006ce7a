"""The UIO backend (``uio_pci_generic``): sysfs config and BARs plus ``/dev/uioN``.

uio_pci_generic (drivers/uio/uio_pci_generic.c) offers no memory maps of its own: the BARs
are reached through sysfs ``resourceN`` exactly as in the sysfs backend (opened writable:
binding a device to uio_pci_generic is how a user hands it to user space). ``/dev/uioN`` is
opened and kept for interrupts (``dev.irq``, :mod:`udrv.irq.uio`): INTx only, ``read()`` returns a 4-byte
event count, and since uio_pci_generic has no irqcontrol a driver re-enables the interrupt by
clearing Interrupt Disable in the command register (the kernel set it when the line fired).

No IOMMU: DMA needs physical addresses (``dev.dma``: hugepages, see :mod:`udrv.dma.hugepage`),
and is refused when an IOMMU translates the device's addresses. Reset only where the kernel
offers sysfs ``reset``.

Opening a device frees the DMA buffers a driver that died left behind (they are kept past
its death so that the device, which may still be writing into them, cannot corrupt memory
the kernel has reused): Bus Master Enable is cleared and the device reset where the kernel
can, then the buffers go (:meth:`udrv.dma.hugepage.DmaFiles.reclaim_dead`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from udrv.backends.sysfs import SysfsDevice
from udrv.core.dma import Dma
from udrv.core.interrupts import Interrupts
from udrv.dma.hugepage import DmaFiles, HugepageDma
from udrv.errors import BackendError, DeviceBusyError, DmaError, UioError
from udrv.irq.uio import UioInterrupts
from udrv.pci.sysfs import PciDeviceInfo

DEV = Path("/dev")

log = logging.getLogger(__name__)


def uio_name(info: PciDeviceInfo) -> str:
    """The ``uioN`` node of a device bound to uio_pci_generic (``ADDR/uio/uioN`` in sysfs).

    Raises:
        UioError: the device has no uio node.
    """
    uio_dir = info.path / "uio"
    names = sorted(os.listdir(uio_dir)) if uio_dir.is_dir() else []
    if not names:
        raise UioError(
            f"{info.address} has no UIO node ({uio_dir} is empty or missing); "
            f"run `udrv bind {info.address} --driver uio_pci_generic`"
        )
    return names[0]


class UioDevice(SysfsDevice):
    """A device bound to uio_pci_generic. Created by :func:`udrv.open`.

    Attributes:
        uio_name: ``uioN``.
        uio_fd: the open ``/dev/uioN`` (interrupt events).

    Raises:
        DeviceBusyError: bound to another kernel driver.
        UioError: not bound at all, no uio node, or ``/dev/uioN`` cannot be opened.
    """

    backend = "uio"

    def __init__(self, info: PciDeviceInfo) -> None:
        self._closed = True  # until fully opened (__del__ and close() look at it)
        fix = f"run `udrv bind {info.address} --driver uio_pci_generic`"
        if info.driver is None:
            raise UioError(f"{info.address} is not bound to uio_pci_generic (no driver); {fix}")
        if info.driver != "uio_pci_generic":
            raise DeviceBusyError(
                f"{info.address} is bound to {info.driver}, not uio_pci_generic; {fix}"
            )
        name = uio_name(info)
        super().__init__(info, writable=True)
        self.uio_name = name
        path = DEV / name
        try:
            self.uio_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            hint = "run as root" if exc.errno in (errno.EACCES, errno.EPERM) else fix
            raise UioError(
                f"cannot open {path} for {info.address}; {hint}", errno=exc.errno
            ) from None
        self._fds.append(self.uio_fd)
        try:
            DmaFiles.reclaim_dead(self.address, self._quiesce)
        except DmaError as exc:  # no lock without root: dev.dma will say so if it is used
            log.debug("%s: leftover DMA buffers not checked: %s", self.address, exc)
        except BaseException:
            self.close()
            raise

    def _quiesce(self) -> None:
        """Stop a device a dead driver left running: no more DMA (Bus Master Enable off;
        PCI 3.0 §6.2.2), then a reset where the kernel has a method, so that RX rings and
        the like are off too before the next driver enables bus mastering again."""
        self.set_bus_master(False)
        with contextlib.suppress(BackendError):
            self.reset()

    def _open_interrupts(self) -> Interrupts:
        return UioInterrupts(self, self.uio_fd, self.uio_name)

    def _open_dma(self) -> Dma:
        return HugepageDma(self, self.info.iommu_group)
