"""e1000 offloads on a synthetic ring: TCP/IP context and data descriptors as the 8254x SDM
lays them out (3.3.5-3.3.7), TCP segmentation (3.5) checked by segmenting the ring's
contents the way the NIC does and verifying every segment's checksums from scratch, and the
receive checksum verdict (3.2.3, 3.2.5)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bench.net.synthetic import fake_nic
from udrv.drivers.e1000 import regs as R
from udrv.drivers.e1000.driver import BUF_SIZE, E1000
from udrv.net import Offload, TxOffload

# Linux drivers/net/ethernet/intel/e1000/e1000_hw.h, the same bits as dword 2 of a descriptor.
E1000_TXD_DTYP_D = 0x00100000
E1000_TXD_CMD_EOP, E1000_TXD_CMD_IFCS, E1000_TXD_CMD_RS = 0x01000000, 0x02000000, 0x08000000
E1000_TXD_CMD_DEXT, E1000_TXD_CMD_TSE = 0x20000000, 0x04000000
E1000_TXD_CMD_TCP, E1000_TXD_CMD_IP = 0x01000000, 0x02000000  # in a context descriptor
E1000_TXD_POPTS_IXSM, E1000_TXD_POPTS_TXSM = 0x01, 0x02


def ones_sum(data: bytes) -> int:
    """RFC 1071 16-bit ones' complement sum (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_ok(ip_hdr: bytes, tcp: bytes) -> bool:
    """Whether a TCP segment's checksum is right, from scratch (RFC 793 pseudo-header)."""
    pseudo = ip_hdr[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return ones_sum(pseudo + tcp) == 0xFFFF


def tcp_frame(payload: bytes, *, ip_id: int = 0x1234, seq: int = 1000, vlan: bool = False) -> bytes:
    """An Ethernet + IPv4 + TCP (20-byte header + 12 bytes of options) frame as the stack
    hands it over with CHECKSUM_PARTIAL: IP header checksum done, the TCP checksum field
    holding the pseudo-header sum including the length (Linux __tcp_v4_send_check)."""
    eth = b"\x52\x54\x00\x12\x34\x05" + b"\x52\x54\x00\x12\x34\x04"
    eth += (b"\x81\x00\x00\x07" if vlan else b"") + b"\x08\x00"
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 8 << 4, 0x18, 512, 0, 0) + bytes(
        [1, 1, 8, 10] + [0] * 8
    )
    saddr, daddr = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ip_id, 0x4000, 64,
                     6, 0, saddr, daddr)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
    seed = ones_sum(saddr + daddr + struct.pack("!HH", 6, len(tcp) + len(payload)))
    tcp = tcp[:16] + struct.pack("!H", seed) + tcp[18:]
    return eth + ip + tcp + payload


