"""Binding devices to the drivers user space needs (vfio-pci, uio_pci_generic) and back.

Uses ``driver_override`` + ``drivers_probe`` (Documentation/ABI/testing/sysfs-bus-pci), so
no new_id games: only this device is affected. For vfio-pci the whole IOMMU group is bound,
since VFIO only opens viable groups. The original driver is remembered in
``/run/udrv/bind/ADDRESS.json`` (tmpfs: it does not outlive a reboot, nor should it), and
:func:`restore` puts it back. Refuses to take away a device the host uses (a mounted
filesystem or swap on its disks or on what is stacked on them, routes or stacked interfaces on
its NICs: :mod:`udrv.core.inuse`), unless forced.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from udrv.core.inuse import Use, host_uses
from udrv.errors import BindError, DeviceBusyError
from udrv.pci.address import PciAddress, as_typed

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


def users_of(address: str, sysfs: Sysfs = SYSFS) -> list[Use]:
    """Why unbinding ``address`` would hurt the host (see :mod:`udrv.core.inuse`).

    Returns:
        Mounted filesystems, swap and active stacks on its disks; routes, addresses and
        stacked interfaces on its NICs. Empty when it is safe to take.
    """
    devpath = os.path.realpath(sysfs.pci / "devices" / address)
    return host_uses(sysfs.root, sysfs.proc, devpath)


def _denied(exc: OSError) -> bool:
    return exc.errno in (errno.EACCES, errno.EPERM)


def _root_hint(address: str, command: str, driver: str = "vfio-pci") -> str:
    """What to say when the kernel refuses a driver change: only root may make one."""
    if command == "bind" and driver == "vfio-pci":
        return (f"; changing a device's driver needs root: run `sudo udrv bind {address} --user "
                f"$USER` (--user lets $USER open the device afterwards without root)")  # fmt: skip
    again = f"bind {address} --driver {driver}" if command == "bind" else f"{command} {address}"
    return f"; changing a device's driver needs root: run `sudo udrv {again}`"


def _write(path: Path, value: str, what: str, hint: str) -> None:
    """Write a sysfs attribute; ``hint`` (from :func:`_root_hint`) is added on EACCES/EPERM."""
    try:
        path.write_text(value)
    except OSError as exc:
        hint = hint if _denied(exc) else ""
        raise BindError(
            f"{what}: writing {value.strip()!r} to {path} failed{hint}", errno=exc.errno
        ) from None


def _modprobe(driver: str, sysfs: Sysfs, address: str) -> None:
    if (sysfs.pci / "drivers" / driver).exists():
        return
    proc = subprocess.run(["modprobe", driver], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (sysfs.pci / "drivers" / driver).exists():
        hint = _root_hint(address, "bind", driver) if os.geteuid() else "; is the module installed?"
        raise BindError(
            f"the {driver} driver is not available: `modprobe {driver}` said "
            f"{proc.stderr.strip() or 'nothing'}{hint}"
        )


def _bind_one(address: str, driver: str, sysfs: Sysfs) -> None:
    dev = sysfs.pci / "devices" / address
    current = _driver(sysfs, address)
    if current == driver:
        return
    state = sysfs.state / f"{address}.json"
    root = _root_hint(address, "bind", driver)
    if not state.exists():
        try:
            sysfs.state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            hint = root if _denied(exc) else ""
            raise BindError(f"binding {address}: cannot create {sysfs.state}{hint}",
                            errno=exc.errno) from None  # fmt: skip
        _write(state, json.dumps({"driver": current}), f"binding {address}", root)
    _write(dev / "driver_override", driver, f"binding {address} to {driver}", root)
    if current:
        _write(dev / "driver" / "unbind", address, f"unbinding {address} from {current}", root)
    _write(sysfs.pci / "drivers_probe", address, f"probing {address}", root)
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
    typed = address
    address = str(PciAddress.parse(typed))
    if driver not in USER_DRIVERS:
        raise BindError(f"udrv binds to {' or '.join(USER_DRIVERS)}, not {driver!r}")
    if not (sysfs.pci / "devices" / address).exists():
        raise BindError(f"no PCI device {as_typed(typed)}; `udrv list` shows what there is")
    members = [address]
    if driver == "vfio-pci":
        members = [
            a for a in _group_members(sysfs, address) if a == address or not _is_bridge(sysfs, a)
        ]
    for a in members:
        uses = users_of(a, sysfs)
        if uses and not force:
            who = as_typed(typed) if a == address else f"{a} (in the IOMMU group of {address})"
            raise DeviceBusyError(
                f"{who} {', '.join(map(str, uses))}; refusing: pass --force to take it anyway"
            )
    _modprobe(driver, sysfs, address)
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
    """Give ``address`` back to the driver it had before :func:`bind`; returns that driver.

    Raises:
        BindError: udrv did not bind it, or the kernel refused (EACCES: run as root).
    """
    typed = address
    address = str(PciAddress.parse(typed))
    state = sysfs.state / f"{address}.json"
    try:
        original = json.loads(state.read_text())["driver"]
    except (OSError, ValueError, KeyError):
        raise BindError(
            f"udrv did not bind {as_typed(typed)} (no {state}); nothing to restore"
        ) from None
    dev = sysfs.pci / "devices" / address
    root = _root_hint(address, "restore")
    _write(dev / "driver_override", "\n", f"clearing driver_override of {address}", root)
    if _driver(sysfs, address):
        _write(dev / "driver" / "unbind", address, f"unbinding {address}", root)
    if original:
        _write(sysfs.pci / "drivers_probe", address, f"probing {address}", root)
        if _driver(sysfs, address) != original:
            raise BindError(f"{address} did not go back to {original}; see `dmesg`")
    state.unlink()
    return str(original) if original else None
