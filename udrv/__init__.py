"""udrv: Linux PCI device drivers in Python, in user space."""

from __future__ import annotations

from udrv.errors import UdrvError
from udrv.open import open

__version__ = "0.1.0"

__all__ = ["UdrvError", "__version__", "open"]
