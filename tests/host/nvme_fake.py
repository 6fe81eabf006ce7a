"""A small NVMe controller model for host tests of the driver (no QEMU, no root).

It implements what the driver touches, from the specification rather than from the
driver: the registers (CAP, VS, CC, CSTS, AQA, ASQ, ACQ, doorbells; NVMe Base 2.0 §3.1),
queues in the driver's DMA buffers (SQEs read on a tail doorbell, CQEs posted with the phase
tag), Identify data built at the spec's byte offsets, Set Features (number of queues),
Create/Delete I/O queues, Abort, and Read/Write (following PRPs with
:func:`udrv.drivers.nvme.command.walk_prps`), Write Zeroes, Flush and Dataset Management on a
sparse disk. Tests steer it: hold commands (a lost completion), fail them with a status,
inject completions for unknown command ids, or read all-ones (a removed device).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from udrv.drivers.nvme import command as C
from udrv.errors import PollTimeout

PAGE = 4096
# Registers (NVMe Base 2.0 §3.1.4).
CAP, VS, INTMS, CC, CSTS, AQA, ASQ, ACQ = 0x00, 0x08, 0x0C, 0x14, 0x1C, 0x24, 0x28, 0x30


class FakeBuffer:
    def __init__(self, dma: FakeDma, size: int, iova: int) -> None:
        self.dma, self.size, self.iova = dma, size, iova
        self.array = np.zeros(size, dtype=np.uint8)
        self.closed = False

    def memoryview(self) -> memoryview:
        return memoryview(self.array).cast("B")

    def close(self) -> None:
        self.closed = True


class FakeDma:
    """Page-aligned buffers at made-up IOVAs; the model resolves IOVAs through it."""

    def __init__(self) -> None:
        self.buffers: list[FakeBuffer] = []
        self._next = 0x1_0000_0000

    def alloc(self, size: int) -> FakeBuffer:
        b = FakeBuffer(self, size, self._next)
        self._next += (size + PAGE - 1) // PAGE * PAGE + PAGE  # a guard page between buffers
        self.buffers.append(b)
        return b

    def at(self, iova: int, n: int) -> np.ndarray:
        """The ``n`` bytes at ``iova`` (they must lie in one buffer)."""
        for b in self.buffers:
            if b.iova <= iova and iova + n <= b.iova + b.size:
                return b.array[iova - b.iova : iova - b.iova + n]
        raise AssertionError(f"DMA to {iova:#x}+{n} outside every buffer")


@dataclass
class Queue:
    qid: int
    base: int
    size: int
    head: int = 0  # SQ: next entry to fetch; CQ: next entry to post
    phase: int = 1  # CQ only
    vector: int | None = None


@dataclass
class Held:
    qid: int
    cid: int
    sqe: Any


@dataclass
class Model:
    """Identify data and behaviour; defaults are those of QEMU's nvme device."""

    mqes: int = 2047
    mpsmin: int = 0  # CAP.MPSMIN: 2 ** (12 + n) bytes
    version: int = 0x0001_0400
    max_queues: int = 64
    mdts: int = 7
    nn: int = 1
    oncs: int = 0x0C  # DSM and Write Zeroes
    vwc: int = 1
    rtd3e: int = 0
    nsze: int = 65536
    lbafs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 9)])  # (MS, LBADS)
    flbas: int = 0
    dps: int = 0
    #: Called per I/O or admin command before it runs: return None to run it, "hold" to
    #: keep it (a lost completion), or a status field to complete it with.
    policy: Callable[[int, Any], Any] = lambda qid, sqe: None
    abort_works: bool = True


