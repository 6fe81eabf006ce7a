"""NBD: the kernel's ioctls (``/usr/include/linux/nbd.h``) and the wire protocol.

Wire constants are from the NBD protocol specification (NetworkBlockDevice/nbd,
doc/proto.md); sections are named next to them. Everything on the wire is big-endian.
"""

from __future__ import annotations

import struct

from udrv.errors import FrontendError
from udrv.kernel.ioctl import _IO, ioctl

# -- ioctls (linux/nbd.h) --------------------------------------------------------------------
NBD_SET_SOCK = _IO(0xAB, 0)
NBD_SET_BLKSIZE = _IO(0xAB, 1)
NBD_DO_IT = _IO(0xAB, 3)
NBD_CLEAR_SOCK = _IO(0xAB, 4)
NBD_SET_SIZE_BLOCKS = _IO(0xAB, 7)
NBD_DISCONNECT = _IO(0xAB, 8)
NBD_SET_TIMEOUT = _IO(0xAB, 9)
NBD_SET_FLAGS = _IO(0xAB, 10)
IOCTL_NAMES = {
    NBD_SET_SOCK: "NBD_SET_SOCK",
    NBD_SET_BLKSIZE: "NBD_SET_BLKSIZE",
    NBD_DO_IT: "NBD_DO_IT",
    NBD_CLEAR_SOCK: "NBD_CLEAR_SOCK",
    NBD_SET_SIZE_BLOCKS: "NBD_SET_SIZE_BLOCKS",
    NBD_DISCONNECT: "NBD_DISCONNECT",
    NBD_SET_TIMEOUT: "NBD_SET_TIMEOUT",
    NBD_SET_FLAGS: "NBD_SET_FLAGS",
}


def nbd_ioctl(fd: int, request: int, arg: int = 0, *, path: str) -> int:
    """One of the NBD ioctls above on the open ``/dev/nbdN`` ``fd``.

    Args:
        fd: the open device.
        request: ``NBD_SET_SOCK``, ``NBD_DO_IT``, ...
        arg: the ioctl's integer argument (a socket fd, a size, seconds, flags).
        path: the device's path, for the error message.

    Returns:
        The ioctl's result.

    Raises:
        FrontendError: "ioctl NBD_SET_SOCK on /dev/nbd0 failed: [EBUSY] ...", with errno.
    """
    return ioctl(fd, request, arg, what=f"{IOCTL_NAMES[request]} on {path}", error=FrontendError)


#: socket(7) SO_SNDBUFFORCE (asm-generic/socket.h), which Python's socket module lacks: the
#: send buffer of the socket handed to the kernel, past net.core.wmem_max (root only).
SO_SNDBUFFORCE = 32

# -- transmission flags (nbd.h; proto.md "Transmission flags") --------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# -- requests and simple replies (proto.md "Transmission phase") -------------------------------
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, cookie
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_TRIM = 0, 1, 2, 3, 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 6: "WRITE_ZEROES"}

# Error values on the wire (proto.md "Error values"): a fixed subset of errno numbers.
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL = 1, 5, 12, 22
NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 28, 75, 95, 108
WIRE_ERRNOS = {NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW,
               NBD_ENOTSUP, NBD_ESHUTDOWN}  # fmt: skip

# -- handshake (proto.md "Fixed newstyle negotiation") ----------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST = 1, 2, 3
NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY = 6, 7, 8
OPTION_REPLY_MAGIC = 0x3E889045565A9
NBD_REP_ACK, NBD_REP_SERVER, NBD_REP_INFO = 1, 2, 3
NBD_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_ERR | 1
NBD_REP_ERR_POLICY = NBD_REP_ERR | 2
NBD_REP_ERR_INVALID = NBD_REP_ERR | 3
NBD_REP_ERR_UNKNOWN = NBD_REP_ERR | 6
NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE = 0, 1, 2, 3
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length

# -- TLS, structured replies and block status (proto.md; not in linux/nbd.h) -----------------
NBD_OPT_STARTTLS = 5  # "Option types"
NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT = 9, 10
NBD_REP_META_CONTEXT = 4  # "Option reply types"
NBD_REP_ERR_TLS_REQD = NBD_REP_ERR | 5
NBD_REP_ERR_SHUTDOWN = NBD_REP_ERR | 7
NBD_FLAG_SEND_DF = 1 << 7  # "Transmission flags" (not offered: reads are never fragmented)
NBD_CMD_BLOCK_STATUS = 7  # "Request types"
NBD_CMD_FLAG_REQ_ONE = 1 << 3  # "Command flags"
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF  # "Structured reply chunk message"
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
BASE_ALLOCATION = "base:allocation"  # "Metadata contexts": the one context served
NBD_STATE_HOLE, NBD_STATE_ZERO = 1 << 0, 1 << 1  # base:allocation status flags
CMD_NAMES[NBD_CMD_BLOCK_STATUS] = "BLOCK_STATUS"
