"""DMA for a vfio-user device: memory the server reaches through DMA_MAP.

:meth:`VfioUserDma.alloc` backs a buffer with a memfd and hands the fd over, so the server
mmaps the very same pages (zero copy, like an IOMMU mapping). :meth:`VfioUserDma.map` maps
existing memory, which has no fd: the server then reads and writes it with DMA_READ and
DMA_WRITE messages that the client answers from the buffer. Addresses come from an
:class:`~udrv.dma.iova.IovaAllocator` below the device's DMA mask.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.iova import PAGE, IovaAllocator
from udrv.dma.sg import SgList, segment
from udrv.errors import DmaError, VfioUserError

if TYPE_CHECKING:
    from udrv.backends.vfio_user import VfioUserDevice


class VfioUserDma:
    """The DMA API of one vfio-user device: ``alloc``, ``map``, ``map_sg``."""

    def __init__(self, dev: VfioUserDevice, *, mask_bits: int = 64) -> None:
        self.dev, self.mask_bits = dev, mask_bits
        self.iova = IovaAllocator(None, mask_bits=mask_bits)
        self._live: dict[int, Mapping] = {}
        self._lock = threading.Lock()
        dev.on_close(self.close)

    def _release(self, iova: int, size: int) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self._live.pop(iova, None)
                self.iova.free_range(iova)
            if self.dev.client.connected:
                with contextlib.suppress(VfioUserError):
                    self.dev.client.dma_unmap(iova, size)

        return release

    def _new_iova(self, span: int) -> int:
        with self._lock:
            return self.iova.alloc(span)

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """A zeroed buffer of ``size`` bytes in a memfd the server maps.

        Raises:
            DmaError: bad size, out of DMA address space, or the server refused the mapping.
        """
        if size <= 0:
            raise DmaError(f"DMA buffer size must be positive, not {size}")
        span = (size + PAGE - 1) & ~(PAGE - 1)
        fd = os.memfd_create("udrv-dma", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, span)
            mem = mmap.mmap(fd, span, mmap.MAP_SHARED)
            iova = self._new_iova(span)
            try:
                self.dev.client.dma_map(
                    iova, span, fd=fd,
                    readable=Direction.TO_DEVICE in direction,
                    writable=Direction.FROM_DEVICE in direction,
                )  # fmt: skip
            except VfioUserError as exc:
                mem.close()
                with self._lock:
                    self.iova.free_range(iova)
                raise DmaError(
                    f"{self.dev.address}: DMA_MAP of {span:#x} bytes refused: {exc}"
                ) from None
        finally:
            os.close(fd)  # the server holds its own copy; the mmap keeps ours alive
        buf = DmaBuffer(mem, size, iova, self._release(iova, span))
        self._live[iova] = buf
        return buf

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map existing memory (bytearray, numpy array, mmap...): no fd, so the server's
        accesses travel as DMA_READ/DMA_WRITE messages. Keep ``buffer`` alive until
        :meth:`Mapping.unmap`.

        Raises:
            DmaError: empty or read-only where the device must write, or refused.
        """
        arr = np.frombuffer(buffer, dtype=np.uint8)
        if len(arr) == 0:
            raise DmaError("cannot map an empty buffer for DMA")
        writable = Direction.FROM_DEVICE in direction
        if writable and not arr.flags.writeable:
            raise DmaError(
                "the device would write into a read-only buffer; pass a writable one "
                "or Direction.TO_DEVICE"
            )
        iova = self._new_iova(len(arr))
        try:
            self.dev.client.dma_map(
                iova, len(arr), memory=memoryview(arr.data),
                readable=Direction.TO_DEVICE in direction, writable=writable,
            )  # fmt: skip
        except VfioUserError as exc:
            with self._lock:
                self.iova.free_range(iova)
            raise DmaError(
                f"{self.dev.address}: DMA_MAP of {len(arr)} bytes refused: {exc}"
            ) from None
        m = Mapping(iova, len(arr), self._release(iova, len(arr)))
        m.owner = buffer  # type: ignore[attr-defined]
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
        """Map several buffers; their (iova, length) segments within the limits."""
        maps = [self.map(b, direction) for b in buffers]
        return SgList(maps, segment([(m.iova, m.length) for m in maps], max_segment, boundary))

    def close(self) -> None:
        """Unmap everything still mapped."""
        for m in list(self._live.values()):
            with contextlib.suppress(Exception):
                m.unmap()
