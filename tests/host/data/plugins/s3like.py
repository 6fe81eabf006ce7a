# The interface shape of nbdkit's S3 plugin (Debian's nbdkit-plugin-python), with a dict
# standing in for the bucket: a Config object filled by config() and checked by
# config_complete(), a server object as the handle, THREAD_MODEL_PARALLEL, block_size() of
# one object, FUA_NATIVE, CACHE_NONE, no extents. Objects never written read as zeros;
# zero(FLAG_MAY_TRIM) and trim() delete them.
import errno
import threading
import time

import nbdkit

API_VERSION = 2
BUCKETS = {}  # (bucket, key) -> {object number: bytes}; the "network"


class Config:
    def __init__(self):
        self.bucket = self.key = None
        self.size = self.object_size = None
        self.latency = 0.0  # seconds per object read or written: the network

    def set(self, key, value):
        key = key.replace("_", "-")
        if key == "bucket":
            self.bucket = value
        elif key == "key":
            self.key = value
        elif key == "size":
            self.size = nbdkit.parse_size(value)
        elif key == "object-size":
            self.object_size = nbdkit.parse_size(value)
        elif key == "latency":
            self.latency = float(value)
        elif key in ("access-key", "secret-key", "endpoint-url", "session-token"):
            pass  # credentials: nothing to do without a network
        else:
            raise RuntimeError(f"unknown parameter {key}")

    def validate(self):
        if self.bucket is None:
            raise RuntimeError("bucket parameter missing")
        if self.key is None:
            raise RuntimeError("key parameter missing")
        if (self.size is None) != (self.object_size is None):
            raise RuntimeError("`size` and `object-size` must be given together")
        if self.size is None or self.size % self.object_size:
            raise RuntimeError("`size` must be a multiple of `object-size`")


cfg = Config()


class Server:
    def __init__(self, readonly):
        self.objects = BUCKETS.setdefault((cfg.bucket, cfg.key), {})
        self.lock = threading.Lock()
        self.readonly = readonly

    def read(self, buf, offset):
        osz, pos = cfg.object_size, 0
        while pos < len(buf):
            n, within = divmod(offset + pos, osz)
            take = min(osz - within, len(buf) - pos)
            time.sleep(cfg.latency)
            obj = self.objects.get(n)
            buf[pos : pos + take] = obj[within : within + take] if obj else bytes(take)
            pos += take

    def write(self, buf, offset):
        osz, pos = cfg.object_size, 0
        while pos < len(buf):
            n, within = divmod(offset + pos, osz)
            take = min(osz - within, len(buf) - pos)
            time.sleep(cfg.latency)
            with self.lock:
                obj = bytearray(self.objects.get(n) or bytes(osz))
                obj[within : within + take] = buf[pos : pos + take]
                self.objects[n] = bytes(obj)
            pos += take

    def delete(self, count, offset):
        osz = cfg.object_size
        if offset % osz or count % osz:
            nbdkit.set_error(errno.EINVAL)
            raise RuntimeError("trim/zero must cover whole objects")
        with self.lock:
            for n in range(offset // osz, (offset + count) // osz):
                self.objects.pop(n, None)


def config(key, value):
    cfg.set(key, value)


def config_complete():
    cfg.validate()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return Server(readonly)


def get_size(server):
    return cfg.size


def block_size(server):
    return (cfg.object_size, cfg.object_size, cfg.object_size)


def can_write(server):
    return True


def can_multi_conn(server):
    return True


def can_trim(server):
    return True


def can_zero(server):
    return True


def can_fast_zero(server):
    return True


def can_fua(server):
    return nbdkit.FUA_NATIVE


def can_cache(server):
    return nbdkit.CACHE_NONE


def can_extents(server):
    return False


def can_flush(server):
    return True


def is_rotational(server):
    return False


def pread(server, buf, offset, flags):
    server.read(buf, offset)


def pwrite(server, buf, offset, flags):
    server.write(buf, offset)


def trim(server, count, offset, flags):
    server.delete(count, offset)


def zero(server, count, offset, flags):
    if not flags & nbdkit.FLAG_MAY_TRIM:
        nbdkit.set_error(errno.EOPNOTSUPP)  # let the server write zeros instead
        raise RuntimeError("zero without MAY_TRIM")
    server.delete(count, offset)


def flush(server, flags):
    pass