class FakeNvme:
    """The controller: registers in :meth:`read32` & co., DMA through ``dma``."""

    def __init__(self, model: Model | None = None) -> None:
        self.m = model or Model()
        self.dma = FakeDma()
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0
        self.removed = False
        self.sqs: dict[int, Queue] = {}
        self.cqs: dict[int, Queue] = {}
        self.held: list[Held] = []
        self.disk: dict[int, bytes] = {}  # block -> data (sparse)
        self.commands: list[tuple[int, Any]] = []  # (qid, SQE) in the order they ran
        self.dsm_ranges: list[list[tuple[int, int, int]]] = []  # per DSM: (attr, nlb, slba)
        self.disables = 0
        self.intms = 0
        self.events: list[str] = []  # "doorbell" writes, for ordering tests

    # -- registers -------------------------------------------------------------------------

    @property
    def bs(self) -> int:
        return 1 << self.m.lbafs[self.m.flbas & 0xF][1]

    def read64(self, off: int) -> int:
        if self.removed:
            return (1 << 64) - 1
        if off == CAP:
            return (self.m.mqes | 1 << 16 | 20 << 24 | 1 << 37 | self.m.mpsmin << 48
                    | 4 << 52)  # fmt: skip
        return self.read32(off) | self.read32(off + 4) << 32

    def read32(self, off: int) -> int:
        if self.removed:
            return 0xFFFF_FFFF
        return {CAP: self.read64(CAP) & 0xFFFF_FFFF, CAP + 4: self.read64(CAP) >> 32,
                VS: self.m.version, CC: self.cc, CSTS: self.csts, AQA: self.aqa}.get(off, 0)  # fmt: skip

    def write64(self, off: int, value: int) -> None:
        if off == ASQ:
            self.asq = value
        elif off == ACQ:
            self.acq = value

    def write32(self, off: int, value: int) -> None:
        if self.removed:
            return
        if off == CC:
            was = self.cc
            self.cc = value
            if value & 1 and not was & 1:
                self._enable()
            elif was & 1 and not value & 1:
                self._reset()
            if (value >> 14) & 3:
                self.csts = (self.csts & ~(3 << 2)) | 2 << 2  # shutdown complete
        elif off == AQA:
            self.aqa = value
        elif off == INTMS:
            self.intms |= value
        elif off >= 0x1000:
            n, cq = divmod((off - 0x1000) // 4, 2)
            self.events.append(f"{'cq' if cq else 'sq'}{n}")
            if not cq and self.cc & 1:
                self._fetch(n, value)

    # The Region methods the register map uses (udrv.core.region.Region).
    def read_width(self, off: int, width: int) -> int:
        return self.read64(off) if width == 8 else self.read32(off)

    def write_width(self, off: int, width: int, value: int) -> None:
        (self.write64 if width == 8 else self.write32)(off, value)

    def poll(self, off: int, mask: int, value: int, timeout: float, *, width: int = 4,
             **kw: Any) -> int:  # fmt: skip
        """The model answers at once: one read decides."""
        got = self.read_width(off, width)
        if got & mask != value:
            raise PollTimeout(f"{kw.get('name')}: {got:#x}")
        return got

    def poll32(self, off: int, mask: int, value: int, timeout: float, **kw: Any) -> int:
        return self.poll(off, mask, value, timeout, width=4, **kw)

    def _enable(self) -> None:
        self.sqs = {0: Queue(0, self.asq, (self.aqa & 0xFFF) + 1)}
        self.cqs = {0: Queue(0, self.acq, ((self.aqa >> 16) & 0xFFF) + 1, vector=0)}
        self.csts |= 1

    def _reset(self) -> None:
        """CC.EN 1 -> 0: every command is dropped, the queues are gone (Base §3.7.2)."""
        self.disables += 1
        self.held.clear()
        self.sqs, self.cqs = {}, {}
        self.csts &= ~1

    # -- queues ----------------------------------------------------------------------------

    def _fetch(self, qid: int, tail: int) -> None:
        sq = self.sqs[qid]
        while sq.head != tail:
            raw = self.dma.at(sq.base + 64 * sq.head, 64)
            sqe = raw.copy().view(C.SQE)[0]
            sq.head = (sq.head + 1) % sq.size
            self.commands.append((qid, sqe))
            verdict = self.m.policy(qid, sqe)
            if verdict == "hold":
                self.held.append(Held(qid, int(sqe["cid"]), sqe))
                continue
            if verdict is not None:
                self.post(qid, int(sqe["cid"]), status=verdict)
                continue
            status, dw0 = self._run(qid, sqe)
            self.post(qid, int(sqe["cid"]), status=status, dw0=dw0)

    def post(self, qid: int, cid: int, *, status: int = 0, dw0: int = 0) -> None:
        """Post a completion on queue ``qid``'s CQ (also for tests: a stray completion)."""
        cq = self.cqs[qid]
        sqhd = self.sqs[qid].head if qid in self.sqs else 0
        entry = struct.pack("<IIHHHH", dw0, 0, sqhd, qid, cid, (status << 1) | cq.phase)
        self.dma.at(cq.base + 16 * cq.head, 16)[:] = np.frombuffer(entry, dtype=np.uint8)
        cq.head += 1
        if cq.head == cq.size:
            cq.head, cq.phase = 0, cq.phase ^ 1

    def release(self, index: int = 0, status: int = 0) -> None:
        """Complete a held command after all."""
        h = self.held.pop(index)
        self.post(h.qid, h.cid, status=status)

    # -- commands --------------------------------------------------------------------------

    def _run(self, qid: int, e: Any) -> tuple[int, int]:
        op = int(e["opcode"])
        cdw10, cdw11 = int(e["cdw10"]), int(e["cdw11"])
        if qid == 0:
            if op == C.ADMIN_IDENTIFY:
                data = self._identify(cdw10 & 0xFF, int(e["nsid"]))
                if data is None:
                    return 0x02, 0  # invalid field in command
                self.dma.at(int(e["prp1"]), PAGE)[:] = np.frombuffer(data, dtype=np.uint8)
                return 0, 0
            if op == C.ADMIN_SET_FEATURES and cdw10 & 0xFF == C.FEAT_NUMBER_OF_QUEUES:
                n = min((cdw11 & 0xFFFF) + 1, self.m.max_queues) - 1
                return 0, n << 16 | n
            if op == C.ADMIN_CREATE_CQ:
                vec = cdw11 >> 16 if cdw11 & C.CQ_IEN else None
                self.cqs[cdw10 & 0xFFFF] = Queue(cdw10 & 0xFFFF, int(e["prp1"]),
                                                 (cdw10 >> 16) + 1, vector=vec)  # fmt: skip
                return 0, 0
            if op == C.ADMIN_CREATE_SQ:
                assert cdw11 >> 16 in self.cqs, "SQ created before its CQ"
                self.sqs[cdw10 & 0xFFFF] = Queue(cdw10 & 0xFFFF, int(e["prp1"]), (cdw10 >> 16) + 1)
                return 0, 0
            if op in (C.ADMIN_DELETE_SQ, C.ADMIN_DELETE_CQ):
                return 0, 0
            if op == C.ADMIN_ABORT:
                sqid, cid = cdw10 & 0xFFFF, cdw10 >> 16
                for i, h in enumerate(self.held):
                    if (h.qid, h.cid) == (sqid, cid) and self.m.abort_works:
                        self.held.pop(i)
                        self.post(sqid, cid, status=C.SC_ABORT_REQUESTED)
                        return 0, 0
                return 0, 1  # not aborted
            return 0x01, 0  # invalid opcode
        bs, slba = self.bs, cdw10 | cdw11 << 32
        nlb = (int(e["cdw12"]) & 0xFFFF) + 1
        if op in (C.NVM_READ, C.NVM_WRITE):
            data = bytearray(nlb * bs) if op == C.NVM_READ else bytearray()
            if op == C.NVM_READ:
                for i in range(nlb):
                    data[i * bs : (i + 1) * bs] = self.disk.get(slba + i, bytes(bs))
            pos = 0
            for addr, n in C.walk_prps(int(e["prp1"]), int(e["prp2"]), nlb * bs, self._entry):
                mem = self.dma.at(addr, n)
                if op == C.NVM_READ:
                    mem[:] = np.frombuffer(bytes(data[pos : pos + n]), dtype=np.uint8)
                else:
                    data += mem.tobytes()
                pos += n
            if op == C.NVM_WRITE:
                for i in range(nlb):
                    self.disk[slba + i] = bytes(data[i * bs : (i + 1) * bs])
            return 0, 0
        if op == C.NVM_WRITE_ZEROES:
            if not self.m.oncs & 8:
                return 0x01, 0
            for i in range(nlb):
                self.disk.pop(slba + i, None)
            return 0, 0
        if op == C.NVM_DSM:
            if not self.m.oncs & 4:
                return 0x01, 0
            nr = (cdw10 & 0xFF) + 1
            r = self.dma.at(int(e["prp1"]), 16 * nr).copy().view(C.DSM_RANGE)
            self.dsm_ranges.append([(int(x["attributes"]), int(x["nlb"]), int(x["slba"]))
                                    for x in r])  # fmt: skip
            return 0, 0
        if op == C.NVM_FLUSH:
            return 0, 0
        return 0x01, 0

    def _entry(self, iova: int) -> int:
        return int(self.dma.at(iova, 8).view("<u8")[0])

    def _identify(self, cns: int, nsid: int) -> bytes | None:
        d = bytearray(PAGE)
        m = self.m
        if cns == C.CNS_CONTROLLER:  # Base 2.0 figure 275
            d[0:2] = (0x1B36).to_bytes(2, "little")
            d[4:24] = b"fake-serial".ljust(20)
            d[24:64] = b"Fake NVMe".ljust(40)
            d[64:72] = b"1.0".ljust(8)
            d[77] = m.mdts
            d[80:84] = m.version.to_bytes(4, "little")
            d[88:92] = m.rtd3e.to_bytes(4, "little")
            d[516:520] = m.nn.to_bytes(4, "little")
            d[520:522] = m.oncs.to_bytes(2, "little")
            d[525] = m.vwc
        elif cns == C.CNS_NAMESPACE:  # NVM Command Set 1.0 figure 97
            d[0:8] = m.nsze.to_bytes(8, "little")
            d[8:16] = m.nsze.to_bytes(8, "little")
            d[25] = len(m.lbafs) - 1
            d[26] = m.flbas
            d[29] = m.dps
            for i, (ms, lbads) in enumerate(m.lbafs):
                d[128 + 4 * i : 132 + 4 * i] = (ms | lbads << 16).to_bytes(4, "little")
        elif cns == C.CNS_ACTIVE_NS_LIST:
            if m.version < 0x0001_0100:
                return None  # CNS 02h is reserved before 1.1
            for i in range(m.nn):
                d[4 * i : 4 * i + 4] = (i + 1).to_bytes(4, "little")
        else:
            return None
        return bytes(d)


class FakeConfig:
    def read32(self, off: int) -> int:
        assert off == 0x08
        return 0x0108_0200  # class 01 08 02 (NVMe), revision 0


class FakeVector:
    def __init__(self, n: int) -> None:
        self.n = n

    def poll(self) -> int:
        return 0

    def fileno(self) -> int:
        return -1


class FakeIrq:
    def __init__(self, msix: int) -> None:
        self.msix = msix
        self.calls: list[tuple[str, int]] = []  # enable() calls
        self.vectors: list[FakeVector] = []

    def available(self) -> dict[str, int]:
        return {"msix": self.msix}

    @property
    def enabled(self) -> str | None:
        return "msix" if self.vectors else None

    def enable(self, kind: str, count: int) -> list[FakeVector]:
        assert count <= self.msix and not self.vectors
        self.calls.append((kind, count))
        self.vectors = [FakeVector(i) for i in range(count)]
        return list(self.vectors)

    def disable(self) -> None:
        self.vectors = []


class FakeDevice:
    """What ``Nvme`` needs of a ``udrv.core.device.Device``."""

    address = "0000:00:05.0"

    def __init__(self, ctrl: FakeNvme, msix: int = 0) -> None:
        self.ctrl, self.config, self.irq = ctrl, FakeConfig(), FakeIrq(msix)
        self.dma = ctrl.dma
        self.closed = False
        self.bus_master = False

    def set_bus_master(self, on: bool = True) -> None:
        self.bus_master = on

    def bar(self, n: int) -> FakeNvme:
        assert n == 0
        return self.ctrl
