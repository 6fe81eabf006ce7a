"""``udrv.open()``: the seed's ``usr_pci_open(bus, slot, function)``, on today's kernels."""

from __future__ import annotations

from pathlib import Path

from udrv.core.device import Device
from udrv.errors import BackendError, DeviceBusyError
from udrv.pci.sysfs import SYSFS_PCI, find

BACKENDS = ("auto", "vfio", "uio", "sysfs")


def open(
    selector: str, backend: str = "auto", *, writable: bool = False, root: Path = SYSFS_PCI
) -> Device:
    """Open a PCI device for a user-space driver.

    Args:
        selector: ``0000:00:04.0``, ``00:04.0`` or ``vendor:device`` (exactly one match).
        backend: ``"vfio"`` (IOMMU-protected), ``"uio"`` (uio_pci_generic, no IOMMU),
            ``"sysfs"`` (config + BARs, for inspection), or ``"auto"``: whatever the device
            is bound to (vfio-pci or uio_pci_generic).
        writable: sysfs backend only: allow writes to config and BARs.

    Returns:
        A :class:`~udrv.core.device.Device`; use it in a ``with`` block.

    Raises:
        DeviceNotFoundError, AddressError: bad selector.
        DeviceBusyError: ``auto`` and the device is bound to neither vfio-pci nor
            uio_pci_generic; the message says to run `udrv bind`.
        VfioError, UioError, BackendError: the backend cannot open it (message names the fix).
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    info = find(selector, root)
    if backend == "auto":
        if info.driver == "vfio-pci":
            backend = "vfio"
        elif info.driver == "uio_pci_generic":
            backend = "uio"
        elif info.driver:
            raise DeviceBusyError(
                f"{info.address} is bound to {info.driver}; run `udrv bind {info.address}`"
            )
        else:
            raise DeviceBusyError(
                f"{info.address} is not bound to vfio-pci or uio_pci_generic; "
                f"run `udrv bind {info.address}`"
            )
    if backend == "vfio":
        from udrv.backends.vfio import VfioDevice

        return VfioDevice(info)
    if backend == "uio":
        from udrv.backends.uio import UioDevice

        return UioDevice(info)
    from udrv.backends.sysfs import SysfsDevice

    return SysfsDevice(info, writable=writable)
