"""`udrv emulate NAME --socket PATH`: serve a device model over vfio-user."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text[-1:].upper() in units:
            return int(text[:-1], 0) * units[text[-1].upper()]
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64M, 1G, 4096)") from None


def register(sub: Any) -> None:
    from udrv.models import MODELS

    p = sub.add_parser(
        "emulate",
        help="serve a device model over vfio-user (no root, no QEMU)",
        description="Serve a Python device model on a Unix socket with the vfio-user protocol; "
        "drivers open it as vfio-user:PATH (e.g. `udrv peek vfio-user:/tmp/edu.sock 0 0x0`).",
    )
    p.add_argument("model", choices=sorted(MODELS), help="the device to emulate")
    p.add_argument("--socket", required=True, help="Unix socket path to serve on")
    p.add_argument("--size", type=_size, default=None, help="nvme: namespace size (64M)")
    p.add_argument("--backing", default=None, help="nvme: a file holding the namespace")
    p.set_defaults(func=cmd_emulate)


def cmd_emulate(args: argparse.Namespace) -> int:
    from udrv.models import create
    from udrv.vfio_user.server import Server

    options: dict[str, object] = {}
    if args.size is not None:
        options["size"] = args.size
    if args.backing is not None:
        options["backing"] = args.backing
    if options and args.model != "nvme":
        print(f"udrv: error: --size/--backing are for nvme, not {args.model}", file=sys.stderr)
        return 2
    model = create(args.model, **options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Server(model, args.socket) as server:
        server.start()
        print(f"{args.model}: serving on vfio-user:{args.socket}; Ctrl-C to stop", flush=True)
        stop.wait()
    for fault in model.faults[-10:]:
        print(f"{args.model}: {fault}", file=sys.stderr)
    return 0
