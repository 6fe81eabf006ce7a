"""The VFIO backend: an IOMMU-protected device through a container, a group and a device fd.

Layout (Documentation/driver-api/vfio.rst): the *container* (``/dev/vfio/vfio``) holds an
IOMMU context (type1); a *group* (``/dev/vfio/N``, N from the device's ``iommu_group`` link)
is attached to it once every device in the group is bound to vfio-pci or to no driver
(viable); the *device fd* comes from the group and offers regions, IRQs and reset.

DMA mapping goes through an :class:`IommuContext`. Today that is the container (type1);
the newer iommufd path (``/dev/iommu`` + ``/dev/vfio/devices/vfioX`` cdevs) would be a second
implementation beside it. The lab's 6.12 Debian kernel is built without IOMMUFD, so only the
container path is implemented and tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from udrv.core.device import Device, RegionInfo, RegionKind
from udrv.core.region import FileRegion, MmioRegion, Region
from udrv.errors import RegionError, VfioError
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import ioctl
from udrv.pci.sysfs import PciDeviceInfo

VFIO_DIR = Path("/dev/vfio")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")


@dataclass
class IommuInfo:
    """What the IOMMU allows: page sizes, valid IOVA ranges (inclusive), mapping budget."""

    pgsizes: int
    iova_ranges: list[tuple[int, int]] = field(default_factory=list)
    dma_avail: int | None = None


class IommuContext:
    """Where DMA mappings are made. The VFIO type1 container implements it."""

    info: IommuInfo

    def map_dma(self, vaddr: int, iova: int, size: int, *, readable: bool, writable: bool) -> None:
        raise NotImplementedError

    def unmap_dma(self, iova: int, size: int) -> None:
        raise NotImplementedError


class Container(IommuContext):
    """``/dev/vfio/vfio`` with the type1 IOMMU driver (v2 where offered)."""

    def __init__(self) -> None:
        path = VFIO_DIR / "vfio"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VfioError(
                f"cannot open {path}; is vfio loaded (`modprobe vfio-pci`)?", errno=exc.errno
            ) from None
        try:
            version = ioctl(
                self.fd, V.VFIO_GET_API_VERSION, what="VFIO_GET_API_VERSION", error=VfioError
            )
            if version != V.VFIO_API_VERSION:
                raise VfioError(
                    f"{path} speaks VFIO API {version}, udrv speaks {V.VFIO_API_VERSION}"
                )
            for kind in (V.VFIO_TYPE1v2_IOMMU, V.VFIO_TYPE1_IOMMU):
                if ioctl(
                    self.fd,
                    V.VFIO_CHECK_EXTENSION,
                    kind,
                    what="VFIO_CHECK_EXTENSION",
                    error=VfioError,
                ):
                    self.iommu_type = kind
                    break
            else:
                raise VfioError(
                    f"{path} offers no type1 IOMMU; is the IOMMU enabled (intel_iommu=on)?"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.info = IommuInfo(pgsizes=0)

    def set_iommu(self) -> None:
        ioctl(self.fd, V.VFIO_SET_IOMMU, self.iommu_type, what="VFIO_SET_IOMMU", error=VfioError)
        self.info = self._get_info()

    def _get_info(self) -> IommuInfo:
        info = V.vfio_iommu_type1_info(argsz=ctypes.sizeof(V.vfio_iommu_type1_info))
        ioctl(self.fd, V.VFIO_IOMMU_GET_INFO, info, what="VFIO_IOMMU_GET_INFO", error=VfioError)
        result = IommuInfo(pgsizes=int(info.iova_pgsizes))
        if info.flags & V.VFIO_IOMMU_INFO_CAPS and info.argsz > ctypes.sizeof(info):
            buf = bytearray(info.argsz)
            buf[:4] = info.argsz.to_bytes(4, "little")
            ioctl(self.fd, V.VFIO_IOMMU_GET_INFO, buf, what="VFIO_IOMMU_GET_INFO", error=VfioError)
            full = V.vfio_iommu_type1_info.from_buffer_copy(buf)
            for cap in V.capabilities(bytes(buf), full.cap_offset):
                if cap.id == V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                    result.iova_ranges = V.iova_ranges(bytes(buf), cap)
                elif cap.id == V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                    result.dma_avail = V.dma_avail(bytes(buf), cap)
        return result

    def refresh_info(self) -> IommuInfo:
        self.info = self._get_info()
        return self.info

    def map_dma(
        self, vaddr: int, iova: int, size: int, *, readable: bool = True, writable: bool = True
    ) -> None:
        flags = (V.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (
            V.VFIO_DMA_MAP_FLAG_WRITE if writable else 0
        )
        arg = V.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        ioctl(
            self.fd,
            V.VFIO_IOMMU_MAP_DMA,
            arg,
            what=f"VFIO_IOMMU_MAP_DMA iova={iova:#x} size={size:#x}",
            error=VfioError,
        )

    def unmap_dma(self, iova: int, size: int) -> None:
        arg = V.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(V.vfio_iommu_type1_dma_unmap), iova=iova, size=size
        )
        ioctl(
            self.fd,
            V.VFIO_IOMMU_UNMAP_DMA,
            arg,
            what=f"VFIO_IOMMU_UNMAP_DMA iova={iova:#x} size={size:#x}",
            error=VfioError,
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def group_members(group: int) -> list[tuple[str, str | None]]:
    """(address, driver) of every device in IOMMU group ``group``."""
    out = []
    devdir = IOMMU_GROUPS / str(group) / "devices"
    for name in sorted(os.listdir(devdir)) if devdir.exists() else []:
        drv = devdir / name / "driver"
        out.append((name, os.path.basename(os.readlink(drv)) if drv.exists() else None))
    return out


class VfioDevice(Device):
    """A device opened through VFIO. Created by :func:`udrv.open`."""

    backend = "vfio"

    def __init__(self, info: PciDeviceInfo) -> None:
        super().__init__(info.address)
        self.info = info
        self._closed = True  # until fully opened
        if info.iommu_group is None:
            raise VfioError(
                f"{info.address} has no IOMMU group: the IOMMU is off (boot with "
                "intel_iommu=on / amd_iommu=on) — or use backend='uio'"
            )
        self.group_id = info.iommu_group
        self.container = Container()
        self.group_fd = self.device_fd = -1
        self._regions: dict[int, Region] = {}
        self._maps: list[mmap.mmap] = []
        try:
            self._open_group()
            self._open_device()
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _open_group(self) -> None:
        path = VFIO_DIR / str(self.group_id)
        try:
            self.group_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise VfioError(
                    f"{self.address} is not bound to vfio-pci ({path} is missing); "
                    f"run `udrv bind {self.address}`"
                ) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise VfioError(
                    f"no permission to open {path} for {self.address}; run as root or "
                    f"`udrv bind {self.address} --user $USER`",
                    errno=exc.errno,
                ) from None
            if exc.errno == errno.EBUSY:
                raise VfioError(
                    f"{path} ({self.address}) is already open in another process", errno=exc.errno
                ) from None
            raise VfioError(f"cannot open {path} for {self.address}", errno=exc.errno) from None
        status = V.vfio_group_status(argsz=ctypes.sizeof(V.vfio_group_status))
        ioctl(
            self.group_fd,
            V.VFIO_GROUP_GET_STATUS,
            status,
            what=f"VFIO_GROUP_GET_STATUS on {path}",
            error=VfioError,
        )
        if not status.flags & V.VFIO_GROUP_FLAGS_VIABLE:
            others = [
                f"{a} ({d or 'no driver'})"
                for a, d in group_members(self.group_id)
                if d not in (None, "vfio-pci")
            ]
            raise VfioError(
                f"IOMMU group {self.group_id} of {self.address} is not viable: "
                f"{', '.join(others) or 'a member'} is bound to another driver; "
                f"run `udrv bind {self.address}` to bind the whole group"
            )
        arg = ctypes.c_int32(self.container.fd)
        ioctl(
            self.group_fd,
            V.VFIO_GROUP_SET_CONTAINER,
            arg,
            what=f"VFIO_GROUP_SET_CONTAINER on {path}",
            error=VfioError,
        )
        self.container.set_iommu()

    def _open_device(self) -> None:
        name = ctypes.create_string_buffer(self.address.encode())
        try:
            self.device_fd = ioctl(
                self.group_fd,
                V.VFIO_GROUP_GET_DEVICE_FD,
                name,
                what=f"VFIO_GROUP_GET_DEVICE_FD {self.address}",
                error=VfioError,
            )
        except VfioError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(
                    f"{self.address} is already open (by this or another process); close it first",
                    errno=exc.errno,
                ) from None
            raise
        info = V.vfio_device_info(argsz=ctypes.sizeof(V.vfio_device_info))
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_GET_INFO,
            info,
            what="VFIO_DEVICE_GET_INFO",
            error=VfioError,
        )
        self.flags, self.num_regions, self.num_irqs = (
            int(info.flags),
            int(info.num_regions),
            int(info.num_irqs),
        )
        cfg = self._raw_region_info(V.VfioPciRegion.CONFIG)[0]
        self._config = FileRegion(
            self.device_fd,
            name=f"config space of {self.address}",
            size=int(cfg.size),
            base_offset=int(cfg.offset),
        )

    # -- regions -----------------------------------------------------------------------------

    def _raw_region_info(self, index: int) -> tuple[V.vfio_region_info, list[tuple[int, int]]]:
        info = V.vfio_region_info(argsz=ctypes.sizeof(V.vfio_region_info), index=index)
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_GET_REGION_INFO,
            info,
            what=f"VFIO_DEVICE_GET_REGION_INFO {index} of {self.address}",
            error=VfioError,
        )
        areas: list[tuple[int, int]] = []
        if info.flags & V.VFIO_REGION_INFO_FLAG_CAPS and info.argsz > ctypes.sizeof(info):
            buf = bytearray(info.argsz)
            buf[:12] = bytes(V.vfio_region_info(argsz=info.argsz, index=index))[:12]
            ioctl(
                self.device_fd,
                V.VFIO_DEVICE_GET_REGION_INFO,
                buf,
                what=f"VFIO_DEVICE_GET_REGION_INFO {index} of {self.address}",
                error=VfioError,
            )
            info = V.vfio_region_info.from_buffer_copy(buf)
            for cap in V.capabilities(bytes(buf), info.cap_offset):
                if cap.id == V.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    areas = V.sparse_mmap_areas(bytes(buf), cap)
        return info, areas

    @property
    def config(self) -> Region:
        return self._config

    def region_info(self, index: int) -> RegionInfo:
        if not 0 <= index <= 5:
            raise RegionError(f"{self.address}: BAR index {index} out of range; BARs are 0-5")
        info, areas = self._raw_region_info(index)
        if info.size == 0:
            raise RegionError(f"{self.address} does not implement BAR{index}")
        bar = self._config.read32(0x10 + 4 * index)
        is_io = bool(bar & 1)
        return RegionInfo(
            index=index,
            kind=RegionKind.IO if is_io else RegionKind.MEMORY,
            size=int(info.size),
            readable=bool(info.flags & V.VFIO_REGION_INFO_FLAG_READ),
            writable=bool(info.flags & V.VFIO_REGION_INFO_FLAG_WRITE),
            mappable=bool(info.flags & V.VFIO_REGION_INFO_FLAG_MMAP),
            is_64bit=not is_io and (bar >> 1) & 3 == 2,
            prefetchable=not is_io and bool(bar & 8),
            mmap_areas=tuple(areas),
        )

    def bar(self, index: int) -> Region:
        if self._closed:
            raise VfioError(f"{self.address} is closed")
        if index in self._regions:
            return self._regions[index]
        ri = self.region_info(index)
        info, areas = self._raw_region_info(index)
        name = f"BAR{index} of {self.address}"
        region: Region
        whole_mappable = ri.mappable and (not areas or areas == [(0, ri.size)])
        if whole_mappable:
            prot = (mmap.PROT_READ if ri.readable else 0) | (mmap.PROT_WRITE if ri.writable else 0)
            try:
                m = mmap.mmap(
                    self.device_fd, ri.size, mmap.MAP_SHARED, prot, offset=int(info.offset)
                )
            except OSError as exc:
                raise RegionError(f"mmap of {name} failed", errno=exc.errno) from None
            self._maps.append(m)
            region = MmioRegion(
                m, name=name, size=ri.size, readable=ri.readable, writable=ri.writable
            )
        else:
            # I/O-port BARs, and BARs with holes (the MSI-X table): pread/pwrite through VFIO.
            # TODO(perf): map the sparse areas and dispatch per offset.
            region = FileRegion(
                self.device_fd,
                name=name,
                size=ri.size,
                base_offset=int(info.offset),
                readable=ri.readable,
                writable=ri.writable,
            )
        self._regions[index] = region
        return region

    def reset(self) -> None:
        if not self.flags & V.VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(
                f"{self.address} offers no reset through VFIO (no FLR, PM or bus reset)"
            )
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_RESET,
            0,
            what=f"VFIO_DEVICE_RESET {self.address}",
            error=VfioError,
        )

    # -- teardown --------------------------------------------------------------------------

    def _release(self) -> None:
        for r in self._regions.values():
            with contextlib.suppress(Exception):
                r.close()
        self._regions.clear()
        for m in self._maps:
            with contextlib.suppress(Exception):
                m.close()
        self._maps.clear()
        if self.device_fd >= 0:
            os.close(self.device_fd)
            self.device_fd = -1
        if self.group_fd >= 0:
            with contextlib.suppress(VfioError):
                ioctl(
                    self.group_fd,
                    V.VFIO_GROUP_UNSET_CONTAINER,
                    0,
                    what="VFIO_GROUP_UNSET_CONTAINER",
                    error=VfioError,
                )
            os.close(self.group_fd)
            self.group_fd = -1
        self.container.close()

    def _close(self) -> None:
        self._release()
