"""DMA in user space: the seed's ``usr_pci_map`` (consistent buffers, streaming and
scatter-gather mappings, unmap).

    dma = udrv.dma.for_device(dev, mask_bits=28)
    with dma.alloc(4096) as buf:         # consistent: buf.iova, buf.array (numpy)
        ...
    m = dma.map(bytearray(100))          # streaming; m.iova; m.unmap()

Under VFIO the addresses are IOVAs through the IOMMU; under UIO they are physical addresses
of hugepage memory (no IOMMU: the device can reach all of RAM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from udrv.core.device import Device
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.dma.sg import SgList
from udrv.errors import DmaError

if TYPE_CHECKING:
    from udrv.dma.hugepage import HugepageDma
    from udrv.dma.vfio import VfioDma
    from udrv.dma.vfio_user import VfioUserDma

__all__ = ["Direction", "DmaBuffer", "Mapping", "SgList", "for_device"]


def for_device(dev: Device, *, mask_bits: int = 64) -> VfioDma | HugepageDma | VfioUserDma:
    """The DMA API for ``dev`` (VFIO or UIO, chosen by ``dev.backend``); also sets Bus
    Master Enable (no DMA without it). Mappings left open are undone when ``dev`` closes.

    Both implementations offer ``alloc(size)``, ``map(buffer, direction)`` and
    ``map_sg(buffers, direction, max_segment=, boundary=)``.

    Args:
        mask_bits: the device's DMA address width (edu: 28); addresses stay below it.

    Raises:
        DmaError: the backend (sysfs) cannot do DMA.
        VfioError: the IOMMU information cannot be read.
    """
    cached = getattr(dev, "_udrv_dma", None)
    if cached is not None:
        # One allocator per device: a second one would hand out the same IOVAs again.
        if cached.mask_bits != mask_bits:
            raise DmaError(
                f"{dev.address}: DMA is already set up with a {cached.mask_bits}-bit mask; "
                f"use that (asked for {mask_bits} bits)"
            )
        return cached
    dma: VfioDma | HugepageDma | VfioUserDma
    if dev.backend == "vfio":
        from udrv.backends.vfio import VfioDevice
        from udrv.dma.vfio import VfioDma

        assert isinstance(dev, VfioDevice)
        dma = VfioDma(dev, mask_bits=mask_bits)
    elif dev.backend == "vfio-user":
        from udrv.dma.vfio_user import VfioUserDma

        dma = VfioUserDma(dev, mask_bits=mask_bits)  # type: ignore[arg-type]
    elif dev.backend == "uio":
        from udrv.dma.hugepage import HugepageDma

        dma = HugepageDma(dev, mask_bits=mask_bits)
    else:
        raise DmaError(
            f"{dev.address}: the {dev.backend} backend cannot do DMA; open it with "
            "backend='vfio' (or 'uio')"
        )
    dev.set_bus_master()
    dev._udrv_dma = dma  # type: ignore[attr-defined]
    return dma