def segment_like_the_nic(nic: E1000, first: int) -> list[bytes]:
    """Play the 8254x's TCP segmentation (SDM 3.5) over the descriptors from ``first`` on: a
    context descriptor, then data descriptors up to EOP. Per segment: the headers repeated,
    IP total length and identification, TCP sequence number set, PSH/FIN only on the last,
    then the checksums inserted where POPTS asks, seeded with what the driver left in the
    fields (plus the segment's TCP length, as the NIC adds it)."""
    n = nic.ntx
    ctx = nic.tx.view(R.TX_CTX_DESC)[first]
    word = int(ctx["paylen_dtyp_tucmd"])
    assert (word >> 20) & 0xF == R.TXD_DTYP_C and (word >> 24) & R.TXD_CMD_TSE
    hdrlen, mss, paylen = int(ctx["hdrlen"]), int(ctx["mss"]), word & 0xFFFFF
    ipcss, ipcso, ipcse, tucss, tucso = (
        int(ctx[k]) for k in ("ipcss", "ipcso", "ipcse", "tucss", "tucso")
    )
    data, popts, i = b"", None, (first + 1) % n
    while True:
        hi = int(nic._tx_hi[i])
        assert (hi >> 20) & 0xF == R.TXD_DTYP_D and (hi >> 24) & R.TXD_CMD_TSE
        popts = popts if popts is not None else (hi >> 40) & 0xFF
        length = hi & 0xFFFFF
        addr = int(nic._tx_lo[i])
        off = addr - int(nic._tx_iovas[0])
        data += bytes(nic.tx_bufs.reshape(-1)[off : off + length])
        if (hi >> 24) & R.TXD_CMD_EOP:
            break
        i = (i + 1) % n
    assert len(data) == hdrlen + paylen
    header, payload = data[:hdrlen], data[hdrlen:]
    segments = []
    for k in range(0, paylen, mss):
        chunk = payload[k : k + mss]
        seg = bytearray(header + chunk)
        struct.pack_into("!H", seg, ipcss + 2, len(seg) - ipcss)
        struct.pack_into("!H", seg, ipcss + 4, (struct.unpack_from("!H", header, ipcss + 4)[0]
                                                 + k // mss) & 0xFFFF)  # fmt: skip
        struct.pack_into("!I", seg, tucss + 4, struct.unpack_from("!I", header, tucss + 4)[0] + k)
        if k + mss < paylen:
            seg[tucss + 13] &= ~0x09  # PSH, FIN only on the last segment
        if popts & R.TXD_POPTS_TXSM:
            seed = struct.unpack_from("!H", seg, tucso)[0] + len(seg) - tucss  # + TCP length
            struct.pack_into("!H", seg, tucso, (seed & 0xFFFF) + (seed >> 16))
            struct.pack_into("!H", seg, tucso, ~ones_sum(bytes(seg[tucss:])) & 0xFFFF)
        if popts & R.TXD_POPTS_IXSM:
            struct.pack_into("!H", seg, ipcso, ~ones_sum(bytes(seg[ipcss : ipcse + 1])) & 0xFFFF)
        segments.append(bytes(seg))
    return segments


def test_context_descriptor_layout_is_the_sdms() -> None:
    """3.3.6: IPCSS, IPCSO, IPCSE, TUCSS, TUCSO, TUCSE in bytes 0-7; PAYLEN 19:0, DTYP
    23:20 = 0000b and TUCMD 31:24 in dword 2; STA, HDRLEN, MSS in bytes 12-15. Dword 2
    equals what Linux's e1000_tso builds (plus RS, which udrv asks for on every descriptor)."""
    tucmd = R.TXD_CMD_TCP | R.TXD_CMD_IP | R.TXD_CMD_TSE | R.TXD_CMD_RS
    lo, hi = R.tx_context_desc(ipcss=14, ipcso=24, ipcse=33, tucss=34, tucso=50, tucse=0,
                               paylen=0x12345, tucmd=tucmd, hdrlen=66, mss=1448)  # fmt: skip
    raw = struct.pack("<QQ", lo, hi)
    assert raw == bytes([14, 24, 33, 0, 34, 50, 0, 0, 0x45, 0x23, 0x01, 0x2F, 0, 66, 0xA8, 0x05])
    linux = E1000_TXD_CMD_IP | E1000_TXD_CMD_DEXT | E1000_TXD_CMD_TSE | E1000_TXD_CMD_TCP | 0x12345
    assert struct.unpack_from("<I", raw, 8)[0] == linux | E1000_TXD_CMD_RS
    rec = np.frombuffer(raw, R.TX_CTX_DESC)[0]
    assert (int(rec["ipcse"]), int(rec["hdrlen"]), int(rec["mss"])) == (33, 66, 1448)


def test_data_descriptor_layout_is_the_sdms() -> None:
    """3.3.7: DTALEN 19:0, DTYP 23:20 = 0001b, DCMD 31:24; STA byte 12, POPTS byte 13; the
    dwords Linux's e1000_tx_queue writes for a TSO buffer of 2048 bytes."""
    hi = R.tx_data_desc_hi(2048, R.TXD_CMD_IFCS | R.TXD_CMD_RS | R.TXD_CMD_TSE,
                           R.TXD_POPTS_IXSM | R.TXD_POPTS_TXSM)  # fmt: skip
    lower = E1000_TXD_CMD_DEXT | E1000_TXD_DTYP_D | E1000_TXD_CMD_TSE | E1000_TXD_CMD_IFCS
    assert hi & 0xFFFFFFFF == lower | E1000_TXD_CMD_RS | 2048
    assert hi >> 32 == (E1000_TXD_POPTS_IXSM | E1000_TXD_POPTS_TXSM) << 8
    assert R.tx_data_desc_hi(0x1_0000, 0, 0) & 0xFFFFF == 0x1_0000  # DTALEN has 20 bits
    assert R.tx_legacy_desc_hi(60, R.TXD_CMD_EOP) == 60 | 1 << 24


@pytest.mark.parametrize("vlan", [False, True])
def test_a_tso_super_frame_becomes_segments_with_right_checksums(vlan: bool) -> None:
    nic = fake_nic(64)
    payload = bytes(range(256)) * 39 + b"end"  # 9987 bytes: 7 segments of 1448, the last short
    frame = tcp_frame(payload, vlan=vlan)
    l2 = 18 if vlan else 14
    assert nic.tx_batch([frame], [TxOffload(l2 + 20, 16, 1448)]) == 1
    ndata = -(-len(frame) // BUF_SIZE)
    assert nic.bar.read32(R.TDT) == 1 + ndata  # one context + one descriptor per buffer
    assert nic.stats.tx_packets == 1 and nic.stats.tx_bytes == len(frame)
    ctx = nic.tx.view(R.TX_CTX_DESC)[0]
    assert (int(ctx["ipcss"]), int(ctx["ipcso"]), int(ctx["ipcse"])) == (l2, l2 + 10, l2 + 19)
    assert (int(ctx["tucss"]), int(ctx["tucso"]), int(ctx["tucse"])) == (l2 + 20, l2 + 36, 0)
    assert (int(ctx["hdrlen"]), int(ctx["mss"])) == (l2 + 52, 1448)
    segs = segment_like_the_nic(nic, 0)
    assert len(segs) == 7 and b"".join(s[l2 + 52 :] for s in segs) == payload
    for k, seg in enumerate(segs):
        ip = seg[l2 : l2 + 20]
        assert ones_sum(ip) == 0xFFFF, f"segment {k}: IP header checksum"
        assert tcp_ok(ip, seg[l2 + 20 :]), f"segment {k}: TCP checksum"
        assert struct.unpack_from("!H", ip, 4)[0] == 0x1234 + k
        assert struct.unpack_from("!I", seg, l2 + 24)[0] == 1000 + 1448 * k
        assert seg[l2 + 33] & 0x08 == (0x08 if k == 6 else 0)  # PSH on the last one only
        assert len(seg) == (l2 + 52 + 1448 if k < 6 else l2 + 52 + len(payload) - 6 * 1448)


def test_a_super_frame_that_wraps_the_ring_is_copied_in_two_parts() -> None:
    nic = fake_nic(16)
    assert nic.tx_batch([b"\xee" * 60] * 12) == 12
    nic.tx["status"][:] = R.TXD_STAT_DD  # the NIC finished them
    payload = bytes(range(251)) * 28  # 7028 bytes: 4 buffers with the headers, slots 13-15, 0
    frame = tcp_frame(payload)
    assert nic.tx_batch([frame], [TxOffload(34, 16, 1000)]) == 1
    assert nic.bar.read32(R.TDT) == (12 + 1 + 4) % 16
    segs = segment_like_the_nic(nic, 12)
    assert b"".join(s[66:] for s in segs) == payload
    assert all(tcp_ok(s[14:34], s[34:]) for s in segs)


def test_a_super_frame_waits_whole_for_room() -> None:
    nic = fake_nic(8)
    frame = tcp_frame(bytes(9000))  # 1 context + 5 data descriptors
    assert nic.tx_batch([b"\x00" * 60] * 3) == 3
    tdt = nic.bar.read32(R.TDT)
    assert nic.tx_batch([frame], [TxOffload(34, 16, 1448)]) == 0  # 4 free slots: not enough
    assert nic.bar.read32(R.TDT) == tdt and not nic.stats.tx_dropped
    nic.tx["status"][:] = R.TXD_STAT_DD
    assert nic.tx_batch([frame], [TxOffload(34, 16, 1448)]) == 1


def test_checksum_offload_reuses_the_context_the_nic_holds() -> None:
    """Checksum-only frames: a context descriptor (TUCSS/TUCSO) when the offsets change, none
    while they stay; the data descriptor asks for TXSM. A TSO context replaces it."""
    nic = fake_nic(32)
    udp = tcp_frame(b"x" * 100)  # any frame: the NIC sums from TUCSS on
    off = TxOffload(34, 6, 0)
    assert nic.tx_batch([udp, udp], [off, off]) == 2
    assert nic.bar.read32(R.TDT) == 3  # one context, two data descriptors
    ctx = nic.tx.view(R.TX_CTX_DESC)[0]
    assert (int(ctx["tucss"]), int(ctx["tucso"]), int(ctx["tucse"])) == (34, 40, 0)
    assert not int(ctx["paylen_dtyp_tucmd"]) >> 24 & R.TXD_CMD_TSE
    for i in (1, 2):
        hi = int(nic._tx_hi[i])
        assert (hi >> 40) & 0xFF == R.TXD_POPTS_TXSM and (hi >> 24) & R.TXD_CMD_EOP
    assert nic.tx_batch([udp], [off]) == 1 and nic.bar.read32(R.TDT) == 4  # no new context
    assert nic.tx_batch([udp], [TxOffload(34, 16, 0)]) == 1 and nic.bar.read32(R.TDT) == 6
    nic.tx_batch([tcp_frame(bytes(3000))], [TxOffload(34, 16, 1448)])
    assert nic.tx_batch([udp], [TxOffload(34, 16, 0)]) == 1
    assert int(nic.tx.view(R.TX_CTX_DESC)[nic.bar.read32(R.TDT) - 2]["tucso"]) == 50


def test_a_checksum_the_nic_cannot_place_is_computed_by_the_driver() -> None:
    """TUCSO has 8 bits: a checksum field past byte 255 is filled in by the driver."""
    nic = fake_nic(16)
    frame = bytearray(tcp_frame(b"y" * 600))
    start = 300  # pretend the transport header starts here (deep encapsulation)
    seed = 0x1234
    struct.pack_into("!H", frame, start + 6, seed)
    assert nic.tx_batch([bytes(frame)], [TxOffload(start, 6, 0)]) == 1
    assert nic.bar.read32(R.TDT) == 1  # no context descriptor
    assert (int(nic._tx_hi[0]) >> 40) & 0xFF == 0  # no POPTS
    sent = bytes(nic.tx_bufs[0, : len(frame)])
    # the sum over the covered bytes and the pseudo-header (the seed the field held) checks out
    assert ones_sum(sent[start:] + struct.pack("!H", seed)) == 0xFFFF
    assert sent[:start] == bytes(frame[:start])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f[:12] + b"\x86\xdd" + f[14:], "bad_offload"),  # not IPv4
        (lambda f: f[:23] + b"\x11" + f[24:], "bad_offload"),  # not TCP
    ],
)
def test_super_frames_the_nic_cannot_segment_are_dropped_and_counted(change, reason) -> None:  # type: ignore[no-untyped-def]
    nic = fake_nic(16)
    frame = change(tcp_frame(bytes(3000)))
    assert nic.tx_batch([frame, b"\x00" * 60], [TxOffload(34, 16, 1448), None]) == 2
    assert nic.stats.tx_dropped == {reason: 1} and nic.bar.read32(R.TDT) == 1


