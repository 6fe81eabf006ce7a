"""`udrv bind` on devices the host uses: an NVMe under device-mapper, swap and partitions; an
e1000 in a bridge; and what a normal user is told.

The cases of issue 15 item 1, as a new user met them: a dm linear target on the kernel's NVMe
(`dmsetup create x --table "0 N linear /dev/nvme0n1 0"`), swap on the disk and on a partition.
Each must be refused with the chain in the message and the kernel's driver left in place; once
the stack is taken down, `udrv bind` takes the device. md arrays are assembled
through md's sysfs interface (Documentation/admin-guide/md.rst), since mdadm pulls in udev.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from udrv.lab.pytest_plugin import bind

pytestmark = pytest.mark.lab("nvme:size=16M", "e1000")
SYS = Path("/sys/bus/pci/devices")


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def udrv_bind(address: str, ok: bool, *prefix: str) -> str:
    """`udrv bind ADDRESS`: its stdout when ``ok``, else its stderr (a refusal, not a crash)."""
    udrv = shutil.which("udrv") or "udrv"
    r = subprocess.run([*prefix, udrv, "bind", address], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    if ok:
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert r.returncode == 1 and r.stderr.startswith("udrv: error: "), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def driver_of(address: str) -> str | None:
    link = SYS / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


@pytest.fixture
def disk(lab_devices: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(address, /dev/nvmeXn1) with the kernel's nvme driver; everything undone afterwards."""
    address = lab_devices["nvme"]
    run("modprobe", "nvme")
    run("modprobe", "dm-mod")
    (ctrl,) = os.listdir(SYS / address / "nvme")
    node = f"/dev/{ctrl}n1"
    deadline = time.monotonic() + 20
    while not os.path.exists(node):
        assert time.monotonic() < deadline, f"{node} did not appear after modprobe nvme"
        time.sleep(0.1)
    yield address, node
    subprocess.run(["swapoff", "-a"], capture_output=True)
    subprocess.run(["umount", "/mnt"], capture_output=True)
    subprocess.run(["dmsetup", "remove_all"], capture_output=True)
    if subprocess.run(["udrv", "restore", address], capture_output=True).returncode:
        bind(address, None)
    subprocess.run(["rmmod", "nvme"], capture_output=True)


def sectors(node: str) -> int:
    return int(run("blockdev", "--getsz", node))


def test_refuses_nvme_under_a_dm_linear_target(disk: tuple[str, str]) -> None:
    address, node = disk
    name = os.path.basename(node)
    run("dmsetup", "create", "x", "--table", f"0 {sectors(node)} linear {node} 0")
    (dm,) = os.listdir(f"/sys/class/block/{name}/holders")
    # Active but not mounted: the kernel would fail every I/O of dm-0 once the disk is gone.
    err = udrv_bind(address, ok=False)
    assert f"{address} backs {name} → {dm} [x] (active, not mounted; `dmsetup remove x`" in err
    assert "refusing: pass --force to take it anyway" in err
    assert driver_of(address) == "nvme"
    # Mounted: the message names the mount point.
    run("mkfs.ext4", "-q", "-F", f"/dev/{dm}")
    run("mount", f"/dev/{dm}", "/mnt")
    err = udrv_bind(address, ok=False)
    assert f"{address} backs {name} → {dm} [x] (mounted on /mnt); refusing" in err
    assert driver_of(address) == "nvme"
    run("umount", "/mnt")
    run("dmsetup", "remove", "x")
    assert f"{address}: bound to vfio-pci" in udrv_bind(address, ok=True)
    assert driver_of(address) == "vfio-pci"


def test_refuses_nvme_with_swap_on_it(disk: tuple[str, str]) -> None:
    address, node = disk
    run("mkswap", node)
    run("swapon", node)
    err = udrv_bind(address, ok=False)
    assert f"{address} backs {os.path.basename(node)} (swap); refusing" in err
    assert driver_of(address) == "nvme"
    run("swapoff", node)
    udrv_bind(address, ok=True)
    assert driver_of(address) == "vfio-pci"


def md_array(name: str, member: str, kib: int) -> None:
    """A one-disk RAID1 without a superblock, through sysfs (md.rst "md devices in sysfs")."""
    run("modprobe", "raid1")
    Path("/sys/module/md_mod/parameters/new_array").write_text(name)
    md = Path("/sys/block") / name / "md"
    for attr, value in (("metadata_version", "none"), ("level", "raid1"), ("raid_disks", "1"),
                        ("new_dev", Path(f"/sys/class/block/{member}/dev").read_text().strip())):  # fmt: skip
        (md / attr).write_text(value)
    (md / f"dev-{member}" / "slot").write_text("0")
    (md / f"dev-{member}" / "size").write_text(str(kib))
    (md / "component_size").write_text(str(kib))
    (md / "array_state").write_text("active")


