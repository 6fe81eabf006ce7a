"""`python -m bench.block.profile OUT.json udrv-args...`: run a udrv command under yappi
(all threads: the frontends serve from queue threads) and write the top functions."""

from __future__ import annotations

import json
import sys
from typing import Any

import yappi

from udrv.cli.main import main


def top_functions(n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` functions with the most self time in yappi's stats (stopped or running)."""
    stats = yappi.get_func_stats()
    stats.sort("tsub")
    total = sum(s.tsub for s in stats) or 1.0
    return [
        {"function": f"{s.module.rsplit('/', 1)[-1]}:{s.lineno} {s.name}",
         "calls": s.ncall, "self_s": s.tsub, "share": s.tsub / total}
        for s in list(stats)[:n]
    ]  # fmt: skip


def run() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    yappi.set_clock_type("cpu")
    yappi.start()
    try:
        rc = main(argv)
    finally:
        yappi.stop()
        with open(out, "w") as f:
            json.dump(top_functions(), f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(run())
