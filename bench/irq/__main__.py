"""``python3 -m bench.irq``: interrupt response time on edu, kernel vs C vs Python.

The seed article (LWN, "User-space device drivers", Peter Chubb's talk) showed graphs of
interrupt response in the kernel vs in user space. This is that graph for udrv: the time from
the write to edu's INTR_RAISE register to the code that waits for the MSI running, for

- the kernel: ``kmod/edu_irq_ref.c``'s MSI handler (built on the host against the lab
  kernel's headers, loaded in the guest);
- C user space: ``vfio_msi_ref.c``, a blocking ``read`` of the VFIO MSI eventfd;
- Python: each udrv wait style (blocking wait, epoll, asyncio, handler thread) and a bare
  ``os.eventfd_read`` (the floor the interpreter sets).

One lab guest with five edu devices (udrv's, C's, the kernel module's, and one for each
thread style, whose thread waits all along) runs them interleaved
round by round (``--block 1``: kernel, C, Python..., kernel, C, ...), so that drift on a shared
machine falls on all alike, and repeats the whole measurement ``--reps`` times (3). The host
prints p50/p99 per variant with the spread over the repetitions, the ratios to C and each goal
(issue 12 item 4) with met / not met in every repetition, and writes bench/results/irq.json
and bench/results/irq.png (the CDFs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.irq.guest import C_LABEL, DEVICES, KERNEL, PY_LABELS

RESULTS = Path(__file__).resolve().parent.parent / "results"
HERE = Path(__file__).resolve().parent
PCTS = (50.0, 90.0, 99.0, 99.9)
BLOCKING, THREAD = PY_LABELS["blocking"], PY_LABELS["thread"]


@dataclass(frozen=True)
class Goal:
    """``variant``'s percentile ``pct`` is at most ``limit`` x ``reference``'s, in every rep."""

    text: str
    variant: str
    reference: str
    pct: str  # "p50", "p99"
    limit: float


GOALS = (
    Goal("Python blocking wait p50 <= 1.5x C", BLOCKING, C_LABEL, "p50", 1.5),
    Goal("Python blocking wait p99 <= 2x C", BLOCKING, C_LABEL, "p99", 2.0),
    Goal("handler thread p50 <= 2x the blocking wait", THREAD, BLOCKING, "p50", 2.0),
)


def stats(samples: list[int]) -> dict[str, float]:
    """Percentiles, min and max in microseconds of latencies in nanoseconds."""
    a = np.asarray(samples, dtype=np.float64) / 1000.0
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PCTS}
    out["min"], out["max"], out["n"] = float(a.min()), float(a.max()), len(a)
    return out


def summarize(reps: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Statistics of every repetition, their spread, the ratios to C and the goals.

    Args:
        reps: one ``{label: latencies in ns}`` per repetition.

    Returns:
        ``repetitions`` (per rep: label -> stats, with ``p50_vs_c``/``p99_vs_c``),
        ``variants`` (label -> per percentile and ratio: the values over the reps, their
        median, min and max) and ``goals`` (text, ratio per rep, limit, ``met`` in all reps).
    """
    per_rep: list[dict[str, dict[str, float]]] = []
    for raw in reps:
        rows = {label: stats(s) for label, s in raw.items()}
        c = rows.get(C_LABEL)
        for label, r in rows.items():
            if c is not None and label != C_LABEL:
                r["p50_vs_c"] = r["p50"] / c["p50"]
                r["p99_vs_c"] = r["p99"] / c["p99"]
        per_rep.append(rows)
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for label in per_rep[0] if per_rep else {}:
        keys = [k for k in per_rep[0][label] if k != "n"]
        variants[label] = {}
        for k in keys:
            vals = [rows[label][k] for rows in per_rep]
            variants[label][k] = {
                "reps": vals,
                "median": float(np.median(vals)),
                "min": min(vals),
                "max": max(vals),
            }
    goals = []
    for g in GOALS:
        if not per_rep or g.variant not in per_rep[0] or g.reference not in per_rep[0]:
            continue
        ratios = [rows[g.variant][g.pct] / rows[g.reference][g.pct] for rows in per_rep]
        goals.append(
            {
                "goal": g.text,
                "limit": g.limit,
                "ratios": ratios,
                "met_in": sum(r <= g.limit for r in ratios),
                "met": all(r <= g.limit for r in ratios),
            }
        )
    return {"unit": "us", "repetitions": per_rep, "variants": variants, "goals": goals}


def _spread(v: dict[str, Any], fmt: str) -> str:
    return f"{v['median']:{fmt}} ({v['min']:{fmt}}-{v['max']:{fmt}})"


