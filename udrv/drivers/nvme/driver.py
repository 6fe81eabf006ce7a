"""The NVMe driver: controller bring-up, admin queue, I/O queue pairs, PRPs, shutdown.

Reads like NVMe Base Spec 1.4 section 7.6.1 ("Initialization"): disable, wait for not ready,
admin queue attributes and bases, enable, wait for ready, Identify, Set Features (number of
queues), create the I/O completion and submission queues. Completions are polled (the phase
tag flips each pass through a queue, 4.6); every command has a deadline, and a timeout checks
CSTS.CFS so that a dead controller is reported as such.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.core.device import Device
from udrv.drivers.nvme import regs as R
from udrv.errors import DriverError, PollTimeout
from udrv.irq import Vector

PAGE = 4096
#: A submission queue entry (4.2, figure 105): CDW0 (opcode, CID), NSID, CDW2-3, MPTR,
#: PRP1, PRP2, CDW10-12; CDW13-15 zero.
_SQE = struct.Struct("<II8x8xQQIII12x")
assert _SQE.size == 64


class NvmeError(DriverError):
    """A command failed or the controller is not usable. ``status`` carries SCT/SC when known."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Controller:
    vid: int
    serial: str
    model: str
    firmware: str
    mdts: int  # max transfer in bytes (0: no limit)
    namespaces: int


@dataclass(frozen=True)
class Namespace:
    nsid: int
    blocks: int
    block_size: int

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def _text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip()


