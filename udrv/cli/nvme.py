"""`udrv nvme identify ADDRESS`: the controller and its namespaces."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    n = sub.add_parser("nvme", help="NVMe controller driver")
    nsub = n.add_subparsers(dest="nvme_command", metavar="COMMAND", required=True)
    ident = nsub.add_parser("identify", help="print the controller and its namespaces")
    ident.add_argument("address", help="PCI address or 1b36:0010")
    ident.set_defaults(func=cmd_identify)


def cmd_identify(args: argparse.Namespace) -> int:
    import udrv
    from udrv.drivers.nvme import Nvme

    with udrv.open(args.address) as dev, Nvme(dev) as nvme:
        c = nvme.controller
        print(
            f"{dev.address}: {c.model} (vendor {c.vid:04x}), serial {c.serial}, firmware {c.firmware}"
        )
        print(f"  max transfer {c.mdts // 1024 if c.mdts else 'unlimited'} KiB, queue entries up to {nvme.mqes}, "
              f"{c.namespaces} namespace(s), I/O queues {len(nvme.io)}")  # fmt: skip
        for nsid in nvme.active_namespaces():
            ns = nvme.identify_namespace(nsid)
            print(
                f"  namespace {nsid}: {ns.blocks} blocks of {ns.block_size} bytes = {ns.size // (1 << 20)} MiB"
            )
    return 0
