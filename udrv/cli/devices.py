"""`udrv list`, `info`, `peek`, `poke`, `config`."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

from udrv.errors import RegionError

WIDTHS = (8, 16, 32, 64)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 0x for hex)") from None


def register(sub: Any) -> None:
    lst = sub.add_parser("list", help="PCI devices and whether they are ready for udrv")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    info = sub.add_parser("info", help="one device, like lspci -vvv")
    info.add_argument("address")
    info.add_argument("-v", "--verbose", action="store_true", help="add a hex dump of config space")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    for name, helptext in (
        ("peek", "read a register in a BAR"),
        ("poke", "write a register in a BAR"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("address")
        p.add_argument("bar", type=int)
        p.add_argument("offset", type=_int)
        if name == "poke":
            p.add_argument("value", type=_int)
        p.add_argument("--width", type=int, choices=WIDTHS, default=32)
        p.add_argument(
            "--backend", choices=["auto", "vfio", "uio", "sysfs", "vfio-user"], default="auto"
        )
        p.set_defaults(func=cmd_peek if name == "peek" else cmd_poke)
    cfg = sub.add_parser("config", help="read or write config space")
    cfg.add_argument("address")
    cfg.add_argument("offset", type=_int, nargs="?")
    cfg.add_argument("value", type=_int, nargs="?")
    cfg.add_argument("--width", type=int, choices=(8, 16, 32), default=32)
    cfg.set_defaults(func=cmd_config)


def ready_for(driver: str | None) -> str:
    return {"vfio-pci": "vfio", "uio_pci_generic": "uio"}.get(driver or "", "bind first")


def cmd_list(args: argparse.Namespace) -> int:
    from udrv.pci.ids import names
    from udrv.pci.sysfs import devices

    devs = devices()
    if args.json:
        print(
            json.dumps(
                [dict(d.to_dict(), ready_for=ready_for(d.driver), **names(d)) for d in devs],
                indent=1,
            )
        )
        return 0
    table = Table("address", "device", "class", "driver", "group", "ready for")
    for d in devs:
        n = names(d)
        table.add_row(d.address, f"{n['vendor_name']} {n['device_name']} [{d.ids}]", n["class_name"],
                      d.driver or "-", "-" if d.iommu_group is None else str(d.iommu_group), ready_for(d.driver))  # fmt: skip
    Console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from udrv.pci.address import vfio_user_path
    from udrv.pci.config import decode, describe
    from udrv.pci.ids import names
    from udrv.pci.sysfs import find

    if vfio_user_path(args.address) is not None:
        return _info_vfio_user(args)
    d = find(args.address)
    cs = decode(d.read_config())
    if args.json:
        out = dict(d.to_dict(), **names(d), capabilities=[
            {"id": c.id, "offset": c.offset, "name": c.name, "extended": c.extended, "fields": c.fields}
            for c in cs.capabilities])  # fmt: skip
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(d.address)
    print(
        f"\tDriver: {d.driver or '-'}; IOMMU group: {d.iommu_group}; ready for: {ready_for(d.driver)}"
    )
    for line in describe(cs, resources=d.bars, names=True):
        print(f"\t{line}")
    if args.verbose:
        raw = d.read_config()
        for off in range(0, len(raw), 16):
            print(f"{off:03x}: " + " ".join(f"{b:02x}" for b in raw[off : off + 16]))
    return 0


def _info_vfio_user(args: argparse.Namespace) -> int:
    """`udrv info vfio-user:PATH`: the same lines, from the server's config space region."""
    import udrv
    from udrv.pci.config import decode, describe
    from udrv.pci.ids import names

    with udrv.open(args.address) as dev:
        raw = dev.config.read(0, dev.config.size)
        bars = dev.bars
        irqs = dev.irq.available()
    cs = decode(raw)
    ident = SimpleNamespace(
        vendor=int.from_bytes(raw[0:2], "little"),
        device=int.from_bytes(raw[2:4], "little"),
        class_code=int.from_bytes(raw[9:12], "little"),
    )
    if args.json:
        print(json.dumps(dict(address=args.address, **names(ident), interrupts=irqs, capabilities=[
            {"id": c.id, "offset": c.offset, "name": c.name, "extended": c.extended, "fields": c.fields}
            for c in cs.capabilities]), indent=1, default=str))  # fmt: skip
        return 0
    print(args.address)
    print(
        "\tBackend: vfio-user; interrupts: "
        + ", ".join(f"{k.upper()} {n}" for k, n in irqs.items())
    )
    for line in describe(cs, resources=bars, names=True):
        print(f"\t{line}")
    if args.verbose:
        for off in range(0, len(raw), 16):
            print(f"{off:03x}: " + " ".join(f"{b:02x}" for b in raw[off : off + 16]))
    return 0


def _check_width(offset: int, width: int) -> None:
    if offset % (width // 8):
        raise RegionError(
            f"offset {offset:#x} is not aligned to the {width}-bit width; use a multiple of {width // 8}"
        )


def cmd_peek(args: argparse.Namespace) -> int:
    import udrv

    _check_width(args.offset, args.width)
    with udrv.open(args.address, args.backend) as dev:
        value = dev.bar(args.bar).read_width(args.offset, args.width // 8)
    print(f"{value:#0{args.width // 4 + 2}x}")
    return 0


def cmd_poke(args: argparse.Namespace) -> int:
    import udrv

    _check_width(args.offset, args.width)
    with udrv.open(args.address, args.backend, writable=args.backend == "sysfs") as dev:
        dev.bar(args.bar).write_width(args.offset, args.width // 8, args.value)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import udrv
    from udrv.pci.address import vfio_user_path

    writing = args.value is not None
    # Config space of a vfio-user device comes from its server, not from sysfs.
    backend = "auto" if vfio_user_path(args.address) is not None else "sysfs"
    with udrv.open(args.address, backend, writable=writing) as dev:
        cfg = dev.config
        if args.offset is None:
            raw = cfg.read(0, cfg.size)
            for off in range(0, len(raw), 16):
                print(f"{off:03x}: " + " ".join(f"{b:02x}" for b in raw[off : off + 16]))
            return 0
        _check_width(args.offset, args.width)
        if writing:
            cfg.write_width(args.offset, args.width // 8, args.value)
        else:
            print(f"{cfg.read_width(args.offset, args.width // 8):#0{args.width // 4 + 2}x}")
    return 0
