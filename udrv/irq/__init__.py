"""Interrupts in user space: INTx, MSI and MSI-X over VFIO, INTx over UIO.

    irqs = udrv.irq.for_device(dev)      # picks VFIO or UIO by dev.backend
    irqs.available()                     # {"intx": 1, "msi": 1, "msix": 0}
    vec = irqs.enable("msi")[0]
    dev.bar(0).write32(0x60, 1)          # edu: raise
    vec.wait(timeout=1.0)                # or select on vec.fileno(), or await vec.wait_async()
    dev.bar(0).write32(0x64, 1)          # acknowledge on the device
    vec.rearm()                          # INTx: let it fire again (no-op for MSI)
    irqs.disable()                       # also done by dev.close()

``udrv.irq.enable(dev, kind, count)`` and ``udrv.irq.available(dev)`` are shortcuts.
"""

from __future__ import annotations

from typing import Any

from udrv.core.device import Device
from udrv.errors import IrqError
from udrv.irq.vector import Vector

__all__ = ["Interrupts", "Vector", "available", "enable", "for_device"]

KIND_NAMES = ("intx", "msi", "msix")


class Interrupts:
    """The interrupts of one device, whatever backend opened it.

    One kind is enabled at a time (a PCI function uses INTx, MSI or MSI-X, never two).
    """

    def __init__(self, dev: Device) -> None:
        if dev.backend not in ("vfio", "uio"):
            raise IrqError(
                f"{dev.address}: the {dev.backend} backend has no interrupts; open it with "
                "backend='vfio' (or 'uio')"
            )
        self.dev = dev
        self._active: Any = None  # VfioIrqs | UioIrqs

    def available(self) -> dict[str, int]:
        """Interrupt kinds and vector counts the device offers through its backend."""
        if self.dev.backend == "vfio":
            from udrv.irq import vfio

            return vfio.counts(self.dev)  # type: ignore[arg-type]
        return {"intx": 1 if self.dev.config.read8(0x3D) else 0, "msi": 0, "msix": 0}

    @property
    def enabled(self) -> str | None:
        """The kind enabled now, or None."""
        if self._active is not None and self._active.enabled:
            return "intx" if self.dev.backend == "uio" else str(self._active.kind)
        return None

    @property
    def vectors(self) -> list[Vector]:
        """The enabled vectors (empty when disabled)."""
        return list(self._active.vectors) if self.enabled else []

    def enable(self, kind: str = "msi", count: int = 1) -> list[Vector]:
        """Enable ``count`` vectors of ``kind`` ("intx", "msi", "msix").

        MSI and MSI-X also set Bus Master Enable: an MSI is a memory write by the device.
        Vectors are disabled on :meth:`disable` or when the device closes.

        Raises:
            IrqError: the backend or device does not offer that (the message says what it
                offers), or another kind is enabled.
        """
        if kind not in KIND_NAMES:
            raise IrqError(f"unknown interrupt kind {kind!r}; use one of {', '.join(KIND_NAMES)}")
        if self.enabled:
            raise IrqError(
                f"{self.dev.address}: {self.enabled.upper()} is enabled; disable() it before "
                f"enabling {kind.upper()}"
            )
        if self.dev.backend == "vfio":
            from udrv.irq.vfio import VfioIrqs

            self._active = VfioIrqs(self.dev, kind, count)  # type: ignore[arg-type]
            if kind in ("msi", "msix"):
                self.dev.set_bus_master()
        else:
            from udrv.irq.uio import UioIrqs

            if kind != "intx" or count != 1:
                raise IrqError(
                    f"{self.dev.address}: UIO offers one INTx vector only, not {count} "
                    f"{kind.upper()}; use backend='vfio' for MSI/MSI-X"
                )
            self._active = UioIrqs(self.dev)  # type: ignore[arg-type]
        return list(self._active.vectors)

    def disable(self) -> None:
        """Disable the enabled vectors and restore the device's interrupt state."""
        if self._active is not None:
            active, self._active = self._active, None
            active.disable()


def for_device(dev: Device) -> Interrupts:
    """The interrupt API of ``dev`` (VFIO or UIO, chosen by ``dev.backend``).

    The same object is returned for the same device.

    Raises:
        IrqError: the backend (sysfs) has no interrupts.
    """
    irqs = getattr(dev, "_udrv_irqs", None)
    if irqs is None:
        irqs = Interrupts(dev)
        dev._udrv_irqs = irqs  # type: ignore[attr-defined]
    return irqs


def available(dev: Device) -> dict[str, int]:
    """Interrupt kinds and vector counts ``dev`` offers; see :meth:`Interrupts.available`."""
    if dev.backend not in ("vfio", "uio"):
        return {"intx": 0, "msi": 0, "msix": 0}
    return for_device(dev).available()


def enable(dev: Device, kind: str = "msi", count: int = 1) -> list[Vector]:
    """Enable ``count`` vectors of ``kind``; see :meth:`Interrupts.enable`."""
    return for_device(dev).enable(kind, count)
