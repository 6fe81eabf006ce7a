"""Enumerate PCI devices from sysfs (``/sys/bus/pci/devices``), read-only.

Each device directory (Documentation/ABI/testing/sysfs-bus-pci) has ``vendor``, ``device``,
``subsystem_vendor``, ``subsystem_device``, ``class``, ``revision`` (hex text), ``driver`` and
``iommu_group`` (symlinks), ``numa_node``, ``driver_override``, ``config`` and ``resource``:
one line per resource, ``start end flags`` in hex, lines 0-5 the BARs, 6 the expansion ROM,
7-12 the SR-IOV VF BARs, 13-16 a bridge's windows (drivers/pci/pci-sysfs.c).

``root`` is a parameter everywhere so tests can point it at a fake tree. Nothing here writes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from udrv.errors import DeviceNotFoundError
from udrv.pci.address import IdFilter, PciAddress, as_typed, parse_selector
from udrv.pci.config import ConfigSpace, decode

SYSFS_PCI = Path("/sys/bus/pci/devices")

# include/linux/ioport.h resource flags, as the sysfs "resource" file shows them.
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_READONLY = 0x00004000
IORESOURCE_MEM_64 = 0x00100000
IORESOURCE_DISABLED = 0x10000000
IORESOURCE_UNSET = 0x20000000

#: ``resource`` line numbers (include/linux/pci.h: PCI_ROM_RESOURCE, PCI_BRIDGE_RESOURCES).
PCI_ROM_RESOURCE = 6
PCI_IOV_RESOURCES = 7
PCI_BRIDGE_RESOURCES = 13


@dataclass(frozen=True)
class Resource:
    """One line of sysfs ``resource``: a BAR (0-5), the ROM (6) or a bridge window."""

    index: int
    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end else 0

    @property
    def is_io(self) -> bool:
        return bool(self.flags & IORESOURCE_IO)

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM_64)

    @property
    def prefetchable(self) -> bool:
        return bool(self.flags & IORESOURCE_PREFETCH)

    @property
    def kind(self) -> str:
        return "io" if self.is_io else "memory"

    @property
    def is_rom(self) -> bool:
        return self.index == PCI_ROM_RESOURCE

    def to_dict(self) -> dict[str, Any]:
        return dict(
            asdict(self),
            size=self.size,
            kind=self.kind,
            is_64bit=self.is_64bit,
            prefetchable=self.prefetchable,
        )


@dataclass
class PciDeviceInfo:
    """What sysfs says about one PCI function."""

    address: str
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int  # 24 bits: base class, subclass, prog-if
    revision: int
    driver: str | None
    iommu_group: int | None
    numa_node: int | None
    driver_override: str | None
    config_size: int
    bars: list[Resource] = field(default_factory=list)  # BARs 0-5 and the ROM (6)
    path: Path = SYSFS_PCI
    windows: list[Resource] = field(default_factory=list)  # a bridge's windows (13-16)
    vf_bars: list[Resource] = field(default_factory=list)  # SR-IOV VF BARs (7-12)

    @property
    def ids(self) -> str:
        """``vendor:device`` in hex, as a selector takes it."""
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def pci_address(self) -> PciAddress:
        return PciAddress.parse(self.address)

    @property
    def has_extended_config(self) -> bool:
        """Config space is 4096 bytes (PCIe / PCI-X 2.0), not 256."""
        return self.config_size >= 4096

    def bar(self, index: int) -> Resource | None:
        """BAR ``index`` (0-5) or the ROM (6), or ``None`` when not implemented."""
        return next((b for b in self.bars if b.index == index), None)

    def decode_config(self) -> ConfigSpace:
        """Config space read now and decoded (needs root for more than the header).

        Raises:
            ConfigSpaceError: the config space is broken; OSError: it cannot be read.
        """
        return decode(self.read_config())

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values (ints, strings, lists, dicts)."""
        d = asdict(self)
        d["path"] = str(self.path)
        for key in ("bars", "windows", "vf_bars"):
            d[key] = [r.to_dict() for r in getattr(self, key)]
        d["ids"] = self.ids
        d["has_extended_config"] = self.has_extended_config
        return d

    def read_config(self, size: int | None = None) -> bytes:
        """Config space as sysfs gives it (256 bytes, or 4096 for PCIe; 64 if unprivileged).

        Args:
            size: read at most this many bytes from offset 0.
        """
        with open(self.path / "config", "rb") as f:
            return f.read() if size is None else f.read(size)


