"""DMA through the IOMMU (VFIO type1): IOVAs from our allocator, pinned by VFIO_IOMMU_MAP_DMA."""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from udrv.backends.vfio import VfioDevice
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.iova import PAGE, IovaAllocator
from udrv.dma.sg import SgList, segment
from udrv.errors import DmaError, VfioError


class VfioDma:
    """The DMA API of one VFIO device (one container)."""

    def __init__(self, dev: VfioDevice, *, mask_bits: int = 64) -> None:
        self.dev, self.mask_bits = dev, mask_bits
        info = dev.container.refresh_info()
        self.iova = IovaAllocator(info.iova_ranges or None, mask_bits=mask_bits)
        # DMA_AVAIL is what is left when we start; each of our mappings uses one entry.
        self.avail = info.dma_avail  # None: the kernel does not say
        self._live: dict[int, Mapping] = {}
        self._lock = threading.Lock()
        dev.on_close(self.close)

    def _map(self, vaddr: int, length: int, direction: Direction) -> tuple[int, int]:
        """Map the pages spanning [vaddr, vaddr+length); returns (iova of vaddr, page iova)."""
        page_va = vaddr & ~(PAGE - 1)
        span = ((vaddr + length + PAGE - 1) & ~(PAGE - 1)) - page_va
        with self._lock:
            if self.avail is not None and len(self._live) >= self.avail:
                raise DmaError(
                    f"{self.dev.address}: the IOMMU allows {self.avail} DMA mappings "
                    "(vfio_iommu_type1 dma_entry_limit) and all are in use; unmap some"
                )
            base = self.iova.alloc(span)
            try:
                self.dev.container.map_dma(
                    page_va,
                    base,
                    span,
                    readable=Direction.TO_DEVICE in direction,
                    writable=Direction.FROM_DEVICE in direction,
                )
            except VfioError as exc:
                self.iova.free_range(base)
                hint = (
                    " (raise `ulimit -l`: pinned memory counts against RLIMIT_MEMLOCK)"
                    if exc.errno == 12
                    else ""
                )
                raise DmaError(
                    f"{self.dev.address}: mapping {span:#x} bytes for DMA failed{hint}",
                    errno=exc.errno,
                ) from None
        return base + (vaddr - page_va), base

    def _unmapper(self, base: int, span: int, key: int) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self._live.pop(key, None)
                if self.dev.container.fd >= 0:
                    self.dev.container.unmap_dma(base, span)
                self.iova.free_range(base)

        return release

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """A consistent buffer of ``size`` bytes (zeroed), mapped for the device.

        Raises:
            DmaError: out of IOVA space, over the mapping limit, or over RLIMIT_MEMLOCK.
        """
        if size <= 0:
            raise DmaError(f"DMA buffer size must be positive, not {size}")
        span = (size + PAGE - 1) & ~(PAGE - 1)
        mem = mmap.mmap(-1, span, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        vaddr = np.frombuffer(mem, dtype=np.uint8).ctypes.data
        try:
            iova, base = self._map(vaddr, span, direction)
        except BaseException:
            mem.close()
            raise
        buf = DmaBuffer(mem, size, iova, self._unmapper(base, span, iova))
        self._live[iova] = buf
        return buf

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map existing memory (bytearray, numpy array, mmap...) for streaming DMA.

        The whole pages around the buffer become visible to the device: keep secrets out of
        them. Keep ``buffer`` alive until :meth:`Mapping.unmap`.
        """
        arr = np.frombuffer(buffer, dtype=np.uint8)
        if len(arr) == 0:
            raise DmaError("cannot map an empty buffer for DMA")
        if Direction.FROM_DEVICE in direction and not arr.flags.writeable:
            raise DmaError(
                "the device would write into a read-only buffer; pass a writable one "
                "or Direction.TO_DEVICE"
            )
        vaddr = arr.ctypes.data
        page_va = vaddr & ~(PAGE - 1)
        span = ((vaddr + len(arr) + PAGE - 1) & ~(PAGE - 1)) - page_va
        iova, base = self._map(vaddr, len(arr), direction)
        m = Mapping(iova, len(arr), self._unmapper(base, span, iova))
        m.owner = buffer  # type: ignore[attr-defined] # keep the memory alive while mapped
        self._live[iova] = m
        return m

    def map_sg(
        self,
        buffers: Iterable[Any],
        direction: Direction = Direction.BIDIRECTIONAL,
        *,
        max_segment: int = 1 << 32,
        boundary: int = 1 << 32,
    ) -> SgList:
        """Map several buffers; returns their (iova, length) segments, each at most
        ``max_segment`` long and none crossing a ``boundary``-aligned address."""
        maps = [self.map(b, direction) for b in buffers]
        return SgList(maps, segment([(m.iova, m.length) for m in maps], max_segment, boundary))

    def close(self) -> None:
        """Unmap everything still mapped (the device closes: nothing may DMA any more)."""
        for m in list(self._live.values()):
            with contextlib.suppress(Exception):
                m.unmap()


def mapped_segments(maps: Sequence[Mapping]) -> list[tuple[int, int]]:
    return [(m.iova, m.length) for m in maps]
