"""Driver for QEMU's ``edu`` teaching device (QEMU docs/specs/edu.rst)."""

from udrv.drivers.edu.driver import Edu

__all__ = ["Edu"]
