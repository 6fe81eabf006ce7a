"""TUN/TAP ABI: ioctls and flags from linux/if_tun.h, ``struct virtio_net_hdr`` from
linux/virtio_net.h (the offload header a TAP opened with ``IFF_VNET_HDR`` puts before every
frame, both ways).

The header's 16-bit fields are ``__virtio16``: for a TAP without ``TUNSETVNETLE`` /
``TUNSETVNETBE`` they are in the host's byte order (drivers/net/tun.c, ``tun_is_little_endian``
falls back to ``virtio_legacy_is_little_endian()``), which is what ``ctypes.c_uint16`` is.
"""

from __future__ import annotations

import ctypes

from udrv.kernel.ioctl import _IOR, _IOW

IFNAMSIZ = 16  # linux/if.h

# if_tun.h: TUNSETIFF flags (ifr_flags).
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet information header
IFF_VNET_HDR = 0x4000  # a struct virtio_net_hdr before each frame

# if_tun.h: ioctls.
TUNSETIFF = _IOW("T", 202, ctypes.c_int)
TUNSETOFFLOAD = _IOW("T", 208, ctypes.c_uint)  # TUN_F_* the reader can handle
TUNGETVNETHDRSZ = _IOR("T", 215, ctypes.c_int)
TUNSETCARRIER = _IOW("T", 226, ctypes.c_int)  # Linux 5.0+

# if_tun.h: features for TUNSETOFFLOAD ("you can hand me ...").
TUN_F_CSUM = 0x01  # unchecksummed packets (CHECKSUM_PARTIAL: csum_start/csum_offset)
TUN_F_TSO4 = 0x02  # TSO for IPv4 packets
TUN_F_TSO6 = 0x04  # TSO for IPv6 packets
TUN_F_TSO_ECN = 0x08  # TSO with ECN bits
TUN_F_UFO = 0x10  # UDP fragmentation offload

# virtio_net.h: virtio_net_hdr.flags and .gso_type.
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1  # checksum from csum_start, stored at csum_start + csum_offset
VIRTIO_NET_HDR_F_DATA_VALID = 2  # the checksum was verified (receive side)
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80


class virtio_net_hdr(ctypes.Structure):
    """virtio_net.h ``struct virtio_net_hdr`` (legacy layout, 10 bytes)."""

    _fields_ = [
        ("flags", ctypes.c_uint8),  # VIRTIO_NET_HDR_F_*
        ("gso_type", ctypes.c_uint8),  # VIRTIO_NET_HDR_GSO_*
        ("hdr_len", ctypes.c_uint16),  # Ethernet + IP + TCP/UDP headers (a hint)
        ("gso_size", ctypes.c_uint16),  # payload bytes per segment (the MSS)
        ("csum_start", ctypes.c_uint16),
        ("csum_offset", ctypes.c_uint16),
    ]


assert ctypes.sizeof(virtio_net_hdr) == 10
VNET_HDR_LEN = ctypes.sizeof(virtio_net_hdr)  # what a TAP uses unless TUNSETVNETHDRSZ says else
