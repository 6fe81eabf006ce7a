"""An IOMMU context: where DMA mappings go, shared by every device attached to it.

Under VFIO type1 this is the container (``/dev/vfio/vfio``): every group attached to it sees
every mapping made in it (vfio_iommu_type1 replays each map into every IOMMU domain of the
container), so one IOVA allocator serves them all and an address handed out through one
device's ``dma`` is valid for every device of the container. An iommufd IOAS would be a
second implementation of the same interface.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field

from udrv.dma.iova import IovaAllocator


@dataclass
class IommuInfo:
    """What the IOMMU allows: page sizes (bitmap), valid IOVA ranges (inclusive ends), and
    how many more mappings may be made (``None``: not reported)."""

    pgsizes: int
    iova_ranges: list[tuple[int, int]] = field(default_factory=list)
    dma_avail: int | None = None

    @property
    def page_size(self) -> int:
        """The smallest IOMMU page (lowest bit of ``pgsizes``; 4 KiB when not reported):
        IOVAs, sizes and process addresses of a mapping are multiples of it."""
        return self.pgsizes & -self.pgsizes or 4096


class IommuContext(abc.ABC):
    """The IOMMU operations plus the state every device of the context shares: one IOVA
    allocator, the count of mappings (against ``dma_avail``) and a lock around both."""

    info: IommuInfo

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mappings = 0
        self._iova: IovaAllocator | None = None
        self._avail: int | None = None

    @abc.abstractmethod
    def map_dma(self, vaddr: int, iova: int, size: int, *, readable: bool, writable: bool) -> None:
        """Map ``size`` bytes of this process at ``vaddr`` to ``iova`` for the devices."""

    @abc.abstractmethod
    def unmap_dma(self, iova: int, size: int) -> None:
        """Undo a :meth:`map_dma`."""

    @abc.abstractmethod
    def refresh_info(self) -> IommuInfo:
        """Read :attr:`info` again (``dma_avail`` changes as mappings are made)."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """False once closed: mappings went with it, unmapping is moot."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the context; its mappings go with it."""

    def _space(self) -> IovaAllocator:
        if self._iova is None:
            info = self.refresh_info()
            self._iova = IovaAllocator(info.iova_ranges or None, page=info.page_size)
            # DMA_AVAIL is what is left when we start; each of our mappings uses one entry.
            self._avail = info.dma_avail
        return self._iova

    @property
    def iova(self) -> IovaAllocator:
        """The context's one IOVA allocator (made on first use from the IOMMU's ranges and
        page size)."""
        return self._space()

    @property
    def avail(self) -> int | None:
        """How many mappings this context may hold (None: the kernel does not say)."""
        self._space()
        return self._avail
