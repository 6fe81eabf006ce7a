"""DMA without an IOMMU (UIO): hugepage memory and its physical addresses.

With no IOMMU the device sees physical addresses, so DMA memory must be physically
contiguous and must not move: a 2 MiB hugepage is both (hugetlbfs pages are never swapped or
migrated while mapped). Physical addresses come from /proc/self/pagemap (bits 0-54: the page
frame number, bit 63: present; Documentation/admin-guide/mm/pagemap.rst), which needs
CAP_SYS_ADMIN to show frame numbers. The device can reach all of RAM: this is why VFIO is
the default.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from udrv.core.device import Device
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.sg import SgList, segment
from udrv.errors import DmaError

HUGEPAGE = 2 << 20
MAP_HUGETLB = 0x40000  # <asm-generic/mman-common.h> / <linux/mman.h>
MAP_POPULATE = 0x8000  # <asm-generic/mman-common.h>
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
PAGEMAP = "/proc/self/pagemap"
PFN_MASK = (1 << 55) - 1
PAGE_PRESENT = 1 << 63


def reserve_hugepages(n: int) -> int:
    """Ask the kernel for ``n`` 2 MiB hugepages; returns how many it has now."""
    try:
        NR_HUGEPAGES.write_text(str(n))
        return int(NR_HUGEPAGES.read_text())
    except OSError as exc:
        raise DmaError(
            f"cannot reserve hugepages through {NR_HUGEPAGES}; run as root", errno=exc.errno
        ) from None


def virt_to_phys(vaddr: int) -> int:
    """The physical address of a (resident) virtual address of this process."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(PAGEMAP, "rb") as f:
            f.seek(vaddr // page * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
    except OSError as exc:
        raise DmaError(f"cannot read {PAGEMAP}", errno=exc.errno) from None
    if not entry & PAGE_PRESENT:
        raise DmaError(f"virtual address {vaddr:#x} is not resident; touch it before mapping")
    pfn = entry & PFN_MASK
    if pfn == 0:
        raise DmaError(
            f"{PAGEMAP} hides frame numbers: physical addresses need CAP_SYS_ADMIN (run as root)"
        )
    return pfn * page + vaddr % page


class HugepageDma:
    """The DMA API under UIO: physical addresses of hugepage memory."""

    def __init__(self, dev: Device, *, mask_bits: int = 64) -> None:
        self.dev, self.limit = dev, 1 << mask_bits
        self._live: list[Mapping] = []
        dev.on_close(self.close)

    def _check(self, phys: int, length: int) -> None:
        if phys + length > self.limit:
            raise DmaError(
                f"{self.dev.address}: physical address {phys:#x} is beyond the device's "
                f"{self.limit.bit_length() - 1}-bit DMA mask; use VFIO, which maps an IOVA "
                "below the mask"
            )

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """Consistent memory from one hugepage (at most 2 MiB: physically contiguous)."""
        if not 0 < size <= HUGEPAGE:
            raise DmaError(
                f"under UIO a DMA buffer is one 2 MiB hugepage at most, not {size} bytes"
            )
        try:
            mem = mmap.mmap(
                -1, HUGEPAGE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE
            )
        except OSError as exc:
            have = NR_HUGEPAGES.read_text().strip() if NR_HUGEPAGES.exists() else "?"
            raise DmaError(
                f"no free 2 MiB hugepage for DMA ({have} reserved in {NR_HUGEPAGES}); "
                "run `udrv hugepages 64`",
                errno=exc.errno,
            ) from None
        vaddr = np.frombuffer(mem, dtype=np.uint8).ctypes.data
        try:
            phys = virt_to_phys(vaddr)
            self._check(phys, size)
        except BaseException:
            mem.close()
            raise
        buf = DmaBuffer(mem, size, phys, lambda: None)
        self._live.append(buf)
        return buf

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Streaming mapping of memory that is physically contiguous (e.g. in a hugepage)."""
        sg = self.map_sg([buffer], direction, max_segment=1 << 62, boundary=1 << 62)
        if len(sg) != 1:
            raise DmaError(
                "the buffer is not physically contiguous; use map_sg() or a hugepage buffer"
            )
        iova, length = sg.segments[0]
        return Mapping(iova, length, lambda: None)

    def map_sg(
        self,
        buffers: Any,
        direction: Direction = Direction.BIDIRECTIONAL,
        *,
        max_segment: int = 1 << 32,
        boundary: int = 1 << 32,
    ) -> SgList:
        page = os.sysconf("SC_PAGE_SIZE")
        spans: list[tuple[int, int]] = []
        maps: list[Mapping] = []
        for b in buffers:
            arr = np.frombuffer(b, dtype=np.uint8)
            va, end = arr.ctypes.data, arr.ctypes.data + len(arr)
            arr[::page].copy()  # touch every page so it is resident
            while va < end:
                n = min(end, (va // page + 1) * page) - va
                phys = virt_to_phys(va)
                self._check(phys, n)
                if spans and spans[-1][0] + spans[-1][1] == phys:
                    spans[-1] = (spans[-1][0], spans[-1][1] + n)
                else:
                    spans.append((phys, n))
                va += n
            maps.append(Mapping(spans[-1][0], len(arr), lambda: None))
        return SgList(maps, segment(spans, max_segment, boundary))

    def close(self) -> None:
        for m in self._live:
            with contextlib.suppress(Exception):
                m.unmap()
