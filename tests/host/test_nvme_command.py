"""NVMe command encodings against the specification's layouts (NVMe Base 2.0 §4.1.1, §4.2;
NVM Command Set 1.0 §3.2, §3.3)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.drivers.nvme import command as C

PAGE = C.PAGE


def dwords(cmd: C.Command, cid: int = 0) -> tuple[int, ...]:
    return struct.unpack("<16I", cmd.to_bytes(cid))


def test_sqe_byte_offsets_are_the_common_command_format() -> None:
    """Base figure 88: CDW0 at 0 (opcode 7:0, FUSE 9:8, PSDT 15:14, CID 31:16), NSID at 4,
    MPTR at 16, PRP1 at 24, PRP2 at 32, CDW10..15 at 40..60."""
    cmd = C.Command(0x5A, nsid=0x11223344, prp1=0x0102030405060708, prp2=0x1112131415161718,
                    cdw10=0xA0A0A0A0, cdw11=0xB1, cdw12=0xC2, cdw13=0xD3, cdw14=0xE4, cdw15=0xF5,
                    flags=0x41, mptr=0x2122232425262728)  # fmt: skip
    raw = cmd.to_bytes(0xBEEF)
    assert len(raw) == 64
    assert raw[0] == 0x5A and raw[1] == 0x41 and raw[2:4] == b"\xef\xbe"
    assert int.from_bytes(raw[4:8], "little") == 0x11223344
    assert raw[8:16] == bytes(8)  # CDW2-3
    assert int.from_bytes(raw[16:24], "little") == 0x2122232425262728
    assert int.from_bytes(raw[24:32], "little") == 0x0102030405060708
    assert int.from_bytes(raw[32:40], "little") == 0x1112131415161718
    assert struct.unpack("<6I", raw[40:64]) == (0xA0A0A0A0, 0xB1, 0xC2, 0xD3, 0xE4, 0xF5)
    # The structured dtype names the same bytes.
    e = np.frombuffer(raw, dtype=C.SQE)[0]
    assert (int(e["opcode"]), int(e["cid"]), int(e["prp2"])) == (0x5A, 0xBEEF, cmd.prp2)
    assert C.SQE.fields["prp1"][1] == 24 and C.SQE.fields["cdw10"][1] == 40
    assert C.SQE.fields["cdw15"][1] == 60 and C.SQE.fields["mptr"][1] == 16


def test_cqe_layout() -> None:
    """Base figure 90: DW2 = SQHD 15:0, SQID 31:16; DW3 = CID 15:0, P 16, status 31:17."""
    raw = struct.pack("<IIII", 7, 0, 3 | 2 << 16, 0x1234 | 1 << 16 | (0x4002 << 17))
    e = np.frombuffer(raw, dtype=C.CQE)[0]
    assert (int(e["dw0"]), int(e["sqhd"]), int(e["sqid"]), int(e["cid"])) == (7, 3, 2, 0x1234)
    status = int(e["status"]) >> 1
    assert status & C.SF_DNR and status & C.SF_SC_MASK == 0x02


def test_read_write_encodings() -> None:
    d = dwords(C.read(1, 0x1_2345_6789, 8, 0x1000, 0x2000), cid=5)
    assert d[0] == C.NVM_READ | 5 << 16 and d[1] == 1
    assert (d[6] | d[7] << 32, d[8] | d[9] << 32) == (0x1000, 0x2000)
    assert (d[10], d[11], d[12]) == (0x2345_6789, 0x1, 7)  # SLBA low/high, NLB 0's based
    d = dwords(C.write(2, 0, 1, 0x3000, fua=True))
    assert d[0] & 0xFF == C.NVM_WRITE and d[12] == 1 << 30  # FUA, NLB 0
    with pytest.raises(ValueError, match=r"1\.\.65536"):
        C.read(1, 0, 65537, 0)
    with pytest.raises(ValueError, match=r"1\.\.65536"):
        C.write(1, 0, 0, 0)


@given(
    opcode=st.sampled_from([C.NVM_READ, C.NVM_WRITE]),
    cid=st.integers(0, 0xFFFF),
    nsid=st.integers(0, 0xFFFF_FFFF),
    slba=st.integers(0, (1 << 64) - 1),
    nlb=st.integers(1, 0x1_0000),
    prp1=st.integers(0, (1 << 64) - 1),
    prp2=st.integers(0, (1 << 64) - 1),
)
def test_the_hot_path_read_write_encoding_is_the_same_bytes(
    opcode: int, cid: int, nsid: int, slba: int, nlb: int, prp1: int, prp2: int
) -> None:
    buf = bytearray(b"\xaa" * 64)  # every byte must be written
    C.pack_rw(buf, 0, cid, opcode, nsid, slba, nlb, prp1, prp2)
    assert bytes(buf) == C.rw(opcode, nsid, slba, nlb, prp1, prp2).to_bytes(cid)


def test_flush_write_zeroes_dsm() -> None:
    assert dwords(C.flush(3))[:2] == (C.NVM_FLUSH, 3)
    d = dwords(C.write_zeroes(1, 10, 65536, deallocate=True))
    assert d[0] == C.NVM_WRITE_ZEROES and (d[10], d[11]) == (10, 0)
    assert d[12] == 0xFFFF | 1 << 25 and d[6:10] == (0, 0, 0, 0)  # no data pointer
    d = dwords(C.dsm(1, 256, 0xABC000))
    assert d[0] == C.NVM_DSM and d[10] == 255 and d[11] == 1 << 2  # NR 0's based, AD
    assert d[6] == 0xABC000
    with pytest.raises(ValueError, match=r"1\.\.256"):
        C.dsm(1, 257, 0)


def test_admin_encodings() -> None:
    d = dwords(C.identify(C.CNS_NAMESPACE, 0x5000, nsid=7))
    assert d[0] == 0x06 and d[1] == 7 and d[6] == 0x5000 and d[10] == 0
    assert dwords(C.identify(C.CNS_ACTIVE_NS_LIST, 0))[10] == 2
    d = dwords(C.create_io_cq(3, 64, 0x7000, vector=2))
    assert d[0] == 0x05 and d[10] == (63 << 16 | 3) and d[11] == (2 << 16 | 0b11)
    assert dwords(C.create_io_cq(3, 64, 0x7000, vector=None))[11] == 0b01  # PC, no IEN
    d = dwords(C.create_io_sq(3, 64, 0x8000, cqid=3))
    assert d[0] == 0x01 and d[10] == (63 << 16 | 3) and d[11] == (3 << 16 | 1)
    assert dwords(C.delete_io_sq(4))[0::10] == (0x00, 4)
    assert dwords(C.delete_io_cq(4))[0::10] == (0x04, 4)
    d = dwords(C.set_features(C.FEAT_NUMBER_OF_QUEUES, 0x30003, save=True))
    assert d[0] == 0x09 and d[10] == (7 | 1 << 31) and d[11] == 0x30003
    d = dwords(C.get_features(C.FEAT_VOLATILE_WRITE_CACHE, select=3))
    assert d[0] == 0x0A and d[10] == (6 | 3 << 8)
    d = dwords(C.abort(2, 0x1234))
    assert d[0] == 0x08 and d[10] == (0x1234 << 16 | 2)


# -- PRPs ----------------------------------------------------------------------------------


def lists(pages: int) -> np.ndarray:
    return np.zeros(pages * PAGE // 8, dtype="<u8")


def walk(prp1: int, prp2: int, length: int, mem: np.ndarray, base: int) -> list[tuple[int, int]]:
    def entry(iova: int) -> int:
        assert (iova - base) % 8 == 0 and 0 <= iova - base < mem.nbytes, hex(iova)
        return int(mem[(iova - base) // 8])

    return list(C.walk_prps(prp1, prp2, length, entry))


def test_prps_for_one_two_three_pages() -> None:
    buf, lbase = 0x10_0000, 0x90_0000
    assert C.fill_prps(buf, PAGE) == (buf, 0)  # one page: PRP2 unused
    assert C.fill_prps(buf, 2 * PAGE) == (buf, buf + PAGE)  # two: PRP2 is the second page
    mem = lists(1)
    assert C.fill_prps(buf, 3 * PAGE, mem, lbase) == (buf, lbase)  # three: a list
    assert list(mem[:2]) == [buf + PAGE, buf + 2 * PAGE] and not mem[2:].any()


def test_prps_unaligned_first_entry() -> None:
    """Only PRP1 may carry an offset; 100 bytes before a page end plus one byte spans two
    pages, and a page-sized transfer at an offset spans two."""
    buf = 0x10_0000 + PAGE - 100
    assert C.fill_prps(buf, 101) == (buf, 0x10_0000 + PAGE)
    assert C.fill_prps(buf, 100) == (buf, 0)
    mem = lists(1)
    p1, p2 = C.fill_prps(0x10_0010, 2 * PAGE, mem, 0x90_0000)  # touches 3 pages
    assert (p1, p2) == (0x10_0010, 0x90_0000) and list(mem[:2]) == [0x10_1000, 0x10_2000]
    with pytest.raises(ValueError, match="dword-aligned"):
        C.fill_prps(0x10_0002, 8)


def test_prp_list_chains_when_a_list_page_fills() -> None:
    """513 entries after PRP1: 511 in the first list page, its last entry points to the next
    page, which holds the remaining 2 (Base §4.1.1)."""
    per = PAGE // 8
    buf, lbase = 0x1000_0000, 0x90_0000
    pages = 1 + (per - 1) + 2
    assert C.prp_list_pages(buf, pages * PAGE) == 2
    mem = lists(2)
    assert C.fill_prps(buf, pages * PAGE, mem, lbase) == (buf, lbase)
    assert mem[per - 2] == buf + (per - 1) * PAGE  # last data entry of list page 1
    assert mem[per - 1] == lbase + PAGE  # the chain pointer
    assert list(mem[per : per + 2]) == [buf + per * PAGE, buf + (per + 1) * PAGE]
    # Exactly one full list page of data (per entries): no chain needed.
    assert C.prp_list_pages(buf, (per + 1) * PAGE) == 1
    with pytest.raises(ValueError, match="need 2 page-aligned PRP list"):
        C.fill_prps(buf, pages * PAGE, lists(1), lbase)


@given(
    offset=st.integers(0, PAGE // 4 - 1).map(lambda x: 4 * x),
    length=st.integers(1, 1100 * PAGE),
)
def test_prps_cover_exactly_the_buffer(offset: int, length: int) -> None:
    """For any dword-aligned start and length: following the PRPs as a controller does
    yields the buffer's bytes in order, each entry after the first page-aligned, and the
    list space used is what prp_list_pages says."""
    buf, lbase = 0x4000_0000 + offset, 0x90_0000
    need = C.prp_list_pages(buf, length)
    mem = lists(max(need, 1))
    prp1, prp2 = C.fill_prps(buf, length, mem, lbase)
    segs = walk(prp1, prp2, length, mem, lbase)
    assert sum(n for _, n in segs) == length
    pos = buf
    for i, (addr, n) in enumerate(segs):
        assert addr == pos and n > 0
        if i:
            assert addr % PAGE == 0 and n <= PAGE
        pos += n
    if need:
        with pytest.raises(ValueError):
            C.fill_prps(buf, length, lists(need)[: need * PAGE // 8 - 1], lbase)


@given(length=st.integers(1, 513 * PAGE))
def test_prp_table_prefixes_match_a_fresh_build(length: int) -> None:
    """A PrpTable's list written once serves every shorter transfer."""
    buf, lbase = 0x4000_0000, 0x90_0000
    mem = lists(1)
    table = C.PrpTable(buf, 513 * PAGE, mem, lbase)
    prp1, prp2 = table.prps(length)
    assert walk(prp1, prp2, length, mem, lbase) == walk(
        *C.fill_prps(buf, length, fresh := lists(1), lbase), length, fresh, lbase
    )


