"""The NVMe driver: controller bring-up, admin queue, I/O queue pairs, PRPs, shutdown.

Reads like NVMe Base Spec 1.4 section 7.6.1 ("Initialization"; Base 2.0 §3.5.1): disable,
wait for not ready, admin queue attributes and bases, enable, wait for ready, Identify, Set
Features (number of queues), create the I/O completion and submission queues. Commands are
encoded by :mod:`udrv.drivers.nvme.command`. Completions are polled (the phase tag flips each
pass through a queue); every command has a deadline (Linux's: 30 s for I/O, 60 s for admin
commands). A command that misses it is aborted, and if it stays out the controller is disabled,
so that no buffer is reused while the controller may still write to it; CSTS reading all-ones
is reported as removal (:class:`NvmeRemovedError`), CSTS.CFS as a fatal controller error.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from types import TracebackType
from typing import Any

import numpy as np

from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.core.barrier import dma_rmb, wmb
from udrv.core.device import Device
from udrv.drivers.nvme import command as C
from udrv.drivers.nvme import regs as R
from udrv.drivers.nvme.command import PAGE
from udrv.drivers.nvme.identify import Controller, Namespace, parse_controller, parse_namespace
from udrv.errors import DriverError, PollTimeout
from udrv.irq import Vector

__all__ = ["PAGE", "Controller", "Namespace", "Nvme", "NvmeError", "NvmeRemovedError",
           "QueuePair"]  # fmt: skip

log = logging.getLogger(__name__)
ALL_ONES_64 = (1 << 64) - 1  # what a read of a removed device returns
VERSION_1_1 = 0x0001_0100  # VS: MJR 31:16, MNR 15:8 (Base §3.1.4.2)


class NvmeError(DriverError):
    """A command failed or the controller is not usable. ``status`` carries the CQE status
    field (SCT, SC, DNR; Base §4.2.3) when a command failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NvmeRemovedError(NvmeError):
    """The controller is gone: its registers read all-ones (surprise removal, power loss,
    a dead link). Not a controller error: nothing can be retried until it is back."""


