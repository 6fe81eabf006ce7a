"""An NVMe I/O queue pair as a blk-mq style hardware queue (``udrv.block.queue``).

What Linux's nvme driver does in ``nvme_queue_rq`` / ``nvme_commit_rqs`` / ``nvme_irq``:
request ``tag`` becomes one command (command id = tag, plus a 4-bit generation so that a
late completion of an expired command is recognised), several go out under one SQ tail
doorbell write, and the completion queue is reaped when its MSI-X vector fires.

Each tag owns ``max_transfer`` bytes of DMA memory that the request's data passes through,
and the controller reads and writes it directly: ublk lends it to the kernel as the
request's buffer, NBD copies a WRITE's payload into it from the socket's bytes and sends a
READ's reply straight from it.
Since a tag's buffer never moves, its PRP list (4.3) is written once, when the queue is
made; a request of more than two pages points PRP2 at it.
"""

from __future__ import annotations

import errno
import logging
import math

from udrv.block.queue import HardwareQueue, Op
from udrv.drivers.nvme import command as C
from udrv.drivers.nvme.driver import PAGE, Nvme, NvmeError, QueuePair

log = logging.getLogger(__name__)
GEN_SHIFT, TAG_MASK = 12, 0xFFF  # command id = generation << 12 | tag (tags < 4096)
_ERROR = C.SF_ERROR_MASK  # a module global: one lookup less per completion
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = map(int, (Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD,
                                                      Op.WRITE_ZEROES))  # fmt: skip


