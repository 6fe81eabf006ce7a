"""Many NVMe commands in flight: the block driver the frontends serve.

:class:`Nvme`'s own methods submit one command per queue and poll for it, which is what a
tool like `udrv nvme identify` wants. A block frontend has dozens of requests outstanding,
and :class:`AsyncNvme` serves them two ways, each with I/O queue pairs of its own:

- as hardware queues (:meth:`AsyncNvme.hardware_queue`, :mod:`.hwqueue`): what both
  frontends use, ublk one per queue and NBD one per worker (a ``/dev/nbdN`` connection or a
  group of NBD server clients); the frontend moves the data straight to and from each
  tag's DMA buffer;
- as ``async`` methods (``await drv.read(offset, buf)``...) for asyncio code that calls the
  driver itself (tests, scripts): each event loop gets a queue pair of its own and keeps up
  to depth - 1 commands in it; a command is pushed, the request awaits a future, and the
  completion queue is reaped when its MSI-X vector fires (``loop.add_reader`` on the
  eventfd) or, without interrupts, by a task that polls while anything is in flight (4.6:
  new entries are those whose phase tag matches).

On the ``async`` path each command slot owns a bounce buffer of ``max_transfer`` bytes plus a page for its PRP
list (written once: :class:`~udrv.drivers.nvme.command.PrpTable`); data is copied between it
and the frontend's buffer. A command that does not complete within ``timeout`` fails its
request with :class:`PollTimeout` (naming CSTS.CFS if the controller died) and is aborted
(Abort, Base §5.1); its slot stays reserved until the controller completes it, since until
then the controller may still write to it. If it is still out one more ``timeout`` later,
the controller is disabled (:meth:`Nvme.fail`), which ends its claim on every buffer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import replace

import numpy as np

from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.drivers.nvme import command as C
from udrv.drivers.nvme import regs as R
from udrv.drivers.nvme.driver import PAGE, Nvme, NvmeError, QueuePair
from udrv.drivers.nvme.hwqueue import NvmeHardwareQueue
from udrv.errors import PollTimeout

log = logging.getLogger(__name__)
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
        self.prp = [
            C.PrpTable(self.mem.iova + s * self.slot_size, max_transfer,
                       self.bytes[s * self.slot_size + max_transfer : (s + 1) * self.slot_size]
                       .view("<u8"), self.mem.iova + s * self.slot_size + max_transfer)
            for s in range(slots)
        ]  # fmt: skip
        self.free = list(range(slots, 0, -1))  # command ids 1..slots; slot = cid - 1
        self.lost: dict[int, float] = {}  # timed out, still the controller's: cid -> since
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
                if self.lost.pop(cid, None) is not None:  # a timed-out command ended at last
                    self.free.append(cid)
                    self._wake()
                else:
                    self.q.stray += 1
                    log.warning("%s: queue %d: completion for command id %d, which nobody "
                                "waits for; dropped", self.nvme.dev.address, self.q.qid, cid)  # fmt: skip
                continue
            fut, _, opcode = entry
            if fut.done():
                continue
            if status & C.SF_ERROR_MASK:
                fut.set_exception(NvmeError(f"command {opcode:#04x} on queue {self.q.qid} failed: "
                                            f"{C.describe_status(status)}", status))  # fmt: skip
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
            if csts == 0xFFFF_FFFF:
                why = " (CSTS reads all-ones: the device is gone)"
            for cid in late:
                fut, _, opcode = self.waiting.pop(cid)
                self.lost[cid] = now
                if not fut.done():
                    fut.set_exception(PollTimeout(
                        f"{self.nvme.dev.address}: command {opcode:#04x} on queue {self.q.qid} "
                        f"did not complete within {self.timeout:g} s{why}"))  # fmt: skip
                self.loop.run_in_executor(None, self._abort, cid)
        if any(now - t > self.timeout for t in self.lost.values()):
            # Aborted a timeout ago and still out: as Linux's second nvme_timeout, reset.
            self.nvme.fail(f"queue {self.q.qid}: command(s) still out {self.timeout:g} s after "
                           "their Abort")  # fmt: skip
            self.free.extend(self.lost)  # a disabled controller owns no buffer
            self.lost.clear()
            self._wake()
        self._watchdog = self.loop.call_later(1.0, self._check_timeouts)

    def _abort(self, cid: int) -> None:
        """Abort a timed-out command (in an executor thread: it waits for the admin queue)."""
        try:
            aborted = self.nvme.abort(self.q.qid, cid)
        except (NvmeError, PollTimeout) as exc:
            log.error("%s: Abort of command %d on queue %d failed: %s", self.nvme.dev.address,
                      cid, self.q.qid, exc)  # fmt: skip
        else:
            log.warning("%s: command %d on queue %d timed out; Abort: %s", self.nvme.dev.address,
                        cid, self.q.qid, "aborted" if aborted else "not aborted")  # fmt: skip

    def _wake(self) -> None:
        if self.space._waiters:
            self.loop.create_task(self._notify())

    async def _notify(self) -> None:
        async with self.space:
            self.space.notify_all()

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
        """PRP1/PRP2 for ``length`` bytes at the start of the slot (Base §4.1.1)."""
        return self.prp[cid - 1].prps(length)

    async def command(self, cid: int, cmd: C.Command) -> int:
        """Run ``cmd`` as command id ``cid``; completion DW0. A failure the controller marks
        retryable (DNR = 0) is resubmitted up to ``nvme.retries`` times."""
        retries = self.nvme.retries
        for attempt in range(retries + 1):
            try:
                return await self._once(cid, cmd)
            except NvmeError as exc:
                if exc.status is None or exc.status & C.SF_DNR or attempt == retries:
                    raise
                log.warning("%s: %s; retrying (%d of %d)", self.nvme.dev.address, exc,
                            attempt + 1, retries)  # fmt: skip
        raise AssertionError("unreachable")

    async def _once(self, cid: int, cmd: C.Command) -> int:
        self.nvme.check_usable()
        fut: asyncio.Future[int] = self.loop.create_future()
        self.waiting[cid] = (fut, time.monotonic(), cmd.opcode)
        self.q.push(cmd, cid)
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
    """An :class:`Nvme` as a block driver: a hardware queue per frontend queue, or, called
    from asyncio, a queue pair per event loop.

    Args:
        nvme: an initialised controller with at least as many I/O queues as the frontend
            has queues and callers have event loops (``Nvme(dev, queues=N)`` for
            ``Ublk(..., queues=N)`` or ``NbdDevice(..., connections=N)``).
        timeout: seconds before a command's request fails.
    """

    #: ublk's forked queue workers each drive one queue pair through :meth:`hardware_queue`
    #: (made, with its DMA memory, before the fork); the admin queue stays with the parent.
    multiprocess = True
    #: Flush (Base 2.0 §7.1) is device-wide: a Flush on one I/O queue pair commits what
    #: every queue pair's completed writes left in the namespace's volatile write cache.
    flush_per_queue = False

    def __init__(self, nvme: Nvme, *, timeout: float = 30.0) -> None:
        self.nvme = nvme
        self.timeout = timeout
        self.max_transfer = min(nvme.geometry.max_transfer, MAX_TRANSFER)
        self._bs = nvme.namespace.block_size
        # Write Zeroes limits (16-bit NLB, MDTS) come with the controller's geometry.
        self.geometry: BlockGeometry = replace(nvme.geometry, max_transfer=self.max_transfer)
        self._nsid = nvme.namespace.nsid
        self._queues: dict[asyncio.AbstractEventLoop, _LoopQueue] = {}
        self._hw: dict[int, NvmeHardwareQueue] = {}  # by queue pair index
        self._assign = threading.Lock()
        self._all: list[_LoopQueue] = []

    def hardware_queue(self, index: int, tags: int) -> NvmeHardwareQueue:
        """I/O queue pair ``index`` as a blk-mq style queue: what the ublk and NBD
        frontends serve frontend queue ``index`` with."""
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
                slba, nlb = (offset + pos) // self._bs, n // self._bs
                await lq.command(cid, C.rw(opcode, self._nsid, slba, nlb, prp1, prp2))
                if reading:
                    view[pos : pos + n] = buf[:n].data
            finally:
                await lq.release(cid)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._rw(C.NVM_READ, offset, buf, True)

    async def write(self, offset: int, data: memoryview) -> None:
        await self._rw(C.NVM_WRITE, offset, data, False)

    async def flush(self) -> None:
        lq = self._queue()
        cid = await lq.slot()
        try:
            await lq.command(cid, C.flush(self._nsid))
        finally:
            await lq.release(cid)

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Write Zeroes (NVM §3.2.8) in pieces of ``geometry.max_write_zeroes`` (MDTS and
        the 16-bit block count)."""
        self.nvme.require("write zeroes", self.geometry.write_zeroes, "ONCS bit 3 (Write Zeroes)")
        self.geometry.check(offset, length, "NVMe write zeroes")
        lq, bs, step = self._queue(), self._bs, self.geometry.max_write_zeroes
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            cid = await lq.slot()
            try:
                await lq.command(cid, C.write_zeroes(self._nsid, pos // bs, n // bs))
            finally:
                await lq.release(cid)

    async def discard(self, offset: int, length: int) -> None:
        """Dataset Management, Deallocate (NVM §3.2.1): up to 256 ranges of up to 2**32 - 1
        blocks per command."""
        self.nvme.require("discard", self.geometry.discard, "ONCS bit 2 (Dataset Management)")
        self.geometry.check(offset, length, "NVMe discard")
        lq, bs = self._queue(), self._bs
        ranges = C.dsm_ranges(offset // bs, length // bs)
        for i in range(0, len(ranges), C.DSM_MAX_RANGES):
            cid = await lq.slot()
            try:
                nr = C.write_dsm_ranges(lq.buffer(cid), ranges[i : i + C.DSM_MAX_RANGES])
                prp1, _ = lq.prps(cid, 16 * nr)
                await lq.command(cid, C.dsm(self._nsid, nr, prp1))
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
