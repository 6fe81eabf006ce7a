"""NVMe controller registers, queue entries and opcodes (NVMe Base Spec 1.4 sections cited)."""

from __future__ import annotations

import numpy as np

# 3.1 Controller registers (BAR0).
CAP = 0x00  # 64-bit, 3.1.1 Controller Capabilities
CAP_MQES_MASK = 0xFFFF  # maximum queue entries, 0's based
CAP_CQR = 1 << 16  # contiguous queues required
CAP_TO_SHIFT, CAP_TO_MASK = 24, 0xFF  # worst-case ready time, 500 ms units
CAP_DSTRD_SHIFT, CAP_DSTRD_MASK = 32, 0xF  # doorbell stride: 4 << DSTRD bytes
CAP_CSS_NVM = 1 << 37  # NVM command set supported
CAP_MPSMIN_SHIFT, CAP_MPSMAX_SHIFT = 48, 52  # memory page size 2 ** (12 + MPS)
VS = 0x08  # 3.1.2 Version
INTMS, INTMC = 0x0C, 0x10  # 3.1.3-4 interrupt mask set/clear (pin-based/MSI only)
CC = 0x14  # 3.1.5 Controller Configuration
CC_EN = 1 << 0
CC_CSS_NVM = 0 << 4
CC_MPS_SHIFT = 7
CC_AMS_RR = 0 << 11
CC_SHN_NORMAL = 1 << 14
CC_SHN_MASK = 3 << 14
CC_IOSQES = 6 << 16  # 2 ** 6 = 64-byte submission entries
CC_IOCQES = 4 << 20  # 2 ** 4 = 16-byte completion entries
CSTS = 0x1C  # 3.1.6 Controller Status
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1  # controller fatal status
CSTS_SHST_MASK = 3 << 2
CSTS_SHST_COMPLETE = 2 << 2
AQA = 0x24  # 3.1.8 Admin Queue Attributes: ACQS << 16 | ASQS, 0's based
ASQ = 0x28  # 64-bit admin submission queue base
ACQ = 0x30  # 64-bit admin completion queue base
DOORBELLS = 0x1000  # 3.1.21: SQ y tail at 0x1000 + 2y * stride, CQ y head at + (2y + 1) * stride

# 4.2 Submission queue entry (64 bytes) as 16 dwords; 4.6 completion queue entry (16 bytes).
SQE = np.dtype((np.uint32, 16))
CQE = np.dtype([("dw0", "<u4"), ("dw1", "<u4"), ("sqhd", "<u2"), ("sqid", "<u2"),
                ("cid", "<u2"), ("status", "<u2")])  # fmt: skip
assert SQE.itemsize == 64 and CQE.itemsize == 16

# 5 Admin commands.
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ = 0x00, 0x01
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ = 0x04, 0x05
CQ_PC, CQ_IEN = 1 << 0, 1 << 1  # Create I/O CQ CDW11: physically contiguous, interrupts on (5.3)
ADMIN_IDENTIFY = 0x06
ADMIN_SET_FEATURES = 0x09
FEAT_NUMBER_OF_QUEUES = 0x07  # 5.21.1.7
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NS_LIST = 0x00, 0x01, 0x02  # 5.15.1

# 6 NVM command set.
NVM_FLUSH, NVM_WRITE, NVM_READ = 0x00, 0x01, 0x02
NVM_WRITE_ZEROES = 0x08
NVM_DSM = 0x09  # dataset management; CDW11 bit 2: deallocate (6.7)
DSM_AD = 1 << 2

# 4.6.1.2 Status codes (SCT 0, generic) worth naming.
STATUS_NAMES = {
    0x00: "successful completion", 0x01: "invalid command opcode", 0x02: "invalid field in command",
    0x04: "data transfer error", 0x06: "internal error", 0x0B: "invalid namespace or format",
    0x80: "LBA out of range", 0x81: "capacity exceeded",
}  # fmt: skip


def describe_status(status: int) -> str:
    """A completion's status field (CQE DW3 bits 31:17, 4.6.1): type, code and name."""
    sc, sct = status & 0xFF, (status >> 8) & 7
    name = STATUS_NAMES.get(sc, "") if sct == 0 else ""
    return f"SCT {sct} SC {sc:#04x}" + (f" ({name})" if name else "")
