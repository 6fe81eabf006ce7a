"""NVMe commands as bytes: the submission and completion entries, PRPs and DSM ranges.

The one place that knows the layouts of NVM Express Base Specification 2.0 that the driver
puts in DMA memory; the synchronous (``driver.py``), asyncio (``aio.py``) and hardware-queue
(``hwqueue.py``) paths all build their commands here.

- :data:`SQE` / :data:`CQE`: a submission queue entry (64 bytes, §4.2 "Submission Queue
  Entry", figure 88 "Common Command Format") and a completion queue entry (16 bytes, §4.2.1
  "Completion Queue Entry", figure 90), as numpy structured dtypes for display and tests;
  :meth:`Command.pack_into` writes one SQE with a single ``struct.pack_into``.
- :func:`fill_prps` / :class:`PrpTable`: PRP1/PRP2 and PRP lists (§4.1.1 "Physical Region
  Page Entry and List").
- :func:`dsm_ranges` / :func:`write_dsm_ranges`: Dataset Management ranges (NVM Command Set
  Specification 1.0 §3.2.1 "Dataset Management command", figure 39 "Range Definition").
- One function per command: Read, Write, Flush, Write Zeroes, Dataset Management (NVM Command
  Set §3.2, §3.3); Identify, Create/Delete I/O SQ/CQ, Set/Get Features, Abort (Base §5).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

#: The memory page size the driver configures (CC.MPS = 0: 4 KiB, Base §3.1.3.5).
PAGE = 4096

# -- entries -----------------------------------------------------------------------------------

#: Submission queue entry, Base §4.2 figure 88: CDW0 = opcode (7:0), FUSE (9:8), PSDT (15:14),
#: CID (31:16); NSID at byte 4, CDW2-3 at 8, MPTR at 16, DPTR (PRP1, PRP2) at 24 and 32,
#: CDW10-15 at 40..60.
SQE = np.dtype(
    [("opcode", "u1"), ("flags", "u1"), ("cid", "<u2"), ("nsid", "<u4"), ("cdw2", "<u4"),
     ("cdw3", "<u4"), ("mptr", "<u8"), ("prp1", "<u8"), ("prp2", "<u8"), ("cdw10", "<u4"),
     ("cdw11", "<u4"), ("cdw12", "<u4"), ("cdw13", "<u4"), ("cdw14", "<u4"), ("cdw15", "<u4")]
)  # fmt: skip
_SQE = struct.Struct("<BBHIIIQQQIIIIII")
assert SQE.itemsize == _SQE.size == 64

#: Completion queue entry, Base §4.2.1 figure 90: DW0 command specific, DW1 reserved/command
#: specific, DW2 = SQ head (15:0) and SQ id (31:16), DW3 = CID (15:0), phase tag (16), status
#: field (31:17).
CQE = np.dtype([("dw0", "<u4"), ("dw1", "<u4"), ("sqhd", "<u2"), ("sqid", "<u2"),
                ("cid", "<u2"), ("status", "<u2")])  # fmt: skip
assert CQE.itemsize == 16

# Status field (CQE DW3 bits 31:17, shifted down by 17; Base §4.2.3 figure 93).
SF_SC_MASK = 0xFF  # status code
SF_SCT_SHIFT, SF_SCT_MASK = 8, 0x7  # status code type
SF_DNR = 1 << 14  # do not retry
SF_ERROR_MASK = 0x7FF  # SCT and SC: zero means success
SC_ABORT_REQUESTED = 0x07  # generic status (SCT 0), Base §4.2.3.1 figure 94

#: Generic command status names (SCT 0, Base §4.2.3.1 figure 94) worth naming.
STATUS_NAMES = {
    0x00: "successful completion", 0x01: "invalid command opcode", 0x02: "invalid field in command",
    0x03: "command ID conflict", 0x04: "data transfer error", 0x06: "internal error",
    0x07: "command abort requested", 0x08: "command aborted due to SQ deletion",
    0x0B: "invalid namespace or format", 0x80: "LBA out of range", 0x81: "capacity exceeded",
}  # fmt: skip


def describe_status(status: int) -> str:
    """A completion's status field (CQE DW3 bits 31:17): type, code, name, DNR."""
    sc, sct = status & SF_SC_MASK, (status >> SF_SCT_SHIFT) & SF_SCT_MASK
    name = STATUS_NAMES.get(sc, "") if sct == 0 else ""
    dnr = ", do not retry" if status & SF_DNR else ""
    return f"SCT {sct} SC {sc:#04x}" + (f" ({name})" if name else "") + dnr


