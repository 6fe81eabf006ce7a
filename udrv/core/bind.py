"""Binding devices to the drivers user space needs (vfio-pci, uio_pci_generic) and back.

Uses ``driver_override`` + ``drivers_probe`` (Documentation/ABI/testing/sysfs-bus-pci), so
no new_id games: only this device is affected. For vfio-pci the whole IOMMU group is bound,
since VFIO only opens viable groups. The original driver is remembered in
``/run/udrv/bind/ADDRESS.json`` (tmpfs: it does not outlive a reboot, nor should it), and
:func:`restore` puts it back. Refuses to take away a device that backs a mounted filesystem
or carries the default route, unless forced.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from udrv.errors import BindError, DeviceBusyError
from udrv.pci.address import PciAddress

USER_DRIVERS = ("vfio-pci", "uio_pci_generic")


@dataclass
class Sysfs:
    """Where the kernel's files are (tests point these at a fake tree)."""

    root: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")
    state: Path = Path("/run/udrv/bind")

    @property
    def pci(self) -> Path:
        return self.root / "bus" / "pci"


SYSFS = Sysfs()  # the real one


def _driver(sysfs: Sysfs, address: str) -> str | None:
    link = sysfs.pci / "devices" / address / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def _group_members(sysfs: Sysfs, address: str) -> list[str]:
    link = sysfs.pci / "devices" / address / "iommu_group"
    if not link.is_symlink():
        return [address]
    return sorted(os.listdir(link / "devices"))


def _is_bridge(sysfs: Sysfs, address: str) -> bool:
    cls = (sysfs.pci / "devices" / address / "class").read_text().strip()
    return int(cls, 16) >> 16 == 0x06  # base class 06: bridges may stay with their driver


def users_of(address: str, sysfs: Sysfs = SYSFS) -> list[str]:
    """Why unbinding ``address`` would hurt: mounted filesystems and the default route on it."""
    devpath = os.path.realpath(sysfs.pci / "devices" / address)
    found = []
    # Block devices: mountinfo gives major:minor; /sys/dev/block/M:m resolves to the device path.
    mountinfo = sysfs.proc / "self" / "mountinfo"
    for line in mountinfo.read_text().splitlines() if mountinfo.exists() else []:
        parts = line.split()
        majmin, mountpoint = parts[2], parts[4]
        blk = sysfs.root / "dev" / "block" / majmin
        if blk.exists() and os.path.realpath(blk).startswith(devpath + "/"):
            found.append(f"backs the filesystem mounted at {mountpoint}")
    route = sysfs.proc / "net" / "route"
    for line in route.read_text().splitlines()[1:] if route.exists() else []:
        iface, dest = line.split()[:2]
        netdev = sysfs.root / "class" / "net" / iface / "device"
        if dest == "00000000" and netdev.exists() and os.path.realpath(netdev) == devpath:
            found.append(f"carries {iface}, the default route")
    return found


def _write(path: Path, value: str, what: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise BindError(
            f"{what}: writing {value.strip()!r} to {path} failed", errno=exc.errno
        ) from None


def _modprobe(driver: str, sysfs: Sysfs) -> None:
    if (sysfs.pci / "drivers" / driver).exists():
        return
    proc = subprocess.run(["modprobe", driver], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (sysfs.pci / "drivers" / driver).exists():
        raise BindError(
            f"the {driver} driver is not available: `modprobe {driver}` said "
            f"{proc.stderr.strip() or 'nothing'}; is the module installed?"
        )


def _bind_one(address: str, driver: str, sysfs: Sysfs) -> None:
    dev = sysfs.pci / "devices" / address
    current = _driver(sysfs, address)
    if current == driver:
        return
    state = sysfs.state / f"{address}.json"
    if not state.exists():
        sysfs.state.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"driver": current}))
    _write(dev / "driver_override", driver, f"binding {address} to {driver}")
    if current:
        _write(dev / "driver" / "unbind", address, f"unbinding {address} from {current}")
    _write(sysfs.pci / "drivers_probe", address, f"probing {address}")
    if _driver(sysfs, address) != driver:
        raise BindError(f"{address} did not bind to {driver}; see `dmesg` for why")


def bind(address: str, driver: str = "vfio-pci", *, user: str | None = None, force: bool = False,
         sysfs: Sysfs = SYSFS) -> list[str]:  # fmt: skip
    """Bind ``address`` (and for vfio-pci its whole IOMMU group) to ``driver``.

    Returns:
        The addresses bound.

    Raises:
        BindError: unknown driver, module missing, or the kernel refused.
        DeviceBusyError: the device (or a group member) is in use and ``force`` is not set.
    """
    address = str(PciAddress.parse(address))
    if driver not in USER_DRIVERS:
        raise BindError(f"udrv binds to {' or '.join(USER_DRIVERS)}, not {driver!r}")
    if not (sysfs.pci / "devices" / address).exists():
        raise BindError(f"no PCI device {address}; `udrv list` shows what there is")
    members = [address]
    if driver == "vfio-pci":
        members = [
            a for a in _group_members(sysfs, address) if a == address or not _is_bridge(sysfs, a)
        ]
    for a in members:
        why = users_of(a, sysfs)
        if why and not force:
            raise DeviceBusyError(f"{a} {'; '.join(why)}; pass --force to unbind it anyway")
    _modprobe(driver, sysfs)
    for a in members:
        _bind_one(a, driver, sysfs)
    if user is not None and driver == "vfio-pci":
        grant(address, user, sysfs)
    return members


def grant(address: str, user: str, sysfs: Sysfs = SYSFS) -> str:
    """Let ``user`` open the device's VFIO group; returns a warning if memlock is too low."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise BindError(f"no user {user!r}") from None
    group = os.path.basename(os.readlink(sysfs.pci / "devices" / address / "iommu_group"))
    node = sysfs.dev / "vfio" / group
    try:
        os.chown(node, pw.pw_uid, pw.pw_gid)
    except OSError as exc:
        raise BindError(f"cannot give {node} to {user}", errno=exc.errno) from None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < 64 << 20:
        return (f"warning: the memlock limit is {soft >> 10} KiB; DMA buffers are pinned memory. "
                f"Raise it for {user}: `ulimit -l unlimited`, or a limits.d entry "
                f"'{user} - memlock unlimited'")  # fmt: skip
    return ""


def restore(address: str, sysfs: Sysfs = SYSFS) -> str | None:
    """Give ``address`` back to the driver it had before :func:`bind`; returns that driver."""
    address = str(PciAddress.parse(address))
    state = sysfs.state / f"{address}.json"
    try:
        original = json.loads(state.read_text())["driver"]
    except (OSError, ValueError, KeyError):
        raise BindError(f"udrv did not bind {address} (no {state}); nothing to restore") from None
    dev = sysfs.pci / "devices" / address
    _write(dev / "driver_override", "\n", f"clearing driver_override of {address}")
    if _driver(sysfs, address):
        _write(dev / "driver" / "unbind", address, f"unbinding {address}")
    if original:
        _write(sysfs.pci / "drivers_probe", address, f"probing {address}")
        if _driver(sysfs, address) != original:
            raise BindError(f"{address} did not go back to {original}; see `dmesg`")
    state.unlink()
    return str(original) if original else None
