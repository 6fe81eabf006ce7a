"""The DMA part of the device contract: ``dev.dma``.

    dev.set_bus_master()                 # no DMA without Bus Master Enable
    dev.dma.set_mask(28)                 # edu: 28-bit DMA addresses (or udrv.open(..., dma_mask_bits=28))
    with dev.dma.alloc(4096) as buf:     # consistent: buf.iova, buf.array (numpy)
        ...
    m = dev.dma.map(bytearray(100))      # streaming; m.iova; m.unmap()
    sg = dev.dma.map_sg([a, b], max_segment=4096)   # (iova, length) segments

The address a device uses is ``iova``: an I/O virtual address through the IOMMU under VFIO,
a physical address under UIO. Everything still mapped is undone when the device closes.

The DMA mask (the device's address width, like the kernel's ``dma_set_mask``) is set once:
by ``udrv.open(..., dma_mask_bits=N)`` or ``dev.dma.set_mask(N)`` before the first mapping;
otherwise the first mapping fixes the default, 64 bits. Asking for another mask later is an
error that says what is set and where: two parts of a program disagreeing about the device
is a bug, not something to resolve silently.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.sg import SgList, segment
from udrv.errors import DmaError

if TYPE_CHECKING:
    from udrv.core.device import Device

DEFAULT_MASK_BITS = 64
#: A mask below 4 KiB cannot hold a page; PCI addresses are at most 64 bits.
MIN_MASK_BITS, MAX_MASK_BITS = 12, 64


class Dma(abc.ABC):
    """DMA memory and mappings for one device. Get it as ``dev.dma`` (one object per open
    device). A backend implements :meth:`alloc`, :meth:`map` and :meth:`_release_all`.

    Args:
        device: the device the addresses are for.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self._mask_bits: int | None = None
        self._mask_origin = ""

    # -- the mask ------------------------------------------------------------------------

    @property
    def mask_bits(self) -> int:
        """The DMA address width in force: what was set, else the default (64)."""
        return DEFAULT_MASK_BITS if self._mask_bits is None else self._mask_bits

    @property
    def limit(self) -> int:
        """One past the highest address the device can reach (``2 ** mask_bits``)."""
        return 1 << self.mask_bits

    def set_mask(self, bits: int) -> None:
        """Set the device's DMA address width; every address handed out stays below it.

        Set it once, before the first mapping; asking again for the same width is fine.

        Args:
            bits: 12..64 (edu: 28; most devices: 64, some 32).

        Raises:
            DmaError: out of range, or another mask is already set (the message says which
                and where).
        """
        self._set_mask(bits, f"dev.dma.set_mask({bits})")

    def _set_mask(self, bits: int, origin: str) -> None:
        if not MIN_MASK_BITS <= bits <= MAX_MASK_BITS:
            raise DmaError(
                f"{self.device.address}: a DMA mask of {bits} bits is outside "
                f"{MIN_MASK_BITS}..{MAX_MASK_BITS}"
            )
        if self._mask_bits is None:
            self._mask_bits, self._mask_origin = bits, origin
        elif self._mask_bits != bits:
            raise DmaError(
                f"{self.device.address}: the DMA mask is already {self._mask_bits} bits (set "
                f"by {self._mask_origin}); cannot change it to {bits} bits. Set it once, "
                "before the first mapping: udrv.open(..., dma_mask_bits=N) or "
                "dev.dma.set_mask(N)"
            )

    def _fix_mask(self) -> int:
        """Called by every mapping: the mask is fixed from now on. Returns it."""
        if self._mask_bits is None:
            self._set_mask(DEFAULT_MASK_BITS, f"the first mapping (default {DEFAULT_MASK_BITS})")
        return self.mask_bits

    # -- memory --------------------------------------------------------------------------

    @abc.abstractmethod
    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """Consistent DMA memory: ``size`` bytes, zeroed, pinned, mapped for the device.

        Args:
            size: bytes (rounded up to whole pages of the IOMMU).
            direction: who accesses it (the IOMMU grants only that).

        Returns:
            A :class:`DmaBuffer`: a numpy array with its ``iova``; close it when done.

        Raises:
            DmaError: out of address space below the mask, over the mapping limit or
                RLIMIT_MEMLOCK, or no memory of the kind the backend needs.
        """

    @abc.abstractmethod
    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Map existing memory (bytearray, numpy array, mmap...) for streaming DMA.

        Keep ``buffer`` alive until :meth:`Mapping.unmap`.

        Returns:
            A :class:`Mapping`: ``iova`` is the device's address of the buffer's first byte.

        Raises:
            DmaError: empty or read-only buffer for a device write, out of address space,
                or the memory cannot be given to the device (the message says why).
        """

    def _map_for_sg(self, buffer: Any, direction: Direction) -> Mapping:
        """Map one buffer of an SG list; its ``segments`` may be several (UIO)."""
        return self.map(buffer, direction)

    def map_sg(
        self,
        buffers: Iterable[Any],
        direction: Direction = Direction.BIDIRECTIONAL,
        *,
        max_segment: int = 1 << 32,
        boundary: int = 1 << 32,
    ) -> SgList:
        """Map several buffers; all or none (a failure undoes the earlier ones).

        Args:
            max_segment: no segment is longer (the device's limit; kernel:
                ``dma_set_max_seg_size``).
            boundary: no segment crosses a multiple of it (a power of two; kernel:
                ``dma_set_seg_boundary``).

        Returns:
            An :class:`SgList` of (iova, length) segments, in buffer order; ``unmap()`` it.

        Raises:
            DmaError: as :meth:`map`, or bad limits.
        """
        segment([], max_segment, boundary)  # check the limits before mapping anything
        maps: list[Mapping] = []
        try:
            for b in buffers:
                maps.append(self._map_for_sg(b, direction))
        except BaseException:
            for m in reversed(maps):
                m.unmap()
            raise
        spans = [s for m in maps for s in m.segments]
        return SgList(maps, segment(spans, max_segment, boundary))

    @abc.abstractmethod
    def _release_all(self) -> None:
        """Unmap every mapping and free every buffer made through this object."""

    def close(self) -> None:
        """Unmap everything still mapped and free the buffers: the device may no longer
        DMA. Called by ``dev.close()``; safe to call twice."""
        self._release_all()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.device.address}: {self.mask_bits}-bit mask>"
