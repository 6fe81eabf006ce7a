"""The device interface every driver talks to, whatever backend opened the device.

A driver never imports a backend: it gets a :class:`Device` from :func:`udrv.open` and uses
``config``, ``bar(i)``, ``reset()`` (and, with interrupts and DMA, ``irq`` and ``dma``).
Backends (``udrv.backends.vfio``, ``.uio``, ``.sysfs``) implement it.
"""

from __future__ import annotations

import abc
import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from udrv.core.region import Region


class RegionKind(enum.Enum):
    MEMORY = "memory"
    IO = "io"
    CONFIG = "config"
    ROM = "rom"


@dataclass(frozen=True)
class RegionInfo:
    """What a backend knows about one region before it is mapped."""

    index: int  # BAR number 0-5; ROM and config use the VFIO indexes 6 and 7
    kind: RegionKind
    size: int
    readable: bool
    writable: bool
    mappable: bool  # can be mmap'ed (memory BARs; I/O BARs and config never are)
    is_64bit: bool = False
    prefetchable: bool = False
    #: (offset, size) ranges of the region that may be mmap'ed (VFIO sparse mmap: the MSI-X
    #: table is carved out); empty means the whole region when ``mappable``.
    mmap_areas: tuple[tuple[int, int], ...] = ()


class Device(abc.ABC):
    """An opened PCI device. Use it as a context manager, or call :meth:`close`.

    Attributes:
        address: the PCI address, e.g. ``0000:00:04.0``.
        backend: ``"vfio"``, ``"uio"`` or ``"sysfs"``.
    """

    address: str
    backend: str

    def __init__(self, address: str) -> None:
        self.address = address
        self._closed = False
        self._close_hooks: list[Callable[[], None]] = []

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the device closes, before the backend lets go (the interrupt and
        DMA layers use it: vectors are disabled and mappings undone while the fds still exist).
        Hooks run last-registered first."""
        self._close_hooks.append(hook)

    @property
    @abc.abstractmethod
    def config(self) -> Region:
        """Config space (256 or 4096 bytes) with 8/16/32-bit reads and writes."""

    @abc.abstractmethod
    def region_info(self, index: int) -> RegionInfo:
        """Describe BAR ``index`` (0-5) without mapping it.

        Raises:
            RegionError: no such BAR, or the BAR is not implemented by the device.
        """

    @abc.abstractmethod
    def bar(self, index: int) -> Region:
        """BAR ``index`` (0-5) as a Region: memory BARs mapped, I/O BARs through the backend.

        The same Region object is returned on every call; it is closed with the device.

        Raises:
            RegionError: no such BAR, or it cannot be accessed through this backend.
        """

    @property
    def bars(self) -> list[RegionInfo]:
        """The BARs the device implements."""
        out = []
        for i in range(6):
            try:
                out.append(self.region_info(i))
            except Exception:
                continue
        return out

    @property
    def irq(self) -> Any:
        """The device's interrupts (:class:`udrv.irq.Interrupts`): ``dev.irq.enable("msi")``."""
        from udrv import irq

        return irq.for_device(self)

    def dma(self, *, mask_bits: int = 64) -> Any:
        """The device's DMA API (IOVAs under VFIO, physical addresses under UIO)."""
        from udrv import dma

        return dma.for_device(self, mask_bits=mask_bits)

    def set_bus_master(self, enable: bool = True) -> None:
        """Set or clear Bus Master Enable (PCI command register bit 2; PCI 3.0 6.2.2).

        A device can DMA, and so send MSI/MSI-X messages (which are memory writes), only
        with it set; like the kernel's pci_set_master(), drivers call it when they start.
        """
        cmd = self.config.read16(0x04)
        new = cmd | 0x4 if enable else cmd & ~0x4
        if new != cmd:
            self.config.write16(0x04, new)

    def reset(self) -> None:
        """Reset the device (function-level reset where the backend offers one).

        Raises:
            BackendError: this backend or device cannot reset.
        """
        from udrv.errors import BackendError

        raise BackendError(f"{self.address}: the {self.backend} backend cannot reset devices")

    @abc.abstractmethod
    def _close(self) -> None:
        """Release everything the backend holds (mappings, fds)."""

    def close(self) -> None:
        """Release the device; safe to call twice."""
        if not self._closed:
            self._closed = True
            while self._close_hooks:
                hook = self._close_hooks.pop()
                try:
                    hook()
                except Exception as exc:
                    warnings.warn(f"{self.address}: close hook failed: {exc}", stacklevel=2)
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Device:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"{self.address} was not closed; use `with udrv.open(...)`",
                ResourceWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.address} via {self.backend}, {state}>"
