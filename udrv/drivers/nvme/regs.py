"""NVMe controller registers.

Registers: NVMe Base Specification 2.0 section 3.1.3 ("Controller Properties", offsets in
BAR0 for PCIe), and the NVMe over PCIe Transport Specification 1.0 section 3.1.2 for the
doorbells.
Commands, queue entries and status codes live in :mod:`udrv.drivers.nvme.command`.
The flat constants (``CC``, ``CSTS_RDY``...) are derived from :class:`NvmeRegs`, so drivers that
import them and the map agree by construction.
"""

from __future__ import annotations

import enum

from udrv.core.region import Region
from udrv.core.regmap import Field, Register, RegisterArray, RegisterMap


class CcCss(enum.IntEnum):
    """CC.CSS, I/O Command Set Selected (3.1.3.5)."""

    NVM = 0b000
    ALL_IO = 0b110  # all supported I/O command sets (CAP.CSS.IOCSS)
    ADMIN_ONLY = 0b111


class CcAms(enum.IntEnum):
    """CC.AMS, Arbitration Mechanism Selected (3.1.3.5)."""

    ROUND_ROBIN = 0b000
    WRR_URGENT = 0b001  # weighted round robin with urgent priority class
    VENDOR = 0b111


class CcShn(enum.IntEnum):
    """CC.SHN, Shutdown Notification (3.1.3.5)."""

    NONE = 0b00
    NORMAL = 0b01
    ABRUPT = 0b10


class CstsShst(enum.IntEnum):
    """CSTS.SHST, Shutdown Status (3.1.3.6)."""

    NORMAL = 0b00  # normal operation, no shutdown requested
    OCCURRING = 0b01
    COMPLETE = 0b10


_INT_VECTORS = "one bit per interrupt vector (pin-based and single MSI only; MSI-X: undefined)"


class NvmeRegs(RegisterMap):
    """The controller registers (NVMe Base 2.0, 3.1.3, figure 33) and the doorbells.

    Bind with :meth:`for_controller` so that the doorbells follow the controller's stride
    (CAP.DSTRD); binding the class directly assumes DSTRD = 0 (4-byte stride).
    """

    CAP = Register(
        0x00,
        8,
        access="ro",
        doc="3.1.3.1 Controller Capabilities",
        fields={
            "MQES": Field(0, 16, doc="maximum queue entries supported, 0's based"),
            "CQR": Field(16, doc="contiguous queues required"),
            "AMS": Field(17, 2, doc="arbitration mechanisms: bit 17 WRR+urgent, 18 vendor"),
            "TO": Field(24, 8, doc="timeout: worst-case time to CSTS.RDY change, 500 ms units"),
            "DSTRD": Field(32, 4, doc="doorbell stride: 2 ** (2 + DSTRD) bytes"),
            "NSSRS": Field(36, doc="NVM subsystem reset supported (NSSR)"),
            "CSS": Field(37, 8, doc="command sets: bit 37 NVM, 43 I/O sets, 44 admin only"),
            "BPS": Field(45, doc="boot partition support"),
            "CPS": Field(46, 2, doc="controller power scope"),
            "MPSMIN": Field(48, 4, doc="memory page size minimum: 2 ** (12 + MPSMIN)"),
            "MPSMAX": Field(52, 4, doc="memory page size maximum: 2 ** (12 + MPSMAX)"),
            "PMRS": Field(56, doc="persistent memory region supported"),
            "CMBS": Field(57, doc="controller memory buffer supported"),
            "NSSS": Field(58, doc="NVM subsystem shutdown supported"),
            "CRMS": Field(59, 2, doc="controller ready modes: bit 59 with media, 60 independent"),
        },
    )
    VS = Register(
        0x08,
        4,
        access="ro",
        doc="3.1.3.2 Version",
        fields={"TER": Field(0, 8), "MNR": Field(8, 8), "MJR": Field(16, 16)},
    )
    INTMS = Register(
        0x0C, 4, access="w1s", reset=0, doc=f"3.1.3.3 Interrupt Mask Set: {_INT_VECTORS}"
    )
    INTMC = Register(
        0x10, 4, access="w1c", reset=0, doc=f"3.1.3.4 Interrupt Mask Clear: {_INT_VECTORS}"
    )
    CC = Register(
        0x14,
        4,
        reset=0,
        doc="3.1.3.5 Controller Configuration",
        fields={
            "EN": Field(0, doc="enable: 1 processes commands; 1 -> 0 resets the controller"),
            "CSS": Field(4, 3, CcCss, doc="I/O command set selected"),
            "MPS": Field(7, 4, doc="memory page size: 2 ** (12 + MPS)"),
            "AMS": Field(11, 3, CcAms, doc="arbitration mechanism selected"),
            "SHN": Field(14, 2, CcShn, doc="shutdown notification"),
            "IOSQES": Field(16, 4, doc="I/O submission queue entry size: 2 ** n bytes (6: 64)"),
            "IOCQES": Field(20, 4, doc="I/O completion queue entry size: 2 ** n bytes (4: 16)"),
            "CRIME": Field(24, doc="controller ready independent of media enable"),
        },
    )
    CSTS = Register(
        0x1C,
        4,
        access="ro",
        reset=0,
        doc="3.1.3.6 Controller Status",
        fields={
            "RDY": Field(0, doc="ready: set after CC.EN = 1, clear after CC.EN = 0"),
            "CFS": Field(1, doc="controller fatal status"),
            "SHST": Field(2, 2, CstsShst, doc="shutdown status"),
            "NSSRO": Field(4, access="w1c", doc="NVM subsystem reset occurred (RW1C)"),
            "PP": Field(5, doc="processing paused"),
            "ST": Field(6, doc="shutdown type: 1 = subsystem shutdown"),
        },
    )
    NSSR = Register(
        0x20, 4, access="wo", doc='3.1.3.7 NVM Subsystem Reset: write "NVMe" (4E564D65h)'
    )
    AQA = Register(
        0x24,
        4,
        reset=0,
        doc="3.1.3.8 Admin Queue Attributes",
        fields={
            "ASQS": Field(0, 12, doc="admin submission queue size, 0's based"),
            "ACQS": Field(16, 12, doc="admin completion queue size, 0's based"),
        },
    )
    ASQ = Register(
        0x28,
        8,
        reset=0,
        doc="3.1.3.9 Admin Submission Queue Base Address (4 KiB aligned)",
        fields={"ASQB": Field(12, 52)},
    )
    ACQ = Register(
        0x30,
        8,
        reset=0,
        doc="3.1.3.10 Admin Completion Queue Base Address (4 KiB aligned)",
        fields={"ACQB": Field(12, 52)},
    )
    CMBLOC = Register(0x38, 4, access="ro", doc="3.1.3.11 Controller Memory Buffer Location")
    CMBSZ = Register(0x3C, 4, access="ro", doc="3.1.3.12 Controller Memory Buffer Size")
    # NVMe over PCIe Transport 1.0, 3.1.2: SQ y tail at 1000h + (2y) * (4 << CAP.DSTRD), CQ y
    # head at 1000h + (2y + 1) * (4 << CAP.DSTRD); declared here for DSTRD = 0.
    SQyTDBL = RegisterArray(
        0x1000, 8, 65536, access="wo", doc="Submission Queue y Tail Doorbell",
        fields={"SQT": Field(0, 16, doc="new submission queue tail")},
    )  # fmt: skip
    CQyHDBL = RegisterArray(
        0x1004, 8, 65536, access="wo", doc="Completion Queue y Head Doorbell",
        fields={"CQH": Field(0, 16, doc="new completion queue head")},
    )  # fmt: skip

    @staticmethod
    def doorbell_layout(dstrd: int) -> dict[str, tuple[int, int]]:
        """``(base, stride)`` of SQyTDBL and CQyHDBL for a controller's CAP.DSTRD."""
        step = 4 << dstrd
        return {"SQyTDBL": (DOORBELLS, 2 * step), "CQyHDBL": (DOORBELLS + step, 2 * step)}

    @classmethod
    def for_controller(cls, region: Region) -> NvmeRegs:
        """Bind to BAR0, reading CAP once for the doorbell stride."""
        cap = region.read64(cls.CAP.offset)
        return cls(region, arrays=cls.doorbell_layout(cls.CAP.fields["DSTRD"].get(cap)))


