"""CUSE: publish a user-space driver as a character device node, ``/dev/NAME``.

The server speaks the FUSE protocol on ``/dev/cuse`` (``linux/fuse.h``): after ``CUSE_INIT``
(which names the device, ``DEVNAME=NAME``), the kernel forwards every open, read, write,
ioctl, poll and close on ``/dev/NAME`` as a request; we answer each one. Programs using the
node never know a Python process is behind it.

A driver implements :class:`CharDevice`; requests run on a thread pool so one client blocked
in ``read`` does not hold up the others. When the server process exits or is killed, the
kernel removes the node and fails the requests still pending (clients get ``ENODEV`` or
``ENOTCONN``), so no client ever hangs on a dead driver.

Ioctls use the unrestricted protocol (``CUSE_UNRESTRICTED_IOCTL``): the kernel first sends
only ``cmd`` and ``arg``; we answer ``FUSE_IOCTL_RETRY`` with the user memory to copy in and
out, computed from the ioctl's ``_IOC`` size by default, or by the handler for pointer
arguments (a struct that points to another buffer), which may retry again after seeing the
struct.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from udrv.errors import FrontendError
from udrv.kernel import fuse as F
from udrv.kernel.ioctl import _IOC_DIR, _IOC_READ, _IOC_SIZE, _IOC_WRITE

log = logging.getLogger(__name__)

CUSE_DEVICE = "/dev/cuse"
MAX_WRITE = 128 * 1024
MAX_READ = 128 * 1024
# Request buffer: a header, the largest body (fuse_write_in) and MAX_WRITE bytes of data.
READ_BUFFER = max(F.FUSE_MIN_READ_BUFFER, MAX_WRITE + 4096)


@dataclass
class Request:
    """One request from the kernel, as a handler sees it."""

    unique: int
    pid: int
    uid: int
    gid: int
    interrupted: threading.Event = field(default_factory=threading.Event)

    def wait(self, event: threading.Event, timeout: float | None = None) -> bool:
        """Block until ``event`` is set; raise EINTR if the client's call is interrupted."""
        while not event.wait(0.05 if timeout is None else min(timeout, 0.05)):
            if self.interrupted.is_set():
                raise OSError(errno.EINTR, "interrupted")
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    return False
        return True


@dataclass
class IoctlRetry(Exception):
    """Raised by an ioctl handler: "give me these user-memory ranges and call me again".

    ``in_iovs`` are copied in (the handler then gets their concatenation as ``data``);
    ``out_iovs`` receive the reply data, in order.
    """

    in_iovs: Sequence[tuple[int, int]]
    out_iovs: Sequence[tuple[int, int]]


@dataclass
class Ioctl:
    """An ioctl as the handler sees it: ``data`` is what was copied in (maybe empty)."""

    cmd: int
    arg: int
    data: bytes
    out_size: int


class CharDevice:
    """Override what your device supports; the defaults answer like a minimal driver.

    Every handler may raise ``OSError(errno, ...)``: the client's call fails with that errno.
    Any other exception is logged and the client gets EIO; the server keeps running.
    """

    def open(self, req: Request, flags: int) -> Any:
        """Return per-open state (passed back as ``handle``)."""
        return None

    def read(self, req: Request, handle: Any, size: int, offset: int) -> bytes:
        raise OSError(errno.EINVAL, "read not supported")

    def write(self, req: Request, handle: Any, data: bytes, offset: int) -> int:
        raise OSError(errno.EINVAL, "write not supported")

    def ioctl(self, req: Request, handle: Any, call: Ioctl) -> tuple[int, bytes]:
        """Return ``(result, out_data)``; raise :class:`IoctlRetry` for pointer arguments."""
        raise OSError(errno.ENOTTY, "no such ioctl")

    def poll(self, req: Request, handle: Any, events: int, notify: Any) -> int:
        """Return ready events (select.POLLIN...); call ``notify()`` later when that changes."""
        return select.POLLIN | select.POLLOUT

    def release(self, req: Request, handle: Any) -> None:
        """The last close of one open."""


