"""The e1000 data path on a synthetic ring: the test writes descriptors as the NIC would.

The driver's own ring setup and ``rx_batch``/``tx_batch`` run unchanged on plain memory
(``bench.net.synthetic.fake_nic``); BAR0 is a bytearray, so the tail writes can be read back.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from bench.net.synthetic import fake_nic
from udrv.drivers.e1000 import regs as R
from udrv.drivers.e1000.driver import (
    BOUNDARY,
    BUF_SIZE,
    E1000,
    RXD_ERR_CE,
    RXD_ERR_RXE,
    E1000Error,
    crosses,
    ring_bytes,
    ring_layout,
)

IPE, TCPE = 1 << 6, 1 << 5  # checksum-only error bits (SDM 3.2.3.2)
DONE = R.RXD_STAT_DD | R.RXD_STAT_EOP


def nic_writes(nic: E1000, frames: list[tuple[bytes, int, int]]) -> None:
    """Play the NIC: put each (frame + FCS, status, errors) in the next descriptors."""
    i = nic.rx_next
    for data, status, errors in frames:
        slot = i % nic.nrx
        nic.rx_bufs[slot, : len(data)] = np.frombuffer(data, np.uint8)
        nic.rx[slot]["length"] = len(data)
        nic.rx[slot]["errors"] = errors
        nic.rx[slot]["status"] = status
        i += 1


def frame(size: int, fill: int) -> bytes:
    """``size`` bytes of frame followed by a 4-byte FCS."""
    return bytes([fill]) * size + b"\xfc\xfc\xfc\xfc"


def test_fcs_is_stripped_and_buffers_return_on_the_next_call() -> None:
    nic = fake_nic(16)
    rdt = nic.bar.read32(R.RDT)
    assert rdt == 15
    nic_writes(nic, [(frame(60, 1), DONE, 0), (frame(1514, 2), DONE, 0)])
    got = nic.rx_batch(64)
    assert [bytes(f) for f in got] == [bytes([1]) * 60, bytes([2]) * 1514]
    assert (nic.stats.rx_packets, nic.stats.rx_bytes) == (2, 1574)
    # The frames are views of the receive buffers: the NIC gets them back only now.
    assert nic.bar.read32(R.RDT) == rdt
    assert nic.rx_batch(64) == []
    assert nic.bar.read32(R.RDT) == 1  # one behind the next descriptor to read


def test_frame_errors_drop_checksum_flags_do_not() -> None:
    nic = fake_nic(16)
    nic_writes(
        nic,
        [
            (frame(60, 1), DONE, IPE | TCPE),  # checksum flags only: delivered
            (frame(60, 2), DONE, RXD_ERR_CE),  # CRC error
            (frame(60, 3), DONE, RXD_ERR_RXE),  # RX data error
            (frame(60, 4), DONE, 0),
        ],
    )
    got = nic.rx_batch(64)
    assert [bytes(f)[0] for f in got] == [1, 4]
    assert nic.stats.rx_dropped == {"frame_error": 2}


def test_vlan_tagged_1522_byte_frames_are_received_longer_ones_are_not() -> None:
    nic = fake_nic(16)
    nic_writes(nic, [(frame(1518, 1), DONE, 0), (frame(1519, 2), DONE, 0), (frame(13, 3), DONE, 0)])
    got = nic.rx_batch(64)
    assert [len(f) for f in got] == [1518]
    assert nic.stats.rx_dropped == {"oversize": 1, "runt": 1}


def test_a_length_past_the_buffer_is_a_counted_logged_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hostile device: the descriptor claims 4000 bytes in a 2048-byte buffer."""
    nic = fake_nic(16)
    nic_writes(nic, [(frame(60, 1), DONE, 0), (frame(60, 2), DONE, 0), (frame(60, 3), DONE, 0)])
    nic.rx[(nic.rx_next + 1) % 16]["length"] = 4000
    with caplog.at_level(logging.WARNING):
        got = nic.rx_batch(64)
    assert [bytes(f)[0] for f in got] == [1, 3]
    assert all(len(f) <= BUF_SIZE for f in got)
    assert nic.stats.rx_dropped == {"bad_length": 1}
    assert "says 4000 bytes, past its 2048-byte buffer" in caplog.text
    # and the ring goes on
    nic_writes(nic, [(frame(60, 9), DONE, 0)])
    assert [bytes(f)[0] for f in nic.rx_batch(64)] == [9]


