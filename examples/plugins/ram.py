# A RAM disk as an nbdkit Python plugin (nbdkit-python-plugin(3), API version 2).
# Serve it with `udrv plugin serve ram.py size=64M` (or `nbdkit python ram.py size=64M`).
import nbdkit

API_VERSION = 2
size = 64 * 1024 * 1024
disk = memoryview(b"")


def config(key, value):
    global size
    if key != "size":
        raise RuntimeError(f"unknown parameter {key!r} (ram.py takes size=)")
    size = nbdkit.parse_size(value)


def config_complete():
    global disk
    disk = memoryview(bytearray(size))


def open(readonly):
    return None


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset : offset + len(buf)] = buf


def zero(h, count, offset, flags):
    disk[offset : offset + count] = bytes(count)


def trim(h, count, offset, flags):
    zero(h, count, offset, flags)


def flush(h, flags):
    pass
