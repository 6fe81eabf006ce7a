"""The CUSE server's protocol handling, with the test playing the kernel over a socket pair."""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udrv.frontends.cuse import CharDevice, CuseServer, Ioctl, IoctlRetry, Request
from udrv.kernel import fuse as F

IOWR_ADD1 = (3 << 30) | (8 << 16) | (ord("E") << 8) | 1
IO_PTR = (ord("E") << 8) | 2  # no size encoded: the handler asks for the memory itself


class Echo(CharDevice):
    def __init__(self) -> None:
        self.data = b""

    def write(self, req: Request, handle: object, data: bytes, offset: int) -> int:
        self.data = data
        return len(data)

    def read(self, req: Request, handle: object, size: int, offset: int) -> bytes:
        return self.data[:size]

    def ioctl(self, req: Request, handle: object, call: Ioctl) -> tuple[int, bytes]:
        if call.cmd == IOWR_ADD1:
            (v,) = struct.unpack("<Q", call.data)
            return 0, struct.pack("<Q", v + 1)
        if call.cmd == IO_PTR:
            if not call.data:  # first: read the 16-byte {ptr, len} struct at arg
                raise IoctlRetry([(call.arg, 16)], [])
            ptr, n = struct.unpack_from("<QQ", call.data)
            if len(call.data) == 16:  # second: the buffer it points to
                raise IoctlRetry([(call.arg, 16), (ptr, n)], [(ptr, n)])
            return 7, call.data[16:].upper()
        raise OSError(errno.ENOTTY, "no")


