"""The drivers' register maps against their datasheets: offsets, fields, enums, and the flat
constants the drivers import (derived from the maps, so they must keep the datasheet values).
"""

from __future__ import annotations

import pytest

from udrv.core.region import RecordingRegion
from udrv.drivers.e1000 import regs as E
from udrv.drivers.edu import regs as D
from udrv.drivers.nvme import regs as N
from udrv.errors import RegionError


def test_edu_map_matches_edu_rst() -> None:
    # edu.rst "MMIO area spec": offsets and the 0xRRrr00ed identification.
    offsets = {n: r.offset for n, r in D.EduRegs.REGISTERS.items()}
    assert offsets == {
        "IDENT": 0x00, "LIVENESS": 0x04, "FACTORIAL": 0x08, "STATUS": 0x20,
        "INTR_STATUS": 0x24, "INTR_RAISE": 0x60, "INTR_ACK": 0x64, "DMA_SRC": 0x80,
        "DMA_DST": 0x88, "DMA_COUNT": 0x90, "DMA_CMD": 0x98,
    }  # fmt: skip
    assert D.EduRegs.IDENT.decode(0x010000ED) == {"MAGIC": 0xED, "MINOR": 0, "MAJOR": 1}
    assert D.EduRegs.IDENT.decode(0x020300ED) == {"MAGIC": 0xED, "MINOR": 3, "MAJOR": 2}
    assert (D.STATUS_COMPUTING, D.STATUS_IRQFACT) == (0x01, 0x80)
    assert (D.DMA_CMD_START, D.DMA_CMD_TO_RAM, D.DMA_CMD_IRQ) == (0x1, 0x2, 0x4)
    assert D.EduRegs.DMA_CMD.decode(0x3)["DIRECTION"] is D.DmaDirection.TO_RAM
    assert D.EduRegs.DMA_CMD.width == 8 and D.EduRegs.STATUS.width == 4


def test_nvme_map_matches_the_base_spec() -> None:
    # NVMe Base 2.0 figure 33 offsets; CC as the driver writes it (7.6.1): EN, NVM, 4 KiB,
    # round robin, 64-byte SQEs, 16-byte CQEs.
    assert (N.CAP, N.VS, N.INTMS, N.INTMC, N.CC, N.CSTS, N.AQA, N.ASQ, N.ACQ) == (
        0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x24, 0x28, 0x30,
    )  # fmt: skip
    cc = N.NvmeRegs.CC.encode(EN=1, CSS=N.CcCss.NVM, MPS=0, AMS=0, IOSQES=6, IOCQES=4)
    assert cc == 0x0046_0001
    assert cc == N.CC_EN | N.CC_CSS_NVM | N.CC_AMS_RR | N.CC_IOSQES | N.CC_IOCQES
    assert N.NvmeRegs.CC.encode(SHN=N.CcShn.NORMAL) == N.CC_SHN_NORMAL == 1 << 14
    assert N.CSTS_SHST_COMPLETE == 0b10 << 2 and N.CSTS_SHST_MASK == 0b11 << 2
    # A CAP like QEMU's: MQES 0x7ff, CQR, TO 0x0f, DSTRD 0, CSS NVM + I/O sets, MPSMAX 4.
    cap = N.NvmeRegs.CAP.decode(0x0040_0820_0F01_07FF)
    assert (cap["MQES"], cap["CQR"], cap["TO"], cap["DSTRD"]) == (0x7FF, 1, 0x0F, 0)
    assert cap["CSS"] == 0x41 and cap["MPSMIN"] == 0 and cap["MPSMAX"] == 4
    assert cap["CMBS"] == 0 and cap["PMRS"] == 0
    assert N.CAP_CSS_NVM == 1 << 37
    assert N.NvmeRegs.VS.decode(0x0001_0400) == {"TER": 0, "MNR": 4, "MJR": 1}
    assert N.NvmeRegs.CSTS.decode(0x9)["SHST"] is N.CstsShst.COMPLETE


@pytest.mark.parametrize(("dstrd", "sq1", "cq1"), [(0, 0x1008, 0x100C), (1, 0x1010, 0x1018)])
def test_nvme_doorbells_follow_cap_dstrd(dstrd: int, sq1: int, cq1: int) -> None:
    """PCIe transport 3.1.2: SQyTDBL at 1000h + 2y * (4 << DSTRD), CQyHDBL one stride on."""
    rec = RecordingRegion(0x2000, name="BAR0")
    rec.mem[0:8] = (dstrd << 32 | 0x3F).to_bytes(8, "little")
    regs = N.NvmeRegs.for_controller(rec)
    assert regs.SQyTDBL.offset(0) == 0x1000 and regs.SQyTDBL.offset(1) == sq1
    assert regs.CQyHDBL.offset(1) == cq1
    regs.CQyHDBL(1).write(3)
    assert rec.writes() == [(cq1, 4, 3)]
    with pytest.raises(RegionError, match=r"reading register SQyTDBL\(1\) .* write-only"):
        regs.SQyTDBL(1).read()


def test_e1000_map_matches_the_sdm() -> None:
    assert (E.CTRL, E.STATUS, E.EERD, E.ICR, E.IMS, E.IMC, E.RCTL, E.TCTL) == (
        0x0, 0x8, 0x14, 0xC0, 0xD0, 0xD8, 0x100, 0x400,
    )  # fmt: skip
    assert (E.RAL0, E.RAH0, E.E1000Regs.RAL.offset(15), E.E1000Regs.RAH.offset(1)) == (
        0x5400, 0x5404, 0x5478, 0x540C,
    )  # fmt: skip
    assert E.E1000Regs.MTA.offset(127) == 0x53FC
    assert (E.CTRL_SLU, E.CTRL_ASDE, E.CTRL_RST, E.RAH_AV) == (1 << 6, 1 << 5, 1 << 26, 1 << 31)
    assert E.TIPG_DEFAULT == 10 | 8 << 10 | 6 << 20
    # QEMU e1000 STATUS after link-up: FD, LU, 1000 Mb/s, ASDV 1000.
    status = E.E1000Regs.STATUS.decode(0x0000_0283)
    assert status["LU"] == 1 and status["FD"] == 1
    assert status["SPEED"] is E.Speed.MBPS_1000 and status["ASDV"] is E.Speed.MBPS_1000
    assert E.E1000Regs.RCTL.decode(E.RCTL_EN | E.RCTL_BAM | E.RCTL_SECRC)["BSIZE"] is (
        E.RctlBsize.B2048
    )
    # ICR: read-to-clear, and each cause bit is W1C; IMS is write-1-to-set.
    assert E.E1000Regs.ICR.access == "rc" and E.E1000Regs.ICR.w1c_mask & E.ICR_RXT0
    assert E.E1000Regs.IMS.access == "w1s"
    names = [r.name for r, _ in E.E1000Regs(RecordingRegion(0x20000)).dump()]
    assert "ICR" not in names and "GPRC" not in names and "CTRL" in names
