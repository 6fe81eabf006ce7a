"""`udrv edu`: the edu driver from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def register(sub: Any) -> None:
    edu = sub.add_parser("edu", help="QEMU edu device driver")
    esub = edu.add_subparsers(dest="edu_command", metavar="COMMAND", required=True)
    serve = esub.add_parser("serve", help="publish /dev/NAME for an edu device (CUSE)")
    serve.add_argument("address", help="PCI address or 1234:11e8")
    serve.add_argument("--name", default="edu0", help="device node name under /dev (edu0)")
    serve.add_argument("--interrupts", choices=["msi", "intx", "none"], default="msi")
    serve.set_defaults(func=cmd_serve)
    test = esub.add_parser("selftest", help="identify, liveness, factorial and a DMA round trip")
    test.add_argument("address", help="PCI address or 1234:11e8")
    test.add_argument("--interrupts", choices=["msi", "intx", "none"], default="msi")
    test.set_defaults(func=cmd_selftest)


def _open(args: argparse.Namespace) -> Any:
    import udrv
    from udrv.drivers.edu import Edu

    dev = udrv.open(args.address)
    try:
        return dev, Edu(dev, interrupts=None if args.interrupts == "none" else args.interrupts)
    except BaseException:
        dev.close()
        raise


def cmd_serve(args: argparse.Namespace) -> int:
    from udrv.drivers.edu.cuse import EduCharDevice
    from udrv.frontends.cuse import CuseServer

    dev, edu = _open(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with dev, edu:
        chardev = EduCharDevice(edu)
        with CuseServer(args.name, chardev):
            print(
                f"/dev/{args.name}: edu {edu.version[0]}.{edu.version[1]} at {dev.address} "
                f"({args.interrupts}); Ctrl-C to stop",
                flush=True,
            )
            stop.wait()
    print(f"served {chardev.factorials} factorials", file=sys.stderr)
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    import os

    dev, edu = _open(args)
    with dev, edu:
        print(f"edu {edu.version[0]}.{edu.version[1]} at {dev.address} via {dev.backend}")
        print(f"liveness: {'ok' if edu.check_liveness() else 'FAILED'}")
        print(f"10! = {edu.factorial(10)} ({'interrupt' if edu.irq else 'polled'})")
        data = os.urandom(256)
        edu.dma_to_device(data)
        ok = edu.dma_from_device(256) == data
        print(f"DMA round trip of 256 bytes: {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1
