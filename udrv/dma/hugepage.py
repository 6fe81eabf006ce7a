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
from dataclasses import dataclass
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
#: The 2 MiB pool (Documentation/admin-guide/mm/hugetlbpage.rst, "/sys/kernel/mm/hugepages").
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
NR_HUGEPAGES = HUGEPAGES_2M / "nr_hugepages"
PAGEMAP = "/proc/self/pagemap"
PFN_MASK = (1 << 55) - 1  # pagemap.rst: bits 0-54 page frame number
PAGE_PRESENT = 1 << 63  # pagemap.rst: bit 63 page present


@dataclass(frozen=True)
class HugepageStatus:
    """The 2 MiB hugepage pool: pages reserved (``nr_hugepages``) and still free."""

    total: int
    free: int


def hugepage_status(pool: Path | None = None) -> HugepageStatus:
    """How many 2 MiB hugepages are reserved and free (0/0 when the kernel has none)."""
    pool = pool or HUGEPAGES_2M
    try:
        return HugepageStatus(
            int((pool / "nr_hugepages").read_text()), int((pool / "free_hugepages").read_text())
        )
    except FileNotFoundError:
        return HugepageStatus(0, 0)
    except (OSError, ValueError) as exc:
        raise DmaError(f"cannot read the hugepage pool in {pool}: {exc}") from None


def reserve_hugepages(n: int, pool: Path | None = None) -> int:
    """Ask the kernel for ``n`` 2 MiB hugepages in total; returns how many it has now.

    The kernel may grant fewer when memory is fragmented; the caller compares.

    Raises:
        DmaError: ``n`` is negative, or the pool cannot be written (not root, no hugetlbfs).
    """
    if n < 0:
        raise DmaError(f"cannot reserve {n} hugepages; give a count >= 0")
    path = (pool or HUGEPAGES_2M) / "nr_hugepages"
    try:
        path.write_text(str(n))
        return int(path.read_text())
    except OSError as exc:
        raise DmaError(
            f"cannot reserve {n} hugepages through {path}; run as root (or boot with "
            f"hugepages={n})",
            errno=exc.errno,
        ) from None


def virt_to_phys(vaddr: int, pagemap: str = PAGEMAP) -> int:
    """The physical address of a (resident) virtual address of this process.

    Raises:
        DmaError: the page is not resident, or pagemap hides frame numbers (not root).
    """
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(pagemap, "rb") as f:
            f.seek(vaddr // page * 8)
            raw = f.read(8)
    except OSError as exc:
        raise DmaError(f"cannot read {pagemap}", errno=exc.errno) from None
    if len(raw) != 8:
        raise DmaError(f"{pagemap} has no entry for virtual address {vaddr:#x}")
    (entry,) = struct.unpack("<Q", raw)
    if not entry & PAGE_PRESENT:
        raise DmaError(f"virtual address {vaddr:#x} is not resident; touch it before mapping")
    pfn = entry & PFN_MASK
    if pfn == 0:
        raise DmaError(
            f"{pagemap} hides frame numbers: physical addresses need CAP_SYS_ADMIN (run as root)"
        )
    return pfn * page + vaddr % page


class HugepageDma:
    """The DMA API under UIO: physical addresses of hugepage memory."""

    def __init__(self, dev: Device, *, mask_bits: int = 64) -> None:
        self.dev, self.limit, self.mask_bits = dev, 1 << mask_bits, mask_bits
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
            st = hugepage_status()
            raise DmaError(
                f"no free 2 MiB hugepage for DMA ({st.total} reserved, {st.free} free in "
                f"{HUGEPAGES_2M}); run `udrv hugepages {max(64, st.total + 16)}`",
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
