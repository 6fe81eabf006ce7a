"""Driver for the Intel 8254x (e1000) family as QEMU emulates it (82540EM, 8086:100e)."""

from udrv.drivers.e1000.driver import E1000

__all__ = ["E1000"]