def test_a_frame_over_two_descriptors_is_dropped_whole_even_across_batches() -> None:
    nic = fake_nic(16)
    nic_writes(nic, [(frame(60, 1), DONE, 0), (frame(60, 2), R.RXD_STAT_DD, 0)])  # no EOP
    assert [bytes(f)[0] for f in nic.rx_batch(64)] == [1]
    nic_writes(nic, [(frame(60, 3), DONE, 0), (frame(60, 4), DONE, 0)])  # 3 ends frame 2
    assert [bytes(f)[0] for f in nic.rx_batch(64)] == [4]
    assert nic.stats.rx_dropped == {"multi_descriptor": 2}


def test_a_full_tx_ring_takes_what_fits_and_drops_nothing() -> None:
    nic = fake_nic(8)
    batch = [bytes([i]) * 60 for i in range(10)]
    assert nic.tx_batch(batch) == 7  # one slot always stays empty (TDT != TDH when full)
    assert nic.bar.read32(R.TDT) == 7
    assert nic.tx_batch(batch[7:]) == 0
    assert not nic.stats.tx_dropped
    nic.tx["status"][:3] = R.TXD_STAT_DD  # the NIC finished three
    assert nic.tx_batch(batch[7:]) == 3
    assert nic.bar.read32(R.TDT) == 2
    assert [bytes(nic.tx_bufs[i % 8, :60])[0] for i in range(10)][-3:] == [7, 8, 9]
    assert (nic.stats.tx_packets, nic.stats.tx_bytes) == (10, 600)


def test_tx_sizes_runts_oversize_and_vlan() -> None:
    nic = fake_nic(16)
    tagged = b"\xff" * 12 + b"\x81\x00" + b"\x00" * 1504  # 1518 bytes with an 802.1Q tag
    untagged = b"\xff" * 12 + b"\x08\x00" + b"\x00" * 1504  # 1518 bytes without
    sizes = [b"\x00" * 13, b"\x00" * 14, b"\x00" * 1514, b"\x00" * 1515, tagged, untagged]
    assert nic.tx_batch(sizes) == 6
    assert nic.tx["length"][:3].tolist() == [14, 1514, 1518]
    assert nic.stats.tx_dropped == {"runt": 1, "oversize": 2}
    assert nic.tx_dropped_sizes == [13, 1515, 1518]


def test_the_watchdog_resets_a_tx_unit_that_stopped_and_counts_the_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nic = fake_nic(16)
    nic.bar.write32(R.STATUS, R.STATUS_LU)
    assert nic.tx_batch([b"\x00" * 60] * 5) == 5
    nic.service()
    assert nic.tx_resets == 0  # not stuck yet
    nic._tx_progress = time.monotonic() - 3
    with caplog.at_level(logging.WARNING):
        nic.service()
    assert nic.tx_resets == 1 and nic.stats.tx_dropped == {"tx_timeout": 5}
    assert "TX ring stuck" in caplog.text
    assert nic.tx_batch([b"\x00" * 60] * 15) == 15  # a clean ring again


@pytest.mark.parametrize("count", [8, 64, 256, 1000, 4096])
def test_rings_never_cross_64k(count: int) -> None:
    for base in range(0, 3 * BOUNDARY, 0x800):
        desc, bufs = ring_layout(base, count)
        assert not crosses(base + desc, count * 16), (base, count)
        iovas = base + bufs + np.arange(count) * BUF_SIZE
        assert not crosses(iovas, BUF_SIZE).any(), (base, count)
        assert desc + count * 16 <= bufs and bufs + count * BUF_SIZE <= ring_bytes(count)


