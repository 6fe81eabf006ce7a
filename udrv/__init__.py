"""udrv: Linux PCI device drivers in Python, in user space."""

from __future__ import annotations

from udrv.errors import UdrvError

__version__ = "0.1.0"

__all__ = ["UdrvError", "__version__"]