def test_segments_over_the_frame_limit_are_dropped() -> None:
    nic = fake_nic(16)
    assert nic.tx_batch([tcp_frame(bytes(5000))], [TxOffload(34, 16, 1500)]) == 1
    assert nic.stats.tx_dropped == {"oversize": 1}  # 66 + 1500 > 1514


def test_offloads_the_nic_was_not_asked_for_are_not_used() -> None:
    nic = fake_nic(16)
    nic.offloads = Offload.NONE
    assert nic.tx_batch([tcp_frame(bytes(3000))], [TxOffload(34, 16, 1448)]) == 1
    assert nic.stats.tx_dropped == {"bad_offload": 1}
    frame = tcp_frame(b"z" * 50)
    assert nic.tx_batch([frame], [TxOffload(34, 16, 0)]) == 1  # checksummed by the driver
    sent = bytes(nic.tx_bufs[0, : len(frame)])
    assert tcp_ok(sent[14:34], sent[34:])


def test_rxcsum_is_programmed_from_the_offloads() -> None:
    nic = fake_nic(16)
    assert nic.bar.read32(R.RXCSUM) == R.RXCSUM_IPOFLD | R.RXCSUM_TUOFLD
    nic.offloads = Offload.NONE
    nic._init_rx(False)
    assert nic.bar.read32(R.RXCSUM) == 0


