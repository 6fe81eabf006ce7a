"""An nbdkit Python plugin as a :class:`~udrv.block.driver.BlockDriver`.

One handle for the life of the device: ``open(readonly)`` when the driver is made,
``close(h)`` when it is closed. In nbdkit's terms the disk is one connection, shared by every
ublk queue (or every NBD client of :class:`~udrv.frontends.nbd.NbdServer`).

Thread models (nbdkit-plugin(3) "Threads"), honoured with a lock around every callback:

- SERIALIZE_CONNECTIONS, SERIALIZE_ALL_REQUESTS (the Python default) and SERIALIZE_REQUESTS:
  one callback at a time. With a single handle, "one request per connection" and "one
  request at all" are the same thing.
- PARALLEL: no lock. :func:`open_driver` then returns a :class:`ParallelPluginDriver`, whose
  methods are coroutines that run the callbacks on a thread pool, so a plugin that blocks
  (on a socket, on ``time.sleep``) has many requests in flight on one ublk queue or NBD
  connection, as under nbdkit's worker threads. Python code still holds the GIL.

What the frontends send maps onto the callbacks as nbdkit's server does: READ -> ``pread``,
WRITE -> ``pwrite`` (``flags`` 0; FUA is a write then ``flush``: nbdkit's FUA_EMULATE),
FLUSH -> ``flush``, DISCARD -> ``trim``, WRITE_ZEROES -> ``zero(..., FLAG_MAY_TRIM)``,
falling back to ``pwrite`` of zeros when the plugin has no ``zero`` or it fails with
EOPNOTSUPP (nbdkit-python-plugin(3) "zero"), NBD_CMD_BLOCK_STATUS -> ``extents``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.errors import PluginError
from udrv.plugins import nbdkit
from udrv.plugins.loader import Plugin

log = logging.getLogger(__name__)
MAX_TRANSFER = 512 * 1024  # the frontends' request limit: larger plugin maxima are cut to it
ZERO_CHUNK = 1 << 20


class PluginDriver(BlockDriver):
    """``plugin`` served as a block device, its callbacks serialised per its thread model.

    Args:
        plugin: a loaded plugin (:func:`udrv.plugins.loader.load`).
        readonly: open it read-only (``open(True)``); writes then fail with EPERM. A plugin
            whose ``can_write`` is false (or that has no ``pwrite``) is read-only anyway.

    Raises:
        PluginError: ``open``, ``get_size`` or a ``can_*`` query failed, or the plugin's
            size or block sizes cannot be served.
    """

    def __init__(self, plugin: Plugin, *, readonly: bool = False) -> None:
        self.plugin = plugin
        self._rmw_lock = threading.Lock()
        self._lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext()
            if plugin.thread_model == nbdkit.THREAD_MODEL_PARALLEL
            else threading.Lock()
        )
        try:
            self.handle = plugin.call("open", readonly)
        except OSError as exc:
            raise PluginError(f"{exc.strerror}; cannot serve {plugin.path}") from None
        try:
            self.geometry = self._geometry(readonly)
        except BaseException:
            self._close_handle()
            raise

    def _geometry(self, readonly: bool) -> BlockGeometry:
        p, h = self.plugin, self.handle
        try:
            size = int(p.call("get_size", h))
        except OSError as exc:
            raise PluginError(f"{exc.strerror}; cannot serve {p.path}") from None
        minimum, _preferred, maximum = (int(v) for v in p.ask("block_size", h, (1, 4096, 0)))
        if minimum < 1 or (maximum and maximum < minimum):
            raise PluginError(f"{p.name}: block_size() returned minimum {minimum}, maximum "
                              f"{maximum}: need 1 <= minimum <= maximum")  # fmt: skip
        # The plugin's granule: requests must be whole multiples of it. Up to 4096 (a power of
        # two) it is the disk's logical block; beyond (the S3 plugin's object size) the disk
        # has 4096-byte blocks (512 if the granule is not a multiple of 4096) and this driver
        # reads and read-modify-writes whole granules.
        self.granule = 1
        if minimum <= 512:
            bs = 512
        elif minimum <= 4096 and minimum & (minimum - 1) == 0:
            bs = minimum
        else:
            bs = 4096 if minimum % 4096 == 0 else 512
            self.granule = minimum
        unit = max(bs, self.granule)
        if size < unit:
            raise PluginError(f"{p.name}: get_size() returned {size}; a disk needs at least "
                              f"one {unit}-byte block")  # fmt: skip
        if size % unit:
            log.warning("%s: size %d is not a multiple of %d; the last %d bytes are not served",
                        p.name, size, unit, size % unit)  # fmt: skip
        # The largest single callback: the plugin's maximum, whole granules.
        self.max_call = (maximum or 1 << 31) // unit * unit or unit
        most = min(maximum or MAX_TRANSFER, MAX_TRANSFER) // bs * bs or bs
        if self.granule > 1:
            most = MAX_TRANSFER  # requests are regrouped into granules anyway
        self.writable = not readonly and p.has("pwrite") and bool(p.ask("can_write", h, True))
        self.can_flush = p.has("flush") and bool(p.ask("can_flush", h, True))
        self.can_trim = self.writable and p.has("trim") and bool(p.ask("can_trim", h, True))
        self.can_zero = self.writable and p.has("zero") and bool(p.ask("can_zero", h, True))
        self.can_extents = p.has("extents") and bool(p.ask("can_extents", h, True))
        return BlockGeometry(
            block_size=bs,
            num_blocks=size // unit * unit // bs,
            max_transfer=most,
            volatile_cache=self.can_flush,
            discard=self.can_trim,
            write_zeroes=self.writable,
            read_only=not self.writable,
        )

    # -- the callbacks, serialised: shared by the sync and the parallel driver --------------

    def _call(self, callback: str, *args: Any) -> Any:
        with self._lock:
            return self.plugin.call(callback, *args)

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granule
        return offset // g * g, -(-(offset + length) // g) * g

    def _each(self, callback: str, offset: int, view: memoryview) -> None:
        for pos in range(0, len(view), self.max_call):
            self._call(callback, self.handle, view[pos : pos + self.max_call], offset + pos, 0)

    def _read(self, offset: int, buf: memoryview) -> None:
        start, end = self._span(offset, len(buf))
        if (start, end) == (offset, offset + len(buf)):
            self._each("pread", offset, buf)
            return
        whole = memoryview(bytearray(end - start))
        self._each("pread", start, whole)
        buf[:] = whole[offset - start : offset - start + len(buf)]

    def _write(self, offset: int, data: memoryview) -> None:
        if not self.writable:
            raise OSError(errno.EPERM, f"{self.plugin.name} is served read-only")
        start, end = self._span(offset, len(data))
        if (start, end) == (offset, offset + len(data)):
            self._each("pwrite", offset, data)
            return
        # Part of a granule: read-modify-write it. One at a time, so that two writes to
        # different parts of one granule (which the kernel may send together) both land.
        with self._rmw_lock:
            whole = memoryview(bytearray(end - start))
            self._each("pread", start, whole)
            whole[offset - start : offset - start + len(data)] = data
            self._each("pwrite", start, whole)

    def _flush(self) -> None:
        if self.can_flush:
            self._call("flush", self.handle, 0)

    def _discard(self, offset: int, length: int) -> None:
        if not self.can_trim:
            raise OSError(errno.EOPNOTSUPP, f"{self.plugin.name} cannot trim")
        # Only whole granules; a trim is advisory, so the parts at the edges are kept.
        g = self.granule
        start, end = -(-offset // g) * g, (offset + length) // g * g
        if end > start:
            self._call("trim", self.handle, end - start, start, 0)

    def _write_zeroes(self, offset: int, length: int) -> None:
        if self.can_zero and self._span(offset, length) == (offset, offset + length):
            try:
                self._call("zero", self.handle, length, offset, nbdkit.FLAG_MAY_TRIM)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        zero = memoryview(bytes(min(length, ZERO_CHUNK)))
        for pos in range(offset, offset + length, len(zero)):
            self._write(pos, zero[: min(len(zero), offset + length - pos)])

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        if not self.can_extents:
            return None
        raw = self._call("extents", self.handle, length, offset, 0)
        return clip_extents(raw, offset, length, self.plugin.name)

    # -- BlockDriver ---------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> None:
        self._read(offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        self._write(offset, data)

    def flush(self) -> None:
        self._flush()

    def discard(self, offset: int, length: int) -> None:
        self._discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._write_zeroes(offset, length)

    def _close_handle(self) -> None:
        if self.plugin.has("close"):
            try:
                self._call("close", self.handle)
            except OSError as exc:
                log.warning("%s", exc.strerror)

    def close(self) -> None:
        """``close(h)``: the frontend is done with the disk."""
        self._close_handle()


class ParallelPluginDriver(PluginDriver):
    """A THREAD_MODEL_PARALLEL plugin: each request runs on a pool of ``threads`` threads.

    Args:
        plugin, readonly: as :class:`PluginDriver`.
        threads: the most callbacks running at once (nbdkit's ``--threads``, default 16).
    """

    def __init__(self, plugin: Plugin, *, readonly: bool = False, threads: int = 16) -> None:
        if threads < 1:
            raise PluginError(f"threads={threads}: need at least one")
        super().__init__(plugin, readonly=readonly)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"plugin-{plugin.name}")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def read(self, offset: int, buf: memoryview) -> None:  # type: ignore[override]
        await self._run(self._read, offset, buf)

    async def write(self, offset: int, data: memoryview) -> None:  # type: ignore[override]
        await self._run(self._write, offset, data)

    async def flush(self) -> None:  # type: ignore[override]
        await self._run(self._flush)

    async def discard(self, offset: int, length: int) -> None:  # type: ignore[override]
        await self._run(self._discard, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:  # type: ignore[override]
        await self._run(self._write_zeroes, offset, length)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        super().close()


def open_driver(plugin: Plugin, *, readonly: bool = False, threads: int = 16) -> PluginDriver:
    """The driver for ``plugin``'s thread model: parallel plugins get a thread pool."""
    if plugin.thread_model == nbdkit.THREAD_MODEL_PARALLEL and threads > 1:
        return ParallelPluginDriver(plugin, readonly=readonly, threads=threads)
    return PluginDriver(plugin, readonly=readonly)


def clip_extents(raw: Iterable[Any], offset: int, length: int,
                 name: str = "plugin") -> list[tuple[int, int, int]]:  # fmt: skip
    """A plugin's ``extents()`` answer cut to ``[offset, offset + length)``, in order,
    adjacent runs of one type merged. A gap reads as data (always a safe answer); extents
    before ``offset`` or past the end are dropped, as nbdkit_add_extent does.

    Raises:
        OSError: EIO when nothing in the answer covers ``offset``.
    """
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    for item in raw:
        o, n, t = (int(v) for v in item)
        if o + n <= pos or n <= 0:
            continue
        if o > pos:
            if not out:
                break  # the first byte is not described
            out.append((pos, min(o, end) - pos, 0))
            pos = min(o, end)
        if pos >= end:
            break
        stop = min(o + n, end)
        kind = t & (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == pos:
            out[-1] = (out[-1][0], stop - out[-1][0], kind)
        else:
            out.append((pos, stop - pos, kind))
        pos = stop
        if pos >= end:
            break
    if not out:
        raise OSError(errno.EIO, f"{name}: extents() described nothing at offset {offset}")
    return out