class QueuePair:
    """A submission queue and its completion queue in one DMA buffer.

    Synchronous commands (:meth:`submit`) poll for their completion; the asynchronous paths
    :meth:`push` commands and :meth:`reap` completions themselves.
    """

    def __init__(self, nvme: Nvme, qid: int, depth: int) -> None:
        self.nvme, self.qid, self.depth = nvme, qid, depth
        self.mem = nvme.dma.alloc(depth * 64 + ((depth * 16 + PAGE - 1) // PAGE) * PAGE + PAGE)
        cq_off = (depth * 64 + PAGE - 1) // PAGE * PAGE
        self.cq = self.mem.array[cq_off : cq_off + depth * 16].view(C.CQE)
        self.sq_iova, self.cq_iova = self.mem.iova, self.mem.iova + cq_off
        self.tail = self.head = 0
        self.phase = 1
        self.cid = 0
        stride = nvme.doorbell_stride
        self.sq_doorbell = R.DOORBELLS + (2 * qid) * stride
        self.cq_doorbell = R.DOORBELLS + (2 * qid + 1) * stride
        self.lock = threading.Lock()  # the queue's entries and doorbells
        self.busy = threading.Lock()  # a whole request using this queue's bounce buffer
        # Scalar views for the hot path (push/reap): plain memoryviews are several times
        # cheaper per element than numpy scalars.
        raw = self.mem.memoryview()
        self._sq_raw = raw[: depth * 64]
        self._cq_words = raw[cq_off : cq_off + depth * 16].cast("I")
        self.vector: Vector | None = None  # MSI-X vector of the completion queue, if any
        self.stray = 0  # completions for a command id nobody waits for (counted, logged)

    # -- the synchronous path ------------------------------------------------------------------

    def submit(self, cmd: C.Command, timeout: float | None = None) -> int:
        """Submit ``cmd``, wait for its completion and return completion DW0.

        A failure the controller marks retryable (status DNR = 0) is submitted again, up to
        ``Nvme.retries`` times, as Linux's ``nvme_decide_disposition`` does.

        Args:
            cmd: from :mod:`udrv.drivers.nvme.command`.
            timeout: seconds; default the controller's I/O or admin timeout.

        Raises:
            NvmeError: the command failed (``status`` set), or the controller is unusable.
            NvmeRemovedError: the device is gone (its registers read all-ones).
            PollTimeout: no completion in time; the command was aborted, or the controller
                disabled so that it no longer owns any buffer.
        """
        nvme = self.nvme
        if timeout is None:
            timeout = nvme.admin_timeout if self.qid == 0 else nvme.timeout
        for attempt in range(nvme.retries + 1):
            status, dw0 = self._submit_once(cmd, timeout)
            if not status & C.SF_ERROR_MASK:
                return dw0
            if status & C.SF_DNR or attempt == nvme.retries:
                break
            log.warning("%s: command %#04x on queue %d failed (%s); retrying (%d of %d)",
                        nvme.dev.address, cmd.opcode, self.qid, C.describe_status(status),
                        attempt + 1, nvme.retries)  # fmt: skip
        raise NvmeError(f"{nvme.dev.address}: command {cmd.opcode:#04x} on queue {self.qid} "
                        f"failed: {C.describe_status(status)}", status)  # fmt: skip

    def _submit_once(self, cmd: C.Command, timeout: float) -> tuple[int, int]:
        nvme = self.nvme
        with self.lock:
            nvme.check_usable()
            # Full when the tail would reach the SQ head the controller last reported (SQHD,
            # Base §3.3.1.4); not the CQ head, which a stray completion moves too.
            if (self.tail + 1) % self.depth == nvme.sq_heads.get(self.qid, 0):
                raise NvmeError(f"{nvme.dev.address}: queue {self.qid} is full")
            self.cid = cid = (self.cid + 1) & 0xFFFF
            self.push(cmd, cid)
            found = self._wait(cid, time.monotonic() + timeout)
            if found is not None:
                return found
            return self._timed_out(cmd, cid, timeout)

    def _wait(self, cid: int, deadline: float) -> tuple[int, int] | None:
        """Reap until command ``cid`` completes: ``(status, dw0)``, or None at ``deadline``.
        Completions for other command ids (a late one of an aborted command, or a bad
        device) are consumed, counted and logged."""
        while True:
            for got, status, dw0 in self.reap():
                if got == cid:
                    return status, dw0
                self.stray += 1
                log.warning("%s: queue %d: completion for command id %d, which nobody waits "
                            "for (waiting for %d); dropped", self.nvme.dev.address, self.qid,
                            got, cid)  # fmt: skip
            if time.monotonic() > deadline:
                return None

    def _timed_out(self, cmd: C.Command, cid: int, timeout: float) -> tuple[int, int]:
        """Linux's ``nvme_timeout``: an I/O command is aborted (Abort, Base §5.1) and given
        one more period; if it is still out (or it was an admin command) the controller is
        disabled, which ends its ownership of every buffer (Base §3.7.2)."""
        nvme = self.nvme
        what = (f"{nvme.dev.address}: command {cmd.opcode:#04x} on queue {self.qid} did not "
                f"complete within {timeout:g} s")  # fmt: skip
        nvme.check_csts(what)
        if self.qid != 0:
            try:
                nvme.admin.submit(C.abort(self.qid, cid))
            except (NvmeError, PollTimeout) as exc:
                log.error("%s; Abort failed: %s", what, exc)
            else:
                found = self._wait(cid, time.monotonic() + timeout)
                if found is not None:
                    if not found[0] & C.SF_ERROR_MASK:
                        return found  # it finished after all
                    raise PollTimeout(f"{what}; aborted ({C.describe_status(found[0])})")
        nvme.fail(what)
        raise PollTimeout(f"{what}; the controller was disabled (it may no longer use this "
                          "process's buffers): open it again")  # fmt: skip

    # -- the asynchronous path: push commands, reap completions (Base §3.3.1) ----------------

    def push(self, cmd: C.Command, cid: int, *, doorbell: bool = True) -> None:
        """Write ``cmd`` as the next SQE with command id ``cid`` and ring the doorbell (or
        leave that to :meth:`ring_sq_doorbell`, one write for a batch); do not wait.

        The caller keeps at most depth - 1 commands in flight (a full queue has tail + 1 ==
        head, Base §3.3.1.4), each with a distinct ``cid``.
        """
        cmd.pack_into(self._sq_raw, self.tail * 64, cid)
        self.tail = (self.tail + 1) % self.depth
        if doorbell:
            wmb()  # the SQE is in memory before the doorbell makes the controller fetch it
            self.nvme.bar.write32(self.sq_doorbell, self.tail)

    def push_rw(self, opcode: int, cid: int, nsid: int, slba: int, nlb: int, prp1: int,
                prp2: int) -> None:  # fmt: skip
        """:meth:`push` a Read or Write (:func:`command.pack_rw`), leaving the doorbell to
        :meth:`ring_sq_doorbell`: the hardware queues' hot path."""
        C.pack_rw(self._sq_raw, self.tail * 64, cid, opcode, nsid, slba, nlb, prp1, prp2)
        self.tail = (self.tail + 1) % self.depth

    def ring_sq_doorbell(self) -> None:
        """Hand the controller every SQE pushed so far (SQ tail doorbell, Base §3.1.4.22)."""
        wmb()
        self.nvme.bar.write32(self.sq_doorbell, self.tail)

    def reap(self) -> list[tuple[int, int, int]]:
        """Consume every new completion: ``[(cid, status, dw0)]``; one CQ doorbell write.

        ``status`` is the CQE status field (DW3 bits 31:17; :data:`command.SF_DNR` etc.).
        """
        done = []
        words, head, phase = self._cq_words, self.head, self.phase
        while True:
            dw3 = words[head * 4 + 3]
            if (dw3 >> 16) & 1 != phase:
                break
            dma_rmb()  # the phase tag is new: only now read the rest of the entry
            dw3 = words[head * 4 + 3]
            done.append((dw3 & 0xFFFF, dw3 >> 17, words[head * 4]))
            head += 1
            if head == self.depth:
                head, phase = 0, phase ^ 1
        if done:
            self.nvme.sq_heads[self.qid] = words[(head - 1) % self.depth * 4 + 2] & 0xFFFF
            self.head, self.phase = head, phase
            self.nvme.bar.write32(self.cq_doorbell, head)
        return done


def vector_plan(available: int, queues: int) -> tuple[int, list[int | None]]:
    """MSI-X vectors to enable and the vector of each I/O queue (None: polled).

    With ``queues + 1`` vectors the admin queue has vector 0 and I/O queue ``i`` vector
    ``i``. With fewer, as Linux's ``nvme_setup_irqs``/``queue_irq_offset``, the admin queue
    shares vector 0 with I/O queue 1 (udrv polls the admin queue, so that only costs queue 1
    a spurious wakeup per admin command), and queues beyond the vectors are polled (Linux's
    poll queues) rather than every queue being polled.
    """
    if available <= 0 or queues <= 0:
        return 0, [None] * queues
    if available >= queues + 1:
        return queues + 1, list(range(1, queues + 1))
    return available, [i if i < available else None for i in range(queues)]


class Nvme(BlockDriver):
    """An NVMe controller and its first namespace, as a block driver.

    Args:
        device: from ``udrv.open(...)`` (VFIO).
        queues: I/O queue pairs to create.
        depth: entries per I/O queue (at most CAP.MQES + 1).
        nsid: the namespace served as a block device.
        timeout: seconds before an I/O command counts as lost (Linux's ``io_timeout``).
        admin_timeout: the same for admin commands (Linux's ``admin_timeout``).
        retries: times a failed command that the controller marks retryable (DNR = 0) is
            submitted again (Linux's ``max_retries``).
        shutdown_timeout: the least time a shutdown may take; RTD3E raises it up to
            60 s (Linux's ``shutdown_timeout``).
        interrupts: give I/O completion queues MSI-X vectors (``QueuePair.vector``) when the
            device offers MSI-X (see :func:`vector_plan`); otherwise completions are only
            polled. The synchronous methods always poll;
            :class:`~udrv.drivers.nvme.aio.AsyncNvme` waits on the vectors.

    Raises:
        NvmeError: not an NVMe controller, a configuration it cannot serve (its minimum page
            size, the namespace's format), or bring-up failed.
        NvmeRemovedError: the device reads all-ones.
    """

    #: Flush (Base 2.0 §7.1) commits the namespace's volatile write cache: everything the
    #: controller completed for the namespace before the Flush was submitted, on any queue.
    flush_per_queue = False

    def __init__(self, device: Device, *, queues: int = 1, depth: int = 64, nsid: int = 1,
                 timeout: float = 30.0, admin_timeout: float = 60.0, retries: int = 5,
                 shutdown_timeout: float = 5.0, interrupts: bool = True) -> None:  # fmt: skip
        self.dev = device
        cls = device.config.read32(0x08) >> 8
        if cls != 0x010802:
            raise NvmeError(
                f"{device.address} has class {cls:06x}, not an NVMe controller (010802)"
            )
        self.bar = device.bar(0)
        self.timeout, self.admin_timeout, self.retries = timeout, admin_timeout, retries
        self.failed: str | None = None
        self.owner = os.getpid()  # the process whose admin queue state this object holds
        self.dma = device.dma
        # Base §3.5.1 Initialization, through the register map (Base 2.0 §3.1.3).
        self.regs = R.NvmeRegs.for_controller(self.bar)
        if self.bar.read64(R.CAP) == ALL_ONES_64:
            raise NvmeRemovedError(f"{device.address}: CAP reads all-ones: the device is gone "
                                   "(removed, powered off or its link is down)")  # fmt: skip
        cap = self.regs.CAP.decode()
        self.mqes = cap["MQES"] + 1
        if not 2 <= depth <= self.mqes:
            raise NvmeError(
                f"queue depth {depth} is outside 2..{self.mqes} (CAP.MQES + 1 of {device.address})"
            )
        self.ready_timeout = max(cap["TO"] * 0.5, 0.5)  # CAP.TO is in 500 ms units
        self.doorbell_stride = 4 << cap["DSTRD"]
        if not cap["CSS"] & 1:  # CAP.CSS bit 0 (bit 37): NVM command set
            raise NvmeError(f"{device.address} does not support the NVM command set")
        self.mps_min = 1 << (12 + cap["MPSMIN"])
        check_page_size(device.address, self.mps_min)
        self.version = self.bar.read32(R.VS)
        self.sq_heads: dict[int, int] = {}
        self._disable()
        # Bus Master Enable only now that CSTS.RDY = 0 (Base 2.0 §3.5.1 starts initialisation
        # there): a controller a dead driver left enabled (UIO does not reset it between
        # owners) may still fetch from that driver's queues until it is disabled, and
        # those addresses are no longer its memory. Queues and data are DMA from here on;
        # close() undoes it.
        device.set_bus_master()
        self.admin = QueuePair(self, 0, 32)
        self.regs.AQA.write_fields(ASQS=32 - 1, ACQS=32 - 1)  # 0's based
        self.regs.ASQ.write(self.admin.sq_iova)
        self.regs.ACQ.write(self.admin.cq_iova)
        # 4 KiB pages (MPS 0), round robin, 64-byte SQEs and 16-byte CQEs (2 ** 6, 2 ** 4).
        self.regs.CC.write_fields(
            EN=1, CSS=R.CcCss.NVM, MPS=0, AMS=R.CcAms.ROUND_ROBIN, IOSQES=6, IOCQES=4
        )
        self._wait_ready(True)
        self._scratch = self.dma.alloc(PAGE)
        self.controller = self.identify_controller()
        self.shutdown_timeout = shutdown_time(self.controller.rtd3e, shutdown_timeout)
        ns_list = self.active_namespaces()
        if not ns_list:
            raise NvmeError(f"{device.address} has no active namespace; create one (QEMU: nvme-ns)")
        if nsid not in ns_list:
            raise NvmeError(f"{device.address} has no namespace {nsid}; active: {ns_list}")
        self.namespace = self.identify_namespace(nsid)
        why = self.namespace.unsupported()
        if why:
            raise NvmeError(f"{device.address}: cannot serve namespace {nsid}: {why}")
        self.geometry = geometry(self.controller, self.namespace)
        granted = self.admin.submit(C.set_features(C.FEAT_NUMBER_OF_QUEUES,
                                                   ((queues - 1) << 16) | (queues - 1)))  # fmt: skip
        nq = min((granted & 0xFFFF) + 1, (granted >> 16) + 1, queues)
        avail = self.dev.irq.available().get("msix", 0) if interrupts else 0
        count, plan = vector_plan(avail, nq)
        vectors = self.dev.irq.enable("msix", count) if count else []
        if not vectors:
            # Pin-based or MSI interrupts are not used: mask them all (INTMS, Base §3.1.4.3;
            # reserved under MSI-X, so only written here).
            self.bar.write32(R.INTMS, 0xFFFF_FFFF)
        self.io: list[QueuePair] = []
        for qid in range(1, nq + 1):
            q = QueuePair(self, qid, depth)
            vector = plan[qid - 1] if vectors else None
            self.admin.submit(C.create_io_cq(qid, depth, q.cq_iova, vector))
            q.vector = vectors[vector] if vector is not None else None
            self.admin.submit(C.create_io_sq(qid, depth, q.sq_iova, qid))
            self.io.append(q)
        # Bounce buffers, one per queue: transfers up to max_transfer, then a PRP list page.
        mt = self.geometry.max_transfer
        self._bounce = [self.dma.alloc(mt + PAGE) for _ in self.io]
        self._prp = [C.PrpTable(b.iova, mt, b.array[mt:].view("<u8"), b.iova + mt)
                     for b in self._bounce]  # fmt: skip
        self._next_q = 0

    # -- controller state (Base §3.5.1, §3.6) --------------------------------------------------

    def _disable(self) -> None:
        cc = self.regs.CC.read()
        if R.NvmeRegs.CC.fields["EN"].get(cc):
            self.regs.CC.write(R.NvmeRegs.CC.encode(cc, EN=0))
        self._wait_ready(False)

    def _wait_ready(self, ready: bool) -> None:
        try:
            self.regs.CSTS.poll(RDY=int(ready), timeout=self.ready_timeout)
        except PollTimeout:
            what = f"{self.dev.address} did not become {'ready' if ready else 'disabled'} within CAP.TO = {self.ready_timeout:g} s"
            self.check_csts(what)
            raise NvmeError(f"{what}: CSTS={self.bar.read32(R.CSTS):#x}") from None

    def check_csts(self, what: str) -> None:
        """After ``what`` went wrong: raise :class:`NvmeRemovedError` if CSTS reads all-ones
        (the device is gone: Linux's ``nvme_should_reset`` checks the same), or
        :class:`NvmeError` if CSTS.CFS says the controller hit a fatal error."""
        csts = self.bar.read32(R.CSTS)
        if csts == 0xFFFF_FFFF:
            self.failed = f"{what}; the device was removed"
            raise NvmeRemovedError(f"{what}: CSTS reads all-ones: the device is gone (removed, "
                                   "powered off or its link is down)")  # fmt: skip
        if csts & R.CSTS_CFS:
            self.fail(f"{what} (controller fatal status: CSTS.CFS)")
            raise NvmeError(f"{what}: the controller reports a fatal error (CSTS.CFS); it was "
                            "disabled: open it again to reset it")  # fmt: skip

    def check_usable(self) -> None:
        """Raise :class:`NvmeError` if :meth:`fail` disabled the controller."""
        if self.failed is not None:
            raise NvmeError(f"{self.dev.address}: the controller was disabled after: "
                            f"{self.failed}; open it again")  # fmt: skip

    def fail(self, reason: str) -> None:
        """Disable the controller (CC.EN = 0) after a lost command or a fatal error.

        A disabled controller has dropped every outstanding command (Base §3.7.2,
        "Controller Reset"), so buffers that timed-out commands owned are free again. Later
        commands raise :class:`NvmeError`; a new :class:`Nvme` re-initialises it.
        """
        if self.failed is None:
            self.failed = reason
            log.error("%s: disabling the controller: %s", self.dev.address, reason)
        try:
            self._disable()
        except NvmeError as exc:  # the device may be gone too; it owns nothing it can use
            log.error("%s: %s", self.dev.address, exc)

    def abort(self, sqid: int, cid: int) -> bool:
        """Ask the controller to abort command ``cid`` of queue ``sqid`` (Base §5.1).

        Returns:
            True if it will complete the command with "Command Abort Requested", False if it
            did not abort it (it may still complete normally).

        Raises:
            NvmeError: called in a forked process (a ublk queue worker): the admin queue's
                tail, head and phase live in the process that made the controller, and a
                second submitter would corrupt it. The caller escalates as when an Abort
                fails: a command still out a timeout later gets the controller disabled.
        """
        if os.getpid() != self.owner:
            raise NvmeError(f"{self.dev.address}: the admin queue belongs to process "
                            f"{self.owner}; process {os.getpid()} cannot send an Abort")  # fmt: skip
        return not self.admin.submit(C.abort(sqid, cid)) & 1

    def shutdown(self) -> None:
        """Normal shutdown (CC.SHN = 01, wait for CSTS.SHST = complete; Base §3.6.1).

        Waits :attr:`shutdown_timeout`: RTD3E from Identify Controller, clamped as Linux does,
        rather than CAP.TO, which bounds enabling and disabling, not shutting down.
        """
        if self.failed is not None:
            return  # disabled already: nothing to shut down
        try:
            for q in reversed(self.io):
                self.admin.submit(C.delete_io_sq(q.qid))
                self.admin.submit(C.delete_io_cq(q.qid))
        except (NvmeError, PollTimeout) as exc:  # shut down anyway
            log.error("%s: deleting the I/O queues: %s", self.dev.address, exc)
        cc = self.bar.read32(R.CC)
        self.bar.write32(R.CC, (cc & ~R.CC_SHN_MASK) | R.CC_SHN_NORMAL)
        self.bar.poll32(R.CSTS, R.CSTS_SHST_MASK, R.CSTS_SHST_COMPLETE,
                        timeout=self.shutdown_timeout, name="CSTS.SHST")  # fmt: skip

    # -- identify (Base §5.17) -----------------------------------------------------------------

    def _identify(self, cns: int, nsid: int = 0) -> bytes:
        self.admin.submit(C.identify(cns, self._scratch.iova, nsid=nsid))
        return bytes(self._scratch.array[:PAGE])

    def identify_controller(self) -> Controller:
        return parse_controller(self._identify(C.CNS_CONTROLLER), self.mps_min)

    def active_namespaces(self) -> list[int]:
        """Active namespace ids: Identify CNS 02h from NVMe 1.1 on; before, namespaces
        1..NN, as Linux's ``nvme_scan_ns_sequential`` (CNS 02h did not exist in 1.0)."""
        if self.version < VERSION_1_1:
            return list(range(1, self.controller.namespaces + 1))
        ids = np.frombuffer(self._identify(C.CNS_ACTIVE_NS_LIST), dtype="<u4")
        return [int(x) for x in ids if x]

    def identify_namespace(self, nsid: int) -> Namespace:
        return parse_namespace(nsid, self._identify(C.CNS_NAMESPACE, nsid))

    # -- I/O (NVM Command Set §3) --------------------------------------------------------------

    def _queue(self) -> tuple[QueuePair, Any, C.PrpTable]:
        i = self._next_q
        self._next_q = (i + 1) % len(self.io)
        return self.io[i], self._bounce[i], self._prp[i]

    def read(self, offset: int, buf: memoryview) -> None:
        self._transfer(C.NVM_READ, offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        self._transfer(C.NVM_WRITE, offset, data)

    def _transfer(self, opcode: int, offset: int, view: memoryview) -> None:
        """Read or write through a queue's bounce buffer, ``max_transfer`` at a time."""
        step = self.geometry.max_transfer
        q, bounce, prp = self._queue()
        with q.busy:
            for pos in range(0, len(view), step):
                n = min(step, len(view) - pos)
                if opcode == C.NVM_WRITE:
                    bounce.array[:n] = np.frombuffer(view[pos : pos + n], dtype=np.uint8)
                self._rw_on(q, opcode, offset + pos, n, prp)
                if opcode == C.NVM_READ:
                    view[pos : pos + n] = bounce.array[:n]

    def _rw_on(self, q: QueuePair, opcode: int, offset: int, length: int, prp: C.PrpTable) -> None:
        self.geometry.check(offset, length, "NVMe I/O")
        bs = self.namespace.block_size
        prp1, prp2 = prp.prps(length)
        q.submit(C.rw(opcode, self.namespace.nsid, offset // bs, length // bs, prp1, prp2))

    def flush(self) -> None:
        """Flush (NVM §3.2.2); a no-op for the controller when it has no volatile cache."""
        self.io[0].submit(C.flush(self.namespace.nsid))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write Zeroes (NVM §3.2.8), split at :attr:`BlockGeometry.max_write_zeroes`.

        Raises:
            NvmeError: the controller does not support Write Zeroes (ONCS bit 3).
        """
        self.require("write zeroes", self.geometry.write_zeroes, "ONCS bit 3 (Write Zeroes)")
        self.geometry.check(offset, length, "NVMe write zeroes")
        bs, step = self.namespace.block_size, self.geometry.max_write_zeroes
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            self.io[0].submit(C.write_zeroes(self.namespace.nsid, pos // bs, n // bs))

    def discard(self, offset: int, length: int) -> None:
        """Dataset Management with Deallocate (NVM §3.2.1): up to 256 ranges of up to
        2**32 - 1 blocks per command, as many commands as the length needs.

        Raises:
            NvmeError: the controller does not support Dataset Management (ONCS bit 2).
        """
        self.require("discard", self.geometry.discard, "ONCS bit 2 (Dataset Management)")
        self.geometry.check(offset, length, "NVMe discard")
        bs = self.namespace.block_size
        ranges = C.dsm_ranges(offset // bs, length // bs)
        q, bounce, _ = self._queue()
        with q.busy:
            for i in range(0, len(ranges), C.DSM_MAX_RANGES):
                nr = C.write_dsm_ranges(bounce.array, ranges[i : i + C.DSM_MAX_RANGES])
                q.submit(C.dsm(self.namespace.nsid, nr, bounce.iova))  # 4 KiB of ranges: PRP1

    def require(self, what: str, supported: bool, field: str) -> None:
        """Raise :class:`NvmeError` naming ``field`` unless ``supported``."""
        if not supported:
            raise NvmeError(f"{self.dev.address}: {what} is not supported: Identify Controller "
                            f"{field} is clear")  # fmt: skip

    def close(self) -> None:
        """Release what the driver enabled, in reverse order: shut the controller down
        (I/O queues deleted, CC.SHN), disable the MSI-X vectors, clear bus mastering, free
        the buffers and queue memory. The device stays open (and can take a new ``Nvme``);
        safe to call twice."""
        if self.dev.closed or self.admin.mem.closed:
            return
        try:
            self.shutdown()
        finally:
            if self.dev.irq.enabled:
                self.dev.irq.disable()
            self.dev.set_bus_master(False)  # the controller stops before its memory goes
            for b in [*self._bounce, self._scratch]:
                b.close()
            for q in [*reversed(self.io), self.admin]:
                q.mem.close()

    def __enter__(self) -> Nvme:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_page_size(address: str, mps_min: int) -> None:
    """Refuse a controller whose smallest memory page (CAP.MPSMIN) is larger than the 4 KiB
    pages udrv describes its buffers in (CC.MPS = 0) or than the host's pages."""
    host = mmap.PAGESIZE
    if mps_min > PAGE or mps_min > host:
        raise NvmeError(f"{address}: the controller's smallest memory page (CAP.MPSMIN) is "
                        f"{mps_min // 1024} KiB, larger than the host's {host // 1024} KiB pages "
                        f"and udrv's {PAGE // 1024} KiB PRP pages; udrv cannot drive it")  # fmt: skip


def shutdown_time(rtd3e_us: int, minimum: float = 5.0) -> float:
    """Seconds to wait for a shutdown: RTD3E rounded down to seconds, clamped to
    ``minimum``..60, or ``minimum`` when RTD3E is 0 (Linux's ``nvme_init_identify``:
    ``clamp_t(unsigned int, rtd3e / USEC_PER_SEC, shutdown_timeout, 60)``)."""
    if not rtd3e_us:
        return minimum
    return float(min(max(rtd3e_us // 1_000_000, minimum), 60))


def geometry(c: Controller, ns: Namespace) -> BlockGeometry:
    """What the block frontends may send: features only when Identify says the controller
    has them (ONCS, VWC), transfers within MDTS (and 512 KiB), Write Zeroes within MDTS
    (as Linux's ``max_zeroes_sectors``) and its 16-bit block count."""
    max_transfer = min(c.mdts or 1 << 20, 512 * 1024)
    wz = min(C.WZ_MAX_BLOCKS * ns.block_size, c.mdts or 1 << 62)
    return BlockGeometry(
        block_size=ns.block_size, num_blocks=ns.blocks, max_transfer=max_transfer,
        volatile_cache=c.volatile_cache, discard=c.discard, write_zeroes=c.write_zeroes,
        max_write_zeroes=wz if c.write_zeroes else 0,
    )  # fmt: skip
