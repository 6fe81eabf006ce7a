"""Per-packet Python cost of the e1000 data path on a synthetic ring (host, no device).

The NIC is replaced by memory: receive finds descriptors already marked done, transmit finds
free slots; register writes go to a plain buffer. What is left is the driver's own work per
batch. Two drivers run on identical synthetic rings, interleaved ABAB in the same process:

- **batched** (A): udrv's :class:`~udrv.drivers.e1000.E1000`, one numpy scan of the status
  column per batch, one tail write per batch;
- **per-descriptor** (B): :class:`PerDescriptorE1000`, the reference, written the way ixy.py
  (ixy's CPython driver) works: a loop that reads and writes one descriptor at a time
  through ``struct``, one tail write per batch as ixy does.

Both must deliver the same frames (checked on every batch), so the reference does the same
work, not less.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from udrv.core.region import MmioRegion
from udrv.drivers.e1000 import regs as R
from udrv.drivers.e1000.driver import (
    BUF_SIZE,
    E1000,
    ETH_FCS_LEN,
    ETH_HLEN,
    MAX_FRAME,
    OFFLOADS,
    RXD_FRAME_ERRORS,
    ring_bytes,
)
from udrv.net import Frame, Link, NicStats

GOAL_RATIO = 10.0  # issue 12 item 5: batched >= 10x the per-descriptor loop, batch 256
GOAL_BATCH = 256


class _Mem:
    """Plain memory standing in for a DMA buffer: an array and an IOVA."""

    def __init__(self, size: int, iova: int) -> None:
        self.array = np.zeros(size, dtype=np.uint8)
        self.iova = iova

    def view(self, dtype: object) -> np.ndarray:
        return self.array.view(dtype)  # type: ignore[arg-type]


def fake_nic(ring: int = 256, *, rx_iova: int = 0x100000, tx_iova: int = 0x400000) -> E1000:
    """An :class:`E1000` whose BAR0 and rings are plain memory: the driver's own ring setup
    and data path run unchanged, and the caller plays the NIC by writing descriptors."""
    nic = E1000.__new__(E1000)
    nic.bar = MmioRegion(bytearray(128 * 1024), name="fake e1000 BAR0")
    nic.regs = R.E1000Regs(nic.bar)
    nic.name, nic.model, nic.mtu, nic.mac = "synthetic 82540EM", "82540EM", 1500, bytes(6)
    nic.stats, nic.tx_dropped_sizes, nic.tx_resets = NicStats(), [], 0
    nic.irq, nic.inject_tx_stall_after, nic._link_up = None, None, False
    nic.offloads, nic._link, nic._link_checked, nic._txdw_armed = OFFLOADS, Link(False), 0.0, False
    nic.nrx = nic.ntx = ring
    nic._rx_mem = _Mem(ring_bytes(ring), rx_iova)  # type: ignore[assignment]
    nic._tx_mem = _Mem(ring_bytes(ring), tx_iova)  # type: ignore[assignment]
    nic._attach_rings()
    nic._init_rx(False)
    nic._init_tx()
    return nic


class rx_desc(ctypes.Structure):
    """SDM 3.2.3 legacy receive descriptor, declared as ixy.py declares its descriptors."""

    _fields_ = [("addr", ctypes.c_uint64), ("length", ctypes.c_uint16),
                ("csum", ctypes.c_uint16), ("status", ctypes.c_uint8),
                ("errors", ctypes.c_uint8), ("special", ctypes.c_uint16)]  # fmt: skip


class tx_desc(ctypes.Structure):
    """SDM 3.3.3 legacy transmit descriptor."""

    _fields_ = [("addr", ctypes.c_uint64), ("length", ctypes.c_uint16), ("cso", ctypes.c_uint8),
                ("cmd", ctypes.c_uint8), ("status", ctypes.c_uint8), ("css", ctypes.c_uint8),
                ("special", ctypes.c_uint16)]  # fmt: skip


assert ctypes.sizeof(rx_desc) == ctypes.sizeof(tx_desc) == 16
_TX_CMD = R.TXD_CMD_EOP | R.TXD_CMD_IFCS | R.TXD_CMD_RS
CLEAN_BATCH = 32  # ixy.py's _clean_descriptors: look at the last of 32, free all or none


class PerDescriptorE1000:
    """The reference: the same rings, driven one descriptor at a time, the way ixy.py's
    ixgbe driver does it (``queue.descriptors[i].writeback.upper.status_error``): ctypes
    descriptor structures over the ring memory, one element and its fields per step.

    RX: per descriptor, stop at the first without DD, keep frames with EOP and no error (a
    view of the buffer, as the batched driver returns), clear the status for the NIC; then
    one RDT write. TX: reclaim in batches of 32 as ixy.py does, then per frame copy it and
    fill in its descriptor; then one TDT write.
    """

    def __init__(self, nic: E1000) -> None:
        self.nic = nic
        self.n = nic.nrx
        self.rx = (rx_desc * nic.nrx).from_buffer(nic.rx)
        self.tx = (tx_desc * nic.ntx).from_buffer(nic.tx)
        self.rx_bufs = memoryview(nic.rx_bufs.reshape(-1))
        self.tx_bufs = memoryview(nic.tx_bufs.reshape(-1))
        self.tx_iovas = nic._tx_iovas.tolist()
        self.rx_next = self.tx_tail = self.tx_clean = 0

    def rx_batch(self, max_frames: int) -> list[memoryview]:
        frames = []
        i = last = self.rx_next
        for _ in range(max_frames):
            d = self.rx[i]
            status = d.status
            if not status & R.RXD_STAT_DD:
                break
            length = d.length
            if status & R.RXD_STAT_EOP and not d.errors & RXD_FRAME_ERRORS and length <= BUF_SIZE:
                frames.append(self.rx_bufs[i * BUF_SIZE : i * BUF_SIZE + length - ETH_FCS_LEN])
            d.status = 0  # DD cleared for the NIC's next write-back
            last = i
            i = (i + 1) % self.n
        if i != self.rx_next:
            self.nic.bar.write32(R.RDT, last)
        self.rx_next = i
        return frames

    def _clean(self) -> None:
        while True:
            pending = (self.tx_tail - self.tx_clean) % self.n
            if pending < CLEAN_BATCH:
                return
            last = (self.tx_clean + CLEAN_BATCH - 1) % self.n
            if not self.tx[last].status & R.TXD_STAT_DD:
                return
            self.tx_clean = (last + 1) % self.n

    def tx_batch(self, frames: Sequence[Frame]) -> int:
        self._clean()
        sent = 0
        for frame in frames:
            nxt = (self.tx_tail + 1) % self.n
            if nxt == self.tx_clean:
                break
            sent += 1
            size = len(frame)
            if not ETH_HLEN <= size <= MAX_FRAME:
                continue
            off = self.tx_tail * BUF_SIZE
            self.tx_bufs[off : off + size] = frame
            d = self.tx[self.tx_tail]
            d.addr = self.tx_iovas[self.tx_tail]
            d.length = size
            d.cmd = _TX_CMD
            d.status = 0
            self.tx_tail = nxt
        self.nic.bar.write32(R.TDT, self.tx_tail)
        return sent


@dataclass
class Result:
    """ns per packet for one batch size: per repetition, and the ratio reference/batched."""

    batch: int
    rx_ns: list[float]  # batched, per repetition
    tx_ns: list[float]
    ref_rx_ns: list[float]  # per-descriptor reference
    ref_tx_ns: list[float]

    @property
    def ratios(self) -> list[float]:
        return [
            (rr + rt) / (r + t)
            for r, t, rr, rt in zip(
                self.rx_ns, self.tx_ns, self.ref_rx_ns, self.ref_tx_ns, strict=True
            )
        ]


def _mark_rx_done(nic: E1000, start: int, batch: int, frame: int) -> None:
    """The NIC's part (not timed): ``batch`` descriptors from ``start`` written back."""
    idx = (np.arange(batch) + start) % nic.nrx
    nic.rx["status"][idx] = R.RXD_STAT_DD | R.RXD_STAT_EOP
    nic.rx["length"][idx] = frame + ETH_FCS_LEN
    nic.rx["errors"][idx] = 0


