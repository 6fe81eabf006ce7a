"""`udrv bind` on a kernel-driven NVMe the host uses: device-mapper, swap, partitions.

The cases of issue 15 item 1, as a new user met them: a dm linear target on the kernel's NVMe
(`dmsetup create x --table "0 N linear /dev/nvme0n1 0"`), swap on the disk and on a partition.
Each must be refused with the chain in the message and the kernel's driver left in place; once
the stack is taken down, `udrv bind` takes the device. (md needs mdadm, which pulls in udev;
its holder layout is covered on the host in tests/host/test_bind_safety.py.)
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import bind

pytestmark = pytest.mark.lab("nvme:size=16M")
SYS = Path("/sys/bus/pci/devices")


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def udrv_bind(address: str, ok: bool) -> str:
    """`udrv bind ADDRESS`: its stdout when ``ok``, else its stderr (a refusal, not a crash)."""
    r = subprocess.run(["udrv", "bind", address], capture_output=True, text=True, timeout=120)
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