# -- opcodes ---------------------------------------------------------------------------------

# Admin commands (Base §5, figure 138 "Opcodes for Admin Commands").
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ = 0x00, 0x01
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ = 0x04, 0x05
ADMIN_IDENTIFY, ADMIN_ABORT = 0x06, 0x08
ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x09, 0x0A
# NVM I/O commands (NVM Command Set §3, figure 16 "Opcodes for NVM Commands").
NVM_FLUSH, NVM_WRITE, NVM_READ = 0x00, 0x01, 0x02
NVM_WRITE_ZEROES, NVM_DSM = 0x08, 0x09

# Identify CNS values (Base §5.17 figure 273).
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NS_LIST = 0x00, 0x01, 0x02
# Feature identifiers (Base §5.27.1 figure 317).
FEAT_VOLATILE_WRITE_CACHE, FEAT_NUMBER_OF_QUEUES = 0x06, 0x07

# Command dword bits.
RW_FUA = 1 << 30  # Read/Write/Write Zeroes CDW12: force unit access (NVM §3.2.4 figure 63)
WZ_DEAC = 1 << 25  # Write Zeroes CDW12: deallocate (NVM §3.2.8 figure 76)
DSM_AD = 1 << 2  # Dataset Management CDW11: attribute - deallocate (NVM §3.2.1 figure 38)
DSM_MAX_RANGES = 256  # NR is 8 bits, 0's based
DSM_MAX_BLOCKS = 0xFFFF_FFFF  # a range's length in logical blocks is 32 bits
WZ_MAX_BLOCKS = 0x1_0000  # NLB is 16 bits, 0's based
CQ_PC, CQ_IEN = 1 << 0, 1 << 1  # Create I/O CQ CDW11 (Base §5.4 figure 150)
SQ_PC = 1 << 0  # Create I/O SQ CDW11 (Base §5.5 figure 154)


class Command(NamedTuple):
    """One submission queue entry without its command id (given when it is queued)."""

    opcode: int
    nsid: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    flags: int = 0  # CDW0 bits 15:8: FUSE (9:8), PSDT (15:14; 0 = PRPs)
    mptr: int = 0

    def pack_into(self, buf: memoryview | bytearray, offset: int, cid: int) -> None:
        """Write this command as the SQE at ``buf[offset:offset + 64]`` with ``cid``."""
        _SQE.pack_into(buf, offset, self.opcode, self.flags, cid, self.nsid, 0, 0, self.mptr,
                       self.prp1, self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13,
                       self.cdw14, self.cdw15)  # fmt: skip

    def to_bytes(self, cid: int) -> bytes:
        """The 64-byte SQE with command id ``cid``."""
        out = bytearray(64)
        self.pack_into(out, 0, cid)
        return bytes(out)


def _lba(slba: int, nlb: int, limit: int) -> tuple[int, int]:
    if not 1 <= nlb <= limit:
        raise ValueError(f"{nlb} blocks: one command moves 1..{limit}")
    if not 0 <= slba < 1 << 64:
        raise ValueError(f"starting LBA {slba} does not fit in 64 bits")
    return slba & 0xFFFF_FFFF, slba >> 32


def read(nsid: int, slba: int, nlb: int, prp1: int, prp2: int = 0, *, fua: bool = False) -> Command:
    """Read ``nlb`` blocks from ``slba`` (NVM §3.3.4: SLBA in CDW10-11, NLB 0's based)."""
    return rw(NVM_READ, nsid, slba, nlb, prp1, prp2, RW_FUA if fua else 0)


def write(nsid: int, slba: int, nlb: int, prp1: int, prp2: int = 0, *,
          fua: bool = False) -> Command:  # fmt: skip
    """Write ``nlb`` blocks at ``slba`` (NVM §3.3.6); ``fua``: durable before completion."""
    return rw(NVM_WRITE, nsid, slba, nlb, prp1, prp2, RW_FUA if fua else 0)


_new = tuple.__new__


