"""`udrv bind` refuses devices the host uses: fake sysfs/procfs trees laid out as the kernel's.

The layouts follow what the lab guest shows (tests/lab/test_bind_safety.py runs the same cases
on a real kernel): ``/sys/class/block/nvme0n1 -> ../../devices/pci0000:00/ADDR/nvme/nvme0/nvme0n1``,
``holders/dm-0 -> .../virtual/block/dm-0``, partitions as subdirectories with a ``partition``
file, net interfaces under ``ADDR/net/`` with ``master`` and ``upper_*`` links.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import sys
from pathlib import Path

import pytest

import udrv.core.bind as bind_mod
from udrv.core.bind import Sysfs, bind, restore, users_of
from udrv.core.inuse import Use
from udrv.errors import BindError, DeviceBusyError

NVME, NIC = "0000:00:04.0", "0000:00:05.0"


class FakeHost:
    """A sysfs + procfs tree: PCI functions, block devices and their stacks, NICs, routes."""

    def __init__(self, tmp: Path) -> None:
        self.sys, self.proc = tmp / "sys", tmp / "proc"
        self.sysfs = Sysfs(root=self.sys, proc=self.proc, dev=tmp / "dev", state=tmp / "run")
        (self.proc / "self").mkdir(parents=True)
        (self.proc / "net").mkdir()
        self.mountinfo = ["22 1 0:21 / /proc rw,relatime shared:12 - proc proc rw"]
        self.swaps = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
        self.route = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]  # fmt: skip
        self.if_inet6: list[str] = []
        self.ipv6_route: list[str] = []
        (self.sys / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True)
        self.flush()

    def flush(self) -> None:
        (self.proc / "self" / "mountinfo").write_text("\n".join(self.mountinfo) + "\n")
        (self.proc / "swaps").write_text("\n".join(self.swaps) + "\n")
        (self.proc / "net" / "route").write_text("\n".join(self.route) + "\n")
        (self.proc / "net" / "if_inet6").write_text("".join(f"{x}\n" for x in self.if_inet6))
        (self.proc / "net" / "ipv6_route").write_text("".join(f"{x}\n" for x in self.ipv6_route))

    def pci(self, address: str, driver: str, class_code: int, group: str = "") -> Path:
        dev = self.sys / "devices" / "pci0000:00" / address
        dev.mkdir(parents=True)
        (dev / "class").write_text(f"{class_code:#08x}\n")
        (dev / "driver_override").write_text("(null)\n")
        drv = self.sys / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(drv, dev / "driver")
        members = self.sys / "kernel" / "iommu_groups" / (group or address[-4:]) / "devices"
        members.mkdir(parents=True, exist_ok=True)
        os.symlink(dev, members / address)
        os.symlink(members.parent, dev / "iommu_group")
        (self.sys / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../devices/pci0000:00/{address}", self.sys / "bus/pci/devices" / address)
        return dev

    def block(self, where: Path, name: str, majmin: str, partition: int | None = None) -> Path:
        """A block device directory at ``where/name``, listed in /sys/class/block."""
        node = where / name
        (node / "holders").mkdir(parents=True)
        (node / "dev").write_text(f"{majmin}\n")
        if partition is not None:
            (node / "partition").write_text(f"{partition}\n")
        cls = self.sys / "class" / "block"
        cls.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(node, cls), cls / name)
        return node

    def nvme(self, address: str = NVME) -> Path:
        dev = self.pci(address, "nvme", 0x010802)
        return self.block(dev / "nvme" / "nvme0", "nvme0n1", "259:0")

    def holder(self, name: str, majmin: str, below: list[Path], **attrs: str) -> Path:
        """A virtual block device (dm, md, loop) holding ``below``; attrs: files like dm/name."""
        node = self.block(self.sys / "devices" / "virtual" / "block", name, majmin)
        for path, value in attrs.items():
            (node / path.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
            (node / path.replace("__", "/")).write_text(f"{value}\n")
        for b in below:
            os.symlink(os.path.relpath(node, b / "holders"), b / "holders" / name)
        return node

    def mount(self, majmin: str, mountpoint: str, source: str, fstype: str = "ext4") -> None:
        n = len(self.mountinfo) + 30
        self.mountinfo.append(f"{n} 1 {majmin} / {mountpoint} rw,relatime shared:{n} - "
                              f"{fstype} {source} rw")  # fmt: skip
        self.flush()

    def swap(self, path: str) -> None:
        self.swaps.append(f"{path:<40}partition\t1048572\t\t0\t\t-2")
        self.flush()

    def nic(self, address: str, iface: str, group: str = "") -> Path:
        dev = self.pci(address, "e1000", 0x020000, group)
        node = dev / "net" / iface
        node.mkdir(parents=True)
        os.symlink(dev, node / "device")
        self._classnet(node)
        return node

    def virtual_net(self, iface: str, below: list[Path], kind: str = "") -> Path:
        """A bond/bridge/VLAN ``iface``: ``master`` links (bond, bridge) or ``upper_*`` (VLAN)."""
        node = self.sys / "devices" / "virtual" / "net" / iface
        node.mkdir(parents=True)
        if kind:
            (node / kind).mkdir()
        for b in below:
            os.symlink(node, b / f"upper_{iface}")
            if kind in ("bonding", "bridge"):
                os.symlink(node, b / "master")
        self._classnet(node)
        return node

    def _classnet(self, node: Path) -> None:
        cls = self.sys / "class" / "net"
        cls.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(node, cls), cls / node.name)

    def route4(self, iface: str, dest: str, mask: str, gateway: str = "0.0.0.0") -> None:
        """A /proc/net/route row; addresses as the kernel prints them (raw __be32, %08X)."""
        d, g, m = (_be32(a) for a in (dest, gateway, mask))
        self.route.append(f"{iface}\t{d}\t{g}\t0003\t0\t0\t0\t{m}\t0\t0\t0")
        self.flush()


def _be32(addr: str) -> str:
    """How /proc/net/route prints an address: the network-order bytes read as a host int."""
    return f"{int.from_bytes(ipaddress.IPv4Address(addr).packed, sys.byteorder):08X}"


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def refusal(host: FakeHost, address: str) -> str:
    with pytest.raises(DeviceBusyError) as err:
        bind(address, sysfs=host.sysfs)
    return str(err.value)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """drivers_probe binds to what driver_override names, as the kernel does."""
    real = bind_mod._write

    def write(path: Path, value: str, what: str, hint: str) -> None:
        real(path, value, what, hint)
        if path.name == "drivers_probe":
            dev = path.parent / "devices" / value
            wanted = (dev / "driver_override").read_text().strip()
            if (dev / "driver").is_symlink():
                os.unlink(dev / "driver")
            os.symlink(path.parent / "drivers" / wanted, dev / "driver")

    monkeypatch.setattr(bind_mod, "_write", write)


# --- block ------------------------------------------------------------------------------------


def test_a_clean_nvme_is_taken(host: FakeHost, kernel: None) -> None:
    disk = host.nvme()
    host.block(disk, "nvme0n1p1", "259:1", partition=1)
    host.mount("8:1", "/", "/dev/sda1")  # another disk's filesystem is no reason to refuse
    host.swap("/swapfile")
    assert users_of(NVME, host.sysfs) == []
    assert bind(NVME, sysfs=host.sysfs) == [NVME]
    assert os.readlink(host.sys / "bus/pci/devices" / NVME / "driver").endswith("vfio-pci")
    assert json.loads((host.sysfs.state / f"{NVME}.json").read_text()) == {"driver": "nvme"}


def test_nvme_under_dm_linear_mounted_on_root(host: FakeHost) -> None:
    disk = host.nvme()
    host.holder("dm-0", "253:0", [disk], dm__name="x", dm__uuid="")
    host.mount("253:0", "/", "/dev/mapper/x")
    assert refusal(host, NVME) == (
        f"{NVME} backs nvme0n1 → dm-0 [x] (mounted on /); refusing: pass --force to take it anyway"
    )


def test_btrfs_found_by_its_source_when_major_minor_is_anonymous(host: FakeHost) -> None:
    disk = host.nvme()
    host.block(disk, "nvme0n1p2", "259:2", partition=2)
    host.mount("0:33", "/home", "/dev/nvme0n1p2", fstype="btrfs")
    assert "backs nvme0n1 → nvme0n1p2 (mounted on /home)" in refusal(host, NVME)


def test_mounted_partition_with_a_space_in_the_mount_point(host: FakeHost) -> None:
    disk = host.nvme()
    host.block(disk, "nvme0n1p1", "259:1", partition=1)
    host.block(disk, "nvme0n1p2", "259:2", partition=2)
    host.mount("259:2", r"/mnt/my\040data", "/dev/nvme0n1p2")
    host.mount("259:2", "/srv", "/dev/nvme0n1p2")  # a bind mount of the same filesystem
    msg = refusal(host, NVME)
    assert "backs nvme0n1 → nvme0n1p2 (mounted on /mnt/my data, /srv)" in msg
    assert "nvme0n1p1" not in msg


def test_nvme_under_md_raid_on_partitions_of_two_disks(host: FakeHost) -> None:
    disk = host.nvme()
    p1 = host.block(disk, "nvme0n1p1", "259:1", partition=1)
    other = host.block(host.sys / "devices" / "other", "sdb", "8:16")
    md = host.holder("md0", "9:0", [p1, other], md__level="raid1")
    assert md.is_dir()
    host.mount("9:0", "/var", "/dev/md0")
    assert "backs nvme0n1 → nvme0n1p1 → md0 (mounted on /var)" in refusal(host, NVME)


def test_lvm_two_level_holders(host: FakeHost) -> None:
    """LUKS on a partition, LVM on LUKS: nvme0n1p3 → dm-0 (crypt) → dm-1, dm-2 (volumes)."""
    disk = host.nvme()
    p3 = host.block(disk, "nvme0n1p3", "259:3", partition=3)
    crypt = host.holder("dm-0", "253:0", [p3], dm__name="luks-1", dm__uuid="CRYPT-LUKS2-ab-luks-1")
    host.holder("dm-1", "253:1", [crypt], dm__name="vg-root", dm__uuid="LVM-abc")
    host.holder("dm-2", "253:2", [crypt], dm__name="vg-swap", dm__uuid="LVM-abd")
    host.mount("253:1", "/", "/dev/mapper/vg-root")
    host.swap("/dev/dm-2")
    msg = refusal(host, NVME)
    assert (
        f"{NVME} backs nvme0n1 → nvme0n1p3 → dm-0 [luks-1] → dm-1 [vg-root] (mounted on /)" in msg
    )
    assert "backs nvme0n1 → nvme0n1p3 → dm-0 [luks-1] → dm-2 [vg-swap] (swap)" in msg


def test_swap_on_a_partition(host: FakeHost) -> None:
    disk = host.nvme()
    host.block(disk, "nvme0n1p2", "259:2", partition=2)
    host.swap("/dev/nvme0n1p2")
    assert refusal(host, NVME).startswith(f"{NVME} backs nvme0n1 → nvme0n1p2 (swap);")


def test_swap_on_a_holder_named_by_its_mapper_path(host: FakeHost) -> None:
    disk = host.nvme()
    host.holder("dm-3", "253:3", [disk], dm__name="cryptswap", dm__uuid="CRYPT-PLAIN-cryptswap")
    host.swap("/dev/mapper/cryptswap")
    assert "backs nvme0n1 → dm-3 [cryptswap] (swap)" in refusal(host, NVME)


def test_an_active_holder_that_nothing_mounts_still_counts(host: FakeHost) -> None:
    disk = host.nvme()
    host.holder("dm-0", "253:0", [disk], dm__name="x", dm__uuid="")
    host.holder("loop0", "7:0", [], loop__backing_file="/dev/nvme0n1")
    msg = refusal(host, NVME)
    assert "backs nvme0n1 → dm-0 [x] (active, not mounted; `dmsetup remove x` releases it)" in msg
    assert "backs nvme0n1 → loop0 (active, not mounted; `losetup -d /dev/loop0` releases it)" in msg


def test_nvme_multipath_head_outside_the_pci_function(host: FakeHost) -> None:
    """With native multipath the disk is nvme0n1 under the subsystem; the function has nvme0c0n1."""
    dev = host.pci(NVME, "nvme", 0x010802)
    host.block(dev / "nvme" / "nvme0", "nvme0c0n1", "259:1")
    host.block(host.sys / "devices" / "virtual" / "nvme-subsystem" / "nvme-subsys0", "nvme0n1",
               "259:0")  # fmt: skip
    host.mount("259:0", "/data", "/dev/nvme0n1")
    assert "backs nvme0n1 (mounted on /data)" in refusal(host, NVME)


def test_force_takes_a_used_device(host: FakeHost, kernel: None) -> None:
    disk = host.nvme()
    host.holder("dm-0", "253:0", [disk], dm__name="x", dm__uuid="")
    host.mount("253:0", "/", "/dev/mapper/x")
    refusal(host, NVME)
    assert os.readlink(host.sys / "bus/pci/devices" / NVME / "driver").endswith("nvme")
    assert bind(NVME, force=True, sysfs=host.sysfs) == [NVME]
    assert os.readlink(host.sys / "bus/pci/devices" / NVME / "driver").endswith("vfio-pci")


# --- network ----------------------------------------------------------------------------------


def test_nic_with_the_default_route(host: FakeHost) -> None:
    host.nic(NIC, "eth0")
    host.route4("eth0", "0.0.0.0", "0.0.0.0", gateway="10.9.9.1")
    host.route4("eth0", "10.9.9.0", "255.255.255.0")
    assert _be32("10.9.9.0") == ("0009090A" if sys.byteorder == "little" else "0A090900")
    msg = refusal(host, NIC)
    assert msg.startswith(f"{NIC} carries eth0 (the default route, route to 10.9.9.0/24);")


def test_nic_in_a_bond_without_addresses(host: FakeHost) -> None:
    eth0 = host.nic(NIC, "eth0")
    host.virtual_net("bond0", [eth0], kind="bonding")
    assert refusal(host, NIC) == (
        f"{NIC} carries eth0 → bond0 (bond bond0, configured without addresses); "
        "refusing: pass --force to take it anyway"
    )


def test_nic_in_a_bridge_with_the_default_route_on_the_bridge(host: FakeHost) -> None:
    eth0 = host.nic(NIC, "eth0")
    bond = host.virtual_net("bond0", [eth0], kind="bonding")
    host.virtual_net("br0", [bond], kind="bridge")
    host.route4("br0", "0.0.0.0", "0.0.0.0", gateway="192.168.1.1")
    host.route4("lo", "0.0.0.0", "0.0.0.0")  # not on the chain
    assert "carries eth0 → bond0 → br0 (the default route)" in refusal(host, NIC)


def test_nic_under_a_vlan_with_a_global_ipv6_address_and_default_route(host: FakeHost) -> None:
    eth0 = host.nic(NIC, "eth0")
    host.virtual_net("eth0.100", [eth0])
    host.if_inet6 = [
        "fe800000000000000000000000000001 02 40 20 80 eth0",  # link-local: not a use
        "20010db8000000000000000000000001 03 40 00 80 eth0.100",
    ]
    host.ipv6_route = [
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "20010db8000000000000000000000002 00000400 00000001 00000000 00000003 eth0.100",
        "ff000000000000000000000000000000 08 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0",
    ]
    host.flush()
    msg = refusal(host, NIC)
    assert "carries eth0 → eth0.100 (the IPv6 default route, address 2001:db8::1/64)" in msg
    assert "carries eth0 (" not in msg


def test_a_used_function_in_the_same_iommu_group_is_refused(host: FakeHost, kernel: None) -> None:
    """vfio-pci takes the whole group: port 0 of a dual-port NIC is the host's uplink."""
    host.nic("0000:00:10.0", "eth0", group="7")
    host.nic("0000:00:10.1", "eth1", group="7")
    host.route4("eth0", "0.0.0.0", "0.0.0.0", gateway="10.0.0.1")
    assert users_of("0000:00:10.1", host.sysfs) == []
    assert refusal(host, "0000:00:10.1").startswith(
        "0000:00:10.0 (in the IOMMU group of 0000:00:10.1) carries eth0 (the default route);"
    )
    # uio_pci_generic takes the one function only, so the uplink next to it is no obstacle.
    (host.sys / "bus" / "pci" / "drivers" / "uio_pci_generic").mkdir()
    assert bind("0000:00:10.1", "uio_pci_generic", sysfs=host.sysfs) == ["0000:00:10.1"]


