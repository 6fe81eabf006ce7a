"""The block-driver interface that both kernel frontends (ublk, NBD) serve.

A driver says its geometry and implements read/write (and optionally flush, discard and
write-zeroes). Offsets and lengths are in bytes and always multiples of ``block_size``; the
frontends check that before calling (a request past the end of the disk never reaches the
driver). Methods may be plain functions or ``async def`` coroutines; frontends accept both.

Durability contract: when ``write`` returns, the data may sit in a volatile cache; when
``flush`` returns, everything written before it is durable. A frontend acknowledges a FLUSH
to the kernel only after ``flush`` returned, so a dying driver loses nothing the kernel was
told is safe.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from udrv.errors import FrontendError

if TYPE_CHECKING:
    from udrv.block.queue import HardwareQueue

T = TypeVar("T")


@dataclass(frozen=True)
class BlockGeometry:
    block_size: int  # logical block size in bytes: 512 or 4096
    num_blocks: int
    max_transfer: int = 512 * 1024  # largest single request in bytes
    volatile_cache: bool = True  # the device needs FLUSH for durability
    discard: bool = False
    write_zeroes: bool = False
    max_write_zeroes: int = 0  # largest WRITE_ZEROES request in bytes; 0: the frontend's limit
    read_only: bool = False  # writes fail with EPERM; frontends tell the kernel/client so

    @property
    def size(self) -> int:
        return self.block_size * self.num_blocks

    def check(self, offset: int, length: int, what: str) -> None:
        """Raise FrontendError unless [offset, offset+length) is aligned and on the disk."""
        if offset % self.block_size or length % self.block_size:
            raise FrontendError(
                f"{what} at {offset:#x}+{length:#x} is not aligned to {self.block_size} bytes"
            )
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FrontendError(
                f"{what} at {offset:#x}+{length:#x} is past the end of the disk ({self.size:#x})"
            )


class BlockDriver(abc.ABC):
    """Implement this to be served as /dev/ublkbN or /dev/nbdN (or an NBD export)."""

    geometry: BlockGeometry
    #: The driver's state lives where a forked process sees the same thing: memory mapped
    #: MAP_SHARED (an anonymous ``mmap.mmap(-1, n)`` is), a device, files. Then the ublk
    #: frontend may serve each queue from a process of its own (``Ublk(workers=...)``), past
    #: the GIL; a driver with a plain Python dict or ``bytearray`` for its data must not say so.
    multiprocess: bool = False
    #: A flush covers only the writes completed through the queue that carried it (each
    #: :meth:`hardware_queue` has a cache of its own), not every completed write. The
    #: default, ``False``, is the durability contract above: :meth:`flush` makes every
    #: completed write durable, whichever queue or connection it came through. The NBD
    #: frontends advertise ``NBD_FLAG_CAN_MULTI_CONN`` (a FLUSH on one connection covers
    #: the writes of all) only when this is ``False`` (or the export is read-only).
    flush_per_queue: bool = False

    @abc.abstractmethod
    def read(self, offset: int, buf: memoryview) -> Awaitable[None] | None:
        """Fill ``buf`` (``len(buf)`` bytes) from the disk at ``offset``."""

    @abc.abstractmethod
    def write(self, offset: int, data: memoryview) -> Awaitable[None] | None:
        """Write ``data`` at ``offset``."""

    def flush(self) -> Awaitable[None] | None:
        """Make every completed write durable."""
        return None

    def discard(self, offset: int, length: int) -> Awaitable[None] | None:
        """The range's contents are no longer needed (TRIM/deallocate)."""
        raise OSError(95, "discard not supported")  # EOPNOTSUPP

    def write_zeroes(self, offset: int, length: int) -> Awaitable[None] | None:
        """Zero the range; the default writes zero buffers."""
        zero = memoryview(bytes(min(length, 1 << 20)))
        results = []
        for pos in range(offset, offset + length, len(zero)):
            n = min(len(zero), offset + length - pos)
            results.append(self.write(pos, zero[:n]))
        if any(inspect.isawaitable(r) for r in results):
            return _gather(results)
        return None

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """Allocation of ``[offset, offset + length)``: ``(offset, length, flags)`` runs in
        order, covering a prefix of the range (at least its first byte), ``flags`` being
        ``EXTENT_HOLE`` (1) and/or ``EXTENT_ZERO`` (2) as NBD's ``base:allocation``
        (proto.md "Metadata contexts"). ``None`` (the default): unknown, all data. The NBD
        server answers NBD_CMD_BLOCK_STATUS with it, so ``qemu-img map`` sees holes."""
        return None

    def hardware_queue(self, index: int, tags: int) -> HardwareQueue | None:
        """Serve frontend queue ``index`` (requests ``0 .. tags - 1``) with a blk-mq style
        :class:`~udrv.block.queue.HardwareQueue`.

        Both frontends ask, once per queue: ublk for each of its hardware queues, NBD for each
        worker (one per ``/dev/nbdN`` connection, or per group of NBD server clients).

        Returns:
            The queue, or ``None`` (the default): the frontend serves the requests with
            :meth:`read`, :meth:`write` and the other methods instead (NBD through a
            :class:`~udrv.frontends.nbd.driverqueue.DriverQueue` over them).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device (the frontend calls it when it stops)."""


async def _gather(results: list[Any]) -> None:
    for r in results:
        if inspect.isawaitable(r):
            await r


async def call(result: T | Awaitable[T]) -> T:
    """Await a driver method's result if it is a coroutine, else return it."""
    if inspect.isawaitable(result):
        return await result
    return result


def is_sync(driver: BlockDriver) -> bool:
    """No ``async def`` among the driver's I/O methods: frontends call it inline."""
    names = ("read", "write", "flush", "discard", "write_zeroes")
    return not any(inspect.iscoroutinefunction(getattr(driver, n)) for n in names)
