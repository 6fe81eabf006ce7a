"""The sysfs backend: config space and BARs through ``/sys/bus/pci/devices/ADDR``.

For inspection: no interrupts, no DMA, no IOMMU, works whatever driver the device is bound to.
Files used (Documentation/ABI/testing/sysfs-bus-pci, drivers/pci/pci-sysfs.c):

- ``config``: read/write with pread/pwrite; the kernel does byte/word/dword config accesses
  of exactly the size asked when aligned.
- ``resourceN`` of a memory BAR: mmap. The kernel maps whole pages starting at the page that
  holds the BAR (drivers/pci/mmap.c: ``vm_pgoff += start >> PAGE_SHIFT``), so a BAR smaller
  than a page that does not start on a page boundary sits at ``start % PAGESIZE`` in the
  mapping.
- ``resourceN`` of an I/O BAR: pread/pwrite of 1, 2 or 4 bytes (``pci_resource_io``).

**Read-only unless opened ``writable=True``**: the files are opened ``O_RDONLY`` and the BARs
mapped ``PROT_READ``, so a sysfs-opened device (possibly one the host depends on) cannot be
written by accident. The UIO backend builds on this one, writable.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

from udrv.backends import ConfigRegion, PortRegion
from udrv.core.device import Device, RegionInfo, RegionKind
from udrv.core.region import MmioRegion, Region
from udrv.errors import BackendError, RegionError
from udrv.pci.sysfs import PciDeviceInfo

PAGE_SIZE = mmap.PAGESIZE


def _permission_fix(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "run as root"
    if exc.errno == errno.ENOENT:
        return "the device went away; check the address with `udrv list`"
    return "check `udrv info` for the device"


class SysfsDevice(Device):
    """A device opened through its sysfs files. Created by :func:`udrv.open` (``backend="sysfs"``).

    Args:
        info: the device, from :func:`udrv.pci.sysfs.find`.
        writable: allow writes to config space and BARs (and :meth:`reset`).

    Raises:
        BackendError: ``config`` cannot be opened (permissions; the device is gone).
    """

    backend = "sysfs"

    def __init__(self, info: PciDeviceInfo, *, writable: bool = False) -> None:
        super().__init__(info.address)
        self.info, self.writable = info, writable
        self._fds: list[int] = []
        self._regions: dict[int, Region] = {}
        path = info.path / "config"
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            self._closed = True
            mode = "read-write" if writable else "reading"
            raise BackendError(
                f"cannot open {path} for {mode}; {_permission_fix(exc)}", errno=exc.errno
            ) from None
        self._fds.append(fd)
        size = os.fstat(fd).st_size or info.config_size or 256
        self._config = ConfigRegion(
            fd, name=f"config space of {self.address}", size=size, writable=writable, index=7
        )

    @property
    def config(self) -> Region:
        return self._config

    def region_info(self, index: int) -> RegionInfo:
        if not 0 <= index <= 5:
            raise RegionError(f"{self.address}: BAR index {index} out of range; BARs are 0-5")
        res = self.info.bar(index)
        if res is None or res.size == 0:
            raise RegionError(f"{self.address} does not implement BAR{index}")
        return RegionInfo(
            index=index,
            kind=RegionKind.IO if res.is_io else RegionKind.MEMORY,
            size=res.size,
            readable=True,
            writable=self.writable,
            mappable=not res.is_io,
            is_64bit=res.is_64bit,
            prefetchable=res.prefetchable,
        )

    def bar(self, index: int) -> Region:
        if self._closed:
            raise BackendError(f"{self.address} is closed; open it again with udrv.open()")
        if index in self._regions:
            return self._regions[index]
        ri = self.region_info(index)
        path = self.info.path / f"resource{index}"
        name = f"BAR{index} of {self.address}"
        try:
            fd = os.open(path, (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(
                f"cannot open {path} for {name}; {_permission_fix(exc)}", errno=exc.errno
            ) from None
        region: Region
        try:
            if ri.kind is RegionKind.MEMORY:
                res = self.info.bar(index)
                start = res.start if res is not None else 0
                lead = start % PAGE_SIZE
                length = -(-(lead + ri.size) // PAGE_SIZE) * PAGE_SIZE
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
                try:
                    m = mmap.mmap(fd, length, mmap.MAP_SHARED, prot)
                except OSError as exc:
                    raise RegionError(
                        f"mmap of {path} for {name} failed (the kernel refuses BARs it marks "
                        "exclusive, e.g. with iomem=strict)",
                        errno=exc.errno,
                    ) from None
                region = MmioRegion(
                    m,
                    name=name,
                    size=ri.size,
                    offset=lead,
                    writable=self.writable,
                    index=index,
                    close_buffer=True,
                )
                os.close(fd)  # the mapping stays valid without the fd
            else:
                region = PortRegion(
                    fd, name=name, size=ri.size, writable=self.writable, index=index
                )
                self._fds.append(fd)
        except BaseException:
            if fd not in self._fds:
                os.close(fd)
            raise
        self._regions[index] = region
        return region

    def reset(self) -> None:
        """Reset through sysfs ``reset`` (the kernel picks FLR, PM, bus reset...).

        Raises:
            BackendError: there is no ``reset`` file, the device is open read-only, or the
                kernel's reset failed.
        """
        path = self.info.path / "reset"
        if not path.exists():
            raise BackendError(
                f"{self.address} cannot be reset through the {self.backend} backend: the kernel "
                f"knows no reset method for it ({path} is missing)"
            )
        if not self.writable:
            raise BackendError(
                f"{self.address} is open read-only; open it with writable=True to reset it"
            )
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as exc:
            raise BackendError(
                f"reset of {self.address} through {path} failed", errno=exc.errno
            ) from None

    def _close(self) -> None:
        for region in [*self._regions.values(), self._config]:
            with contextlib.suppress(Exception):
                region.close()
        self._regions.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
