"""82540EM registers and descriptors, from Intel's PCI/PCI-X Family of Gigabit Ethernet
Controllers Software Developer's Manual (8254x SDM, rev 4.0), section 13 unless noted.
All registers are 32-bit, in BAR0 (table 13-2). Reset values are the SDM's "initial value"
where it gives one that does not depend on the EEPROM. The flat constants (``CTRL_SLU``,
``RCTL``...) are derived from :class:`E1000Regs`.
"""

from __future__ import annotations

import enum

import numpy as np

from udrv.core.regmap import Field, Register, RegisterArray, RegisterMap

VENDOR_ID = 0x8086
DEVICE_IDS = {0x100E: "82540EM", 0x100F: "82545EM", 0x1004: "82543GC", 0x10D3: "82574L"}


class Speed(enum.IntEnum):
    """CTRL.SPEED and STATUS.SPEED (13.4.1, 13.4.2)."""

    MBPS_10 = 0b00
    MBPS_100 = 0b01
    MBPS_1000 = 0b10
    MBPS_1000_ALT = 0b11  # "11b = 1000 Mb/s" too


class MdicOp(enum.IntEnum):
    """MDIC.OP (13.4.7)."""

    WRITE = 0b01
    READ = 0b10


class RctlBsize(enum.IntEnum):
    """RCTL.BSIZE with RCTL.BSEX = 0 (13.4.22); with BSEX = 1 the sizes are 16x."""

    B2048 = 0b00
    B1024 = 0b01
    B512 = 0b10
    B256 = 0b11


class RctlRdmts(enum.IntEnum):
    """RCTL.RDMTS, receive descriptor minimum threshold as a fraction of RDLEN."""

    HALF = 0b00
    QUARTER = 0b01
    EIGHTH = 0b10


#: Interrupt causes, the same bits in ICR, ICS, IMS and IMC (13.4.17-13.4.21).
_CAUSES = {
    "TXDW": Field(0, doc="transmit descriptor written back"),
    "TXQE": Field(1, doc="transmit queue empty"),
    "LSC": Field(2, doc="link status change"),
    "RXSEQ": Field(3, doc="receive sequence error"),
    "RXDMT0": Field(4, doc="receive descriptor minimum threshold reached"),
    "RXO": Field(6, doc="receiver overrun"),
    "RXT0": Field(7, doc="receiver timer interrupt"),
    "MDAC": Field(9, doc="MDI/O access complete"),
    "RXCFG": Field(10, doc="receiving /C/ ordered sets"),
    "PHYINT": Field(12, doc="PHY interrupt"),
    "GPI_SDP6": Field(13, doc="general purpose interrupt on SDP6"),
    "GPI_SDP7": Field(14, doc="general purpose interrupt on SDP7"),
    "TXD_LOW": Field(15, doc="transmit descriptor low threshold hit"),
    "SRPD": Field(16, doc="small receive packet detected"),
}
_ICR_FIELDS = {k: Field(f.shift, f.bits, access="w1c", doc=f.doc) for k, f in _CAUSES.items()}


def _stat(offset: int, doc: str) -> Register:
    """A statistics counter (13.4.48-13.4.100): read-only and cleared by reading."""
    return Register(offset, 4, access="rc", reset=0, doc=doc)


