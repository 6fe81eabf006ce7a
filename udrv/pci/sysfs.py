"""Enumerate PCI devices from sysfs (``/sys/bus/pci/devices``), read-only.

``root`` is a parameter everywhere so tests can point it at a fake tree.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from udrv.errors import DeviceNotFoundError
from udrv.pci.address import IdFilter, PciAddress, parse_selector

SYSFS_PCI = Path("/sys/bus/pci/devices")

# include/linux/ioport.h resource flags, as the sysfs "resource" file shows them.
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000


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
    bars: list[Resource] = field(default_factory=list)
    path: Path = SYSFS_PCI

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["bars"] = [
            dict(
                asdict(b),
                size=b.size,
                kind=b.kind,
                is_64bit=b.is_64bit,
                prefetchable=b.prefetchable,
            )
            for b in self.bars
        ]
        return d

    def read_config(self) -> bytes:
        """Config space as sysfs gives it (256 bytes, or 4096 for PCIe; 64 if unprivileged)."""
        return (self.path / "config").read_bytes()


def _hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def _opt_text(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "(null)") else text


def read_device(path: Path) -> PciDeviceInfo:
    """Describe the device whose sysfs directory is ``path``."""
    driver = os.path.basename(os.readlink(path / "driver")) if (path / "driver").exists() else None
    group = None
    if (path / "iommu_group").exists():
        group = int(os.path.basename(os.readlink(path / "iommu_group")))
    numa = _opt_text(path / "numa_node")
    bars = []
    try:
        lines = (path / "resource").read_text().splitlines()
    except OSError:
        lines = []
    for i, line in enumerate(lines[:7]):
        start, end, flags = (int(x, 16) for x in line.split())
        if flags:
            bars.append(Resource(i, start, end, flags))
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
        driver=driver,
        iommu_group=group,
        numa_node=int(numa) if numa else None,
        driver_override=_opt_text(path / "driver_override"),
        config_size=config_size,
        bars=bars,
        path=path,
    )


def devices(root: Path = SYSFS_PCI) -> list[PciDeviceInfo]:
    """Every PCI function, in address order."""
    if not root.is_dir():
        return []
    return [read_device(root / name) for name in sorted(os.listdir(root))]


def find(selector: str, root: Path = SYSFS_PCI) -> PciDeviceInfo:
    """The one device an address or ``vendor:device`` selects.

    Raises:
        AddressError: the selector cannot be parsed.
        DeviceNotFoundError: nothing matches, or an id filter matches several devices.
    """
    sel = parse_selector(selector)
    if isinstance(sel, PciAddress):
        path = root / str(sel)
        if not path.exists():
            raise DeviceNotFoundError(
                f"no PCI device {sel} in {root}; `udrv list` shows what there is"
            )
        return read_device(path)
    assert isinstance(sel, IdFilter)
    matches = [d for d in devices(root) if (d.vendor, d.device) == (sel.vendor, sel.device)]
    if not matches:
        raise DeviceNotFoundError(
            f"no PCI device with id {sel} in {root}; `udrv list` shows what there is"
        )
    if len(matches) > 1:
        raise DeviceNotFoundError(
            f"{len(matches)} devices have id {sel} "
            f"({', '.join(d.address for d in matches)}); pick one by address"
        )
    return matches[0]
