"""``dev.dma`` of a vfio-user device: memory the server reaches through DMA_MAP.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from udrv.core.dma import Dma
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.iova import PAGE, IovaAllocator
from udrv.errors import DmaError, VfioUserError

if TYPE_CHECKING:
    from udrv.core.device import Device
    from udrv.vfio_user.client import Client


class VfioUserDma(Dma):
    """The DMA API of one vfio-user device.

    Args:
        device: the device (for messages and its mask).
        client: its connection to the server.
    """

    def __init__(self, device: Device, client: Client) -> None:
        super().__init__(device)
        self.client = client
        self.iova = IovaAllocator()
        self._live: dict[int, Mapping] = {}
        self._lock = threading.Lock()

    def _new_iova(self, span: int) -> int:
        with self._lock:
            return self.iova.alloc(span, mask_bits=self._fix_mask())

    def _release(self, iova: int, size: int) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self._live.pop(iova, None)
                self.iova.free_range(iova)
            if self.client.connected:
                with contextlib.suppress(VfioUserError):
                    self.client.dma_unmap(iova, size)

        return release

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """A zeroed buffer of ``size`` bytes in a memfd the server maps.

        Raises:
            DmaError: bad size, out of DMA address space, or the server refused the mapping.
        """
        if size <= 0:
            raise DmaError(f"DMA buffer size must be positive, not {size}")
        span = (size + PAGE - 1) & ~(PAGE - 1)
        iova = self._new_iova(span)
        fd = os.memfd_create("udrv-dma", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, span)
            mem = mmap.mmap(fd, span, mmap.MAP_SHARED)
            try:
                self.client.dma_map(
                    iova, span, fd=fd,
                    readable=Direction.TO_DEVICE in direction,
                    writable=Direction.FROM_DEVICE in direction,
                )  # fmt: skip
            except VfioUserError as exc:
                mem.close()
                raise DmaError(
                    f"{self.device.address}: DMA_MAP of {span:#x} bytes refused: {exc}"
                ) from None
        except BaseException:
            with self._lock:
                self.iova.free_range(iova)
            raise
        finally:
            os.close(fd)  # the server holds its own copy; the mmap keeps ours alive
        buf = DmaBuffer(mem, size, iova, self._release(iova, span))
        with self._lock:
            self._live[iova] = buf
        return buf

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map existing memory (bytearray, numpy array, mmap...): no fd, so the server's
        accesses travel as DMA_READ/DMA_WRITE messages. Keep ``buffer`` alive until
        :meth:`Mapping.unmap`.

        Raises:
            DmaError: empty, read-only where the device must write, or refused.
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
            self.client.dma_map(
                iova, len(arr), memory=memoryview(arr.data),
                readable=Direction.TO_DEVICE in direction, writable=writable,
            )  # fmt: skip
        except VfioUserError as exc:
            with self._lock:
                self.iova.free_range(iova)
            raise DmaError(
                f"{self.device.address}: DMA_MAP of {len(arr)} bytes refused: {exc}"
            ) from None
        m = Mapping(iova, len(arr), self._release(iova, len(arr)), owner=buffer)
        with self._lock:
            self._live[iova] = m
        return m

    def _release_all(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for m in live:
            if isinstance(m, DmaBuffer):
                m.close()
            else:
                m.unmap()