class E1000Regs(RegisterMap):
    """8254x SDM table 13-2, the registers udrv's driver and tools use."""

    SIZE = 0x20000  # 128 KiB memory BAR
    CTRL = Register(
        0x0000,
        4,
        doc="13.4.1 Device Control",
        fields={
            "FD": Field(0, doc="full duplex"),
            "LRST": Field(3, doc="link reset"),
            "ASDE": Field(5, doc="auto-speed detection enable"),
            "SLU": Field(6, doc="set link up"),
            "ILOS": Field(7, doc="invert loss-of-signal"),
            "SPEED": Field(8, 2, Speed, doc="speed selection (with FRCSPD)"),
            "FRCSPD": Field(11, doc="force speed"),
            "FRCDPLX": Field(12, doc="force duplex"),
            "SDP0_DATA": Field(18),
            "SDP1_DATA": Field(19),
            "ADVD3WUC": Field(20, doc="D3cold wakeup capability advertisement"),
            "EN_PHY_PWR_MGMT": Field(21),
            "SDP0_IODIR": Field(22),
            "SDP1_IODIR": Field(23),
            "RST": Field(26, doc="device reset (self-clearing)"),
            "RFCE": Field(27, doc="receive flow control enable"),
            "TFCE": Field(28, doc="transmit flow control enable"),
            "VME": Field(30, doc="VLAN mode enable"),
            "PHY_RST": Field(31, doc="PHY reset"),
        },
    )
    STATUS = Register(
        0x0008,
        4,
        access="ro",
        doc="13.4.2 Device Status",
        fields={
            "FD": Field(0, doc="full duplex"),
            "LU": Field(1, doc="link up"),
            "FUNCID": Field(2, 2, doc="function ID"),
            "TXOFF": Field(4, doc="transmission paused"),
            "TBIMODE": Field(5),
            "SPEED": Field(6, 2, Speed, doc="link speed"),
            "ASDV": Field(8, 2, Speed, doc="auto-speed detection value"),
            "PCI66": Field(11, doc="PCI bus speed 66 MHz"),
            "BUS64": Field(12, doc="PCI bus width 64 bits"),
            "PCIX_MODE": Field(13),
            "PCIXSPD": Field(14, 2),
        },
    )
    EECD = Register(
        0x0010,
        4,
        doc="13.4.3 EEPROM/Flash Control & Data",
        fields={
            "SK": Field(0, doc="clock input to the EEPROM"),
            "CS": Field(1, doc="chip select"),
            "DI": Field(2, doc="data input to the EEPROM"),
            "DO": Field(3, access="ro", doc="data output from the EEPROM"),
            "FWE": Field(4, 2, doc="flash write enable control"),
            "EE_REQ": Field(6, doc="request EEPROM access"),
            "EE_GNT": Field(7, access="ro", doc="grant EEPROM access"),
            "EE_PRES": Field(8, access="ro", doc="EEPROM present"),
            "EE_SIZE": Field(9, access="ro", doc="EEPROM size"),
        },
    )
    EERD = Register(
        0x0014,
        4,
        reset=0,
        doc="13.4.4 EEPROM Read (not 82544GC/EI)",
        fields={
            "START": Field(0, doc="start read"),
            "DONE": Field(4, access="ro", doc="read done"),
            "ADDR": Field(8, 8, doc="word address"),
            "DATA": Field(16, 16, access="ro", doc="data read"),
        },
    )
    CTRL_EXT = Register(
        0x0018,
        4,
        doc="13.4.6 Extended Device Control",
        fields={
            "ASDCHK": Field(12, doc="ASD check"),
            "EE_RST": Field(13, doc="EEPROM reset (reload)"),
            "SPD_BYPS": Field(15, doc="speed select bypass"),
            "RO_DIS": Field(17, doc="relaxed ordering disabled"),
            "VREG_POWER_DOWN": Field(21),
            "LINK_MODE": Field(22, 2, doc="00b: direct copper (GMII/MII)"),
        },
    )
    MDIC = Register(
        0x0020,
        4,
        doc="13.4.7 MDI Control",
        fields={
            "DATA": Field(0, 16),
            "REGADD": Field(16, 5, doc="PHY register address"),
            "PHYADD": Field(21, 5, doc="PHY address (1 for the internal PHY)"),
            "OP": Field(26, 2, MdicOp),
            "R": Field(28, doc="ready: set when the transaction is done"),
            "I": Field(29, doc="interrupt enable"),
            "E": Field(30, doc="error"),
        },
    )
    ICR = Register(
        0x00C0,
        4,
        access="rc",
        reset=0,
        doc="13.4.17 Interrupt Cause Read: read clears; writing 1 clears a bit too",
        fields=_ICR_FIELDS,
    )
    ITR = Register(
        0x00C4,
        4,
        reset=0,
        doc="13.4.18 Interrupt Throttling",
        fields={"INTERVAL": Field(0, 16, doc="minimum gap between interrupts, 256 ns units")},
    )
    ICS = Register(0x00C8, 4, access="wo", doc="13.4.19 Interrupt Cause Set", fields=_CAUSES)
    IMS = Register(
        0x00D0, 4, access="w1s", reset=0, doc="13.4.20 Interrupt Mask Set/Read", fields=_CAUSES
    )
    IMC = Register(0x00D8, 4, access="wo", doc="13.4.21 Interrupt Mask Clear", fields=_CAUSES)
    RCTL = Register(
        0x0100,
        4,
        reset=0,
        doc="13.4.22 Receive Control",
        fields={
            "EN": Field(1, doc="receiver enable"),
            "SBP": Field(2, doc="store bad packets"),
            "UPE": Field(3, doc="unicast promiscuous"),
            "MPE": Field(4, doc="multicast promiscuous"),
            "LPE": Field(5, doc="long packet enable"),
            "LBM": Field(6, 2, doc="loopback mode"),
            "RDMTS": Field(8, 2, RctlRdmts, doc="descriptor minimum threshold size"),
            "MO": Field(12, 2, doc="multicast offset: MTA bits 47:36 for 00b"),
            "BAM": Field(15, doc="broadcast accept mode"),
            "BSIZE": Field(16, 2, RctlBsize, doc="receive buffer size"),
            "VFE": Field(18, doc="VLAN filter enable"),
            "CFIEN": Field(19),
            "CFI": Field(20),
            "DPF": Field(22, doc="discard pause frames"),
            "PMCF": Field(23, doc="pass MAC control frames"),
            "BSEX": Field(25, doc="buffer size extension (x16)"),
            "SECRC": Field(26, doc="strip Ethernet CRC"),
        },
    )
    TCTL = Register(
        0x0400,
        4,
        doc="13.4.33 Transmit Control",
        fields={
            "EN": Field(1, doc="transmit enable"),
            "PSP": Field(3, doc="pad short packets"),
            "CT": Field(4, 8, doc="collision threshold: 0Fh recommended (14.5)"),
            "COLD": Field(12, 10, doc="collision distance: 40h for full duplex (14.5)"),
            "SWXOFF": Field(22, doc="software XOFF transmission"),
            "RTLC": Field(24, doc="re-transmit on late collision"),
            "NRTU": Field(25, doc="no re-transmit on underrun (82544GC/EI)"),
        },
    )
    TIPG = Register(
        0x0410,
        4,
        doc="13.4.34 Transmit IPG: 10, 8, 6 for 802.3 copper (14.5)",
        fields={"IPGT": Field(0, 10), "IPGR1": Field(10, 10), "IPGR2": Field(20, 10)},
    )
    RDBAL = Register(0x2800, 4, doc="13.4.27 Receive Descriptor Base Address Low")
    RDBAH = Register(0x2804, 4, doc="13.4.28 Receive Descriptor Base Address High")
    RDLEN = Register(0x2808, 4, reset=0, doc="13.4.29 Receive Descriptor Length (bytes, 128x)")
    RDH = Register(0x2810, 4, reset=0, doc="13.4.30 Receive Descriptor Head")
    RDT = Register(0x2818, 4, reset=0, doc="13.4.31 Receive Descriptor Tail")
    RDTR = Register(
        0x2820,
        4,
        reset=0,
        doc="13.4.32 Receive Delay Timer",
        fields={"DELAY": Field(0, 16, doc="1.024 us units"), "FPD": Field(31, doc="flush")},
    )
    TDBAL = Register(0x3800, 4, doc="13.4.38 Transmit Descriptor Base Address Low")
    TDBAH = Register(0x3804, 4, doc="13.4.39 Transmit Descriptor Base Address High")
    TDLEN = Register(0x3808, 4, reset=0, doc="13.4.40 Transmit Descriptor Length")
    TDH = Register(0x3810, 4, reset=0, doc="13.4.41 Transmit Descriptor Head")
    TDT = Register(0x3818, 4, reset=0, doc="13.4.42 Transmit Descriptor Tail")
    # 13.4.48-13.4.100 Statistics (read-only, cleared on read); 64-bit ones read low, high.
    CRCERRS = _stat(0x4000, "CRC Error Count")
    MPC = _stat(0x4010, "Missed Packets Count")
    COLC = _stat(0x4028, "Total Collisions Count")
    GPRC = _stat(0x4074, "Good Packets Received Count")
    BPRC = _stat(0x4078, "Broadcast Packets Received Count")
    MPRC = _stat(0x407C, "Multicast Packets Received Count")
    GPTC = _stat(0x4080, "Good Packets Transmitted Count")
    GORCL = _stat(0x4088, "Good Octets Received Count (low)")
    GORCH = _stat(0x408C, "Good Octets Received Count (high)")
    GOTCL = _stat(0x4090, "Good Octets Transmitted Count (low)")
    GOTCH = _stat(0x4094, "Good Octets Transmitted Count (high)")
    RNBC = _stat(0x40A0, "Receive No Buffers Count")
    RUC = _stat(0x40A4, "Receive Undersize Count")
    ROC = _stat(0x40AC, "Receive Oversize Count")
    TPR = _stat(0x40D0, "Total Packets Received")
    TPT = _stat(0x40D4, "Total Packets Transmitted")
    MTA = RegisterArray(0x5200, 4, 128, doc="13.4.43 Multicast Table Array: a 4096-bit hash filter")
    RAL = RegisterArray(0x5400, 8, 16, doc="13.4.45 Receive Address Low: MAC bytes 0-3")
    RAH = RegisterArray(
        0x5404,
        8,
        16,
        doc="13.4.45 Receive Address High",
        fields={
            "RAH": Field(0, 16, doc="MAC bytes 4-5"),
            "AS": Field(16, 2, doc="address select: 00b destination"),
            "AV": Field(31, doc="address valid"),
        },
    )
    RXCSUM = Register(
        0x5000,
        4,
        reset=0,
        doc="Receive Checksum Control, 05000h (table 13-2; 3.2.5 receive checksum offloading)",
        fields={
            "PCSS": Field(0, 8, doc="packet checksum start (the raw csum field)"),
            "IPOFLD": Field(8, doc="IP checksum offload enable"),
            "TUOFLD": Field(9, doc="TCP/UDP checksum offload enable"),
        },
    )
    MANC = Register(0x5820, 4, doc="Management Control (table 13-2)")


