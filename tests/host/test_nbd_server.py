"""The NBD server with real clients (nbdinfo, nbdcopy, qemu-img) and with hostile bytes."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udrv.block.ram import RamDisk
from udrv.frontends.nbd import NbdServer
from udrv.kernel import nbd as N

SIZE = 8 << 20
needs_tools = pytest.mark.skipif(
    not (shutil.which("nbdinfo") and shutil.which("nbdcopy") and shutil.which("qemu-img")),
    reason="needs nbdinfo/nbdcopy (apt install libnbd-bin) and qemu-img (qemu-utils)",
)


@pytest.fixture
def disk() -> Iterator[RamDisk]:
    d = RamDisk(SIZE)
    yield d
    d.close()


@pytest.fixture
def server(disk: RamDisk, tmp_path: Path) -> Iterator[NbdServer]:
    with NbdServer(disk, str(tmp_path / "nbd.sock")) as s:
        yield s


class Client:
    """A minimal fixed-newstyle client speaking raw bytes (for what real clients never send)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise EOFError(f"server closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def greet(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (N.NBDMAGIC, N.IHAVEOPT)
        assert flags & N.NBD_FLAG_FIXED_NEWSTYLE and flags & N.NBD_FLAG_NO_ZEROES
        self.s.sendall(struct.pack(">I", N.NBD_FLAG_C_FIXED_NEWSTYLE | N.NBD_FLAG_C_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; the replies up to the final one (ACK or an error)."""
        self.s.sendall(N.OPTION.pack(N.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rep, n = N.OPTION_REPLY.unpack(self.recv(N.OPTION_REPLY.size))
            assert magic == N.OPTION_REPLY_MAGIC and o == opt
            replies.append((rep, self.recv(n)))
            if rep == N.NBD_REP_ACK or rep & N.NBD_REP_ERR:
                return replies

    def go(self, name: str = "", infos: tuple[int, ...] = ()) -> list[tuple[int, bytes]]:
        raw = name.encode()
        data = (
            struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        )
        return self.option(N.NBD_OPT_GO, data)

    def request(self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0,
                cookie: int = 7) -> tuple[int, bytes]:  # fmt: skip
        self.s.sendall(
            N.REQUEST.pack(N.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data
        )
        magic, error, got = N.REPLY.unpack(self.recv(N.REPLY.size))
        assert magic == N.NBD_SIMPLE_REPLY_MAGIC and got == cookie
        payload = self.recv(length) if cmd == N.NBD_CMD_READ and error == 0 else b""
        return error, payload

    def close(self) -> None:
        self.s.close()


def connected(server: NbdServer) -> Client:
    c = Client(str(server.address))
    c.greet()
    replies = c.go(infos=(N.NBD_INFO_BLOCK_SIZE,))
    assert replies[-1][0] == N.NBD_REP_ACK
    return c


@needs_tools
def test_nbdinfo_sees_size_flags_and_block_sizes(server: NbdServer) -> None:
    import json

    info = json.loads(subprocess.run(["nbdinfo", "--json", server.uri], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    (export,) = info["exports"]
    assert export["export-size"] == SIZE and info["protocol"] == "newstyle-fixed"
    assert export["block_size_minimum"] == 512 and export["block_size_maximum"] == 512 * 1024
    assert export["can_flush"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] and not export["is_read_only"]


@needs_tools
def test_nbdcopy_and_qemu_img_over_tcp(disk: RamDisk, tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    src.write_bytes(os.urandom(SIZE))
    with NbdServer(disk, ("127.0.0.1", 0)) as s:
        assert s.uri.startswith("nbd://127.0.0.1:")
        subprocess.run(["nbdcopy", str(src), s.uri], check=True)
        subprocess.run(["nbdcopy", s.uri, str(tmp_path / "out.img")], check=True)
        assert (tmp_path / "out.img").read_bytes() == src.read_bytes()
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), s.uri],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0 and "identical" in r.stdout
    assert disk._view[:SIZE] == src.read_bytes()


def test_requests_errors_and_unaligned_io(server: NbdServer, disk: RamDisk) -> None:
    c = connected(server)
    assert c.request(N.NBD_CMD_WRITE, 1, 3, b"abc") == (0, b"")  # read-modify-write
    assert c.request(N.NBD_CMD_READ, 0, 5) == (0, b"\0abc\0")
    assert c.request(N.NBD_CMD_WRITE, 4096, 4096, b"x" * 4096, flags=N.NBD_CMD_FLAG_FUA)[0] == 0
    assert c.request(N.NBD_CMD_READ, SIZE - 512, 1024)[0] == N.NBD_EINVAL  # past the end
    assert c.request(N.NBD_CMD_WRITE, SIZE, 512, bytes(512))[0] == N.NBD_EINVAL
    assert c.request(N.NBD_CMD_FLUSH, 0, 0) == (0, b"")
    assert c.request(N.NBD_CMD_TRIM, 4096, 4096) == (0, b"")
    assert c.request(N.NBD_CMD_READ, 4096, 4096) == (0, bytes(4096))
    c.request(N.NBD_CMD_WRITE, 8192, 512, b"y" * 512)
    assert c.request(N.NBD_CMD_WRITE_ZEROES, 8192, 512) == (0, b"")
    assert c.request(N.NBD_CMD_READ, 8192, 512) == (0, bytes(512))
    assert c.request(9, 0, 0)[0] == N.NBD_EINVAL  # unknown command
    assert c.request(N.NBD_CMD_READ, 0, 64 << 20)[0] == N.NBD_EINVAL  # over MAX_REQUEST
    c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_DISC, 1, 0, 0))
    assert c.s.recv(1) == b""  # DISC: the server closes
    c.close()


def test_options_list_info_unknown_abort(server: NbdServer) -> None:
    c = Client(str(server.address))
    c.greet()
    replies = c.option(N.NBD_OPT_LIST)
    assert replies[0][0] == N.NBD_REP_SERVER and replies[0][1] == struct.pack(">I", 0)
    assert c.option(N.NBD_OPT_STRUCTURED_REPLY, b"x")[-1][0] == N.NBD_REP_ERR_INVALID
    assert c.option(N.NBD_OPT_STARTTLS)[-1][0] == N.NBD_REP_ERR_UNSUP  # no TLS configured
    assert c.option(99, b"xyz")[-1][0] == N.NBD_REP_ERR_UNSUP
    assert c.option(N.NBD_OPT_GO, b"\0\0")[-1][0] == N.NBD_REP_ERR_INVALID  # truncated payload
    raw = struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)
    assert c.option(N.NBD_OPT_INFO, raw)[-1][0] == N.NBD_REP_ERR_UNKNOWN
    info = c.option(N.NBD_OPT_INFO, struct.pack(">IH", 0, 0))
    (rep, data), ack = info[0], info[-1]
    assert rep == N.NBD_REP_INFO and struct.unpack(">HQH", data)[:2] == (N.NBD_INFO_EXPORT, SIZE)
    assert ack[0] == N.NBD_REP_ACK
    assert c.option(N.NBD_OPT_ABORT)[-1][0] == N.NBD_REP_ACK
    assert c.s.recv(1) == b""
    c.close()


def test_read_only_export_refuses_writes(disk: RamDisk, tmp_path: Path) -> None:
    with NbdServer(disk, str(tmp_path / "ro.sock"), read_only=True) as s:
        c = connected(s)
        assert c.request(N.NBD_CMD_WRITE, 0, 512, bytes(512))[0] == N.NBD_EPERM
        assert c.request(N.NBD_CMD_TRIM, 0, 512)[0] == N.NBD_EPERM
        assert c.request(N.NBD_CMD_READ, 0, 512)[0] == 0
        c.close()


def _send_garbage(path: str, prefix_handshake: bool, garbage: bytes) -> None:
    c = Client(path)
    try:
        if prefix_handshake:
            c.greet()
            c.go()
        c.s.sendall(garbage)
        c.s.shutdown(socket.SHUT_WR)
        while c.s.recv(65536):  # the server answers or closes; never hangs (timeout 10 s)
            pass
    except (ConnectionError, EOFError):
        pass
    finally:
        c.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=200), after_handshake=st.booleans())
def test_fuzzed_bytes_never_break_the_server(
    server: NbdServer, garbage: bytes, after_handshake: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        _send_garbage(str(server.address), after_handshake, garbage)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert server._thread is not None and server._thread.is_alive()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    magic=st.sampled_from([N.NBD_REQUEST_MAGIC, 0, 0xFFFFFFFF]),
    cmd=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    tail=st.binary(max_size=64),
)
def test_mutated_requests_then_a_good_client(
    server: NbdServer, magic: int, cmd: int, flags: int, offset: int, length: int, tail: bytes
) -> None:
    """Any header (overflowing offsets, huge lengths, bad magic) gets a reply or a close;
    a well-behaved client is served right after."""
    _send_garbage(str(server.address), True,
                  N.REQUEST.pack(magic, flags, cmd, 1, offset, length) + tail)  # fmt: skip
    c = connected(server)
    assert c.request(N.NBD_CMD_READ, 0, 512)[0] == 0
    c.close()