def _hex(path: Path) -> int:
    try:
        return int(path.read_text().strip(), 16)
    except FileNotFoundError:
        raise DeviceNotFoundError(
            f"{path} is missing: the device went away, or {path.parent} is not a PCI device"
        ) from None
    except ValueError:
        raise DeviceNotFoundError(f"{path} does not hold a hex number") from None


def _opt_text(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "(null)") else text


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def read_resources(path: Path) -> list[Resource]:
    """The implemented lines of a sysfs ``resource`` file (flags non-zero); malformed
    lines are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for i, line in enumerate(lines):
        try:
            start, end, flags = (int(x, 16) for x in line.split())
        except ValueError:
            continue
        if flags:
            out.append(Resource(i, start, end, flags))
    return out


def read_device(path: Path) -> PciDeviceInfo:
    """Describe the device whose sysfs directory is ``path``.

    Raises:
        DeviceNotFoundError: ``path`` is not (or no longer) a PCI device directory.
    """
    if not path.is_dir():
        raise DeviceNotFoundError(f"no PCI device at {path}; `udrv list` shows what there is")
    group = _link_name(path / "iommu_group")
    numa = _opt_text(path / "numa_node")
    resources = read_resources(path / "resource")
    try:
        config_size = (path / "config").stat().st_size
    except OSError:
        config_size = 0
    return PciDeviceInfo(
        address=path.name,
        vendor=_hex(path / "vendor"),
        device=_hex(path / "device"),
        subsystem_vendor=_hex(path / "subsystem_vendor"),
        subsystem_device=_hex(path / "subsystem_device"),
        class_code=_hex(path / "class"),
        revision=_hex(path / "revision") if (path / "revision").exists() else 0,
        driver=_link_name(path / "driver"),
        iommu_group=int(group) if group and group.isdigit() else None,
        numa_node=int(numa) if numa and numa.lstrip("-").isdigit() else None,
        driver_override=_opt_text(path / "driver_override"),
        config_size=config_size,
        bars=[r for r in resources if r.index <= PCI_ROM_RESOURCE],
        path=path,
        windows=[r for r in resources if r.index >= PCI_BRIDGE_RESOURCES],
        vf_bars=[r for r in resources if PCI_IOV_RESOURCES <= r.index < PCI_BRIDGE_RESOURCES],
    )


def devices(root: Path = SYSFS_PCI, selector: str | None = None) -> list[PciDeviceInfo]:
    """Every PCI function, in address order; only those ``selector`` picks when given.

    A device that disappears while being read (hot unplug) is left out.

    Raises:
        AddressError: ``selector`` cannot be parsed.
    """
    sel = parse_selector(selector) if selector is not None else None
    if not root.is_dir():
        return []
    out = []
    for name in sorted(os.listdir(root)):
        if isinstance(sel, PciAddress) and name != str(sel):
            continue
        try:
            dev = read_device(root / name)
        except DeviceNotFoundError:
            continue
        if isinstance(sel, IdFilter) and not sel.matches(dev.vendor, dev.device):
            continue
        out.append(dev)
    return out


def find_all(selector: str, root: Path = SYSFS_PCI) -> list[PciDeviceInfo]:
    """Every device an address or ``vendor:device`` selects (at least one).

    Raises:
        AddressError: the selector cannot be parsed.
        DeviceNotFoundError: nothing matches.
    """
    found = devices(root, selector)
    if not found:
        sel = parse_selector(selector)
        what = (f"PCI device {as_typed(selector)}" if isinstance(sel, PciAddress)
                else f"PCI device with id {sel}")  # fmt: skip
        raise DeviceNotFoundError(f"no {what} in {root}; `udrv list` shows what there is")
    return found


def find(selector: str, root: Path = SYSFS_PCI) -> PciDeviceInfo:
    """The one device an address or ``vendor:device`` selects.

    Raises:
        AddressError: the selector cannot be parsed.
        DeviceNotFoundError: nothing matches, or an id filter matches several devices.
    """
    matches = find_all(selector, root)
    if len(matches) > 1:
        raise DeviceNotFoundError(
            f"{len(matches)} devices have id {parse_selector(selector)} "
            f"({', '.join(d.address for d in matches)}); pick one by address"
        )
    return matches[0]
