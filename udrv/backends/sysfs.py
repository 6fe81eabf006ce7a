"""The sysfs backend: config space and BARs through ``/sys/bus/pci/devices/ADDR``.

For inspection: no interrupts, no DMA, no IOMMU. Memory BARs are mmapped from ``resourceN``;
I/O-port BARs are read and written with pread/pwrite on ``resourceN`` (the kernel allows that
for I/O resources only). Writes are refused unless the device is opened ``writable=True``.
The UIO backend builds on this one.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from udrv.core.device import Device, RegionInfo, RegionKind
from udrv.core.region import FileRegion, MmioRegion, Region
from udrv.errors import BackendError, RegionError
from udrv.pci.sysfs import PciDeviceInfo


class SysfsDevice(Device):
    backend = "sysfs"

    def __init__(self, info: PciDeviceInfo, *, writable: bool = False) -> None:
        super().__init__(info.address)
        self.info, self.writable = info, writable
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._regions: dict[int, Region] = {}
        path = info.path / "config"
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            fix = "run as root" if exc.errno in (1, 13) else "check the address with `udrv list`"
            raise BackendError(f"cannot open {path}; {fix}", errno=exc.errno) from None
        self._fds.append(fd)
        size = os.fstat(fd).st_size
        self._config = FileRegion(
            fd, name=f"config space of {self.address}", size=size, writable=writable
        )

    @property
    def config(self) -> Region:
        return self._config

    def region_info(self, index: int) -> RegionInfo:
        if not 0 <= index <= 5:
            raise RegionError(f"{self.address}: BAR index {index} out of range; BARs are 0-5")
        res = next((b for b in self.info.bars if b.index == index), None)
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
        if index in self._regions:
            return self._regions[index]
        ri = self.region_info(index)
        path = self.info.path / f"resource{index}"
        name = f"BAR{index} of {self.address}"
        try:
            fd = os.open(path, (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(
                f"cannot open {path} for {name}; run as root", errno=exc.errno
            ) from None
        self._fds.append(fd)
        region: Region
        if ri.kind is RegionKind.MEMORY:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            try:
                m = mmap.mmap(fd, ri.size, mmap.MAP_SHARED, prot)
            except OSError as exc:
                raise RegionError(f"mmap of {path} failed", errno=exc.errno) from None
            self._maps.append(m)
            region = MmioRegion(m, name=name, size=ri.size, writable=self.writable)
        else:
            region = FileRegion(fd, name=name, size=ri.size, writable=self.writable)
        self._regions[index] = region
        return region

    def reset(self) -> None:
        path = self.info.path / "reset"
        if not path.exists():
            raise BackendError(f"{self.address} has no reset method in sysfs ({path} is missing)")
        if not self.writable:
            raise BackendError(f"{self.address} is open read-only; open it writable to reset it")
        try:
            path.write_text("1")
        except OSError as exc:
            raise BackendError(
                f"reset of {self.address} through {path} failed", errno=exc.errno
            ) from None

    def _close(self) -> None:
        for r in self._regions.values():
            with contextlib.suppress(Exception):
                r.close()
        for m in self._maps:
            with contextlib.suppress(Exception):
                m.close()
        for fd in self._fds:
            os.close(fd)
        self._regions.clear()
        self._maps.clear()
        self._fds.clear()