def test_a_clean_nic_is_taken(host: FakeHost, kernel: None) -> None:
    host.nic(NIC, "eth0")
    host.route4("eth1", "0.0.0.0", "0.0.0.0")
    assert users_of(NIC, host.sysfs) == []
    assert bind(NIC, sysfs=host.sysfs) == [NIC]


def test_use_renders_block_and_net() -> None:
    assert str(Use("block", ("sda", "sda1"), "swap")) == "backs sda → sda1 (swap)"
    assert str(Use("net", ("eth0",), "the default route")) == "carries eth0 (the default route)"


# --- messages -----------------------------------------------------------------------------------


def test_unknown_device_is_echoed_as_typed(host: FakeHost) -> None:
    with pytest.raises(BindError, match=r"^no PCI device 0:0:1f\.0 \(0000:00:1f\.0\); `udrv list`"):
        bind("0:0:1f.0", sysfs=host.sysfs)
    with pytest.raises(BindError, match=r"^no PCI device 0000:00:1f\.0; `udrv list`"):
        bind("0000:00:1f.0", sysfs=host.sysfs)


def test_restore_of_a_device_udrv_did_not_bind_echoes_it(host: FakeHost) -> None:
    host.nvme()
    with pytest.raises(
        BindError, match=r"^udrv did not bind 0:4\.0 \(0000:00:04\.0\) \(no .*/run/"
    ):
        restore("0:4.0", sysfs=host.sysfs)


