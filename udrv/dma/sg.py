"""Scatter-gather lists: (iova, length) segments within a device's segment limits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

from udrv.dma.buffer import Mapping
from udrv.errors import DmaError


def segment(
    spans: Sequence[tuple[int, int]], max_segment: int, boundary: int
) -> list[tuple[int, int]]:
    """Split each (iova, length) so no piece is longer than ``max_segment`` or crosses a
    multiple of ``boundary`` (like the kernel's dma_set_max_seg_size/seg_boundary)."""
    if max_segment <= 0 or boundary <= 0 or boundary & (boundary - 1):
        raise DmaError(
            f"bad SG limits: max_segment={max_segment}, boundary={boundary} (a power of two)"
        )
    out = []
    for iova, length in spans:
        while length:
            n = min(length, max_segment, boundary - (iova % boundary))
            out.append((iova, n))
            iova += n
            length -= n
    return out


class SgList:
    """The segments of several mappings; ``unmap()`` releases them all."""

    def __init__(self, maps: list[Mapping], segments: list[tuple[int, int]]) -> None:
        self.maps, self.segments = maps, segments

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def unmap(self) -> None:
        for m in self.maps:
            m.unmap()

    def __enter__(self) -> SgList:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmap()
