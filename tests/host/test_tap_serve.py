"""The TAP frontend's serving loop against an in-memory NIC, through a socketpair.

A ``SOCK_SEQPACKET`` socketpair behaves as a TAP fd does (one read, one frame; one write,
one frame), so the loop runs unchanged without CAP_NET_ADMIN: the test holds the "kernel"
end, :class:`FakeNic` plays a NIC with a small transmit ring that completes only when told.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import pytest

from udrv.frontends.tap import HDR_DATA_VALID, HDR_NONE, FramePort, ServeStats, serve
from udrv.kernel import tun as T
from udrv.net import Frame, Link, Nic, NicStats, Offload, TxOffload


class FakeNic(Nic):
    """A NIC whose transmit ring holds ``ring`` frames until :meth:`complete`."""

    def __init__(self, ring: int = 4, offloads: Offload = Offload.NONE) -> None:
        self.name, self.mac, self.mtu, self.stats = (
            "fake NIC",
            bytes.fromhex("020000000001"),
            1500,
            NicStats(),
        )
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lock = threading.Lock()
        self.ring = ring
        self.in_ring: list[bytes] = []  # queued, not yet sent
        self.wire: list[bytes] = []  # sent, in order
        self.rx: deque[bytes] = deque()
        self.up = True
        self.offers = 0  # tx_batch calls
        self.offloads = offloads
        self.tx_offloads: list[TxOffload | None] = []  # per frame taken, as offered
        self.rx_valid: deque[bool] = deque()  # the checksum verdict of each frame in rx
        self.last_valid: list[bool] = []

    def _event(self) -> None:
        os.eventfd_write(self.efd, 1)

    # the test's side: what the device does
    def complete(self) -> None:
        with self.lock:
            self.wire += self.in_ring
            self.in_ring = []
        self._event()

    def deliver(self, frame: bytes, csum_valid: bool = False) -> None:
        with self.lock:
            self.rx.append(frame)
            self.rx_valid.append(csum_valid)
        self._event()

    def set_link(self, up: bool) -> None:
        self.up = up
        self._event()

    # the Nic interface
    def rx_batch(self, max_frames: int = 64) -> list[memoryview]:
        with self.lock:
            n = min(max_frames, len(self.rx))
            self.last_valid = [self.rx_valid.popleft() for _ in range(n)]
            return [memoryview(self.rx.popleft()) for _ in range(n)]

    def rx_csum_valid(self) -> list[bool]:
        return self.last_valid

    def tx_batch(
        self, frames: Sequence[Frame], offloads: Sequence[TxOffload | None] | None = None
    ) -> int:
        with self.lock:
            self.offers += 1
            take = frames[: self.ring - len(self.in_ring)]
            self.in_ring += [bytes(f) for f in take]
            self.tx_offloads += list(offloads[: len(take)]) if offloads else [None] * len(take)
            return len(take)

    def link(self) -> Link:
        return Link(self.up, 1000, True) if self.up else Link(False)

    def fileno(self) -> int:
        return self.efd

    def service(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.efd)


class SocketPort(FramePort):
    """The loop's end of a SOCK_SEQPACKET pair; records the carrier it is given."""

    def __init__(self, sock: socket.socket, vnet_hdr: bool = False) -> None:
        sock.setblocking(False)
        super().__init__(sock.detach(), "sock0", vnet_hdr=vnet_hdr)
        self.carrier: list[bool] = []

    def set_carrier(self, up: bool) -> None:
        self.carrier.append(up)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Served:
    def __init__(self, nic: FakeNic, vnet_hdr: bool = False) -> None:
        self.nic = nic
        kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kernel = kernel
        self.kernel.settimeout(5)
        self.port = SocketPort(ours, vnet_hdr)
        self.stop = threading.Event()
        self.result: ServeStats | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        self.result = serve(self.nic, self.port, self.stop, tx_batch=8)

    def finish(self) -> ServeStats:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        assert self.result is not None
        return self.result

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.kernel.close()
        self.port.close()
        self.nic.close()


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    s = Served(FakeNic(ring=getattr(request, "param", 4)))
    yield s
    s.close()


def frames(n: int, size: int = 60) -> list[bytes]:
    return [bytes([i]) * size for i in range(n)]


