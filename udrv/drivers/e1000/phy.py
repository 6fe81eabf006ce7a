"""The 8254x's internal copper PHY, reached through the MAC's MDIC register.

MDIC (8254x SDM 13.4.7) runs one MII management frame (IEEE 802.3 clause 22.2.4.5) per
write: DATA in bits 15:0, REGADD 20:16, PHYADD 25:21 (the internal PHY answers at address
1), OP 27:26 (01 write, 10 read); the MAC sets R (ready) when the frame is done and E when
the PHY did not answer. The PHY registers used here are the IEEE 802.3 clause 22 ones.

Why the driver touches the PHY at all: when Linux's e1000 driver lets an 82540/82545/82546
go it powers the PHY down (``e1000_power_down_phy``: PHY_CTRL.MII_CR_POWER_DOWN), and a MAC
reset (CTRL.RST) does not power it up again, so a driver that skips this may never see a
link after ``udrv bind``.
"""

from __future__ import annotations

import time

from udrv.core.region import Region
from udrv.drivers.e1000.regs import E1000Regs, MdicOp
from udrv.errors import DriverError

_MDIC = E1000Regs.MDIC  # 8254x SDM 13.4.7 MDI Control
MDIC = _MDIC.offset
MDIC_R = _MDIC.fields["R"].mask  # ready: the frame is done
MDIC_E = _MDIC.fields["E"].mask  # error: no answer from the PHY
PHY_ADDR = 1  # SDM 13.4.7: the internal PHY's address

# IEEE 802.3 22.2.4.1 Control register (register 0; the SDM's PCTRL)
PHY_CTRL = 0
PHY_CTRL_RESTART_AN = 1 << 9  # restart auto-negotiation (self-clearing)
PHY_CTRL_POWER_DOWN = 1 << 11
PHY_CTRL_AN_ENABLE = 1 << 12
# IEEE 802.3 22.2.4.2 Status register (register 1; PSTATUS)
PHY_STATUS = 1
PHY_STATUS_AN_COMPLETE = 1 << 5
# IEEE 802.3 28.2.4.1.3 Auto-Negotiation advertisement (register 4; PANA) and the link
# partner's (register 5; PLPA): PAUSE is bit 10, ASM_DIR bit 11 (Annex 28B.2).
PHY_AUTONEG_ADV = 4
PHY_LP_ABILITY = 5
ANAR_PAUSE = 1 << 10
ANAR_ASM_DIR = 1 << 11

MDIC_TIMEOUT = 0.01  # s; one frame takes 64 MDC cycles at 2.5 MHz (~26 us); Linux waits 64 ms


class PhyError(DriverError):
    """The PHY did not answer through MDIC."""


class Phy:
    """Clause-22 registers of the internal PHY of one 8254x.

    Args:
        bar: the NIC's BAR0.
        name: the NIC, for messages.
    """

    def __init__(self, bar: Region, name: str) -> None:
        self.bar, self.name = bar, name

    def _frame(self, op: int, reg: int, data: int = 0) -> int:
        self.bar.write32(MDIC, _MDIC.encode(OP=op, PHYADD=PHY_ADDR, REGADD=reg, DATA=data))
        deadline = time.monotonic() + MDIC_TIMEOUT
        while True:
            v = self.bar.read32(MDIC)
            if v & MDIC_R:
                break
            if time.monotonic() > deadline:
                raise PhyError(
                    f"{self.name}: MDIC did not become ready (R, bit 28) within "
                    f"{MDIC_TIMEOUT * 1e3:.0f} ms for PHY register {reg} (MDIC={v:#010x})"
                )
            time.sleep(0.0001)
        if v & MDIC_E:
            raise PhyError(
                f"{self.name}: the PHY at address {PHY_ADDR} did not answer for register {reg} "
                f"(MDIC.E set, MDIC={v:#010x}); is this a copper part with the internal PHY?"
            )
        return _MDIC.fields["DATA"].get(v)

    def read(self, reg: int) -> int:
        """One 16-bit PHY register.

        Raises:
            PhyError: no answer within the deadline, or MDIC.E.
        """
        return self._frame(MdicOp.READ, reg)

    def write(self, reg: int, value: int) -> None:
        """Write one 16-bit PHY register.

        Raises:
            PhyError: no answer within the deadline, or MDIC.E.
        """
        self._frame(MdicOp.WRITE, reg, value & 0xFFFF)

    def power_up_and_autonegotiate(self) -> bool:
        """Clear PHY_CTRL's power-down bit, advertise symmetric PAUSE, and restart
        auto-negotiation. Returns whether the PHY had been powered down."""
        adv = self.read(PHY_AUTONEG_ADV)
        self.write(PHY_AUTONEG_ADV, adv | ANAR_PAUSE)
        ctrl = self.read(PHY_CTRL)
        self.write(
            PHY_CTRL,
            (ctrl & ~PHY_CTRL_POWER_DOWN) | PHY_CTRL_AN_ENABLE | PHY_CTRL_RESTART_AN,
        )
        return bool(ctrl & PHY_CTRL_POWER_DOWN)

    def pause_resolved(self) -> bool:
        """Whether both ends advertise symmetric PAUSE (IEEE 802.3 Annex 28B.3): then both
        may send and honour PAUSE frames."""
        return bool(self.read(PHY_AUTONEG_ADV) & self.read(PHY_LP_ABILITY) & ANAR_PAUSE)
