"""Serving a block driver from the command line: the frontend options and the run loop.

Shared by `udrv nvme serve` and `udrv ramdisk serve`. The frontend is started, its device
path printed on stdout (one line, flushed, so scripts can read it), and the process runs
until SIGINT or SIGTERM; then the frontend is stopped (the kernel's device goes away) before
the caller closes the driver. SIGKILL skips all that: with ublk the disk stays, quiesced,
and `--recover DEV_ID` in a new process resumes it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any

from udrv.block.driver import BlockDriver
from udrv.errors import FrontendError


def add_arguments(p: argparse.ArgumentParser, *, default_depth: int = 64) -> None:
    p.add_argument("--frontend", choices=["ublk", "nbd"], default="ublk",
                   help="ublk: /dev/ublkbN (default); nbd: /dev/nbdN, or a socket with --listen")  # fmt: skip
    p.add_argument(
        "--queues", type=int, default=1, help="hardware queues (ublk) or connections (nbd)"
    )
    p.add_argument("--depth", type=int, default=default_depth, help="requests in flight per queue")
    p.add_argument("--workers", choices=["auto", "threads", "processes"], default="auto",
                   help="ublk: serve each queue from a thread or a forked process (auto: "
                        "processes for several queues unless Python runs without the GIL)")  # fmt: skip
    p.add_argument("--recover", type=int, metavar="DEV_ID",
                   help="ublk: resume /dev/ublkbDEV_ID left by a driver that died")  # fmt: skip
    p.add_argument("--listen", metavar="SOCKET|HOST:PORT",
                   help="nbd: serve the NBD protocol here instead of attaching /dev/nbdN")  # fmt: skip
    p.add_argument("--tls", choices=["off", "on", "require"], default="off",
                   help="--listen: offer TLS (on) or insist on it (require), as nbdkit --tls")  # fmt: skip
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="ca-cert.pem, server-cert.pem, server-key.pem (nbdkit's layout)")  # fmt: skip
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require client certificates signed by DIR/ca-cert.pem")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="allow --listen on a non-loopback address without --tls=require")  # fmt: skip


def _frontend(driver: BlockDriver, args: argparse.Namespace) -> Any:
    if args.queues < 1 or args.depth < 1:
        raise FrontendError(f"--queues {args.queues} and --depth {args.depth} must be at least 1")
    if args.frontend == "ublk":
        if args.listen:
            raise FrontendError("--listen is for --frontend nbd")
        from udrv.frontends.ublk import Ublk

        workers = getattr(args, "workers", "auto")
        if args.recover is not None:
            return Ublk(driver, queues=args.queues, depth=args.depth, dev_id=args.recover,
                        recover=True, workers=workers)  # fmt: skip
        return Ublk(driver, queues=args.queues, depth=args.depth, workers=workers)
    if args.recover is not None:
        raise FrontendError("--recover is for --frontend ublk (NBD has no recovery protocol)")
    from udrv.frontends.nbd import NbdDevice, NbdServer, tls_context

    tls = getattr(args, "tls", "off")
    if tls != "off" and not args.listen:
        raise FrontendError("--tls is for --listen (the kernel's /dev/nbdN speaks no TLS)")
    if tls != "off" and not args.tls_certificates:
        raise FrontendError(f"--tls={tls} needs --tls-certificates DIR holding ca-cert.pem, "
                            "server-cert.pem and server-key.pem")  # fmt: skip
    if args.listen:
        address: str | tuple[str, int] = args.listen
        if ":" in args.listen and not args.listen.startswith("/"):
            host, _, port = args.listen.rpartition(":")
            if not port.isdigit():
                raise FrontendError(f"--listen {args.listen}: the port must be a number")
            address = (host.strip("[]") or "127.0.0.1", int(port))
        ctx = None
        if tls != "off":
            ctx = tls_context(args.tls_certificates, verify_peer=args.tls_verify_peer)
        return NbdServer(driver, address, tls=ctx, tls_required=tls == "require",
                         insecure=getattr(args, "insecure", False), queues=args.queues,
                         depth=args.depth)  # fmt: skip
    return NbdDevice(driver, connections=args.queues, depth=args.depth)


def serve(driver: BlockDriver, args: argparse.Namespace, *, what: str) -> int:
    """Run ``driver`` behind the chosen frontend until SIGINT/SIGTERM."""
    front = _frontend(driver, args)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        threading.Thread(target=front.stop, daemon=True).start()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        front.start()
        where = getattr(front, "path", None) or getattr(front, "uri", "")
        print(where, flush=True)
        print(f"udrv: serving {what} as {where}; Ctrl-C to stop", file=sys.stderr, flush=True)
        front.wait()
    finally:
        front.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    print("udrv: stopped" + (" (signal)" if stopping.is_set() else ""), file=sys.stderr)
    return 0
