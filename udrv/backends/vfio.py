"""The VFIO backend: an IOMMU-protected device through a container, a group and a device fd.

Layout (Documentation/driver-api/vfio.rst, include/uapi/linux/vfio.h):

1. the *container* ``/dev/vfio/vfio``: API version check, then an IOMMU model (type1v2, else
   type1) once a group is attached; it is the IOMMU context DMA mappings go into;
2. the *group* ``/dev/vfio/N`` (N from the device's ``iommu_group`` link): usable only when
   *viable*, i.e. every device in the group is bound to vfio-pci (or to no driver);
   ``VFIO_GROUP_SET_CONTAINER`` attaches it to the container;
3. the *device fd* from ``VFIO_GROUP_GET_DEVICE_FD``: regions (BARs 0-5, ROM 6, config 7) at
   ``offset`` from ``VFIO_DEVICE_GET_REGION_INFO``, interrupts, reset.

**One container per process.** Every device opened here shares one :class:`Container`, and
the devices of one IOMMU group share one :class:`Group` (the group node can be opened only
once: a second open is EBUSY). Both are reference-counted by the open devices and closed
with the last of them. So all devices of a group (the ports of a dual-port NIC, the
functions of a multi-function card) can be open together, and since every mapping of a
container is visible to every device in it, one IOVA allocator serves them all
(:mod:`udrv.dma.vfio`).

DMA goes through an :class:`~udrv.dma.iommu.IommuContext`; today that is the type1
:class:`Container`. The
newer iommufd path (``/dev/iommu`` + the device's cdev ``/dev/vfio/devices/vfioX``,
``VFIO_DEVICE_BIND_IOMMUFD``, ``IOMMU_IOAS_MAP``) would be a second IommuContext plus a second
way to get the device fd; everything after the device fd (regions, irqs, reset) is shared.
The lab's Debian 6.12 kernel is built without IOMMUFD (no ``/dev/iommu``), so only the
container/group path is implemented and tested.

Regions: a memory BAR with ``VFIO_REGION_INFO_FLAG_MMAP`` is mmapped; when a
``VFIO_REGION_INFO_CAP_SPARSE_MMAP`` capability lists the mmappable areas, only those are
mapped and the rest goes through pread/pwrite (:class:`udrv.backends.SparseRegion`).
Since Linux 4.16 vfio-pci no longer carves the MSI-X table out: it reports
``VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`` instead and the whole BAR is mappable (seen in the lab
on e1000e's BAR3). I/O-port BARs, config space and unmappable BARs use pread/pwrite on the
device fd, one system call per access.

Host tests replace :data:`VFIO_DIR`, :data:`IOMMU_GROUPS` and the module's ``ioctl``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from udrv.backends import ConfigRegion, PortRegion, SparseRegion
from udrv.core.device import Device, RegionInfo, RegionKind
from udrv.core.dma import Dma
from udrv.core.interrupts import Interrupts
from udrv.core.region import FileRegion, MmioRegion, Region
from udrv.dma.iommu import IommuContext, IommuInfo
from udrv.dma.vfio import VfioDma
from udrv.errors import DeviceBusyError, RegionError, VfioError
from udrv.irq.vfio import VfioInterrupts
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import ioctl
from udrv.pci.sysfs import PciDeviceInfo

VFIO_DIR = Path("/dev/vfio")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
#: Drivers a group member may have without making the group unviable (drivers/vfio/group.c
#: accepts pci-stub; bridges are accepted whatever their driver).
_HARMLESS_DRIVERS = (None, "vfio-pci", "pci-stub")


# -- the IOMMU context ---------------------------------------------------------------------


def _ioctl_with_caps(fd: int, request: int, head: ctypes.Structure, what: str) -> bytearray:
    """Issue a VFIO *_INFO ioctl, and again with the size the kernel asked for (``argsz``)
    when it has capabilities to add. Returns the whole reply."""
    ioctl(fd, request, head, what=what, error=VfioError)
    size = ctypes.sizeof(head)
    argsz = int(head.argsz)
    if argsz <= size:
        return bytearray(bytes(head))
    buf = bytearray(argsz)
    buf[:size] = bytes(head)
    ioctl(fd, request, buf, what=what, error=VfioError)
    return buf


class Container(IommuContext):
    """``/dev/vfio/vfio`` with the type1 IOMMU driver (v2 where offered).

    Raises:
        VfioError: vfio is not loaded, speaks another API version, or offers no type1 IOMMU.
    """

    def __init__(self) -> None:
        super().__init__()
        path = VFIO_DIR / "vfio"
        self.path = path
        self.iommu_type = 0
        self.info = IommuInfo(pgsizes=0)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = (
                "run as root"
                if exc.errno in (errno.EACCES, errno.EPERM)
                else "is vfio-pci loaded? (`modprobe vfio-pci`)"
            )
            raise VfioError(
                f"cannot open the VFIO container {path}; {hint}", errno=exc.errno
            ) from None
        try:
            version = ioctl(
                self.fd,
                V.VFIO_GET_API_VERSION,
                what=f"VFIO_GET_API_VERSION on {path}",
                error=VfioError,
            )
            if version != V.VFIO_API_VERSION:
                raise VfioError(
                    f"{path} speaks VFIO API {version}, udrv speaks {V.VFIO_API_VERSION}; "
                    "this kernel's VFIO is not supported"
                )
            for kind in (V.VFIO_TYPE1v2_IOMMU, V.VFIO_TYPE1_IOMMU):
                if ioctl(
                    self.fd,
                    V.VFIO_CHECK_EXTENSION,
                    kind,
                    what=f"VFIO_CHECK_EXTENSION {kind} on {path}",
                    error=VfioError,
                ):
                    self.iommu_type = kind
                    break
            else:
                noiommu = ioctl(
                    self.fd,
                    V.VFIO_CHECK_EXTENSION,
                    V.VFIO_NOIOMMU_IOMMU,
                    what=f"VFIO_CHECK_EXTENSION {V.VFIO_NOIOMMU_IOMMU} on {path}",
                    error=VfioError,
                )
                raise VfioError(_NOIOMMU if noiommu else (
                    f"{path} offers no type1 IOMMU; enable the IOMMU (boot with intel_iommu=on "
                    "or amd_iommu=on) and load vfio_iommu_type1"
                ))  # fmt: skip
        except BaseException:
            self.close()
            raise

    @property
    def iommu_set(self) -> bool:
        return bool(self.info.pgsizes)

    def set_iommu(self) -> None:
        """``VFIO_SET_IOMMU`` (needs a group attached), then read the IOMMU's info."""
        ioctl(
            self.fd,
            V.VFIO_SET_IOMMU,
            self.iommu_type,
            what=f"VFIO_SET_IOMMU type {self.iommu_type}",
            error=VfioError,
        )
        self.refresh_info()

    def refresh_info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` with its IOVA-range and DMA-avail capabilities."""
        head = V.vfio_iommu_type1_info(argsz=ctypes.sizeof(V.vfio_iommu_type1_info))
        buf = _ioctl_with_caps(self.fd, V.VFIO_IOMMU_GET_INFO, head, "VFIO_IOMMU_GET_INFO")
        full = V.vfio_iommu_type1_info.from_buffer_copy(buf)
        info = IommuInfo(pgsizes=int(full.iova_pgsizes))
        if full.flags & V.VFIO_IOMMU_INFO_CAPS and full.cap_offset:
            try:
                for cap in V.capabilities(bytes(buf), full.cap_offset):
                    if cap.id == V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                        info.iova_ranges = V.iova_ranges(bytes(buf), cap)
                    elif cap.id == V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
                        info.dma_avail = V.dma_avail(bytes(buf), cap)
            except ValueError as exc:
                raise VfioError(f"VFIO_IOMMU_GET_INFO on {self.path}: {exc}") from None
        self.info = info
        return info

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

    @property
    def is_open(self) -> bool:
        return getattr(self, "fd", -1) >= 0

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
        self.fd = -1


_NOIOMMU = (
    "VFIO runs in no-IOMMU mode here (vfio.enable_unsafe_noiommu_mode=1, /dev/vfio/noiommu-N): "
    "the device would DMA to physical addresses with no protection, and udrv does not use "
    "that mode. Enable the IOMMU (boot with intel_iommu=on or amd_iommu=on) and turn "
    "no-IOMMU mode off, or use backend='uio' (which is unprotected and says so)"
)


# -- the group -------------------------------------------------------------------------------


def group_members(group: int) -> list[tuple[str, str | None]]:
    """(address, driver) of every device in IOMMU group ``group``, from sysfs."""
    out = []
    devdir = IOMMU_GROUPS / str(group) / "devices"
    for name in sorted(os.listdir(devdir)) if devdir.is_dir() else []:
        drv = devdir / name / "driver"
        out.append((name, os.path.basename(os.readlink(drv)) if drv.is_symlink() else None))
    return out


def _is_bridge(group: int, address: str) -> bool:
    try:
        cls = (IOMMU_GROUPS / str(group) / "devices" / address / "class").read_text()
        return int(cls, 16) >> 16 == 0x06
    except (OSError, ValueError):
        return False


class Group:
    """``/dev/vfio/N``, checked viable and attached to ``container``.

    Raises:
        VfioError: the group node is missing (not bound to vfio-pci), not permitted, busy, or
            the group is not viable (the message names the devices in the way).
    """

    def __init__(self, group: int, address: str, container: Container) -> None:
        self.id, self.address = group, address
        self.path = path = VFIO_DIR / str(group)
        self.attached = False
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise self._open_error(exc) from None
        try:
            status = V.vfio_group_status(argsz=ctypes.sizeof(V.vfio_group_status))
            ioctl(
                self.fd,
                V.VFIO_GROUP_GET_STATUS,
                status,
                what=f"VFIO_GROUP_GET_STATUS on {path}",
                error=VfioError,
            )
            if not status.flags & V.VFIO_GROUP_FLAGS_VIABLE:
                raise self._not_viable()
            ioctl(
                self.fd,
                V.VFIO_GROUP_SET_CONTAINER,
                ctypes.c_int32(container.fd),
                what=f"VFIO_GROUP_SET_CONTAINER on {path}",
                error=VfioError,
            )
            self.attached = True
        except BaseException:
            self.close()
            raise

    def _open_error(self, exc: OSError) -> VfioError:
        path, addr = self.path, self.address
        if exc.errno == errno.ENOENT and (VFIO_DIR / f"noiommu-{self.id}").exists():
            return VfioError(f"{addr}: {_NOIOMMU}")
        if exc.errno == errno.ENOENT:
            return VfioError(
                f"{addr} is not bound to vfio-pci ({path} does not exist); run `udrv bind {addr}`"
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return VfioError(
                f"no permission on {path} (IOMMU group of {addr}); run "
                f"`udrv bind {addr} --user $USER` or run as root",
                errno=exc.errno,
            )
        if exc.errno == errno.EBUSY:
            return VfioError(
                f"{path} (IOMMU group of {addr}) is already opened by another process; "
                "stop it first",
                errno=exc.errno,
            )
        return VfioError(f"cannot open {path} for {addr}", errno=exc.errno)

    def _not_viable(self) -> VfioError:
        blockers = [
            f"{a} (bound to {d})"
            for a, d in group_members(self.id)
            if d not in _HARMLESS_DRIVERS and not _is_bridge(self.id, a)
        ]
        who = ", ".join(blockers) if blockers else "another device in it"
        return VfioError(
            f"IOMMU group {self.id} of {self.address} is not viable: {who} is still bound to a "
            "kernel driver, and VFIO needs every device of a group bound to vfio-pci or to none; "
            f"run `udrv bind {self.address}` (it binds the whole group)"
        )

    def get_device_fd(self, address: str) -> int:
        """``VFIO_GROUP_GET_DEVICE_FD`` for ``address``, a device of this group.

        Raises:
            VfioError: EBUSY when the device is already open.
        """
        name = ctypes.create_string_buffer(address.encode())
        try:
            return ioctl(
                self.fd,
                V.VFIO_GROUP_GET_DEVICE_FD,
                name,
                what=f"VFIO_GROUP_GET_DEVICE_FD {address}",
                error=VfioError,
            )
        except VfioError as exc:
            if exc.errno == errno.EBUSY:
                raise VfioError(
                    f"{address} is already opened (by another process, or by this one: "
                    "close that device first)",
                    errno=exc.errno,
                ) from None
            raise

    def close(self) -> None:
        """Detach from the container and close (the kernel would also detach on close)."""
        if getattr(self, "fd", -1) < 0:
            return
        if self.attached:
            with contextlib.suppress(VfioError):
                ioctl(
                    self.fd,
                    V.VFIO_GROUP_UNSET_CONTAINER,
                    0,
                    what=f"VFIO_GROUP_UNSET_CONTAINER on {self.path}",
                    error=VfioError,
                )
            self.attached = False
        os.close(self.fd)
        self.fd = -1


# -- the process's container and groups ----------------------------------------------------


class _Shared:
    """The process's one :class:`Container` and the :class:`Group` objects attached to it,
    counted by the devices that use them; the last device of a group closes the group, the
    last group the container."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.container: Container | None = None
        self.groups: dict[int, Group] = {}
        self.users: dict[int, int] = {}

    def acquire(self, group_id: int, address: str) -> tuple[Container, Group]:
        """The container and the group ``group_id`` (opened, attached), counted once more."""
        with self.lock:
            container = self.container or Container()
            group = self.groups.get(group_id)
            if group is None:
                try:
                    group = Group(group_id, address, container)
                    try:
                        if not container.iommu_set:
                            container.set_iommu()
                    except BaseException:
                        group.close()
                        raise
                except BaseException:
                    if container is not self.container:
                        container.close()
                    raise
            self.container = container
            self.groups[group_id] = group
            self.users[group_id] = self.users.get(group_id, 0) + 1
            return container, group

    def release(self, group_id: int) -> None:
        """One device of ``group_id`` closed."""
        with self.lock:
            self.users[group_id] -= 1
            if self.users[group_id]:
                return
            del self.users[group_id]
            self.groups.pop(group_id).close()
            if not self.groups and self.container is not None:
                self.container.close()
                self.container = None


_shared = _Shared()


# -- the device ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VfioRegionInfo:
    """``struct vfio_region_info`` with its capabilities decoded."""

    index: int
    flags: int
    size: int
    offset: int  # of the region in the device fd
    #: VFIO_REGION_INFO_CAP_SPARSE_MMAP's (offset, size) areas, or None without that cap
    sparse_areas: tuple[tuple[int, int], ...] | None = None
    msix_mappable: bool = False  # VFIO_REGION_INFO_CAP_MSIX_MAPPABLE
    cap_ids: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmap(self) -> bool:
        return bool(self.flags & V.VFIO_REGION_INFO_FLAG_MMAP)

    def mmap_areas(self) -> list[tuple[int, int]]:
        """The (offset, size) areas that may be mmapped (nothing without FLAG_MMAP)."""
        if not self.mmap:
            return []
        if self.sparse_areas is None:
            return [(0, self.size)]
        return [(o, s) for o, s in self.sparse_areas if s > 0]


class VfioDevice(Device):
    """A device opened through VFIO. Created by :func:`udrv.open`.

    Attributes:
        container: the process's :class:`Container` (shared with every VFIO device open here).
        group: the :class:`Group` (shared with the other open devices of the IOMMU group).
        device_fd: the VFIO device fd (regions, interrupts).
        flags, num_regions, num_irqs: from ``VFIO_DEVICE_GET_INFO``.

    Raises:
        DeviceBusyError: the device is bound to another kernel driver.
        VfioError: no IOMMU group, not bound to vfio-pci, no permission, busy, group not
            viable, or a VFIO ioctl failed; the message names the fix.
    """

    backend = "vfio"

    def __init__(self, info: PciDeviceInfo) -> None:
        super().__init__(info.address)
        self._closed = True  # until fully opened (__del__ and close() look at it)
        self.info = info
        self._regions: dict[int, Region] = {}
        self._region_info: dict[int, VfioRegionInfo] = {}
        self.device_fd = -1
        addr = info.address
        if info.driver not in (None, "vfio-pci"):
            raise DeviceBusyError(
                f"{addr} is bound to {info.driver}, not vfio-pci; run `udrv bind {addr}`"
            )
        if info.iommu_group is None:
            raise VfioError(
                f"{addr} has no IOMMU group: the IOMMU is off (boot with intel_iommu=on or "
                "amd_iommu=on), or use backend='uio'"
            )
        if info.driver is None:
            raise VfioError(f"{addr} is not bound to vfio-pci (no driver); run `udrv bind {addr}`")
        self.container, self.group = _shared.acquire(info.iommu_group, addr)
        try:
            self.device_fd = self.group.get_device_fd(addr)
            self._read_device_info()
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _read_device_info(self) -> None:
        info = V.vfio_device_info(argsz=ctypes.sizeof(V.vfio_device_info))
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_GET_INFO,
            info,
            what=f"VFIO_DEVICE_GET_INFO {self.address}",
            error=VfioError,
        )
        self.flags, self.num_regions, self.num_irqs = (
            int(info.flags),
            int(info.num_regions),
            int(info.num_irqs),
        )
        if not self.flags & V.VFIO_DEVICE_FLAGS_PCI:
            raise VfioError(f"{self.address}: VFIO does not present it as a PCI device")
        cfg = self.vfio_region_info(V.VfioPciRegion.CONFIG)
        self._config = ConfigRegion(
            self.device_fd,
            name=f"config space of {self.address}",
            size=cfg.size,
            base_offset=cfg.offset,
            readable=cfg.readable,
            writable=cfg.writable,
            index=int(V.VfioPciRegion.CONFIG),
        )

    # -- IOMMU -------------------------------------------------------------------------------

    @property
    def iommu(self) -> IommuContext:
        """Where this device's DMA mappings go."""
        return self.container

    @property
    def iommu_info(self) -> IommuInfo:
        """Page sizes, valid IOVA ranges and the mapping budget, as of the last refresh."""
        return self.container.info

    @property
    def group_fd(self) -> int:
        return self.group.fd

    def _open_interrupts(self) -> Interrupts:
        return VfioInterrupts(self, self.device_fd)

    def _open_dma(self) -> Dma:
        return VfioDma(self, self.container)

    # -- regions -----------------------------------------------------------------------------

    def vfio_region_info(self, index: int) -> VfioRegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO`` for region ``index`` (cached: it never changes).

        Raises:
            VfioError: the ioctl failed (e.g. EINVAL for an index the device lacks).
        """
        if index in self._region_info:
            return self._region_info[index]
        what = f"VFIO_DEVICE_GET_REGION_INFO {index} of {self.address}"
        head = V.vfio_region_info(argsz=ctypes.sizeof(V.vfio_region_info), index=index)
        buf = _ioctl_with_caps(self.device_fd, V.VFIO_DEVICE_GET_REGION_INFO, head, what)
        full = V.vfio_region_info.from_buffer_copy(buf)
        sparse: tuple[tuple[int, int], ...] | None = None
        msix_mappable = False
        ids: list[int] = []
        if full.flags & V.VFIO_REGION_INFO_FLAG_CAPS and full.cap_offset:
            try:
                for cap in V.capabilities(bytes(buf), full.cap_offset):
                    ids.append(cap.id)
                    if cap.id == V.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                        sparse = tuple(V.sparse_mmap_areas(bytes(buf), cap))
                    elif cap.id == V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                        msix_mappable = True
            except (ValueError, IndexError) as exc:
                raise VfioError(f"{what}: {exc}") from None
        result = VfioRegionInfo(
            index=index,
            flags=int(full.flags),
            size=int(full.size),
            offset=int(full.offset),
            sparse_areas=sparse,
            msix_mappable=msix_mappable,
            cap_ids=tuple(ids),
        )
        self._region_info[index] = result
        return result

    @property
    def config(self) -> Region:
        return self._config

    def _check_open(self) -> None:
        if self._closed:
            raise VfioError(f"{self.address} is closed; open it again with udrv.open()")

    def region_info(self, index: int) -> RegionInfo:
        self._check_open()
        if not 0 <= index <= 5:
            raise RegionError(f"{self.address}: BAR index {index} out of range; BARs are 0-5")
        vri = self.vfio_region_info(index)
        if vri.size == 0:
            raise RegionError(f"{self.address} does not implement BAR{index}")
        # vfio-pci virtualizes the BAR registers but keeps their low flag bits (PCI 3.0 6.2.5.1).
        bar = self._config.read32(0x10 + 4 * index)
        is_io = bool(bar & 1)
        return RegionInfo(
            index=index,
            kind=RegionKind.IO if is_io else RegionKind.MEMORY,
            size=vri.size,
            readable=vri.readable,
            writable=vri.writable,
            mappable=vri.mmap and not is_io,
            is_64bit=not is_io and (bar >> 1) & 3 == 2,
            prefetchable=not is_io and bool(bar & 8),
            mmap_areas=vri.sparse_areas or (),
        )

    def _map(self, vri: VfioRegionInfo, start: int, size: int, name: str) -> MmioRegion:
        prot = (mmap.PROT_READ if vri.readable else 0) | (mmap.PROT_WRITE if vri.writable else 0)
        try:
            m = mmap.mmap(self.device_fd, size, mmap.MAP_SHARED, prot, offset=vri.offset + start)
        except OSError as exc:
            raise RegionError(
                f"mmap of {name} at {start:#x} (+{size:#x}) failed", errno=exc.errno
            ) from None
        return MmioRegion(
            m,
            name=name,
            size=size,
            readable=vri.readable,
            writable=vri.writable,
            index=vri.index,
            close_buffer=True,
        )

    def _file_region(self, vri: VfioRegionInfo, name: str, size: int) -> FileRegion:
        """A memory BAR (or the part of one) that cannot be mmapped: pread/pwrite."""
        return FileRegion(
            self.device_fd,
            name=name,
            size=size,
            base_offset=vri.offset,
            readable=vri.readable,
            writable=vri.writable,
            index=vri.index,
        )

    def bar(self, index: int) -> Region:
        self._check_open()
        if index in self._regions:
            return self._regions[index]
        ri = self.region_info(index)
        vri = self.vfio_region_info(index)
        name = f"BAR{index} of {self.address}"
        region: Region
        if ri.kind is RegionKind.IO:
            region = PortRegion(
                self.device_fd,
                name=name,
                size=ri.size,
                base_offset=vri.offset,
                readable=vri.readable,
                writable=vri.writable,
                index=index,
            )
        else:
            areas = vri.mmap_areas()
            if areas == [(0, ri.size)]:
                region = self._map(vri, 0, ri.size, name)
            elif areas:
                mapped: list[tuple[int, MmioRegion]] = []
                try:
                    for start, size in areas:
                        mapped.append((start, self._map(vri, start, size, f"{name} [{start:#x}]")))
                    region = SparseRegion(
                        name,
                        ri.size,
                        areas=mapped,
                        fallback=self._file_region(vri, name, ri.size),
                        index=index,
                        readable=vri.readable,
                        writable=vri.writable,
                    )
                except BaseException:
                    for _, r in mapped:
                        r.close()
                    raise
            else:
                region = self._file_region(vri, name, ri.size)
        self._regions[index] = region
        return region

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (FLR, PM or bus reset, whatever the kernel found).

        Raises:
            VfioError: the device offers no reset (no ``VFIO_DEVICE_FLAGS_RESET``: edu has
                neither FLR nor PM), or the reset failed.
        """
        self._check_open()
        if not self.flags & V.VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(
                f"{self.address} cannot be reset through VFIO: it has no function-level, PM "
                "or bus reset the kernel can use (VFIO_DEVICE_FLAGS_RESET is clear)"
            )
        ioctl(
            self.device_fd,
            V.VFIO_DEVICE_RESET,
            0,
            what=f"VFIO_DEVICE_RESET {self.address}",
            error=VfioError,
        )

    # -- teardown: mappings, then the device fd, then the group, then the container --------

    def _release(self) -> None:
        for region in [*self._regions.values(), getattr(self, "_config", None)]:
            if region is not None:
                with contextlib.suppress(Exception):
                    region.close()
        self._regions.clear()
        if self.device_fd >= 0:
            os.close(self.device_fd)
            self.device_fd = -1
        if getattr(self, "group", None) is not None:
            _shared.release(self.group.id)
            del self.group

    def _close(self) -> None:
        self._release()
