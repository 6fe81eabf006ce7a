"""udrv.open on real devices: VFIO, UIO and sysfs backends, regions, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import udrv
from udrv.core.device import RegionKind
from udrv.errors import DeviceBusyError, DeviceNotFoundError, RegionError, VfioError

pytestmark = pytest.mark.lab("edu", "e1000e")
Bind = Callable[[str, "str | None"], str]

EDU_IDENT = 0x010000ED


@pytest.mark.parametrize("driver", ["vfio-pci", "uio_pci_generic"])
def test_edu_registers_through_each_backend(bound: Bind, driver: str) -> None:
    address = bound("edu", driver)
    with udrv.open(address) as dev:
        assert dev.backend == {"vfio-pci": "vfio", "uio_pci_generic": "uio"}[driver]
        assert (dev.config.read16(0), dev.config.read16(2)) == (0x1234, 0x11E8)
        bar = dev.bar(0)
        assert bar is dev.bar(0)  # one mapping per BAR
        assert bar.size == 1 << 20
        assert bar.read32(0) == EDU_IDENT
        for v in (0, 0x12345678, 0xFFFFFFFF):
            bar.write32(4, v)
            assert bar.read32(4) == ~v & 0xFFFFFFFF
        bar.write64(0x80, 0x1122334455667788)  # DMA source: a 64-bit register
        assert bar.read64(0x80) == 0x1122334455667788
    assert dev.closed


def test_sysfs_backend_reads_without_binding(lab_devices: dict[str, str]) -> None:
    with udrv.open(lab_devices["edu"], backend="sysfs") as dev:
        assert dev.bar(0).read32(0) == EDU_IDENT
        with pytest.raises(RegionError, match="read-only"):
            dev.bar(0).write32(4, 1)


def test_selector_forms(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    for sel in (address, address[5:], "1234:11e8"):
        with udrv.open(sel) as dev:
            assert dev.address == address


def test_bad_accesses_have_clear_errors(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        bar = dev.bar(0)
        with pytest.raises(
            RegionError, match=r"BAR0 of 0000:00:04.0: 4-byte read at 0x100000 is outside the 1 MiB"
        ):
            bar.read32(0x100000)
        with pytest.raises(RegionError, match="not 4-byte aligned"):
            bar.read32(2)
        with pytest.raises(RegionError, match="does not fit in 32 bits"):
            bar.write32(4, 1 << 32)
        with pytest.raises(RegionError, match="BAR index 6 out of range"):
            dev.bar(6)
        with pytest.raises(RegionError, match="does not implement BAR1"):
            dev.bar(1)


def test_open_errors_name_the_fix(lab_devices: dict[str, str], bound: Bind) -> None:
    with pytest.raises(DeviceNotFoundError, match=r"no PCI device 0000:00:1e.0 .* `udrv list`"):
        udrv.open("0000:00:1e.0")
    with pytest.raises(
        DeviceBusyError,
        match=r"not bound to vfio-pci or uio_pci_generic; run `udrv bind 0000:00:04.0`",
    ):
        udrv.open(lab_devices["edu"])
    with pytest.raises(VfioError, match=r"not bound to vfio-pci .* run `udrv bind 0000:00:04.0`"):
        udrv.open(lab_devices["edu"], backend="vfio")
    address = bound("edu", "vfio-pci")
    with udrv.open(address), pytest.raises(VfioError, match="already open"):
        udrv.open(address)


def test_kernel_driver_binding_is_reported(lab_devices: dict[str, str]) -> None:
    import subprocess

    subprocess.run(["modprobe", "e1000e"], check=True)
    try:
        with pytest.raises(
            DeviceBusyError, match=r"0000:00:05.0 is bound to e1000e; run `udrv bind 0000:00:05.0`"
        ):
            udrv.open(lab_devices["e1000e"])
    finally:
        subprocess.run(["rmmod", "e1000e"], check=True)


def test_e1000e_msix_bar_is_sparse_and_io_bar_works(bound: Bind) -> None:
    with udrv.open(bound("e1000e", "vfio-pci")) as dev:
        bars = {b.index: b for b in dev.bars}
        assert bars[2].kind is RegionKind.IO and bars[2].size == 32
        # BAR3 holds the MSI-X table and PBA: VFIO carves the table out of the mmap.
        assert bars[3].mmap_areas != ((0, bars[3].size),)
        mmio = dev.bar(0)
        io = dev.bar(2)
        # 82574L datasheet 10.1.2: IOADDR (I/O offset 0) selects a register, IODATA (4) reads it.
        io.write32(0, 0x0008)  # STATUS
        assert io.read32(4) == mmio.read32(0x0008)
        with pytest.raises(RegionError):
            io.read32(32)
