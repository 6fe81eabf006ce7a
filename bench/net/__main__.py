"""`python -m bench.net [--host-only]`: per-packet cost on the host (udrv's batched e1000 data
path vs a per-descriptor loop written as ixy.py's, interleaved in the same run), then a lab
comparison of udrv's e1000 behind TAP with the kernel's e1000 driver on the same QEMU wiring.
Every goal is printed with met / not met and written to bench/results/net.json."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.net.synthetic import GOAL_BATCH, GOAL_RATIO, compare, spread

RESULTS = Path(__file__).resolve().parent.parent / "results"
# Issue 12 item 5, as ratios udrv / kernel in one run.
GOALS_LAB = {"TCP stream": (">=", 0.7), "ping RTT": ("<=", 3.0)}


def host_part(console: Console) -> tuple[dict[str, object], list[tuple[str, str, bool]]]:
    table = Table(
        title="e1000 driver cost per packet (host, synthetic ring, 60-byte frames; "
        "3 repetitions, median (min-max), batched and per-descriptor interleaved ABAB)"
    )
    for col in ("batch", "RX ns/pkt", "TX ns/pkt", "Mpps (1 core)", "per-descriptor ns/pkt",
                "batched vs per-descriptor"):  # fmt: skip
        table.add_column(col, justify="right")
    rows: dict[str, object] = {}
    goals = []
    for batch in (1, 32, 256):
        r = compare(batch, packets=20_000 if batch == 1 else 150_000)
        mpps = [1e3 / (a + b) for a, b in zip(r.rx_ns, r.tx_ns, strict=True)]
        ref = [a + b for a, b in zip(r.ref_rx_ns, r.ref_tx_ns, strict=True)]
        rows[str(batch)] = {"rx_ns": r.rx_ns, "tx_ns": r.tx_ns, "mpps": mpps,
                            "ref_rx_ns": r.ref_rx_ns, "ref_tx_ns": r.ref_tx_ns,
                            "ratio": r.ratios}  # fmt: skip
        table.add_row(str(batch), spread(r.rx_ns), spread(r.tx_ns), spread(mpps), spread(ref),
                      spread(r.ratios) + "x")  # fmt: skip
        if batch == GOAL_BATCH:
            worst = min(r.ratios)
            goals.append((f"host: batched >= {GOAL_RATIO:g}x the per-descriptor loop at batch "
                          f"{batch} (worst of 3: {worst:.1f}x)", f"{worst:.1f}x",
                          worst >= GOAL_RATIO))  # fmt: skip
    console.print(table)
    return rows, goals


def lab_part(
    console: Console, profile: bool
) -> tuple[dict[str, object], list[tuple[str, str, bool]]]:
    from udrv.lab import Lab

    env = {"UDRV_BENCH_PROFILE": "1"} if profile else {}
    with Lab(["e1000", "e1000", "e1000"], memory=1024) as lab:
        r = lab.run([sys.executable, "-m", "bench.net.guest"], timeout=1200, stream=True, env=env)
        data = json.loads((lab.results / "net.json").read_text()) if r.returncode == 0 else {}
    if not data:
        console.print("[red]the lab part failed")
        return {}, [(f"lab: {k} {op} {v:g}x the kernel's", "failed", False)
                    for k, (op, v) in GOALS_LAB.items()]  # fmt: skip
    table = Table(title="udrv e1000 vs kernel e1000, same QEMU hub (TCG: compare ratios)")
    for col in ("measure", "kernel <-> kernel", "udrv <-> kernel", "udrv / kernel"):
        table.add_column(col, justify="right")
    meas = data["measures"]
    for name, (k, u, unit) in meas.items():
        table.add_row(name, f"{k:.2f} {unit}", f"{u:.2f} {unit}", f"{u / k:.2f}" if k else "-")
    console.print(table)
    if data.get("notes"):
        console.print("\n".join(data["notes"]))
    goals = []
    for name, (op, want) in GOALS_LAB.items():
        k, u, _ = meas[name]
        ratio = u / k if k else float("inf")
        met = ratio >= want if op == ">=" else ratio <= want
        goals.append((f"lab: {name} {op} {want:g}x the kernel's", f"{ratio:.2f}x", met))
    return data, goals


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host-only", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the driver in the lab (yappi, strace -c)")  # fmt: skip
    args = ap.parse_args()
    console = Console()
    load = os.getloadavg()
    console.print(f"host load average: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    host, goals = host_part(console)
    out: dict[str, object] = {"load": load, "host": host}
    if not args.host_only:
        out["lab"], lab_goals = lab_part(console, args.profile)
        goals += lab_goals
    table = Table(title="goals (issue 12 item 5)")
    for col in ("goal", "measured", ""):
        table.add_column(col)
    for what, measured, met in goals:
        table.add_row(what, measured, "[green]met" if met else "[red]not met")
    console.print(table)
    out["goals"] = [{"goal": w, "measured": m, "met": ok} for w, m, ok in goals]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "net.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