class CuseServer:
    """Serve ``/dev/NAME`` for a :class:`CharDevice` (context manager).

    Args:
        name: the node's name under /dev.
        device: the handlers.
        workers: threads answering requests (blocked reads each hold one).
        cuse_path: the CUSE control node (tests may use a socket pair instead).

    Raises:
        FrontendError: /dev/cuse is missing (``modprobe cuse``) or not accessible.
    """

    def __init__(
        self,
        name: str,
        device: CharDevice,
        *,
        workers: int = 32,
        cuse_path: str = CUSE_DEVICE,
        fd: int | None = None,
    ) -> None:
        if not name or "/" in name or len(name) > 64:
            raise FrontendError(f"bad CUSE device name {name!r}: one path component, <= 64 chars")
        self.name, self.device = name, device
        if fd is None:
            try:
                fd = os.open(cuse_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                fix = "run `modprobe cuse`" if exc.errno == errno.ENOENT else "run as root"
                raise FrontendError(
                    f"cannot open {cuse_path} for /dev/{name}; {fix}", errno=exc.errno
                ) from None
        self.fd = fd
        self._handles: dict[int, Any] = {}
        self._next_fh = 1
        self._inflight: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"cuse-{name}")
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self.initialized = threading.Event()
        self.errors = 0  # malformed requests and handler failures, for tests and stats

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CuseServer:
        """Serve in a background thread; returns once the kernel created the node."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"cuse-{self.name}", daemon=True
        )
        self._thread.start()
        if not self.initialized.wait(10):
            raise FrontendError(f"the kernel did not send CUSE_INIT for /dev/{self.name}")
        return self

    def serve_forever(self) -> None:
        """Read and dispatch requests until :meth:`stop` or the kernel ends the channel."""
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        while True:
            r, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                n = os.readv(self.fd, [view])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: the request was interrupted before we read it
                if exc.errno == errno.ENODEV:
                    return  # channel torn down
                raise FrontendError(
                    f"reading requests for /dev/{self.name}", errno=exc.errno
                ) from None
            if n == 0:
                return
            self.dispatch(bytes(view[:n]))

    def stop(self) -> None:
        """Stop serving and remove the node (closing the channel removes it)."""
        if self.fd < 0:
            return
        os.write(self._stop_w, b"x")
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(5)
        for req in list(self._inflight.values()):
            req.interrupted.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
        self.fd = -1
        os.close(self._stop_r)
        os.close(self._stop_w)

    close = stop

    def __enter__(self) -> CuseServer:
        return self.start() if self._thread is None else self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- protocol ----------------------------------------------------------------------------

    def dispatch(self, msg: bytes) -> None:
        """Handle one raw request; malformed ones are answered with an error, never raise."""
        hsize = ctypes.sizeof(F.fuse_in_header)
        if len(msg) < hsize:
            self.errors += 1
            log.warning("/dev/%s: runt request of %d bytes ignored", self.name, len(msg))
            return
        hdr = F.fuse_in_header.from_buffer_copy(msg)
        body = msg[hsize : hdr.len] if hsize <= hdr.len <= len(msg) else None
        if body is None:
            self.errors += 1
            self.reply_error(hdr.unique, errno.EINVAL)
            return
        op = hdr.opcode
        if op == F.Opcode.CUSE_INIT:
            self._init(hdr, body)
        elif op == F.Opcode.FUSE_INTERRUPT:
            if len(body) >= 8:
                target = F.fuse_interrupt_in.from_buffer_copy(body).unique
                with self._lock:
                    req = self._inflight.get(target)
                if req:
                    req.interrupted.set()
        elif op == F.Opcode.FUSE_DESTROY:
            self.reply(hdr.unique, b"")
        else:
            req = Request(hdr.unique, hdr.pid, hdr.uid, hdr.gid)
            with self._lock:
                self._inflight[hdr.unique] = req
            self._pool.submit(self._run, op, req, body)

    def _run(self, op: int, req: Request, body: bytes) -> None:
        try:
            payload = self._handle(op, req, body)
            self.reply(req.unique, payload)
        except OSError as exc:
            self.reply_error(req.unique, exc.errno or errno.EIO)
        except _Malformed as exc:
            self.errors += 1
            log.warning("/dev/%s: malformed %s request: %s", self.name, op, exc)
            self.reply_error(req.unique, errno.EINVAL)
        except Exception:
            self.errors += 1
            log.exception("/dev/%s: handler for opcode %d failed", self.name, op)
            self.reply_error(req.unique, errno.EIO)
        finally:
            with self._lock:
                self._inflight.pop(req.unique, None)

    def _handle(self, op: int, req: Request, body: bytes) -> bytes:
        dev = self.device
        if op == F.Opcode.FUSE_OPEN:
            arg = _parse(F.fuse_open_in, body)
            handle = dev.open(req, arg.flags)
            with self._lock:
                fh, self._next_fh = self._next_fh, self._next_fh + 1
                self._handles[fh] = handle
            return bytes(F.fuse_open_out(fh=fh))
        if op == F.Opcode.FUSE_READ:
            arg = _parse(F.fuse_read_in, body)
            data = dev.read(req, self._handle_of(arg.fh), min(arg.size, MAX_READ), arg.offset)
            return bytes(data[: arg.size])
        if op == F.Opcode.FUSE_WRITE:
            arg = _parse(F.fuse_write_in, body)
            data = body[ctypes.sizeof(F.fuse_write_in) :]
            if len(data) != arg.size:
                raise _Malformed(f"write of {arg.size} bytes carries {len(data)}")
            n = dev.write(req, self._handle_of(arg.fh), data, arg.offset)
            return bytes(F.fuse_write_out(size=n))
        if op == F.Opcode.FUSE_IOCTL:
            return self._ioctl(req, body)
        if op == F.Opcode.FUSE_POLL:
            arg = _parse(F.fuse_poll_in, body)
            kh = arg.kh if arg.flags & F.FUSE_POLL_SCHEDULE_NOTIFY else None
            revents = dev.poll(
                req,
                self._handle_of(arg.fh),
                arg.events,
                lambda: self.notify_poll(kh) if kh is not None else None,
            )
            return bytes(F.fuse_poll_out(revents=revents))
        if op == F.Opcode.FUSE_RELEASE:
            arg = _parse(F.fuse_release_in, body)
            with self._lock:
                handle = self._handles.pop(arg.fh, None)
            dev.release(req, handle)
            return b""
        if op in (F.Opcode.FUSE_FLUSH, F.Opcode.FUSE_FSYNC):
            return b""
        raise OSError(errno.ENOSYS, f"opcode {op}")

    def _ioctl(self, req: Request, body: bytes) -> bytes:
        arg = _parse(F.fuse_ioctl_in, body)
        data = body[ctypes.sizeof(F.fuse_ioctl_in) :]
        if arg.flags & F.FUSE_IOCTL_COMPAT:
            raise OSError(errno.ENOSYS, "32-bit compat ioctls are not supported")
        unrestricted = bool(arg.flags & F.FUSE_IOCTL_UNRESTRICTED)
        if unrestricted and arg.in_size == 0 and arg.out_size == 0:
            # First round: ask for what the _IOC bits say the argument is.
            size, d = _IOC_SIZE(arg.cmd), _IOC_DIR(arg.cmd)
            ins = [(arg.arg, size)] if d & _IOC_WRITE and size else []
            outs = [(arg.arg, size)] if d & _IOC_READ and size else []
            if ins or outs:
                return _retry(ins, outs)
        call = Ioctl(cmd=arg.cmd, arg=arg.arg, data=data, out_size=arg.out_size)
        try:
            result, out = self.device.ioctl(req, self._handle_of(arg.fh), call)
        except IoctlRetry as retry:
            if not unrestricted:
                raise OSError(errno.EIO, "pointer ioctl needs CUSE unrestricted mode") from None
            return _retry(retry.in_iovs, retry.out_iovs)
        if len(out) > arg.out_size:
            raise OSError(
                errno.EINVAL, f"ioctl {arg.cmd:#x} returns {len(out)} > {arg.out_size} bytes"
            )
        return bytes(F.fuse_ioctl_out(result=result)) + out

    def _init(self, hdr: F.fuse_in_header, body: bytes) -> None:
        try:
            arg = _parse(F.cuse_init_in, body)
        except _Malformed:
            self.reply_error(hdr.unique, errno.EINVAL)
            return
        if arg.major != F.FUSE_KERNEL_VERSION:
            log.error("/dev/%s: kernel speaks FUSE %d.%d", self.name, arg.major, arg.minor)
            self.reply_error(hdr.unique, errno.EPROTO)
            return
        out = F.cuse_init_out(
            major=F.FUSE_KERNEL_VERSION,
            minor=min(arg.minor, F.FUSE_KERNEL_MINOR_VERSION),
            flags=F.CUSE_UNRESTRICTED_IOCTL,
            max_read=MAX_READ,
            max_write=MAX_WRITE,
        )
        info = f"DEVNAME={self.name}\0".encode()
        self.reply(hdr.unique, bytes(out) + info)
        self.initialized.set()

    def _handle_of(self, fh: int) -> Any:
        with self._lock:
            if fh not in self._handles:
                raise _Malformed(f"unknown file handle {fh}")
            return self._handles[fh]

    # -- replies -----------------------------------------------------------------------------

    def reply(self, unique: int, payload: bytes, error: int = 0) -> None:
        hdr = F.fuse_out_header(
            len=ctypes.sizeof(F.fuse_out_header) + len(payload), error=error, unique=unique
        )
        try:
            os.write(self.fd, bytes(hdr) + payload)
        except OSError as exc:
            # ENOENT: the request was interrupted/aborted meanwhile; nothing waits for it.
            if exc.errno not in (errno.ENOENT, errno.EBADF, errno.ENODEV):
                log.warning("/dev/%s: reply to %d failed: %s", self.name, unique, exc)

    def reply_error(self, unique: int, err: int) -> None:
        self.reply(unique, b"", -err)

    def notify_poll(self, kh: int | None) -> None:
        """Tell the kernel a poll handle may have become ready (FUSE_NOTIFY_POLL)."""
        if kh is not None and self.fd >= 0:
            self.reply(0, bytes(F.fuse_notify_poll_wakeup_out(kh=kh)), F.FUSE_NOTIFY_POLL)


class _Malformed(Exception):
    pass


def _parse(t: type[ctypes.Structure], body: bytes) -> Any:
    if len(body) < ctypes.sizeof(t):
        raise _Malformed(f"{t.__name__} needs {ctypes.sizeof(t)} bytes, got {len(body)}")
    return t.from_buffer_copy(body)


def _retry(ins: Sequence[tuple[int, int]], outs: Sequence[tuple[int, int]]) -> bytes:
    if len(ins) + len(outs) > F.FUSE_IOCTL_MAX_IOV:
        raise OSError(errno.ENOMEM, "too many ioctl iovecs")
    head = F.fuse_ioctl_out(flags=F.FUSE_IOCTL_RETRY, in_iovs=len(ins), out_iovs=len(outs))
    iovs = b"".join(bytes(F.fuse_ioctl_iovec(base=b, len=n)) for b, n in (*ins, *outs))
    return bytes(head) + iovs


@contextlib.contextmanager
def serve(name: str, device: CharDevice, **kw: Any) -> Any:
    """``with serve("edu0", dev):`` — /dev/edu0 exists inside the block."""
    with CuseServer(name, device, **kw) as server:
        yield server
