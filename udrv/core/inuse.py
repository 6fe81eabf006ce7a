"""What the host uses a PCI function for: the check `udrv bind` makes before taking it.

Taking a device from its kernel driver removes everything stacked on it, so the check follows
the stacks, not just the device's own nodes:

- **Block**: every block device whose sysfs directory lies under the PCI function (NVMe
  namespaces, virtio-blk disks, AHCI/SCSI disks), their partitions, and what holds them,
  followed through ``holders/`` recursively (device-mapper: dm-crypt, LVM, multipath; md;
  bcache; Documentation/ABI/testing/sysfs-block "holders") and through loop devices whose
  backing file is one of them (``loop/backing_file``, which registers no holder). Each is looked
  up in ``/proc/self/mountinfo`` by major:minor *and* by source (btrfs reports an anonymous
  0:N device there; Documentation/filesystems/proc.rst 3.5) and in ``/proc/swaps``. A holder
  at the end of a chain that is neither mounted nor swap still counts: it is active, and
  removing the disk under it fails its I/O.
- **Network**: every interface under the PCI function and the interfaces stacked on it,
  followed through ``master`` and ``upper_*`` links recursively (bond, bridge, team, VLAN,
  macvlan; Documentation/ABI/testing/sysfs-class-net), each looked up for IPv4 routes
  (``/proc/net/route``, which carries the prefix route of every address), an IPv6 default
  route (``/proc/net/ipv6_route``) and global IPv6 addresses (``/proc/net/if_inet6``). An
  interface stacked on the NIC counts even without addresses: it was configured on purpose.

Everything is read from a sysfs root and a procfs root given as arguments, so tests run the
check on fake trees.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: NVMe multipath: the per-controller path device is nvme<subsys>c<ctrl>n<ns>, the disk the host
#: uses is nvme<subsys>n<ns> under the subsystem (drivers/nvme/host/multipath.c,
#: nvme_mpath_set_disk_name), outside the PCI function's directory.
_NVME_PATH = re.compile(r"nvme(\d+)c\d+n(\d+)")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Use:
    """One way the host uses a device.

    Attributes:
        kind: ``"block"`` or ``"net"``.
        chain: the device's own node first, then what is stacked on it, to the one in use
            (``("nvme0n1", "nvme0n1p2", "dm-0 [root]")``).
        what: how the last one is used (``"mounted on /"``, ``"swap"``, ``"the default route"``).
    """

    kind: Literal["block", "net"]
    chain: tuple[str, ...]
    what: str

    def __str__(self) -> str:
        verb = "backs" if self.kind == "block" else "carries"
        return f"{verb} {' → '.join(self.chain)} ({self.what})"


def _unescape(field: str) -> str:
    """Undo the octal escapes of mountinfo and /proc/swaps (``\\040`` for a space)."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _under(path: Path, devpath: str) -> bool:
    return os.path.realpath(path).startswith(devpath + "/")


def _chain(parent: dict[str, str | None], name: str) -> list[str]:
    out = [name]
    while (up := parent[out[-1]]) is not None:
        out.append(up)
    return out[::-1]


# --- block -----------------------------------------------------------------------------------


def _block_roots(root: Path, devpath: str) -> list[str]:
    """The PCI function's own disks (not partitions), by their kernel names."""
    cls = root / "class" / "block"
    names = {n for n in _listdir(cls) if _under(cls / n, devpath)}
    # NVMe controllers hold their namespaces here even when /sys/class/block is incomplete.
    for ctrl in Path(devpath).glob("nvme/nvme*"):
        names.update(p.name for p in ctrl.glob("nvme*") if (p / "dev").exists())
    for name in list(names):
        if (m := _NVME_PATH.fullmatch(name)) and (cls / f"nvme{m[1]}n{m[2]}").exists():
            names.add(f"nvme{m[1]}n{m[2]}")
    return sorted(n for n in names if not (cls / n / "partition").exists())


