"""Vendor, device and class names from the pci.ids database (Debian package ``pci.ids``),
plain hex ids when it is not installed."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

PATHS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@functools.cache
def _db() -> tuple[dict[int, str], dict[tuple[int, int], str], dict[int, str], dict[tuple[int, int], str]]:
    vendors: dict[int, str] = {}
    devices: dict[tuple[int, int], str] = {}
    classes: dict[int, str] = {}
    subclasses: dict[tuple[int, int], str] = {}
    path = next((p for p in PATHS if p.exists()), None)
    if path is None:
        return vendors, devices, classes, subclasses
    vendor = cls = None
    in_classes = False
    for line in path.read_text(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            in_classes = True
            cls = int(line[2:4], 16)
            classes[cls] = line[6:].strip()
        elif in_classes and line.startswith("\t") and not line.startswith("\t\t") and cls is not None:
            subclasses[(cls, int(line[1:3], 16))] = line[5:].strip()
        elif not line.startswith("\t"):
            in_classes = False
            try:
                vendor = int(line[:4], 16)
            except ValueError:
                vendor = None
                continue
            vendors[vendor] = line[6:].strip()
        elif not in_classes and line.startswith("\t") and not line.startswith("\t\t") and vendor is not None:
            try:
                devices[(vendor, int(line[1:5], 16))] = line[7:].strip()
            except ValueError:
                continue
    return vendors, devices, classes, subclasses


def names(dev: Any) -> dict[str, str]:
    """``vendor_name``, ``device_name``, ``class_name`` for a PciDeviceInfo."""
    vendors, devices, classes, subclasses = _db()
    base, sub = dev.class_code >> 16, (dev.class_code >> 8) & 0xFF
    return {
        "vendor_name": vendors.get(dev.vendor, f"{dev.vendor:04x}"),
        "device_name": devices.get((dev.vendor, dev.device), f"{dev.device:04x}"),
        "class_name": subclasses.get((base, sub)) or classes.get(base, f"class {dev.class_code:06x}"),
    }