class E1000IoRegs(RegisterMap):
    """SDM 13.3, the I/O BAR (BAR1 on the 82540EM): a window onto the BAR0 registers. The
    offset of a register written to IOADDR selects it; IODATA then reads or writes it."""

    IOADDR = Register(0x00, 4, doc="13.3.1 IOADDR: offset of the register IODATA reaches")
    IODATA = Register(0x04, 4, doc="13.3.2 IODATA: the register IOADDR selects")
    #: (address register, data register, the map the window reaches), for tools that name
    #: the accesses (udrv.trace).
    WINDOW = ("IOADDR", "IODATA", E1000Regs)


_CTRL, _RCTL, _TCTL = E1000Regs.CTRL.fields, E1000Regs.RCTL.fields, E1000Regs.TCTL.fields

CTRL = E1000Regs.CTRL.offset  # 13.4.1 Device Control
CTRL_FD = _CTRL["FD"].mask
CTRL_ASDE = _CTRL["ASDE"].mask
CTRL_SLU = _CTRL["SLU"].mask
CTRL_RST = _CTRL["RST"].mask  # device reset (self-clearing)
CTRL_PHY_RST = _CTRL["PHY_RST"].mask
STATUS = E1000Regs.STATUS.offset  # 13.4.2 Device Status
STATUS_LU = E1000Regs.STATUS.fields["LU"].mask
EERD = E1000Regs.EERD.offset  # 13.4.4 EEPROM Read
EERD_START = E1000Regs.EERD.fields["START"].mask
EERD_DONE = E1000Regs.EERD.fields["DONE"].mask
EERD_ADDR_SHIFT = E1000Regs.EERD.fields["ADDR"].shift
EERD_DATA_SHIFT = E1000Regs.EERD.fields["DATA"].shift
ICR = E1000Regs.ICR.offset  # 13.4.17 Interrupt Cause Read (clears on read)
ITR = E1000Regs.ITR.offset  # 13.4.18 Interrupt Throttling: minimum gap in 256 ns units
ICS = E1000Regs.ICS.offset  # 13.4.19 Interrupt Cause Set
IMS = E1000Regs.IMS.offset  # 13.4.20 Interrupt Mask Set/Read
IMC = E1000Regs.IMC.offset  # 13.4.21 Interrupt Mask Clear
ICR_TXDW = _CAUSES["TXDW"].mask
ICR_TXQE = _CAUSES["TXQE"].mask
ICR_LSC = _CAUSES["LSC"].mask
ICR_RXDMT0 = _CAUSES["RXDMT0"].mask
ICR_RXO = _CAUSES["RXO"].mask
ICR_RXT0 = _CAUSES["RXT0"].mask
RCTL = E1000Regs.RCTL.offset  # 13.4.22 Receive Control
RCTL_EN = _RCTL["EN"].mask
RCTL_SBP = _RCTL["SBP"].mask
RCTL_UPE = _RCTL["UPE"].mask
RCTL_MPE = _RCTL["MPE"].mask
RCTL_LPE = _RCTL["LPE"].mask
RCTL_BAM = _RCTL["BAM"].mask
RCTL_BSIZE_2048 = _RCTL["BSIZE"].value(RctlBsize.B2048)  # with BSEX = 0
RCTL_SECRC = _RCTL["SECRC"].mask
TCTL = E1000Regs.TCTL.offset  # 13.4.33 Transmit Control
TCTL_EN = _TCTL["EN"].mask
TCTL_PSP = _TCTL["PSP"].mask
TCTL_CT_SHIFT = _TCTL["CT"].shift  # collision threshold: 0x0F recommended (14.5)
TCTL_COLD_SHIFT = _TCTL["COLD"].shift  # collision distance: 0x40 for full duplex (14.5)
TIPG = E1000Regs.TIPG.offset  # 13.4.34 Transmit IPG: 10, 8, 6 for 802.3 copper (14.5)
TIPG_DEFAULT = E1000Regs.TIPG.encode(IPGT=10, IPGR1=8, IPGR2=6)
RDBAL, RDBAH, RDLEN = E1000Regs.RDBAL.offset, E1000Regs.RDBAH.offset, E1000Regs.RDLEN.offset
RDH, RDT, RDTR = E1000Regs.RDH.offset, E1000Regs.RDT.offset, E1000Regs.RDTR.offset
TDBAL, TDBAH, TDLEN = E1000Regs.TDBAL.offset, E1000Regs.TDBAH.offset, E1000Regs.TDLEN.offset
TDH, TDT = E1000Regs.TDH.offset, E1000Regs.TDT.offset
MTA = E1000Regs.MTA.base  # 13.4.43 Multicast Table Array, 128 registers
MTA_COUNT = 128
assert E1000Regs.MTA.count == MTA_COUNT
RAL0, RAH0 = E1000Regs.RAL.offset(0), E1000Regs.RAH.offset(0)  # 13.4.45 Receive Address
RAH_AV = E1000Regs.RAH(0).fields["AV"].mask  # address valid