def _block_children(cls: Path, name: str, loops: dict[str, list[str]]) -> list[str]:
    """Partitions of ``name``, its holders, and loop devices backed by it."""
    real = Path(os.path.realpath(cls / name))
    parts = [p for p in _listdir(real) if (real / p / "partition").exists()]
    holders = [os.path.basename(os.path.realpath(cls / name / "holders" / h))
               for h in _listdir(cls / name / "holders")]  # fmt: skip
    return parts + holders + loops.get(name, [])


def _release_hint(cls: Path, name: str) -> str:
    """How to stop a holder, by its kind (device-mapper target owner, md, loop)."""
    if (dm := _text(cls / name / "dm" / "name")) is not None:
        uuid = _text(cls / name / "dm" / "uuid") or ""
        if uuid.startswith("CRYPT-"):
            return f"`cryptsetup close {dm}`"
        if uuid.startswith("LVM-"):
            return f"`lvchange -an` /dev/mapper/{dm}, or `vgchange -an` its volume group"
        return f"`dmsetup remove {dm}`"
    if (cls / name / "md").is_dir():
        return f"`mdadm --stop /dev/{name}`"
    if (cls / name / "loop").is_dir():
        return f"`losetup -d /dev/{name}`"
    return f"stopping /dev/{name}"


