"""The vfio-user server against raw messages: errors are replies, never crashes or hangs."""

from __future__ import annotations

import errno
import os
import socket
import struct
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udrv.errors import VfioUserError
from udrv.kernel import vfio as V
from udrv.models.edu import EduModel
from udrv.vfio_user import protocol as P
from udrv.vfio_user.client import Client
from udrv.vfio_user.server import Server

from .vfio_user_helpers import served


class Raw:
    """A hand-driven client socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(3.0)
        self.sock.connect(path)

    def send(self, command: int, payload: bytes = b"", *, msg_id: int = 7, flags: int = 0,
             size: int | None = None, fds: list[int] | None = None) -> None:  # fmt: skip
        hdr = struct.pack(
            "<HHIII", msg_id, command, size if size is not None else 16 + len(payload), flags, 0
        )
        if fds:
            socket.send_fds(self.sock, [hdr + payload], fds)
        else:
            self.sock.sendall(hdr + payload)

    def recv(self) -> tuple[int, int, int, int, bytes]:
        hdr = self._exact(16)
        msg_id, command, size, flags, err = struct.unpack("<HHIII", hdr)
        return msg_id, command, flags, err, self._exact(size - 16)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def negotiate(self) -> None:
        self.send(P.Command.VERSION, bytes(P.vfio_user_version(0, 1)) + b'{"capabilities":{}}\0')
        _, _, flags, _, payload = self.recv()
        assert flags == P.TYPE_REPLY
        assert json_caps(payload)["max_data_xfer_size"] == 1 << 20

    def close(self) -> None:
        self.sock.close()


def json_caps(payload: bytes) -> dict[str, int]:
    import json

    return dict(json.loads(payload[4:].rstrip(b"\0"))["capabilities"])


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    with served(EduModel(), timeout=0.5) as s:
        yield s


@pytest.fixture
def raw(server: tuple[Server, str]) -> Iterator[Raw]:
    r = Raw(server[1])
    r.negotiate()
    yield r
    r.close()


def expect_error(raw: Raw, err: int) -> None:
    _, _, flags, e, payload = raw.recv()
    assert flags == P.TYPE_REPLY | P.FLAG_ERROR and e == err and payload == b""


def test_version_must_come_first(server: tuple[Server, str]) -> None:
    r = Raw(server[1])
    r.send(P.Command.DEVICE_GET_INFO, bytes(P.vfio_user_device_info(argsz=16)))
    expect_error(r, errno.EINVAL)
    r.negotiate()  # and then the session goes on
    r.close()


def test_version_minor_is_lowered_and_major_checked(server: tuple[Server, str]) -> None:
    r = Raw(server[1])
    r.send(P.Command.VERSION, bytes(P.vfio_user_version(1, 0)))
    expect_error(r, errno.ENOTSUP)
    r.send(P.Command.VERSION, bytes(P.vfio_user_version(0, 9)))
    _, _, _, _, payload = r.recv()
    assert struct.unpack_from("<HH", payload) == (0, 1)
    r.close()


def test_unknown_command_is_enotsup(raw: Raw) -> None:
    raw.send(99, b"xx", msg_id=1234)
    msg_id, command, flags, err, _ = raw.recv()
    assert (msg_id, command, err) == (1234, 99, errno.ENOTSUP) and flags & P.FLAG_ERROR


def test_device_info_and_regions(raw: Raw) -> None:
    raw.send(P.Command.DEVICE_GET_INFO, bytes(P.vfio_user_device_info(argsz=16)))
    info = P.vfio_user_device_info.from_buffer_copy(raw.recv()[4])
    assert info.flags == V.VFIO_DEVICE_FLAGS_RESET | V.VFIO_DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)
    raw.send(P.Command.DEVICE_GET_REGION_INFO, bytes(P.vfio_region_info(argsz=32, index=9)))
    expect_error(raw, errno.EINVAL)
    raw.send(P.Command.DEVICE_GET_REGION_INFO, bytes(P.vfio_region_info(argsz=8, index=0)))
    expect_error(raw, errno.EINVAL)


def test_region_access_out_of_range(raw: Raw) -> None:
    acc = P.vfio_user_region_access(offset=(1 << 20) - 2, region=0, count=4)
    raw.send(P.Command.REGION_READ, bytes(acc))
    expect_error(raw, errno.EINVAL)
    acc = P.vfio_user_region_access(offset=0, region=0, count=4)
    raw.send(P.Command.REGION_WRITE, bytes(acc) + b"\0\0")  # count says 4, 2 bytes came
    expect_error(raw, errno.EINVAL)


def test_no_reply_flag_is_honoured(raw: Raw) -> None:
    acc = P.vfio_user_region_access(offset=4, region=0, count=4)
    raw.send(
        P.Command.REGION_WRITE, bytes(acc) + struct.pack("<I", 1), flags=P.FLAG_NO_REPLY, msg_id=1
    )
    raw.send(P.Command.REGION_READ, bytes(acc), msg_id=2)
    msg_id, _, _, _, payload = raw.recv()  # the first has no reply: this is the read's
    assert msg_id == 2 and payload[16:] == struct.pack("<I", 0xFFFF_FFFE)


def test_dma_map_overlap_and_unmap(raw: Raw) -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 8192)
    m = P.vfio_user_dma_map(argsz=32, flags=3, offset=0, addr=0x10000, size=8192)
    raw.send(P.Command.DMA_MAP, bytes(m), fds=[fd])
    assert raw.recv()[2] == P.TYPE_REPLY
    m2 = P.vfio_user_dma_map(argsz=32, flags=3, offset=0, addr=0x11000, size=4096)
    raw.send(P.Command.DMA_MAP, bytes(m2), fds=[fd])
    expect_error(raw, errno.EEXIST)  # "A command to map over an existing region must be failed"
    big = P.vfio_user_dma_map(argsz=32, flags=3, offset=0, addr=0x40000, size=1 << 20)
    raw.send(P.Command.DMA_MAP, bytes(big), fds=[fd])
    expect_error(raw, errno.EINVAL)  # the memfd is too short: mapping it would SIGBUS later
    u = P.vfio_user_dma_unmap(argsz=24, addr=0x10000, size=4096)
    raw.send(P.Command.DMA_UNMAP, bytes(u))
    expect_error(raw, errno.ENOENT)  # must match a mapping exactly
    u = P.vfio_user_dma_unmap(argsz=24, addr=0x10000, size=8192)
    raw.send(P.Command.DMA_UNMAP, bytes(u))
    _, _, flags, _, payload = raw.recv()
    assert flags == P.TYPE_REPLY and payload == bytes(u)  # "responds with the original DMA entry"
    os.close(fd)


def test_set_irqs_validation(raw: Raw) -> None:
    s = P.vfio_irq_set(argsz=20, flags=V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, index=1, count=1)  # fmt: skip
    raw.send(P.Command.DEVICE_SET_IRQS, bytes(s))
    expect_error(raw, errno.EINVAL)  # two DATA flags
    s = P.vfio_irq_set(argsz=20, flags=V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, index=1, start=0, count=4)  # fmt: skip
    raw.send(P.Command.DEVICE_SET_IRQS, bytes(s))
    expect_error(raw, errno.EINVAL)  # edu has one MSI vector
    s = P.vfio_irq_set(argsz=20, flags=V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK, index=1, count=1)  # fmt: skip
    raw.send(P.Command.DEVICE_SET_IRQS, bytes(s))
    expect_error(raw, errno.ENOTSUP)  # MASK/UNMASK: INTx only


def test_client_triggers_an_irq_itself(server: tuple[Server, str]) -> None:
    with Client(server[1]) as c:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        c.set_irqs(1, V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, fds=[fd])
        c.set_irqs(1, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1)
        assert os.eventfd_read(fd) == 1
        os.close(fd)


def test_oversized_message_ends_the_session_not_the_server(server: tuple[Server, str]) -> None:
    r = Raw(server[1])
    r.negotiate()
    r.send(P.Command.REGION_WRITE, b"", size=1 << 30)
    with pytest.raises(ConnectionError):
        r.recv()
    r.close()
    with Client(server[1]) as c:  # the server serves the next client
        assert c.region_read(0, 0, 4) == struct.pack("<I", 0x010000ED)


def test_stalled_message_times_out(server: tuple[Server, str]) -> None:
    r = Raw(server[1])
    r.negotiate()
    r.send(P.Command.REGION_READ, b"\0" * 4, size=32)  # promises 16 payload bytes, sends 4
    with pytest.raises(ConnectionError):
        r.recv()  # the server gave up after its 0.5 s timeout and closed
    r.close()


def test_stale_socket_is_replaced_live_one_refused() -> None:
    with (
        served(EduModel()) as (_, path),
        pytest.raises(VfioUserError, match="another server is listening"),
    ):
        Server(EduModel(), path)
    path2 = tempfile.mkdtemp(prefix="vu", dir="/tmp") + "/stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(path2)
    s.close()  # a socket file nobody listens on
    Server(EduModel(), path2).stop()
    assert not os.path.exists(path2)


commands = st.sampled_from([c.value for c in P.Command] + [0, 14, 200, 0xFFFF])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    msgs=st.lists(
        st.tuples(commands, st.binary(max_size=64), st.integers(0, 0x3F)), min_size=1, max_size=6
    )
)
def test_fuzz_malformed_messages(raw: Raw, msgs: list[tuple[int, bytes, int]]) -> None:
    """Random commands, payloads and flags: every one gets a reply (or none when No_reply),
    the server stays up and answers a well-formed read afterwards."""
    expected = 0
    for i, (command, payload, flags) in enumerate(msgs):
        flags &= ~P.FLAG_TYPE_MASK  # commands only: replies are dropped by design
        raw.send(command, payload, msg_id=i, flags=flags)
        if not flags & P.FLAG_NO_REPLY:
            expected += 1
    seen = [raw.recv() for _ in range(expected)]
    assert all(flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY for _, _, flags, _, _ in seen)
    acc = P.vfio_user_region_access(offset=0, region=0, count=4)
    raw.send(P.Command.REGION_READ, bytes(acc), msg_id=999)
    msg_id, _, _, _, payload = raw.recv()
    assert msg_id == 999 and payload[16:] == struct.pack("<I", 0x010000ED)


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(min_size=1, max_size=200))
def test_fuzz_garbage_stream(blob: bytes) -> None:
    """Arbitrary bytes: the server answers or drops the connection, within its timeout."""
    with served(EduModel(), timeout=0.2) as (_, path):
        r = Raw(path)
        r.sock.sendall(blob)
        r.sock.shutdown(socket.SHUT_WR)
        r.sock.settimeout(3.0)
        try:
            while r.sock.recv(4096):  # until the server closes: it must, not hang
                pass
        except ConnectionResetError:
            pass  # closed with our bytes unread: closed all the same
        r.close()
        with Client(path) as c:
            assert c.region_read(0, 0, 4) == struct.pack("<I", 0x010000ED)


def test_a_model_bug_is_an_eio_reply_not_a_dead_server() -> None:
    class Buggy(EduModel):
        def mmio_read(self, offset: int, width: int) -> int:
            if offset == 0x10:
                raise ZeroDivisionError("model bug")
            return super().mmio_read(offset, width)

    model = Buggy()
    with served(model) as (_, path), Client(path) as c:
        with pytest.raises(VfioUserError) as exc:
            c.region_read(0, 0x10, 4)
        assert exc.value.errno == errno.EIO
        assert "ZeroDivisionError" in model.faults[-1]
        assert c.region_read(0, 0, 4) == struct.pack("<I", 0x010000ED)  # still serving