_R = E1000Regs
STATS = {
    "crc_errors": _R.CRCERRS.offset, "missed_packets": _R.MPC.offset,
    "rx_no_buffers": _R.RNBC.offset, "rx_undersize": _R.RUC.offset, "rx_oversize": _R.ROC.offset,
    "rx_packets": _R.TPR.offset, "tx_packets": _R.TPT.offset, "rx_good_packets": _R.GPRC.offset,
    "tx_good_packets": _R.GPTC.offset, "rx_broadcast": _R.BPRC.offset,
    "rx_multicast": _R.MPRC.offset,
}  # fmt: skip
STATS64 = {"rx_good_octets": _R.GORCL.offset, "tx_good_octets": _R.GOTCL.offset}

# 3.2.3 Receive descriptor (legacy) and 3.3.3 transmit descriptor (legacy), 16 bytes each.
RX_DESC = np.dtype([("addr", "<u8"), ("length", "<u2"), ("csum", "<u2"), ("status", "u1"),
                    ("errors", "u1"), ("special", "<u2")])  # fmt: skip
TX_DESC = np.dtype([("addr", "<u8"), ("length", "<u2"), ("cso", "u1"), ("cmd", "u1"),
                    ("status", "u1"), ("css", "u1"), ("special", "<u2")])  # fmt: skip
