"""Every error udrv raises.

One base class, one subclass per subsystem. A message says what was attempted, on which
object, and what to do about it. Errors that come from a system call carry its ``errno``.
"""

from __future__ import annotations

import errno as _errno
import os


class UdrvError(Exception):
    """Base class of every udrv error.

    Attributes:
        errno: the OS error number when a system call failed, else ``None``.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        if errno is not None:
            message = f"{message}: [{_errno.errorcode.get(errno, errno)}] {os.strerror(errno)}"
        super().__init__(message)
        self.errno = errno


class DeviceNotFoundError(UdrvError):
    """No PCI device matches an address or vendor:device filter."""


class AddressError(UdrvError, ValueError):
    """A PCI address or id filter that cannot be parsed."""


class ConfigSpaceError(UdrvError):
    """Config space that cannot be read or decoded (truncated, looping capability list, ...)."""


class RegionError(UdrvError):
    """A BAR/region access out of range, unaligned, of a bad width, or not permitted."""


class DescriptionError(UdrvError):
    """A register description (SystemRDL, IP-XACT) that cannot be compiled or mapped.

    Attributes:
        path: the description file.
        line: the line the cause is on, when known.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.path, self.line = path, line


class BackendError(UdrvError):
    """A device cannot be opened through the requested backend (VFIO, UIO, sysfs)."""


class VfioError(BackendError):
    """A VFIO container, group or device operation failed."""


class UioError(BackendError):
    """A UIO (uio_pci_generic) operation failed."""


class VfioUserError(BackendError):
    """A vfio-user peer sent a malformed message, refused a request, or went away."""


class BindError(UdrvError):
    """Binding a device to, or restoring it from, a kernel driver failed or was refused."""


class DeviceBusyError(BindError):
    """The device is bound to another driver or in use; the message names the fix."""


class IrqError(UdrvError):
    """Enabling, waiting for or disabling interrupts failed."""


class DmaError(UdrvError):
    """Allocating, mapping or unmapping DMA memory failed."""


class PollTimeout(UdrvError, TimeoutError):
    """A register poll or a device operation did not complete before its deadline."""


class DriverError(UdrvError):
    """A device driver found the device in a state it cannot handle."""


class DeviceRemovedError(DriverError):
    """The device is gone: its registers read all-ones, as every read of a PCI function that
    no longer answers completes (surprise removal, power loss, a link that went down). Not a
    device error: nothing can be retried until it is back and opened again."""


class ModelError(UdrvError):
    """A device model (udrv.models) is described wrongly or cannot serve a request."""


class FrontendError(UdrvError):
    """A kernel frontend (ublk, NBD, TAP, CUSE) failed."""


class PluginError(UdrvError):
    """An nbdkit-style plugin cannot be loaded, configured or served."""


class TraceError(UdrvError):
    """A trace file (udrv's, or QEMU's trace log) that cannot be read, converted or shown."""


class LabError(UdrvError):
    """The QEMU hardware lab cannot be set up, booted, or did not run a command."""


class LabSetupError(LabError):
    """Something the lab needs is not installed; run `udrv lab setup`."""


class LabTimeout(LabError, TimeoutError):
    """A command in the lab outlived its timeout and was killed."""
