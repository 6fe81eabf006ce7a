"""ns per register access through the Region API vs a raw ``memoryview.cast`` on the same
anonymous mapping (host; no device). Goal: the API within 1.5x of the raw view.

    python -m bench.mmio
"""

from __future__ import annotations

import json
import mmap
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from udrv.core.region import MmioRegion

N = 200_000
REPEATS = 7
GOAL = 1.5


def best_of(fn: Callable[[list[int]], object]) -> float:
    """ns per access: best of REPEATS loops over N offsets (cycling over 64 registers)."""
    offsets = [(i % 64) * 8 for i in range(N)]
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        fn(offsets)
        best = min(best, (time.perf_counter_ns() - t0) / N)
    return best


def _loops(
    region: MmioRegion, view: memoryview, w: int
) -> dict[str, tuple[Callable[[list[int]], object], ...]]:
    """The loops compared: the API call; a bare function around the raw view (the least any
    function-call API can cost: the goal's reference); the raw view indexed inline."""
    shift = w.bit_length() - 1
    read, write = getattr(region, f"read{w * 8}"), getattr(region, f"write{w * 8}")

    def api_read(offs: list[int]) -> None:
        for off in offs:
            read(off)

    def raw_read(offs: list[int]) -> None:
        for off in offs:
            view[off >> shift]

    def api_write(offs: list[int]) -> None:
        for off in offs:
            write(off, 1)

    def raw_write(offs: list[int]) -> None:
        for off in offs:
            view[off >> shift] = 1

    def bare_read_fn(off: int) -> int:
        return view[off >> shift]  # type: ignore[no-any-return]

    def bare_write_fn(off: int, value: int) -> None:
        view[off >> shift] = value

    def fn_read(offs: list[int]) -> None:
        for off in offs:
            bare_read_fn(off)

    def fn_write(offs: list[int]) -> None:
        for off in offs:
            bare_write_fn(off, 1)

    def empty(offs: list[int]) -> None:
        for _off in offs:
            pass

    return {
        "read": (api_read, fn_read, raw_read, empty),
        "write": (api_write, fn_write, raw_write, empty),
    }


def main() -> dict[str, dict[str, float]]:
    mem = mmap.mmap(-1, 4096)
    region = MmioRegion(mem, name="bench")
    raw = {w: memoryview(mem).cast(f) for w, f in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
    rows: dict[str, dict[str, float]] = {}
    base = 0.0
    for w in (4, 1, 2, 8):
        for op, (api, fn, inline, empty) in _loops(region, raw[w], w).items():
            base = best_of(empty)
            a, f, i = (best_of(x) - base for x in (api, fn, inline))
            rows[f"{op}{w * 8}"] = {
                "api_ns": a,
                "fn_ns": f,
                "inline_ns": i,
                "ratio": a / f,
                "ratio_inline": a / i,
            }
    for v in raw.values():
        v.release()
    region.close()
    mem.close()
    table = Table(title="MMIO access cost (host, anonymous mmap; loop overhead removed)")
    cols = (
        "access",
        "Region API ns",
        "raw view in a function ns",
        "API / function",
        f"goal <= {GOAL}x",
        "raw view inline ns",
        "API / inline",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for name, r in rows.items():
        ok = "yes" if r["ratio"] <= GOAL else "NO"
        table.add_row(
            name,
            f"{r['api_ns']:.0f}",
            f"{r['fn_ns']:.0f}",
            f"{r['ratio']:.2f}",
            ok,
            f"{r['inline_ns']:.0f}",
            f"{r['ratio_inline']:.2f}",
        )
    Console().print(table)
    out = Path(__file__).parent / "results" / "mmio.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