class QueuePair:
    """A submission queue and its completion queue in one DMA buffer (polled)."""

    def __init__(self, nvme: Nvme, qid: int, depth: int) -> None:
        self.nvme, self.qid, self.depth = nvme, qid, depth
        self.mem = nvme.dma.alloc(depth * 64 + ((depth * 16 + PAGE - 1) // PAGE) * PAGE + PAGE)
        self.sq = self.mem.array[: depth * 64].view("<u4").reshape(depth, 16)  # R.SQE entries
        cq_off = (depth * 64 + PAGE - 1) // PAGE * PAGE
        self.cq = self.mem.array[cq_off : cq_off + depth * 16].view(R.CQE)
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

    def submit(self, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0,
               timeout: float = 5.0) -> int:  # fmt: skip
        """Submit one command and wait for its completion; returns completion DW0."""
        with self.lock:
            if (self.tail + 1) % self.depth == self.head:
                raise NvmeError(f"queue {self.qid} is full")
            self.cid = (self.cid + 1) & 0xFFFF
            e = self.sq[self.tail]
            e[:] = 0
            e[0] = opcode | (self.cid << 16)
            e[1] = nsid
            e[6], e[7] = prp1 & 0xFFFFFFFF, prp1 >> 32
            e[8], e[9] = prp2 & 0xFFFFFFFF, prp2 >> 32
            e[10], e[11], e[12], e[13] = cdw10, cdw11, cdw12, cdw13
            self.tail = (self.tail + 1) % self.depth
            self.nvme.bar.write32(self.sq_doorbell, self.tail)  # x86: the SQE is visible first
            return self._complete(self.cid, opcode, timeout)

    # -- the asynchronous path: push commands, reap completions (4.1, 4.6) ------------------

    def push(self, opcode: int, cid: int, nsid: int, prp1: int, prp2: int, cdw10: int = 0,
             cdw11: int = 0, cdw12: int = 0, *, doorbell: bool = True) -> None:  # fmt: skip
        """Write one SQE with command id ``cid`` and ring the doorbell (or leave that to
        :meth:`ring_sq_doorbell`, one write for a batch); do not wait.

        The caller keeps at most depth - 1 commands in flight (a full queue has tail + 1 ==
        head, 4.1.2), each with a distinct ``cid``.
        """
        _SQE.pack_into(self._sq_raw, self.tail * 64, opcode | (cid << 16), nsid, prp1, prp2,
                       cdw10, cdw11, cdw12)  # fmt: skip
        self.tail = (self.tail + 1) % self.depth
        if doorbell:
            self.nvme.bar.write32(self.sq_doorbell, self.tail)  # x86: the SQE is visible first

    def ring_sq_doorbell(self) -> None:
        """Hand the controller every SQE pushed so far (SQ tail doorbell, 3.1.24)."""
        self.nvme.bar.write32(self.sq_doorbell, self.tail)

    def reap(self) -> list[tuple[int, int, int]]:
        """Consume every new completion: ``[(cid, status, dw0)]``; one CQ doorbell write."""
        done = []
        words, head, phase = self._cq_words, self.head, self.phase
        while True:
            dw3 = words[head * 4 + 3]
            if (dw3 >> 16) & 1 != phase:
                break
            done.append((dw3 & 0xFFFF, dw3 >> 17, words[head * 4]))
            head += 1
            if head == self.depth:
                head, phase = 0, phase ^ 1
        if done:
            self.nvme.sq_heads[self.qid] = words[(head - 1) % self.depth * 4 + 2] & 0xFFFF
            self.head, self.phase = head, phase
            self.nvme.bar.write32(self.cq_doorbell, head)
        return done

    def _complete(self, cid: int, opcode: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        cq = self.cq
        while True:
            entry = cq[self.head]
            if (int(entry["status"]) & 1) == self.phase:
                status, dw0, got = int(entry["status"]) >> 1, int(entry["dw0"]), int(entry["cid"])
                self.nvme.sq_heads[self.qid] = int(entry["sqhd"])
                self.head += 1
                if self.head == self.depth:
                    self.head, self.phase = 0, self.phase ^ 1
                self.nvme.bar.write32(self.cq_doorbell, self.head)
                if got != cid:
                    raise NvmeError(
                        f"queue {self.qid}: completion for command {got}, expected {cid}"
                    )
                if status & 0x7FF:
                    raise NvmeError(f"command {opcode:#04x} on queue {self.qid} failed: "
                                    f"{R.describe_status(status)}", status)  # fmt: skip
                return dw0
            if time.monotonic() > deadline:
                csts = self.nvme.bar.read32(R.CSTS)
                fatal = (
                    " (controller fatal status: CSTS.CFS is set; reset it)"
                    if csts & R.CSTS_CFS
                    else ""
                )
                raise PollTimeout(f"{self.nvme.dev.address}: command {opcode:#04x} on queue {self.qid} "
                                  f"did not complete within {timeout:g} s{fatal}")  # fmt: skip


class Nvme(BlockDriver):
    """An NVMe controller and its first namespace, as a block driver.

    Args:
        device: from ``udrv.open(...)`` (VFIO).
        queues: I/O queue pairs to create.
        depth: entries per I/O queue (at most CAP.MQES + 1).
        nsid: the namespace served as a block device.
        timeout: seconds before a command counts as lost.
        interrupts: give each I/O completion queue an MSI-X vector (``QueuePair.vector``)
            when the device offers MSI-X; otherwise completions are only polled. The
            synchronous methods always poll; :class:`~udrv.drivers.nvme.aio.AsyncNvme`
            waits on the vectors.
    """

    def __init__(self, device: Device, *, queues: int = 1, depth: int = 64, nsid: int = 1,
                 timeout: float = 5.0, interrupts: bool = True) -> None:  # fmt: skip
        self.dev = device
        cls = device.config.read32(0x08) >> 8
        if cls != 0x010802:
            raise NvmeError(
                f"{device.address} has class {cls:06x}, not an NVMe controller (010802)"
            )
        self.bar = device.bar(0)
        self.timeout = timeout
        device.set_bus_master()  # queues and data are DMA: undone by close()
        self.dma = device.dma
        cap = self.bar.read64(R.CAP)
        self.mqes = (cap & R.CAP_MQES_MASK) + 1
        if not 2 <= depth <= self.mqes:
            raise NvmeError(
                f"queue depth {depth} is outside 2..{self.mqes} (CAP.MQES + 1 of {device.address})"
            )
        self.ready_timeout = max(((cap >> R.CAP_TO_SHIFT) & R.CAP_TO_MASK) * 0.5, 0.5)
        self.doorbell_stride = 4 << ((cap >> R.CAP_DSTRD_SHIFT) & R.CAP_DSTRD_MASK)
        if not cap & R.CAP_CSS_NVM:
            raise NvmeError(f"{device.address} does not support the NVM command set")
        self.sq_heads: dict[int, int] = {}
        self._disable()
        self.admin = QueuePair(self, 0, 32)
        self.bar.write32(R.AQA, ((32 - 1) << 16) | (32 - 1))
        self.bar.write64(R.ASQ, self.admin.sq_iova)
        self.bar.write64(R.ACQ, self.admin.cq_iova)
        self.bar.write32(
            R.CC,
            R.CC_EN
            | R.CC_CSS_NVM
            | (0 << R.CC_MPS_SHIFT)
            | R.CC_AMS_RR
            | R.CC_IOSQES
            | R.CC_IOCQES,
        )
        self._wait_ready(True)
        self._scratch = self.dma.alloc(PAGE)
        self.controller = self.identify_controller()
        ns_list = self.active_namespaces()
        if not ns_list:
            raise NvmeError(f"{device.address} has no active namespace; create one (QEMU: nvme-ns)")
        if nsid not in ns_list:
            raise NvmeError(f"{device.address} has no namespace {nsid}; active: {ns_list}")
        self.namespace = self.identify_namespace(nsid)
        max_transfer = self.controller.mdts or 1 << 20
        self.geometry = BlockGeometry(
            block_size=self.namespace.block_size, num_blocks=self.namespace.blocks,
            max_transfer=min(max_transfer, 512 * 1024), volatile_cache=True, discard=True, write_zeroes=True,
        )  # fmt: skip
        granted = self.admin.submit(R.ADMIN_SET_FEATURES, cdw10=R.FEAT_NUMBER_OF_QUEUES,
                                    cdw11=((queues - 1) << 16) | (queues - 1))  # fmt: skip
        nq = min((granted & 0xFFFF) + 1, (granted >> 16) + 1, queues)
        vectors = self._enable_msix(nq) if interrupts else []
        self.io: list[QueuePair] = []
        for qid in range(1, nq + 1):
            q = QueuePair(self, qid, depth)
            # Create I/O CQ (5.3): CDW11 = interrupt vector << 16 | IEN (bit 1) | PC (bit 0).
            cdw11 = R.CQ_PC | ((qid << 16) | R.CQ_IEN if vectors else 0)
            self.admin.submit(
                R.ADMIN_CREATE_CQ, prp1=q.cq_iova, cdw10=((depth - 1) << 16) | qid, cdw11=cdw11
            )
            q.vector = vectors[qid] if vectors else None
            self.admin.submit(R.ADMIN_CREATE_SQ, prp1=q.sq_iova, cdw10=((depth - 1) << 16) | qid,
                              cdw11=(qid << 16) | 1)  # fmt: skip
            self.io.append(q)
        # Bounce buffers, one per queue: transfers up to max_transfer, plus a PRP list page.
        self._bounce = [self.dma.alloc(self.geometry.max_transfer + PAGE) for _ in self.io]
        self._next_q = 0

    def _enable_msix(self, nq: int) -> list[Vector]:
        """MSI-X vectors 0 (admin) .. nq (I/O queue nq), or [] if the device has too few."""
        irq = self.dev.irq
        if irq.available().get("msix", 0) < nq + 1:
            return []
        return irq.enable("msix", nq + 1)

    # -- controller state (7.6.1, 7.6.2) -----------------------------------------------------

    def _disable(self) -> None:
        cc = self.bar.read32(R.CC)
        if cc & R.CC_EN:
            self.bar.write32(R.CC, cc & ~R.CC_EN)
        self._wait_ready(False)

    def _wait_ready(self, ready: bool) -> None:
        try:
            self.bar.poll32(R.CSTS, R.CSTS_RDY, R.CSTS_RDY if ready else 0,
                            timeout=self.ready_timeout, name="CSTS")  # fmt: skip
        except PollTimeout:
            csts = self.bar.read32(R.CSTS)
            why = "controller fatal status (CSTS.CFS)" if csts & R.CSTS_CFS else f"CSTS={csts:#x}"
            raise NvmeError(f"{self.dev.address} did not become {'ready' if ready else 'disabled'} "
                            f"within CAP.TO = {self.ready_timeout:g} s: {why}") from None  # fmt: skip

    def shutdown(self) -> None:
        """Normal shutdown (CC.SHN = 01, wait for CSTS.SHST = complete; 7.6.2)."""
        for q in reversed(self.io):
            self.admin.submit(R.ADMIN_DELETE_SQ, cdw10=q.qid)
            self.admin.submit(R.ADMIN_DELETE_CQ, cdw10=q.qid)
        cc = self.bar.read32(R.CC)
        self.bar.write32(R.CC, (cc & ~R.CC_SHN_MASK) | R.CC_SHN_NORMAL)
        self.bar.poll32(R.CSTS, R.CSTS_SHST_MASK, R.CSTS_SHST_COMPLETE, timeout=self.ready_timeout,
                        name="CSTS.SHST")  # fmt: skip

    # -- identify (5.15) -----------------------------------------------------------------------

    def _identify(self, cns: int, nsid: int = 0) -> bytes:
        self.admin.submit(R.ADMIN_IDENTIFY, nsid=nsid, prp1=self._scratch.iova, cdw10=cns)
        return bytes(self._scratch.array[:PAGE])

    def identify_controller(self) -> Controller:
        d = self._identify(R.CNS_CONTROLLER)
        mps_min = 1 << (12 + ((self.bar.read64(R.CAP) >> R.CAP_MPSMIN_SHIFT) & 0xF))
        mdts = d[77]
        return Controller(
            vid=int.from_bytes(d[0:2], "little"), serial=_text(d[4:24]), model=_text(d[24:64]),
            firmware=_text(d[64:72]), mdts=(1 << mdts) * mps_min if mdts else 0,
            namespaces=int.from_bytes(d[516:520], "little"),
        )  # fmt: skip

    def active_namespaces(self) -> list[int]:
        ids = np.frombuffer(self._identify(R.CNS_ACTIVE_NS_LIST), dtype="<u4")
        return [int(x) for x in ids if x]

    def identify_namespace(self, nsid: int) -> Namespace:
        d = self._identify(R.CNS_NAMESPACE, nsid)
        nsze = int.from_bytes(d[0:8], "little")
        lbaf = d[128 + 4 * (d[26] & 0xF) : 132 + 4 * (d[26] & 0xF)]
        return Namespace(nsid, nsze, 1 << lbaf[2])

    # -- I/O (6) -------------------------------------------------------------------------------

    def _queue(self) -> tuple[QueuePair, Any]:
        i = self._next_q
        self._next_q = (i + 1) % len(self.io)
        return self.io[i], self._bounce[i]

    def _prps(self, buf: Any, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for ``length`` bytes at the start of the (page-aligned) bounce buffer (4.3)."""
        pages = (length + PAGE - 1) // PAGE
        prp1 = buf.iova
        if pages <= 1:
            return prp1, 0
        if pages == 2:
            return prp1, buf.iova + PAGE
        # A PRP list in the bounce buffer's last page: entries for pages 2..n.
        list_off = self.geometry.max_transfer
        entries = buf.array[list_off : list_off + 8 * (pages - 1)].view("<u8")
        entries[:] = buf.iova + PAGE * np.arange(1, pages, dtype=np.uint64)
        return prp1, buf.iova + list_off

    def read(self, offset: int, buf: memoryview) -> None:
        step = self.geometry.max_transfer
        q, bounce = self._queue()
        with q.busy:
            for pos in range(0, len(buf), step):
                n = min(step, len(buf) - pos)
                self._rw_on(q, R.NVM_READ, offset + pos, n, bounce)
                buf[pos : pos + n] = bounce.array[:n]

    def write(self, offset: int, data: memoryview) -> None:
        step = self.geometry.max_transfer
        q, bounce = self._queue()
        with q.busy:
            for pos in range(0, len(data), step):
                n = min(step, len(data) - pos)
                bounce.array[:n] = np.frombuffer(data[pos : pos + n], dtype=np.uint8)
                self._rw_on(q, R.NVM_WRITE, offset + pos, n, bounce)

    def _rw_on(self, q: QueuePair, opcode: int, offset: int, length: int, buf: Any) -> None:
        self.geometry.check(offset, length, "NVMe I/O")
        bs = self.namespace.block_size
        prp1, prp2 = self._prps(buf, length)
        slba, nlb = offset // bs, length // bs - 1
        q.submit(opcode, nsid=self.namespace.nsid, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                 cdw11=slba >> 32, cdw12=nlb, timeout=self.timeout)  # fmt: skip

    def flush(self) -> None:
        self.io[0].submit(R.NVM_FLUSH, nsid=self.namespace.nsid, timeout=self.timeout)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.geometry.check(offset, length, "NVMe write zeroes")
        bs = self.namespace.block_size
        for pos in range(offset, offset + length, 0x10000 * bs):
            n = min(0x10000 * bs, offset + length - pos)
            slba = pos // bs
            self.io[0].submit(R.NVM_WRITE_ZEROES, nsid=self.namespace.nsid, cdw10=slba & 0xFFFFFFFF,
                              cdw11=slba >> 32, cdw12=n // bs - 1, timeout=self.timeout)  # fmt: skip

    def discard(self, offset: int, length: int) -> None:
        """Dataset Management with Deallocate (6.7): one range per 2**32 - 1 blocks."""
        self.geometry.check(offset, length, "NVMe discard")
        bs = self.namespace.block_size
        q, bounce = self._queue()
        with q.busy:
            rng = bounce.array[:16].view("<u4")
            rng[0], rng[1] = 0, length // bs  # context attributes, length in blocks
            bounce.array[8:16].view("<u8")[0] = offset // bs  # starting LBA
            q.submit(R.NVM_DSM, nsid=self.namespace.nsid, prp1=bounce.iova, cdw10=0, cdw11=R.DSM_AD,
                     timeout=self.timeout)  # fmt: skip

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