def rw(opcode: int, nsid: int, slba: int, nlb: int, prp1: int, prp2: int,
       control: int = 0) -> Command:  # fmt: skip
    """Read or Write (``opcode``) with CDW12 bits 31:16 ``control`` (e.g. :data:`RW_FUA`).

    The hot path's spelling: ``tuple.__new__`` skips the NamedTuple constructor's defaults
    (about half the cost of building a command).
    """
    if not 1 <= nlb <= 0x1_0000 or not 0 <= slba < 1 << 64:
        _lba(slba, nlb, 0x1_0000)  # raises with the reason
    return _new(Command, (opcode, nsid, prp1, prp2, slba & 0xFFFF_FFFF, slba >> 32,
                          (nlb - 1) | control, 0, 0, 0, 0, 0))  # fmt: skip


#: A Read or Write SQE with only the fields they use (the rest zero): one ``pack_into`` of
#: eight values, for the hardware queues' hot path (:func:`pack_rw`).
_RW = struct.Struct("<BxHI8x8xQQIII12x")
assert _RW.size == 64


def pack_rw(buf: memoryview | bytearray, offset: int, cid: int, opcode: int, nsid: int,
            slba: int, nlb: int, prp1: int, prp2: int) -> None:  # fmt: skip
    """Write ``rw(opcode, nsid, slba, nlb, prp1, prp2)`` as the SQE at ``buf[offset:]`` with
    ``cid``, without building a :class:`Command` (a third of the cost). The caller keeps
    ``nlb`` within 1..65536 (the tests check both spellings give the same bytes)."""
    _RW.pack_into(buf, offset, opcode, cid, nsid, prp1, prp2, slba & 0xFFFF_FFFF, slba >> 32,
                  nlb - 1)  # fmt: skip


def flush(nsid: int) -> Command:
    """Flush the volatile write cache (NVM §3.2.2 / Base §7.1)."""
    return Command(NVM_FLUSH, nsid)


def write_zeroes(nsid: int, slba: int, nlb: int, *, deallocate: bool = False,
                 fua: bool = False) -> Command:  # fmt: skip
    """Zero ``nlb`` blocks (at most :data:`WZ_MAX_BLOCKS`) at ``slba`` (NVM §3.2.8)."""
    lo, hi = _lba(slba, nlb, WZ_MAX_BLOCKS)
    cdw12 = (nlb - 1) | (WZ_DEAC if deallocate else 0) | (RW_FUA if fua else 0)
    return Command(NVM_WRITE_ZEROES, nsid, 0, 0, lo, hi, cdw12)


def dsm(nsid: int, ranges: int, prp1: int, prp2: int = 0, *, deallocate: bool = True) -> Command:
    """Dataset Management over ``ranges`` ranges at ``prp1`` (NVM §3.2.1: NR 0's based)."""
    if not 1 <= ranges <= DSM_MAX_RANGES:
        raise ValueError(f"{ranges} DSM ranges: one command carries 1..{DSM_MAX_RANGES}")
    return Command(NVM_DSM, nsid, prp1, prp2, ranges - 1, DSM_AD if deallocate else 0)


def identify(cns: int, prp1: int, *, nsid: int = 0, cntid: int = 0) -> Command:
    """Identify (Base §5.17): a 4 KiB data structure selected by CNS (CDW10 7:0)."""
    return Command(ADMIN_IDENTIFY, nsid, prp1, 0, (cntid << 16) | cns)


def create_io_cq(qid: int, entries: int, prp1: int, vector: int | None) -> Command:
    """Create a physically contiguous I/O CQ (Base §5.4); ``vector`` None: no interrupts."""
    cdw11 = CQ_PC if vector is None else (vector << 16) | CQ_IEN | CQ_PC
    return Command(ADMIN_CREATE_CQ, 0, prp1, 0, ((entries - 1) << 16) | qid, cdw11)


def create_io_sq(qid: int, entries: int, prp1: int, cqid: int) -> Command:
    """Create a physically contiguous I/O SQ completing into ``cqid`` (Base §5.5)."""
    return Command(ADMIN_CREATE_SQ, 0, prp1, 0, ((entries - 1) << 16) | qid, (cqid << 16) | SQ_PC)


def delete_io_sq(qid: int) -> Command:
    """Delete I/O SQ ``qid`` (Base §5.7)."""
    return Command(ADMIN_DELETE_SQ, 0, 0, 0, qid)