def test_frames_flow_both_ways_and_the_carrier_follows_the_link(served: Served) -> None:
    sent = frames(3)
    for f in sent:
        served.kernel.send(f)
    wait_for(lambda: len(served.nic.in_ring) == 3, "3 frames in the TX ring")
    served.nic.complete()
    assert served.nic.wire == sent
    received = [b"\xaa" * 64, b"\xbb" * 1514]
    for f in received:
        served.nic.deliver(f)
    assert [served.kernel.recv(4096) for _ in received] == received
    stats = served.finish()
    assert (stats.to_nic, stats.to_kernel, dict(stats.dropped)) == (3, 2, {})
    assert served.port.carrier == [True]
    # the 3 frames came in 1 to 3 reads; the NIC's events (completion, delivery) woke it too
    assert 1 <= stats.port_batches <= 3 and stats.wakeups >= stats.port_batches + 1
    assert f"port_batches={stats.port_batches}" in stats.summary()


def test_full_tx_ring_backs_off_and_loses_nothing(served: Served) -> None:
    """10 frames into a 4-frame ring: the loop keeps the 6 it cannot place, waits for
    completions, and every frame goes out once, in order."""
    sent = frames(10)
    for f in sent:
        served.kernel.send(f)
    wait_for(lambda: len(served.nic.in_ring) == 4, "a full TX ring")
    offers = served.nic.offers
    time.sleep(0.1)  # the ring stays full: the loop must wait, not drop
    assert served.nic.wire == [] and len(served.nic.in_ring) == 4
    # it backs off rather than spinning: a retry per millisecond at most, not thousands
    assert served.nic.offers - offers < 200
    for _ in range(3):
        served.nic.complete()
        wait_for(lambda: served.nic.in_ring or len(served.nic.wire) == 10, "the next frames")
    served.nic.complete()
    assert served.nic.wire == sent
    stats = served.finish()
    assert stats.to_nic == 10 and not stats.dropped and stats.tx_ring_full > 0


def test_frames_waiting_when_the_link_goes_down_are_counted(served: Served) -> None:
    for f in frames(7):
        served.kernel.send(f)
    wait_for(lambda: len(served.nic.in_ring) == 4, "a full TX ring")
    served.nic.set_link(False)
    wait_for(lambda: served.port.carrier == [True, False], "carrier off")
    served.nic.set_link(True)
    wait_for(lambda: served.port.carrier == [True, False, True], "carrier on")
    stats = served.finish()
    assert stats.dropped == {"link_down": 3}
    assert stats.to_nic == 4


def test_frames_the_kernel_refuses_are_counted_by_errno(served: Served) -> None:
    served.kernel.close()  # the kernel end goes away: writes fail with EPIPE
    served.nic.deliver(b"\x01" * 60)
    served.nic.deliver(b"\x02" * 60)
    wait_for(lambda: served.port.dropped["EPIPE"] == 2, "2 refused frames")
    assert served.finish().to_kernel == 2


def vnet_hdr(
    flags: int = 0, gso: int = 0, gso_size: int = 0, start: int = 0, off: int = 0
) -> bytes:
    """A struct virtio_net_hdr as the kernel writes it (hdr_len is a hint the loop ignores)."""
    return bytes(T.virtio_net_hdr(flags, gso, 54, gso_size, start, off))


def test_offloads_from_the_virtio_net_hdr_reach_the_nic_and_checksum_verdicts_go_back() -> None:
    """A TAP with IFF_VNET_HDR: each frame from the kernel starts with a virtio_net_hdr. A
    TCPv4 super-frame and a checksum-partial frame reach the NIC with their TxOffload, a
    plain one with None, an unsupported GSO kind (UDP fragmentation) is dropped and counted.
    Frames to the kernel get a header: DATA_VALID exactly where the NIC verified the sum."""
    s = Served(FakeNic(ring=16, offloads=Offload.TX_CSUM | Offload.TSO4 | Offload.RX_CSUM),
               vnet_hdr=True)  # fmt: skip
    try:
        tso, csum, plain, ufo = b"T" * 9000, b"C" * 100, b"P" * 60, b"U" * 3000
        s.kernel.send(vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_TCPV4,
                               1448, 34, 16) + tso)  # fmt: skip
        s.kernel.send(vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6) + csum)
        s.kernel.send(vnet_hdr() + plain)
        s.kernel.send(vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_UDP,
                               1472, 34, 6) + ufo)  # fmt: skip
        wait_for(lambda: len(s.nic.in_ring) == 3, "3 frames in the TX ring")
        assert s.nic.in_ring == [tso, csum, plain]
        assert s.nic.tx_offloads == [TxOffload(34, 16, 1448), TxOffload(34, 6, 0), None]
        assert s.port.dropped == {"gso_type": 1}
        s.nic.deliver(b"\x01" * 60, csum_valid=True)
        s.nic.deliver(b"\x02" * 60, csum_valid=False)
        got = [s.kernel.recv(4096) for _ in range(2)]
        assert got == [HDR_DATA_VALID + b"\x01" * 60, HDR_NONE + b"\x02" * 60]
        assert HDR_DATA_VALID[0] == T.VIRTIO_NET_HDR_F_DATA_VALID and len(HDR_NONE) == 10
    finally:
        s.close()


