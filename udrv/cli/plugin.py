"""`udrv plugin serve PLUGIN.py [key=value ...]`: an nbdkit Python plugin as a real disk.

The same command line as ``nbdkit python PLUGIN.py key=value ...``, served over ublk
(``/dev/ublkbN``, default) or NBD (``--frontend nbd``, ``--listen`` for a socket).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

from udrv.cli import blockserve


def register(sub: Any) -> None:
    r = sub.add_parser("plugin", help="nbdkit Python plugins served as block devices")
    rsub = r.add_subparsers(dest="plugin_command", metavar="COMMAND", required=True)
    srv = rsub.add_parser(
        "serve",
        help="serve an nbdkit Python plugin (API_VERSION = 2) as /dev/ublkbN or over NBD",
        description="Load PLUGIN (a file written for `nbdkit python`), pass it the key=value "
        "parameters through its config(), and serve it until Ctrl-C.",
    )
    srv.add_argument("plugin", metavar="PLUGIN.py", help="the plugin file")
    srv.add_argument("params", nargs="*", metavar="key=value", help="the plugin's parameters")
    srv.add_argument("--readonly", "-r", action="store_true",
                     help="open the plugin read-only (as nbdkit -r)")  # fmt: skip
    srv.add_argument("--threads", "-t", type=int, default=16,
                     help="callbacks at once for a THREAD_MODEL_PARALLEL plugin (default 16)")  # fmt: skip
    srv.add_argument("--verbose", "-v", action="store_true",
                     help="show the plugin's nbdkit.debug() messages (as nbdkit -v)")  # fmt: skip
    blockserve.add_arguments(srv, default_depth=64)
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from udrv.plugins import load, nbdkit, open_driver

    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("udrv.plugins").setLevel(logging.DEBUG)
    # nbdkit.shutdown() from the plugin stops the server as Ctrl-C does.
    nbdkit._shutdown_hook = lambda: os.kill(os.getpid(), signal.SIGTERM)
    plugin = load(args.plugin, args.params)
    try:
        driver = open_driver(plugin, readonly=args.readonly, threads=args.threads)
        try:
            g = driver.geometry
            model = nbdkit.THREAD_MODEL_NAMES[plugin.thread_model]
            what = (f"{plugin.name} ({g.size} bytes, {g.block_size}-byte blocks, {model}"
                    f"{', read-only' if g.read_only else ''})")  # fmt: skip
            return blockserve.serve(driver, args, what=what)
        finally:
            driver.close()
    finally:
        plugin.cleanup()