def test_refuses_nvme_in_an_md_array(disk: tuple[str, str]) -> None:
    address, node = disk
    name = os.path.basename(node)
    md_array("md0", name, 8192)
    try:
        err = udrv_bind(address, ok=False)
        assert f"{address} backs {name} → md0 (active, not mounted; `mdadm --stop /dev/md0`" in err
        run("mkfs.ext4", "-q", "-F", "/dev/md0")
        run("mount", "/dev/md0", "/mnt")
        err = udrv_bind(address, ok=False)
        assert f"{address} backs {name} → md0 (mounted on /mnt); refusing" in err
        assert driver_of(address) == "nvme"
        run("umount", "/mnt")
    finally:
        subprocess.run(["umount", "/mnt"], capture_output=True)
        Path("/sys/block/md0/md/array_state").write_text("clear")  # stops it (md.rst)
    udrv_bind(address, ok=True)
    assert driver_of(address) == "vfio-pci"


def write_mbr(node: str, partitions: list[tuple[int, int, int]]) -> None:
    """Primary partitions (start, sectors, type) in a classic MBR (UEFI spec 2.10 §5.2.1)."""
    table = b"".join(
        bytes([0x00, 0, 0, 0, kind, 0, 0, 0])
        + start.to_bytes(4, "little")
        + n.to_bytes(4, "little")
        for start, n, kind in partitions
    )
    with open(node, "r+b") as f:
        f.write(bytes(446) + table.ljust(64, b"\0") + b"\x55\xaa")
    run("blockdev", "--rereadpt", node)


def test_refuses_swap_on_a_partition_and_dm_on_another(disk: tuple[str, str]) -> None:
    address, node = disk
    name = os.path.basename(node)
    half = sectors(node) // 2
    # 0x82: Linux swap, 0x83: Linux (the partition types of the MBR's type byte).
    write_mbr(node, [(2048, half - 2048, 0x82), (half, half, 0x83)])
    deadline = time.monotonic() + 10
    while not os.path.exists(f"{node}p2"):
        assert time.monotonic() < deadline, f"{node}p2 did not appear after BLKRRPART"
        time.sleep(0.1)
    run("mkswap", f"{node}p1")
    run("swapon", f"{node}p1")
    run("dmsetup", "create", "y", "--table", f"0 1024 linear {node}p2 0")
    err = udrv_bind(address, ok=False)
    assert f"backs {name} → {name}p1 (swap)" in err
    assert f"backs {name} → {name}p2 → dm-" in err and "[y] (active, not mounted" in err
    assert driver_of(address) == "nvme"
    run("swapoff", f"{node}p1")
    run("dmsetup", "remove", "y")
    udrv_bind(address, ok=True)
    assert driver_of(address) == "vfio-pci"


@pytest.fixture
def nic(lab_devices: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(address, interface) of the e1000 with the kernel's driver; undone afterwards."""
    address = lab_devices["e1000"]
    run("modprobe", "e1000")
    deadline = time.monotonic() + 20
    while not (SYS / address / "net").is_dir():
        assert time.monotonic() < deadline, f"{address} has no net/ after modprobe e1000"
        time.sleep(0.1)
    (iface,) = os.listdir(SYS / address / "net")
    yield address, iface
    subprocess.run(["ip", "link", "del", "br0"], capture_output=True)
    if subprocess.run(["udrv", "restore", address], capture_output=True).returncode:
        bind(address, None)
    subprocess.run(["rmmod", "e1000"], capture_output=True)


def test_refuses_a_nic_in_a_bridge(nic: tuple[str, str]) -> None:
    address, iface = nic
    run("modprobe", "bridge")
    run("ip", "link", "add", "br0", "type", "bridge")
    run("ip", "link", "set", iface, "master", "br0")
    err = udrv_bind(address, ok=False)
    assert f"{address} carries {iface} → br0 (bridge br0, configured without addresses)" in err
    run("ip", "link", "set", "br0", "up")
    run("ip", "addr", "add", "10.7.7.1/24", "dev", "br0")
    run("ip", "route", "add", "default", "via", "10.7.7.2", "dev", "br0")
    err = udrv_bind(address, ok=False)
    assert f"{address} carries {iface} → br0 (the default route, route to 10.7.7.0/24)" in err
    assert driver_of(address) == "e1000"
    run("ip", "link", "set", iface, "nomaster")
    udrv_bind(address, ok=True)
    assert driver_of(address) == "vfio-pci"


def test_a_normal_user_is_told_to_use_root(lab_devices: dict[str, str]) -> None:
    address = lab_devices["nvme"]
    os.chmod("/root", 0o755)  # the guest's overlay: lets 'nobody' run the shared Python
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    before = driver_of(address)
    err = udrv_bind(address, False, *nobody)
    assert f"needs root: run `sudo udrv bind {address} --user $USER`" in err
    assert driver_of(address) == before
