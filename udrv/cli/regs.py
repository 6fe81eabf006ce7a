"""`udrv regs`: the live registers of a known device, decoded field by field; field writes
through the register map's access rules.

    udrv regs ADDRESS [REG ...] [--json] [--watch SECONDS]
    udrv regs ADDRESS set REG.FIELD=VALUE [REG=VALUE ...]
    udrv regs ADDRESS --rdl FILE | --ipxact FILE [--top NAME] [--bar N] ...

The device is recognised by its ids (edu 1234:11e8, the 8254x NICs, NVMe by class 010802)
and opened with the backend its binding allows: VFIO or UIO when bound to vfio-pci or
uio_pci_generic, otherwise sysfs, read-only unless ``set --force`` (a kernel driver owns the
device then, and writing behind its back can wedge it). Kernels with
CONFIG_IO_STRICT_DEVMEM (or ``iomem=strict``) do not map a BAR that a driver has claimed at
all; the error then says to unbind the device first.


With ``--rdl``/``--ipxact`` the map comes from a register description instead (any device,
see :mod:`udrv.regmaps`): ``--top`` picks the addrmap, ``--bar`` the BAR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from udrv.core.regmap import BoundRegister, Register, RegisterMap
from udrv.errors import RegionError, UdrvError
from udrv.pci.sysfs import SYSFS_PCI, find

NVME_CLASS = 0x010802


@dataclass(frozen=True)
class KnownDevice:
    """A device udrv has a built-in register map for."""

    name: str
    regmap: type[RegisterMap]
    bar: int


def known_device(vendor: int, device: int, class_code: int) -> KnownDevice | None:
    """The built-in map for a device's ids, or ``None``."""
    # Import only the map that matches: the NIC and NVMe modules pull in numpy, which a
    # slow (emulated) machine takes seconds to import.
    from udrv.drivers.edu import regs as edu

    if (vendor, device) == (edu.VENDOR_ID, edu.DEVICE_ID):
        return KnownDevice("edu", edu.EduRegs, edu.BAR)
    if vendor == 0x8086:  # Intel: e1000.regs.VENDOR_ID
        from udrv.drivers.e1000 import regs as e1000

        if device in e1000.DEVICE_IDS:
            return KnownDevice(f"e1000 ({e1000.DEVICE_IDS[device]})", e1000.E1000Regs, 0)
    if class_code == NVME_CLASS:
        from udrv.drivers.nvme import regs as nvme

        return KnownDevice("NVMe", nvme.NvmeRegs, 0)
    return None


def bind_map(known: KnownDevice, region: Any) -> RegisterMap:
    """``known.regmap`` bound to ``region`` (NVMe: with the doorbell stride from CAP)."""
    for_controller = getattr(known.regmap, "for_controller", None)
    if for_controller is not None:
        regs: RegisterMap = for_controller(region)
        return regs
    return known.regmap(region)


# -- reading and decoding ----------------------------------------------------------------


def select(regmap: type[RegisterMap], names: Sequence[str]) -> list[Register]:
    """The registers to show: the named ones (arrays as ``NAME(i)``), or every readable
    register that has no read side effect.

    Raises:
        RegionError: an unknown name, or a write-only register named.
    """
    if not names:
        return [r for r in regmap.REGISTERS.values() if r.access not in ("wo", "rc")]
    regs = [regmap.lookup(n) for n in names]
    for r in regs:
        if not r.readable:
            raise RegionError(f"{r.name} is write-only: it cannot be shown (reads are undefined)")
    return regs


def snapshot(regs: RegisterMap, chosen: Sequence[Register]) -> list[dict[str, Any]]:
    """Read each register once and decode it: the records ``--json`` prints."""
    out = []
    for reg in chosen:
        value = regs.bind(reg).read()
        out.append(
            {
                "name": reg.name,
                "offset": regs.bind(reg).offset,
                "width": reg.width,
                "access": reg.access,
                "value": value,
                "reset": reg.reset,
                "changed": None if reg.reset is None else value != reg.reset,
                "doc": reg.doc,
                "fields": [asdict(f) for f in reg.explain(value)],
            }
        )
    return out