def test_the_receive_checksum_verdict_follows_the_descriptor() -> None:
    """TCPCS set, IXSM clear, TCPE clear: verified. IXSM (QEMU sets it on every frame) or
    TCPE: not. A dropped frame in the batch does not shift the verdicts."""
    nic = fake_nic(16)
    good = R.RXD_STAT_DD | R.RXD_STAT_EOP | R.RXD_STAT_TCPCS | R.RXD_STAT_IPCS
    cases = [(good, 0), (good | R.RXD_STAT_IXSM, 0), (good, R.RXD_ERR_TCPE),
             (R.RXD_STAT_DD | R.RXD_STAT_EOP, 0), (good, 0)]  # fmt: skip
    for slot, (status, errors) in enumerate(cases):
        nic.rx_bufs[slot, :64] = slot
        nic.rx[slot]["length"], nic.rx[slot]["status"], nic.rx[slot]["errors"] = 64, status, errors
    assert nic.rx_csum_valid() == []
    assert len(nic.rx_batch(64)) == 5
    assert nic.rx_csum_valid() == [True, False, False, False, True]
    # with a frame error (CE) in the middle: 4 frames, verdicts still in step
    for slot, (status, errors) in enumerate(cases):
        s = 5 + slot
        nic.rx_bufs[s, :64] = slot
        nic.rx[s]["length"], nic.rx[s]["status"] = 64, status
        nic.rx[s]["errors"] = errors | (1 if slot == 1 else 0)
    got = nic.rx_batch(64)
    assert [bytes(f)[0] for f in got] == [0, 2, 3, 4]
    assert nic.rx_csum_valid() == [True, False, False, True]
    assert nic.rx_batch(64) == [] and nic.rx_csum_valid() == []