assert RX_DESC.itemsize == 16 and TX_DESC.itemsize == 16
RXD_STAT_DD = 1 << 0  # descriptor done
RXD_STAT_EOP = 1 << 1  # end of packet
RXD_STAT_IXSM = 1 << 2  # ignore the checksum indications (3.2.3.1): nothing was checked
RXD_STAT_TCPCS = 1 << 5  # the TCP/UDP checksum was calculated (TCPE says if it was bad)
RXD_STAT_IPCS = 1 << 6  # the IPv4 header checksum was calculated (IPE says if it was bad)
RXD_ERR_MASK = 0xFF  # CE, SE, SEQ, CXE, RXE...: any error bit drops the frame
RXD_ERR_TCPE = 1 << 5  # TCP/UDP checksum error (3.2.3.2)
RXD_ERR_IPE = 1 << 6  # IPv4 header checksum error
RXCSUM = E1000Regs.RXCSUM.offset
RXCSUM_IPOFLD = E1000Regs.RXCSUM.fields["IPOFLD"].mask
RXCSUM_TUOFLD = E1000Regs.RXCSUM.fields["TUOFLD"].mask
TXD_CMD_EOP = 1 << 0
TXD_CMD_IFCS = 1 << 1  # insert FCS
TXD_CMD_RS = 1 << 3  # report status (sets DD when done)
TXD_STAT_DD = 1 << 0

