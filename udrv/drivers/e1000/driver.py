"""The e1000 driver: reset, MAC, link, RX/TX descriptor rings in DMA memory, batches.

Rings are numpy structured arrays over consistent DMA buffers (8254x SDM 3.2/3.3); work is
done per batch: one scan of the status column finds every finished descriptor, one tail
write hands a whole batch back. Per-packet Python work is kept to copying the bytes.
"""

from __future__ import annotations

import time
from types import TracebackType

import numpy as np

from udrv.core.device import Device
from udrv.drivers.e1000 import regs as R
from udrv.errors import DriverError
from udrv.irq import Vector

BUF_SIZE = 2048  # RCTL.BSIZE = 2048
MAX_FRAME = 1518  # without LPE: 1514 + FCS


class E1000Error(DriverError):
    """The NIC misbehaves or a request cannot be done on it."""


class E1000:
    """A driver bound to one 8254x NIC.

    Args:
        device: from ``udrv.open(...)`` (VFIO).
        rx_ring, tx_ring: descriptors per ring (multiples of 8, SDM 13.4.29).
        interrupts: ``"intx"`` or None (polling).
        itr_us: interrupt throttling: at most one interrupt per this many microseconds.
    """

    def __init__(self, device: Device, *, rx_ring: int = 256, tx_ring: int = 256,
                 interrupts: str | None = "intx", itr_us: int = 50, promiscuous: bool = False) -> None:  # fmt: skip
        self.dev = device
        vendor, dev_id = device.config.read16(0), device.config.read16(2)
        if vendor != R.VENDOR_ID or dev_id not in R.DEVICE_IDS:
            raise E1000Error(f"{device.address} is {vendor:04x}:{dev_id:04x}, not an 8254x NIC")
        if rx_ring % 8 or tx_ring % 8 or not 8 <= rx_ring <= 4096 or not 8 <= tx_ring <= 4096:
            raise E1000Error(
                f"ring sizes must be multiples of 8 in 8..4096, not {rx_ring}/{tx_ring}"
            )
        self.bar = device.bar(0)
        self.model = R.DEVICE_IDS[dev_id]
        self.stats: dict[str, int] = dict.fromkeys([*R.STATS, *R.STATS64], 0)
        self.dropped_tx = 0
        self.dropped_sizes: list[int] = []  # the last few, for the log
        self.tx_resets = 0
        self.dma = device.dma
        self.reset()
        device.set_bus_master()  # the rings are DMA: undone by close()
        self.mac = self.read_mac()
        # Rings: descriptors first, then the packet buffers, in one DMA buffer each.
        self.nrx, self.ntx = rx_ring, tx_ring
        self._rx_mem = self.dma.alloc(rx_ring * 16 + rx_ring * BUF_SIZE)
        self._tx_mem = self.dma.alloc(tx_ring * 16 + tx_ring * BUF_SIZE)
        self.rx = self._rx_mem.view(np.uint8)[: rx_ring * 16].view(R.RX_DESC)
        self.tx = self._tx_mem.view(np.uint8)[: tx_ring * 16].view(R.TX_DESC)
        self.rx_bufs = self._rx_mem.array[rx_ring * 16 :].reshape(rx_ring, BUF_SIZE)
        self.tx_bufs = self._tx_mem.array[tx_ring * 16 :].reshape(tx_ring, BUF_SIZE)
        self._rx_bufs_mv = memoryview(self.rx_bufs.reshape(-1).data)
        self._tx_bufs_mv = memoryview(self.tx_bufs.reshape(-1).data)
        self._init_rx(promiscuous)
        self._init_tx()
        self.irq: Vector | None = None
        if interrupts:
            self.irq = device.irq.enable(interrupts)[0]
            self.bar.write32(R.ITR, max(1, itr_us * 1000 // 256))
            self.bar.write32(R.IMS, R.ICR_RXT0 | R.ICR_RXO | R.ICR_RXDMT0 | R.ICR_LSC | R.ICR_TXDW)
        self.bar.write32(R.CTRL, self.bar.read32(R.CTRL) | R.CTRL_SLU | R.CTRL_ASDE)

    # -- bring-up (SDM 14) -----------------------------------------------------------------

    def reset(self) -> None:
        """Global reset (SDM 14.9): mask interrupts, set CTRL.RST, wait for it to clear."""
        self.bar.write32(R.IMC, 0xFFFFFFFF)
        self.bar.write32(R.CTRL, self.bar.read32(R.CTRL) | R.CTRL_RST)
        time.sleep(0.001)  # "at least 1 us" before touching registers again
        self.bar.poll32(R.CTRL, R.CTRL_RST, 0, timeout=1.0, name="CTRL")
        self.bar.write32(R.IMC, 0xFFFFFFFF)  # 14.4: interrupts masked again after reset
        self.bar.read32(R.ICR)

    def read_eeprom(self, word: int) -> int:
        """One EEPROM word through EERD (SDM 13.4.4; 5.6: words 0-2 hold the MAC)."""
        self.bar.write32(R.EERD, (word << R.EERD_ADDR_SHIFT) | R.EERD_START)
        v = self.bar.poll32(R.EERD, R.EERD_DONE, R.EERD_DONE, timeout=0.5, name="EERD")
        return v >> R.EERD_DATA_SHIFT

    def read_mac(self) -> bytes:
        """The station address: RAL0/RAH0 as loaded from the EEPROM, else the EEPROM itself."""
        ral, rah = self.bar.read32(R.RAL0), self.bar.read32(R.RAH0)
        if rah & R.RAH_AV:
            return ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")
        words = [self.read_eeprom(i) for i in range(3)]
        return b"".join(w.to_bytes(2, "little") for w in words)

    def set_mac(self, mac: bytes) -> None:
        self.bar.write32(R.RAL0, int.from_bytes(mac[:4], "little"))
        self.bar.write32(R.RAH0, int.from_bytes(mac[4:6], "little") | R.RAH_AV)
        self.mac = bytes(mac)

    def _init_rx(self, promiscuous: bool) -> None:
        """SDM 14.4: receive initialization."""
        for i in range(R.MTA_COUNT):
            self.bar.write32(R.MTA + 4 * i, 0)
        self.rx[:] = 0
        self.rx["addr"] = (
            self._rx_mem.iova + self.nrx * 16 + np.arange(self.nrx, dtype=np.uint64) * BUF_SIZE
        )
        base = self._rx_mem.iova
        self.bar.write32(R.RDBAL, base & 0xFFFFFFFF)
        self.bar.write32(R.RDBAH, base >> 32)
        self.bar.write32(R.RDLEN, self.nrx * 16)
        self.bar.write32(R.RDH, 0)
        self.bar.write32(R.RDT, self.nrx - 1)  # all but one descriptor belong to the NIC
        self.rx_next = 0
        self.bar.write32(R.RDTR, 0)
        rctl = R.RCTL_EN | R.RCTL_BAM | R.RCTL_SECRC | R.RCTL_BSIZE_2048
        if promiscuous:
            rctl |= R.RCTL_UPE | R.RCTL_MPE
        self.bar.write32(R.RCTL, rctl)

    def _init_tx(self) -> None:
        """SDM 14.5: transmit initialization."""
        self.tx[:] = 0
        self.tx["addr"] = (
            self._tx_mem.iova + self.ntx * 16 + np.arange(self.ntx, dtype=np.uint64) * BUF_SIZE
        )
        self.tx["status"] = R.TXD_STAT_DD  # all free
        base = self._tx_mem.iova
        self.bar.write32(R.TDBAL, base & 0xFFFFFFFF)
        self.bar.write32(R.TDBAH, base >> 32)
        self.bar.write32(R.TDLEN, self.ntx * 16)
        self.bar.write32(R.TDH, 0)
        self.bar.write32(R.TDT, 0)
        self.tx_tail = 0
        self.bar.write32(R.TIPG, R.TIPG_DEFAULT)
        self.bar.write32(
            R.TCTL, R.TCTL_EN | R.TCTL_PSP | (0x0F << R.TCTL_CT_SHIFT) | (0x40 << R.TCTL_COLD_SHIFT)
        )

    # -- promiscuous / multicast -------------------------------------------------------------

    def set_promiscuous(self, on: bool) -> None:
        mask = R.RCTL_UPE | R.RCTL_MPE
        self.bar.modify(R.RCTL, mask, mask if on else 0)

    def add_multicast(self, mac: bytes) -> None:
        """Set the MTA bit for ``mac`` (SDM 13.4.43, MO = 00: bits 47:36 of the address)."""
        h = ((mac[4] >> 4) | (mac[5] << 4)) & 0xFFF
        self.bar.set_bits(R.MTA + 4 * (h >> 5), 1 << (h & 31))

    # -- data path ---------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return bool(self.bar.read32(R.STATUS) & R.STATUS_LU)

    def set_link(self, up: bool) -> None:
        """Force the link up (CTRL.SLU) or down (clear SLU; QEMU reports the link down)."""
        self.bar.modify(R.CTRL, R.CTRL_SLU, R.CTRL_SLU if up else 0)

    def receive(self, max_frames: int = 256) -> list[bytes]:
        """Every frame the NIC has written back, up to ``max_frames``; refills the ring."""
        n = self.nrx
        start = self.rx_next
        order = (np.arange(min(max_frames, n - 1)) + start) % n
        done = self.rx["status"][order] & R.RXD_STAT_DD
        count = len(done) if done.all() else int(np.argmin(done))
        if count == 0:
            return []
        idx = order[:count]
        lengths = self.rx["length"][idx].tolist()
        errors = self.rx["errors"][idx].tolist()
        mv = self._rx_bufs_mv
        frames = [
            bytes(mv[i * BUF_SIZE : i * BUF_SIZE + ln])
            for i, ln, err in zip(idx.tolist(), lengths, errors, strict=True)
            if not err
        ]
        self.rx["status"][idx] = 0
        self.rx_next = (start + count) % n
        # Give the descriptors back: the tail is one behind the next we will read.
        self.bar.write32(R.RDT, (self.rx_next - 1) % n)
        return frames

    def transmit(self, frames: list[bytes]) -> int:
        """Queue frames (one descriptor each, one doorbell per batch); returns how many of
        ``frames`` were consumed (queued, or dropped as runt/oversize)."""
        n = self.ntx
        tail = self.tx_tail
        # Free slots: the NIC set DD on every descriptor it finished (RS asks it to).
        want = min(len(frames), n - 1)
        slots = (np.arange(want) + tail) % n
        free = self.tx["status"][slots] & R.TXD_STAT_DD
        room = want if free.all() else int(np.argmin(free))
        mv = self._tx_bufs_mv
        lengths: list[int] = []
        consumed = 0
        for frame in frames:
            if len(lengths) == room:
                break
            consumed += 1
            size = len(frame)
            if not 14 <= size <= MAX_FRAME - 4:
                self.dropped_tx += 1  # runt or oversize: never handed to the NIC
                self.dropped_sizes = [*self.dropped_sizes[-15:], size]
                continue
            off = ((tail + len(lengths)) % n) * BUF_SIZE
            mv[off : off + size] = frame
            lengths.append(size)
        if lengths:
            idx = slots[: len(lengths)]
            self.tx["length"][idx] = lengths
            self.tx["cmd"][idx] = R.TXD_CMD_EOP | R.TXD_CMD_IFCS | R.TXD_CMD_RS
            self.tx["status"][idx] = 0
            self.tx_tail = (tail + len(lengths)) % n
            self.bar.write32(R.TDT, self.tx_tail)
        return consumed

    def tx_pending(self) -> bool:
        """Descriptors handed to the NIC that it has not finished (DD not yet set)."""
        last = (self.tx_tail - 1) % self.ntx
        return not self.tx["status"][last] & R.TXD_STAT_DD

    def reset_tx(self) -> None:
        """Recover a stuck transmit unit: disable, reinitialise the ring, enable."""
        self.bar.write32(R.TCTL, 0)
        self._init_tx()
        self.tx_resets += 1

    def ack_interrupts(self) -> int:
        """Read (and so clear) ICR, then re-arm the line; returns the causes."""
        icr = self.bar.read32(R.ICR)
        if self.irq is not None:
            self.irq.rearm()
        return icr

    def update_stats(self) -> dict[str, int]:
        """Accumulate the clear-on-read statistics registers (SDM 13.4.48+)."""
        for name, off in R.STATS.items():
            self.stats[name] += self.bar.read32(off)
        for name, off in R.STATS64.items():
            lo = self.bar.read32(off)
            self.stats[name] += lo | (self.bar.read32(off + 4) << 32)
        return dict(self.stats)

    def close(self) -> None:
        """Release what the driver enabled, in reverse order: stop RX/TX and mask the NIC's
        interrupts, disable the vector, clear bus mastering, free the rings. The device
        stays open (and can take a new ``E1000``); safe to call twice."""
        if self.dev.closed or self._rx_mem.closed:
            return
        self.bar.write32(R.RCTL, 0)
        self.bar.write32(R.TCTL, 0)
        self.bar.write32(R.IMC, 0xFFFFFFFF)
        if self.irq is not None:
            self.irq = None
            self.dev.irq.disable()
        self.dev.set_bus_master(False)  # no DMA into the rings once they are freed
        self._rx_mem.close()
        self._tx_mem.close()

    def __enter__(self) -> E1000:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
