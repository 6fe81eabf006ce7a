"""udrv.open over UIO (uio_pci_generic) in the lab: edu's registers, /dev/uioN, refusals."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import udrv
from udrv.backends.uio import UioDevice
from udrv.core.region import MmioRegion
from udrv.errors import BackendError, DeviceBusyError

from .conftest import BACKEND_DEVICES

# The same devices as test_vfio.py, so that one guest runs all the backend tests.
pytestmark = pytest.mark.lab(*BACKEND_DEVICES)
Bind = Callable[[str, "str | None"], str]


def test_edu_over_uio(bound: Bind) -> None:
    address = bound("edu", "uio_pci_generic")
    with udrv.open(address) as dev:
        assert isinstance(dev, UioDevice) and dev.backend == "uio"
        assert dev.uio_name.startswith("uio") and os.path.exists(f"/dev/{dev.uio_name}")
        os.fstat(dev.uio_fd)
        assert (dev.config.read16(0), dev.config.read16(2)) == (0x1234, 0x11E8)
        bar = dev.bar(0)
        assert isinstance(bar, MmioRegion) and bar.size == 1 << 20
        assert bar.read32(0) == 0x010000ED
        for v in (0x0, 0xA5A5A5A5):
            bar.write32(0x04, v)
            assert bar.read32(0x04) == ~v & 0xFFFFFFFF
        bar.write64(0x80, 0x0102030405060708)
        assert bar.read64(0x80) == 0x0102030405060708
        with pytest.raises(
            BackendError, match=r"knows no reset method for it \(.*/reset is missing\)"
        ):
            dev.reset()
        uio_fd = dev.uio_fd
    with pytest.raises(OSError):
        os.fstat(uio_fd)
    with pytest.raises(
        DeviceBusyError, match=rf"{address} is bound to uio_pci_generic, not vfio-pci"
    ):
        udrv.open(address, backend="vfio")


def test_dma_refused_when_the_iommu_translates(bound: Bind) -> None:
    """Issue 15 item 3: with the edu's IOMMU group switched to a translating domain (as
    with intel_iommu=on without iommu=pt), UIO DMA with physical addresses would fault; the
    DMA layer says so and what to do. The group type can change only while no driver is
    bound (Documentation/ABI/testing/sysfs-kernel-iommu_groups)."""
    from pathlib import Path

    from udrv.errors import DmaError

    from .conftest import bind

    address = bound("edu", None)
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/iommu_group"))
    kind = Path(f"/sys/kernel/iommu_groups/{group}/type")
    assert kind.read_text().strip() == "identity"  # the lab boots with iommu=pt
    kind.write_text("DMA")
    try:
        bind(address, "uio_pci_generic")
        with udrv.open(address) as dev:
            with pytest.raises(
                DmaError, match=rf"IOMMU group {group} translates them .*'DMA'.*iommu=pt"
            ):
                dev.dma.alloc(4096)
            assert dev.bar(0).read32(0) == 0x010000ED  # the device itself still works
    finally:
        bind(address, None)
        kind.write_text("identity")