# 3.3.5-3.3.7: the extended descriptors (DEXT = 1). A TCP/IP context descriptor (DTYP 0000b)
# tells the NIC where the IP and TCP/UDP headers and checksums are and, for TCP
# segmentation (3.5), the payload length, header length and MSS; the data descriptors
# (DTYP 0001b) that follow carry the frame and say which checksums to insert (POPTS).
# Both have the status byte (DD) at byte 12, as the legacy descriptor does.
TX_CTX_DESC = np.dtype([("ipcss", "u1"), ("ipcso", "u1"), ("ipcse", "<u2"), ("tucss", "u1"),
                        ("tucso", "u1"), ("tucse", "<u2"), ("paylen_dtyp_tucmd", "<u4"),
                        ("sta", "u1"), ("hdrlen", "u1"), ("mss", "<u2")])  # fmt: skip
assert TX_CTX_DESC.itemsize == 16
TXD_DTYP_C, TXD_DTYP_D = 0b0000, 0b0001  # descriptor type, bits 23:20 of the second dword
TXD_PAYLEN_MASK = 0xFFFFF  # PAYLEN / DTALEN: 20 bits
# TUCMD (context) and DCMD (data): bits 31:24 of the second dword. EOP, IFCS, RS as above.
TXD_CMD_TCP = 1 << 0  # TUCMD: the packet is TCP (not UDP)
TXD_CMD_IP = 1 << 1  # TUCMD: the packet is IPv4 (not IPv6)
TXD_CMD_TSE = 1 << 2  # TUCMD and DCMD: TCP segmentation enable
TXD_CMD_DEXT = 1 << 5  # extended descriptor (context or data), not legacy
TXD_POPTS_IXSM = 1 << 0  # data descriptor POPTS: insert the IP header checksum
TXD_POPTS_TXSM = 1 << 1  # insert the TCP/UDP checksum


def tx_context_desc(
    *, ipcss: int, ipcso: int, ipcse: int, tucss: int, tucso: int, tucse: int, paylen: int,
    tucmd: int, hdrlen: int, mss: int,
) -> tuple[int, int]:  # fmt: skip
    """A TCP/IP context descriptor (3.3.6) as its two little-endian quadwords (the layout of
    :data:`TX_CTX_DESC`).

    IPCSS/IPCSO/IPCSE: start, checksum field and (inclusive) end of the IP header checksum;
    TUCSS/TUCSO/TUCSE: the same for TCP/UDP (TUCSE 0: to the end of the packet); PAYLEN:
    the TCP payload of the whole super-frame (segmentation only); TUCMD: TCP, IP, TSE, RS
    (DEXT is added); HDRLEN and MSS: header bytes repeated in every segment and the payload
    bytes per segment.
    """
    lo = ipcss | ipcso << 8 | ipcse << 16 | tucss << 32 | tucso << 40 | tucse << 48
    hi = (
        (paylen & TXD_PAYLEN_MASK)
        | TXD_DTYP_C << 20
        | (tucmd | TXD_CMD_DEXT) << 24
        | hdrlen << 40  # STA (byte 12) stays 0: DD clear
        | mss << 48
    )
    return lo, hi


def tx_data_desc_hi(length: int, dcmd: int, popts: int) -> int:
    """The second quadword of a TCP/IP data descriptor (3.3.7): DTALEN 19:0, DTYP 23:20 =
    0001b, DCMD 31:24 (DEXT added), STA 35:32 = 0 (DD clear), POPTS 47:40, special 63:48."""
    return (length & TXD_PAYLEN_MASK) | TXD_DTYP_D << 20 | (dcmd | TXD_CMD_DEXT) << 24 | popts << 40


def tx_legacy_desc_hi(length: int, cmd: int) -> int:
    """The second quadword of a legacy transmit descriptor (3.3.3): length 15:0, CSO 23:16 =
    0, CMD 31:24, STA 35:32 = 0, CSS 47:40 = 0, special 63:48 = 0."""
    return (length & 0xFFFF) | cmd << 24
