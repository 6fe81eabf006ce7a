# A read-only disk: every 512-byte sector holds its own number (nbdkit API version 2).
import struct

import nbdkit

API_VERSION = 2
SIZE = 1 << 20


def open(readonly):
    return {"readonly": readonly}


def get_size(h):
    return SIZE


def can_write(h):
    return False


def pread(h, buf, offset, flags):
    first = offset // 512
    data = b"".join(struct.pack("<Q", s) * 64 for s in range(first, first + len(buf) // 512 + 1))
    buf[:] = data[offset % 512 : offset % 512 + len(buf)]
    nbdkit.debug(f"pread {len(buf)} at {offset}")
