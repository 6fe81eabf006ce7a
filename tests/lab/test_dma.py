"""DMA on edu through the IOMMU (VFIO) and with hugepages (UIO)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import udrv
from udrv.core.device import Device
from udrv.core.dma import Dma
from udrv.dma import Direction
from udrv.drivers.edu import regs as R
from udrv.errors import DmaError

pytestmark = pytest.mark.lab("edu")
Bind = Callable[[str, "str | None"], str]


def edu_dma(dev: Device) -> Dma:
    """What a driver does before DMA: bus mastering on, edu's 28-bit mask."""
    dev.set_bus_master()
    dev.dma.set_mask(R.DMA_MASK_BITS)
    return dev.dma


def xfer(bar, src: int, dst: int, n: int, to_ram: bool) -> None:  # type: ignore[no-untyped-def]
    bar.write64(R.DMA_SRC, src)
    bar.write64(R.DMA_DST, dst)
    bar.write64(R.DMA_COUNT, n)
    bar.write64(R.DMA_CMD, R.DMA_CMD_START | (R.DMA_CMD_TO_RAM if to_ram else 0))
    bar.poll(R.DMA_CMD, R.DMA_CMD_START, 0, timeout=5, width=8)


# Transfers never reach the device buffer's last byte: QEMU 7.2's edu aborts the VM on that.
@pytest.mark.parametrize(
    ("size", "offset"), [(1, 0), (100, 7), (4095, 0), (2047, 2048), (513, 1000)]
)
def test_consistent_round_trip(bound: Bind, size: int, offset: int) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        dma = edu_dma(dev)
        bar = dev.bar(0)
        data = os.urandom(size)
        with dma.alloc(3 * 4096) as buf:
            assert buf.iova % 4096 == 0 and buf.iova + len(buf) <= 1 << R.DMA_MASK_BITS
            buf.array[offset : offset + size] = memoryview(data)
            at = R.DMA_BUFFER + R.DMA_BUFFER_USABLE - size  # the data ends at the last usable byte
            xfer(bar, buf.iova + offset, at, size, False)
            xfer(bar, at, buf.iova + 8192, size, True)
            assert bytes(buf.array[8192 : 8192 + size]) == data


