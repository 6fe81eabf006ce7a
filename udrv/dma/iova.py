"""IOVA allocation: the device addresses DMA mappings get under an IOMMU.

An IOVA must lie in one of the IOMMU's valid ranges (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
the x86 MSI window 0xfee00000-0xfeefffff is excluded, for instance), below the device's DMA
mask (edu: 28 bits), and page-aligned. First fit over a sorted free list; freeing coalesces.
"""

from __future__ import annotations

import bisect

from udrv.errors import DmaError

PAGE = 4096


class IovaAllocator:
    """Args:
    ranges: valid (start, end) ranges, end inclusive; defaults to the whole space.
    mask_bits: the device can address [0, 2**mask_bits).
    base: lowest IOVA handed out (keep 0 out: a zero DMA address hides bugs).
    """

    def __init__(
        self,
        ranges: list[tuple[int, int]] | None = None,
        *,
        mask_bits: int = 64,
        base: int = 0x10_0000,
    ) -> None:
        limit = (1 << mask_bits) - 1
        ranges = ranges or [(0, (1 << 64) - 1)]
        self.free: list[tuple[int, int]] = []  # (start, end exclusive), sorted, disjoint
        for start, end in sorted(ranges):
            s = max(_align_up(start), base)
            e = (min(end, limit) + 1) & ~(PAGE - 1)
            if e > s:
                self.free.append((s, e))
        if not self.free:
            raise DmaError(
                f"no IOVA space: the IOMMU ranges {ranges} and the {mask_bits}-bit DMA "
                "mask leave nothing"
            )
        self.mask_bits = mask_bits
        self.allocated: dict[int, int] = {}

    def alloc(self, size: int, align: int = PAGE) -> int:
        """A free IOVA range of ``size`` bytes (rounded up to pages), aligned to ``align``."""
        size = _align_up(size)
        align = max(align, PAGE)
        for i, (s, e) in enumerate(self.free):
            start = (s + align - 1) & ~(align - 1)
            if start + size <= e:
                pieces = [(a, b) for a, b in ((s, start), (start + size, e)) if b > a]
                self.free[i : i + 1] = pieces
                self.allocated[start] = size
                return start
        total = sum(e - s for s, e in self.free)
        raise DmaError(
            f"IOVA space exhausted: no {size:#x}-byte hole below the {self.mask_bits}-bit "
            f"DMA mask ({total:#x} bytes free in {len(self.free)} pieces); unmap buffers "
            "you no longer need"
        )

    def free_range(self, iova: int) -> None:
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


def _align_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)
