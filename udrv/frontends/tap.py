"""TAP: a user-space NIC driver as a real Linux network interface.

``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` (linux/if_tun.h) gives a file descriptor on
which each read returns one Ethernet frame the kernel sends out of the interface, and each
write injects one frame as received. Address, MTU and state are set through rtnetlink
(pyroute2); the carrier follows the NIC's link through ``TUNSETCARRIER``.

Offloads: when the NIC can checksum and segment TCP itself (:class:`~udrv.net.Offload`), the
TAP is opened with ``IFF_VNET_HDR`` and told with ``TUNSETOFFLOAD`` what it may hand over:
the kernel then skips its software checksums and segmentation and gives one 64 KiB TCP
super-frame where it gave 44 frames of 1514 bytes, each with a ``struct virtio_net_hdr``
saying what is left to do (linux/virtio_net.h). Received frames carry the same header,
``VIRTIO_NET_HDR_F_DATA_VALID`` when the NIC verified their checksum.

:func:`serve` connects any :class:`~udrv.net.Nic` to a TAP interface: one thread, one loop
over the TAP fd and the NIC's event fd. It never drops a frame for want of room: while the
NIC's transmit ring is full it keeps the frames it read and stops reading the TAP (the
kernel's queue holds the rest) until completions free slots. What it does drop (frames the
kernel sent while the link was down, frames the kernel refused) it counts per reason.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

from udrv.errors import FrontendError
from udrv.kernel import tun as T
from udrv.kernel.ioctl import ioctl
from udrv.kernel.tun import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, IFNAMSIZ, TUNSETCARRIER, TUNSETIFF
from udrv.net.nic import Frame, Nic, Offload, TxOffload

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
MAX_FRAME = 0x10000 + 256  # a GSO super-frame: 64 KiB of IP packet plus the link header
HDR_LEN = T.VNET_HDR_LEN
HDR_NONE = bytes(T.virtio_net_hdr())  # nothing to do / nothing known
HDR_DATA_VALID = bytes(T.virtio_net_hdr(flags=T.VIRTIO_NET_HDR_F_DATA_VALID))
_GSO_OK = (T.VIRTIO_NET_HDR_GSO_NONE, T.VIRTIO_NET_HDR_GSO_TCPV4)
COPY_MAX = 2048  # bytes read up to which frames are cut off their header by a copy
PARSED_MAX = 64  # distinct headers remembered by FramePort.read_batch (one per flow kind)


def parse_vnet_hdr(data: bytes | bytearray | memoryview) -> TxOffload | str | None:
    """The offload a ``struct virtio_net_hdr`` at the start of ``data`` asks for: None
    (nothing to do), a :class:`TxOffload`, or the reason it cannot be done (``"gso_type"``:
    a GSO kind other than TCPv4, or GSO without a checksum to fill in).

    ``hdr_len`` is only a hint (Linux's virtio_net_hdr_from_skb puts the skb's linear length
    there, not the headers'), so it is not used: the NIC driver reads the header lengths
    from the headers themselves.
    """
    if not data[0] and not data[1]:  # flags, gso_type: the common case, no parsing
        return None
    h = T.virtio_net_hdr.from_buffer_copy(data)
    gso = h.gso_type & ~T.VIRTIO_NET_HDR_GSO_ECN
    if gso not in _GSO_OK or h.gso_type & T.VIRTIO_NET_HDR_GSO_ECN:
        return "gso_type"
    if not h.flags & T.VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return None if gso == T.VIRTIO_NET_HDR_GSO_NONE else "gso_type"
    return TxOffload(h.csum_start, h.csum_offset, h.gso_size if gso else 0)


class FramePort:
    """Frames through one non-blocking fd on which each read is one frame and each write one
    frame: a TAP, or (in tests) a ``SOCK_SEQPACKET`` socket. Counts what it could not deliver.

    With ``vnet_hdr``, every frame both ways starts with a ``struct virtio_net_hdr``
    (``IFF_VNET_HDR``): :meth:`read_batch` turns it into a :class:`TxOffload` per frame,
    :meth:`write_batch` writes one saying whether the checksum was verified.

    Args:
        fd: the fd (owned: closed by :meth:`close`).
        name: for messages.
        vnet_hdr: frames carry a virtio_net_hdr.
    """

    def __init__(self, fd: int, name: str, *, vnet_hdr: bool = False) -> None:
        self.fd, self.name = fd, name
        self.vnet_hdr = vnet_hdr
        self.rx_frames = self.tx_frames = 0  # read from / written to the fd
        # frames the kernel refused (per errno name) or that asked for an unknown offload
        self.dropped: Counter[str] = Counter()
        self._parsed: dict[bytes, TxOffload | str | None] = {}  # header bytes -> parse_vnet_hdr

    def fileno(self) -> int:
        return self.fd

    def set_carrier(self, up: bool) -> None:
        """Carrier on or off, as the NIC's link is."""

    def read_batch(self, max_frames: int = 64) -> tuple[list[Frame], list[TxOffload | None] | None]:
        """Frames the kernel sent out of the interface (non-blocking; maybe none), and their
        offloads: None when no frame has one (always without ``vnet_hdr``), else one entry
        per frame. A frame whose offload cannot be done is dropped and counted."""
        reads: list[bytes] = []
        fd = self.fd
        size = MAX_FRAME + HDR_LEN if self.vnet_hdr else MAX_FRAME
        for _ in range(max_frames):
            try:
                reads.append(os.read(fd, size))
            except BlockingIOError:
                break
        self.rx_frames += len(reads)
        if not self.vnet_hdr or not reads:
            return cast(list[Frame], reads), None
        if len(reads) == 1:  # a ping, an ACK, a frame in a trickle: the shortest path
            data = reads[0]
            off = self._offload(data[:HDR_LEN], data)
            if isinstance(off, str):
                self.dropped[off] += 1
                return [], None
            frame = data[HDR_LEN:] if len(data) <= COPY_MAX else memoryview(data)[HDR_LEN:]
            return [frame], (None if off is None else [off])
        # The headers of a batch are most often all the same bytes (a UDP stream: the same
        # csum_start/csum_offset on every datagram; plain frames: all zero): then one
        # look-up serves the batch, and the frames are cut off their headers in one pass.
        hdrs = [d[:HDR_LEN] for d in reads]
        if hdrs.count(hdrs[0]) == len(hdrs):
            off = self._offload(hdrs[0], reads[0])
            if isinstance(off, str):
                self.dropped[off] += len(reads)
                return [], None
            if max(map(len, reads)) <= COPY_MAX:  # a copy costs less than a view (2 objects)
                frames: list[Frame] = [d[HDR_LEN:] for d in reads]
            else:
                frames = [memoryview(d)[HDR_LEN:] for d in reads]
            return frames, (None if off is None else [off] * len(frames))
        frames, offloads = [], []
        for hdr, data in zip(hdrs, reads, strict=True):
            off = self._offload(hdr, data)
            if isinstance(off, str):
                self.dropped[off] += 1
                continue
            frames.append(memoryview(data)[HDR_LEN:])
            offloads.append(off)
        return frames, (None if offloads.count(None) == len(offloads) else offloads)

    def _offload(self, hdr: bytes, data: bytes) -> TxOffload | str | None:
        """:func:`parse_vnet_hdr` of ``data``, whose header bytes are ``hdr``, parsed once per
        distinct header: a flow's headers repeat byte for byte. A super-frame's are not
        remembered (their hdr_len, the skb's linear length, varies per frame)."""
        try:
            return self._parsed[hdr]
        except KeyError:
            pass
        off = parse_vnet_hdr(data)
        if not isinstance(off, TxOffload) or not off.gso_size:
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.clear()
            self._parsed[hdr] = off
        return off

    def write_batch(
        self, frames: Sequence[Frame], csum_valid: Sequence[bool] | None = None
    ) -> None:
        """Hand received frames to the kernel's stack (with ``vnet_hdr``, each behind a
        header: ``VIRTIO_NET_HDR_F_DATA_VALID`` where ``csum_valid`` says so); a frame it
        refuses is counted under its errno (e.g. ``EIO``: the interface is down) and dropped."""
        fd = self.fd
        for i, f in enumerate(frames):
            try:
                if not self.vnet_hdr:
                    os.write(fd, f)
                else:
                    os.writev(fd, (HDR_DATA_VALID if csum_valid and csum_valid[i] else HDR_NONE, f))
                self.tx_frames += 1
            except OSError as exc:
                self.dropped[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a non-persistent TAP disappears with its last fd
            self.fd = -1

    def __enter__(self) -> FramePort:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Tap(FramePort):
    """A TAP interface (context manager). Frames in and out in batches.

    Args:
        name: interface name (<= 15 characters), e.g. ``udrv0``.
        mac: its MAC address: the NIC's, so the kernel's view and the wire agree.
        mtu: interface MTU.
        offloads: what the NIC behind it does (:attr:`udrv.net.Nic.offloads`): any of them
            opens the TAP with ``IFF_VNET_HDR``; checksum insertion and TSO are announced
            to the kernel with ``TUNSETOFFLOAD`` (``TUN_F_CSUM``, ``TUN_F_TSO4``).

    Raises:
        FrontendError: no ``/dev/net/tun``, no CAP_NET_ADMIN, or a bad name.
    """

    def __init__(
        self, name: str, *, mac: bytes | None = None, mtu: int = 1500,
        offloads: Offload = Offload.NONE,
    ) -> None:  # fmt: skip
        if not name or len(name) >= IFNAMSIZ or "/" in name:
            raise FrontendError(f"bad interface name {name!r}: 1-15 characters, no '/'")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            fix = (
                "run `modprobe tun`" if exc.errno == errno.ENOENT else "run as root (CAP_NET_ADMIN)"
            )
            raise FrontendError(
                f"cannot open {TUN_DEVICE} for {name}; {fix}", errno=exc.errno
            ) from None
        vnet = offloads != Offload.NONE
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        ifr = bytearray(struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags))
        tun_f = (T.TUN_F_CSUM if offloads & (Offload.TX_CSUM | Offload.TSO4) else 0) | (
            T.TUN_F_TSO4 if offloads & Offload.TSO4 else 0
        )
        try:
            ioctl(fd, TUNSETIFF, ifr, what=f"TUNSETIFF {name}", error=FrontendError)
            if tun_f:
                ioctl(fd, T.TUNSETOFFLOAD, tun_f, what=f"TUNSETOFFLOAD {name}",
                      error=FrontendError)  # fmt: skip
        except FrontendError:
            os.close(fd)
            raise
        super().__init__(fd, ifr[:IFNAMSIZ].rstrip(b"\0").decode(), vnet_hdr=vnet)
        self.offloads = offloads
        try:
            self._configure(mac, mtu)
        except BaseException:
            self.close()
            raise

    def _configure(self, mac: bytes | None, mtu: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)[0]
            if mac is not None:
                # The address first and on its own: the kernel must take it before the
                # interface goes up (and one rejected attribute must not hide another).
                ipr.link("set", index=idx, address=":".join(f"{b:02x}" for b in mac))
            ipr.link("set", index=idx, mtu=mtu)
            ipr.link("set", index=idx, state="up")

    def set_carrier(self, up: bool) -> None:
        """Carrier on or off, as the NIC's link is."""
        ioctl(self.fd, TUNSETCARRIER, bytearray(struct.pack("i", int(up))), what=f"TUNSETCARRIER {self.name}",
              error=FrontendError)  # fmt: skip

    def __enter__(self) -> Tap:
        return self


@dataclass
class ServeStats:
    """What :func:`serve` moved, and what it dropped per reason."""

    to_nic: int = 0  # frames the kernel sent that the NIC took
    to_kernel: int = 0  # frames the NIC received that went to the kernel
    tx_ring_full: int = 0  # times the NIC took fewer frames than offered (the loop waited)
    wakeups: int = 0  # passes of the loop that found an fd ready (or a NIC to poll)
    port_batches: int = 0  # reads of the port that brought frames (to_nic / this: batch size)
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        drops = " ".join(f"dropped[{r}]={n}" for r, n in sorted(self.dropped.items()))
        return (
            f"to_nic={self.to_nic} to_kernel={self.to_kernel} tx_ring_full={self.tx_ring_full} "
            f"wakeups={self.wakeups} port_batches={self.port_batches}"
            + (f" {drops}" if drops else "")
        )


POLL_INTERVAL = 0.05  # s: how often a NIC without an event fd is looked at when idle
SERVICE_INTERVAL = 0.05  # s: Nic.service() at least this often (watchdogs) without events
BACKOFF = 0.001  # s: retry interval for a full TX ring on a NIC without an event fd
RX_ROUNDS = 8  # receive batches per pass before TX gets a turn


def serve(
    nic: Nic,
    port: FramePort,
    stop: threading.Event,
    *,
    rx_batch: int = 64,
    tx_batch: int = 64,
) -> ServeStats:
    """Move frames between ``nic`` and ``port`` (a :class:`Tap`) until ``stop`` is set.

    The port's carrier follows the NIC's link. A full transmit ring is waited out (the NIC's
    event, or a short sleep), never dropped; the frames the kernel sent while the link was
    down are dropped and counted (``dropped["link_down"]``), as a cable pull loses them.

    One thread waits on both fds with one ``poll``; :meth:`Nic.service` (which acknowledges
    the interrupt) runs only when the NIC's fd fired or ``SERVICE_INTERVAL`` passed, so a
    frame from the kernel costs no interrupt bookkeeping.

    Args:
        rx_batch, tx_batch: frames per :meth:`Nic.rx_batch` / :meth:`Nic.tx_batch` call.

    Returns:
        The counters; refused writes to the port are in ``port.dropped``.
    """
    stats = ServeStats()
    link = nic.link().up
    port.set_carrier(link)
    log.info("%s: link %s", port.name, nic.link())
    pending: list[Frame] = []  # read from the port, not yet taken by the NIC
    pending_off: list[TxOffload | None] | None = None  # their offloads
    nic_fd, port_fd = nic.fileno(), port.fileno()
    rx_csum = port.vnet_hdr and bool(nic.offloads & Offload.RX_CSUM)
    poller = select.poll()
    if nic_fd >= 0:
        poller.register(nic_fd, select.POLLIN)
    poller.register(port_fd, select.POLLIN)
    port_polled = True  # the port's fd is in the poll set (not while frames are pending)
    busy = False  # more work is known to be waiting: do not sleep
    serviced = time.monotonic()
    while not stop.is_set():
        # With frames pending the port is not read: its queue (and the kernel's) holds the rest.
        if pending and port_polled:
            poller.unregister(port_fd)
            port_polled = False
        elif not pending and not port_polled:
            poller.register(port_fd, select.POLLIN)
            port_polled = True
        if busy:
            timeout = 0.0
        elif pending:
            timeout = 10 * BACKOFF if nic_fd >= 0 else BACKOFF
        else:
            timeout = POLL_INTERVAL
        ready = poller.poll(timeout * 1e3)
        if ready:
            stats.wakeups += 1
        now = time.monotonic()
        port_ready = False
        nic_ready = nic_fd < 0
        for fd, _ in ready:
            if fd == port_fd:
                port_ready = True
            else:
                nic_ready = True
        if nic_ready or pending or now - serviced >= SERVICE_INTERVAL:
            nic.service()
            serviced = now
        up = nic.link()
        if up.up != link:
            link = up.up
            port.set_carrier(link)
            log.info("%s: link %s", port.name, up)
        if pending and not link:
            stats.dropped["link_down"] += len(pending)  # as a cable pull loses them
            pending, pending_off = [], None
        busy = False
        for _ in range(RX_ROUNDS):
            frames = nic.rx_batch(rx_batch)
            if not frames:
                break
            port.write_batch(frames, nic.rx_csum_valid() if rx_csum else None)
            stats.to_kernel += len(frames)
        else:
            busy = True
        if not pending and port_ready:
            pending, pending_off = port.read_batch(tx_batch)
            stats.port_batches += bool(pending)
            if pending and not link:
                stats.dropped["link_down"] += len(pending)
                pending, pending_off = [], None
            busy = busy or len(pending) == tx_batch
        if pending:
            taken = nic.tx_batch(pending, pending_off)
            stats.to_nic += taken
            if taken < len(pending):
                stats.tx_ring_full += 1
            pending = pending[taken:]
            if pending_off is not None:
                pending_off = pending_off[taken:]
    if pending:
        stats.dropped["stopped"] += len(pending)
    return stats