def test_streaming_and_sg_mappings(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        dma = edu_dma(dev)
        bar = dev.bar(0)
        src = bytes(os.urandom(3000))
        dst = bytearray(3000)
        with dma.map(src, Direction.TO_DEVICE) as ms, dma.map(dst, Direction.FROM_DEVICE) as md:
            xfer(bar, ms.iova, R.DMA_BUFFER, 3000, False)
            xfer(bar, R.DMA_BUFFER, md.iova, 3000, True)
        assert dst == src
        with pytest.raises(DmaError, match="read-only"):
            dma.map(src, Direction.FROM_DEVICE)
        # Scatter-gather: three pieces into the device buffer, back out into one.
        pieces = [bytearray(os.urandom(n)) for n in (1000, 2000, 1095)]
        with dma.map_sg(pieces, Direction.TO_DEVICE, max_segment=1024, boundary=4096) as sg:
            assert all(n <= 1024 and iova // 4096 == (iova + n - 1) // 4096 for iova, n in sg)
            at = 0
            for iova, n in sg:
                xfer(bar, iova, R.DMA_BUFFER + at, n, False)
                at += n
        out = bytearray(4095)
        with dma.map(out, Direction.FROM_DEVICE) as m:
            xfer(bar, R.DMA_BUFFER, m.iova, 4095, True)
        assert out == b"".join(pieces)


def test_unmap_then_reuse_iova(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        dma = edu_dma(dev)
        first = dma.alloc(4096)
        iova = first.iova
        first.close()
        again = dma.alloc(4096)
        assert again.iova == iova  # freed IOVA space is reused
        again.array[:4] = [1, 2, 3, 4]
        xfer(dev.bar(0), again.iova, R.DMA_BUFFER, 4, False)
        xfer(dev.bar(0), R.DMA_BUFFER, again.iova + 8, 4, True)
        assert list(again.array[8:12]) == [1, 2, 3, 4]
        again.close()


def test_iommu_contains_dma_to_unmapped_iova(bound: Bind) -> None:
    """A device DMA to an IOVA that is not mapped is blocked by the IOMMU."""
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        dma = edu_dma(dev)
        bar = dev.bar(0)
        with dma.alloc(4096) as buf:
            buf.array[:] = 0xAA
            xfer(bar, buf.iova, R.DMA_BUFFER, 4095, False)  # device buffer = 0xAA...
            guard = dma.alloc(4096)
            guard.array[:] = 0x55
            target = guard.iova
            guard.unmap()  # the memory stays ours, the device loses access
            dmesg_before = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
            xfer(bar, R.DMA_BUFFER, target, 4095, True)  # the device tries to write there
            assert bytes(guard.array) == b"\x55" * 4096  # untouched
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout[
                len(dmesg_before) :
            ]
            assert "DMAR" in dmesg and "fault" in dmesg.lower()  # the driver can see the fault
            guard.close()
            # The device still works after the fault.
            buf.array[:16] = 7
            xfer(bar, buf.iova, R.DMA_BUFFER, 16, False)
            xfer(bar, R.DMA_BUFFER, buf.iova + 2048, 16, True)
            assert bytes(buf.array[2048:2064]) == b"\x07" * 16


CYCLES = 1000


def test_open_close_cycles_leak_nothing(bound: Bind) -> None:
    """Open, enable MSI, map a buffer, touch BAR0, close: 1000 times, nothing left behind."""
    address = bound("edu", "vfio-pci")

    def resources() -> tuple[int, int, int]:
        maps = Path("/proc/self/maps").read_text()
        return len(os.listdir("/proc/self/fd")), maps.count("vfio"), maps.count("\n")

    with udrv.open(address) as dev:  # warm up: first-use allocations are not leaks
        edu_dma(dev).alloc(4096)
        dev.irq.enable("msi")
    before = resources()
    for i in range(CYCLES):
        with udrv.open(address) as dev:
            dma = edu_dma(dev)
            buf = dma.alloc(4096)  # left for close() to unmap
            dev.irq.enable("msi")
            assert dev.bar(0).read32(R.IDENT) & 0xFF == 0xED
            if i == CYCLES - 1:
                buf.array[:4] = [9, 8, 7, 6]
                xfer(dev.bar(0), buf.iova, R.DMA_BUFFER, 4, False)  # still works at the end
                xfer(dev.bar(0), R.DMA_BUFFER, buf.iova + 8, 4, True)
                assert list(buf.array[8:12]) == [9, 8, 7, 6]
    after = resources()
    assert after[:2] == before[:2]  # fds, VFIO BAR mappings
    assert after[2] <= before[2] + 2  # memory mappings (the allocator may keep an arena)


def test_uio_hugepage_dma(bound: Bind) -> None:
    from udrv.dma.hugepage import reserve_hugepages

    address = bound("edu", "uio_pci_generic")
    reserve_hugepages(0)
    with udrv.open(address) as dev:
        dma = edu_dma(dev)
        with pytest.raises(DmaError, match=r"run `udrv hugepages 64`"):
            dma.alloc(4096)
        assert reserve_hugepages(4) == 4
        with dma.alloc(4096) as buf:
            buf.array[:64] = range(64)
            xfer(dev.bar(0), buf.iova, R.DMA_BUFFER, 64, False)
            xfer(dev.bar(0), R.DMA_BUFFER, buf.iova + 1024, 64, True)
            assert list(buf.array[1024:1088]) == list(range(64))


def test_uio_streaming_sg_pins_ordinary_memory(bound: Bind) -> None:
    """Under UIO, map_sg() of ordinary (not hugepage) memory pins every page (VmLck grows by
    the pages spanned, and shrinks back on unmap) and reports, in order, the physical
    address the kernel's pagemap gives for each byte. (No device transfer here: edu clamps
    addresses to 28 bits, and ordinary memory of this guest lies above that.)"""
    import numpy as np

    from udrv.dma.hugepage import virt_to_phys

    def vmlck_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1])
        raise AssertionError("no VmLck in /proc/self/status")

    address = bound("edu", "uio_pci_generic")
    with udrv.open(address) as dev:
        dev.set_bus_master()
        buf = bytearray(3 * 4096 + 100)
        start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        pages = (start + len(buf) - 1) // 4096 - start // 4096 + 1
        before = vmlck_kb()
        sg = dev.dma.map_sg([buf], Direction.FROM_DEVICE, max_segment=1 << 20, boundary=1 << 40)
        assert vmlck_kb() == before + 4 * pages
        offset = 0
        for phys, n in sg:
            assert phys == virt_to_phys(start + offset)
            assert phys + n - 1 == virt_to_phys(start + offset + n - 1)
            offset += n
        assert offset == len(buf)
        sg.unmap()
        assert vmlck_kb() == before
