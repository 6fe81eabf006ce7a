"""The CLI and binding on real kernels: lspci as the oracle, bind/restore, refusals, bad inputs.

Same devices as test_vfio.py (one guest runs them all): edu, e1000e, a two-function slot
00:10 (rtl8139 + e1000, one IOMMU group) and an nvme.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lspci_oracle import compare
from udrv.lab.pytest_plugin import bind
from udrv.pci.config import decode, describe
from udrv.pci.sysfs import find

from .conftest import BACKEND_DEVICES, E1000, RTL8139

pytestmark = pytest.mark.lab(*BACKEND_DEVICES)
SYS = Path("/sys/bus/pci/devices")


def udrv(*args: str, ok: bool = True, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `udrv` command (as ``user`` if given); check its exit status."""
    cmd = ["udrv", *args]
    if user:
        ids = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={ids.pw_uid}", f"--regid={ids.pw_gid}", "--clear-groups",
               shutil.which("udrv") or "udrv", *args]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1 and r.stderr.startswith("udrv: error: "), (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    return r


def driver_of(address: str) -> str | None:
    link = SYS / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def addresses(lab_devices: dict[str, str]) -> dict[str, str]:
    return {
        "edu": lab_devices["edu"],
        "e1000e": lab_devices["e1000e"],
        "nvme": lab_devices["nvme"],
        "rtl8139": RTL8139,
        "e1000": E1000,
    }


@pytest.fixture
def restored() -> Iterator[list[str]]:
    """Addresses to hand back (restore, else unbind) after the test; kernel modules removed."""
    todo: list[str] = []
    yield todo
    for address in todo:
        if subprocess.run(["udrv", "restore", address], capture_output=True).returncode:
            bind(address, None)
    subprocess.run(["umount", "/mnt"], capture_output=True)
    for module in ("e1000", "nvme"):
        subprocess.run(["rmmod", module], capture_output=True)


@pytest.mark.parametrize("name", ["edu", "e1000e", "rtl8139", "e1000", "nvme"])
def test_decoding_agrees_with_lspci(name: str, lab_devices: dict[str, str]) -> None:
    address = addresses(lab_devices)[name]
    lspci = subprocess.run(
        ["lspci", "-vvv", "-s", address], capture_output=True, text=True, check=True
    ).stdout
    info = find(address)
    cs = decode(info.read_config())
    compare(cs, lspci)
    # The lines `udrv info` prints for Control/Status, regions and the MSI/MSI-X/PM details
    # are lspci's, character for character.
    ours = {line.strip() for line in describe(cs, resources=info.bars)}
    want = [
        line.strip()
        for line in lspci.splitlines()
        if re.match(
            r"\t(Control|Status|Region \d)|\t\t(Vector table|PBA: |Address: |Flags: PMEClk)", line
        )
    ]
    assert want and [line for line in want if line not in ours] == []


def test_list_and_info(lab_devices: dict[str, str], restored: list[str]) -> None:
    devs = {d["address"]: d for d in json.loads(udrv("list", "--json").stdout)}
    for name, address in addresses(lab_devices).items():
        d = devs[address]
        vendor, device = (
            (SYS / address / "vendor").read_text(),
            (SYS / address / "device").read_text(),
        )
        assert (d["vendor"], d["device"]) == (int(vendor, 16), int(device, 16)), name
        group = int(os.path.basename(os.readlink(SYS / address / "iommu_group")))
        assert d["iommu_group"] == group and d["driver"] is None and d["ready_for"] == "bind first"
    assert devs[E1000]["iommu_group"] == devs[RTL8139]["iommu_group"]
    edu = lab_devices["edu"]
    restored.append(edu)
    udrv("bind", edu)
    after = {d["address"]: d for d in json.loads(udrv("list", "--json").stdout)}
    assert after[edu]["ready_for"] == "vfio" and after[edu]["driver"] == "vfio-pci"
    out = udrv("info", edu).stdout
    assert out.startswith(edu) and "Driver: vfio-pci" in out
    assert "Region 0: Memory at" in out and "[size=1M]" in out
    info = json.loads(udrv("info", lab_devices["nvme"], "--json").stdout)
    assert {"MSI-X", "PCI Express"} <= {c["name"] for c in info["capabilities"]}


def test_bind_peek_poke_config_restore(lab_devices: dict[str, str], restored: list[str]) -> None:
    edu = lab_devices["edu"]
    restored.append(edu)
    assert f"{edu}: bound to vfio-pci" in udrv("bind", edu[5:]).stdout
    assert driver_of(edu) == "vfio-pci"
    assert udrv("peek", edu, "0", "0").stdout.strip() == "0x010000ed"  # edu.txt: ident
    udrv("poke", edu, "0", "4", "0x12345678")  # edu.txt 0x04: liveness, reads back ~value
    assert udrv("peek", edu, "0", "4").stdout.strip() == "0xedcba987"
    udrv("poke", edu, "0", "0x80", "0x1122334455667788", "--width", "64")
    assert udrv("peek", edu, "0", "0x80", "--width", "64").stdout.strip() == "0x1122334455667788"
    assert udrv("config", edu, "0", "--width", "16").stdout.strip() == "0x1234"
    udrv("config", edu, "0x3c", "0x5a", "--width", "8")  # Interrupt Line: a scratch register
    assert udrv("config", edu, "0x3c", "--width", "8").stdout.strip() == "0x5a"
    assert (SYS / edu / "config").read_bytes()[0x3C] == 0x5A
    assert f"{edu}: back to no driver" in udrv("restore", edu).stdout
    assert driver_of(edu) is None
    # Over uio_pci_generic, the same peek works.
    udrv("bind", edu, "--driver", "uio_pci_generic")
    assert driver_of(edu) == "uio_pci_generic"
    assert udrv("peek", edu, "0", "0").stdout.strip() == "0x010000ed"
    udrv("restore", edu)
    assert driver_of(edu) is None


def test_group_binding_and_restore_of_the_kernel_driver(restored: list[str]) -> None:
    subprocess.run(["modprobe", "e1000"], check=True)
    assert driver_of(E1000) == "e1000"
    restored += [E1000, RTL8139]
    r = udrv("peek", E1000, "0", "8", ok=False)
    assert f"{E1000} is bound to e1000; run `udrv bind {E1000}`" in r.stderr
    out = udrv("bind", E1000, "--force").stdout  # --force: no default route here anyway
    # VFIO opens whole groups: the other function of the slot was bound too.
    assert f"{E1000}: bound to vfio-pci" in out and f"{RTL8139}: bound to vfio-pci" in out
    assert driver_of(E1000) == driver_of(RTL8139) == "vfio-pci"
    status = int(udrv("peek", E1000, "0", "8").stdout, 16)  # 8254x 13.4.2 STATUS
    assert status & 0x80000000 == 0x80000000 or status != 0
    # RTL8139 IDR0 (datasheet 6: ID registers, byte access): the MAC's first byte, 52 for
    # QEMU's default 52:54:00:..., through the I/O BAR and the memory BAR alike.
    assert udrv("peek", RTL8139, "0", "0", "--width", "8").stdout.strip() == "0x52"
    assert udrv("peek", RTL8139, "1", "1", "--width", "8").stdout.strip() == "0x54"
    assert f"{E1000}: back to e1000" in udrv("restore", E1000).stdout
    assert driver_of(E1000) == "e1000"
    udrv("restore", RTL8139)
    assert driver_of(RTL8139) is None


def test_refuses_the_default_route_interface(restored: list[str]) -> None:
    subprocess.run(["modprobe", "e1000"], check=True)
    restored.append(E1000)
    (iface,) = os.listdir(SYS / E1000 / "net")
    subprocess.run(["ip", "link", "set", iface, "up"], check=True)
    subprocess.run(["ip", "addr", "add", "10.9.9.1/24", "dev", iface], check=True)
    subprocess.run(["ip", "route", "add", "default", "via", "10.9.9.2", "dev", iface, "onlink"],
                   check=True)  # fmt: skip
    try:
        r = udrv("bind", E1000, ok=False)
        assert f"{E1000} carries {iface} (the default route, route to 10.9.9.0/24); " in r.stderr
        assert "refusing: pass --force" in r.stderr
        assert driver_of(E1000) == "e1000"
    finally:
        subprocess.run(["ip", "route", "del", "default"], check=False)
        subprocess.run(["ip", "addr", "flush", "dev", iface], check=False)
    udrv("bind", E1000)
    assert driver_of(E1000) == "vfio-pci"


def test_refuses_the_disk_of_a_mounted_filesystem(
    lab_devices: dict[str, str], restored: list[str]
) -> None:
    nvme = lab_devices["nvme"]
    subprocess.run(["modprobe", "nvme"], check=True)
    restored.append(nvme)
    (ctrl,) = os.listdir(SYS / nvme / "nvme")
    disk = f"/dev/{ctrl}n1"
    for _ in range(100):
        if os.path.exists(disk):
            break
        subprocess.run(["sleep", "0.1"])
    subprocess.run(["mkfs.ext4", "-q", "-F", disk], check=True)
    subprocess.run(["mount", disk, "/mnt"], check=True)
    r = udrv("bind", nvme, ok=False)
    assert f"{nvme} backs {ctrl}n1 (mounted on /mnt); refusing: pass --force" in r.stderr
    assert driver_of(nvme) == "nvme"
    subprocess.run(["umount", "/mnt"], check=True)
    udrv("bind", nvme)
    assert driver_of(nvme) == "vfio-pci"
    assert f"{nvme}: back to nvme" in udrv("restore", nvme).stdout


def test_unprivileged_user_needs_a_grant(lab_devices: dict[str, str], restored: list[str]) -> None:
    edu = lab_devices["edu"]
    os.chmod("/root", 0o755)  # the guest's overlay: lets 'nobody' run the shared Python
    restored.append(edu)
    udrv("bind", edu)
    group = os.path.basename(os.readlink(SYS / edu / "iommu_group"))
    r = udrv("peek", edu, "0", "0", ok=False, user="nobody")
    assert f"no permission on /dev/vfio/{group}" in r.stderr
    assert f"run `udrv bind {edu} --user $USER`" in r.stderr
    out = udrv("bind", edu, "--user", "nobody").stdout
    assert f"nobody may now open the VFIO group of {edu}" in out
    assert os.stat(f"/dev/vfio/{group}").st_uid == 65534
    assert udrv("peek", edu, "0", "0", user="nobody").stdout.strip() == "0x010000ed"


def test_bad_inputs_name_the_fix(lab_devices: dict[str, str], restored: list[str]) -> None:
    edu = lab_devices["edu"]
    r = udrv("peek", "0000:00:1e.0", "0", "0", ok=False)
    assert "no PCI device 0000:00:1e.0" in r.stderr and "`udrv list`" in r.stderr
    r = udrv("bind", "0000:00:1e.0", ok=False)
    assert "no PCI device 0000:00:1e.0" in r.stderr
    r = udrv("peek", edu, "0", "0", ok=False)
    assert f"run `udrv bind {edu}`" in r.stderr
    restored.append(edu)
    udrv("bind", edu)
    assert "BAR index 6 out of range" in udrv("peek", edu, "6", "0", ok=False).stderr
    assert "does not implement BAR1" in udrv("peek", edu, "1", "0", ok=False).stderr
    r = udrv("peek", edu, "0", "0x100000", ok=False)
    assert "outside the 1 MiB" in r.stderr
    r = udrv("peek", edu, "0", "2", ok=False)
    assert "not aligned to the 32-bit width" in r.stderr
    r = udrv("poke", edu, "0", "4", "0x100000000", ok=False)
    assert "does not fit in 32 bits" in r.stderr
    r = udrv("restore", lab_devices["e1000e"], ok=False)
    assert "did not bind" in r.stderr and "nothing to restore" in r.stderr
