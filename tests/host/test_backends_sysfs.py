"""udrv.open's backend choice and the sysfs/UIO backends, on a fake sysfs tree built from
config dumps captured in the lab (regular files stand in for ``config`` and ``resourceN``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import udrv
import udrv.backends.uio as bu
from udrv.backends import ConfigRegion, PortRegion
from udrv.backends.sysfs import SysfsDevice
from udrv.backends.uio import UioDevice
from udrv.core.device import RegionKind
from udrv.core.region import MmioRegion
from udrv.errors import (
    AddressError,
    BackendError,
    DeviceBusyError,
    DeviceNotFoundError,
    RegionError,
    UioError,
)
from udrv.open import choose_backend
from udrv.pci.sysfs import find

from .test_pci_sysfs import make_tree

PAGE = os.sysconf("SC_PAGE_SIZE")


def add_resources(root: Path, address: str) -> None:
    """resourceN files as the kernel has them: a memory BAR's file maps from the page that
    holds the BAR (so a sub-page BAR sits at start % PAGE); an I/O BAR's file is the ports."""
    dev = root / "devices" / address
    for i, line in enumerate((dev / "resource").read_text().splitlines()[:6]):
        start, end, flags = (int(x, 16) for x in line.split())
        if not flags:
            continue
        size = end - start + 1
        with open(dev / f"resource{i}", "wb") as f:
            f.truncate(size if flags & 0x100 else -(-(start % PAGE + size) // PAGE) * PAGE)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path, "edu", "0000:00:04.0")
    make_tree(tmp_path, "e1000e", "0000:00:05.0", driver="e1000e", group=4)
    make_tree(tmp_path, "nvme", "0000:00:06.0", driver="vfio-pci", group=5)
    make_tree(tmp_path, "rtl8139", "0000:00:07.0", driver="uio_pci_generic", group=6)
    for a in ("0000:00:04.0", "0000:00:05.0", "0000:00:07.0"):
        add_resources(tmp_path, a)
    return tmp_path / "devices"


# -- backend choice -----------------------------------------------------------------------


def test_auto_follows_the_binding(tree: Path) -> None:
    assert choose_backend(find("00:06.0", tree)) == "vfio"
    assert choose_backend(find("0000:00:07.0", tree)) == "uio"
    # An explicit backend is taken as asked (the backend itself then checks the binding).
    assert choose_backend(find("00:05.0", tree), "sysfs") == "sysfs"
    with pytest.raises(BackendError, match=r"unknown backend 'kvm'; use one of auto, vfio"):
        udrv.open("00:04.0", "kvm", root=tree)


# Each example builds a sysfs tree on disk: time varies with the machine's load, not the code.
@settings(deadline=None)
@given(driver=st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True))
def test_auto_refuses_every_other_driver_with_the_fix(
    tmp_path_factory: pytest.TempPathFactory, driver: str
) -> None:
    if driver in ("vfio-pci", "uio_pci_generic"):
        return
    root = tmp_path_factory.mktemp("t")
    make_tree(root, "edu", "0000:00:04.0", driver=driver)
    with pytest.raises(DeviceBusyError) as e:
        udrv.open("1234:11e8", root=root / "devices")
    assert str(e.value).startswith(
        f"0000:00:04.0 is bound to {driver}; run `udrv bind 0000:00:04.0`"
    )


def test_unbound_device_message(tree: Path) -> None:
    with pytest.raises(
        DeviceBusyError,
        match=r"^0000:00:04.0 is not bound to vfio-pci or uio_pci_generic; run `udrv bind 0000:00:04.0`$",
    ):
        udrv.open("00:04.0", root=tree)


def test_selectors(tree: Path, tmp_path: Path) -> None:
    for sel in ("0000:00:04.0", "00:04.0", "1234:11e8", " 1234:11E8 "):
        with udrv.open(sel, "sysfs", root=tree) as dev:
            assert dev.address == "0000:00:04.0"
    with pytest.raises(AddressError, match="'00:04' is neither"):
        udrv.open("00:04", root=tree)
    with pytest.raises(
        DeviceNotFoundError, match=r"no PCI device 00:1e.0 \(0000:00:1e.0\) .*`udrv list`"
    ):
        udrv.open("00:1e.0", root=tree)
    make_tree(tmp_path, "edu", "0000:00:08.0")
    with pytest.raises(
        DeviceNotFoundError, match=r"2 devices have id 1234:11e8 \(0000:00:04.0, 0000:00:08.0\)"
    ):
        udrv.open("1234:11e8", root=tree)


# -- sysfs backend -------------------------------------------------------------------------


def test_sysfs_is_read_only_by_default(tree: Path) -> None:
    dev_dir = tree / "0000:00:04.0"
    with open(dev_dir / "resource0", "r+b") as f:
        f.write((0x010000ED).to_bytes(4, "little"))
    before = (dev_dir / "config").read_bytes()
    with udrv.open("00:04.0", "sysfs", root=tree) as dev:
        assert isinstance(dev, SysfsDevice) and dev.backend == "sysfs"
        assert (dev.config.read16(0), dev.config.read16(2)) == (0x1234, 0x11E8)
        bar = dev.bar(0)
        assert isinstance(bar, MmioRegion) and bar.size == 1 << 20 and bar.index == 0
        assert bar.read32(0) == 0x010000ED
        assert dev.region_info(0).writable is False
        with pytest.raises(RegionError, match=r"BAR0 of 0000:00:04\.0 is read-only"):
            bar.write32(4, 1)
        with pytest.raises(RegionError, match=r"config space of 0000:00:04\.0 is read-only"):
            dev.config.write16(4, 0)
        with pytest.raises(BackendError, match="open it with writable=True"):
            (dev_dir / "reset").write_text("")
            dev.reset()
    assert (dev_dir / "config").read_bytes() == before
    with pytest.raises(RegionError, match="is closed"):
        bar.read32(0)


def test_sysfs_writable_writes_the_files(tree: Path) -> None:
    dev_dir = tree / "0000:00:04.0"
    with udrv.open("00:04.0", "sysfs", writable=True, root=tree) as dev:
        dev.bar(0).write32(4, 0xCAFE)
        dev.bar(0).write64(0x80, 0x1122334455667788)
        dev.config.write16(4, 0x0406)
        with pytest.raises(BackendError, match=r"no reset method for it \(.*/reset is missing\)"):
            dev.reset()
        (dev_dir / "reset").write_text("")
        dev.reset()
    assert (dev_dir / "reset").read_text() == "1"
    res0 = (dev_dir / "resource0").read_bytes()
    assert res0[4:8] == (0xCAFE).to_bytes(4, "little")
    assert res0[0x80:0x88] == (0x1122334455667788).to_bytes(8, "little")
    assert (dev_dir / "config").read_bytes()[4:6] == b"\x06\x04"


def test_sub_page_bar_sits_at_its_page_offset(tmp_path: Path) -> None:
    make_tree(tmp_path, "rtl8139", "0000:00:07.0")
    dev_dir = tmp_path / "devices" / "0000:00:07.0"
    # Move BAR1 (256 bytes) off the page boundary, as firmware may place a small BAR.
    lines = (dev_dir / "resource").read_text().splitlines()
    lines[1] = "0x00000000fe62b300 0x00000000fe62b3ff 0x0000000000040200"
    (dev_dir / "resource").write_text("\n".join(lines) + "\n")
    add_resources(tmp_path, "0000:00:07.0")
    with open(dev_dir / "resource1", "r+b") as f:
        f.seek(0x300)
        f.write(b"\x52\x54\x00\x12")
    with udrv.open("00:07.0", "sysfs", root=tmp_path / "devices") as dev:
        assert dev.bar(1).size == 0x100
        assert dev.bar(1).read32(0) == 0x12005452


def test_io_bar_is_a_port_region_without_64bit_access(tree: Path) -> None:
    dev_dir = tree / "0000:00:05.0"
    with open(dev_dir / "resource2", "r+b") as f:
        f.write(bytes(range(32)))
    with udrv.open("00:05.0", "sysfs", writable=True, root=tree) as dev:
        info = {b.index: b for b in dev.bars}
        assert sorted(info) == [0, 1, 2, 3]
        assert info[2].kind is RegionKind.IO and info[2].size == 32 and not info[2].mappable
        io = dev.bar(2)
        assert isinstance(io, PortRegion)
        assert (io.read8(1), io.read16(2), io.read32(4)) == (1, 0x0302, 0x07060504)
        with pytest.raises(RegionError, match="8-byte read at 0x8 refused: an I/O-port BAR"):
            io.read64(8)
        io.write(8, b"\xaa\xbb")  # bulk: byte by byte, as sysfs I/O files require
        assert io.read(8, 3) == b"\xaa\xbb\x0a"
        with pytest.raises(RegionError, match="config space takes 1, 2 or 4-byte"):
            dev.config.read64(0)
        with pytest.raises(RegionError, match="BAR index 6 out of range; BARs are 0-5"):
            dev.bar(6)
        with pytest.raises(RegionError, match=r"0000:00:05\.0 does not implement BAR4"):
            dev.bar(4)


def test_config_beyond_what_sysfs_gives_names_root(tree: Path, tmp_path: Path) -> None:
    # sysfs gives unprivileged users 64 bytes of config space; the file reads short there.
    fd = os.open(tmp_path / "short", os.O_RDWR | os.O_CREAT)
    os.write(fd, bytes(64))
    try:
        cfg = ConfigRegion(fd, name="config space of X", size=256, writable=False)
        assert cfg.read32(0x3C) == 0
        with pytest.raises(RegionError, match="run as root"):
            cfg.read32(0x40)
    finally:
        os.close(fd)


# -- UIO backend -----------------------------------------------------------------------------


def test_uio_opens_dev_uio_and_bars(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tree / "0000:00:07.0" / "uio" / "uio3").mkdir(parents=True)
    fake_dev = tmp_path / "dev"
    fake_dev.mkdir()
    (fake_dev / "uio3").write_bytes(b"")
    monkeypatch.setattr(bu, "DEV", fake_dev)
    dev = udrv.open("00:07.0", root=tree)
    assert isinstance(dev, UioDevice) and dev.backend == "uio" and dev.uio_name == "uio3"
    fd = dev.uio_fd
    os.fstat(fd)  # open
    dev.bar(1).write32(0, 0x12345678)  # writable: the device was handed to user space
    assert dev.bar(1).read32(0) == 0x12345678
    dev.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert dev.closed


def test_uio_errors_name_the_fix(tree: Path) -> None:
    with pytest.raises(
        UioError,
        match=r"0000:00:07.0 has no UIO node .*`udrv bind 0000:00:07.0 --driver uio_pci_generic`",
    ):
        udrv.open("00:07.0", root=tree)
    with pytest.raises(
        DeviceBusyError,
        match=r"0000:00:05.0 is bound to e1000e, not uio_pci_generic; run `udrv bind",
    ):
        udrv.open("00:05.0", "uio", root=tree)
    with pytest.raises(
        UioError, match=r"0000:00:04.0 is not bound to uio_pci_generic \(no driver\)"
    ):
        udrv.open("00:04.0", "uio", root=tree)


def test_uio_open_stops_the_device_then_frees_a_dead_drivers_buffers(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that died left bus mastering on and its DMA buffers' files behind: opening
    the device clears Bus Master Enable, then frees them (issue 13)."""
    from udrv.dma import hugepage as H

    (tree / "0000:00:07.0" / "uio" / "uio3").mkdir(parents=True)
    fake_dev = tmp_path / "dev"
    fake_dev.mkdir()
    (fake_dev / "uio3").write_bytes(b"")
    monkeypatch.setattr(bu, "DEV", fake_dev)
    config = tree / "0000:00:07.0" / "config"
    raw = bytearray(config.read_bytes())
    raw[4] |= 0x04  # PCI_COMMAND_MASTER, as the dead driver left it
    config.write_bytes(raw)
    H.HUGETLBFS.mkdir(parents=True, exist_ok=True)
    left = [H.HUGETLBFS / f"udrv-0000:00:07.0-4242-{i}" for i in range(2)]
    other = H.HUGETLBFS / "udrv-0000:00:04.0-4242-0"  # another device's: not touched
    for p in (*left, other):
        p.write_bytes(b"")
    seen: list[tuple[int, bool]] = []
    quiesce = UioDevice._quiesce

    def spy(self: UioDevice) -> None:
        quiesce(self)
        seen.append((config.read_bytes()[4] & 0x04, all(p.exists() for p in left)))

    monkeypatch.setattr(UioDevice, "_quiesce", spy)
    dev = udrv.open("00:07.0", root=tree)
    try:
        assert seen == [(0, True)]  # BME off while the buffers still existed
        assert not any(p.exists() for p in left) and other.exists()
    finally:
        dev.close()
