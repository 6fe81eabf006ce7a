"""`python -m bench.net [--host-only]`: per-packet cost on the host (udrv's batched e1000 data
path vs a per-descriptor loop written as ixy.py's, interleaved in the same run), then a lab
comparison of udrv's e1000 behind TAP with the kernel's e1000 driver on the same QEMU wiring.

Both parts interleave reference and candidate (ABAB) and repeat 3 times; a ratio is printed
per repetition with its median (min-max), and a goal counts as met only if it holds in every
repetition ("met in k of n" otherwise). Everything is written to bench/results/net.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.net.synthetic import GOAL_BATCH, GOAL_RATIO, compare, spread

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Goal:
    """``measure``'s ratio udrv / kernel compared with ``limit`` by ``op``, in every round."""

    measure: str
    op: str  # ">=": more is better (throughput); "<=": less is better (latency)
    limit: float

    @property
    def text(self) -> str:
        return f"lab: {self.measure} {self.op} {self.limit:g}x the kernel's"

    def holds(self, ratio: float | None) -> bool:
        """Whether one round's ratio meets the goal (a round without a ratio does not)."""
        if ratio is None:
            return False
        return ratio >= self.limit if self.op == ">=" else ratio <= self.limit


# Issue 12 item 5, as ratios udrv / kernel in one run.
GOALS_LAB = (Goal("TCP stream", ">=", 0.7), Goal("ping RTT", "<=", 3.0))


def ratio_spread(values: list[float | None]) -> str:
    """``median (min-max)`` of the rounds that have a value, ``-`` if none has."""
    vals = [r for r in values if r is not None]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"


def summarize(measures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-round ratios udrv / kernel, their spread, and each lab goal judged round by round.

    Args:
        measures: what the guest wrote (``bench.net.guest``): name -> ``unit`` and the
            ``kernel`` and ``udrv`` figures, one per round, round i's two run back to back.

    Returns:
        ``measures`` (name -> unit, kernel, udrv, ``ratios`` per round, None where the kernel
        measured 0, and their ``median``/``min``/``max``) and ``goals`` (per goal: ``goal``,
        ``measure``, ``op``, ``limit``, ``ratios``, ``rounds``, ``met_in`` (rounds where it
        holds) and ``met``, true only if it holds in every round). A goal whose measure is
        missing has no rounds and is not met.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in measures.items():
        ratios: list[float | None] = [
            u / k if k else None for k, u in zip(m["kernel"], m["udrv"], strict=True)
        ]
        vals = [r for r in ratios if r is not None]
        out[name] = {
            **m,
            "ratios": ratios,
            "median": statistics.median(vals) if vals else None,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
        }
    goals = []
    for g in GOALS_LAB:
        ratios = out[g.measure]["ratios"] if g.measure in out else []
        met_in = sum(g.holds(r) for r in ratios)
        goals.append(
            {
                "goal": g.text,
                "measure": g.measure,
                "op": g.op,
                "limit": g.limit,
                "ratios": ratios,
                "rounds": len(ratios),
                "met_in": met_in,
                "met": bool(ratios) and met_in == len(ratios),
            }
        )
    return {"measures": out, "goals": goals}


def verdict(goal: dict[str, Any]) -> str:
    """``met``, or ``not met (met in k of n)``."""
    if goal["met"]:
        return "[green]met"
    return f"[red]not met (met in {goal['met_in']} of {goal['rounds']})"


def host_part(console: Console) -> tuple[dict[str, object], list[dict[str, Any]]]:
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
            met_in = sum(x >= GOAL_RATIO for x in r.ratios)
            goals.append({"goal": f"host: batched >= {GOAL_RATIO:g}x the per-descriptor loop "
                          f"at batch {batch}", "ratios": r.ratios, "rounds": len(r.ratios),
                          "met_in": met_in, "met": met_in == len(r.ratios)})  # fmt: skip
    console.print(table)
    return rows, goals


def lab_part(console: Console, profile: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from udrv.lab import Lab

    env = {"UDRV_BENCH_PROFILE": "1"} if profile else {}
    with Lab(["e1000", "e1000", "e1000"], memory=1024) as lab:
        r = lab.run([sys.executable, "-m", "bench.net.guest"], timeout=1200, stream=True, env=env)
        data = json.loads((lab.results / "net.json").read_text()) if r.returncode == 0 else {}
    if not data:
        console.print("[red]the lab part failed")
        return {}, summarize({})["goals"]
    summary = summarize(data["measures"])
    table = Table(
        title="udrv e1000 vs kernel e1000, same QEMU hub (TCG: compare ratios); "
        "per round, kernel then udrv (ABAB): median (min-max)"
    )
    for col in ("measure", "kernel <-> kernel", "udrv <-> kernel", "udrv / kernel per round",
                "udrv / kernel"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, m in summary["measures"].items():
        unit = m["unit"]
        per_round = ", ".join("-" if x is None else f"{x:.2f}" for x in m["ratios"])
        table.add_row(name, f"{ratio_spread(m['kernel'])} {unit}",
                      f"{ratio_spread(m['udrv'])} {unit}",
                      per_round, ratio_spread(m["ratios"]))  # fmt: skip
    console.print(table)
    if data.get("notes"):
        console.print("\n".join(data["notes"]))
    return {**data, "measures": summary["measures"]}, summary["goals"]


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
    table = Table(title="goals (issue 12 item 5): met only if met in every repetition")
    for col in ("goal", "ratio per repetition", "median (min-max)", ""):
        table.add_column(col)
    for g in goals:
        per_round = ", ".join("-" if x is None else f"{x:.2f}x" for x in g["ratios"])
        table.add_row(g["goal"], per_round or "failed", ratio_spread(g["ratios"]), verdict(g))
    console.print(table)
    out["goals"] = goals
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "net.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
