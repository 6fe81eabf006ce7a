"""Enumeration of a fake sysfs tree built from lab dumps; pci.ids names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import udrv
from udrv.errors import AddressError, DeviceBusyError, DeviceNotFoundError
from udrv.pci import ids
from udrv.pci.address import PciAddress
from udrv.pci.sysfs import (
    IORESOURCE_IO,
    IORESOURCE_MEM,
    IORESOURCE_MEM_64,
    IORESOURCE_PREFETCH,
    devices,
    find,
    find_all,
    read_device,
    read_resources,
)

DATA = Path(__file__).parent / "data" / "pci"


def make_tree(
    root: Path, name: str, address: str, driver: str | None = None, group: int = 3
) -> None:
    """A sysfs device directory like the kernel's, from a config dump captured in the lab."""
    dev = root / "devices" / address
    dev.mkdir(parents=True)
    cfg = (DATA / f"{name}.config").read_bytes()
    (dev / "config").write_bytes(cfg)
    (dev / "resource").write_text((DATA / f"{name}.resource").read_text())
    le = lambda o, n: int.from_bytes(cfg[o : o + n], "little")  # noqa: E731
    for attr, value in (
        ("vendor", le(0, 2)),
        ("device", le(2, 2)),
        ("subsystem_vendor", le(0x2C, 2)),
        ("subsystem_device", le(0x2E, 2)),
        ("revision", cfg[8]),
    ):
        (dev / attr).write_text(f"{value:#06x}\n")
    (dev / "class").write_text(f"{le(9, 3):#08x}\n")
    (dev / "numa_node").write_text("-1\n")
    (dev / "driver_override").write_text("(null)\n")
    groups = root / "groups" / str(group)
    groups.mkdir(parents=True, exist_ok=True)
    os.symlink(groups, dev / "iommu_group")
    if driver:
        drv = root / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(drv, dev / "driver")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path, "edu", "0000:00:04.0")
    make_tree(tmp_path, "e1000e", "0000:00:05.0", driver="e1000e", group=4)
    make_tree(tmp_path, "nvme", "0000:00:06.0", driver="vfio-pci", group=5)
    return tmp_path / "devices"


def test_enumeration_from_dumps(tree: Path) -> None:
    devs = {d.address: d for d in devices(tree)}
    edu, nic, nvme = devs["0000:00:04.0"], devs["0000:00:05.0"], devs["0000:00:06.0"]
    assert (edu.ids, edu.class_code, edu.revision, edu.driver, edu.iommu_group) == (
        "1234:11e8",
        0x00FF00,
        0x10,
        None,
        3,
    )
    assert [(b.index, b.size, b.kind) for b in edu.bars] == [(0, 1 << 20, "memory")]
    assert nic.driver == "e1000e" and nic.numa_node == -1 and nic.driver_override is None
    assert [(b.index, b.kind) for b in nic.bars if b.index < 6] == [
        (0, "memory"),
        (1, "memory"),
        (2, "io"),
        (3, "memory"),
    ]
    assert nvme.config_size == 4096 and nvme.bars[0].is_64bit
    assert nic.to_dict()["bars"][2]["kind"] == "io"


def test_find_by_id_and_errors(tree: Path) -> None:
    assert find("1234:11e8", tree).address == "0000:00:04.0"
    with pytest.raises(
        DeviceNotFoundError, match=r"no PCI device 00:09\.0 \(0000:00:09\.0\) in .* `udrv list`"
    ):
        find("00:09.0", tree)
    with pytest.raises(DeviceNotFoundError, match="no PCI device with id 8086:1234"):
        find("8086:1234", tree)


def test_open_auto_refuses_kernel_bound_and_unbound_devices(tree: Path) -> None:
    with pytest.raises(
        DeviceBusyError, match=r"0000:00:05.0 is bound to e1000e; run `udrv bind 0000:00:05.0`"
    ):
        udrv.open("00:05.0", root=tree)
    with pytest.raises(DeviceBusyError, match="not bound to vfio-pci or uio_pci_generic"):
        udrv.open("00:04.0", root=tree)


def test_bridge_windows_and_extended_config(tmp_path: Path) -> None:
    make_tree(tmp_path, "pcie-root-port", "0000:00:09.0", driver="pcieport")
    (port,) = devices(tmp_path / "devices")
    assert [(b.index, b.size) for b in port.bars] == [(0, 4096)]
    assert [(w.index, w.kind, w.start, w.size, w.prefetchable) for w in port.windows] == [
        (13, "io", 0x1000, 0x1000, False),
        (14, "memory", 0xFE200000, 2 << 20, False),
        (15, "memory", 0xFE800000, 2 << 20, True),
    ]
    assert port.windows[2].is_64bit and port.has_extended_config
    assert port.pci_address == PciAddress(0, 0, 9, 0)
    cs = port.decode_config()
    assert cs.header_type == 1 and cs.bridge["secondary_bus"] == 1
    assert [c.offset for c in cs.capabilities] == [0x54, 0x48, 0x40, 0x100, 0x148]


def test_resource_flags_as_ioport_h_defines_them() -> None:
    # include/linux/ioport.h
    assert (IORESOURCE_IO, IORESOURCE_MEM, IORESOURCE_PREFETCH, IORESOURCE_MEM_64) == (
        0x100,
        0x200,
        0x2000,
        0x100000,
    )
    nvme = read_resources(DATA / "nvme.resource")
    assert [(r.index, r.kind, r.is_64bit, r.prefetchable, r.size) for r in nvme] == [
        (0, "memory", True, False, 16 << 10)
    ]
    e1000 = {r.index: r for r in read_resources(DATA / "e1000.resource")}
    assert e1000[1].is_io and e1000[1].size == 64 and e1000[6].is_rom and e1000[6].prefetchable


