"""The NIC interface that network frontends serve, as ixy's ``struct ixy_device``.

A NIC driver implements :class:`Nic`; a frontend (the TAP frontend,
:mod:`udrv.frontends.tap`, or a benchmark) moves frames through it without knowing the
device. Everything is in batches, because in Python the per-call cost dominates:

- :meth:`Nic.rx_batch` returns the frames the device received, as ``memoryview`` slices of
  the driver's own receive buffers (no copy). They stay valid until the next
  :meth:`~Nic.rx_batch` call, which hands their buffers back to the device: copy what you
  keep, and drain (call until it returns ``[]``) before sleeping, so the device is not left
  short of buffers.
- :meth:`Nic.tx_batch` queues frames and returns how many it took. Taking fewer than offered
  means the transmit ring is full: the caller keeps the rest and offers them again after the
  next event (completions free slots). Nothing is dropped for lack of room; what a NIC does
  drop (a runt, an oversize frame) it counts in :attr:`Nic.stats` under a reason.
- Offloads (:class:`Offload`): a NIC that can checksum or segment TCP itself says so in
  :attr:`Nic.offloads`; a frontend that can hand it such frames (a TAP with
  ``IFF_VNET_HDR``) passes one :class:`TxOffload` per frame to :meth:`Nic.tx_batch`, and
  calls :meth:`Nic.rx_csum_valid` after :meth:`Nic.rx_batch` to tell the stack which
  checksums the NIC already verified.
- :meth:`Nic.fileno` is an fd that polls readable when there is work (a received frame, a
  transmit completion, a link change): the device's interrupt. :meth:`Nic.service` consumes
  it and re-arms it. A NIC without one returns -1 and is polled.
"""

from __future__ import annotations

import abc
import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple, Self

Frame = bytes | bytearray | memoryview


def format_mac(mac: bytes) -> str:
    """``b"RT\\x00\\x124\\x04"`` -> ``"52:54:00:12:34:04"``."""
    return ":".join(f"{b:02x}" for b in mac)


class Offload(enum.Flag):
    """Work a NIC can take off the host's stack (Linux's netdev features of the same names)."""

    NONE = 0
    TX_CSUM = enum.auto()  # insert a TCP/UDP checksum from TxOffload.csum_start/csum_offset
    TSO4 = enum.auto()  # cut a TCP/IPv4 super-frame into gso_size segments (implies TX_CSUM)
    RX_CSUM = enum.auto()  # verify received TCP/UDP checksums (Nic.rx_csum_valid)


class TxOffload(NamedTuple):
    """What the NIC must do to one frame before it goes out: Linux's CHECKSUM_PARTIAL and
    GSO, as ``struct virtio_net_hdr`` carries them.

    The checksum over ``frame[csum_start:]`` goes to ``csum_start + csum_offset``; the field
    holds the pseudo-header sum (with the length) as the stack left it. With ``gso_size``,
    the frame is a TCP super-frame (IPv4 with ``tso4``) to be cut into segments of at most
    ``gso_size`` payload bytes, each with its own headers and checksums.
    """

    csum_start: int
    csum_offset: int
    gso_size: int = 0  # 0: not a super-frame


@dataclass(frozen=True)
class Link:
    """The link as the PHY reports it."""

    up: bool
    speed_mbps: int = 0  # 10, 100, 1000; 0 while down or unknown
    full_duplex: bool = False

    def __str__(self) -> str:
        if not self.up:
            return "down"
        return f"up, {self.speed_mbps} Mbit/s, {'full' if self.full_duplex else 'half'} duplex"


@dataclass
class NicStats:
    """Software counters a driver keeps as frames pass (not the device's own counters).

    ``rx_dropped``/``tx_dropped`` count frames per reason (``"frame_error"``, ``"oversize"``...),
    so every frame that did not make it is accounted for.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_dropped: Counter[str] = field(default_factory=Counter)
    tx_dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line, e.g. ``rx_packets=3 rx_bytes=180 ... tx_dropped[oversize]=1``."""
        parts = [
            f"{k}={getattr(self, k)}" for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
        ]
        for side in ("rx_dropped", "tx_dropped"):
            parts += [f"{side}[{reason}]={n}" for reason, n in sorted(getattr(self, side).items())]
        return " ".join(parts)


class Nic(abc.ABC):
    """What a NIC driver implements and a network frontend uses.

    Attributes:
        name: the device, for messages (e.g. ``"82540EM at 0000:00:04.0"``).
        mac: the station address the NIC receives on (6 bytes): a frontend gives its
            interface this address, so the kernel's view and the wire agree.
        mtu: the largest payload of a frame (without the 14-byte Ethernet header, a VLAN tag
            or the FCS) the NIC sends and receives.
        stats: running software counters.
    """

    name: str
    mac: bytes
    mtu: int
    stats: NicStats
    #: What the NIC can do for the stack; a frontend asks for no more than this.
    offloads: Offload = Offload.NONE

    @abc.abstractmethod
    def rx_batch(self, max_frames: int = 64) -> list[memoryview]:
        """Up to ``max_frames`` received frames (without FCS), oldest first.

        The views are the driver's receive buffers: valid until the next call, which gives
        them back to the device. Frames with errors never appear: they are counted in
        ``stats.rx_dropped``.
        """

    def rx_csum_valid(self) -> list[bool]:
        """One flag per frame the last :meth:`rx_batch` returned: True where the NIC
        verified its TCP/UDP checksum (:attr:`Offload.RX_CSUM`), so the stack need not."""
        return []

    @abc.abstractmethod
    def tx_batch(
        self, frames: Sequence[Frame], offloads: Sequence[TxOffload | None] | None = None
    ) -> int:
        """Queue ``frames`` for transmission, one doorbell for all; the data is copied.

        Args:
            frames: Ethernet frames without FCS.
            offloads: None, or one entry per frame: None, or what the NIC must do to it
                (only what :attr:`offloads` announces).

        Returns:
            How many of ``frames`` (from the start) were consumed: queued, or dropped and
            counted in ``stats.tx_dropped`` because the NIC cannot send them. Fewer than
            ``len(frames)`` means the ring is full: offer the rest again after
            :meth:`service` (completions free slots).
        """

    @abc.abstractmethod
    def link(self) -> Link:
        """The current link state (one register read)."""

    def fileno(self) -> int:
        """An fd that polls readable when the NIC has news (frames, completions, link), or -1:
        then call :meth:`service` and :meth:`rx_batch` every few milliseconds."""
        return -1

    def service(self) -> None:  # noqa: B027 - optional: a NIC with nothing to acknowledge
        """Acknowledge the NIC's event (reset :meth:`fileno`, re-arm the interrupt) and do
        periodic work (watchdogs). Call when :meth:`fileno` polls readable and at least every
        100 ms."""

    def set_promiscuous(self, on: bool) -> None:
        """Receive every frame, whatever its destination address."""
        raise NotImplementedError(f"{self.name}: promiscuous mode is not supported")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop the NIC and release what it holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
