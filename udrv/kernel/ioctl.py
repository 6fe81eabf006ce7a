"""ioctl numbers and the one ioctl() call udrv makes.

The number layout is include/uapi/asm-generic/ioctl.h's (x86-64, arm64, riscv): ``nr`` in bits
0-7, ``type`` 8-15, ``size`` 16-29, ``dir`` 30-31. ``_IO``/``_IOR``/``_IOW``/``_IOWR`` build
numbers as the header's macros do; ``_IOC_DIR``/``_IOC_TYPE``/``_IOC_NR``/``_IOC_SIZE`` take
them apart (CUSE needs that to serve ioctls it did not define). Nothing outside
:mod:`udrv.kernel` calls ``fcntl.ioctl``: everything goes through :func:`ioctl` here.
"""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

from udrv.errors import UdrvError

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS, _IOC_DIRBITS = 8, 8, 14, 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(dir_: int, type_: int | str, nr: int, size: int | type[Any]) -> int:
    t = ord(type_) if isinstance(type_, str) else type_
    n = size if isinstance(size, int) else ctypes.sizeof(size)
    if not 0 <= n < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {n} does not fit {_IOC_SIZEBITS} bits")
    return (
        (dir_ << _IOC_DIRSHIFT)
        | (t << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (n << _IOC_SIZESHIFT)
    )


def _IO(type_: int | str, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int | str, nr: int, size: int | type[Any]) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int | str, nr: int, size: int | type[Any]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int | str, nr: int, size: int | type[Any]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


def _IOC_DIR(nr: int) -> int:
    return (nr >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def _IOC_TYPE(nr: int) -> int:
    return (nr >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def _IOC_NR(nr: int) -> int:
    return (nr >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_SIZE(nr: int) -> int:
    return (nr >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


def ioctl(
    fd: int, request: int, arg: Any = 0, *, what: str, error: type[UdrvError] = UdrvError
) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is an int, or a ctypes object / bytearray that the
    kernel reads and fills in place. The GIL is released during the call, so an ioctl that
    blocks (``NBD_DO_IT``) blocks only its thread.

    Args:
        fd: the open device.
        request: the ioctl number (built with ``_IO``/``_IOW``/... from the uapi header).
        arg: the argument.
        what: the operation and its object for the error message, e.g.
            ``"NBD_SET_SOCK on /dev/nbd0"``.
        error: the udrv error class to raise.

    Returns:
        The ioctl's non-negative result.

    Raises:
        ``error``: "ioctl WHAT failed: [ERRNO] ..." carrying errno.
    """
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise error(f"ioctl {what} failed", errno=exc.errno) from None