def report(summary: dict[str, Any]) -> None:
    """Print the variants' figures and the goals."""
    from rich.console import Console
    from rich.table import Table

    meta = summary["meta"]
    n = len(summary["repetitions"])
    table = Table(
        title=f"edu interrupt response, µs: median (min-max) of {n} repetitions, "
        f"{meta['rounds']} rounds each, interleaved in blocks of {meta['block']} (lab, TCG)"
    )
    sleeps = summary.get("sleeps_per_round", {})
    for col in ("variant", "p50", "p99", "p50 / C", "p99 / C", "sleeps"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for label, v in summary["variants"].items():
        cells = [_spread(v[p], ".1f") for p in ("p50", "p99")]
        cells += [_spread(v[k], ".2f") + "x" if k in v else "" for k in ("p50_vs_c", "p99_vs_c")]
        cells.append(f"{sleeps[label]:.2f}" if label in sleeps else "")
        table.add_row(label, *cells)
    console = Console()
    console.width = max(console.width, 120)  # a pipe gets 80 columns: too few for the table
    console.print(table)
    console.print(
        "sleeps: how often the measuring process blocked per round (voluntary context switches)"
    )
    for g in summary["goals"]:
        state = "[green]met[/]" if g["met"] else "[red]not met[/]"
        ratios = ", ".join(f"{r:.2f}x" for r in g["ratios"])
        console.print(f"goal: {g['goal']}: {ratios} -> {state} (in {g['met_in']} of {n})")
    console.print(
        f"host load average (1 min) before/after: {meta['host_load'][0]:.1f} / "
        f"{meta['host_load'][1]:.1f} on {os.cpu_count()} CPUs"
    )


def plot(reps: list[dict[str, list[int]]], path: Path) -> None:
    """Empirical CDFs of every variant (all repetitions pooled) on a log time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label in reps[0]:
        a = np.sort(np.concatenate([np.asarray(r[label], dtype=np.float64) for r in reps]) / 1e3)
        y = np.arange(1, len(a) + 1) / len(a)
        ref = label in (KERNEL, C_LABEL)
        ax.plot(a, y, label=label, lw=2.4 if ref else 1.4, ls="--" if ref else "-")
    ax.set_xscale("log")
    ax.set_xlabel("write INTR_RAISE -> waiting code runs (µs, log)")
    ax.set_ylabel("fraction of interrupts")
    ax.set_title(
        f"Interrupt response on QEMU edu: kernel, C and Python ({len(reps)} repetitions pooled)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _inside(args: argparse.Namespace) -> int:
    """In the guest: measure and leave the samples on the results share."""
    from bench.irq.guest import run_all

    devices = dict(kv.split("=") for kv in os.environ["UDRV_LAB_DEVICES"].split(","))
    ko = Path(args.ko) if args.ko else None
    res = run_all(devices, ko, Path(args.c_exe), args.rounds, args.block, args.reps)
    out = Path(os.environ["UDRV_LAB_RESULTS"]) / "irq-samples.json"
    out.write_text(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.irq", description=__doc__)
    ap.add_argument("--rounds", type=int, default=2000, help="interrupts per variant and rep")
    ap.add_argument("--block", type=int, default=1, help="rounds of one variant per turn (1)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the whole measurement")
    ap.add_argument("--no-kernel", action="store_true", help="leave the kernel module out")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ko", help=argparse.SUPPRESS)
    ap.add_argument("--c-exe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        return _inside(args)

    import tempfile

    from bench.irq import kmod
    from udrv.lab.machine import Lab

    load_before = os.getloadavg()[0]
    ko = None if args.no_kernel else kmod.build()
    with tempfile.TemporaryDirectory(prefix="bench-irq-") as share:
        c_exe = Path(share) / "vfio_msi_ref"
        subprocess.run(["gcc", "-O2", "-o", str(c_exe), str(HERE / "vfio_msi_ref.c")], check=True)
        inner = [sys.executable, "-m", "bench.irq", "--inside", "--c-exe", str(c_exe)]
        inner += ["--rounds", str(args.rounds), "--block", str(args.block)]
        inner += ["--reps", str(args.reps)] + (["--ko", str(ko)] if ko else [])
        with Lab(DEVICES, results=share) as lab:
            lab.run(inner, timeout=3600, stream=True).check()
            kernel = lab.kernel_release
        res = json.loads((Path(share) / "irq-samples.json").read_text())
    reps = res["reps"]
    summary = summarize(reps)
    summary["sleeps_per_round"] = res["sleeps"]
    summary["meta"] = {
        "rounds": args.rounds,
        "block": args.block,
        "reps": args.reps,
        "guest_kernel": kernel,
        "device": "QEMU edu x5 (udrv, C, kernel module, 2 thread styles), TCG, 1 vCPU, intel-iommu",
        "host_load": [load_before, os.getloadavg()[0]],
        "host_cpus": os.cpu_count(),
    }
    report(summary)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "irq.json").write_text(json.dumps(summary, indent=2))
    try:
        plot(reps, RESULTS / "irq.png")
    except ImportError:
        print("matplotlib is missing (`pip install -e .[dev]`): no bench/results/irq.png")
    else:
        print(f"wrote {RESULTS / 'irq.json'} and {RESULTS / 'irq.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
