"""The VFIO DMA layer against a fake IOMMU that really translates: a simulated device reads
and writes process memory through the IOVAs udrv hands out, so a wrong offset shows."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

import numpy as np
import pytest

import udrv.dma
from udrv.backends.vfio import IommuInfo
from udrv.dma import Direction
from udrv.dma.vfio import VfioDma
from udrv.errors import DmaError, VfioError

X86 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]


class FakeContainer:
    def __init__(self, avail: int | None = 65535) -> None:
        self.fd = 3
        self.maps: dict[int, tuple[int, int, bool, bool]] = {}  # iova -> vaddr, size, r, w
        self.avail = avail
        self.fail: int | None = None

    def refresh_info(self) -> IommuInfo:
        return IommuInfo(pgsizes=0x40201000, iova_ranges=X86, dma_avail=self.avail)

    def map_dma(self, vaddr: int, iova: int, size: int, *, readable: bool, writable: bool) -> None:
        assert vaddr % 4096 == 0 and iova % 4096 == 0 and size % 4096 == 0  # type1 rule
        if self.fail:
            raise VfioError("ioctl VFIO_IOMMU_MAP_DMA failed", errno=self.fail)
        for other, (_, n, _, _) in self.maps.items():
            assert iova + size <= other or other + n <= iova, "overlapping IOVA"
        self.maps[iova] = (vaddr, size, readable, writable)

    def unmap_dma(self, iova: int, size: int) -> None:
        assert self.maps.pop(iova)[1] == size

    def translate(self, iova: int, n: int, write: bool) -> int:
        for base, (vaddr, size, r, w) in self.maps.items():
            if base <= iova and iova + n <= base + size:
                if not (w if write else r):
                    raise PermissionError(
                        f"IOMMU: {iova:#x} not {'writable' if write else 'readable'}"
                    )
                return vaddr + iova - base
        raise PermissionError(f"IOMMU: DMAR fault at {iova:#x}")

    # The simulated device.
    def dma_read(self, iova: int, n: int) -> bytes:
        return ctypes.string_at(self.translate(iova, n, False), n)

    def dma_write(self, iova: int, data: bytes) -> None:
        ctypes.memmove(self.translate(iova, len(data), True), data, len(data))


class FakeVfioDevice:
    backend, address = "vfio", "0000:00:04.0"

    def __init__(self, container: FakeContainer) -> None:
        self.container = container
        self.hooks: list[Callable[[], None]] = []
        self.bus_master = False

    def on_close(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)

    def set_bus_master(self, enable: bool = True) -> None:
        self.bus_master = enable

    def close(self) -> None:
        while self.hooks:
            self.hooks.pop()()


@pytest.fixture
def iommu() -> FakeContainer:
    return FakeContainer()


@pytest.fixture
def dma(iommu: FakeContainer) -> VfioDma:
    return VfioDma(FakeVfioDevice(iommu), mask_bits=28)  # type: ignore[arg-type]


def test_for_device_sets_bus_master(monkeypatch: pytest.MonkeyPatch, iommu: FakeContainer) -> None:
    import udrv.backends.vfio as bv

    dev = FakeVfioDevice(iommu)
    monkeypatch.setattr(bv, "VfioDevice", FakeVfioDevice)
    d = udrv.dma.for_device(dev, mask_bits=28)  # type: ignore[arg-type]
    assert isinstance(d, VfioDma) and dev.bus_master
    # One allocator per device, or two callers would get the same IOVAs.
    assert udrv.dma.for_device(dev, mask_bits=28) is d  # type: ignore[arg-type]
    with pytest.raises(DmaError, match="already set up with a 28-bit mask"):
        udrv.dma.for_device(dev, mask_bits=64)  # type: ignore[arg-type]


def test_alloc_is_an_array_the_device_sees(dma: VfioDma, iommu: FakeContainer) -> None:
    with dma.alloc(10000) as buf:
        assert len(buf) == 10000 and buf.iova % 4096 == 0
        assert buf.iova >= 0x100000 and buf.iova + 12288 <= 1 << 28  # mask and no page 0
        assert not buf.array.any()  # zeroed
        buf.array[:4] = [1, 2, 3, 4]
        assert iommu.dma_read(buf.iova, 4) == b"\x01\x02\x03\x04"
        iommu.dma_write(buf.iova + 9999, b"\x7f")
        assert buf[9999] == 0x7F
        ring = buf.view(np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u4")]))
        ring[0]["len"] = 0xABCD  # a structured view writes the same memory (zero-copy)
        assert iommu.dma_read(buf.iova + 8, 4) == (0xABCD).to_bytes(4, "little")
        mv = buf.memoryview()
        mv[100] = 9
        assert iommu.dma_read(buf.iova + 100, 1) == b"\x09"
        buf[200:203] = b"abc"
        assert buf[200:203] == b"abc"
        iova = buf.iova
    assert iova not in iommu.maps  # unmapped on close
    with pytest.raises(PermissionError, match="DMAR fault"):
        iommu.dma_read(iova, 1)
    buf.close()  # twice is fine


def test_close_with_live_numpy_views(dma: VfioDma, iommu: FakeContainer) -> None:
    buf = dma.alloc(4096)
    keep = buf.array[10:20]
    buf.close()  # must not raise although a view is exported
    assert not iommu.maps
    keep[0] = 1  # the memory is still valid for the view's owner


def test_streaming_map_of_unaligned_memory(dma: VfioDma, iommu: FakeContainer) -> None:
    backing = bytearray(3 * 4096)
    arr = np.frombuffer(backing, dtype=np.uint8)
    view = arr[1000 : 1000 + 5000]  # starts mid-page, spans pages
    with dma.map(view, Direction.FROM_DEVICE) as m:
        assert m.length == 5000 and m.iova % 4096 == (arr.ctypes.data + 1000) % 4096
        iommu.dma_write(m.iova, b"X" * 5000)
        with pytest.raises(PermissionError, match="not readable"):
            iommu.dma_read(m.iova, 1)  # FROM_DEVICE: the device may only write
    assert backing[1000:6000] == b"X" * 5000 and backing[999] == 0 and backing[6000] == 0
    assert not iommu.maps
    with pytest.raises(DmaError, match="read-only"):
        dma.map(b"immutable", Direction.FROM_DEVICE)
    with pytest.raises(DmaError, match="empty"):
        dma.map(bytearray())


def test_map_sg_segments_reach_the_right_bytes(dma: VfioDma, iommu: FakeContainer) -> None:
    pieces = [bytearray(os.urandom(n)) for n in (1000, 5000, 300)]
    with dma.map_sg(pieces, Direction.TO_DEVICE, max_segment=2048, boundary=4096) as sg:
        segs = list(sg)
        assert all(n <= 2048 and iova // 4096 == (iova + n - 1) // 4096 for iova, n in segs)
        got = b"".join(iommu.dma_read(iova, n) for iova, n in segs)
    assert got == b"".join(pieces)
    assert not iommu.maps


def test_unmap_then_reuse(dma: VfioDma) -> None:
    a = dma.alloc(4096)
    iova = a.iova
    a.close()
    b = dma.alloc(4096)
    assert b.iova == iova
    b.close()


def test_dma_avail_limit(iommu: FakeContainer) -> None:
    iommu.avail = 2
    dma = VfioDma(FakeVfioDevice(iommu), mask_bits=28)  # type: ignore[arg-type]
    a, b = dma.alloc(1), dma.alloc(1)
    with pytest.raises(DmaError, match="allows 2 DMA mappings"):
        dma.alloc(1)
    a.close()
    dma.alloc(1).close()
    b.close()


def test_memlock_failure_names_the_fix(dma: VfioDma, iommu: FakeContainer) -> None:
    iommu.fail = errno.ENOMEM
    with pytest.raises(DmaError, match="ulimit -l") as info:
        dma.alloc(4096)
    assert info.value.errno == errno.ENOMEM
    iommu.fail = None
    assert dma.alloc(4096).iova == 0x100000  # the failed attempt gave its IOVA back


def test_iova_exhaustion_below_the_mask(iommu: FakeContainer) -> None:
    dma = VfioDma(FakeVfioDevice(iommu), mask_bits=21)  # type: ignore[arg-type]  # 1 MiB usable
    big = dma.alloc(1 << 20)
    with pytest.raises(DmaError, match=r"exhausted.*21-bit"):
        dma.alloc(4096)
    big.close()


def test_device_close_unmaps_everything(iommu: FakeContainer) -> None:
    dev = FakeVfioDevice(iommu)
    dma = VfioDma(dev, mask_bits=28)  # type: ignore[arg-type]
    dma.alloc(4096)
    dma.map(bytearray(10))
    assert len(iommu.maps) == 2
    dev.close()
    assert not iommu.maps
