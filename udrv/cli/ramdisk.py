"""`udrv ramdisk serve SIZE`: a RAM-backed block driver as a real disk (the "null" driver)."""

from __future__ import annotations

import argparse
from typing import Any

from udrv.cli import blockserve

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` -> bytes."""
    num, unit = text.rstrip("KMGkmgiB"), text[len(text.rstrip("KMGkmgiB")) :].upper()
    unit = unit.removesuffix("IB").removesuffix("B")
    if not num.isdigit() or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4096, 64M or 1G")
    return int(num) * UNITS[unit]


def register(sub: Any) -> None:
    r = sub.add_parser("ramdisk", help="a RAM-backed block device served from Python")
    rsub = r.add_subparsers(dest="ramdisk_command", metavar="COMMAND", required=True)
    srv = rsub.add_parser("serve", help="serve a RAM disk as /dev/ublkbN or /dev/nbdN")
    srv.add_argument("size", type=size, help="e.g. 64M")
    srv.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    blockserve.add_arguments(srv, default_depth=64)
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from udrv.block.ram import RamDisk

    disk = RamDisk(args.size, block_size=args.block_size)
    try:
        return blockserve.serve(disk, args, what=f"a {args.size >> 20} MiB RAM disk")
    finally:
        disk.close()
