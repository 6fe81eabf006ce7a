"""TAP: a user-space NIC driver as a real Linux network interface.

``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` (linux/if_tun.h) gives a file descriptor on
which each read returns one Ethernet frame the kernel sends out of the interface, and each
write injects one frame as received. Address, MTU and state are set through rtnetlink
(pyroute2); the carrier follows the NIC's link through ``TUNSETCARRIER``.

:func:`serve` connects any :class:`~udrv.net.Nic` to a TAP interface: one thread, one loop
over the TAP fd and the NIC's event fd. It never drops a frame for want of room: while the
NIC's transmit ring is full it keeps the frames it read and stops reading the TAP (the
kernel's queue holds the rest) until completions free slots. What it does drop (frames the
kernel sent while the link was down, frames the kernel refused) it counts per reason.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from udrv.errors import FrontendError
from udrv.kernel.ioctl import _IOW, ioctl
from udrv.net.nic import Frame, Nic

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
IFF_TAP = 0x0002  # if_tun.h
IFF_NO_PI = 0x1000  # if_tun.h: no 4-byte packet information header
IFNAMSIZ = 16  # linux/if.h
TUNSETIFF = _IOW("T", 202, ctypes.c_int)  # if_tun.h
TUNSETCARRIER = _IOW("T", 226, ctypes.c_int)  # if_tun.h (Linux 5.0+)
MAX_FRAME = 65536


class FramePort:
    """Frames through one non-blocking fd on which each read is one frame and each write one
    frame: a TAP, or (in tests) a ``SOCK_SEQPACKET`` socket. Counts what it could not deliver.

    Args:
        fd: the fd (owned: closed by :meth:`close`).
        name: for messages.
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.rx_frames = self.tx_frames = 0  # read from / written to the fd
        self.dropped: Counter[str] = Counter()  # frames the kernel refused, per errno name

    def fileno(self) -> int:
        return self.fd

    def set_carrier(self, up: bool) -> None:
        """Carrier on or off, as the NIC's link is."""

    def read_batch(self, max_frames: int = 64) -> list[bytes]:
        """Frames the kernel sent out of the interface (non-blocking; maybe none)."""
        frames = []
        for _ in range(max_frames):
            try:
                frames.append(os.read(self.fd, MAX_FRAME))
            except BlockingIOError:
                break
        self.rx_frames += len(frames)
        return frames

    def write_batch(self, frames: Sequence[Frame]) -> None:
        """Hand received frames to the kernel's stack; a frame it refuses is counted under
        its errno (e.g. ``EIO``: the interface is down) and dropped."""
        for f in frames:
            try:
                os.write(self.fd, f)
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

    Raises:
        FrontendError: no ``/dev/net/tun``, no CAP_NET_ADMIN, or a bad name.
    """

    def __init__(self, name: str, *, mac: bytes | None = None, mtu: int = 1500) -> None:
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
        ifr = bytearray(struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        try:
            ioctl(fd, TUNSETIFF, ifr, what=f"TUNSETIFF {name}", error=FrontendError)
        except FrontendError:
            os.close(fd)
            raise
        super().__init__(fd, ifr[:IFNAMSIZ].rstrip(b"\0").decode())
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
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        drops = " ".join(f"dropped[{r}]={n}" for r, n in sorted(self.dropped.items()))
        return (
            f"to_nic={self.to_nic} to_kernel={self.to_kernel} tx_ring_full={self.tx_ring_full}"
            + (f" {drops}" if drops else "")
        )


POLL_INTERVAL = 0.05  # s: how often a NIC without an event fd is looked at when idle
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

    Args:
        rx_batch, tx_batch: frames per :meth:`Nic.rx_batch` / :meth:`Nic.tx_batch` call.

    Returns:
        The counters; refused writes to the port are in ``port.dropped``.
    """
    stats = ServeStats()
    link = nic.link().up
    port.set_carrier(link)
    log.info("%s: link %s", port.name, nic.link())
    pending: list[bytes] = []  # read from the port, not yet taken by the NIC
    nic_fd = nic.fileno()
    busy = False  # more work is known to be waiting: do not sleep
    while not stop.is_set():
        # With frames pending the port is not read: its queue (and the kernel's) holds the rest.
        fds = ([nic_fd] if nic_fd >= 0 else []) + ([] if pending else [port.fileno()])
        if busy:
            timeout = 0.0
        elif pending:
            timeout = 10 * BACKOFF if nic_fd >= 0 else BACKOFF
        else:
            timeout = POLL_INTERVAL
        ready = select.select(fds, [], [], timeout)[0]
        nic.service()
        now = nic.link()
        if now.up != link:
            link = now.up
            port.set_carrier(link)
            log.info("%s: link %s", port.name, now)
        if pending and not link:
            stats.dropped["link_down"] += len(pending)  # as a cable pull loses them
            pending = []
        busy = False
        for _ in range(RX_ROUNDS):
            frames = nic.rx_batch(rx_batch)
            if not frames:
                break
            port.write_batch(frames)
            stats.to_kernel += len(frames)
        else:
            busy = True
        if not pending and port.fileno() in ready:
            pending = port.read_batch(tx_batch)
            if pending and not link:
                stats.dropped["link_down"] += len(pending)
                pending = []
            busy = busy or len(pending) == tx_batch
        if pending:
            taken = nic.tx_batch(pending)
            stats.to_nic += taken
            if taken < len(pending):
                stats.tx_ring_full += 1
            pending = pending[taken:]
    if pending:
        stats.dropped["stopped"] += len(pending)
    return stats
