"""DMA buffers and mappings: the seed's ``usr_pci_map`` (consistent and streaming)."""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt


class Direction(enum.Flag):
    """Who reads the memory: like the kernel's dma_data_direction."""

    TO_DEVICE = enum.auto()  # the device reads it (DMA_TO_DEVICE)
    FROM_DEVICE = enum.auto()  # the device writes it (DMA_FROM_DEVICE)
    BIDIRECTIONAL = TO_DEVICE | FROM_DEVICE


class Mapping:
    """Process memory visible to the device at ``iova`` until :meth:`unmap`.

    Attributes:
        iova: the device's address of the first byte.
        length: bytes mapped.
        segments: the (address, length) pieces the device sees, in order: one under an
            IOMMU; under UIO one per physically contiguous run of the buffer.
        owner: the mapped object, kept alive while mapped.
    """

    def __init__(
        self,
        iova: int,
        length: int,
        release: Callable[[], None],
        *,
        segments: list[tuple[int, int]] | None = None,
        owner: Any = None,
    ) -> None:
        self.iova, self.length = iova, length
        self.segments = segments if segments is not None else [(iova, length)]
        self.owner = owner
        self._release: Callable[[], None] | None = release

    @property
    def mapped(self) -> bool:
        return self._release is not None

    def unmap(self) -> None:
        """The device may no longer touch the memory (the IOMMU blocks it from now on)."""
        if self._release is not None:
            release, self._release = self._release, None
            self.owner = None
            release()

    def close(self) -> None:
        """Same as :meth:`unmap` (a buffer also frees its memory)."""
        self.unmap()

    def __enter__(self) -> Mapping:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmap()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} iova={self.iova:#x} length={self.length:#x}{'' if self.mapped else ' unmapped'}>"


class DmaBuffer(Mapping):
    """Consistent DMA memory: page-aligned, pinned, mapped for the device at ``iova``.

    Coherent on x86 (DMA snoops the caches): no sync calls are needed, only ordering
    (see udrv.core.barrier). ``array`` is a zero-copy numpy uint8 view; ``view(dtype)``
    reinterprets it (descriptor rings as structured arrays); the buffer protocol works too.

    Args:
        mem: the memory (owned: closed with the buffer).
        size: bytes of the buffer.
        iova: the device's address of its first byte.
        release: undoes the mapping.
        offset: where the buffer starts in ``mem`` (alignment to the IOMMU page size).
    """

    def __init__(
        self,
        mem: mmap.mmap,
        size: int,
        iova: int,
        release: Callable[[], None],
        *,
        offset: int = 0,
    ) -> None:
        super().__init__(iova, size, release)
        self._mem = mem
        self.size = size
        self.array: npt.NDArray[np.uint8] = np.frombuffer(
            mem, dtype=np.uint8, count=size, offset=offset
        )

    def view(self, dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
        """The buffer reinterpreted as ``dtype`` (zero-copy; e.g. a ring of descriptors)."""
        return self.array.view(dtype)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            return self.array[key].tobytes()
        return int(self.array[key])

    def __setitem__(self, key: int | slice, value: int | bytes) -> None:
        if isinstance(value, int):
            self.array[key] = value  # a slice is filled with it
        else:
            self.array[key] = np.frombuffer(value, dtype=np.uint8)

    def __buffer__(self, flags: int) -> memoryview:  # Python 3.12+; 3.11 uses .memoryview()
        return self.memoryview()

    def memoryview(self) -> memoryview:
        """A writable, zero-copy memoryview of the buffer."""
        return memoryview(self.array.data)

    def close(self) -> None:
        """Unmap from the device, then free the memory; safe to call twice.

        If numpy views of :attr:`array` are still alive, the memory is freed when the last
        of them goes (the device lost access already: that is what matters for safety).
        """
        self.unmap()
        if self._mem.closed:
            return
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._mem.close()
        except BufferError:
            pass  # exported views remain; the mmap is freed with them

    @property
    def closed(self) -> bool:
        return not self.mapped and self._mem.closed

    def __enter__(self) -> DmaBuffer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
