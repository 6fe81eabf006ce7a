"""`udrv bind` and `udrv restore`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    b = sub.add_parser(
        "bind", help="bind a device (and its IOMMU group) to vfio-pci or uio_pci_generic"
    )
    b.add_argument("address")
    b.add_argument("--driver", choices=["vfio-pci", "uio_pci_generic"], default="vfio-pci")
    b.add_argument(
        "--user", help="let this user open the VFIO group afterwards without root (vfio-pci only)"
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="take it even if the host uses it (mounts, swap, dm/md/LVM, routes, bond/bridge)",
    )
    b.set_defaults(func=cmd_bind)
    r = sub.add_parser("restore", help="give a device back to its original kernel driver")
    r.add_argument("address")
    r.set_defaults(func=cmd_restore)


def cmd_bind(args: argparse.Namespace) -> int:
    from udrv.core.bind import bind, grant
    from udrv.errors import BindError

    if args.user and args.driver != "vfio-pci":
        raise BindError(
            f"--user gives a user the VFIO group of {args.address}; with {args.driver} the "
            "device is reached through /dev/uioN and sysfs files that only root may use: "
            "bind to vfio-pci (the default) for unprivileged use"
        )
    bound = bind(args.address, args.driver, force=args.force)
    for a in bound:
        print(f"{a}: bound to {args.driver}")
    if args.user:
        warning = grant(bound[0], args.user)
        print(f"{args.user} may now open the VFIO group of {bound[0]}")
        if warning:
            print(warning, file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from udrv.core.bind import restore
    from udrv.pci.address import PciAddress

    driver = restore(args.address)
    print(f"{PciAddress.parse(args.address)}: back to {driver or 'no driver'}")
    return 0
