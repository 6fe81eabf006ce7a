"""udrv: Linux PCI device drivers in Python, in user space."""

from __future__ import annotations

import os as _os

from udrv.errors import UdrvError
from udrv.open import open

if _os.environ.get("UDRV_TRACE"):  # udrv.trace: this process's accesses go to that file
    from udrv import trace as _trace

    _trace.enable_from_env()

__version__ = "0.1.0"

__all__ = ["UdrvError", "__version__", "open"]
