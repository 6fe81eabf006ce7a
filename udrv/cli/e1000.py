"""`udrv e1000 serve ADDRESS --tap NAME`: an e1000 as a Linux network interface."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any


def register(sub: Any) -> None:
    e = sub.add_parser("e1000", help="Intel 8254x (e1000) NIC driver")
    esub = e.add_subparsers(dest="e1000_command", metavar="COMMAND", required=True)
    s = esub.add_parser("serve", help="drive the NIC and connect it to a TAP interface")
    s.add_argument("address", help="PCI address or 8086:100e")
    s.add_argument("--tap", default="udrv0", help="TAP interface name (udrv0)")
    s.add_argument("--mtu", type=int, help="TAP MTU (default: the NIC's, 1500)")
    s.add_argument("--rx-ring", type=int, default=256, help="RX descriptors (multiple of 8)")
    s.add_argument("--tx-ring", type=int, default=256, help="TX descriptors (multiple of 8)")
    s.add_argument("--polling", action="store_true", help="no interrupts: poll the rings")
    s.add_argument("--promiscuous", action="store_true")
    s.add_argument("--itr-us", type=int, default=50, help="interrupt throttling interval")
    s.add_argument("--no-offload", action="store_true",
                   help="no checksum/TSO offloads: the kernel checksums and segments")  # fmt: skip
    s.add_argument("--inject-tx-stall", type=int, metavar="N",
                   help="fault injection: wedge the TX unit after N frames (tests the watchdog)")  # fmt: skip
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import udrv
    from udrv.drivers.e1000 import E1000
    from udrv.drivers.e1000.driver import OFFLOADS
    from udrv.frontends.tap import Tap, serve
    from udrv.net import Offload

    logging.basicConfig(level=logging.INFO, format="udrv e1000: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with udrv.open(args.address) as dev:
        nic = E1000(dev, rx_ring=args.rx_ring, tx_ring=args.tx_ring, itr_us=args.itr_us,
                    interrupts=None if args.polling else "intx",
                    promiscuous=args.promiscuous,
                    offloads=Offload.NONE if args.no_offload else OFFLOADS)  # fmt: skip
        nic.inject_tx_stall_after = args.inject_tx_stall
        with nic, Tap(args.tap, mac=nic.mac, mtu=args.mtu or nic.mtu, offloads=nic.offloads) as tap:
            print(f"{tap.name}: {nic.describe()}; Ctrl-C to stop", flush=True)
            served = serve(nic, tap, stop)
            hw = nic.update_stats()
    sizes = " ".join(map(str, nic.tx_dropped_sizes))
    print(
        f"counters: {nic.stats.summary()}"
        + (f" (dropped sizes {sizes})" if sizes else "")
        + f"; tap: {served.summary()}"
        + "".join(f" tap_dropped[{r}]={n}" for r, n in sorted(tap.dropped.items()))
        + f"; tx_resets={nic.tx_resets}; device: "
        + ", ".join(f"{k}={v}" for k, v in hw.items() if v),
        file=sys.stderr,
    )
    return 0