def test_malformed_resource_lines_are_skipped(tmp_path: Path) -> None:
    f = tmp_path / "resource"
    f.write_text("0x1000 0x1fff 0x200\ngarbage\n0x0 0x0 0x0\n0x2000 0x2fff 0x101\n")
    assert [(r.index, r.kind) for r in read_resources(f)] == [(0, "memory"), (3, "io")]
    assert read_resources(tmp_path / "missing") == []


def test_selectors_filter_devices(tree: Path) -> None:
    assert [d.address for d in devices(tree, "8086:10d3")] == ["0000:00:05.0"]
    assert [d.address for d in devices(tree, "00:06.0")] == ["0000:00:06.0"]
    assert devices(tree, "00:07.0") == [] and devices(tree / "nope") == []
    with pytest.raises(AddressError):
        devices(tree, "eth0")
    assert [d.address for d in find_all("1b36:0010", tree)] == ["0000:00:06.0"]
    with pytest.raises(DeviceNotFoundError, match=r"no PCI device 0000:00:09.0 in .*`udrv list`"):
        find_all("0000:00:09.0", tree)


def test_several_matches_must_be_picked_by_address(tmp_path: Path) -> None:
    make_tree(tmp_path, "edu", "0000:00:04.0")
    make_tree(tmp_path, "edu", "0000:00:05.0")
    assert len(find_all("1234:11e8", tmp_path / "devices")) == 2
    with pytest.raises(
        DeviceNotFoundError, match=r"2 devices have id 1234:11e8 \(0000:00:04.0, 0000:00:05.0\)"
    ):
        find("1234:11e8", tmp_path / "devices")


def test_a_vanished_device_is_left_out(tree: Path) -> None:
    (tree / "0000:00:04.0" / "vendor").unlink()  # half gone, as during hot unplug
    assert [d.address for d in devices(tree)] == ["0000:00:05.0", "0000:00:06.0"]
    with pytest.raises(DeviceNotFoundError, match="vendor is missing"):
        read_device(tree / "0000:00:04.0")


def test_to_dict_is_json(tree: Path) -> None:
    d = find("00:06.0", tree).to_dict()
    back = json.loads(json.dumps(d))
    assert back["ids"] == "1b36:0010" and back["driver"] == "vfio-pci" and back["iommu_group"] == 5
    assert back["bars"][0] == {
        "index": 0, "start": 0xFE624000, "end": 0xFE627FFF, "flags": 0x140204, "size": 16384,
        "kind": "memory", "is_64bit": True, "prefetchable": False,
    }  # fmt: skip
    assert back["has_extended_config"] is True and back["driver_override"] is None


def test_read_config(tree: Path) -> None:
    nic = find("00:05.0", tree)
    assert nic.read_config() == (DATA / "e1000e.config").read_bytes()
    assert nic.read_config(64) == (DATA / "e1000e.config").read_bytes()[:64]
    assert nic.decode_config().cap("Device Serial Number") is not None


SAMPLE_IDS = """\
# comment
1234  Technical Corp.
\t11e8  Edu device
8086  Intel Corporation
\t10d3  82574L Gigabit Network Connection
\t\t8086 a01f  Gigabit CT Desktop Adapter
1af4  Red Hat, Inc.
C 01  Mass storage controller
\t08  Non-Volatile memory controller
\t\t02  NVM Express
C 02  Network controller
\t00  Ethernet controller
C ff  Unassigned class
"""


def test_pci_ids_parsing_and_fallbacks() -> None:
    db = ids.PciIds.parse(SAMPLE_IDS)
    assert (
        ids.device_description(0x8086, 0x10D3, db)
        == "Intel Corporation 82574L Gigabit Network Connection"
    )
    assert ids.device_description(0x8086, 0x1234, db) == "Intel Corporation Device 1234"
    assert ids.device_description(0xABCD, 0x1, db) == "Device abcd:0001"
    assert ids.subsystem_description(0x8086, 0x10D3, 0x8086, 0xA01F, db) == (
        "Intel Corporation Gigabit CT Desktop Adapter"
    )
    assert (
        ids.subsystem_description(0x1234, 0x11E8, 0x1AF4, 0x1100, db) == "Red Hat, Inc. Device 1100"
    )
    assert ids.class_name(0x020000, db) == "Ethernet controller"
    assert ids.class_name(0x028000, db) == "Network controller"
    assert ids.class_name(0x0B4000, db) == "Class 0b40"
    assert ids.prog_if_name(0x010802, db) == "NVM Express"
    empty = ids.PciIds()
    assert (ids.vendor_name(0x8086, empty), ids.device_name(0x8086, 0x10D3, empty)) == (
        "8086",
        "10d3",
    )


def test_names_for_sysfs_devices(tree: Path) -> None:
    nic = find("00:05.0", tree)
    n = ids.names(nic, ids.PciIds.parse(SAMPLE_IDS))
    assert n == {"vendor_name": "Intel Corporation", "device_name": "82574L Gigabit Network Connection",
                 "class_name": "Ethernet controller"}  # fmt: skip


def test_installed_database_or_plain_hex(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ids.database.cache_clear()
    monkeypatch.setenv("UDRV_PCI_IDS", str(tmp_path / "pci.ids"))
    (tmp_path / "pci.ids").write_text(SAMPLE_IDS)
    try:
        assert ids.find_database() == tmp_path / "pci.ids"
        assert ids.vendor_name(0x1234) == "Technical Corp."
    finally:
        ids.database.cache_clear()
    monkeypatch.setattr(ids, "SEARCH_PATHS", ())
    monkeypatch.delenv("UDRV_PCI_IDS")
    try:
        assert ids.find_database() is None and ids.vendor_name(0x8086) == "8086"
    finally:
        ids.database.cache_clear()
