"""The FUSE/CUSE kernel ABI, from /usr/include/linux/fuse.h (protocol 7.x).

CUSE (character devices in user space) speaks the FUSE protocol on ``/dev/cuse``: the kernel
sends requests (a ``fuse_in_header`` plus an opcode-specific body), the server writes replies
(a ``fuse_out_header`` plus a body). There are no ioctls on ``/dev/cuse`` itself.
"""

from __future__ import annotations

import ctypes
import enum

FUSE_KERNEL_VERSION = 7  # fuse.h
FUSE_KERNEL_MINOR_VERSION = 38  # fuse.h (we speak a subset that older minors share)
FUSE_MIN_READ_BUFFER = 8192  # fuse.h: a read of /dev/cuse needs at least this much room
CUSE_INIT_INFO_MAX = 4096  # fuse.h
CUSE_UNRESTRICTED_IOCTL = 1 << 0  # fuse.h: ioctls go through the retry protocol

# fuse.h: ioctl flags
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_32BIT = 1 << 3
FUSE_IOCTL_DIR = 1 << 4
FUSE_IOCTL_MAX_IOV = 256

FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0  # fuse.h: the kernel wants a FUSE_NOTIFY_POLL later


class Opcode(enum.IntEnum):
    """fuse.h ``enum fuse_opcode`` (the ones a character device receives)."""

    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_WRITE = 16
    FUSE_RELEASE = 18
    FUSE_FSYNC = 20
    FUSE_FLUSH = 25
    FUSE_INTERRUPT = 36
    FUSE_DESTROY = 38
    FUSE_IOCTL = 39
    FUSE_POLL = 40
    CUSE_INIT = 4096


FUSE_NOTIFY_POLL = 1  # fuse.h enum fuse_notify_code


class _S(ctypes.LittleEndianStructure):
    _pack_ = 8


class fuse_in_header(_S):
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("opcode", ctypes.c_uint32),
        ("unique", ctypes.c_uint64),
        ("nodeid", ctypes.c_uint64),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("total_extlen", ctypes.c_uint16),
        ("padding", ctypes.c_uint16),
    ]


class fuse_out_header(_S):
    _fields_ = [("len", ctypes.c_uint32), ("error", ctypes.c_int32), ("unique", ctypes.c_uint64)]


class cuse_init_in(_S):
    _fields_ = [(n, ctypes.c_uint32) for n in ("major", "minor", "unused", "flags")]


class cuse_init_out(_S):
    _fields_ = [
        *(
            (n, ctypes.c_uint32)
            for n in (
                "major",
                "minor",
                "unused",
                "flags",
                "max_read",
                "max_write",
                "dev_major",
                "dev_minor",
            )
        ),
        ("spare", ctypes.c_uint32 * 10),
    ]


class fuse_open_in(_S):
    _fields_ = [("flags", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class fuse_open_out(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("open_flags", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
    ]


class fuse_release_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("release_flags", ctypes.c_uint32),
        ("lock_owner", ctypes.c_uint64),
    ]


class fuse_read_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("read_flags", ctypes.c_uint32),
        ("lock_owner", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
    ]


class fuse_write_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("write_flags", ctypes.c_uint32),
        ("lock_owner", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
    ]


class fuse_write_out(_S):
    _fields_ = [("size", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class fuse_flush_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("unused", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("lock_owner", ctypes.c_uint64),
    ]


class fuse_interrupt_in(_S):
    _fields_ = [("unique", ctypes.c_uint64)]


class fuse_ioctl_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cmd", ctypes.c_uint32),
        ("arg", ctypes.c_uint64),
        ("in_size", ctypes.c_uint32),
        ("out_size", ctypes.c_uint32),
    ]


class fuse_ioctl_iovec(_S):
    _fields_ = [("base", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class fuse_ioctl_out(_S):
    _fields_ = [
        ("result", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("in_iovs", ctypes.c_uint32),
        ("out_iovs", ctypes.c_uint32),
    ]


class fuse_poll_in(_S):
    _fields_ = [
        ("fh", ctypes.c_uint64),
        ("kh", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("events", ctypes.c_uint32),
    ]


class fuse_poll_out(_S):
    _fields_ = [("revents", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class fuse_notify_poll_wakeup_out(_S):
    _fields_ = [("kh", ctypes.c_uint64)]


# Sizes from fuse.h, checked at import (a wrong layout would corrupt every message).
for _t, _size in (
    (fuse_in_header, 40),
    (fuse_out_header, 16),
    (cuse_init_in, 16),
    (cuse_init_out, 72),
    (fuse_open_in, 8),
    (fuse_open_out, 16),
    (fuse_release_in, 24),
    (fuse_read_in, 40),
    (fuse_write_in, 40),
    (fuse_write_out, 8),
    (fuse_flush_in, 24),
    (fuse_interrupt_in, 8),
    (fuse_ioctl_in, 32),
    (fuse_ioctl_iovec, 16),
    (fuse_ioctl_out, 16),
    (fuse_poll_in, 24),
    (fuse_poll_out, 8),
    (fuse_notify_poll_wakeup_out, 8),
):
    assert ctypes.sizeof(_t) == _size, (
        f"{_t.__name__} is {ctypes.sizeof(_t)} bytes, fuse.h says {_size}"
    )
