"""An NVMe I/O queue pair as a blk-mq style hardware queue (``udrv.block.queue``).

What Linux's nvme driver does in ``nvme_queue_rq`` / ``nvme_commit_rqs`` / ``nvme_irq``:
request ``tag`` becomes one command (command id = tag, plus a 4-bit generation so that a
late completion of an expired command is recognised), several go out under one SQ tail
doorbell write, and the completion queue is reaped when its MSI-X vector fires.

Each tag owns ``max_transfer`` bytes of DMA memory, which the frontend lends to the kernel
as the request's buffer: the controller reads and writes the kernel's data there directly.
Since a tag's buffer never moves, its PRP list (4.3) is written once, when the queue is
made; a request of more than two pages points PRP2 at it.
"""

from __future__ import annotations

import errno
import logging
import math

import numpy as np

from udrv.block.queue import HardwareQueue, Op
from udrv.drivers.nvme import regs as R
from udrv.drivers.nvme.driver import PAGE, Nvme, NvmeError, QueuePair

log = logging.getLogger(__name__)
GEN_SHIFT, TAG_MASK = 12, 0xFFF  # command id = generation << 12 | tag (tags < 4096)
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = map(int, (Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD,
                                                      Op.WRITE_ZEROES))  # fmt: skip


class NvmeHardwareQueue(HardwareQueue):
    """I/O queue pair ``q`` of ``nvme`` serving requests ``0 .. tags - 1``.

    Args:
        max_transfer: bytes per tag's buffer (at most MDTS, and 512 pages: one PRP list page).
        timeout: seconds before :meth:`expire` fails a command (counted in its calls, about
            one a second, as Linux counts jiffies). As in Linux, a controller that loses
            commands needs a reset; until then a late DMA may still reach the buffer.
    """

    def __init__(self, nvme: Nvme, q: QueuePair, tags: int, *, max_transfer: int,
                 timeout: float) -> None:  # fmt: skip
        if tags > q.depth - 1:  # a full queue keeps one entry empty (4.1.2)
            raise NvmeError(f"{nvme.dev.address}: I/O queue {q.qid} holds {q.depth - 1} "
                            f"commands, not {tags}; create the Nvme with depth >= {tags + 1}")  # fmt: skip
        if max_transfer % PAGE or not PAGE <= max_transfer <= 512 * PAGE:
            raise NvmeError(f"max_transfer {max_transfer}: need a multiple of {PAGE} up to 2 MiB")
        self.nvme, self.q, self.tags, self.buffer_size = nvme, q, tags, max_transfer
        self.timeout = timeout
        self._ticks, self._tick = math.ceil(timeout), 0
        self.nsid, self.bs = nvme.namespace.nsid, nvme.namespace.block_size
        data = tags * max_transfer
        self.mem = nvme.dma.alloc(data + tags * PAGE)  # the buffers, then a PRP list per tag
        self._view = self.mem.memoryview()
        self._base = self.mem.array.ctypes.data
        self._iova = [self.mem.iova + t * max_transfer for t in range(tags)]
        self._prp_list = [self.mem.iova + data + t * PAGE for t in range(tags)]
        pages = max_transfer // PAGE
        lists = self.mem.array[data:].view("<u8").reshape(tags, PAGE // 8)
        for t in range(tags):
            lists[t, : pages - 1] = self._iova[t] + PAGE * np.arange(1, pages, dtype=np.uint64)
        self._cid = [-1] * tags  # the command id out for each tag, or -1
        self._gen = [0] * tags
        self._len = [0] * tags
        self._since = [0] * tags  # the tick it was queued in
        self.out = 0  # commands the controller holds
        self._fd = q.vector.fileno() if q.vector is not None else -1
        if q.vector is not None:
            q.vector.poll()  # drop counts left by synchronous commands
        self._pushed = False
        self.closed = False

    def address(self, tag: int) -> int:
        return self._base + tag * self.buffer_size

    def buffer(self, tag: int) -> memoryview:
        return self._view[tag * self.buffer_size : (tag + 1) * self.buffer_size]

    def fileno(self) -> int:
        return self._fd

    def queue_rq(self, tag: int, op: int, offset: int, length: int) -> int | None:
        bs, slba = self.bs, offset // self.bs
        prp1 = prp2 = cdw10 = cdw11 = cdw12 = 0
        if op <= WRITE:
            opcode = R.NVM_READ if op == READ else R.NVM_WRITE
            if length > self.buffer_size:
                return -errno.EINVAL
            prp1 = self._iova[tag]
            if length > 2 * PAGE:
                prp2 = self._prp_list[tag]
            elif length > PAGE:
                prp2 = prp1 + PAGE
            cdw10, cdw11, cdw12 = slba & 0xFFFFFFFF, slba >> 32, length // bs - 1
        elif op == FLUSH:
            opcode = R.NVM_FLUSH
        elif op == WRITE_ZEROES:
            if length > 0x10000 * bs:  # NLB is 16 bits (6.16); the geometry says so to ublk
                return -errno.EINVAL
            opcode, cdw10, cdw11, cdw12 = R.NVM_WRITE_ZEROES, slba & 0xFFFFFFFF, slba >> 32, length // bs - 1  # fmt: skip
        elif op == DISCARD:  # Dataset Management, Deallocate, one range (6.7)
            opcode, prp1, cdw11 = R.NVM_DSM, self._iova[tag], R.DSM_AD
            rng = self.mem.array[tag * self.buffer_size : tag * self.buffer_size + 16]
            rng.view("<u4")[:2] = (0, length // bs)  # context attributes, length in blocks
            rng[8:].view("<u8")[0] = slba
        else:
            return -errno.EOPNOTSUPP
        gen = self._gen[tag] = (self._gen[tag] + 1) & 0xF
        cid = self._cid[tag] = gen << GEN_SHIFT | tag
        self._len[tag], self._since[tag] = length, self._tick
        self.q.push(opcode, cid, self.nsid, prp1, prp2, cdw10, cdw11, cdw12, doorbell=False)
        self.out += 1
        self._pushed = True
        return None

    def commit(self) -> None:
        if self._pushed:
            self._pushed = False
            self.q.ring_sq_doorbell()

    def complete(self) -> list[tuple[int, int]]:
        done = []
        cids = self._cid
        for cid, status, _ in self.q.reap():
            tag = cid & TAG_MASK
            if tag >= self.tags or cids[tag] != cid:
                continue  # the late completion of an expired command
            cids[tag] = -1
            self.out -= 1
            if status & 0x7FF:
                log.error("%s: I/O command %#06x on queue %d failed: %s", self.nvme.dev.address,
                          cid, self.q.qid, R.describe_status(status))  # fmt: skip
                done.append((tag, -errno.EIO))
            else:
                done.append((tag, self._len[tag]))
        return done

    def expire(self) -> list[tuple[int, int]]:
        self._tick += 1
        oldest = self._tick - self._ticks - 1  # queued before this: out for > timeout
        late = [t for t, cid in enumerate(self._cid) if cid >= 0 and self._since[t] <= oldest]
        if not late:
            return []
        why = (
            " (CSTS.CFS: the controller is dead)"
            if self.nvme.bar.read32(R.CSTS) & R.CSTS_CFS
            else ""
        )
        log.error("%s: %d command(s) on queue %d took over %g s%s; failing them, the controller "
                  "needs a reset", self.nvme.dev.address, len(late), self.q.qid, self.timeout,
                  why)  # fmt: skip
        for tag in late:
            self._cid[tag] = -1
            self.out -= 1
        return [(tag, -errno.ETIMEDOUT) for tag in late]

    def close(self) -> None:
        self.closed = True
        self._view.release()
        if self.out == 0:
            self.mem.close()  # else the controller may still write there: keep it mapped
