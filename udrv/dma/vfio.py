"""``dev.dma`` of a VFIO device: IOVAs from the container's allocator, memory pinned and
mapped by VFIO_IOMMU_MAP_DMA.

All devices opened in one process share one container (see :mod:`udrv.backends.vfio`), so
an IOVA handed out here is valid for every one of them: a buffer allocated through one
device's ``dma`` can be given to another device of the process (a NIC forwarding into a
second NIC's ring, two functions of one card sharing a buffer). Each device's own mask
still holds for what is allocated through it. A mapping lives until it is unmapped or the
device it was made through closes.
"""

from __future__ import annotations

import errno
import mmap
from typing import Any

import numpy as np

from udrv.core.device import Device
from udrv.core.dma import Dma
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.iommu import IommuContext
from udrv.errors import DmaError, VfioError


class VfioDma(Dma):
    """The DMA API of one VFIO device, allocating from its container.

    Args:
        device: the device (for messages and its mask).
        iommu: the container the device's group is attached to.
    """

    def __init__(self, device: Device, iommu: IommuContext) -> None:
        super().__init__(device)
        self.iommu = iommu
        self._live: dict[int, Mapping] = {}  # keyed by base IOVA; under iommu.lock

    @property
    def page_size(self) -> int:
        """The IOMMU's smallest page: mappings are whole multiples of it."""
        return self.iommu.iova.page

    def _map(self, vaddr: int, length: int, direction: Direction) -> tuple[int, int, int]:
        """Map the IOMMU pages spanning [vaddr, vaddr+length).

        Returns:
            (iova of ``vaddr``, base iova, span mapped).
        """
        ctx = self.iommu
        page = self.page_size
        page_va = vaddr & ~(page - 1)
        span = ((vaddr + length + page - 1) & ~(page - 1)) - page_va
        with ctx.lock:
            mask = self._fix_mask()
            if ctx.avail is not None and ctx.mappings >= ctx.avail:
                raise DmaError(
                    f"{self.device.address}: the IOMMU allows {ctx.avail} DMA mappings "
                    "(vfio_iommu_type1 dma_entry_limit) and all are in use; unmap some"
                )
            base = ctx.iova.alloc(span, mask_bits=mask)
            try:
                ctx.map_dma(
                    page_va,
                    base,
                    span,
                    readable=Direction.TO_DEVICE in direction,
                    writable=Direction.FROM_DEVICE in direction,
                )
            except VfioError as exc:
                ctx.iova.free_range(base)
                hint = (
                    " (raise `ulimit -l`: pinned memory counts against RLIMIT_MEMLOCK)"
                    if exc.errno == errno.ENOMEM
                    else ""
                )
                raise DmaError(
                    f"{self.device.address}: mapping {span:#x} bytes for DMA failed{hint}",
                    errno=exc.errno,
                ) from None
            ctx.mappings += 1
        return base + (vaddr - page_va), base, span

    def _register(self, base: int, m: Mapping) -> None:
        with self.iommu.lock:
            self._live[base] = m

    def _unmapper(self, base: int, span: int) -> Any:
        def release() -> None:
            ctx = self.iommu
            with ctx.lock:
                self._live.pop(base, None)
                if ctx.is_open:
                    ctx.unmap_dma(base, span)
                ctx.iova.free_range(base)
                ctx.mappings -= 1

        return release

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        if size <= 0:
            raise DmaError(f"{self.device.address}: DMA buffer size must be positive, not {size}")
        page = self.page_size
        span = (size + page - 1) & ~(page - 1)
        # mmap aligns to the CPU's page; when the IOMMU's is larger, over-allocate and start
        # the buffer at the first IOMMU page boundary.
        extra = page - mmap.PAGESIZE if page > mmap.PAGESIZE else 0
        # MAP_SHARED: a forked process (a ublk queue worker) must see the very pages the
        # IOMMU pinned. A pinned MAP_PRIVATE page is copied for the child at fork (6.x
        # mm/memory.c copy_present_pte: folio_try_dup_anon_rmap_pte refuses a page that
        # folio_needs_cow_for_dma), so the child's writes and the device's would part.
        mem = mmap.mmap(-1, span + extra, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        vaddr = np.frombuffer(mem, dtype=np.uint8).ctypes.data
        offset = -vaddr % page
        try:
            iova, base, mapped = self._map(vaddr + offset, span, direction)
        except BaseException:
            mem.close()
            raise
        buf = DmaBuffer(mem, size, iova, self._unmapper(base, mapped), offset=offset)
        self._register(base, buf)
        return buf

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map existing memory (bytearray, numpy array, mmap...) for streaming DMA.

        The whole IOMMU pages around the buffer become visible to the device: keep secrets
        out of them. Keep ``buffer`` alive until :meth:`Mapping.unmap` (the mapping holds a
        reference meanwhile).
        """
        arr = np.frombuffer(buffer, dtype=np.uint8)
        if len(arr) == 0:
            raise DmaError(f"{self.device.address}: cannot map an empty buffer for DMA")
        if Direction.FROM_DEVICE in direction and not arr.flags.writeable:
            raise DmaError(
                f"{self.device.address}: the device would write into a read-only buffer; "
                "pass a writable one or Direction.TO_DEVICE"
            )
        iova, base, span = self._map(arr.ctypes.data, len(arr), direction)
        m = Mapping(iova, len(arr), self._unmapper(base, span), owner=buffer)
        self._register(base, m)
        return m

    def _release_all(self) -> None:
        with self.iommu.lock:
            live = list(self._live.values())
        errors = []
        for m in reversed(live):
            try:
                m.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise DmaError(
                f"{self.device.address}: {len(errors)} DMA mapping(s) could not be undone: "
                f"{errors[0]}"
            )
