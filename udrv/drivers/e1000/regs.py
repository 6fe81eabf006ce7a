"""82540EM registers and descriptors, from Intel's PCI/PCI-X Family of Gigabit Ethernet
Controllers Software Developer's Manual (8254x SDM, rev 4.0), section 13 unless noted.
All registers are 32-bit, in BAR0."""

from __future__ import annotations

import numpy as np

VENDOR_ID = 0x8086
DEVICE_IDS = {0x100E: "82540EM", 0x100F: "82545EM", 0x1004: "82543GC", 0x10D3: "82574L"}

CTRL = 0x0000  # 13.4.1 Device Control
CTRL_FD = 1 << 0  # full duplex
CTRL_ASDE = 1 << 5  # auto-speed detection
CTRL_SLU = 1 << 6  # set link up
CTRL_RST = 1 << 26  # device reset (self-clearing)
CTRL_PHY_RST = 1 << 31
STATUS = 0x0008  # 13.4.2 Device Status
STATUS_LU = 1 << 1  # link up
EERD = 0x0014  # 13.4.4 EEPROM Read
EERD_START = 1 << 0
EERD_DONE = 1 << 4
EERD_ADDR_SHIFT = 8
EERD_DATA_SHIFT = 16
ICR = 0x00C0  # 13.4.17 Interrupt Cause Read (clears on read)
ITR = 0x00C4  # 13.4.18 Interrupt Throttling: minimum gap in 256 ns units
ICS = 0x00C8  # 13.4.19 Interrupt Cause Set
IMS = 0x00D0  # 13.4.20 Interrupt Mask Set/Read
IMC = 0x00D8  # 13.4.21 Interrupt Mask Clear
ICR_TXDW = 1 << 0  # transmit descriptor written back
ICR_TXQE = 1 << 1  # transmit queue empty
ICR_LSC = 1 << 2  # link status change
ICR_RXDMT0 = 1 << 4  # receive descriptor minimum threshold
ICR_RXO = 1 << 6  # receiver overrun
ICR_RXT0 = 1 << 7  # receiver timer
RCTL = 0x0100  # 13.4.22 Receive Control
RCTL_EN = 1 << 1
RCTL_SBP = 1 << 2  # store bad packets
RCTL_UPE = 1 << 3  # unicast promiscuous
RCTL_MPE = 1 << 4  # multicast promiscuous
RCTL_LPE = 1 << 5  # long packets
RCTL_BAM = 1 << 15  # accept broadcast
RCTL_BSIZE_2048 = 0 << 16  # with BSEX = 0
RCTL_SECRC = 1 << 26  # strip the Ethernet CRC
TCTL = 0x0400  # 13.4.33 Transmit Control
TCTL_EN = 1 << 1
TCTL_PSP = 1 << 3  # pad short packets
TCTL_CT_SHIFT = 4  # collision threshold: 0x0F recommended (14.5)
TCTL_COLD_SHIFT = 12  # collision distance: 0x40 for full duplex (14.5)
TIPG = 0x0410  # 13.4.34 Transmit IPG: 10, 8, 6 for 802.3 copper (14.5)
TIPG_DEFAULT = 10 | (8 << 10) | (6 << 20)
RDBAL, RDBAH, RDLEN, RDH, RDT = 0x2800, 0x2804, 0x2808, 0x2810, 0x2818  # 13.4.27-31
RDTR = 0x2820  # 13.4.32 receive delay timer
TDBAL, TDBAH, TDLEN, TDH, TDT = 0x3800, 0x3804, 0x3808, 0x3810, 0x3818  # 13.4.38-42
MTA = 0x5200  # 13.4.43 Multicast Table Array, 128 registers
MTA_COUNT = 128
RAL0, RAH0 = 0x5400, 0x5404  # 13.4.45 Receive Address
RAH_AV = 1 << 31  # address valid

# 13.4.48-13.4.100 Statistics (clear on read); the 64-bit octet counters read low then high.
STATS = {
    "crc_errors": 0x4000, "missed_packets": 0x4010, "rx_no_buffers": 0x40A0,
    "rx_undersize": 0x40A4, "rx_oversize": 0x40AC, "rx_packets": 0x40D0, "tx_packets": 0x40D4,
    "rx_good_packets": 0x4074, "tx_good_packets": 0x4080, "rx_broadcast": 0x4078,
    "rx_multicast": 0x407C,
}  # fmt: skip
STATS64 = {"rx_good_octets": 0x4088, "tx_good_octets": 0x4090}

# 3.2.3 Receive descriptor (legacy) and 3.3.3 transmit descriptor (legacy), 16 bytes each.
RX_DESC = np.dtype([("addr", "<u8"), ("length", "<u2"), ("csum", "<u2"), ("status", "u1"),
                    ("errors", "u1"), ("special", "<u2")])  # fmt: skip
TX_DESC = np.dtype([("addr", "<u8"), ("length", "<u2"), ("cso", "u1"), ("cmd", "u1"),
                    ("status", "u1"), ("css", "u1"), ("special", "<u2")])  # fmt: skip
assert RX_DESC.itemsize == 16 and TX_DESC.itemsize == 16
RXD_STAT_DD = 1 << 0  # descriptor done
RXD_STAT_EOP = 1 << 1  # end of packet
RXD_ERR_MASK = 0xFF  # CE, SE, SEQ, CXE, RXE...: any error bit drops the frame
TXD_CMD_EOP = 1 << 0
TXD_CMD_IFCS = 1 << 1  # insert FCS
TXD_CMD_RS = 1 << 3  # report status (sets DD when done)
TXD_STAT_DD = 1 << 0