def render(records: Sequence[dict[str, Any]], previous: dict[str, int] | None = None) -> str:
    """Text for humans: one line per register, one per field under it.

    ``*`` marks what differs from the reset value; ``<`` what changed since ``previous``
    (the last ``--watch`` refresh).
    """
    lines = []
    for r in records:
        digits = 2 * r["width"]
        value = r["value"]
        mark = "*" if r["changed"] else " "
        if previous is not None and previous.get(r["name"], value) != value:
            mark = "<"
        reset = "" if r["reset"] is None else f"  reset {r['reset']:#0{digits + 2}x}"
        lines.append(
            f"{mark} {r['name']:<9} {r['offset']:#06x}  {value:#0{digits + 2}x}  {r['access']:<3}"
            f"  {r['doc']}{reset}"
        )
        for f in r["fields"]:
            shown = f"{f['value']:#x}" if f["value"] > 9 else str(f["value"])
            if f["enum"]:
                shown += f" {f['enum']}"
            fmark = "*" if f["changed"] else " "
            access = "" if f["access"] == r["access"] else f["access"]
            lines.append(
                f"  {fmark} {f['span']:>5} {f['name']:<15} {shown:<14} {access:<3} {f['doc']}".rstrip()
            )
    return "\n".join(lines)


# -- writing -----------------------------------------------------------------------------


def parse_assignments(
    regmap: type[RegisterMap], words: Sequence[str]
) -> list[tuple[Register, dict[str, int] | int]]:
    """``REG.FIELD=VALUE`` and ``REG=VALUE`` words, grouped by register in order.

    Returns:
        (register, {field: value}) for field writes, (register, value) for whole-register
        writes.

    Raises:
        RegionError: bad syntax, unknown register or field, or a value that does not fit;
            a register given both as a whole and by fields.
    """
    if not words:
        raise RegionError("set: give REG.FIELD=VALUE or REG=VALUE (e.g. STATUS.IRQFACT=1)")
    out: dict[str, tuple[Register, dict[str, int] | int]] = {}
    for word in words:
        target, eq, text = word.partition("=")
        if not eq or not target or not text:
            raise RegionError(f"set: {word!r} is not REG.FIELD=VALUE or REG=VALUE")
        regname, dot, fname = target.partition(".")
        reg = regmap.lookup(regname)
        entry = out.get(reg.name)
        if dot:
            f = reg.field(fname.upper() if fname.upper() in reg.fields else fname)
            x = f.parse(text)
            f.value(x)  # range check now, before anything is written
            if entry is not None and not isinstance(entry[1], dict):
                raise RegionError(f"set: {reg.name} is given both whole and by fields")
            fields = entry[1] if entry is not None else {}
            assert isinstance(fields, dict)
            fields[f.name.split(".")[-1]] = x
            out[reg.name] = (reg, fields)
        else:
            if entry is not None:
                raise RegionError(f"set: {reg.name} is given twice")
            try:
                value = int(text, 0)
            except ValueError:
                raise RegionError(f"set: {text!r} is not a number (for {reg.name})") from None
            if not 0 <= value <= reg.max:
                raise RegionError(
                    f"set: {value:#x} does not fit the {reg.bits}-bit register {reg.name}"
                )
            out[reg.name] = (reg, value)
    return list(out.values())