def block_uses(root: Path, proc: Path, devpath: str) -> list[Use]:
    """The mounts, swap areas and active stacks that the disks under ``devpath`` back.

    Args:
        root: the sysfs root (``/sys``).
        proc: the procfs root (``/proc``).
        devpath: the PCI function's resolved sysfs directory.

    Returns:
        One :class:`Use` per mounted or swap device and per active holder at the end of a
        chain, in chain order.
    """
    cls = root / "class" / "block"
    loops: dict[str, list[str]] = {}
    for loop in _listdir(cls):
        backing = _text(cls / loop / "loop" / "backing_file")
        if backing and backing.startswith("/dev/"):
            loops.setdefault(os.path.basename(backing), []).append(loop)
    roots = _block_roots(root, devpath)
    parent: dict[str, str | None] = dict.fromkeys(roots)
    order: list[str] = []
    queue = list(roots)
    while queue:
        name = queue.pop(0)
        order.append(name)
        for child in _block_children(cls, name, loops):
            if child not in parent:
                parent[child] = name
                queue.append(child)
    if not order:
        return []
    # The names a node goes by in mountinfo and /proc/swaps: major:minor, /dev/NAME and
    # /dev/mapper/DMNAME (what mount(8) and swapon(8) record for device-mapper devices).
    by_dev: dict[str, str] = {}
    by_path: dict[str, str] = {}
    label: dict[str, str] = {}
    for name in order:
        if (majmin := _text(cls / name / "dev")) is not None:
            by_dev[majmin] = name
        by_path[f"/dev/{name}"] = name
        label[name] = name
        if dm := _text(cls / name / "dm" / "name"):
            by_path[f"/dev/mapper/{dm}"] = name
            label[name] = f"{name} [{dm}]"
    mounts: dict[str, list[str]] = {}
    for line in (_text(proc / "self" / "mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 5 or "-" not in fields[5:]:
            continue
        tail = fields[fields.index("-", 5) + 1 :]
        source = _unescape(tail[1]) if len(tail) > 1 else ""
        mounted = by_dev.get(fields[2]) or by_path.get(source)
        if mounted is not None:
            mounts.setdefault(mounted, []).append(_unescape(fields[4]))
    swaps: set[str] = set()
    for line in (_text(proc / "swaps") or "").splitlines()[1:]:
        if line.split() and (swap := by_path.get(_unescape(line.split()[0]))) is not None:
            swaps.add(swap)
    users: dict[str, str] = {}
    for name in order:
        how = []
        if name in mounts:
            how.append(f"mounted on {', '.join(dict.fromkeys(mounts[name]))}")
        if name in swaps:
            how.append("swap")
        if how:
            users[name] = ", ".join(how)
    for name in order:
        stacked = parent[name] is not None and not (cls / name / "partition").exists()
        leaf = not _block_children(cls, name, loops)
        if stacked and leaf and not any(n in users for n in _chain(parent, name)):
            users[name] = f"active, not mounted; {_release_hint(cls, name)} releases it"
    return [Use("block", tuple(label[n] for n in _chain(parent, name)), users[name])
            for name in order if name in users]  # fmt: skip


# --- network ---------------------------------------------------------------------------------


def _uppers(cls: Path, iface: str) -> list[str]:
    """Interfaces stacked on ``iface``: its ``master`` and its ``upper_*`` links."""
    links = [n for n in _listdir(cls / iface) if n == "master" or n.startswith("upper_")]
    return list(dict.fromkeys(os.path.basename(os.path.realpath(cls / iface / n)) for n in links))


def _ipv4(hex_le: str) -> ipaddress.IPv4Address:
    # /proc/net/route prints the raw __be32 with %08X, so the digits are in host byte order.
    return ipaddress.IPv4Address(int(hex_le, 16).to_bytes(4, sys.byteorder))


def _routes(proc: Path, ifaces: Iterable[str]) -> dict[str, list[str]]:
    """Per interface: the default routes, IPv4 routes and global IPv6 addresses through it."""
    want = set(ifaces)
    found: dict[str, list[str]] = {}
    for line in (_text(proc / "net" / "route") or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 8 or f[0] not in want:
            continue
        dest, mask = _ipv4(f[1]), _ipv4(f[7])
        prefix = bin(int(mask)).count("1")
        what = "the default route" if prefix == 0 else f"route to {dest}/{prefix}"
        found.setdefault(f[0], []).append(what)
    for line in (_text(proc / "net" / "ipv6_route") or "").splitlines():
        f = line.split()
        if len(f) == 10 and f[9] in want and int(f[0], 16) == 0 and int(f[1], 16) == 0:
            found.setdefault(f[9], []).append("the IPv6 default route")
    for line in (_text(proc / "net" / "if_inet6") or "").splitlines():
        f = line.split()
        # Scope 00 is global (include/net/ipv6.h IPV6_ADDR_ANY); link-local fe80:: is scope 20
        # and every interface that is up has one, so it says nothing about use.
        if len(f) == 6 and f[5] in want and int(f[3], 16) == 0:
            addr = ipaddress.IPv6Address(int(f[0], 16))
            found.setdefault(f[5], []).append(f"address {addr}/{int(f[2], 16)}")
    return found


def net_uses(root: Path, proc: Path, devpath: str) -> list[Use]:
    """The routes, addresses and stacked interfaces (bond, bridge, VLAN...) of the NICs under
    ``devpath``.

    Args:
        root: the sysfs root (``/sys``).
        proc: the procfs root (``/proc``).
        devpath: the PCI function's resolved sysfs directory.

    Returns:
        One :class:`Use` per interface in a chain that carries routes or addresses, and one
        per stacked interface at the end of a chain that carries none.
    """
    cls = root / "class" / "net"
    roots = [n for n in _listdir(cls) if _under(cls / n, devpath)]
    parent: dict[str, str | None] = dict.fromkeys(roots)
    order: list[str] = []
    queue = list(roots)
    while queue:
        iface = queue.pop(0)
        order.append(iface)
        for up in _uppers(cls, iface):
            if up not in parent:
                parent[up] = iface
                queue.append(up)
    routes = _routes(proc, order)
    uses = [Use("net", tuple(_chain(parent, i)), ", ".join(routes[i]))
            for i in order if i in routes]  # fmt: skip
    for iface in order:
        chain = _chain(parent, iface)
        if len(chain) > 1 and not _uppers(cls, iface) and not any(n in routes for n in chain):
            kind = next((k for k in ("bonding", "bridge", "team") if (cls / iface / k).exists()),
                        "interface")  # fmt: skip
            kind = {"bonding": "bond", "team": "team"}.get(kind, kind)
            uses.append(Use("net", tuple(chain), f"{kind} {iface}, configured without addresses"))
    return uses


def host_uses(root: Path, proc: Path, devpath: str) -> list[Use]:
    """Every way the host uses the PCI function whose sysfs directory is ``devpath``.

    Args:
        root: the sysfs root (``/sys``).
        proc: the procfs root (``/proc``).
        devpath: the PCI function's resolved sysfs directory.

    Returns:
        Block uses first, then network uses; empty when the device can be taken safely.
    """
    return block_uses(root, proc, devpath) + net_uses(root, proc, devpath)
