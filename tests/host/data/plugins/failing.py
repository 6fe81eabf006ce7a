# A disk that fails one callback: fail=pread|pwrite|flush|trim|zero, error=ENOSPC (an errno
# name, or "none" to raise without nbdkit.set_error), at=OFFSET (only requests covering it).
import errno

import nbdkit

API_VERSION = 2
fail, error, at = None, "EIO", 0
disk = bytearray(1 << 20)


def config(key, value):
    global fail, error, at
    if key == "fail":
        fail = value
    elif key == "error":
        error = value
    elif key == "at":
        at = nbdkit.parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    if fail not in ("pread", "pwrite", "flush", "trim", "zero"):
        raise RuntimeError("fail= must be one of pread, pwrite, flush, trim, zero")


def _maybe_fail(name, offset=0, count=1):
    if name == fail and offset <= at < offset + max(count, 1):
        if error != "none":
            nbdkit.set_error(getattr(errno, error))
        raise RuntimeError(f"{name} fails here, as configured")


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    _maybe_fail("pread", offset, len(buf))
    buf[:] = disk[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _maybe_fail("pwrite", offset, len(buf))
    disk[offset : offset + len(buf)] = buf


def flush(h, flags):
    _maybe_fail("flush", at)


def trim(h, count, offset, flags):
    _maybe_fail("trim", offset, count)


def zero(h, count, offset, flags):
    _maybe_fail("zero", offset, count)
    disk[offset : offset + count] = bytes(count)
