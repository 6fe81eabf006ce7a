"""Many NVMe commands in flight from asyncio: the block driver the frontends serve.

:class:`Nvme`'s own methods submit one command per queue and poll for it, which is what a
tool like `udrv nvme identify` wants. A block frontend has dozens of requests outstanding,
so :class:`AsyncNvme` gives each event loop (one per ublk queue thread, or the NBD
server's) an I/O queue pair of its own and keeps up to depth - 1 commands in it: a command
is pushed, the request awaits a future, and the completion queue is reaped when its MSI-X
vector fires (``loop.add_reader`` on the eventfd) or, without interrupts, by a task that
polls while anything is in flight (4.6: new entries are those whose phase tag matches).

Each command slot owns a bounce buffer of ``max_transfer`` bytes plus a page for the PRP
list (4.3); data is copied between it and the frontend's buffer. A command that does not
complete within ``timeout`` fails its request with :class:`PollTimeout` (naming CSTS.CFS if
the controller died); its slot stays reserved, since the controller may still write to it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace

import numpy as np

from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.drivers.nvme import regs as R
from udrv.drivers.nvme.driver import PAGE, Nvme, NvmeError, QueuePair
from udrv.drivers.nvme.hwqueue import NvmeHardwareQueue
from udrv.errors import PollTimeout

#: Largest transfer per command: 32 pages keeps the slots of a 64-deep queue at ~8 MiB.
MAX_TRANSFER = 128 * 1024


class _LoopQueue:
    """One queue pair driven from one event loop: command slots, futures, the reaper."""

    def __init__(self, nvme: Nvme, q: QueuePair, loop: asyncio.AbstractEventLoop, timeout: float,
                 max_transfer: int) -> None:  # fmt: skip
        self.nvme, self.q, self.loop, self.timeout = nvme, q, loop, timeout
        self.slot_size = max_transfer + PAGE
        slots = q.depth - 1  # a full queue keeps one entry empty (4.1.2)
        self.mem = nvme.dma.alloc(slots * self.slot_size)
        self.bytes = self.mem.array
        self.free = list(range(slots, 0, -1))  # command ids 1..slots; slot = cid - 1
        self.lost: set[int] = set()  # timed out: never reused
        self.waiting: dict[int, tuple[asyncio.Future[int], float, int]] = {}
        self.space = asyncio.Condition()
        self.polling = False
        self.missed_interrupts = 0  # completions found by the watchdog, not by an interrupt
        if q.vector is not None:
            q.vector.poll()  # drop counts from synchronous commands
            loop.add_reader(q.vector.fileno(), self._on_interrupt)
        self._watchdog = loop.call_later(1.0, self._check_timeouts)

    # -- completions ---------------------------------------------------------------------------

    def _on_interrupt(self) -> None:
        assert self.q.vector is not None
        try:
            os.read(self.q.vector.fileno(), 8)
        except BlockingIOError:
            pass
        self._complete(self.q.reap())

    async def _poll(self) -> None:
        self.polling = True
        try:
            while self.waiting:
                self._complete(self.q.reap())
                await asyncio.sleep(0)
        finally:
            self.polling = False

    def _complete(self, done: list[tuple[int, int, int]]) -> None:
        for cid, status, dw0 in done:
            entry = self.waiting.pop(cid, None)
            if entry is None:
                if cid in self.lost:  # a late completion of a timed-out command
                    self.lost.discard(cid)
                    self.free.append(cid)
                continue
            fut, _, opcode = entry
            if fut.done():
                continue
            if status & 0x7FF:
                fut.set_exception(NvmeError(f"command {opcode:#04x} on queue {self.q.qid} failed: "
                                            f"{R.describe_status(status)}", status))  # fmt: skip
            else:
                fut.set_result(dw0)

    def _check_timeouts(self) -> None:
        if self.waiting and self.q.vector is not None:
            # Like Linux's nvme_timeout(): look at the queue before blaming the controller.
            done = self.q.reap()
            if done:
                self.missed_interrupts += 1
                self._complete(done)
        now = time.monotonic()
        late = [cid for cid, (_, t, _) in self.waiting.items() if now - t > self.timeout]
        if late:
            csts = self.nvme.bar.read32(R.CSTS)
            why = " (controller fatal status: CSTS.CFS is set)" if csts & R.CSTS_CFS else ""
            for cid in late:
                fut, _, opcode = self.waiting.pop(cid)
                self.lost.add(cid)
                if not fut.done():
                    fut.set_exception(PollTimeout(
                        f"{self.nvme.dev.address}: command {opcode:#04x} on queue {self.q.qid} "
                        f"did not complete within {self.timeout:g} s{why}"))  # fmt: skip
        self._watchdog = self.loop.call_later(1.0, self._check_timeouts)

    # -- submission ----------------------------------------------------------------------------

    async def slot(self) -> int:
        """A free command id (waits while the queue is full)."""
        if not self.free:
            async with self.space:
                await self.space.wait_for(lambda: bool(self.free))
        return self.free.pop()

    async def release(self, cid: int) -> None:
        if cid in self.lost:
            return
        self.free.append(cid)
        if self.space._waiters:
            async with self.space:
                self.space.notify()

    def buffer(self, cid: int) -> np.ndarray:
        start = (cid - 1) * self.slot_size
        return self.bytes[start : start + self.slot_size]

    def prps(self, cid: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for ``length`` bytes at the start of the slot (4.3)."""
        base = self.mem.iova + (cid - 1) * self.slot_size
        pages = (length + PAGE - 1) // PAGE
        if pages <= 1:
            return base, 0
        if pages == 2:
            return base, base + PAGE
        list_off = self.slot_size - PAGE  # the PRP list: entries for pages 2..n
        start = (cid - 1) * self.slot_size + list_off
        self.bytes[start : start + 8 * (pages - 1)].view("<u8")[:] = base + PAGE * np.arange(
            1, pages, dtype=np.uint64
        )
        return base, base + list_off

    async def command(self, cid: int, opcode: int, prp1: int = 0, prp2: int = 0,
                      cdw10: int = 0, cdw11: int = 0, cdw12: int = 0) -> int:  # fmt: skip
        fut: asyncio.Future[int] = self.loop.create_future()
        self.waiting[cid] = (fut, time.monotonic(), opcode)
        self.q.push(opcode, cid, self.nvme.namespace.nsid, prp1, prp2, cdw10, cdw11, cdw12)
        if self.q.vector is None:
            if not self.polling:
                self.loop.create_task(self._poll())
        elif len(self.waiting) > 1:
            # Interrupts are edge events; under QEMU TCG about one in several thousand never
            # arrives (measured: the completion sits in the CQ). Looking at the CQ on each
            # submission recovers those at once on a busy queue; the watchdog does on an idle one.
            self._complete(self.q.reap())
        return await fut

    def close(self) -> None:
        self._watchdog.cancel()
        if self.q.vector is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.q.vector.fileno())
        for fut, _, _ in self.waiting.values():
            if not fut.done():
                fut.cancel()
        if not self.waiting and not self.lost:
            self.mem.close()  # else the controller may still write there: keep it mapped


