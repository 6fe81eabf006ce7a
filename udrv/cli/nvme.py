"""`udrv nvme identify ADDRESS` and `udrv nvme serve ADDRESS`: the controller as a disk."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from udrv.cli import blockserve


def register(sub: Any) -> None:
    n = sub.add_parser("nvme", help="NVMe controller driver")
    nsub = n.add_subparsers(dest="nvme_command", metavar="COMMAND", required=True)
    ident = nsub.add_parser("identify", help="print the controller and its namespaces")
    ident.add_argument("address", help="PCI address or 1b36:0010")
    ident.set_defaults(func=cmd_identify)
    srv = nsub.add_parser("serve", help="serve a namespace as /dev/ublkbN or /dev/nbdN")
    srv.add_argument("address", help="PCI address or 1b36:0010")
    srv.add_argument("--nsid", type=int, default=1, help="namespace to serve (default 1)")
    srv.add_argument("--polled", action="store_true", help="poll completions, no MSI-X")
    blockserve.add_arguments(srv)
    srv.set_defaults(func=cmd_serve)


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
        feats = [name for name, on in (("discard", c.discard), ("write zeroes", c.write_zeroes),
                                       ("volatile write cache", c.volatile_cache)) if on]  # fmt: skip
        print(
            f"  optional features: {', '.join(feats) or 'none'} (ONCS {c.oncs:#06x}, VWC {c.vwc:#04x})"
        )
        for nsid in nvme.active_namespaces():
            ns = nvme.identify_namespace(nsid)
            why = ns.unsupported()
            print(
                f"  namespace {nsid}: {ns.blocks} blocks of {ns.block_size} bytes = {ns.size // (1 << 20)} MiB"
                + (f" (not servable: {why})" if why else "")
            )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import udrv
    from udrv.drivers.nvme import Nvme, NvmeError

    # One NVMe queue pair per frontend queue, one command per tag, in a queue that keeps an
    # entry empty (4.1.2). ublk: max(depth, 4) requests plus a spare tag (udrv.frontends.ublk);
    # NBD: depth tags per connection.
    qdepth = max(args.depth, 4) + 2 if args.frontend == "ublk" else args.depth + 1
    with udrv.open(args.address) as dev:
        try:
            nvme = Nvme(dev, queues=args.queues, depth=qdepth, nsid=args.nsid,
                        interrupts=not args.polled)  # fmt: skip
        except NvmeError as exc:
            if qdepth != args.depth and "queue depth" in str(exc):
                raise NvmeError(f"--depth {args.depth} needs NVMe queues of {qdepth} entries: "
                                f"{exc}") from None  # fmt: skip
            raise
        with nvme:
            return _serve(dev, nvme, args)


def _serve(dev: Any, nvme: Any, args: argparse.Namespace) -> int:
    from udrv.drivers.nvme import AsyncNvme, NvmeError

    if len(nvme.io) < args.queues:
        raise NvmeError(f"{dev.address} granted {len(nvme.io)} I/O queues, not "
                        f"{args.queues}; use --queues {len(nvme.io)}")  # fmt: skip
    drv = AsyncNvme(nvme)
    c, ns = nvme.controller, nvme.namespace
    what = f"{dev.address} ({c.model}, serial {c.serial}) namespace {ns.nsid}"
    try:
        return blockserve.serve(drv, args, what=what)
    finally:
        drv.close()
        if drv.missed_interrupts:
            print(f"udrv: the watchdog found {drv.missed_interrupts} completion(s) that no "
                  "interrupt announced", file=sys.stderr)  # fmt: skip