def udp_frame(payload: bytes) -> bytes:
    """Ethernet + IPv4 + UDP as the stack hands it over with CHECKSUM_PARTIAL (the field
    holds the pseudo-header sum); the bytes past the headers are all the NIC needs here."""
    return (
        tcp_frame(b"")[:34] + struct.pack("!HHHH", 5201, 5201, 8 + len(payload), 0x1234) + payload
    )


@pytest.mark.parametrize("count", [3, 40])  # one descriptor at a time; through numpy
def test_a_batch_of_checksum_frames_takes_one_data_descriptor_each(count: int) -> None:
    """Frames that all ask for the same checksum (a UDP stream) go as plain frames do, one
    data descriptor each (DTYP data, DEXT, EOP, IFCS, RS, POPTS.TXSM, the frame's length,
    its buffer's address), behind one context descriptor the first time only; the frame
    counters count frames, not descriptors. The second batch wraps the ring."""
    nic = fake_nic(64)
    frames = [udp_frame(bytes([i]) * (18 + i)) for i in range(count)]
    off = TxOffload(34, 6, 0)
    assert nic.tx_batch(frames, [off] * count) == count
    assert nic.bar.read32(R.TDT) == 1 + count
    ctx = nic.tx.view(R.TX_CTX_DESC)[0]
    assert (int(ctx["tucss"]), int(ctx["tucso"]), int(ctx["tucse"])) == (34, 40, 0)
    assert (int(ctx["paylen_dtyp_tucmd"]) >> 20) & 0xF == R.TXD_DTYP_C
    lower = E1000_TXD_DTYP_D | E1000_TXD_CMD_DEXT | E1000_TXD_CMD_EOP | E1000_TXD_CMD_IFCS
    lower |= E1000_TXD_CMD_RS
    for i, f in enumerate(frames):
        slot = 1 + i
        hi = int(nic._tx_hi[slot])
        assert hi == lower | len(f) | E1000_TXD_POPTS_TXSM << 40, f"descriptor {slot}"
        assert int(nic._tx_lo[slot]) == int(nic._tx_iovas[slot])
        assert bytes(nic.tx_bufs[slot, : len(f)]) == f
    assert nic.stats.tx_packets == count and nic.stats.tx_bytes == sum(map(len, frames))
    nic.tx["status"][:] = R.TXD_STAT_DD  # the NIC finished them
    assert nic.tx_batch([b"\x00" * 60] * (60 - count)) == 60 - count  # up to slot 60
    nic.tx["status"][:] = R.TXD_STAT_DD
    again = frames[:4] if count < 8 else frames
    assert nic.tx_batch(again, [off] * len(again)) == len(again)
    assert nic.bar.read32(R.TDT) == (61 + len(again)) % 64  # no context descriptor
    for i, f in enumerate(again):
        slot = (61 + i) % 64
        assert int(nic._tx_hi[slot]) == lower | len(f) | E1000_TXD_POPTS_TXSM << 40
        assert bytes(nic.tx_bufs[slot, : len(f)]) == f


