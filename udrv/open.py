"""``udrv.open()``: pick a PCI device and a backend, return a :class:`~udrv.core.device.Device`."""

from __future__ import annotations

import platform
from pathlib import Path

from udrv.core.barrier import VERIFIED_CPUS
from udrv.core.device import Device
from udrv.errors import BackendError, DeviceBusyError
from udrv.pci.address import vfio_user_path
from udrv.pci.sysfs import SYSFS_PCI, PciDeviceInfo, find

BACKENDS = ("auto", "vfio", "uio", "sysfs")
#: The driver a device must be bound to for each backend that needs one.
DRIVERS = {"vfio": "vfio-pci", "uio": "uio_pci_generic"}


def choose_backend(info: PciDeviceInfo, backend: str = "auto") -> str:
    """The backend ``open(..., backend)`` uses for this device.

    ``auto`` follows the driver binding: vfio-pci -> ``vfio``, uio_pci_generic -> ``uio``.

    Raises:
        BackendError: ``backend`` is not one of :data:`BACKENDS`.
        DeviceBusyError: ``auto``, and the device is bound to another driver or to none.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    for name, driver in DRIVERS.items():
        if info.driver == driver:
            return name
    addr = info.address
    if info.driver:
        raise DeviceBusyError(
            f"{addr} is bound to {info.driver}; run `udrv bind {addr}` to hand it to vfio-pci "
            "(or open it with backend='sysfs' to inspect it)"
        )
    raise DeviceBusyError(
        f"{addr} is not bound to vfio-pci or uio_pci_generic; run `udrv bind {addr}`"
    )


def check_cpu(address: str, backend: str, machine: str | None = None) -> None:
    """Refuse to drive a device (VFIO, UIO) on a CPU whose ordering udrv has not verified.

    A driver orders its descriptor writes before the doorbell with :mod:`udrv.core.barrier`;
    on x86-64 those are correct without fence instructions (the module says why), elsewhere
    (arm64, riscv64, ppc64le) they would need fences pure Python cannot emit, and a device
    could read a half-written descriptor. Inspection through sysfs needs no ordering.

    Raises:
        BackendError: not x86-64, and the backend drives the device.
    """
    cpu = (machine if machine is not None else platform.machine()).lower()
    if backend in ("vfio", "uio") and cpu not in VERIFIED_CPUS:
        raise BackendError(
            f"cannot drive {address} on {cpu}: udrv's memory barriers are verified on x86-64 "
            "only (a device could see descriptors before they are written); inspect it with "
            "backend='sysfs', or see docs/interrupts-and-dma.md, 'Barriers'"
        )


def open(
    selector: str,
    backend: str = "auto",
    *,
    writable: bool = False,
    dma_mask_bits: int | None = None,
    root: Path = SYSFS_PCI,
) -> Device:
    """Open a PCI device for a user-space driver.

    Args:
        selector: ``0000:00:04.0``, ``00:04.0`` or ``vendor:device`` such as ``1234:11e8``
            (which must match exactly one device), or ``vfio-user:PATH``: the device a
            vfio-user server (``udrv emulate``) serves on the socket PATH.
        backend: ``"vfio"`` (IOMMU-protected; the device bound to vfio-pci), ``"uio"``
            (uio_pci_generic, no IOMMU), ``"sysfs"`` (config and BARs only, for inspection,
            whatever the device is bound to), or ``"auto"``: vfio or uio after the driver
            the device is bound to.
        writable: sysfs backend only: allow writes to config space and BARs (off by default
            so that inspecting a device the host uses cannot change it).
        dma_mask_bits: the device's DMA address width (edu: 28), fixed for as long as it is
            open; same as ``dev.dma.set_mask(bits)`` before the first mapping. Default: 64,
            fixed by the first mapping.
        root: the sysfs PCI devices directory (tests use a fake tree).

    Returns:
        The :class:`~udrv.core.device.Device`; use it in a ``with`` block or ``close()`` it.

    Raises:
        AddressError: the selector cannot be parsed.
        DeviceNotFoundError: nothing matches, or a vendor:device id matches several devices
            (the message lists them).
        DeviceBusyError: bound to a kernel driver (or, with ``auto``, to none); the message
            says to run `udrv bind`.
        VfioError, UioError, BackendError: the backend cannot open it, or this CPU is not
            x86-64 (VFIO, UIO); the message names the fix.
        DmaError: ``dma_mask_bits`` out of range, or the backend cannot do DMA.
    """
    socket_path = vfio_user_path(selector)
    if socket_path is not None:
        if backend not in ("auto", "vfio-user"):
            raise BackendError(f"{selector} is reached through vfio-user, not {backend}")
        from udrv.backends.vfio_user import VfioUserDevice

        return VfioUserDevice(socket_path, dma_mask_bits=dma_mask_bits)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    info = find(selector, root)
    chosen = choose_backend(info, backend)
    check_cpu(info.address, chosen)
    dev: Device
    if chosen == "vfio":
        from udrv.backends.vfio import VfioDevice

        dev = VfioDevice(info)
    elif chosen == "uio":
        from udrv.backends.uio import UioDevice

        dev = UioDevice(info)
    else:
        from udrv.backends.sysfs import SysfsDevice

        dev = SysfsDevice(info, writable=writable)
    if dma_mask_bits is not None:
        try:
            dev.dma._set_mask(dma_mask_bits, f"udrv.open(dma_mask_bits={dma_mask_bits})")
        except BaseException:
            dev.close()
            raise
    return dev