def apply(bound: BoundRegister, what: dict[str, int] | int) -> str:
    """Write one register through the map's rules; returns what was done, for the user.

    Field writes: W1C fields are written with :meth:`BoundRegister.w1c`, write-only and
    write-1-to-set registers with one write of just those fields, anything else with a
    read-modify-write (:meth:`BoundRegister.set`). Read-only fields are refused.

    Raises:
        RegionError: the access rules refuse the write (nothing is written then).
    """
    reg = bound.reg
    if isinstance(what, int):
        if reg.access == "w1c":
            return f"{reg.name}: write-1-to-clear {bound.w1c(what):#x}"
        bound.write(what)
        return f"{reg.name}: wrote {what:#x}"
    modes = {reg.field_access(reg.field(n)) for n in what}
    if modes == {"w1c"}:
        return f"{reg.name}: write-1-to-clear {bound.w1c(**what):#x}"
    if "w1c" in modes:
        raise RegionError(
            f"set: {reg.name} mixes write-1-to-clear fields with others; set them separately"
        )
    if reg.access in ("wo", "w1s"):
        return f"{reg.name}: wrote {bound.write_fields(**what):#x} (other bits 0)"
    return f"{reg.name}: read-modify-write {bound.set(**what):#x}"


# -- the command -------------------------------------------------------------------------


