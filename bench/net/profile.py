"""`python -m bench.net.profile OUT.json udrv-args...`: run ``udrv e1000 serve ...`` with
yappi (CPU clock) on while the TAP frontend serves, and only then: start-up (imports,
argument parsing, the NIC's bring-up) stays out of the figures. Also records the serving
thread's CPU time against the wall time, i.e. how busy the driver was."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import yappi

import udrv.frontends.tap as tap
from bench.block.profile import top_functions
from udrv.cli.main import main

_serve = tap.serve


def _profiled_serve(*args: Any, **kwargs: Any) -> tap.ServeStats:
    out = sys.argv[1]
    yappi.set_clock_type("cpu")
    wall, cpu = time.monotonic(), time.thread_time()
    yappi.start()
    try:
        return _serve(*args, **kwargs)
    finally:
        yappi.stop()
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        with open(out, "w") as f:
            json.dump({"wall_s": wall, "cpu_s": cpu, "top": top_functions()}, f, indent=1)


def run() -> int:
    tap.serve = _profiled_serve  # the CLI imports it when the command runs
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(run())