def test_a_checksum_batch_waits_for_room_for_its_context_and_a_frame() -> None:
    nic = fake_nic(8)
    off = TxOffload(34, 6, 0)
    assert nic.tx_batch([b"\x00" * 60] * 6) == 6  # one free slot left
    assert nic.tx_batch([udp_frame(b"a")] * 2, [off] * 2) == 0
    assert nic.bar.read32(R.TDT) == 6 and nic._tx_csum_ctx is None
    nic.tx["status"][0] = R.TXD_STAT_DD  # two free slots: the context and one frame
    assert nic.tx_batch([udp_frame(b"a")] * 2, [off] * 2) == 1
    assert nic.bar.read32(R.TDT) == 0 and nic._tx_csum_ctx == (34, 40)


@pytest.mark.parametrize("count", [5, 20])
def test_frames_a_checksum_batch_cannot_send_are_dropped_and_counted(count: int) -> None:
    nic = fake_nic(32)
    off = TxOffload(34, 6, 0)
    frames = [udp_frame(bytes([i]) * 20) for i in range(count)]
    frames[2] = frames[2][:41]  # ends inside the UDP checksum field (bytes 40-41)
    frames[3] = frames[3][:12]  # not even an Ethernet header
    frames[4] = udp_frame(bytes(1500))  # 1542 bytes
    assert nic.tx_batch(frames, [off] * count) == count
    assert nic.stats.tx_dropped == {"bad_offload": 1, "runt": 1, "oversize": 1}
    assert nic.stats.tx_packets == count - 3
    assert nic.bar.read32(R.TDT) == 1 + count - 3  # a context, then the frames that went
    kept = frames[:2] + frames[5:]
    assert [bytes(nic.tx_bufs[1 + i, : len(f)]) for i, f in enumerate(kept)] == kept