class Kernel:
    """Plays /dev/cuse's kernel side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.unique = sock, 100

    def send(self, opcode: int, body: bytes, unique: int | None = None) -> int:
        if unique is None:
            self.unique += 1
            unique = self.unique
        hdr = F.fuse_in_header(len=40 + len(body), opcode=opcode, unique=unique, pid=1)
        self.sock.send(bytes(hdr) + body)
        return unique

    def recv(self) -> tuple[F.fuse_out_header, bytes]:
        msg = self.sock.recv(1 << 20)
        return F.fuse_out_header.from_buffer_copy(msg), msg[16:]

    def call(self, opcode: int, body: bytes) -> tuple[int, bytes]:
        u = self.send(opcode, body)
        hdr, payload = self.recv()
        assert hdr.unique == u and hdr.len == 16 + len(payload)
        return hdr.error, payload


@pytest.fixture
def kernel() -> Iterator[tuple[Kernel, CuseServer]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = CuseServer("echo0", Echo(), fd=a.detach(), workers=4)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    k = Kernel(b)
    err, payload = k.call(F.Opcode.CUSE_INIT, bytes(F.cuse_init_in(major=7, minor=38)))
    assert err == 0
    out = F.cuse_init_out.from_buffer_copy(payload)
    assert (out.major, out.flags & F.CUSE_UNRESTRICTED_IOCTL) == (7, 1)
    assert payload[ctypes.sizeof(out) :] == b"DEVNAME=echo0\0"
    yield k, server
    server.stop()
    b.close()


def _open(k: Kernel) -> int:
    err, payload = k.call(F.Opcode.FUSE_OPEN, bytes(F.fuse_open_in(flags=2)))
    assert err == 0
    return int(F.fuse_open_out.from_buffer_copy(payload).fh)


def test_open_write_read_release(kernel: tuple[Kernel, CuseServer]) -> None:
    k, _ = kernel
    fh = _open(k)
    err, out = k.call(F.Opcode.FUSE_WRITE, bytes(F.fuse_write_in(fh=fh, size=5)) + b"hello")
    assert err == 0 and F.fuse_write_out.from_buffer_copy(out).size == 5
    err, data = k.call(F.Opcode.FUSE_READ, bytes(F.fuse_read_in(fh=fh, size=3)))
    assert (err, data) == (0, b"hel")
    assert k.call(F.Opcode.FUSE_RELEASE, bytes(F.fuse_release_in(fh=fh))) == (0, b"")
    # The handle is gone: a read on it is rejected, the server survives.
    err, _ = k.call(F.Opcode.FUSE_READ, bytes(F.fuse_read_in(fh=fh, size=3)))
    assert err == -errno.EINVAL


def test_ioctl_retry_asks_for_the_ioc_sized_argument(kernel: tuple[Kernel, CuseServer]) -> None:
    k, _ = kernel
    fh = _open(k)
    first = F.fuse_ioctl_in(fh=fh, flags=F.FUSE_IOCTL_UNRESTRICTED, cmd=IOWR_ADD1, arg=0x7000)
    err, out = k.call(F.Opcode.FUSE_IOCTL, bytes(first))
    head = F.fuse_ioctl_out.from_buffer_copy(out)
    assert (err, head.flags, head.in_iovs, head.out_iovs) == (0, F.FUSE_IOCTL_RETRY, 1, 1)
    iovs = [F.fuse_ioctl_iovec.from_buffer_copy(out, 16 + 16 * i) for i in range(2)]
    assert [(v.base, v.len) for v in iovs] == [(0x7000, 8), (0x7000, 8)]
    second = F.fuse_ioctl_in(
        fh=fh, flags=first.flags, cmd=IOWR_ADD1, arg=0x7000, in_size=8, out_size=8
    )
    err, out = k.call(F.Opcode.FUSE_IOCTL, bytes(second) + struct.pack("<Q", 41))
    assert err == 0 and F.fuse_ioctl_out.from_buffer_copy(out).result == 0
    assert struct.unpack("<Q", out[16:]) == (42,)


def test_ioctl_pointer_argument_takes_two_retries(kernel: tuple[Kernel, CuseServer]) -> None:
    k, _ = kernel
    fh = _open(k)
    base = dict(fh=fh, flags=F.FUSE_IOCTL_UNRESTRICTED, cmd=IO_PTR, arg=0x1000)
    err, out = k.call(F.Opcode.FUSE_IOCTL, bytes(F.fuse_ioctl_in(**base)))
    assert err == 0 and F.fuse_ioctl_out.from_buffer_copy(out).in_iovs == 1
    desc = struct.pack("<QQ", 0x2000, 3)
    _, out = k.call(F.Opcode.FUSE_IOCTL, bytes(F.fuse_ioctl_in(**base, in_size=16)) + desc)
    head = F.fuse_ioctl_out.from_buffer_copy(out)
    assert (head.in_iovs, head.out_iovs) == (2, 1)
    last = F.fuse_ioctl_in(**base, in_size=19, out_size=3)
    _, out = k.call(F.Opcode.FUSE_IOCTL, bytes(last) + desc + b"abc")
    assert F.fuse_ioctl_out.from_buffer_copy(out).result == 7 and out[16:] == b"ABC"


def test_unknown_ioctl_and_opcode_are_errors(kernel: tuple[Kernel, CuseServer]) -> None:
    k, _ = kernel
    fh = _open(k)
    arg = F.fuse_ioctl_in(fh=fh, flags=F.FUSE_IOCTL_UNRESTRICTED, cmd=0x4242)
    assert k.call(F.Opcode.FUSE_IOCTL, bytes(arg))[0] == -errno.ENOTTY
    assert k.call(1, b"")[0] == -errno.ENOSYS  # FUSE_LOOKUP makes no sense for a char device


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    opcode=st.sampled_from([*list(F.Opcode), 0, 9999]),
    body=st.binary(max_size=96),
    bad_len=st.booleans(),
)
def test_malformed_requests_never_kill_the_server(
    kernel: tuple[Kernel, CuseServer], opcode: int, body: bytes, bad_len: bool
) -> None:
    k, server = kernel
    if opcode in (F.Opcode.CUSE_INIT, F.Opcode.FUSE_INTERRUPT):
        return  # re-initialising / interrupting are not request/response pairs
    hdr = F.fuse_in_header(len=(40 + len(body)) * (3 if bad_len else 1), opcode=opcode, unique=7)
    k.sock.send(bytes(hdr) + body)
    reply, _ = k.recv()
    assert reply.unique == 7 and reply.error <= 0
    # Still serving real requests afterwards.
    fh = _open(k)
    assert k.call(F.Opcode.FUSE_RELEASE, bytes(F.fuse_release_in(fh=fh)))[0] == 0
    assert server.fd >= 0
