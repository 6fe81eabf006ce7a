"""An NVMe controller model (NVMe Base Specification 1.4), one namespace in RAM or a file.

Controller registers (3.1: CAP, VS, CC, CSTS, AQA, ASQ, ACQ, doorbells), the admin queue
with Identify (controller, namespace, active namespace list), Create/Delete I/O SQ/CQ,
Set/Get Features (Number of Queues, Volatile Write Cache), and the NVM commands Read,
Write, Flush, Dataset Management (deallocate) and Write Zeroes with PRPs and PRP lists
(4.3). Each completion queue interrupts on its own MSI-X vector (or MSI/INTx).

Constants are written here from the specification, not imported from the driver, so that
the model can catch a driver's wrong number. Faults can be injected on purpose
(:attr:`NvmeModel.inject`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from udrv.errors import ModelError
from udrv.models.base import PciModel
from udrv.models.pci import ConfigSpace

PAGE_MIN = 4096
MDTS = 5  # Identify Controller byte 77: transfers up to 2**5 minimum pages
MDTS_BYTES = (1 << MDTS) * PAGE_MIN
CLASS_CODE = 0x010802  # mass storage, NVM, NVMe I/O controller
VENDOR_ID, DEVICE_ID = 0x1B36, 0x0010  # the ids QEMU's NVMe controller uses
BAR0_SIZE = 0x4000
MSIX_TABLE, MSIX_PBA = 0x2000, 0x3000

# 3.1 Controller registers
CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30  # fmt: skip
DOORBELL_BASE = 0x1000
CC_EN = 1 << 0
CC_SHN_SHIFT = 14
CSTS_RDY, CSTS_CFS = 1 << 0, 1 << 1
CSTS_SHST_COMPLETE = 2 << 2
VERSION_1_4 = 0x00010400

# 5 Admin command set opcodes
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY = 0x04, 0x05, 0x06
ADMIN_ABORT, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x08, 0x09, 0x0A
FEAT_VOLATILE_WRITE_CACHE, FEAT_NUMBER_OF_QUEUES = 0x06, 0x07
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NS_LIST = 0x00, 0x01, 0x02
# 6 NVM command set opcodes
NVM_FLUSH, NVM_WRITE, NVM_READ, NVM_WRITE_ZEROES, NVM_DSM = 0x00, 0x01, 0x02, 0x08, 0x09

# 4.6.1.2 status codes: (SCT << 8) | SC
SC_SUCCESS = 0x00
SC_INVALID_OPCODE = 0x01
SC_INVALID_FIELD = 0x02
SC_DATA_TRANSFER_ERROR = 0x04
SC_INVALID_NAMESPACE = 0x0B
SC_LBA_OUT_OF_RANGE = 0x80
SC_CQ_INVALID = 0x100  # SCT 1 (command specific), 5.4 Create I/O SQ
SC_INVALID_QID = 0x101
SC_INVALID_QSIZE = 0x102
SC_INVALID_VECTOR = 0x108
SC_INVALID_QUEUE_DELETION = 0x10C
DNR = 1 << 14  # do not retry


class CommandError(Exception):
    """Ends a command with a status (internal to the model)."""

    def __init__(self, status: int) -> None:
        self.status = status


@dataclass
class Queue:
    qid: int
    base: int
    size: int
    head: int = 0
    tail: int = 0
    phase: int = 1  # CQ: the phase tag the controller writes now
    cqid: int = 0  # SQ: its completion queue
    vector: int = 0  # CQ: interrupt vector
    ien: bool = False  # CQ: interrupts enabled


@dataclass
class Injections:
    """Faults the model produces on purpose (each fires once, then resets itself)."""

    wrong_cid: bool = False  # the next completion carries another command id
    status: int | None = None  # the next I/O command fails with this status
    drop_completion: bool = False  # the next command completes never
    extra: dict[str, int] = field(default_factory=dict)


class NvmeModel(PciModel):
    """An NVMe controller with one namespace.

    Args:
        size: namespace bytes (a multiple of the block size) when RAM-backed.
        backing: a file holding the namespace instead (its size, rounded down to blocks).
        block_size: 512 or 4096.
        max_queues: I/O queue pairs offered (MSI-X vectors: one more, for the admin CQ).
        mqes: maximum queue entries (CAP.MQES + 1).
    """

    name = "nvme"

    def __init__(
        self,
        *,
        size: int = 64 << 20,
        backing: str | None = None,
        block_size: int = 512,
        max_queues: int = 8,
        mqes: int = 1024,
    ) -> None:
        super().__init__(
            ConfigSpace(
                vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_CODE, revision=2,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x1100,
            )
        )  # fmt: skip
        if block_size not in (512, 4096):
            raise ModelError(f"nvme: block size {block_size} must be 512 or 4096")
        self.block_size = block_size
        self._fd: int | None = None
        self._ram: bytearray | None = None
        if backing is not None:
            try:
                self._fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ModelError(
                    f"nvme: cannot open the backing file {backing}: {exc.strerror}"
                ) from None
            size = os.fstat(self._fd).st_size
        if size < block_size or size % block_size:
            raise ModelError(
                f"nvme: namespace size {size} must be a positive multiple of {block_size}"
            )
        if self._fd is None:
            self._ram = bytearray(size)
        self.blocks = size // block_size
        self.max_queues, self.mqes = max_queues, mqes
        self.add_bar(0, BAR0_SIZE, read=self.mmio_read, write=self.mmio_write, is_64bit=True)
        self.add_msix(max_queues + 1, 0, MSIX_TABLE, MSIX_PBA)
        self.seal()
        self.inject = Injections()
        self.commands = 0
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Controller reset (7.3.2): registers to defaults, all queues deleted."""
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = self.acq = 0
        self.intms = 0
        self.sqs: dict[int, Queue] = {}
        self.cqs: dict[int, Queue] = {}
        self.granted_queues = self.max_queues
        self.volatile_write_cache = 1

    @property
    def cap(self) -> int:
        # 3.1.1: MQES, CQR (contiguous queues required), TO (500 ms units), DSTRD 0,
        # CSS bit 37 (NVM command set), MPSMIN 0 (4 KiB), MPSMAX 4 (64 KiB).
        return (self.mqes - 1) | (1 << 16) | (20 << 24) | (1 << 37) | (0 << 48) | (4 << 52)

    def close(self) -> None:
        super().close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- storage ---------------------------------------------------------------------------

    def _store_read(self, offset: int, n: int) -> bytes:
        if self._ram is not None:
            return bytes(self._ram[offset : offset + n])
        assert self._fd is not None
        data = os.pread(self._fd, n, offset)
        return data + bytes(n - len(data))

    def _store_write(self, offset: int, data: bytes) -> None:
        if self._ram is not None:
            self._ram[offset : offset + len(data)] = data
        else:
            assert self._fd is not None
            os.pwrite(self._fd, data, offset)

    # -- registers -------------------------------------------------------------------------

    def mmio_read(self, offset: int, width: int) -> int:
        regs = {CAP: self.cap, VS: VERSION_1_4, INTMS: self.intms, INTMC: self.intms, CC: self.cc,
                CSTS: self.csts, AQA: self.aqa, ASQ: self.asq, ACQ: self.acq}  # fmt: skip
        for base, value in regs.items():
            size = 8 if base in (CAP, ASQ, ACQ) else 4
            if base <= offset and offset + width <= base + size:
                return (value >> (8 * (offset - base))) & ((1 << (8 * width)) - 1)
        return 0  # reserved and doorbells (write-only) read 0

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if offset >= DOORBELL_BASE:
            self._doorbell(offset, value)
            return
        if offset in (ASQ, ACQ, ASQ + 4, ACQ + 4):
            base = ASQ if offset in (ASQ, ASQ + 4) else ACQ
            cur = self.asq if base == ASQ else self.acq
            shift = 8 * (offset - base)
            mask = ((1 << (8 * width)) - 1) << shift
            new = ((cur & ~mask) | (value << shift)) & ~0xFFF & (2**64 - 1)
            if base == ASQ:
                self.asq = new
            else:
                self.acq = new
        elif offset == AQA and width == 4:
            self.aqa = value & 0x0FFF_0FFF
        elif offset == INTMS and width == 4:
            self.intms |= value
        elif offset == INTMC and width == 4:
            self.intms &= ~value
        elif offset == CC and width == 4:
            self._write_cc(value)

    def _write_cc(self, value: int) -> None:
        old, self.cc = self.cc, value
        if value & CC_EN and not old & CC_EN:
            asqs, acqs = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
            mps = (value >> 7) & 0xF
            if asqs < 2 or acqs < 2 or not self.asq or not self.acq or mps > 4:
                self.csts |= CSTS_CFS  # 7.6.1: a bad admin queue setup is fatal
                self.fault(f"nvme: enabled with AQA={self.aqa:#x} ASQ={self.asq:#x} ACQ={self.acq:#x} MPS={mps}")  # fmt: skip
                return
            self.sqs = {0: Queue(0, self.asq, asqs, cqid=0)}
            self.cqs = {0: Queue(0, self.acq, acqs, vector=0, ien=True)}
            self.csts = CSTS_RDY
        elif not value & CC_EN and old & CC_EN:
            cc = self.cc
            self.reset()
            self.cc = cc
        if (value >> CC_SHN_SHIFT) & 3:
            self.csts = (self.csts & ~(3 << 2)) | CSTS_SHST_COMPLETE  # nothing to flush

    @property
    def page_size(self) -> int:
        return PAGE_MIN << ((self.cc >> 7) & 0xF)

    def _doorbell(self, offset: int, value: int) -> None:
        index, rem = divmod(offset - DOORBELL_BASE, 4)  # DSTRD 0: 4-byte stride
        if rem or not self.csts & CSTS_RDY:
            self.fault(f"nvme: doorbell write at {offset:#x} while not ready or misaligned")
            return
        qid, is_cq = divmod(index, 2)
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is None or value >= cq.size:
                self.fault(f"nvme: CQ {qid} head doorbell {value}: no such queue or out of range")
                return
            cq.head = value
            self.defer(self._process)  # a full CQ may have room again
            if not self.config.msix_enabled and all(q.head == q.tail for q in self.cqs.values()):
                self.set_intx(False)
        else:
            sq = self.sqs.get(qid)
            if sq is None or value >= sq.size:
                self.fault(f"nvme: SQ {qid} tail doorbell {value}: no such queue or out of range")
                return
            sq.tail = value
            self.defer(self._process)

    # -- command processing ------------------------------------------------------------------

    def _process(self) -> None:
        if not self.csts & CSTS_RDY:
            return
        progress = True
        while progress:
            progress = False
            for sq in list(self.sqs.values()):
                cq = self.cqs.get(sq.cqid)
                if cq is None or sq.head == sq.tail or (cq.tail + 1) % cq.size == cq.head:
                    continue  # empty, or its CQ is full: wait for the CQ head doorbell
                sqe = self.dma_read(sq.base + 64 * sq.head, 64)
                sq.head = (sq.head + 1) % sq.size
                self._execute(sq, cq, sqe)
                progress = True
                if not self.csts & CSTS_RDY:
                    return  # the command disabled the controller (not expected; be safe)

    def _execute(self, sq: Queue, cq: Queue, sqe: bytes) -> None:
        dw = [int.from_bytes(sqe[i : i + 4], "little") for i in range(0, 64, 4)]
        opcode, cid = dw[0] & 0xFF, dw[0] >> 16
        self.commands += 1
        result, status = 0, SC_SUCCESS
        try:
            if dw[0] & (3 << 14):
                raise CommandError(SC_INVALID_FIELD | DNR)  # PSDT: SGLs are not supported
            if sq.qid == 0:
                result = self._admin(opcode, dw)
            else:
                if self.inject.status is not None:
                    status, self.inject.status = self.inject.status, None
                    raise CommandError(status)
                self._io(opcode, dw)
        except CommandError as exc:
            status = exc.status
        except ModelError as exc:  # a PRP pointing outside the mapped memory
            self.fault(str(exc))
            status = SC_DATA_TRANSFER_ERROR
        if self.inject.drop_completion:
            self.inject.drop_completion = False
            return
        if self.inject.wrong_cid:
            self.inject.wrong_cid = False
            cid ^= 0x8000
        self._complete(sq, cq, cid, result, status)

    def _complete(self, sq: Queue, cq: Queue, cid: int, result: int, status: int) -> None:
        """Post a completion queue entry (4.6) and interrupt."""
        cqe = (
            result.to_bytes(4, "little") + bytes(4)
            + (sq.head | (sq.qid << 16)).to_bytes(4, "little")
            + (cid | (cq.phase << 16) | (status << 17)).to_bytes(4, "little")
        )  # fmt: skip
        self.dma_write(cq.base + 16 * cq.tail, cqe)
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail, cq.phase = 0, cq.phase ^ 1
        if cq.ien:
            self.raise_irq(cq.vector if self.config.msix_enabled else 0)

    # -- admin (5) -------------------------------------------------------------------------

    def _admin(self, opcode: int, dw: list[int]) -> int:
        prp1 = dw[6] | (dw[7] << 32)
        prp2 = dw[8] | (dw[9] << 32)
        if opcode == ADMIN_IDENTIFY:
            self._write_prps(prp1, prp2, self._identify(dw[10] & 0xFF, dw[1]))
            return 0
        if opcode == ADMIN_CREATE_CQ:
            qid, qsize = dw[10] & 0xFFFF, (dw[10] >> 16) + 1
            vector, ien, pc = dw[11] >> 16, bool(dw[11] & 2), dw[11] & 1
            self._check_new_queue(self.cqs, qid, qsize, pc, prp1)
            vectors = self.config.msix.vectors if self.config.msix else 1
            if ien and vector >= vectors:
                raise CommandError(SC_INVALID_VECTOR | DNR)
            self.cqs[qid] = Queue(qid, prp1, qsize, vector=vector, ien=ien)
            return 0
        if opcode == ADMIN_CREATE_SQ:
            qid, qsize = dw[10] & 0xFFFF, (dw[10] >> 16) + 1
            cqid, pc = dw[11] >> 16, dw[11] & 1
            if cqid == 0 or cqid not in self.cqs:
                raise CommandError(SC_CQ_INVALID | DNR)
            self._check_new_queue(self.sqs, qid, qsize, pc, prp1)
            self.sqs[qid] = Queue(qid, prp1, qsize, cqid=cqid)
            return 0
        if opcode == ADMIN_DELETE_SQ:
            qid = dw[10] & 0xFFFF
            if qid == 0 or qid not in self.sqs:
                raise CommandError(SC_INVALID_QID | DNR)
            del self.sqs[qid]
            return 0
        if opcode == ADMIN_DELETE_CQ:
            qid = dw[10] & 0xFFFF
            if qid == 0 or qid not in self.cqs:
                raise CommandError(SC_INVALID_QID | DNR)
            if any(sq.cqid == qid for sq in self.sqs.values()):
                raise CommandError(SC_INVALID_QUEUE_DELETION | DNR)
            del self.cqs[qid]
            return 0
        if opcode in (ADMIN_SET_FEATURES, ADMIN_GET_FEATURES):
            return self._features(opcode == ADMIN_SET_FEATURES, dw[10] & 0xFF, dw[11])
        if opcode == ADMIN_ABORT:
            # 5.1: commands run to completion as they are fetched here, so there is never
            # one to abort; DW0 bit 0 set = "command not aborted" (a valid answer).
            return 1
        raise CommandError(SC_INVALID_OPCODE | DNR)

    def _check_new_queue(
        self, table: dict[int, Queue], qid: int, qsize: int, pc: int, base: int
    ) -> None:
        if qid == 0 or qid > self.granted_queues or qid in table:
            raise CommandError(SC_INVALID_QID | DNR)
        if qsize < 2 or qsize > self.mqes:
            raise CommandError(SC_INVALID_QSIZE | DNR)
        if not pc or base % self.page_size:
            raise CommandError(SC_INVALID_FIELD | DNR)  # CAP.CQR: contiguous, page aligned

    def _features(self, set_: bool, fid: int, cdw11: int) -> int:
        if fid == FEAT_NUMBER_OF_QUEUES:
            if set_:
                if self.sqs.keys() - {0} or self.cqs.keys() - {0}:
                    raise CommandError(SC_INVALID_FIELD | DNR)  # 5.21.1.7: before creating any
                nsq, ncq = (cdw11 & 0xFFFF) + 1, (cdw11 >> 16) + 1
                if nsq == 0x10000 or ncq == 0x10000:
                    raise CommandError(SC_INVALID_FIELD | DNR)
                self.granted_queues = min(max(nsq, ncq), self.max_queues)
            n = self.granted_queues - 1
            return n | (n << 16)
        if fid == FEAT_VOLATILE_WRITE_CACHE:
            if set_:
                self.volatile_write_cache = cdw11 & 1
            return self.volatile_write_cache
        raise CommandError(SC_INVALID_FIELD | DNR)

    def _identify(self, cns: int, nsid: int) -> bytes:
        d = bytearray(4096)
        if cns == CNS_CONTROLLER:  # 5.15.2.2, figure 247
            d[0:2] = VENDOR_ID.to_bytes(2, "little")
            d[2:4] = (0x1AF4).to_bytes(2, "little")
            d[4:24] = b"UDRV0001".ljust(20)
            d[24:64] = b"udrv NVMe model".ljust(40)
            d[64:72] = b"1.0".ljust(8)
            d[77] = MDTS
            d[78:80] = (1).to_bytes(2, "little")  # CNTLID
            d[80:84] = VERSION_1_4.to_bytes(4, "little")
            d[512] = 0x66  # SQES: 64 bytes required and maximum
            d[513] = 0x44  # CQES: 16 bytes
            d[514:516] = self.mqes.to_bytes(2, "little")  # MAXCMD
            d[516:520] = (1).to_bytes(4, "little")  # NN
            d[520:522] = ((1 << 2) | (1 << 3)).to_bytes(2, "little")  # ONCS: DSM, Write Zeroes
            d[525] = 1  # VWC present
        elif cns == CNS_NAMESPACE:  # 5.15.2.1, figure 245
            if nsid != 1:
                raise CommandError(SC_INVALID_NAMESPACE | DNR)
            for at in (0, 8, 16):  # NSZE, NCAP, NUSE
                d[at : at + 8] = self.blocks.to_bytes(8, "little")
            d[24] = 1 << 2  # NSFEAT: deallocated blocks read as zeroes (DLFEAT below)
            d[25] = 0  # NLBAF: one format
            d[26] = 0  # FLBAS: format 0
            d[33] = 1 | (1 << 3)  # DLFEAT: deallocated reads 0, Write Zeroes may deallocate
            d[128:132] = ((self.block_size.bit_length() - 1) << 16).to_bytes(4, "little")  # LBAF0
        elif cns == CNS_ACTIVE_NS_LIST:  # 5.15.2.3
            if nsid < 1:
                d[0:4] = (1).to_bytes(4, "little")
        else:
            raise CommandError(SC_INVALID_FIELD | DNR)
        return bytes(d)

    # -- NVM I/O (6) ---------------------------------------------------------------------------

    def _io(self, opcode: int, dw: list[int]) -> None:
        if dw[1] != 1:
            raise CommandError(SC_INVALID_NAMESPACE | DNR)
        prp1, prp2 = dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32)
        slba, nlb = dw[10] | (dw[11] << 32), (dw[12] & 0xFFFF) + 1
        if opcode == NVM_FLUSH:
            if self._fd is not None:
                os.fsync(self._fd)
            return
        if opcode == NVM_DSM:
            nr = (dw[10] & 0xFF) + 1
            ranges = self._read_prps(prp1, prp2, 16 * nr)
            if dw[11] & (1 << 2):  # AD: deallocate; deallocated blocks read as zeroes
                for i in range(nr):
                    length = int.from_bytes(ranges[16 * i + 4 : 16 * i + 8], "little")
                    start = int.from_bytes(ranges[16 * i + 8 : 16 * i + 16], "little")
                    self._check_lba(start, length)
                    self._zero(start, length)
            return
        if opcode not in (NVM_READ, NVM_WRITE, NVM_WRITE_ZEROES):
            raise CommandError(SC_INVALID_OPCODE | DNR)
        self._check_lba(slba, nlb)
        bs = self.block_size
        if opcode != NVM_WRITE_ZEROES and nlb * bs > MDTS_BYTES:
            raise CommandError(SC_INVALID_FIELD | DNR)  # over MDTS (Identify byte 77)
        if opcode == NVM_WRITE_ZEROES:
            self._zero(slba, nlb)
        elif opcode == NVM_READ:
            self._write_prps(prp1, prp2, self._store_read(slba * bs, nlb * bs))
        else:
            self._store_write(slba * bs, self._read_prps(prp1, prp2, nlb * bs))

    def _check_lba(self, slba: int, nlb: int) -> None:
        if slba + nlb > self.blocks:
            raise CommandError(SC_LBA_OUT_OF_RANGE | DNR)

    def _zero(self, slba: int, nlb: int) -> None:
        bs, step = self.block_size, 1 << 20
        for at in range(slba * bs, (slba + nlb) * bs, step):
            self._store_write(at, bytes(min(step, (slba + nlb) * bs - at)))

    def _prp_segments(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
        """(address, length) pieces of a transfer described by PRP1/PRP2 (4.3)."""
        page = self.page_size
        if prp1 & 3:
            raise CommandError(SC_INVALID_FIELD | DNR)  # dword aligned (4.3)
        first = min(length, page - prp1 % page)
        out = [(prp1, first)]
        left = length - first
        if left == 0:
            return out
        if left <= page:
            if prp2 % page:
                raise CommandError(SC_INVALID_FIELD | DNR)
            return [*out, (prp2, left)]
        # PRP2 is a PRP list; its last entry chains to the next list when more remain.
        entry = prp2
        if entry & 7:
            raise CommandError(SC_INVALID_FIELD | DNR)
        while left:
            slots = (page - entry % page) // 8
            needed = (left + page - 1) // page
            take = needed if needed <= slots else slots - 1
            raw = self.dma_read(entry, 8 * (take + (0 if needed <= slots else 1)))
            for i in range(take):
                addr = int.from_bytes(raw[8 * i : 8 * i + 8], "little")
                if addr % page:
                    raise CommandError(SC_INVALID_FIELD | DNR)
                n = min(page, left)
                out.append((addr, n))
                left -= n
            if left:
                entry = int.from_bytes(raw[8 * take : 8 * take + 8], "little")
                if entry % page:
                    raise CommandError(SC_INVALID_FIELD | DNR)
        return out

    def _read_prps(self, prp1: int, prp2: int, length: int) -> bytes:
        return b"".join(self.dma_read(a, n) for a, n in self._prp_segments(prp1, prp2, length))

    def _write_prps(self, prp1: int, prp2: int, data: bytes) -> None:
        at = 0
        for addr, n in self._prp_segments(prp1, prp2, len(data)):
            self.dma_write(addr, data[at : at + n])
            at += n
