"""The vfio-user wire format: message header, commands and payload layouts.

From QEMU's ``docs/interop/vfio-user.rst`` ("vfio-user Protocol Specification", protocol
version 0.1). Every message is a 16-byte header ("Header") and a command-specific payload in
host byte order; file descriptors (DMA memory, eventfds, mmap-able regions) travel beside it
as ``SCM_RIGHTS`` ancillary data. Payloads that the spec takes from ``<linux/vfio.h>``
(``struct vfio_region_info``, ``vfio_irq_info``, ``vfio_irq_set``) reuse the definitions in
:mod:`udrv.kernel.vfio`; the others are declared here with their sizes asserted.
"""

from __future__ import annotations

import ctypes
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from udrv.errors import VfioUserError
from udrv.kernel.vfio import (
    vfio_info_cap_header,
    vfio_irq_info,
    vfio_irq_set,
    vfio_region_info,
    vfio_region_sparse_mmap_area,
)

__all__ = [
    "Command",
    "Negotiated",
    "vfio_info_cap_header",
    "vfio_irq_info",
    "vfio_irq_set",
    "vfio_region_info",
    "vfio_region_sparse_mmap_area",
    "vfio_user_device_info",
    "vfio_user_dma_map",
    "vfio_user_dma_region_access",
    "vfio_user_dma_unmap",
    "vfio_user_header",
    "vfio_user_region_access",
    "vfio_user_version",
]

#: "VFIO_USER_VERSION": the version this implementation speaks (major 0, minor 1).
VERSION_MAJOR = 0
VERSION_MINOR = 1


class Command(enum.IntEnum):
    """ "Commands": the message command ids."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# "Header", Flags: bits 0-3 Type (0 command, 1 reply), bit 4 No_reply, bit 5 Error.
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

# "VFIO_USER_DMA_MAP": flags bit 0 readable, bit 1 writeable.
DMA_FLAG_READ = 1 << 0
DMA_FLAG_WRITE = 1 << 1

# "Version" capabilities: defaults when a peer does not state them.
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096


class vfio_user_header(ctypes.Structure):
    """ "Header": precedes every command and reply."""

    _fields_ = [
        ("msg_id", ctypes.c_uint16),
        ("command", ctypes.c_uint16),
        ("msg_size", ctypes.c_uint32),  # the whole message, header included
        ("flags", ctypes.c_uint32),
        ("error_no", ctypes.c_uint32),  # errno in an error reply
    ]


class vfio_user_version(ctypes.Structure):
    """ "VFIO_USER_VERSION" request and reply; NUL-terminated JSON follows."""

    _fields_ = [("major", ctypes.c_uint16), ("minor", ctypes.c_uint16)]


class vfio_user_dma_map(ctypes.Structure):
    """ "VFIO_USER_DMA_MAP" request; the fd (if any) is the ancillary data."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("offset", ctypes.c_uint64),  # into the fd
        ("addr", ctypes.c_uint64),  # the DMA address the device uses
        ("size", ctypes.c_uint64),
    ]


class vfio_user_dma_unmap(ctypes.Structure):
    """ "VFIO_USER_DMA_UNMAP" request and reply."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_user_device_info(ctypes.Structure):
    """ "VFIO_USER_DEVICE_GET_INFO" (unlike the kernel's struct, no cap_offset)."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
    ]


class vfio_user_region_access(ctypes.Structure):
    """ "VFIO_USER_REGION_READ" / "VFIO_USER_REGION_WRITE"; data follows."""

    _fields_ = [
        ("offset", ctypes.c_uint64),
        ("region", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_user_dma_region_access(ctypes.Structure):
    """ "VFIO_USER_DMA_READ" / "VFIO_USER_DMA_WRITE"; data follows."""

    _fields_ = [("addr", ctypes.c_uint64), ("count", ctypes.c_uint64)]


# The sizes the specification's tables give.
for _s, _n in (
    (vfio_user_header, 16),
    (vfio_user_version, 4),
    (vfio_user_dma_map, 32),
    (vfio_user_dma_unmap, 24),
    (vfio_user_device_info, 16),
    (vfio_user_region_access, 16),
    (vfio_user_dma_region_access, 16),
    (vfio_region_info, 32),
    (vfio_irq_info, 16),
    (vfio_irq_set, 20),
    (vfio_info_cap_header, 8),
    (vfio_region_sparse_mmap_area, 16),
):
    assert ctypes.sizeof(_s) == _n, (_s.__name__, ctypes.sizeof(_s))

HEADER_SIZE = ctypes.sizeof(vfio_user_header)
#: "VFIO region info cap sparse mmap": nr_areas (u32), reserved (u32), then the areas.
SPARSE_MMAP_HEADER = 8


def parse(struct: type[Any], payload: bytes | memoryview, what: str) -> Any:
    """``struct`` decoded from the start of ``payload``.

    Raises:
        VfioUserError: the payload is shorter than the structure (EINVAL).
    """
    n = ctypes.sizeof(struct)
    if len(payload) < n:
        raise VfioUserError(
            f"{what}: payload of {len(payload)} bytes is shorter than {struct.__name__} "
            f"({n} bytes)",
            errno=22,
        )
    return struct.from_buffer_copy(bytes(payload[:n]))


@dataclass
class Negotiated:
    """What one side of a connection may send to the other ("Version" capabilities)."""

    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        }
        return json.dumps({"capabilities": caps}).encode() + b"\0"

    @classmethod
    def from_payload(cls, payload: bytes | memoryview, what: str) -> Negotiated:
        """Decode a VERSION payload: major, minor, optional NUL-terminated JSON.

        Raises:
            VfioUserError: truncated, not JSON, or capabilities of the wrong type (EINVAL).
        """
        v = parse(vfio_user_version, payload, what)
        out = cls(major=v.major, minor=v.minor)
        data = bytes(payload[ctypes.sizeof(vfio_user_version) :]).split(b"\0", 1)[0]
        if not data.strip():
            return out
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise VfioUserError(f"{what}: version data is not JSON ({exc})", errno=22) from None
        caps = doc.get("capabilities", {}) if isinstance(doc, dict) else None
        if not isinstance(caps, dict):
            raise VfioUserError(f"{what}: version data has no capabilities object", errno=22)
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            if name in caps:
                value = caps[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise VfioUserError(
                        f"{what}: capability {name} must be a non-negative number, not {value!r}",
                        errno=22,
                    )
                setattr(out, name, value)
        out.extra = {k: v for k, v in caps.items() if not hasattr(out, k)}
        return out