class AsyncNvme(BlockDriver):
    """An :class:`Nvme` as an ``async`` block driver with a queue pair per event loop.

    Args:
        nvme: an initialised controller with at least as many I/O queues as the frontend
            has event loops (``Nvme(dev, queues=N)`` for ``Ublk(..., queues=N)``).
        timeout: seconds before a command's request fails.
    """

    def __init__(self, nvme: Nvme, *, timeout: float = 30.0) -> None:
        self.nvme = nvme
        self.timeout = timeout
        self.max_transfer = min(nvme.geometry.max_transfer, MAX_TRANSFER)
        self._bs = bs = nvme.namespace.block_size
        self.geometry: BlockGeometry = replace(nvme.geometry, max_transfer=self.max_transfer,
                                               max_write_zeroes=0x10000 * bs)  # NLB: 16 bits  # fmt: skip
        self._queues: dict[asyncio.AbstractEventLoop, _LoopQueue] = {}
        self._hw: dict[int, NvmeHardwareQueue] = {}  # by queue pair index
        self._assign = threading.Lock()
        self._all: list[_LoopQueue] = []

    def hardware_queue(self, index: int, tags: int) -> NvmeHardwareQueue:
        """I/O queue pair ``index`` as a blk-mq style queue (what the ublk frontend uses)."""
        with self._assign:
            for i in [i for i, hq in self._hw.items() if hq.closed]:
                del self._hw[i]
            used = {id(x.q) for x in self._queues.values()}
            if index >= len(self.nvme.io) or index in self._hw or id(self.nvme.io[index]) in used:
                raise NvmeError(f"{self.nvme.dev.address}: no free NVMe I/O queue for frontend "
                                f"queue {index} ({len(self.nvme.io)} queue(s)); create the "
                                "controller with queues= at least as many")  # fmt: skip
            hq = self._hw[index] = NvmeHardwareQueue(
                self.nvme, self.nvme.io[index], tags, max_transfer=self.max_transfer,
                timeout=self.timeout)  # fmt: skip
        return hq

    def _queue(self) -> _LoopQueue:
        loop = asyncio.get_running_loop()
        lq = self._queues.get(loop)
        if lq is not None:
            return lq
        with self._assign:  # loops in several threads ask at once
            for old in [lp for lp in self._queues if lp.is_closed()]:
                self._queues.pop(old).close()  # that loop is gone: its queue pair is free
            used = {id(x.q) for x in self._queues.values()}
            used |= {id(hq.q) for hq in self._hw.values() if not hq.closed}
            free = [q for q in self.nvme.io if id(q) not in used]
            if not free:
                raise NvmeError(
                    f"{self.nvme.dev.address}: more frontend queues than the {len(self.nvme.io)} "
                    "NVMe I/O queue(s); create the controller with queues= at least as many"
                )
            lq = self._queues[loop] = _LoopQueue(
                self.nvme, free[0], loop, self.timeout, self.max_transfer
            )
            self._all.append(lq)
        return lq

    async def _rw(self, opcode: int, offset: int, view: memoryview, reading: bool) -> None:
        self.geometry.check(offset, len(view), "NVMe I/O")
        lq = self._queue()
        step = self.max_transfer
        for pos in range(0, len(view), step):
            n = min(step, len(view) - pos)
            cid = await lq.slot()
            try:
                buf = lq.buffer(cid)
                if not reading:
                    buf[:n] = np.frombuffer(view[pos : pos + n], dtype=np.uint8)
                prp1, prp2 = lq.prps(cid, n)
                slba = (offset + pos) // self._bs
                await lq.command(cid, opcode, prp1, prp2, slba & 0xFFFFFFFF, slba >> 32,
                                 n // self._bs - 1)  # fmt: skip
                if reading:
                    view[pos : pos + n] = buf[:n].data
            finally:
                await lq.release(cid)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._rw(R.NVM_READ, offset, buf, True)

    async def write(self, offset: int, data: memoryview) -> None:
        await self._rw(R.NVM_WRITE, offset, data, False)

    async def flush(self) -> None:
        lq = self._queue()
        cid = await lq.slot()
        try:
            await lq.command(cid, R.NVM_FLUSH)
        finally:
            await lq.release(cid)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.geometry.check(offset, length, "NVMe write zeroes")
        lq, bs = self._queue(), self._bs
        for pos in range(offset, offset + length, 0x10000 * bs):  # NLB is 16 bits (6.16)
            n = min(0x10000 * bs, offset + length - pos)
            cid = await lq.slot()
            try:
                slba = pos // bs
                await lq.command(cid, R.NVM_WRITE_ZEROES, 0, 0, slba & 0xFFFFFFFF, slba >> 32,
                                 n // bs - 1)  # fmt: skip
            finally:
                await lq.release(cid)

    async def discard(self, offset: int, length: int) -> None:
        """Dataset Management, Deallocate (6.7), one range (up to 2**32 - 1 blocks)."""
        self.geometry.check(offset, length, "NVMe discard")
        lq, bs = self._queue(), self._bs
        for pos in range(offset, offset + length, 0xFFFF_F000 * bs):
            n = min(0xFFFF_F000 * bs, offset + length - pos)
            cid = await lq.slot()
            try:
                rng = lq.buffer(cid)[:16]
                rng.view("<u4")[:2] = (0, n // bs)  # context attributes, length in blocks
                rng[8:16].view("<u8")[0] = pos // bs  # starting LBA
                prp1, _ = lq.prps(cid, 16)
                await lq.command(cid, R.NVM_DSM, prp1, 0, 0, R.DSM_AD)
            finally:
                await lq.release(cid)

    @property
    def missed_interrupts(self) -> int:
        """Times the once-a-second watchdog found completions no interrupt had announced."""
        return sum(lq.missed_interrupts for lq in self._all)

    def close(self) -> None:
        """Stop reaping (the frontend's loops are done); the controller stays up."""
        for lq in self._queues.values():
            lq.close()
        self._queues.clear()
