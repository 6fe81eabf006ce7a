"""Names for PCI ids from the pci.ids database, when it is installed.

Debian's ``pci.ids`` package puts it at ``/usr/share/misc/pci.ids`` (other distributions:
``/usr/share/hwdata/pci.ids``). The file is read on first use and kept; without it every
lookup answers plain hex, so nothing here ever fails for want of names.

File format (from the file's own header): a vendor line ``vvvv  name``, its devices
indented by one tab ``dddd  name``, their subsystems by two tabs ``ssss dddd  name``;
after them the class list ``C cc  name``, subclasses ``\\tss  name``, programming
interfaces ``\\t\\tpp  name``. Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where pci.ids is looked for, in order; ``$UDRV_PCI_IDS`` comes first when set.
SEARCH_PATHS = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/pci.ids"),
    Path("/usr/share/misc/pci.ids.gz"),
)


@dataclass
class _Vendor:
    name: str
    devices: dict[int, str] = field(default_factory=dict)
    subsystems: dict[tuple[int, int, int], str] = field(default_factory=dict)


@dataclass
class PciIds:
    """A parsed pci.ids database. Lookups return ``None`` for ids it does not know.

    Build one with :meth:`load` or :meth:`parse`; :func:`database` gives the shared one.
    """

    path: Path | None = None
    vendors: dict[int, _Vendor] = field(default_factory=dict)
    classes: dict[int, str] = field(default_factory=dict)
    subclasses: dict[tuple[int, int], str] = field(default_factory=dict)
    prog_ifs: dict[tuple[int, int, int], str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> PciIds:
        """Parse the text of a pci.ids file; malformed lines are skipped."""
        db = cls(path)
        vendor: _Vendor | None = None
        vendor_id = device_id = base = sub = -1
        in_classes = False
        for line in text.splitlines():
            if not line or line.startswith("#") or not line.strip():
                continue
            try:
                if line.startswith("C "):
                    in_classes, base = True, int(line[2:4], 16)
                    db.classes[base] = line[4:].strip()
                elif line.startswith("\t\t"):
                    body = line[2:]
                    if in_classes:
                        db.prog_ifs[base, sub, int(body[:2], 16)] = body[2:].strip()
                    elif vendor is not None:
                        sv, sd = int(body[:4], 16), int(body[5:9], 16)
                        vendor.subsystems[device_id, sv, sd] = body[9:].strip()
                elif line.startswith("\t"):
                    body = line[1:]
                    if in_classes:
                        sub = int(body[:2], 16)
                        db.subclasses[base, sub] = body[2:].strip()
                    elif vendor is not None:
                        device_id = int(body[:4], 16)
                        vendor.devices[device_id] = body[4:].strip()
                elif not in_classes:
                    vendor_id = int(line[:4], 16)
                    vendor = db.vendors[vendor_id] = _Vendor(line[4:].strip())
                else:
                    # Another top-level section after the classes: stop taking its lines.
                    in_classes, vendor = False, None
            except ValueError:
                continue
        return db

    @classmethod
    def load(cls, path: Path) -> PciIds:
        """Read and parse ``path`` (plain or ``.gz``).

        Raises:
            OSError: the file cannot be read.
        """
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return cls.parse(raw.decode("utf-8", errors="replace"), path)

    def vendor(self, vendor: int) -> str | None:
        v = self.vendors.get(vendor)
        return v.name if v else None

    def device(self, vendor: int, device: int) -> str | None:
        v = self.vendors.get(vendor)
        return v.devices.get(device) if v else None

    def subsystem(self, vendor: int, device: int, sub_vendor: int, sub_device: int) -> str | None:
        """The name pci.ids gives this subsystem of this device, if it lists it."""
        v = self.vendors.get(vendor)
        return v.subsystems.get((device, sub_vendor, sub_device)) if v else None

    def class_name(self, base: int) -> str | None:
        return self.classes.get(base)

    def subclass_name(self, base: int, sub: int) -> str | None:
        return self.subclasses.get((base, sub))

    def prog_if_name(self, base: int, sub: int, prog_if: int) -> str | None:
        return self.prog_ifs.get((base, sub, prog_if))


def find_database() -> Path | None:
    """The pci.ids file that would be used, or ``None`` when none is installed."""
    env = os.environ.get("UDRV_PCI_IDS")
    for path in ((Path(env),) if env else ()) + SEARCH_PATHS:
        if path.is_file():
            return path
    return None


@functools.cache
def database() -> PciIds:
    """The installed pci.ids, parsed once; an empty database when none is installed
    or it cannot be read (install Debian's ``pci.ids`` package for names)."""
    path = find_database()
    if path is None:
        return PciIds()
    try:
        return PciIds.load(path)
    except OSError:
        return PciIds(path)


def _db(db: PciIds | None) -> PciIds:
    return database() if db is None else db


def vendor_name(vendor: int, db: PciIds | None = None) -> str:
    """``"Intel Corporation"``, or ``"8086"`` when unknown."""
    return _db(db).vendor(vendor) or f"{vendor:04x}"


def device_name(vendor: int, device: int, db: PciIds | None = None) -> str:
    """``"82574L Gigabit Network Connection"``, or ``"10d3"`` when unknown."""
    return _db(db).device(vendor, device) or f"{device:04x}"


def device_description(vendor: int, device: int, db: PciIds | None = None) -> str:
    """Vendor and device as ``lspci`` writes them: ``"Intel Corporation 82574L ..."``,
    ``"Intel Corporation Device 1234"`` or ``"Device 1234:11e8"``."""
    d = _db(db)
    vname, dname = d.vendor(vendor), d.device(vendor, device)
    if vname is None:
        return f"Device {vendor:04x}:{device:04x}"
    return f"{vname} {dname}" if dname else f"{vname} Device {device:04x}"


def subsystem_description(
    vendor: int, device: int, sub_vendor: int, sub_device: int, db: PciIds | None = None
) -> str:
    """A subsystem as ``lspci`` writes it: ``"Red Hat, Inc. QEMU Virtual Machine"``."""
    d = _db(db)
    name = d.subsystem(vendor, device, sub_vendor, sub_device)
    if name is None:
        # Subsystem ids reuse the device's own name when they equal it (as lspci does).
        name = (
            d.device(sub_vendor, sub_device)
            if (vendor, device) == (sub_vendor, sub_device)
            else None
        )
    vname = d.vendor(sub_vendor)
    if vname is None:
        return f"Device {sub_vendor:04x}:{sub_device:04x}"
    return f"{vname} {name}" if name else f"{vname} Device {sub_device:04x}"


def class_name(class_code: int, db: PciIds | None = None) -> str:
    """The most specific name of a 24-bit class code's base class and subclass:
    ``"Ethernet controller"``, ``"Network controller"`` or ``"Class 0280"``."""
    d = _db(db)
    base, sub = class_code >> 16 & 0xFF, class_code >> 8 & 0xFF
    return d.subclass_name(base, sub) or d.class_name(base) or f"Class {base:02x}{sub:02x}"


def prog_if_name(class_code: int, db: PciIds | None = None) -> str | None:
    """The name of a class code's programming interface (``"NVM Express"``), if known."""
    base, sub, pi = class_code >> 16 & 0xFF, class_code >> 8 & 0xFF, class_code & 0xFF
    return _db(db).prog_if_name(base, sub, pi)


def names(dev: Any, db: PciIds | None = None) -> dict[str, str]:
    """``vendor_name``, ``device_name`` and ``class_name`` of a device with ``vendor``,
    ``device`` and ``class_code`` attributes (a :class:`~udrv.pci.sysfs.PciDeviceInfo`)."""
    return {
        "vendor_name": vendor_name(dev.vendor, db),
        "device_name": device_name(dev.vendor, dev.device, db),
        "class_name": class_name(dev.class_code, db),
    }
