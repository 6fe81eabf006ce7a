"""IOVA allocation: the device addresses DMA mappings get under an IOMMU.

An IOVA must lie in one of the IOMMU's valid ranges (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
the x86 MSI window 0xfee00000-0xfeefffff is excluded, for instance), below the DMA mask of
the device that will use it (edu: 28 bits), and aligned to the IOMMU's smallest page size
(VFIO_IOMMU_GET_INFO ``iova_pgsizes``: 4 KiB on x86, 64 KiB on some arm64 systems;
vfio_iommu_type1 refuses a map whose iova or size is not a multiple of it). One allocator
serves a whole IOMMU context (a VFIO container), so an address handed out is unique across
every device in it. First fit over a sorted free list, lowest address first (so a device with
a small mask finds room as long as any is left below it); freeing coalesces.
"""

from __future__ import annotations

import bisect

from udrv.errors import DmaError

PAGE = 4096


class IovaAllocator:
    """Args:
    ranges: valid (start, end) ranges, end inclusive; defaults to the whole space.
    page: the IOMMU's smallest page size (a power of two); sizes and addresses are
        multiples of it.
    base: lowest IOVA handed out (keep 0 out: a zero DMA address hides bugs).
    """

    def __init__(
        self,
        ranges: list[tuple[int, int]] | None = None,
        *,
        page: int = PAGE,
        base: int = 0x10_0000,
    ) -> None:
        if page <= 0 or page & (page - 1):
            raise DmaError(f"IOMMU page size {page:#x} is not a power of two")
        self.page = page
        ranges = ranges or [(0, (1 << 64) - 1)]
        self.free: list[tuple[int, int]] = []  # (start, end exclusive), sorted, disjoint
        for start, end in sorted(ranges):
            s = max(self._align_up(start), self._align_up(base))
            e = (end + 1) & ~(page - 1)
            if e > s:
                self.free.append((s, e))
        if not self.free:
            raise DmaError(f"no IOVA space: the IOMMU ranges {ranges} leave nothing")
        self.allocated: dict[int, int] = {}

    def _align_up(self, n: int) -> int:
        return (n + self.page - 1) & ~(self.page - 1)

    def alloc(self, size: int, *, mask_bits: int = 64, align: int = 0) -> int:
        """A free IOVA range of ``size`` bytes (rounded up to pages) below ``2**mask_bits``.

        Args:
            size: bytes.
            mask_bits: the DMA mask of the device that will use the address.
            align: alignment (rounded up to a page).

        Raises:
            DmaError: no hole big enough below the mask.
        """
        size = self._align_up(max(size, 1))
        align = max(self._align_up(align), self.page)
        limit = 1 << mask_bits
        for i, (s, e) in enumerate(self.free):
            start = (s + align - 1) & ~(align - 1)
            if start + size <= min(e, limit):
                pieces = [(a, b) for a, b in ((s, start), (start + size, e)) if b > a]
                self.free[i : i + 1] = pieces
                self.allocated[start] = size
                return start
            if s >= limit:
                break
        total = sum(min(e, limit) - s for s, e in self.free if s < limit)
        raise DmaError(
            f"IOVA space exhausted: no {size:#x}-byte hole below the {mask_bits}-bit DMA "
            f"mask ({total:#x} bytes free there); unmap buffers you no longer need"
        )

    def free_range(self, iova: int) -> None:
        """Give back a range from :meth:`alloc`.

        Raises:
            DmaError: ``iova`` is not the start of an allocated range.
        """
        size = self.allocated.pop(iova, None)
        if size is None:
            raise DmaError(f"IOVA {iova:#x} was not allocated (double unmap?)")
        i = bisect.bisect(self.free, (iova, iova + size))
        self.free.insert(i, (iova, iova + size))
        # Coalesce with the neighbours.
        merged: list[tuple[int, int]] = []
        for s, e in self.free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.free = merged
