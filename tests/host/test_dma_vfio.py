"""The VFIO DMA layer against a fake IOMMU that really translates: a simulated device reads
and writes process memory through the IOVAs udrv hands out, so a wrong offset shows."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os

import numpy as np
import pytest

from udrv.core.device import Device, RegionInfo
from udrv.core.dma import Dma
from udrv.core.region import RecordingRegion, Region
from udrv.dma import Direction
from udrv.dma.iommu import IommuContext, IommuInfo
from udrv.dma.vfio import VfioDma
from udrv.errors import DmaError, VfioError

X86 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]


class FakeContainer(IommuContext):
    def __init__(self, avail: int | None = 65535, pgsizes: int = 0x40201000) -> None:
        super().__init__()
        self.fd = 3
        self.pgsizes = pgsizes
        self.info = IommuInfo(pgsizes=pgsizes)
        self.maps: dict[int, tuple[int, int, bool, bool]] = {}  # iova -> vaddr, size, r, w
        self.limit = avail
        self.fail: int | None = None

    def refresh_info(self) -> IommuInfo:
        self.info = IommuInfo(pgsizes=self.pgsizes, iova_ranges=X86, dma_avail=self.limit)
        return self.info

    @property
    def is_open(self) -> bool:
        return self.fd >= 0

    def close(self) -> None:
        self.fd = -1

    def map_dma(self, vaddr: int, iova: int, size: int, *, readable: bool, writable: bool) -> None:
        page = self.info.page_size  # type1: vaddr, iova and size are multiples of it
        assert vaddr % page == 0 and iova % page == 0 and size % page == 0
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


class FakeVfioDevice(Device):
    """A Device whose DMA is VfioDma over a fake container (config: recorded memory)."""

    backend = "vfio"

    def __init__(self, container: FakeContainer, address: str = "0000:00:04.0") -> None:
        super().__init__(address)
        self.container = container
        self._config = RecordingRegion(256, name="config")

    @property
    def config(self) -> RecordingRegion:
        return self._config

    def region_info(self, index: int) -> RegionInfo:
        raise NotImplementedError

    def bar(self, index: int) -> Region:
        raise NotImplementedError

    def _open_dma(self) -> Dma:
        return VfioDma(self, self.container)

    def _close(self) -> None:
        pass


@pytest.fixture
def iommu() -> FakeContainer:
    return FakeContainer()


@pytest.fixture
def dev(iommu: FakeContainer) -> FakeVfioDevice:
    return FakeVfioDevice(iommu)


@pytest.fixture
def dma(dev: FakeVfioDevice) -> Dma:
    dev.dma.set_mask(28)
    return dev.dma


def test_dev_dma_is_one_object_and_the_mask_is_set_once(iommu: FakeContainer) -> None:
    dev = FakeVfioDevice(iommu)
    assert dev.dma is dev.dma and isinstance(dev.dma, VfioDma)
    assert dev.dma.mask_bits == 64  # nothing fixed yet
    dev.dma.set_mask(28)
    dev.dma.set_mask(28)  # the same again is fine
    with pytest.raises(
        DmaError,
        match=r"already 28 bits \(set by dev.dma.set_mask\(28\)\); cannot change it to 32",
    ):
        dev.dma.set_mask(32)
    with pytest.raises(DmaError, match=r"outside 12\.\.64"):
        FakeVfioDevice(iommu).dma.set_mask(65)
    other = FakeVfioDevice(iommu)
    other.dma.alloc(4096).close()  # the first mapping fixes the default
    with pytest.raises(DmaError, match=r"already 64 bits \(set by the first mapping"):
        other.dma.set_mask(28)
    assert not dev.config.read16(4) & 4  # DMA alone does not touch Bus Master Enable
    dev.close()
    other.close()


def test_alloc_is_an_array_the_device_sees(dma: Dma, iommu: FakeContainer) -> None:
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


def test_close_with_live_numpy_views(dma: Dma, iommu: FakeContainer) -> None:
    buf = dma.alloc(4096)
    keep = buf.array[10:20]
    buf.close()  # must not raise although a view is exported
    assert not iommu.maps
    keep[0] = 1  # the memory is still valid for the view's owner


def test_streaming_map_of_unaligned_memory(dma: Dma, iommu: FakeContainer) -> None:
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


def test_map_sg_segments_reach_the_right_bytes(dma: Dma, iommu: FakeContainer) -> None:
    pieces = [bytearray(os.urandom(n)) for n in (1000, 5000, 300)]
    with dma.map_sg(pieces, Direction.TO_DEVICE, max_segment=2048, boundary=4096) as sg:
        segs = list(sg)
        assert all(n <= 2048 and iova // 4096 == (iova + n - 1) // 4096 for iova, n in segs)
        got = b"".join(iommu.dma_read(iova, n) for iova, n in segs)
    assert got == b"".join(pieces)
    assert not iommu.maps


def test_unmap_then_reuse(dma: Dma) -> None:
    a = dma.alloc(4096)
    iova = a.iova
    a.close()
    b = dma.alloc(4096)
    assert b.iova == iova
    b.close()


def test_dma_avail_limit(iommu: FakeContainer) -> None:
    iommu.limit = 2
    dma = FakeVfioDevice(iommu).dma
    a, b = dma.alloc(1), dma.alloc(1)
    with pytest.raises(DmaError, match="allows 2 DMA mappings"):
        dma.alloc(1)
    a.close()
    dma.alloc(1).close()
    b.close()


def test_memlock_failure_names_the_fix(dma: Dma, iommu: FakeContainer) -> None:
    iommu.fail = errno.ENOMEM
    with pytest.raises(DmaError, match="ulimit -l") as info:
        dma.alloc(4096)
    assert info.value.errno == errno.ENOMEM
    iommu.fail = None
    assert dma.alloc(4096).iova == 0x100000  # the failed attempt gave its IOVA back


def test_iova_exhaustion_below_the_mask(iommu: FakeContainer) -> None:
    dma = FakeVfioDevice(iommu).dma
    dma.set_mask(21)  # 1 MiB usable
    big = dma.alloc(1 << 20)
    with pytest.raises(DmaError, match=r"exhausted.*21-bit"):
        dma.alloc(4096)
    big.close()


def test_device_close_unmaps_everything(iommu: FakeContainer) -> None:
    dev = FakeVfioDevice(iommu)
    buf = dev.dma.alloc(4096)
    dev.dma.map(bytearray(10))
    assert len(iommu.maps) == 2
    dev.close()
    assert not iommu.maps and buf.closed


def test_map_sg_undoes_earlier_mappings_when_a_later_one_fails(
    dma: Dma, iommu: FakeContainer
) -> None:
    """Issue 13 item 2: all or nothing."""
    with pytest.raises(DmaError, match="read-only"):
        dma.map_sg([bytearray(100), bytearray(5000), b"read-only"], Direction.FROM_DEVICE)
    assert not iommu.maps and iommu.mappings == 0 and not iommu.iova.allocated


def test_two_devices_of_one_container_share_the_iova_space(iommu: FakeContainer) -> None:
    """One allocator per container: an IOVA from one device's dma is unique among all the
    devices of the container, and each device's mask holds for what it allocates."""
    nic, edu = FakeVfioDevice(iommu, "0000:00:05.0"), FakeVfioDevice(iommu, "0000:00:05.1")
    edu.dma.set_mask(28)
    a = [nic.dma.alloc(1 << 20) for _ in range(3)]
    b = [edu.dma.alloc(1 << 20) for _ in range(3)]
    spans = sorted((m.iova, m.iova + (1 << 20)) for m in a + b)
    assert all(e <= s for (_, e), (s, _) in itertools.pairwise(spans))
    assert all(m.iova + (1 << 20) <= 1 << 28 for m in b)
    # A buffer allocated through the NIC is reachable by every device at the same IOVA.
    a[0].array[:3] = [7, 8, 9]
    assert iommu.dma_read(a[0].iova, 3) == bytes([7, 8, 9])
    nic.close()  # the NIC's mappings go, the other device's stay
    assert sorted(iommu.maps) == sorted(m.iova for m in b)
    edu.close()
    assert not iommu.maps and iommu.mappings == 0


def test_mappings_follow_the_iommu_page_size() -> None:
    """Issue 15 item 6: an IOMMU whose smallest page is 64 KiB gets 64 KiB-aligned IOVAs,
    sizes and process addresses (the fake's map_dma asserts it)."""
    iommu = FakeContainer(pgsizes=0x10000 | 0x200000)
    dev = FakeVfioDevice(iommu)
    with dev.dma.alloc(100) as buf:
        assert buf.iova % 0x10000 == 0 and iommu.maps[buf.iova][1] == 0x10000
        buf.array[:2] = [1, 2]
        assert iommu.dma_read(buf.iova, 2) == b"\x01\x02"
    backing = np.zeros(0x30000, dtype=np.uint8)
    with dev.dma.map(backing[0x12345 : 0x12345 + 10]) as m:
        assert m.iova % 0x10000 == (backing.ctypes.data + 0x12345) % 0x10000
        iommu.dma_write(m.iova, b"hello")
    assert backing[0x12345:0x1234A].tobytes() == b"hello"
    dev.close()
