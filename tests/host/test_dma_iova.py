"""IOVA allocation and scatter-gather segmentation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udrv.dma.iova import IovaAllocator
from udrv.dma.sg import segment
from udrv.errors import DmaError

X86_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]  # the MSI window is not usable


def test_respects_mask_ranges_and_alignment() -> None:
    a = IovaAllocator(X86_RANGES)
    iovas = [a.alloc(5000, mask_bits=28) for _ in range(10)]
    assert all(i % 4096 == 0 and i + 8192 <= 1 << 28 and i >= 0x100000 for i in iovas)
    assert len(set(iovas)) == 10


def test_never_hands_out_the_msi_window() -> None:
    a = IovaAllocator([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)], base=0xFED00000)
    first, second = a.alloc(0x100000, mask_bits=32), a.alloc(0x100000, mask_bits=32)
    assert first == 0xFED00000 and second == 0xFEF00000


def test_exhaustion_is_a_clear_error_and_free_reuses() -> None:
    a = IovaAllocator(base=0x100000)
    big = a.alloc(1 << 20, mask_bits=21)  # all the space below 2 MiB
    with pytest.raises(DmaError, match=r"IOVA space exhausted.*21-bit DMA mask"):
        a.alloc(4096, mask_bits=21)
    assert a.alloc(4096) == 0x200000  # a 64-bit device of the same container still fits
    a.free_range(big)
    assert a.alloc(4096, mask_bits=21) == big
    with pytest.raises(DmaError, match="not allocated"):
        a.free_range(0x1234000)


@settings(deadline=None)  # pure computation; timing only reflects the machine's load
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 64 * 1024)), max_size=60))
def test_allocations_never_overlap(ops: list[tuple[bool, int]]) -> None:
    a = IovaAllocator([(0, (1 << 24) - 1)])
    live: dict[int, int] = {}
    for free, size in ops:
        if free and live:
            iova = next(iter(live))
            a.free_range(iova)
            del live[iova]
            continue
        try:
            iova = a.alloc(size)
        except DmaError:
            continue
        for other, n in live.items():
            assert iova + size <= other or other + n <= iova
        live[iova] = (size + 4095) & ~4095
    total_free = sum(e - s for s, e in a.free)
    assert total_free + sum(live.values()) == (1 << 24) - 0x100000


@settings(deadline=None)  # pure computation; timing only reflects the machine's load
@given(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 20000)), max_size=8),
    st.integers(1, 9000),
    st.sampled_from([512, 4096, 65536]),
)
def test_segments_cover_everything_within_limits(
    spans: list[tuple[int, int]], max_seg: int, boundary: int
) -> None:
    segs = segment(spans, max_seg, boundary)
    assert sum(n for _, n in segs) == sum(n for _, n in spans)
    for iova, n in segs:
        assert 0 < n <= max_seg
        assert iova // boundary == (iova + n - 1) // boundary


def test_page_size_of_the_iommu_is_respected() -> None:
    """An IOMMU whose smallest page is 64 KiB (arm64 with 64K pages): every address and
    size is a multiple of it, and so is the lowest address (base rounded up)."""
    a = IovaAllocator([(0x1000, (1 << 32) - 1)], page=0x10000, base=0x1000)
    first = a.alloc(100)
    second = a.alloc(0x10001)
    assert first == 0x10000 and second == 0x20000
    assert a.allocated == {0x10000: 0x10000, 0x20000: 0x20000}
    with pytest.raises(DmaError, match="not a power of two"):
        IovaAllocator(page=3000)


def test_small_mask_device_finds_room_below_its_mask() -> None:
    """Two devices of one container: the 64-bit one's buffers must not use up the space a
    28-bit device needs, as long as room is left below 2**28."""
    a = IovaAllocator()
    wide = [a.alloc(1 << 20) for _ in range(4)]
    narrow = a.alloc(1 << 20, mask_bits=28)
    assert narrow + (1 << 20) <= 1 << 28 and narrow not in wide


def test_bad_sg_limits() -> None:
    with pytest.raises(DmaError, match="power of two"):
        segment([(0, 10)], 10, 3000)
