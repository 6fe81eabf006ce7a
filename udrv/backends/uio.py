"""The UIO backend (``uio_pci_generic``): sysfs config and BARs plus ``/dev/uioN``.

No IOMMU: DMA needs physical addresses (hugepages, see udrv.dma). Interrupts: INTx only;
``read(/dev/uioN)`` returns a 4-byte event count. uio_pci_generic has no irqcontrol, so a
driver re-enables the interrupt by clearing the Interrupt Disable bit in the PCI command
register (the kernel set it when the interrupt fired).
"""

from __future__ import annotations

import os

from udrv.backends.sysfs import SysfsDevice
from udrv.errors import UioError
from udrv.pci.sysfs import PciDeviceInfo


class UioDevice(SysfsDevice):
    backend = "uio"

    def __init__(self, info: PciDeviceInfo) -> None:
        if info.driver != "uio_pci_generic":
            raise UioError(
                f"{info.address} is bound to {info.driver or 'no driver'}, not "
                f"uio_pci_generic; run `udrv bind {info.address} --driver uio_pci_generic`"
            )
        uio_dir = info.path / "uio"
        names = sorted(os.listdir(uio_dir)) if uio_dir.is_dir() else []
        if not names:
            raise UioError(f"{info.address} is bound to uio_pci_generic but has no {uio_dir}/uioN")
        super().__init__(info, writable=True)
        self.uio_name = names[0]
        path = f"/dev/{self.uio_name}"
        try:
            self.uio_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise UioError(
                f"cannot open {path} for {info.address}; run as root", errno=exc.errno
            ) from None
        self._fds.append(self.uio_fd)
