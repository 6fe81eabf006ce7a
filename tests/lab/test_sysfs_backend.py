"""The sysfs backend in the lab: inspection of a device whatever it is bound to."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import udrv
from udrv.backends import PortRegion
from udrv.errors import RegionError

from .conftest import BACKEND_DEVICES

# The same devices as test_vfio.py, so that one guest runs all the backend tests.
pytestmark = pytest.mark.lab(*BACKEND_DEVICES)
Bind = Callable[[str, "str | None"], str]


def test_sysfs_reads_and_refuses_writes(lab_devices: dict[str, str]) -> None:
    with udrv.open(lab_devices["edu"], backend="sysfs") as dev:
        assert dev.backend == "sysfs"
        assert dev.bar(0).read32(0) == 0x010000ED
        with pytest.raises(RegionError, match="is read-only"):
            dev.bar(0).write32(4, 1)
        with pytest.raises(RegionError, match="is read-only"):
            dev.config.write16(4, 0)
    with udrv.open(lab_devices["edu"], backend="sysfs", writable=True) as dev:
        dev.bar(0).write32(4, 0x0F0F0F0F)
        assert dev.bar(0).read32(4) == 0xF0F0F0F0


def test_sysfs_io_bar_of_a_vfio_bound_device(bound: Bind) -> None:
    address = bound("e1000e", "vfio-pci")  # sysfs works whatever the binding
    with udrv.open(address, backend="sysfs", writable=True) as dev:
        io, mmio = dev.bar(2), dev.bar(0)
        assert isinstance(io, PortRegion) and io.size == 32
        # 82574L 10.1.2: IOADDR at I/O offset 0 selects STATUS (0x8), IODATA at 4 reads it;
        # here through sysfs resource2 (outl/inl in the kernel) and the resource0 mmap.
        io.write32(0, 0x8)
        assert io.read32(0) == 0x8
        assert io.read32(4) == mmio.read32(0x8)
        assert dev.config.read16(0) == 0x8086