def delete_io_cq(qid: int) -> Command:
    """Delete I/O CQ ``qid`` (Base §5.6); its SQs must be deleted first."""
    return Command(ADMIN_DELETE_CQ, 0, 0, 0, qid)


def set_features(fid: int, cdw11: int, *, save: bool = False) -> Command:
    """Set Features (Base §5.27): FID in CDW10 7:0, SV in bit 31."""
    return Command(ADMIN_SET_FEATURES, 0, 0, 0, fid | (1 << 31 if save else 0), cdw11)


def get_features(fid: int, *, select: int = 0, cdw11: int = 0) -> Command:
    """Get Features (Base §5.15): FID in CDW10 7:0, SEL (0 current .. 3 capabilities) 10:8."""
    return Command(ADMIN_GET_FEATURES, 0, 0, 0, fid | (select << 8), cdw11)


def abort(sqid: int, cid: int) -> Command:
    """Abort command ``cid`` of submission queue ``sqid`` (Base §5.1: CDW10 = CID << 16 | SQID).

    Completion DW0 bit 0 is 0 if the command was aborted (it then completes with status
    "Command Abort Requested"), 1 if not.
    """
    return Command(ADMIN_ABORT, 0, 0, 0, (cid << 16) | sqid)


# -- PRPs (Base §4.1.1) ------------------------------------------------------------------------


def prp_pages(iova: int, length: int, page: int = PAGE) -> int:
    """How many memory pages ``length`` bytes from ``iova`` touch (one PRP entry each)."""
    return (iova % page + length + page - 1) // page if length else 0


def prp_list_pages(iova: int, length: int, page: int = PAGE) -> int:
    """PRP list pages needed for a transfer: 0 for one or two pages; else one per
    ``page/8 - 1`` entries (the last entry of a full list page points to the next one), and
    the last page may use its last entry for data."""
    entries = prp_pages(iova, length, page) - 1
    if entries <= 1:
        return 0
    per = page // 8
    return 1 if entries <= per else 1 + (entries - per + per - 2) // (per - 1)


def fill_prps(iova: int, length: int, lists: np.ndarray | None = None, list_iova: int = 0,
              page: int = PAGE) -> tuple[int, int]:  # fmt: skip
    """PRP1 and PRP2 for ``length`` bytes of a buffer contiguous in IOVA space at ``iova``.

    Base §4.1.1: PRP1 is the first page's address and may carry an offset (dword aligned);
    every later entry is page-aligned. Two pages: PRP2 is the second page. More: PRP2
    points to a PRP list of the remaining pages; when a list page fills, its last entry
    points to the next list page.

    Args:
        iova: bus address of the first byte (a multiple of 4).
        length: bytes to transfer (> 0).
        lists: where to write the lists when needed: a ``<u8`` array of
            :func:`prp_list_pages` pages (``page // 8`` entries each), contiguous at
            ``list_iova`` (page-aligned).
        list_iova: bus address of ``lists``.
        page: the memory page size (CC.MPS).

    Returns:
        ``(prp1, prp2)``.

    Raises:
        ValueError: a misaligned address, an empty transfer, or too little list space.
    """
    if iova % 4 or length <= 0:
        raise ValueError(f"PRP1 {iova:#x} for {length} bytes: need a dword-aligned address "
                         "and a transfer of at least one byte")  # fmt: skip
    first = iova - iova % page
    pages = prp_pages(iova, length, page)
    if pages == 1:
        return iova, 0
    if pages == 2:
        return iova, first + page
    need = prp_list_pages(iova, length, page)
    per = page // 8
    if lists is None or len(lists) < need * per or list_iova % page:
        have = 0 if lists is None else len(lists) // per
        raise ValueError(f"{pages} pages need {need} page-aligned PRP list page(s); "
                         f"{have} given at {list_iova:#x}")  # fmt: skip
    data = first + page * np.arange(1, pages, dtype=np.uint64)
    pos = 0  # next data entry
    for lp in range(need):
        slot = lp * per
        left = len(data) - pos
        if left <= per:  # the last list page: all data
            lists[slot : slot + left] = data[pos:]
            break
        lists[slot : slot + per - 1] = data[pos : pos + per - 1]
        lists[slot + per - 1] = list_iova + (lp + 1) * page  # chain to the next list page
        pos += per - 1
    return iova, list_iova