def test_prp_table_limits() -> None:
    with pytest.raises(ValueError, match="one list page covers"):
        C.PrpTable(0x4000_0000, 514 * PAGE, lists(1), 0x90_0000)
    with pytest.raises(ValueError, match="page alignment"):
        C.PrpTable(0x4000_0010, PAGE, lists(1), 0x90_0000)
    with pytest.raises(ValueError, match="do not fit"):
        C.PrpTable(0x4000_0000, 4 * PAGE, lists(1), 0x90_0000).prps(5 * PAGE)


# -- Dataset Management ranges ---------------------------------------------------------------


def test_dsm_range_layout() -> None:
    """NVM figure 39: context attributes at 0, length in blocks at 4, SLBA at 8."""
    buf = np.zeros(64, dtype=np.uint8)
    assert C.write_dsm_ranges(buf, [(0x1_0000_0002, 7), (9, 1)], attributes=0x5) == 2
    assert struct.unpack_from("<IIQ", buf.tobytes(), 0) == (5, 7, 0x1_0000_0002)
    assert struct.unpack_from("<IIQ", buf.tobytes(), 16) == (5, 1, 9)
    assert not buf[32:].any()


def test_dsm_ranges_split_at_32_bits() -> None:
    big = 2 * C.DSM_MAX_BLOCKS + 5
    assert C.dsm_ranges(10, big) == [
        (10, C.DSM_MAX_BLOCKS),
        (10 + C.DSM_MAX_BLOCKS, C.DSM_MAX_BLOCKS),
        (10 + 2 * C.DSM_MAX_BLOCKS, 5),
    ]
    assert C.dsm_ranges(0, 1) == [(0, 1)]
    with pytest.raises(ValueError, match=r"1\.\.256"):
        C.write_dsm_ranges(np.zeros(16 * 257, np.uint8), [(i, 1) for i in range(257)])
    with pytest.raises(ValueError, match="DSM range of 0 blocks"):
        C.write_dsm_ranges(np.zeros(16, np.uint8), [(0, 0)])


def test_describe_status() -> None:
    assert C.describe_status(0x07) == "SCT 0 SC 0x07 (command abort requested)"
    assert C.describe_status(0x4000 | 1 << 8 | 0x0C) == "SCT 1 SC 0x0c, do not retry"