_CAP, _CC, _CSTS = NvmeRegs.CAP.fields, NvmeRegs.CC.fields, NvmeRegs.CSTS.fields

# Flat constants for hot paths and existing callers, all derived from the map.
CAP = NvmeRegs.CAP.offset  # 64-bit
CAP_MQES_MASK = _CAP["MQES"].mask  # maximum queue entries, 0's based
CAP_CQR = _CAP["CQR"].mask  # contiguous queues required
CAP_TO_SHIFT, CAP_TO_MASK = _CAP["TO"].shift, _CAP["TO"].max  # ready time, 500 ms units
CAP_DSTRD_SHIFT, CAP_DSTRD_MASK = _CAP["DSTRD"].shift, _CAP["DSTRD"].max  # 4 << DSTRD bytes
CAP_CSS_NVM = 1 << _CAP["CSS"].shift  # CAP.CSS bit 0 (bit 37): NVM command set supported
CAP_MPSMIN_SHIFT, CAP_MPSMAX_SHIFT = _CAP["MPSMIN"].shift, _CAP["MPSMAX"].shift
VS = NvmeRegs.VS.offset
INTMS, INTMC = NvmeRegs.INTMS.offset, NvmeRegs.INTMC.offset
CC = NvmeRegs.CC.offset
CC_EN = _CC["EN"].mask
CC_CSS_NVM = _CC["CSS"].value(CcCss.NVM)
CC_MPS_SHIFT = _CC["MPS"].shift
CC_AMS_RR = _CC["AMS"].value(CcAms.ROUND_ROBIN)
CC_SHN_NORMAL = _CC["SHN"].value(CcShn.NORMAL)
CC_SHN_MASK = _CC["SHN"].mask
CC_IOSQES = _CC["IOSQES"].value(6)  # 2 ** 6 = 64-byte submission entries
CC_IOCQES = _CC["IOCQES"].value(4)  # 2 ** 4 = 16-byte completion entries
CSTS = NvmeRegs.CSTS.offset
CSTS_RDY = _CSTS["RDY"].mask
CSTS_CFS = _CSTS["CFS"].mask  # controller fatal status
CSTS_SHST_MASK = _CSTS["SHST"].mask
CSTS_SHST_COMPLETE = _CSTS["SHST"].value(CstsShst.COMPLETE)
AQA = NvmeRegs.AQA.offset  # ACQS << 16 | ASQS, 0's based
ASQ = NvmeRegs.ASQ.offset  # 64-bit admin submission queue base
ACQ = NvmeRegs.ACQ.offset  # 64-bit admin completion queue base
DOORBELLS = (
    NvmeRegs.SQyTDBL.base
)  # SQ y tail at 0x1000 + 2y * stride, CQ y head at + (2y + 1) * stride
