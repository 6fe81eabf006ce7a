"""The VFIO uapi, from /usr/include/linux/vfio.h (structures, flags and ioctl numbers).

All VFIO ioctls are ``_IO(VFIO_TYPE, VFIO_BASE + n)``: the argument size is carried in each
structure's ``argsz`` field, not in the number.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Iterator
from dataclasses import dataclass

from udrv.kernel.ioctl import _IO

VFIO_API_VERSION = 0  # vfio.h
VFIO_TYPE1_IOMMU = 1  # vfio.h: extension / iommu type
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
VFIO_TYPE, VFIO_BASE = ord(";"), 100

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

# struct vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
# struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
# struct vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1  # capability ids
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3  # the MSI-X table may be mmapped (Linux 4.16+)
# struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3
# struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
# struct vfio_iommu_type1_info
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3
# struct vfio_iommu_type1_dma_map.flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0  # readable by the device
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1  # writable by the device


class VfioPciRegion(enum.IntEnum):
    """vfio.h ``VFIO_PCI_*_REGION_INDEX``."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class VfioPciIrq(enum.IntEnum):
    """vfio.h ``VFIO_PCI_*_IRQ_INDEX``."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_irq_set(ctypes.Structure):
    """Header; ``data[]`` (eventfds as __s32, or bools as __u8) follows it."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32)]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
    ]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


for _t, _size in (
    (vfio_group_status, 8),
    (vfio_device_info, 20),
    (vfio_region_info, 32),
    (vfio_irq_info, 16),
    (vfio_irq_set, 20),
    (vfio_info_cap_header, 8),
    (vfio_region_sparse_mmap_area, 16),
    (vfio_iommu_type1_info, 24),
    (vfio_iova_range, 16),
    (vfio_iommu_type1_dma_map, 32),
    (vfio_iommu_type1_dma_unmap, 24),
):
    assert ctypes.sizeof(_t) == _size, f"{_t.__name__}: {ctypes.sizeof(_t)} != vfio.h's {_size}"


def irq_set(
    index: int, flags: int, start: int, fds: list[int] | None = None, count: int | None = None
) -> bytearray:
    """A ``struct vfio_irq_set`` with ``fds`` (eventfds, -1 to detach) as its data."""
    data = b"".join(fd.to_bytes(4, "little", signed=True) for fd in (fds or []))
    n = len(fds) if fds is not None else (count or 0)
    hdr = vfio_irq_set(
        argsz=ctypes.sizeof(vfio_irq_set) + len(data),
        flags=flags,
        index=index,
        start=start,
        count=n,
    )
    return bytearray(bytes(hdr) + data)


@dataclass(frozen=True)
class Cap:
    id: int
    version: int
    offset: int  # of the header within the info buffer


def capabilities(buf: bytes, first: int) -> Iterator[Cap]:
    """Walk a VFIO capability chain (``vfio_info_cap_header.next`` offsets into ``buf``).

    Stops at a zero ``next``; a loop, a backwards pointer or one outside ``buf`` ends the walk
    with ValueError instead of hanging.
    """
    hsize = ctypes.sizeof(vfio_info_cap_header)
    seen: set[int] = set()
    off = first
    while off:
        if off in seen or off + hsize > len(buf) or off < hsize:
            raise ValueError(f"VFIO capability chain is broken at offset {off}")
        seen.add(off)
        hdr = vfio_info_cap_header.from_buffer_copy(buf, off)
        yield Cap(hdr.id, hdr.version, off)
        off = hdr.next


def sparse_mmap_areas(buf: bytes, cap: Cap) -> list[tuple[int, int]]:
    """The (offset, size) areas of a VFIO_REGION_INFO_CAP_SPARSE_MMAP capability."""
    base = cap.offset + ctypes.sizeof(vfio_info_cap_header)
    nr = int.from_bytes(buf[base : base + 4], "little")
    areas = []
    for i in range(nr):
        a = vfio_region_sparse_mmap_area.from_buffer_copy(buf, base + 8 + 16 * i)
        areas.append((int(a.offset), int(a.size)))
    return areas


def iova_ranges(buf: bytes, cap: Cap) -> list[tuple[int, int]]:
    """Valid (start, end) IOVA ranges (inclusive end) from VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE."""
    base = cap.offset + ctypes.sizeof(vfio_info_cap_header)
    nr = int.from_bytes(buf[base : base + 4], "little")
    return [
        (int(r.start), int(r.end))
        for r in (vfio_iova_range.from_buffer_copy(buf, base + 8 + 16 * i) for i in range(nr))
    ]


def dma_avail(buf: bytes, cap: Cap) -> int:
    """How many more DMA mappings the container allows (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL)."""
    base = cap.offset + ctypes.sizeof(vfio_info_cap_header)
    return int.from_bytes(buf[base : base + 4], "little")
