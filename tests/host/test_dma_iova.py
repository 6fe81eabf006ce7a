"""IOVA allocation and scatter-gather segmentation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.dma.iova import IovaAllocator
from udrv.dma.sg import segment
from udrv.errors import DmaError

X86_RANGES = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]  # the MSI window is not usable


def test_respects_mask_ranges_and_alignment() -> None:
    a = IovaAllocator(X86_RANGES, mask_bits=28)
    iovas = [a.alloc(5000) for _ in range(10)]
    assert all(i % 4096 == 0 and i + 8192 <= 1 << 28 and i >= 0x100000 for i in iovas)
    assert len(set(iovas)) == 10


def test_never_hands_out_the_msi_window() -> None:
    a = IovaAllocator([(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFF)], mask_bits=32, base=0xFED00000)
    first, second = a.alloc(0x100000), a.alloc(0x100000)
    assert first == 0xFED00000 and second == 0xFEF00000


def test_exhaustion_is_a_clear_error_and_free_reuses() -> None:
    a = IovaAllocator(mask_bits=21, base=0x100000)  # 1 MiB of space
    big = a.alloc(1 << 20)
    with pytest.raises(DmaError, match=r"IOVA space exhausted.*21-bit DMA mask"):
        a.alloc(4096)
    a.free_range(big)
    assert a.alloc(4096) == big
    with pytest.raises(DmaError, match="not allocated"):
        a.free_range(0x1234000)


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 64 * 1024)), max_size=60))
def test_allocations_never_overlap(ops: list[tuple[bool, int]]) -> None:
    a = IovaAllocator(mask_bits=24)
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


def test_bad_sg_limits() -> None:
    with pytest.raises(DmaError, match="power of two"):
        segment([(0, 10)], 10, 3000)