class NvmeHardwareQueue(HardwareQueue):
    """I/O queue pair ``q`` of ``nvme`` serving requests ``0 .. tags - 1``.

    A tag (and its buffer) belongs to the controller from :meth:`queue_rq` until its
    completion is reaped, and never returns to the frontend earlier: a late READ would
    otherwise write into a buffer the kernel has reused. So, as Linux's ``nvme_timeout``:

    - a command out for longer than ``timeout`` is aborted (Abort, Base §5.1) and stays out;
      its completion (normally "Command Abort Requested") ends it with ``-ETIMEDOUT``;
    - a command still out a ``timeout`` after its Abort gets the controller disabled
      (:meth:`Nvme.fail`: a disabled controller has dropped every command, Base §3.7.2), and
      only then are its tag and every other outstanding tag failed with ``-EIO``;
    - a failure the controller marks retryable (DNR = 0) is resubmitted up to
      ``nvme.retries`` times;
    - a completion with a command id not out (a stale generation, a bad device) is
      consumed, counted in ``q.stray`` and logged.

    Args:
        max_transfer: bytes per tag's buffer (at most MDTS, and 512 pages: one PRP list page).
        timeout: seconds before :meth:`expire` aborts a command (counted in its calls, about
            one a second, as Linux counts jiffies).
    """

    def __init__(self, nvme: Nvme, q: QueuePair, tags: int, *, max_transfer: int,
                 timeout: float) -> None:  # fmt: skip
        if tags > q.depth - 1:  # a full queue keeps one entry empty (Base §3.3.1.4)
            raise NvmeError(f"{nvme.dev.address}: I/O queue {q.qid} holds {q.depth - 1} "
                            f"commands, not {tags}; create the Nvme with depth >= {tags + 1}")  # fmt: skip
        if max_transfer % PAGE or not PAGE <= max_transfer <= 512 * PAGE:
            raise NvmeError(f"max_transfer {max_transfer}: need a multiple of {PAGE} up to 2 MiB")
        self.nvme, self.q, self.tags, self.buffer_size = nvme, q, tags, max_transfer
        self.timeout = timeout
        self._ticks, self._tick = math.ceil(timeout), 0
        self.nsid, self.bs = nvme.namespace.nsid, nvme.namespace.block_size
        g = nvme.geometry
        self._discard, self._max_wz = g.discard, g.max_write_zeroes if g.write_zeroes else 0
        data = tags * max_transfer
        self.mem = nvme.dma.alloc(data + tags * PAGE)  # the buffers, then a PRP list per tag
        self._view = self.mem.memoryview()
        self._base = self.mem.array.ctypes.data
        self._iova = [self.mem.iova + t * max_transfer for t in range(tags)]
        lists = self.mem.array[data:].view("<u8").reshape(tags, PAGE // 8)
        self._prps = [C.PrpTable(self._iova[t], max_transfer, lists[t],
                                 self.mem.iova + data + t * PAGE).prps for t in range(tags)]  # fmt: skip
        self._cid = [-1] * tags  # the command id out for each tag, or -1
        self._op = [0] * tags  # its request, to rebuild the command for a retry
        self._off = [0] * tags
        self._gen = [0] * tags
        self._len = [0] * tags
        self._tries = [0] * tags
        self._since = [0] * tags  # the tick it was queued in
        self._aborted = [-1] * tags  # the tick its Abort was sent in, or -1
        self.out = 0  # commands the controller holds
        self.retried = 0  # retryable failures resubmitted
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

    def steer_interrupt(self, cpus: set[int]) -> bool:
        """Have the kernel take this queue's MSI-X vector on ``cpus``."""
        return self.q.vector is not None and self.q.vector.set_affinity(cpus)

    def queue_rq(self, tag: int, op: int, offset: int, length: int) -> int | None:
        if self.nvme.failed is not None:
            return -errno.EIO
        gen = (self._gen[tag] + 1) & 0xF
        cid = gen << GEN_SHIFT | tag
        if op <= WRITE:  # the hot path: no Command object
            if length > self.buffer_size:
                return -errno.EINVAL
            prp1, prp2 = self._prps[tag](length)
            bs = self.bs
            self.q.push_rw(C.NVM_READ if op == READ else C.NVM_WRITE, cid, self.nsid,
                           offset // bs, length // bs, prp1, prp2)  # fmt: skip
        else:
            cmd = self._command(tag, op, offset, length)
            if not isinstance(cmd, C.Command):
                return cmd
            self.q.push(cmd, cid, doorbell=False)
        self._gen[tag], self._cid[tag] = gen, cid
        self._op[tag], self._off[tag], self._len[tag] = op, offset, length
        self._tries[tag], self._since[tag], self._aborted[tag] = 0, self._tick, -1
        self.out += 1
        self._pushed = True
        return None

    def _command(self, tag: int, op: int, offset: int, length: int) -> C.Command | int:
        """Request ``tag`` as a command, or ``-errno`` if it cannot be one."""
        bs, nsid = self.bs, self.nsid
        if op <= WRITE:
            prp1, prp2 = self._prps[tag](length)
            return C.rw(C.NVM_READ if op == READ else C.NVM_WRITE, nsid, offset // bs,
                        length // bs, prp1, prp2)  # fmt: skip
        if op == FLUSH:
            return C.flush(nsid)
        if op == WRITE_ZEROES:
            if not self._max_wz:
                return -errno.EOPNOTSUPP
            if length > self._max_wz:  # the geometry tells ublk the limit (MDTS, 16-bit NLB)
                return -errno.EINVAL
            return C.write_zeroes(nsid, offset // bs, length // bs)
        if op == DISCARD:  # Dataset Management, Deallocate: ranges in the tag's buffer
            if not self._discard:
                return -errno.EOPNOTSUPP
            ranges = C.dsm_ranges(offset // bs, length // bs)
            if len(ranges) > C.DSM_MAX_RANGES:
                return -errno.EINVAL
            start = tag * self.buffer_size
            nr = C.write_dsm_ranges(self.mem.array[start : start + PAGE], ranges)
            return C.dsm(nsid, nr, self._iova[tag])
        return -errno.EOPNOTSUPP

    def _retry(self, tag: int) -> None:
        """Submit request ``tag`` again under a new command id."""
        cmd = self._command(tag, self._op[tag], self._off[tag], self._len[tag])
        assert isinstance(cmd, C.Command)  # it was accepted the first time
        gen = self._gen[tag] = (self._gen[tag] + 1) & 0xF
        cid = self._cid[tag] = gen << GEN_SHIFT | tag
        self._since[tag] = self._tick
        self.q.push(cmd, cid, doorbell=False)
        self.out += 1
        self._pushed = True

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
                self.q.stray += 1
                log.warning("%s: queue %d: completion for command id %#06x, which is not out; "
                            "dropped", self.nvme.dev.address, self.q.qid, cid)  # fmt: skip
                continue
            cids[tag] = -1
            self.out -= 1
            if not status & _ERROR:
                done.append((tag, self._len[tag]))
                continue
            aborted = self._aborted[tag] >= 0
            if not aborted and not status & C.SF_DNR and self._tries[tag] < self.nvme.retries:
                self._tries[tag] += 1
                self.retried += 1
                log.warning("%s: I/O command %#06x on queue %d failed (%s); retrying",
                            self.nvme.dev.address, cid, self.q.qid, C.describe_status(status))  # fmt: skip
                self._retry(tag)
                continue
            log.error("%s: I/O command %#06x on queue %d failed: %s%s", self.nvme.dev.address,
                      cid, self.q.qid, C.describe_status(status),
                      " (aborted after a timeout)" if aborted else "")  # fmt: skip
            done.append((tag, -errno.ETIMEDOUT if aborted else -errno.EIO))
        self.commit()  # retries
        return done

    def expire(self) -> list[tuple[int, int]]:
        """Abort commands out for over ``timeout``; disable the controller when an aborted
        one is still out a ``timeout`` later (or CSTS says the controller is dead or gone),
        and only then fail the outstanding tags."""
        self._tick += 1
        if self.nvme.failed is not None:
            return self._fail_all()
        if not self.out:
            return []
        oldest = self._tick - self._ticks - 1  # queued (or aborted) before this: > timeout
        late = [t for t, cid in enumerate(self._cid)
                if cid >= 0 and self._aborted[t] < 0 and self._since[t] <= oldest]  # fmt: skip
        stuck = [
            t for t, cid in enumerate(self._cid) if cid >= 0 and 0 <= self._aborted[t] <= oldest
        ]
        if not late and not stuck:
            return []
        what = (f"{self.nvme.dev.address}: {len(late) + len(stuck)} command(s) on queue "
                f"{self.q.qid} took over {self.timeout:g} s")  # fmt: skip
        try:
            self.nvme.check_csts(what)
        except NvmeError as exc:  # disabled (CFS) or removed: it owns nothing now
            log.error("%s", exc)
            return self._fail_all()
        if stuck:
            self.nvme.fail(f"{what}, and did not complete after an Abort")
            return self._fail_all()
        log.error("%s; aborting them", what)
        for tag in late:
            self._aborted[tag] = self._tick
            try:
                self.nvme.abort(self.q.qid, self._cid[tag])
            except (NvmeError, TimeoutError) as exc:
                log.error("%s: Abort of command %#06x failed: %s", self.nvme.dev.address,
                          self._cid[tag], exc)  # fmt: skip
        return []

    def _fail_all(self) -> list[tuple[int, int]]:
        """The controller is disabled or gone: every outstanding tag is the frontend's again."""
        failed = [t for t, cid in enumerate(self._cid) if cid >= 0]
        for tag in failed:
            self._cid[tag] = -1
        self.out = 0
        return [(tag, -errno.EIO) for tag in failed]

    def close(self) -> None:
        self.closed = True
        self._view.release()
        if self.out == 0:
            self.mem.close()  # else the controller may still write there: keep it mapped
