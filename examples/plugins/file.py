# A file as a disk, as an nbdkit Python plugin (API version 2): `file=PATH` is required.
# Holes in a sparse file are reported by extents(), so `qemu-img map` and nbdcopy skip them.
import errno
import os

import nbdkit

API_VERSION = 2
path = None


def config(key, value):
    global path
    if key == "file":
        path = os.path.abspath(value)
    else:
        raise RuntimeError(f"unknown parameter {key!r} (file.py takes file=)")


def config_complete():
    if path is None:
        raise RuntimeError("file parameter missing: give file=PATH")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL  # pread/pwrite on one fd need no lock


def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            nbdkit.set_error(errno.EIO)
            raise RuntimeError(f"short read at {offset + done}")
        done += n


def pwrite(fd, buf, offset, flags):
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd, flags):
    os.fdatasync(fd)


def can_extents(fd):
    return True


def extents(fd, count, offset, flags):
    end, out = offset + count, []
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:  # ENXIO: only a hole up to the end of the file
            if exc.errno != errno.ENXIO:
                raise
            data = end
        if data > offset:
            out.append((offset, min(data, end) - offset, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
            offset = data
            continue
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
        out.append((offset, min(hole, end) - offset, 0))
        offset = hole
    return out
