"""The `udrv` command line. Each command group lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from udrv import __version__
from udrv.errors import UdrvError

#: Modules under udrv.cli that add commands; each has ``register(subparsers)``.
COMMAND_MODULES = (
    "lab", "devices", "bind", "hugepages", "regs", "edu", "e1000", "nvme", "ramdisk", "plugin",
    "emulate", "shell", "trace", "demo",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udrv", description="Linux PCI device drivers in Python, in user space."
    )
    parser.add_argument("--version", action="version", version=f"udrv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"udrv.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except UdrvError as exc:
        print(f"udrv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("udrv: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