def _timed_chunk(
    rx: Callable[[int], list[memoryview]],
    tx: Callable[[Sequence[Frame]], int],
    nic: E1000,
    next_rx: Callable[[], int],
    batch: int,
    frame: int,
    rounds: int,
) -> tuple[int, int]:
    """``rounds`` RX and TX batches through one path; (rx ns, tx ns) summed."""
    rx_total = tx_total = 0
    payload = [bytes(frame)] * batch
    for _ in range(rounds):
        _mark_rx_done(nic, next_rx(), batch, frame)
        t0 = time.perf_counter_ns()
        got = rx(batch)
        rx_total += time.perf_counter_ns() - t0
        if len(got) != batch or len(got[0]) != frame:
            raise RuntimeError(f"RX returned {len(got)} frames, expected {batch} of {frame} bytes")
    for _ in range(rounds):
        nic.tx["status"][:] = R.TXD_STAT_DD  # the NIC finished everything (not timed)
        t0 = time.perf_counter_ns()
        sent = tx(payload)
        tx_total += time.perf_counter_ns() - t0
        if sent != batch:
            raise RuntimeError(f"TX took {sent} frames of {batch}")
    return rx_total, tx_total


def compare(
    batch: int, *, frame: int = 60, packets: int = 200_000, reps: int = 3, chunks: int = 10
) -> Result:
    """Batched vs per-descriptor at one batch size: ``reps`` repetitions, each alternating
    ``chunks`` chunks of A then B (ABAB...), so drift on a shared machine hits both alike."""
    ring = max(1024, 2 * batch)
    a, b_nic = fake_nic(ring), fake_nic(ring)
    b = PerDescriptorE1000(b_nic)
    rounds = max(1, packets // (batch * chunks))
    res = Result(batch, [], [], [], [])
    for _ in range(reps):
        sums = [0, 0, 0, 0]
        for _ in range(chunks):
            ra, ta = _timed_chunk(a.rx_batch, a.tx_batch, a, lambda: a.rx_next, batch, frame,
                                  rounds)  # fmt: skip
            rb, tb = _timed_chunk(b.rx_batch, b.tx_batch, b_nic, lambda: b.rx_next, batch,
                                  frame, rounds)  # fmt: skip
            sums = [sums[0] + ra, sums[1] + ta, sums[2] + rb, sums[3] + tb]
        n = rounds * chunks * batch
        res.rx_ns.append(sums[0] / n)
        res.tx_ns.append(sums[1] / n)
        res.ref_rx_ns.append(sums[2] / n)
        res.ref_tx_ns.append(sums[3] / n)
    return res


def spread(values: Sequence[float]) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
