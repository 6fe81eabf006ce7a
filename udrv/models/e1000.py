"""An Intel 82540EM (e1000) model, after the PCI/PCI-X Family of Gigabit Ethernet
Controllers Software Developer's Manual (8254x SDM rev 4.0; sections cited).

Reset, the EEPROM (MAC in words 0-2, checksum word 0x3F) read through EERD, the internal
PHY's registers through MDIC (SDM 13.4.7; :class:`Phy`), link status,
the receive and transmit units with legacy descriptors, receive filtering (station address,
broadcast, multicast table, promiscuous), interrupt causes ICR/ICS/IMS/IMC on INTx, the
statistics the driver reads, and the IOADDR/IODATA window in the I/O BAR (SDM 13.2.1).
Transmitted frames go to :attr:`E1000Model.link`: back into the same NIC (loopback), to
another model (:func:`connect`), or into a socket (:meth:`E1000Model.attach_socket`).

Constants are written here from the SDM, not imported from the driver.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from udrv.models.base import PciModel
from udrv.models.pci import ConfigSpace

VENDOR_ID, DEVICE_ID = 0x8086, 0x100E  # 82540EM (SDM 5.5 table 5-2)
CLASS_CODE = 0x020000  # Ethernet controller
BAR0_SIZE = 128 * 1024  # SDM 4.1: 128 KB memory space
BAR1_SIZE = 64  # I/O: IOADDR at 0, IODATA at 4 (SDM 13.2.1)

# 13.4 registers
CTRL, STATUS, EECD, EERD, CTRL_EXT, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x0020
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, TCTL, TIPG = 0x0100, 0x0400, 0x0410
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818
MTA, RAL0, RAH0 = 0x5200, 0x5400, 0x5404
CTRL_SLU, CTRL_RST = 1 << 6, 1 << 26
STATUS_FD, STATUS_LU, STATUS_SPEED_1000 = 1 << 0, 1 << 1, 2 << 6
EERD_START, EERD_DONE = 1 << 0, 1 << 4
ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXDMT0, ICR_RXO, ICR_RXT0 = 1, 2, 4, 16, 64, 128
ICR_MDAC = 1 << 9  # MDI/O access complete (13.4.17)
# 13.4.7 MDIC: DATA 15:0, REGADD 20:16, PHYADD 25:21, OP 27:26, R 28, I 29, E 30
MDIC_OP_WRITE, MDIC_OP_READ = 0b01, 0b10
MDIC_R, MDIC_I, MDIC_E = 1 << 28, 1 << 29, 1 << 30
PHY_ADDR = 1  # 13.4.7: the internal PHY answers at address 1, no other
RCTL_EN, RCTL_UPE, RCTL_MPE, RCTL_BAM, RCTL_BSEX, RCTL_SECRC = 2, 8, 16, 1 << 15, 1 << 25, 1 << 26
TCTL_EN, TCTL_PSP = 2, 8
RAH_AV = 1 << 31
TXD_CMD_EOP, TXD_CMD_RS, TXD_CMD_DEXT = 1, 8, 32
TXD_STAT_DD = 1
RXD_STAT_DD, RXD_STAT_EOP = 1, 2
# 13.4.48+ statistics (clear on read)
MPC, GPRC, BPRC, MPRC, GPTC, GORCL, GORCH, GOTCL, GOTCH, RNBC, ROC, TPR, TPT = (
    0x4010, 0x4074, 0x4078, 0x407C, 0x4080, 0x4088, 0x408C, 0x4090, 0x4094, 0x40A0, 0x40AC,
    0x40D0, 0x40D4,
)  # fmt: skip
STATS = {MPC, GPRC, BPRC, MPRC, GPTC, GORCL, GORCH, GOTCL, GOTCH, RNBC, ROC, TPR, TPT}

EEPROM_WORDS = 64
EEPROM_CHECKSUM = 0xBABA  # SDM 5.6.1: words 0x00-0x3F sum to this
DEFAULT_MAC = bytes.fromhex("525400123456")

# The PHY's registers: IEEE 802.3 clause 22.2.4 (0, 1, 2, 3), 28.2.4.1 (4, 5), 40.5.1.1 (9,
# 10), and the M88E1011's specific status (17); the SDM's PHY register section (13.5) lists
# the same ones with the 82540EM's reset values, which are used here.
BMCR, BMSR, PHYID1, PHYID2, ANAR, ANLPAR, GBCR, GBSR, PSSR = 0, 1, 2, 3, 4, 5, 9, 10, 17
BMCR_RESET, BMCR_AN_ENABLE, BMCR_POWER_DOWN, BMCR_RESTART_AN = 1 << 15, 1 << 12, 1 << 11, 1 << 9
BMCR_DEFAULT = 0x1140  # AN enable, full duplex, speed 1000 (bit 6 set, bit 13 clear)
BMSR_LINK, BMSR_AN_COMPLETE = 1 << 2, 1 << 5
BMSR_ABILITIES = 0x7949  # 100BASE-TX/10BASE-T FD+HD, extended status, MF suppression, AN, ext
# Linux e1000_hw.h M88E1011_I_PHY_ID 0x01410C20: OUI-derived ID 1, model 0x02, revision 0.
PHY_ID = 0x01410C20
ANAR_DEFAULT = 0x01E1  # selector 00001 (802.3), 10/100 half and full duplex
ANAR_PAUSE, ANAR_ASM_DIR = 1 << 10, 1 << 11
ANLPAR_ACK = 1 << 14
GBCR_DEFAULT = 0x0300  # advertise 1000BASE-T full and half duplex
GBSR_LINK = 0x3C00  # local and remote receiver OK, partner 1000BASE-T full and half duplex
# M88E1000_PSSR (Linux e1000_hw.h): speed 15:14 (10b = 1000), duplex 13, resolved 11, link 10
PSSR_LINK = 0xA000 | 1 << 11 | 1 << 10


class Phy:
    """The 82540EM's internal copper PHY (an M88E1011) as seen through MDIC.

    Only what decides the link is modelled: power-down and auto-negotiation in BMCR, link
    and auto-negotiation complete in BMSR, the abilities both ends advertise. Auto-negotiation
    completes at once when the PHY is powered and the cable is in. A MAC reset (CTRL.RST)
    leaves the PHY alone, as on the part: a PHY powered down by the last driver stays down.

    Args:
        power_down: start with BMCR.PD set (as Linux's e1000 leaves the PHY on unbind).
        partner: what the link partner advertises (ANLPAR; by default 10/100 and PAUSE).
    """

    def __init__(
        self, *, power_down: bool = False, partner: int = ANAR_DEFAULT | ANAR_PAUSE
    ) -> None:
        self.partner = partner
        self.reset()
        if power_down:
            self.regs[BMCR] |= BMCR_POWER_DOWN

    def reset(self) -> None:
        """BMCR.RST (22.2.4.1.1): every register back to its default."""
        self.regs = {BMCR: BMCR_DEFAULT, ANAR: ANAR_DEFAULT, GBCR: GBCR_DEFAULT}

    def link(self, carrier: bool) -> bool:
        """Whether the PHY has a link: powered, cable in, auto-negotiation (if on) done."""
        return carrier and not self.regs[BMCR] & BMCR_POWER_DOWN

    def read(self, reg: int, carrier: bool) -> int:
        up = self.link(carrier)
        if reg == BMSR:
            return BMSR_ABILITIES | ((BMSR_LINK | BMSR_AN_COMPLETE) if up else 0)
        if reg == PHYID1:
            return PHY_ID >> 16
        if reg == PHYID2:
            return PHY_ID & 0xFFFF
        if reg == ANLPAR:
            return (self.partner | ANLPAR_ACK) if up else 0
        if reg == GBSR:
            return GBSR_LINK if up else 0
        if reg == PSSR:
            return PSSR_LINK if up else 0
        return self.regs.get(reg, 0)

    def write(self, reg: int, value: int) -> None:
        if reg == BMCR:
            if value & BMCR_RESET:
                self.reset()
                return
            # Restart auto-negotiation is self-clearing (22.2.4.1.7): done at once here.
            self.regs[BMCR] = value & ~BMCR_RESTART_AN
        elif reg in (ANAR, GBCR) or reg > GBSR:
            self.regs[reg] = value  # BMSR, IDs, the partner's abilities are read-only


@dataclass
class Injections:
    """Faults on purpose (each fires once)."""

    rx_length_overrun: int = 0  # the next RX descriptor claims this many bytes more


class E1000Model(PciModel):
    """An 82540EM.

    Args:
        mac: the station address in the EEPROM.
        loopback: transmitted frames come back in (else they go to :attr:`link`, or
            nowhere).
        phy_power_down: the PHY starts powered down (BMCR.PD), as a previous driver may
            leave it: no link until a driver powers it up through MDIC.
        pcix_mmrbc: add a PCI-X capability with this Maximum Memory Read Byte Count code
            (0-3: 512-4096 bytes), as on an 82545EM in a PCI-X slot.
    """

    name = "e1000"

    def __init__(self, *, mac: bytes = DEFAULT_MAC, loopback: bool = False,
                 phy_power_down: bool = False, pcix_mmrbc: int | None = None) -> None:  # fmt: skip
        super().__init__(
            ConfigSpace(vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_CODE, revision=3,
                        subsystem_vendor_id=VENDOR_ID, subsystem_id=0x001E)
        )  # fmt: skip
        self.add_bar(0, BAR0_SIZE, read=self.mmio_read, write=self.mmio_write)
        self.add_bar(1, BAR1_SIZE, io=True, read=self.io_read, write=self.io_write)
        if pcix_mmrbc is not None:  # an 82545EM on a PCI-X bus, MMRBC as firmware left it
            self.config.add_pcix(pcix_mmrbc)
        self.seal()
        words = [int.from_bytes(mac[i : i + 2], "little") for i in (0, 2, 4)]
        words += [0] * (EEPROM_WORDS - 4)
        words.append((EEPROM_CHECKSUM - sum(words)) & 0xFFFF)
        self.eeprom = words
        self.mac = bytes(mac)
        self.link: Callable[[bytes], object] | None = self.receive_frame if loopback else None
        self.carrier = True  # the cable is plugged in
        self.phy = Phy(power_down=phy_power_down)  # not reset by CTRL.RST (see Phy)
        self.inject = Injections()
        self.sent: list[bytes] = []  # the last frames transmitted (tests)
        self._sock: socket.socket | None = None
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Global reset (SDM 14.9): registers to defaults, the MAC reloaded from the EEPROM."""
        self.regs: dict[int, int] = {}
        self.ioaddr = 0
        self.icr = 0
        self.ims = 0
        self.regs[RAL0] = int.from_bytes(self.mac[:4], "little")
        self.regs[RAH0] = int.from_bytes(self.mac[4:6], "little") | RAH_AV
        self._update_irq()

    @property
    def status(self) -> int:
        # With the internal PHY, the MAC sees the PHY's link once CTRL.SLU is set (13.4.1).
        up = self.phy.link(self.carrier) and bool(self.regs.get(CTRL, 0) & CTRL_SLU)
        return STATUS_FD | STATUS_SPEED_1000 | (STATUS_LU if up else 0)

    def set_carrier(self, up: bool) -> None:
        """Plug or unplug the cable: STATUS.LU follows (if the PHY is powered and CTRL.SLU
        set), and ICR.LSC is raised when it changes (SDM 13.4.17)."""
        with self.lock:
            was = self.status & STATUS_LU
            self.carrier = up
            if (self.status & STATUS_LU) != was:
                self._cause(ICR_LSC)

    # -- registers ---------------------------------------------------------------------------

    def mmio_read(self, offset: int, width: int) -> int:
        if width != 4 or offset % 4:
            return (1 << (8 * width)) - 1  # the 8254x decodes dword accesses (SDM 13.3)
        if offset == STATUS:
            return self.status
        if offset == ICR:  # clear on read (13.4.17)
            value, self.icr = self.icr, 0
            self._update_irq()
            return value
        if offset == IMS:
            return self.ims
        if offset in STATS:
            return self.regs.pop(offset, 0)
        return self.regs.get(offset, 0)

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if width != 4 or offset % 4:
            return
        if offset == CTRL:
            if value & CTRL_RST:
                self.reset()  # self-clearing: reads back 0
                return
            was = self.status & STATUS_LU
            self.regs[CTRL] = value
            if (self.status & STATUS_LU) != was:
                self._cause(ICR_LSC)
        elif offset == EERD:
            if value & EERD_START:
                word = (value >> 8) & 0xFF
                data = self.eeprom[word] if word < len(self.eeprom) else 0xFFFF
                self.regs[EERD] = (value & 0xFF00) | EERD_DONE | (data << 16)
        elif offset == MDIC:
            self._mdic(value)
        elif offset == ICS:
            self._cause(value)
        elif offset == IMS:
            self.ims |= value
            self._update_irq()
        elif offset == IMC:
            self.ims &= ~value
            self._update_irq()
        elif offset == ICR:
            self.icr &= ~value  # write 1 to clear, too
            self._update_irq()
        elif offset == TDT:
            self.regs[TDT] = value & 0xFFFF
            self.defer(self._transmit)
        elif offset == RDT:
            self.regs[RDT] = value & 0xFFFF
        elif offset in STATS:
            pass
        else:
            self.regs[offset] = value

    def _mdic(self, value: int) -> None:
        """One MII management frame (13.4.7), done at once: R set, E if no PHY answers."""
        op, phy, reg = (value >> 26) & 3, (value >> 21) & 0x1F, (value >> 16) & 0x1F
        done = (value & ~(MDIC_R | MDIC_E)) | MDIC_R
        if phy != PHY_ADDR or op not in (MDIC_OP_READ, MDIC_OP_WRITE):
            done |= MDIC_E
        elif op == MDIC_OP_READ:
            done = (done & ~0xFFFF) | self.phy.read(reg, self.carrier)
        else:
            was = self.status & STATUS_LU
            self.phy.write(reg, value & 0xFFFF)
            if (self.status & STATUS_LU) != was:
                self._cause(ICR_LSC)
        self.regs[MDIC] = done
        if value & MDIC_I:
            self._cause(ICR_MDAC)

    def io_read(self, offset: int, width: int) -> int:
        """IOADDR (0) and IODATA (4): indirect access to the registers (SDM 13.2.1)."""
        if offset == 0 and width == 4:
            return self.ioaddr
        if offset == 4 and width == 4:
            return self.mmio_read(self.ioaddr & 0x1FFFC, 4)
        return (1 << (8 * width)) - 1

    def io_write(self, offset: int, width: int, value: int) -> None:
        if offset == 0 and width == 4:
            self.ioaddr = value & 0x1FFFC
        elif offset == 4 and width == 4:
            self.mmio_write(self.ioaddr, 4, value)

    # -- interrupts (13.4.17-21) ---------------------------------------------------------

    def _cause(self, bits: int) -> None:
        self.icr |= bits
        self._update_irq()

    def _update_irq(self) -> None:
        self.set_intx(bool(self.icr & self.ims))

    # -- transmit (3.3, 14.5) --------------------------------------------------------------

    def _ring(self, base_lo: int, base_hi: int, length: int) -> tuple[int, int]:
        base = self.regs.get(base_lo, 0) | (self.regs.get(base_hi, 0) << 32)
        return base, self.regs.get(length, 0) // 16

    def _transmit(self) -> None:
        if not self.regs.get(TCTL, 0) & TCTL_EN:
            return
        base, n = self._ring(TDBAL, TDBAH, TDLEN)
        if n == 0:
            return
        frame = bytearray()
        while self.regs.get(TDH, 0) != self.regs.get(TDT, 0):
            head = self.regs.get(TDH, 0) % n
            desc = self.dma_read(base + 16 * head, 16)
            addr = int.from_bytes(desc[0:8], "little")
            length, cmd = int.from_bytes(desc[8:10], "little"), desc[11]
            if cmd & TXD_CMD_DEXT:
                self.fault("e1000: extended TX descriptors are not modelled; skipped")
            else:
                frame += self.dma_read(addr, length)
            if cmd & TXD_CMD_RS:
                self.dma_write(base + 16 * head + 12, bytes([TXD_STAT_DD]))
                self.icr |= ICR_TXDW
            self.regs[TDH] = (head + 1) % n
            if cmd & TXD_CMD_EOP:
                self._send(bytes(frame))
                frame.clear()
        self._cause(ICR_TXQE)

    def _send(self, frame: bytes) -> None:
        if self.regs.get(TCTL, 0) & TCTL_PSP and len(frame) < 60:
            frame += bytes(60 - len(frame))  # pad short packets
        self._count(GPTC, TPT)
        self._count64(GOTCL, len(frame) + 4)
        self.sent = [*self.sent[-63:], frame]
        if not (self.status & STATUS_LU):
            return  # no link: the frame goes nowhere
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(frame)
        elif self.link is not None:
            link = self.link

            def deliver() -> None:
                link(frame)

            self.defer(deliver)  # arrives a moment later, not inside this job

    def _count(self, *regs: int) -> None:
        for r in regs:
            self.regs[r] = (self.regs.get(r, 0) + 1) & 0xFFFF_FFFF

    def _count64(self, low: int, n: int) -> None:
        total = self.regs.get(low, 0) | (self.regs.get(low + 4, 0) << 32)
        total += n
        self.regs[low], self.regs[low + 4] = total & 0xFFFF_FFFF, total >> 32

    # -- receive (3.2, 14.4) -------------------------------------------------------------

    def _accepts(self, frame: bytes) -> bool:
        rctl = self.regs.get(RCTL, 0)
        dst = frame[:6]
        if dst == b"\xff" * 6:
            if rctl & RCTL_BAM:
                self._count(BPRC)
                return True
            return False
        if dst[0] & 1:  # multicast: MTA with MO = 00, bits 47:36 (13.4.43)
            h = ((dst[4] >> 4) | (dst[5] << 4)) & 0xFFF
            hit = self.regs.get(MTA + 4 * (h >> 5), 0) >> (h & 31) & 1
            if rctl & RCTL_MPE or hit:
                self._count(MPRC)
                return True
            return False
        for i in range(16):
            rah = self.regs.get(RAH0 + 8 * i, 0)
            if rah & RAH_AV:
                ral = self.regs.get(RAL0 + 8 * i, 0)
                if dst == ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little"):
                    return True
        return bool(rctl & RCTL_UPE)

    def _buffer_size(self) -> int:
        rctl = self.regs.get(RCTL, 0)
        bsize = (rctl >> 16) & 3
        if rctl & RCTL_BSEX:
            return {1: 16384, 2: 8192, 3: 4096}.get(bsize, 2048)
        return {0: 2048, 1: 1024, 2: 512, 3: 256}[bsize]

    def receive_frame(self, frame: bytes) -> bool:
        """A frame arrives from the wire (without FCS). Returns whether it was stored.

        Dropped (counted) when RX is off, the filter rejects it, or no descriptor is free.
        """
        with self.lock:
            rctl = self.regs.get(RCTL, 0)
            if self.removed or not rctl & RCTL_EN or not self.status & STATUS_LU:
                return False
            if len(frame) < 14 or not self._accepts(frame):
                return False
            base, n = self._ring(RDBAL, RDBAH, RDLEN)
            head, tail = self.regs.get(RDH, 0), self.regs.get(RDT, 0)
            if n == 0 or head == tail:
                self._count(MPC, RNBC)  # no free descriptor: missed
                self._cause(ICR_RXO)
                return False
            data = frame if rctl & RCTL_SECRC else frame + zlib.crc32(frame).to_bytes(4, "little")
            if len(data) > self._buffer_size():
                self._count(ROC)  # no long-packet support (LPE) modelled: oversize dropped
                return False
            desc = self.dma_read(base + 16 * head, 16)
            addr = int.from_bytes(desc[0:8], "little")
            self.dma_write(addr, data)
            length = len(data) + self.inject.rx_length_overrun
            self.inject.rx_length_overrun = 0
            wb = (
                length.to_bytes(2, "little")
                + bytes(2)
                + bytes([RXD_STAT_DD | RXD_STAT_EOP, 0])
                + bytes(2)
            )
            self.dma_write(base + 16 * head + 8, wb)
            self.regs[RDH] = (head + 1) % n
            self._count(GPRC, TPR)
            self._count64(GORCL, len(frame) + 4)
            free = (tail - self.regs[RDH]) % n
            cause = ICR_RXT0 | (ICR_RXDMT0 if free <= n // 2 else 0)  # RDMTS = 1/2
            self._cause(cause)
            return True

    # -- the wire ----------------------------------------------------------------------------

    def attach_socket(self, sock: socket.socket) -> None:
        """Send transmitted frames into ``sock`` (a SOCK_SEQPACKET/DGRAM socket: one frame
        per message) and receive what arrives on it, on a reader thread."""
        self._sock = sock

        def reader() -> None:
            while True:
                try:
                    frame = sock.recv(16384)
                except OSError:
                    return
                if not frame:
                    return
                self.receive_frame(frame)

        threading.Thread(target=reader, name="e1000 wire", daemon=True).start()

    def close(self) -> None:
        super().close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None


def connect(a: E1000Model, b: E1000Model) -> None:
    """A cable between two models: what one transmits, the other receives."""
    a.link, b.link = b.receive_frame, a.receive_frame


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a frame-preserving wire for :meth:`E1000Model.attach_socket`."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


__all__ = ["E1000Model", "connect", "socket_pair"]
