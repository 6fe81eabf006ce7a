"""NVMe driver (NVM Express Base Specification 1.4), as QEMU's ``nvme`` device implements it."""

from udrv.drivers.nvme.aio import AsyncNvme
from udrv.drivers.nvme.driver import Nvme, NvmeError

__all__ = ["AsyncNvme", "Nvme", "NvmeError"]
