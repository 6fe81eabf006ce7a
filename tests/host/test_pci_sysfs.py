"""PCI addresses, selectors, and enumeration of a fake sysfs tree built from lab dumps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import udrv
from udrv.errors import AddressError, DeviceBusyError, DeviceNotFoundError
from udrv.pci.address import IdFilter, PciAddress, parse_selector
from udrv.pci.sysfs import devices, find

DATA = Path(__file__).parent / "data" / "pci"


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_address_round_trip(d: int, b: int, s: int, f: int) -> None:
    addr = PciAddress(d, b, s, f)
    assert PciAddress.parse(str(addr)) == addr
    if d == 0:
        assert PciAddress.parse(str(addr)[5:]) == addr


@pytest.mark.parametrize("text", ["00:04", "0000:00:04.8", "zz:04.0", "1234:11e8:0", "", "00:20.0"])
def test_bad_selectors_name_the_forms(text: str) -> None:
    with pytest.raises(AddressError, match=r"0000:00:04\.0, 00:04\.0, or a vendor:device"):
        parse_selector(text) if "." in text else PciAddress.parse(text)


def test_selector_kinds() -> None:
    assert parse_selector("1234:11e8") == IdFilter(0x1234, 0x11E8)
    assert parse_selector("00:04.0") == PciAddress(0, 0, 4, 0)


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
    with pytest.raises(DeviceNotFoundError, match=r"no PCI device 0000:00:09\.0 .* `udrv list`"):
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