def test_refusal_echoes_the_address_as_typed(host: FakeHost) -> None:
    disk = host.nvme()
    host.swap("/dev/nvme0n1")
    assert refusal(host, "0:4.0").startswith(f"0:4.0 ({NVME}) backs nvme0n1 (swap)")
    assert disk.is_dir()


def deny(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on writes to driver_override fail with EACCES, as for a normal user."""
    real = Path.write_text

    def write_text(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if self.name == "driver_override":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_permission_denied_says_run_as_root(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.nvme()
    deny(monkeypatch)
    with pytest.raises(BindError) as err:
        bind(NVME, sysfs=host.sysfs)
    assert err.value.errno == errno.EACCES
    assert str(err.value) == (
        f"binding {NVME} to vfio-pci: writing 'vfio-pci' to "
        f"{host.sys}/bus/pci/devices/{NVME}/driver_override failed; changing a device's driver "
        f"needs root: run `sudo udrv bind {NVME} --user $USER` (--user lets $USER open the device "
        "afterwards without root): [EACCES] Permission denied"
    )


def test_permission_denied_with_uio_and_on_restore(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    host.nvme()
    (host.sys / "bus" / "pci" / "drivers" / "uio_pci_generic").mkdir()
    deny(monkeypatch)
    with pytest.raises(BindError, match=r"needs root: run `sudo udrv bind 0000:00:04.0 --driver "
                       r"uio_pci_generic`: \[EACCES\]"):  # fmt: skip
        bind(NVME, "uio_pci_generic", sysfs=host.sysfs)
    # bind remembered the nvme driver before the kernel refused; restore is refused the same way.
    with pytest.raises(BindError, match=r"needs root: run `sudo udrv restore 0000:00:04.0`"):
        restore(NVME, sysfs=host.sysfs)


def test_a_state_directory_that_cannot_be_made_is_a_bind_error(host: FakeHost) -> None:
    host.nvme()
    blocker = host.sysfs.state.parent / "blocker"
    blocker.touch()
    sysfs = Sysfs(host.sys, host.proc, host.sysfs.dev, blocker / "bind")
    with pytest.raises(
        BindError, match=r"binding 0000:00:04.0: cannot create .*/blocker/bind: \[ENOTDIR\]"
    ):
        bind(NVME, sysfs=sysfs)


def test_cli_refuses_user_with_uio(capsys: pytest.CaptureFixture[str]) -> None:
    from udrv.cli.main import main

    assert main(["bind", "0:4.0", "--driver", "uio_pci_generic", "--user", "nobody"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("udrv: error: --user gives a user the VFIO group of 0:4.0; with ")
    assert "bind to vfio-pci (the default) for unprivileged use" in err


def test_cli_echoes_an_out_of_range_address_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    from udrv.cli.main import main

    assert main(["bind", "0000:00:99.0"]) == 1
    assert capsys.readouterr().err.startswith(
        "udrv: error: '0000:00:99.0' is not a PCI address: device 99 is out of range"
    )
