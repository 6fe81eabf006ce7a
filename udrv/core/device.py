"""The device interface every driver talks to, whatever backend opened the device.

A driver never imports a backend: it gets a :class:`Device` from :func:`udrv.open` and uses
``config``, ``bar(i)``, ``set_bus_master()``, ``irq`` (:class:`~udrv.core.interrupts.Interrupts`),
``dma`` (:class:`~udrv.core.dma.Dma`) and ``reset()``. A backend is one module that
implements this class (``udrv.backends.vfio``, ``.uio``, ``.sysfs``), handing out its own
interrupts and DMA from :meth:`Device._open_interrupts` and :meth:`Device._open_dma`.

Layers (each imports only those before it): the kernel ABI (``udrv.kernel``), the mechanisms
(``udrv.irq.vector``, ``udrv.dma.buffer``...), this contract (``udrv.core``), the
implementations of its parts (``udrv.irq.vfio``, ``udrv.dma.vfio``...), the backends, then
``udrv.open`` and the drivers and frontends.
"""

from __future__ import annotations

import abc
import enum
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from udrv.errors import BackendError, DmaError, IrqError, RegionError, UdrvError

if TYPE_CHECKING:
    from udrv.core.dma import Dma
    from udrv.core.interrupts import Interrupts
    from udrv.core.region import Region

PCI_COMMAND = 0x04  # PCI Local Bus 3.0 §6.2.2
PCI_COMMAND_MASTER = 1 << 2  # Bus Master Enable


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
        self._irq: Interrupts | None = None
        self._dma: Dma | None = None
        self._set_master = False  # we set Bus Master Enable (close clears it again)

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
            except RegionError:
                continue  # not implemented; any other failure is the caller's to see
        return out

    # -- interrupts and DMA: the backend's implementations -------------------------------

    @property
    def irq(self) -> Interrupts:
        """The device's interrupts: ``dev.irq.enable("msi")``, ``dev.irq.available()``.

        Raises:
            IrqError: this backend has no interrupts (the message names the one that has).
            BackendError: the device is closed.
        """
        self._check_usable()
        if self._irq is None:
            self._irq = self._open_interrupts()
        return self._irq

    @property
    def dma(self) -> Dma:
        """The device's DMA: ``dev.dma.alloc(4096)``, ``dev.dma.map(buf)``.

        Raises:
            DmaError: this backend cannot do DMA (the message names the one that can).
            BackendError: the device is closed.
        """
        self._check_usable()
        if self._dma is None:
            self._dma = self._open_dma()
        return self._dma

    def _open_interrupts(self) -> Interrupts:
        """The backend's :class:`Interrupts` (called once, on first use of :attr:`irq`)."""
        raise IrqError(
            f"{self.address}: the {self.backend} backend has no interrupts; open it with "
            "backend='vfio' (or 'uio' for INTx only)"
        )

    def _open_dma(self) -> Dma:
        """The backend's :class:`Dma` (called once, on first use of :attr:`dma`)."""
        raise DmaError(
            f"{self.address}: the {self.backend} backend cannot do DMA; open it with backend='vfio'"
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise BackendError(f"{self.address} is closed; open it again with udrv.open()")

    def set_bus_master(self, enable: bool = True) -> None:
        """Set or clear Bus Master Enable (PCI command register bit 2; PCI 3.0 §6.2.2).

        A device can DMA, and so send MSI/MSI-X messages (which are memory writes), only
        with it set; like the kernel's pci_set_master(), a driver calls it when it starts
        and ``set_bus_master(False)`` when it stops. If it was set here, ``close()`` clears
        it.
        """
        cmd = self.config.read16(PCI_COMMAND)
        new = cmd | PCI_COMMAND_MASTER if enable else cmd & ~PCI_COMMAND_MASTER
        if new != cmd:
            self.config.write16(PCI_COMMAND, new)
            self._set_master = enable

    def reset(self) -> None:
        """Reset the device (function-level reset where the backend offers one).

        Raises:
            BackendError: this backend or device cannot reset.
        """
        raise BackendError(f"{self.address}: the {self.backend} backend cannot reset devices")

    @abc.abstractmethod
    def _close(self) -> None:
        """Release everything the backend holds (mappings, fds)."""

    def close(self) -> None:
        """Release the device, undoing what was enabled through it, in this order:
        interrupts (vectors disabled, handler threads stopped), Bus Master Enable (if set
        through :meth:`set_bus_master`: the device must stop DMA before its memory goes),
        DMA buffers and mappings, then the backend's regions and fds. Safe to call twice.

        Raises:
            UdrvError: a step failed (e.g. an interrupt handler thread had raised); the
                first failure, after every step has run.
        """
        if self._closed:
            return
        errors: list[UdrvError] = []
        steps = [
            self._irq.disable if self._irq is not None else None,
            (lambda: self.set_bus_master(False)) if self._set_master else None,
            self._dma.close if self._dma is not None else None,
        ]
        for step in steps:
            if step is None:
                continue
            try:
                step()
            except UdrvError as exc:
                errors.append(exc)
        self._closed = True
        self._close()
        if errors:
            raise errors[0]

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