def walk_prps(prp1: int, prp2: int, length: int, read_entry: Callable[[int], int],
              page: int = PAGE) -> Iterator[tuple[int, int]]:  # fmt: skip
    """The ``(address, bytes)`` segments a controller transfers for PRP1/PRP2, following
    Base §4.1.1 the way a device does; ``read_entry(address)`` reads one list entry.
    (For tests and debugging.)"""
    first = min(length, page - prp1 % page)
    yield prp1, first
    left = length - first
    if left <= 0:
        return
    if left <= page:
        yield prp2, left
        return
    at = prp2
    per = page // 8
    while left > 0:
        last_slot = (at % page) // 8 == per - 1
        entry = read_entry(at)
        if last_slot and left > page:  # a full list page's last entry: the next list
            at = entry
            continue
        n = min(left, page)
        yield entry, n
        left -= n
        at += 8


class PrpTable:
    """PRPs for transfers from the start of one fixed, page-aligned buffer.

    The PRP list (entries for pages 2..n) is written once, at construction; a transfer of
    any length up to ``size`` then uses a prefix of it, so building a command's PRPs costs
    two comparisons. Limited to one list page (``page // 8 + 1`` pages: 2 MiB with 4 KiB
    pages) so that no prefix would need a chain entry where the full list has data.

    Args:
        iova: bus address of the buffer (page-aligned).
        size: its usable size in bytes.
        list_entries: ``<u8`` array of ``page // 8`` entries for the list page.
        list_iova: bus address of that list page (page-aligned).
    """

    __slots__ = ("_two", "iova", "list_iova", "page", "size")

    def __init__(self, iova: int, size: int, list_entries: np.ndarray, list_iova: int,
                 page: int = PAGE) -> None:  # fmt: skip
        if iova % page or list_iova % page:
            raise ValueError(f"PRP table at {iova:#x} / list {list_iova:#x}: need page alignment")
        if not 0 < size <= (page // 8 + 1) * page:
            raise ValueError(f"PRP table of {size} bytes: one list page covers "
                             f"{(page // 8 + 1) * page}")  # fmt: skip
        self.iova, self.size, self.list_iova, self.page = iova, size, list_iova, page
        self._two = 2 * page
        if size > self._two:
            fill_prps(iova, size, list_entries, list_iova, page)

    def prps(self, length: int) -> tuple[int, int]:
        """``(prp1, prp2)`` for the first ``length`` bytes (1..size) of the buffer."""
        if length <= self.page:
            return self.iova, 0
        if length <= self._two:
            return self.iova, self.iova + self.page
        if length > self.size:
            raise ValueError(f"{length} bytes do not fit the {self.size}-byte buffer")
        return self.iova, self.list_iova


# -- Dataset Management ranges (NVM §3.2.1.1 figure 39) ----------------------------------------

#: One range: context attributes (bytes 0-3), length in logical blocks (4-7), SLBA (8-15).
DSM_RANGE = np.dtype([("attributes", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
assert DSM_RANGE.itemsize == 16


def dsm_ranges(slba: int, nlb: int) -> list[tuple[int, int]]:
    """``[(slba, nlb)]`` covering ``nlb`` blocks from ``slba``, each at most 2**32 - 1."""
    out = []
    while nlb > 0:
        n = min(nlb, DSM_MAX_BLOCKS)
        out.append((slba, n))
        slba, nlb = slba + n, nlb - n
    return out


def write_dsm_ranges(buf: np.ndarray, ranges: list[tuple[int, int]], attributes: int = 0) -> int:
    """Write ``ranges`` into ``buf`` (bytes, at least 16 per range); returns their count.

    Raises:
        ValueError: no range, more than 256, or a range longer than 2**32 - 1 blocks.
    """
    if not 1 <= len(ranges) <= DSM_MAX_RANGES:
        raise ValueError(f"{len(ranges)} DSM ranges: one command carries 1..{DSM_MAX_RANGES}")
    out = buf[: 16 * len(ranges)].view(DSM_RANGE)
    for i, (slba, nlb) in enumerate(ranges):
        if not 0 < nlb <= DSM_MAX_BLOCKS:
            raise ValueError(f"DSM range of {nlb} blocks: 1..{DSM_MAX_BLOCKS}")
        out[i] = (attributes, nlb, slba)
    return len(ranges)
