"""DMA buffers and mappings (the seed's ``usr_pci_map``), and their implementations for
each backend.

A driver gets DMA from its device: ``dev.dma.alloc(4096)`` returns a :class:`DmaBuffer`
(a numpy array with its ``iova``), ``dev.dma.map(buf)`` a :class:`Mapping`,
``dev.dma.map_sg(bufs)`` an :class:`SgList`. The interface ``dev.dma`` implements is
:class:`udrv.core.dma.Dma`; :mod:`udrv.dma.vfio` (IOVAs through the IOMMU) and
:mod:`udrv.dma.hugepage` (physical addresses of hugepage memory, UIO) are what the VFIO and
UIO backends hand out.
"""

from __future__ import annotations

from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.sg import SgList

__all__ = ["Direction", "DmaBuffer", "Mapping", "SgList"]
