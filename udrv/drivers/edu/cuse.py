"""``/dev/NAME`` for an edu device, through CUSE (used by ``udrv edu serve``).

- ``write`` a 4-byte little-endian n, then ``read`` 4 bytes: n! (mod 2**32), computed by the
  device (interrupt-driven when the driver has interrupts).
- ioctls (constants in :mod:`udrv.drivers.edu.uapi`, C header ``udrv/drivers/edu/edu_uapi.h``)
  run DMA transfers to and from the device's 4 KiB buffer and check liveness.
"""

from __future__ import annotations

import errno
import struct
import threading
from typing import Any

from udrv.drivers.edu import uapi
from udrv.drivers.edu.driver import Edu, EduError, EduRemovedError
from udrv.errors import PollTimeout
from udrv.frontends.cuse import CharDevice, Ioctl, IoctlRetry, Request


class OpenFile:
    """Per-open state: the last result waiting to be read."""

    def __init__(self) -> None:
        self.result: bytes | None = None


class EduCharDevice(CharDevice):
    def __init__(self, edu: Edu) -> None:
        self.edu = edu
        self.lock = threading.Lock()
        self.factorials = 0

    def open(self, req: Request, flags: int) -> OpenFile:
        return OpenFile()

    def write(self, req: Request, handle: Any, data: bytes, offset: int) -> int:
        if len(data) != 4:
            raise OSError(errno.EINVAL, "write exactly 4 bytes: a little-endian 32-bit n")
        (n,) = struct.unpack("<I", data)
        try:
            handle.result = struct.pack("<I", self.edu.factorial(n))
        except EduRemovedError as exc:
            raise OSError(errno.ENODEV, str(exc)) from None
        except (EduError, PollTimeout) as exc:
            raise OSError(errno.EIO, str(exc)) from None
        self.factorials += 1
        return 4

    def read(self, req: Request, handle: Any, size: int, offset: int) -> bytes:
        if handle.result is None:
            raise OSError(errno.ENODATA, "write n first")
        out, handle.result = handle.result, None
        return out[:size]

    def ioctl(self, req: Request, handle: Any, call: Ioctl) -> tuple[int, bytes]:
        try:
            return self._ioctl(call)
        except EduRemovedError as exc:
            raise OSError(errno.ENODEV, str(exc)) from None
        except EduError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        except PollTimeout as exc:
            raise OSError(errno.ETIMEDOUT, str(exc)) from None

    def _ioctl(self, call: Ioctl) -> tuple[int, bytes]:
        if call.cmd == uapi.EDU_IOC_LIVENESS:
            (v,) = struct.unpack("<I", call.data)
            ok = self.edu.check_liveness(v)
            return (0 if ok else -errno.EIO), struct.pack("<I", ~v & 0xFFFF_FFFF)
        if call.cmd in (uapi.EDU_IOC_DMA_TO_DEVICE, uapi.EDU_IOC_DMA_FROM_DEVICE):
            size = uapi.edu_dma.size
            if len(call.data) < size:  # the struct itself was asked for by the _IOC size
                raise OSError(errno.EFAULT, "short edu_dma argument")
            user_ptr, length, offset = uapi.edu_dma.unpack_from(call.data)
            if not 0 < length <= 4095:
                raise OSError(errno.EINVAL, f"length {length} outside 1..4095")
            to_device = call.cmd == uapi.EDU_IOC_DMA_TO_DEVICE
            if to_device:
                if len(call.data) < size + length:  # now fetch the user buffer it points to
                    raise IoctlRetry([(call.arg, size), (user_ptr, length)], [])
                self.edu.dma_to_device(call.data[size : size + length], offset)
                return 0, b""
            if call.out_size < length:
                raise IoctlRetry([(call.arg, size)], [(user_ptr, length)])
            return 0, self.edu.dma_from_device(length, offset)
        raise OSError(errno.ENOTTY, f"unknown edu ioctl {call.cmd:#x}")
