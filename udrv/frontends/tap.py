"""TAP: a user-space NIC driver as a real Linux network interface.

``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` (linux/if_tun.h) gives a file descriptor on
which each read returns one Ethernet frame the kernel sends out of the interface, and each
write injects one frame as received. Address, MTU and state are set through rtnetlink
(pyroute2); the carrier follows the NIC's link through ``TUNSETCARRIER``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from types import TracebackType

from udrv.errors import FrontendError
from udrv.kernel.ioctl import _IOW, ioctl

TUN_DEVICE = "/dev/net/tun"
IFF_TAP = 0x0002  # if_tun.h
IFF_NO_PI = 0x1000  # if_tun.h: no 4-byte packet information header
IFNAMSIZ = 16  # linux/if.h
TUNSETIFF = _IOW("T", 202, ctypes.c_int)  # if_tun.h
TUNSETCARRIER = _IOW("T", 226, ctypes.c_int)  # if_tun.h (Linux 5.0+)
MAX_FRAME = 65536


class Tap:
    """A TAP interface (context manager). Frames in and out in batches.

    Args:
        name: interface name (<= 15 characters), e.g. ``udrv0``.
        mac: its MAC address (the NIC's, so the kernel's view and the wire agree).
        mtu: interface MTU.
        netns: move nothing; configure inside the current network namespace.
    """

    def __init__(self, name: str, *, mac: bytes | None = None, mtu: int = 1500) -> None:
        if not name or len(name) >= IFNAMSIZ or "/" in name:
            raise FrontendError(f"bad interface name {name!r}: 1-15 characters, no '/'")
        try:
            self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            fix = (
                "run `modprobe tun`" if exc.errno == errno.ENOENT else "run as root (CAP_NET_ADMIN)"
            )
            raise FrontendError(
                f"cannot open {TUN_DEVICE} for {name}; {fix}", errno=exc.errno
            ) from None
        ifr = bytearray(struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
        try:
            ioctl(self.fd, TUNSETIFF, ifr, what=f"TUNSETIFF {name}", error=FrontendError)
        except FrontendError:
            os.close(self.fd)
            raise
        self.name = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
        self.rx_frames = self.tx_frames = self.dropped = 0
        self._configure(mac, mtu)

    def _configure(self, mac: bytes | None, mtu: int) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)[0]
            kw: dict[str, object] = {"mtu": mtu}
            if mac is not None:
                kw["address"] = ":".join(f"{b:02x}" for b in mac)
            ipr.link("set", index=idx, **kw)
            ipr.link("set", index=idx, state="up")

    def set_carrier(self, up: bool) -> None:
        """Carrier on or off, as the NIC's link is."""
        ioctl(self.fd, TUNSETCARRIER, bytearray(struct.pack("i", int(up))), what=f"TUNSETCARRIER {self.name}",
              error=FrontendError)  # fmt: skip

    def fileno(self) -> int:
        return self.fd

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

    def write_batch(self, frames: list[bytes]) -> None:
        """Hand received frames to the kernel's stack."""
        for f in frames:
            try:
                os.write(self.fd, f)
                self.tx_frames += 1
            except OSError:
                self.dropped += 1  # e.g. interface down: the stack does not want it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a non-persistent TAP disappears with its last fd
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
