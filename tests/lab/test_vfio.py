"""udrv.open over VFIO on real kernels and QEMU devices: edu, e1000e, and refusals.

The devices (BACKEND_DEVICES: one guest serves the backend and CLI tests):
edu at 00:04.0, e1000e at 00:05.0, and a two-function slot 00:10 (rtl8139 on function 0,
e1000 on function 1) whose functions share an IOMMU group, to build an unviable group.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udrv
from udrv.backends.vfio import VfioDevice
from udrv.core.device import RegionKind
from udrv.core.region import MmioRegion
from udrv.errors import DeviceBusyError, DeviceNotFoundError, RegionError, VfioError
from udrv.lab.pytest_plugin import bind

from .conftest import BACKEND_DEVICES, E1000, RTL8139

pytestmark = pytest.mark.lab(*BACKEND_DEVICES)
Bind = Callable[[str, "str | None"], str]

EDU_IDENT = 0x010000ED  # edu.txt: 0x00 identification, 0xRRrr00edh
EDU_INVERT = 0x04  # edu.txt: 0x04 card liveness check, reads back ~value
EDU_DMA_SRC = 0x80  # edu.txt: 0x80 DMA source address, 64-bit
E1000_STATUS = 0x0008  # 82574L 10.2.2.2 Device Status
E1000_RDBAL0 = 0x2800  # 82574L 10.2.5.1 Receive Descriptor Base Address Low


def open_vfio(selector: str) -> VfioDevice:
    dev = udrv.open(selector)
    assert isinstance(dev, VfioDevice)
    return dev


@pytest.fixture
def driver() -> Iterator[Callable[[str], None]]:
    """``driver("e1000")``: modprobe a kernel driver; it is removed again afterwards."""
    loaded: list[str] = []

    def load(name: str) -> None:
        subprocess.run(["modprobe", name], check=True)
        loaded.append(name)

    yield load
    for name in loaded:
        subprocess.run(["rmmod", name], check=False)


def test_edu_over_vfio(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    # Every selector form, and each open after a close (a second open must work).
    for selector in (address, address[5:], "1234:11e8"):
        with open_vfio(selector) as dev:
            assert dev.address == address and dev.backend == "vfio"
            assert (dev.config.read16(0), dev.config.read16(2)) == (0x1234, 0x11E8)
            bar = dev.bar(0)
            assert isinstance(bar, MmioRegion) and bar is dev.bar(0) and bar.size == 1 << 20
            assert bar.read32(0) == EDU_IDENT
    dev = open_vfio(address)
    with dev:
        bar = dev.bar(0)
        for v in (0, 0x12345678, 0xFFFFFFFF):
            bar.write32(EDU_INVERT, v)
            assert bar.read32(EDU_INVERT) == ~v & 0xFFFFFFFF
        bar.write64(EDU_DMA_SRC, 0x1122334455667788)
        assert bar.read64(EDU_DMA_SRC) == 0x1122334455667788
        info = dev.iommu_info
        assert info.pgsizes & 0x1000 and info.iova_ranges and info.dma_avail
        # Errors: range, alignment, value, BAR index, unimplemented BAR, no reset on edu.
        with pytest.raises(RegionError, match=r"4-byte read at 0x100000 is outside the 1 MiB"):
            bar.read32(0x100000)
        with pytest.raises(RegionError, match="not 4-byte aligned"):
            bar.read32(2)
        with pytest.raises(RegionError, match="does not fit in 32 bits"):
            bar.write32(EDU_INVERT, 1 << 32)
        with pytest.raises(RegionError, match="BAR index 6 out of range"):
            dev.bar(6)
        with pytest.raises(RegionError, match="does not implement BAR1"):
            dev.bar(1)
        with pytest.raises(VfioError, match="cannot be reset through VFIO"):
            dev.reset()
        # The device is open: a second open in this process is refused with the reason.
        with pytest.raises(VfioError, match=r"already open in this process.*\[EBUSY\]"):
            udrv.open(address)
    with pytest.raises(RegionError, match="closed"):
        bar.read32(0)
    # The lab kernel has no IOMMUFD: only the container/group path exists (see backends.vfio).
    assert not Path("/dev/iommu").exists()


def test_e1000e_msix_bar_and_io_bar(bound: Bind) -> None:
    dev = open_vfio(bound("e1000e", "vfio-pci"))
    with dev:
        bars = {b.index: b for b in dev.bars}
        assert sorted(bars) == [0, 1, 2, 3]
        assert bars[2].kind is RegionKind.IO and bars[2].size == 32 and not bars[2].mappable
        # BAR3 holds the MSI-X table (offset 0) and PBA. Linux >= 4.16 reports the table as
        # mappable (VFIO_REGION_INFO_CAP_MSIX_MAPPABLE) instead of a sparse-mmap hole.
        msix = dev.vfio_region_info(3)
        assert msix.msix_mappable and msix.sparse_areas is None and msix.mmap
        assert isinstance(dev.bar(3), MmioRegion)
        mmio, io = dev.bar(0), dev.bar(2)
        # 82574L 10.1.2 / 8254x 13.2.2: IOADDR (I/O offset 0) selects a register, IODATA (4)
        # reads or writes it. Through VFIO these are preads/pwrites on the device fd.
        io.write32(0, E1000_STATUS)
        assert io.read32(0) == E1000_STATUS
        assert io.read32(4) == mmio.read32(E1000_STATUS)
        io.write32(0, E1000_RDBAL0)
        io.write32(4, 0x12345000)
        assert mmio.read32(E1000_RDBAL0) == 0x12345000
        with pytest.raises(RegionError, match="8-byte read at 0x0 refused: an I/O-port BAR"):
            io.read64(0)
        with pytest.raises(RegionError, match="outside the 32 bytes region"):
            io.read32(32)
        dev.reset()  # e1000e has a PM reset; the device answers both ways afterwards
        io.write32(0, E1000_STATUS)
        assert io.read32(4) == mmio.read32(E1000_STATUS)


def test_kernel_bound_device_and_unviable_group(driver: Callable[[str], None]) -> None:
    same_group = os.readlink(f"/sys/bus/pci/devices/{RTL8139}/iommu_group") == os.readlink(
        f"/sys/bus/pci/devices/{E1000}/iommu_group"
    )
    with pytest.raises(DeviceNotFoundError, match=r"no PCI device 0000:00:1e\.0 .*`udrv list`"):
        udrv.open("0000:00:1e.0")
    driver("e1000")
    with pytest.raises(
        DeviceBusyError, match=rf"^{E1000} is bound to e1000; run `udrv bind {E1000}`"
    ):
        udrv.open(E1000)
    with pytest.raises(
        DeviceBusyError, match=rf"{E1000} is bound to e1000, not vfio-pci; run `udrv bind {E1000}`"
    ):
        udrv.open(E1000, backend="vfio")
    if not same_group:
        pytest.skip("the functions of slot 00:10 got separate IOMMU groups in this guest")
    bind(RTL8139, "vfio-pci")
    try:
        with pytest.raises(
            VfioError,
            match=rf"is not viable: {E1000} \(bound to e1000\) .* run `udrv bind {RTL8139}`",
        ):
            udrv.open(RTL8139)
    finally:
        bind(RTL8139, None)
