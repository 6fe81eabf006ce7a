"""The e1000 driver: reset, MAC, link, RX/TX descriptor rings in DMA memory, batches.

Rings are numpy structured arrays over consistent DMA buffers (8254x SDM 3.2/3.3); work is
done per batch: one scan of the status column finds every finished descriptor, one tail
write hands a whole batch back. Per-packet Python work is kept to copying the bytes.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import numpy as np

from udrv.core.device import Device
from udrv.drivers.e1000 import regs as R
from udrv.errors import DriverError

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
        from udrv import dma as udma

        self.dev = device
        vendor, dev_id = device.config.read16(0), device.config.read16(2)
        if vendor != R.VENDOR_ID or dev_id not in R.DEVICE_IDS:
            raise E1000Error(f"{device.address} is {vendor:04x}:{dev_id:04x}, not an 8254x NIC")
        if rx_ring % 8 or tx_ring % 8 or not 8 <= rx_ring <= 4096 or not 8 <= tx_ring <= 4096:
            raise E1000Error(
                f"ring sizes must be multiples of 8 in 8..4096, not {rx_ring}/{tx_ring}"
            )
        self.bar = device.bar(0)
        self.regs = R.E1000Regs(self.bar)  # bring-up; the data path uses the flat offsets
        self.model = R.DEVICE_IDS[dev_id]
        self.stats: dict[str, int] = dict.fromkeys([*R.STATS, *R.STATS64], 0)
        self.dropped_tx = 0
        self.dropped_sizes: list[int] = []  # the last few, for the log
        self.tx_resets = 0
        self.dma = udma.for_device(device)
        self.reset()
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
        self.irq: Any = None
        if interrupts:
            from udrv import irq

            self.irq = irq.enable(device, interrupts)[0]
            self.regs.ITR.write_fields(INTERVAL=max(1, itr_us * 1000 // 256))  # 256 ns units
            self.regs.IMS.write_fields(RXT0=1, RXO=1, RXDMT0=1, LSC=1, TXDW=1)
        self.regs.CTRL.set(SLU=1, ASDE=1)

    # -- bring-up (SDM 14) -----------------------------------------------------------------

    def reset(self) -> None:
        """Global reset (SDM 14.9): mask interrupts, set CTRL.RST, wait for it to clear."""
        self.regs.IMC.write(0xFFFFFFFF)
        self.regs.CTRL.set(RST=1)
        time.sleep(0.001)  # "at least 1 us" before touching registers again
        self.regs.CTRL.poll(RST=0, timeout=1.0)
        self.regs.IMC.write(0xFFFFFFFF)  # 14.4: interrupts masked again after reset
        self.regs.ICR.read()  # read-to-clear: drop causes from before the reset

    def read_eeprom(self, word: int) -> int:
        """One EEPROM word through EERD (SDM 13.4.4; 5.6: words 0-2 hold the MAC)."""
        self.regs.EERD.write_fields(ADDR=word, START=1)
        v = self.regs.EERD.poll(DONE=1, timeout=0.5)
        return R.E1000Regs.EERD.fields["DATA"].get(v)

    def read_mac(self) -> bytes:
        """The station address: RAL0/RAH0 as loaded from the EEPROM, else the EEPROM itself."""
        ral, rah = self.regs.RAL(0).read(), self.regs.RAH(0).decode()
        if rah["AV"]:
            return ral.to_bytes(4, "little") + rah["RAH"].to_bytes(2, "little")
        words = [self.read_eeprom(i) for i in range(3)]
        return b"".join(w.to_bytes(2, "little") for w in words)

    def set_mac(self, mac: bytes) -> None:
        self.regs.RAL(0).write(int.from_bytes(mac[:4], "little"))
        self.regs.RAH(0).write_fields(RAH=int.from_bytes(mac[4:6], "little"), AV=1)
        self.mac = bytes(mac)

    def _init_rx(self, promiscuous: bool) -> None:
        """SDM 14.4: receive initialization."""
        for i in range(R.MTA_COUNT):
            self.regs.MTA(i).write(0)
        self.rx[:] = 0
        self.rx["addr"] = (
            self._rx_mem.iova + self.nrx * 16 + np.arange(self.nrx, dtype=np.uint64) * BUF_SIZE
        )
        base = self._rx_mem.iova
        self.regs.RDBAL.write(base & 0xFFFFFFFF)
        self.regs.RDBAH.write(base >> 32)
        self.regs.RDLEN.write(self.nrx * 16)
        self.regs.RDH.write(0)
        self.regs.RDT.write(self.nrx - 1)  # all but one descriptor belong to the NIC
        self.rx_next = 0
        self.regs.RDTR.write(0)
        p = int(promiscuous)
        self.regs.RCTL.write_fields(
            EN=1, BAM=1, SECRC=1, BSIZE=R.RctlBsize.B2048, UPE=p, MPE=p
        )  # BSIZE with BSEX = 0: 2048-byte buffers

    def _init_tx(self) -> None:
        """SDM 14.5: transmit initialization."""
        self.tx[:] = 0
        self.tx["addr"] = (
            self._tx_mem.iova + self.ntx * 16 + np.arange(self.ntx, dtype=np.uint64) * BUF_SIZE
        )
        self.tx["status"] = R.TXD_STAT_DD  # all free
        base = self._tx_mem.iova
        self.regs.TDBAL.write(base & 0xFFFFFFFF)
        self.regs.TDBAH.write(base >> 32)
        self.regs.TDLEN.write(self.ntx * 16)
        self.regs.TDH.write(0)
        self.regs.TDT.write(0)
        self.tx_tail = 0
        self.regs.TIPG.write_fields(IPGT=10, IPGR1=8, IPGR2=6)  # 802.3 copper (14.5)
        # 14.5: collision threshold 0Fh, collision distance 40h (full duplex).
        self.regs.TCTL.write_fields(EN=1, PSP=1, CT=0x0F, COLD=0x40)

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
        """Stop RX/TX, mask interrupts, release the rings."""
        if self.dev.closed:
            return
        self.bar.write32(R.RCTL, 0)
        self.bar.write32(R.TCTL, 0)
        self.bar.write32(R.IMC, 0xFFFFFFFF)
        self._rx_mem.close()
        self._tx_mem.close()

    def __enter__(self) -> E1000:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