def test_without_vnet_hdr_frames_go_through_untouched() -> None:
    s = Served(FakeNic(ring=16, offloads=Offload.RX_CSUM))
    try:
        s.kernel.send(b"\x00" * 60)  # a zero first byte is not a header here
        wait_for(lambda: len(s.nic.in_ring) == 1, "the frame in the TX ring")
        assert s.nic.in_ring == [b"\x00" * 60] and s.nic.tx_offloads == [None]
        s.nic.deliver(b"\x03" * 60, csum_valid=True)
        assert s.kernel.recv(4096) == b"\x03" * 60
    finally:
        s.close()


def test_each_distinct_header_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_batch parses a header it has seen before from memory (a UDP stream's datagrams
    all carry the same one); a super-frame's header (hdr_len varies per frame) is parsed
    every time; what each frame gets is what parsing it would give."""
    import udrv.frontends.tap as tap

    calls: list[bytes] = []
    parse = tap.parse_vnet_hdr

    def counting(data: bytes | bytearray | memoryview) -> TxOffload | str | None:
        calls.append(bytes(data[: tap.HDR_LEN]))
        return parse(data)

    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    port = SocketPort(ours, vnet_hdr=True)
    monkeypatch.setattr(tap, "parse_vnet_hdr", counting)
    try:
        udp = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6)
        tcp = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 16)
        gso = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
        ufo = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_UDP, 1472, 34, 6)
        sent = [udp, udp, tcp, gso, udp, gso, vnet_hdr(), ufo, udp, ufo]
        for i, h in enumerate(sent):
            kernel.send(h + bytes([i]) * 60)
        frames, offs = port.read_batch(64)
        assert [bytes(f) for f in frames] == [bytes([i]) * 60 for i in (0, 1, 2, 3, 4, 5, 6, 8)]
        u, t, g = TxOffload(34, 6, 0), TxOffload(34, 16, 0), TxOffload(34, 16, 1448)
        assert offs == [u, u, t, g, u, g, None, u]
        assert port.dropped == {"gso_type": 2} and port.rx_frames == 10
        assert calls == [udp, tcp, gso, gso, vnet_hdr(), ufo]
        kernel.send(udp + b"\x07" * 60)
        assert port.read_batch(64)[1] == [u] and len(calls) == 6
        kernel.send(vnet_hdr() + b"\x08" * 60)
        assert port.read_batch(64) == ([memoryview(b"\x08" * 60)], None)  # no offload at all
    finally:
        kernel.close()
        port.close()


def test_a_batch_with_one_header_is_cut_and_judged_as_a_whole() -> None:
    """Batches whose frames all carry the same header: every frame gets its offload, frames
    past a buffer's size (super-frames) come out whole too, and a header asking for what the
    NIC cannot do drops the whole batch, counted per frame."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    port = SocketPort(ours, vnet_hdr=True)
    try:
        gso = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
        big = [bytes([i]) * 9000 for i in range(3)]
        for f in big:
            kernel.send(gso + f)
        frames, offs = port.read_batch(64)
        assert [bytes(f) for f in frames] == big and offs == [TxOffload(34, 16, 1448)] * 3
        udp = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6)
        small = [bytes([i]) * 60 for i in range(5)]
        for f in small:
            kernel.send(udp + f)
        frames, offs = port.read_batch(64)
        assert [bytes(f) for f in frames] == small and offs == [TxOffload(34, 6, 0)] * 5
        ufo = vnet_hdr(T.VIRTIO_NET_HDR_F_NEEDS_CSUM, T.VIRTIO_NET_HDR_GSO_UDP, 1472, 34, 6)
        for f in small[:4]:
            kernel.send(ufo + f)
        assert port.read_batch(64) == ([], None)
        assert port.dropped == {"gso_type": 4} and port.rx_frames == 12
    finally:
        kernel.close()
        port.close()
