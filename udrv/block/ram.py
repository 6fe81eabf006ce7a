"""A RAM-backed block driver: the "null" driver for frontend tests and benchmarks.

It keeps its data in an anonymous shared mapping (reads of untouched blocks return zeros;
memory is committed only where written; forked queue workers share it). ``discard`` drops
ranges.
"""

from __future__ import annotations

import mmap

from udrv.block.driver import BlockDriver, BlockGeometry


class RamDisk(BlockDriver):
    multiprocess = True  # the data is a MAP_SHARED mapping: forked queue workers share it
    flush_per_queue = False  # no cache at all: a write is in the one mapping every queue sees

    def __init__(self, size: int, *, block_size: int = 512, discard: bool = True) -> None:
        if size <= 0 or size % block_size:
            raise ValueError(f"size {size} must be a positive multiple of {block_size}")
        self.geometry = BlockGeometry(
            block_size=block_size,
            num_blocks=size // block_size,
            volatile_cache=False,
            discard=discard,
            write_zeroes=True,
        )
        self._mem = mmap.mmap(-1, size)
        self._view = memoryview(self._mem)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._view[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        self._view[offset : offset + length] = bytes(length)
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + length) // page * page
        if end > start:
            # MADV_REMOVE frees a shared mapping's pages (MADV_DONTNEED only unmaps them
            # from this process: madvise(2)); they read back as zeros.
            self._mem.madvise(mmap.MADV_REMOVE, start, end - start)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.discard(offset, length)

    def close(self) -> None:
        self._view.release()
        self._mem.close()
