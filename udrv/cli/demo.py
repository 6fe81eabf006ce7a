"""`udrv demo`: boot the lab and drive its emulated devices from Python."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="boot the lab and run a Python driver on its edu device")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from udrv.lab import Lab

    with Lab(["edu", "e1000", "nvme:size=64M"]) as lab:
        print(f"udrv demo: lab guest up; devices {lab.devices}", file=sys.stderr)
        r = lab.run([sys.executable, "-m", "udrv.tools.demo"], timeout=600, stream=True)
    return r.returncode
