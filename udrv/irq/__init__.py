"""Interrupts in user space: INTx, MSI and MSI-X over VFIO, INTx over UIO.

vec = udrv.irq.enable(dev, "msi")[0]
dev.bar(0).write32(0x60, 1)          # edu: raise
vec.wait(timeout=1.0)                # or select on vec.fileno(), or await vec.wait_async()
dev.bar(0).write32(0x64, 1)          # acknowledge on the device
vec.rearm()                          # INTx: let it fire again (no-op for MSI)
"""

from __future__ import annotations

from udrv.core.device import Device
from udrv.errors import IrqError
from udrv.irq.vector import Vector

__all__ = ["Vector", "available", "enable"]


def available(dev: Device) -> dict[str, int]:
    """Interrupt kinds and vector counts the device offers through its backend."""
    if dev.backend == "vfio":
        from udrv.backends.vfio import VfioDevice
        from udrv.irq import vfio

        assert isinstance(dev, VfioDevice)
        return vfio.counts(dev)
    if dev.backend == "uio":
        return {"intx": 1 if dev.config.read8(0x3D) else 0, "msi": 0, "msix": 0}
    return {"intx": 0, "msi": 0, "msix": 0}


def enable(dev: Device, kind: str = "msi", count: int = 1) -> list[Vector]:
    """Enable ``count`` vectors of ``kind`` ("intx", "msi", "msix"); disabled on dev.close().

    MSI and MSI-X also set Bus Master Enable: without it the device cannot send them.

    Raises:
        IrqError: the backend or device does not offer that (message names what it offers).
    """
    if dev.backend == "vfio":
        from udrv.backends.vfio import VfioDevice
        from udrv.irq.vfio import VfioIrqs

        assert isinstance(dev, VfioDevice)
        vectors = VfioIrqs(dev, kind, count).vectors
        if kind in ("msi", "msix"):
            dev.set_bus_master()  # an MSI is a memory write by the device
        return vectors
    if dev.backend == "uio":
        from udrv.backends.uio import UioDevice
        from udrv.irq.uio import UioIrqs

        if kind != "intx" or count != 1:
            raise IrqError(f"{dev.address}: UIO offers one INTx vector only, not {count} {kind}")
        assert isinstance(dev, UioDevice)
        return UioIrqs(dev).vectors
    raise IrqError(f"{dev.address}: the {dev.backend} backend has no interrupts; use vfio or uio")
