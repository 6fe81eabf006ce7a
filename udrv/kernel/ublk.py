"""ublk's uapi: commands, flags and structures (``include/uapi/linux/ublk_cmd.h``).

The structures and numbers are those of ``/usr/include/linux/ublk_cmd.h``; the
ioctl-encoded command numbers (``UBLK_U_CMD_*``, ``UBLK_U_IO_*``, Linux 6.0+) are defined in
Linux 6.12's copy of the header as ``_IOR/_IOWR('u', UBLK_CMD_*, struct ...)``, which older
distribution headers (Debian 12's) do not carry yet; they are built the same way here.
"""

from __future__ import annotations

import ctypes

from udrv.kernel.ioctl import _IOR, _IOWR

CONTROL = "/dev/ublk-control"

# Control commands (ublk_cmd.h "admin commands").
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
# I/O commands.
UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21

UBLK_IO_RES_OK = 0
UBLK_IO_RES_ABORT = -19  # -ENODEV: the queue is going away
UBLKSRV_CMD_BUF_OFFSET = 0
UBLK_MAX_QUEUE_DEPTH = 4096

# Feature flags (ublksrv_ctrl_dev_info.flags).
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6

# Device states (ublksrv_ctrl_dev_info.state).
UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED = 0, 1, 2
STATE_NAMES = {0: "dead", 1: "live", 2: "quiesced"}

# I/O descriptor ops (op_flags bits 0-7) and flags.
UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH = 0, 1, 2
UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_SAME, UBLK_IO_OP_WRITE_ZEROES = 3, 4, 5
UBLK_IO_F_FUA = 1 << 13

# Parameters.
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3
UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1


class UblksrvCtrlCmd(ctypes.Structure):
    _fields_ = [
        ("dev_id", ctypes.c_uint32),
        ("queue_id", ctypes.c_uint16),
        ("len", ctypes.c_uint16),
        ("addr", ctypes.c_uint64),
        ("data", ctypes.c_uint64 * 1),
        ("dev_path_len", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("reserved", ctypes.c_uint32),
    ]


class UblksrvCtrlDevInfo(ctypes.Structure):
    _fields_ = [
        ("nr_hw_queues", ctypes.c_uint16),
        ("queue_depth", ctypes.c_uint16),
        ("state", ctypes.c_uint16),
        ("pad0", ctypes.c_uint16),
        ("max_io_buf_bytes", ctypes.c_uint32),
        ("dev_id", ctypes.c_uint32),
        ("ublksrv_pid", ctypes.c_int32),
        ("pad1", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("ublksrv_flags", ctypes.c_uint64),
        ("owner_uid", ctypes.c_uint32),
        ("owner_gid", ctypes.c_uint32),
        ("reserved1", ctypes.c_uint64),
        ("reserved2", ctypes.c_uint64),
    ]


class UblksrvIoDesc(ctypes.Structure):
    _fields_ = [
        ("op_flags", ctypes.c_uint32),  # op: bits 0-7, flags: 8-31
        ("nr_sectors", ctypes.c_uint32),
        ("start_sector", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
    ]


class UblksrvIoCmd(ctypes.Structure):
    _fields_ = [
        ("q_id", ctypes.c_uint16),
        ("tag", ctypes.c_uint16),
        ("result", ctypes.c_int32),
        ("addr", ctypes.c_uint64),
    ]


class UblkParamBasic(ctypes.Structure):
    _fields_ = [
        ("attrs", ctypes.c_uint32),
        ("logical_bs_shift", ctypes.c_uint8),
        ("physical_bs_shift", ctypes.c_uint8),
        ("io_opt_shift", ctypes.c_uint8),
        ("io_min_shift", ctypes.c_uint8),
        ("max_sectors", ctypes.c_uint32),
        ("chunk_sectors", ctypes.c_uint32),
        ("dev_sectors", ctypes.c_uint64),
        ("virt_boundary_mask", ctypes.c_uint64),
    ]


class UblkParamDiscard(ctypes.Structure):
    _fields_ = [
        ("discard_alignment", ctypes.c_uint32),
        ("discard_granularity", ctypes.c_uint32),
        ("max_discard_sectors", ctypes.c_uint32),
        ("max_write_zeroes_sectors", ctypes.c_uint32),
        ("max_discard_segments", ctypes.c_uint16),
        ("reserved0", ctypes.c_uint16),
    ]


class UblkParams(ctypes.Structure):
    """The leading part of ``struct ublk_params`` (basic + discard); ``len`` says how much
    the kernel reads (it zeroes the rest: devt and zoned are not ours to set)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("types", ctypes.c_uint32),
        ("basic", UblkParamBasic),
        ("discard", UblkParamDiscard),
    ]


def _u_cmd(nr: int, read_only: bool = False) -> int:
    return (_IOR if read_only else _IOWR)("u", nr, UblksrvCtrlCmd)


# Linux 6.12 ublk_cmd.h: UBLK_U_CMD_* and UBLK_U_IO_*.
UBLK_U_CMD_GET_DEV_INFO = _u_cmd(UBLK_CMD_GET_DEV_INFO, read_only=True)
UBLK_U_CMD_ADD_DEV = _u_cmd(UBLK_CMD_ADD_DEV)
UBLK_U_CMD_DEL_DEV = _u_cmd(UBLK_CMD_DEL_DEV)
UBLK_U_CMD_START_DEV = _u_cmd(UBLK_CMD_START_DEV)
UBLK_U_CMD_STOP_DEV = _u_cmd(UBLK_CMD_STOP_DEV)
UBLK_U_CMD_SET_PARAMS = _u_cmd(UBLK_CMD_SET_PARAMS)
UBLK_U_CMD_START_USER_RECOVERY = _u_cmd(UBLK_CMD_START_USER_RECOVERY)
UBLK_U_CMD_END_USER_RECOVERY = _u_cmd(UBLK_CMD_END_USER_RECOVERY)
UBLK_U_IO_FETCH_REQ = _IOWR("u", UBLK_IO_FETCH_REQ, UblksrvIoCmd)
UBLK_U_IO_COMMIT_AND_FETCH_REQ = _IOWR("u", UBLK_IO_COMMIT_AND_FETCH_REQ, UblksrvIoCmd)


def cmd_buf_size(depth: int, page: int = 4096) -> int:
    """Bytes of one queue's I/O descriptor array as mmapped (round_up(depth * 24, PAGE))."""
    return -(-depth * ctypes.sizeof(UblksrvIoDesc) // page) * page


def cmd_buf_offset(q_id: int, page: int = 4096) -> int:
    """mmap offset of queue ``q_id``'s descriptors: each queue has room for the maximum depth."""
    return UBLKSRV_CMD_BUF_OFFSET + q_id * cmd_buf_size(UBLK_MAX_QUEUE_DEPTH, page)
