"""A :class:`~udrv.block.queue.HardwareQueue` over a driver's ``read``/``write`` methods.

The NBD frontends serve every driver through hardware queues, so there is one transmission
loop whatever the driver is: a driver with queues of its own (NVMe) hands them out with
``hardware_queue``; any other gets a :class:`DriverQueue`, which owns a buffer per tag and
calls the driver's methods on it.

- A plain (synchronous) driver is called in :meth:`~DriverQueue.queue_rq` and its result is
  returned at once, as blk-mq's null_blk does in ``queue_rq``; no thread, no event loop.
- An ``async`` driver (a PARALLEL nbdkit plugin, whose methods run on a thread pool) gets an
  event loop on a thread of its own: ``queue_rq`` hands it the coroutine and returns
  ``None``; when it finishes, the result is queued and an eventfd (:meth:`fileno`) wakes the
  frontend, which collects it with :meth:`complete`. Many requests are then in flight, as
  under nbdkit's worker threads.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import logging
import mmap
import os
import threading
from collections.abc import Awaitable
from typing import Any

from udrv.block.driver import BlockDriver, is_sync
from udrv.block.queue import HardwareQueue, Op
from udrv.errors import FrontendError

log = logging.getLogger(__name__)
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = map(int, (Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD,
                                                      Op.WRITE_ZEROES))  # fmt: skip


def result_errno(exc: BaseException) -> int:
    """The errno a failed driver call is reported with: its own, EINVAL for a request the
    frontend found bad (:class:`FrontendError` without errno), else EIO."""
    if isinstance(exc, OSError | FrontendError) and exc.errno:
        return int(exc.errno)
    return errno.EINVAL if isinstance(exc, FrontendError) else errno.EIO


class DriverQueue(HardwareQueue):
    """Requests ``0 .. tags - 1`` served by ``driver``'s methods, one buffer per tag.

    Args:
        driver: the block driver; ``async`` methods run on this queue's event loop thread.
        tags: requests in flight at most.
        name: for log lines and the thread's name.
    """

    def __init__(self, driver: BlockDriver, tags: int, *, name: str = "nbd") -> None:
        self.driver, self.tags, self.name = driver, tags, name
        self.buffer_size = driver.geometry.max_transfer
        self._mem = mmap.mmap(-1, tags * self.buffer_size)
        self._view = memoryview(self._mem)
        self._views = [self._view[t * self.buffer_size : (t + 1) * self.buffer_size]
                       for t in range(tags)]  # fmt: skip
        self._done: collections.deque[tuple[int, int]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # An async driver's completions come from another thread: this eventfd tells.
        self._fd = -1 if is_sync(driver) else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.out = 0  # requests on the event loop

    def address(self, tag: int) -> int:
        raise FrontendError("DriverQueue buffers are Python buffers; use buffer(tag)")

    def buffer(self, tag: int) -> memoryview:
        return self._views[tag]

    def fileno(self) -> int:
        return self._fd

    def queue_rq(self, tag: int, op: int, offset: int, length: int) -> int | None:
        d = self.driver
        try:
            if op == READ:
                r: Any = d.read(offset, self._views[tag][:length])
            elif op == WRITE:
                r = d.write(offset, self._views[tag][:length])
            elif op == FLUSH:
                r = d.flush()
            elif op == DISCARD:
                r = d.discard(offset, length)
            elif op == WRITE_ZEROES:
                r = d.write_zeroes(offset, length)
            else:
                return -errno.EOPNOTSUPP
        except Exception as exc:
            return self._failed(exc, op, offset, length)
        if r is None or not inspect.isawaitable(r):
            return length
        self._start_loop()
        assert self._loop is not None
        self.out += 1
        self._loop.call_soon_threadsafe(self._spawn, tag, r, op, offset, length)
        return None

    def _failed(self, exc: BaseException, op: int, offset: int, length: int) -> int:
        code = result_errno(exc)
        level = logging.DEBUG if code == errno.EINVAL else logging.WARNING
        # str(exc), not exc: a kept log record must not keep the request's buffer alive.
        log.log(level, "%s: %s at %#x+%#x failed: %s", self.name, Op(op).name, offset, length,
                str(exc))  # fmt: skip
        return -code

    def _start_loop(self) -> None:
        """The first awaitable: an event loop on a thread."""
        if self._loop is not None:
            return
        if self._fd < 0:  # a "sync" driver that returned an awaitable after all
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.name}-aio",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _spawn(self, tag: int, r: Awaitable[Any], op: int, offset: int, length: int) -> None:
        assert self._loop is not None
        self._loop.create_task(self._finish(tag, r, op, offset, length))

    async def _finish(self, tag: int, r: Awaitable[Any], op: int, offset: int,
                      length: int) -> None:  # fmt: skip
        try:
            await r
            res = length
        except Exception as exc:
            res = self._failed(exc, op, offset, length)
        self._done.append((tag, res))
        os.eventfd_write(self._fd, 1)

    def complete(self) -> list[tuple[int, int]]:
        if self._fd < 0 or not self._done:
            return []
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        done = []
        while self._done:
            done.append(self._done.popleft())
        self.out -= len(done)
        return done

    def close(self) -> None:
        """Stop the event loop (no request is out: the frontend waited for them)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(30)
            self._loop.close()
            self._loop = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for v in self._views:
            v.release()
        self._view.release()
        try:
            self._mem.close()
        except BufferError:  # a driver kept a view of a buffer: the GC unmaps it
            log.warning("%s: a request buffer is still referenced; leaving it to the garbage "
                        "collector", self.name)  # fmt: skip