def test_fake_nic_layout_is_checked_at_a_64k_straddling_base() -> None:
    nic = fake_nic(1024, rx_iova=BOUNDARY - 0x1000, tx_iova=5 * BOUNDARY - 0x800)
    for base, n in ((nic._rx_base, nic.nrx), (nic._tx_base, nic.ntx)):
        assert not crosses(base, n * 16)
    assert not crosses(nic._rx_iovas, BUF_SIZE).any()
    assert (nic.rx["addr"] == nic._rx_iovas).all()


class _Cfg:
    def __init__(self, vendor: int, device: int) -> None:
        self.ids = {0: vendor, 2: device}

    def read16(self, off: int) -> int:
        return self.ids[off]


class _Dev:
    address = "0000:00:04.0"

    def __init__(self, vendor: int, device: int) -> None:
        self.config = _Cfg(vendor, device)


@pytest.mark.parametrize(("device", "name"), [(0x10D3, "82574L"), (0x1004, "82543GC")])
def test_parts_the_driver_cannot_drive_are_refused_by_name(device: int, name: str) -> None:
    with pytest.raises(
        E1000Error,
        match=rf"0000:00:04.0 is 8086:{device:04x} \({name}\), which this driver does not support; supported: 8086:100e 82540EM, 8086:100f 82545EM",
    ):
        E1000(_Dev(0x8086, device))  # type: ignore[arg-type]


def test_flow_control_registers_hold_the_manuals_values() -> None:
    from udrv.drivers.e1000.driver import FCAH, FCAL, FCRTH, FCRTL, FCT, FCTTV

    nic = fake_nic(16)
    nic._init_flow_control()
    got = [nic.bar.read32(r) for r in (FCAL, FCAH, FCT, FCTTV, FCRTH, FCRTL)]
    # PAUSE frames: to 01:80:C2:00:00:01, type 0x8808 (802.3 Annex 31B); high water 90 % of
    # the 48 KiB receive buffer in 8-byte units, low 8 bytes under it with XON enabled.
    assert got == [0x00C28001, 0x0100, 0x8808, 0xFFFF, 44232, 44224 | 1 << 31]


def test_small_and_large_batches_leave_the_same_rings() -> None:
    """Up to SMALL_BATCH descriptors go one at a time (no numpy), more through numpy: the
    same frames must give the same descriptors, buffers, counters and checksum verdicts."""
    from udrv.drivers.e1000.driver import SMALL_BATCH

    frames = [bytes([i]) * (60 + 37 * i) for i in range(20)]
    one, many = fake_nic(32), fake_nic(32)
    for f in frames:
        assert one.tx_batch([f]) == 1
    assert many.tx_batch(frames) == 20 > SMALL_BATCH
    assert bytes(one.tx.view(np.uint8)) == bytes(many.tx.view(np.uint8))
    assert bytes(one.tx_bufs.reshape(-1)) == bytes(many.tx_bufs.reshape(-1))
    assert one.bar.read32(R.TDT) == many.bar.read32(R.TDT) == 20
    assert (one.stats.tx_packets, one.stats.tx_bytes) == (
        many.stats.tx_packets,
        many.stats.tx_bytes,
    )
    csum = R.RXD_STAT_TCPCS
    for nic in (one, many):
        nic_writes(nic, [(frame(60 + i, i), DONE | (csum if i % 3 else 0), 0) for i in range(20)])
    got_one, valid_one = [], []
    while batch := one.rx_batch(3):
        got_one += [bytes(f) for f in batch]
        valid_one += one.rx_csum_valid()
    got_many = [bytes(f) for f in many.rx_batch(64)]
    assert got_one == got_many == [bytes([i]) * (60 + i) for i in range(20)]
    assert valid_one == many.rx_csum_valid() == [bool(i % 3) for i in range(20)]
    assert (one.stats.rx_packets, one.stats.rx_bytes) == (
        many.stats.rx_packets,
        many.stats.rx_bytes,
    )
    assert one.rx_next == many.rx_next == 20
    assert not one.rx["status"].any() and not many.rx["status"].any()  # all handed back