def register(sub: Any) -> None:
    p = sub.add_parser(
        "regs",
        help="a known device's live registers, decoded; `set REG.FIELD=VALUE` writes one",
        description="Read a known device's registers (edu, 8254x, NVMe) decoded field by field "
        "(* marks a value that differs from reset), or write fields through the register "
        "map's access rules: udrv regs ADDRESS set STATUS.IRQFACT=1",
    )
    p.add_argument("address", help="PCI address or vendor:device (1234:11e8)")
    p.add_argument(
        "words",
        nargs="*",
        metavar="REG | set REG.FIELD=VALUE",
        help="registers to show (default: every readable one without read side effects), "
        "or `set` and assignments",
    )
    add_description_options(p)
    p.add_argument("--json", action="store_true", help="records instead of text")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    add_backend_options(p)
    p.set_defaults(func=cmd_regs)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--force`` (shared with `udrv shell`)."""
    p.add_argument(
        "--backend",
        choices=["auto", "vfio", "uio", "sysfs"],
        default="auto",
        help="auto: vfio/uio when bound to vfio-pci/uio_pci_generic, else sysfs",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="writes through sysfs although a kernel driver owns the device",
    )


def add_description_options(p: argparse.ArgumentParser) -> None:
    """``--rdl FILE | --ipxact FILE [--top NAME] [--bar N]`` (shared with `udrv shell`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rdl", type=Path, metavar="FILE", help="the register map from SystemRDL")
    g.add_argument("--ipxact", type=Path, metavar="FILE", help="the register map from IP-XACT")
    p.add_argument("--top", metavar="NAME", help="with --rdl/--ipxact: the addrmap to use")
    p.add_argument(
        "--bar",
        type=int,
        metavar="N",
        help="with --rdl/--ipxact: the BAR (default: the description's udrv_bar, else 0)",
    )


def description_map(args: argparse.Namespace) -> KnownDevice | None:
    """The map of ``--rdl``/``--ipxact`` (loaded before any device is opened, so that a bad
    description is reported as such), or ``None`` when neither is given.

    Raises:
        DescriptionError: the description cannot be loaded or has no such BAR.
        UdrvError: ``--top``/``--bar`` without a description.
    """
    if args.rdl is None and args.ipxact is None:
        if args.top is not None or args.bar is not None:
            raise UdrvError("--top and --bar go with --rdl FILE or --ipxact FILE")
        return None
    from udrv import regmaps

    if args.rdl is not None:
        desc = regmaps.load_rdl(args.rdl, top=args.top, bar=args.bar)
    else:
        desc = regmaps.load_ipxact(args.ipxact, top=args.top, bar=args.bar)
    bar, regmap = desc.map_for(args.bar)
    return KnownDevice(f"{desc.name} ({desc.path.name})", regmap, bar)


def builtin_map(info: Any) -> KnownDevice:
    """udrv's own map for the device ``info``.

    Raises:
        UdrvError: udrv has none; the message says what to use instead.
    """
    known = known_device(info.vendor, info.device, info.class_code)
    if known is None:
        raise UdrvError(
            f"{info.address} ({info.ids}, class {info.class_code:06x}) has no built-in register "
            "map; udrv knows edu (1234:11e8), the 8254x NICs (8086:100e...) and NVMe (class "
            "010802). Give its description with --rdl FILE or --ipxact FILE, or use "
            "`udrv peek` for raw access."
        )
    return known


def _backend(info: Any, wanted: str) -> str:
    from udrv.open import DRIVERS

    if wanted != "auto":
        return wanted
    for name, driver in DRIVERS.items():
        if info.driver == driver:
            return name
    return "sysfs"


def cmd_regs(args: argparse.Namespace, root: Path = SYSFS_PCI) -> int:
    """Run `udrv regs` (``root``: the sysfs PCI devices directory; tests use a fake tree)."""
    import udrv

    described = description_map(args)
    info = find(args.address, root)
    known = described or builtin_map(info)
    setting = bool(args.words) and args.words[0] == "set"
    backend = _backend(info, args.backend)
    writable = False
    if setting and backend == "sysfs":
        owner = f"bound to the kernel driver {info.driver}" if info.driver else "not bound"
        if info.driver and not args.force:
            raise UdrvError(
                f"{info.address} is {owner}: writing its registers behind that driver can "
                f"wedge the device. Run `udrv bind {info.address}` to hand it to vfio-pci, "
                "or pass --force to write through sysfs resource files anyway"
            )
        writable = True
        print(f"note: {info.address} is {owner}; writing through sysfs", file=sys.stderr)
    with udrv.open(info.address, backend, writable=writable, root=root) as dev:
        try:
            region = dev.bar(known.bar)
        except RegionError as exc:
            if backend != "sysfs" or not info.driver:
                raise
            # Kernels built with CONFIG_IO_STRICT_DEVMEM refuse to map a BAR a driver has
            # claimed (pci_request_regions), so a device in use cannot be inspected this way.
            raise RegionError(
                f"{exc}; {info.driver} has claimed this BAR: unbind {info.address} from "
                f"{info.driver} (or `udrv bind {info.address}`) to read its registers"
            ) from None
        regs = bind_map(known, region)
        if setting:
            return _set(known, regs, args.words[1:], args.json)
        chosen = select(known.regmap, args.words)
        explicit_rc = [r.name for r in chosen if r.access == "rc"]
        if explicit_rc:
            print(f"note: reading {', '.join(explicit_rc)} clears it", file=sys.stderr)
        header = f"{info.address} {known.name} [{info.ids}] BAR{known.bar} via {dev.backend}"
        previous: dict[str, int] | None = None
        while True:
            records = snapshot(regs, chosen)
            if args.json:
                print(json.dumps({"device": info.address, "map": known.regmap.__name__,
                                  "registers": records}), flush=True)  # fmt: skip
            else:
                stamp = f"  ({time.strftime('%H:%M:%S')})" if args.watch else ""
                print(f"{header}{stamp}\n{render(records, previous)}", flush=True)
            if not args.watch:
                return 0
            previous = {r["name"]: r["value"] for r in records}
            time.sleep(args.watch)
            if not args.json:
                print()


def _set(known: KnownDevice, regs: RegisterMap, words: Sequence[str], as_json: bool) -> int:
    plan = parse_assignments(known.regmap, words)
    done = []
    for reg, what in plan:
        bound = regs.bind(reg)
        print(apply(bound, what), file=sys.stderr)
        done.append(reg)
    readable = [r for r in done if r.readable and r.access != "rc"]
    records = snapshot(regs, readable)
    if as_json:
        print(json.dumps({"map": known.regmap.__name__, "registers": records}))
    elif records:
        print(render(records))
    return 0
