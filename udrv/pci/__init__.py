"""PCI: addresses and selectors, sysfs enumeration, config-space and capability decoding.

Everything here is read-only: it looks at sysfs and at config-space bytes, never writes to a
device.
"""

from udrv.pci.address import IdFilter, PciAddress, parse_selector
from udrv.pci.config import ConfigSpace, decode, decode_header, describe
from udrv.pci.sysfs import PciDeviceInfo, devices, find, find_all

__all__ = [
    "ConfigSpace",
    "IdFilter",
    "PciAddress",
    "PciDeviceInfo",
    "decode",
    "decode_header",
    "describe",
    "devices",
    "find",
    "find_all",
    "parse_selector",
]
