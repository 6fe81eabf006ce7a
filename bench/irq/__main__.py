"""``python3 -m bench.irq``: interrupt response time on edu, Python vs C.

On the host it boots one lab guest (edu behind the emulated IOMMU) and re-runs itself there
with ``--inside``; the guest writes the raw samples to the results share, the host prints
p50/p90/p99/p99.9/max and the Python/C ratios, and writes bench/results/irq.json and
bench/results/irq.png.

Goal (issue 4): Python p50 within 1.5x of C, p99 within 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "results"
C_LABEL = "C  VFIO MSI (read)"
PCTS = (50.0, 90.0, 99.0, 99.9)
GOALS = {50.0: 1.5, 99.0: 2.0}


def stats(samples: list[int]) -> dict[str, float]:
    """Percentiles and max in microseconds."""
    a = np.asarray(samples, dtype=np.float64) / 1000.0
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PCTS}
    out["max"] = float(a.max())
    out["n"] = len(a)
    return out


def report(raw: dict[str, list[int]], meta: dict[str, object]) -> dict[str, object]:
    from rich.console import Console
    from rich.table import Table

    rows = {label: stats(s) for label, s in raw.items()}
    c = rows.get(C_LABEL)
    table = Table(title=f"edu interrupt response, µs ({meta.get('rounds')} rounds, lab guest, TCG)")
    table.add_column("variant")
    for p in PCTS:
        table.add_column(f"p{p:g}", justify="right")
    table.add_column("max", justify="right")
    table.add_column("p50 / C", justify="right")
    table.add_column("p99 / C", justify="right")
    for label, r in rows.items():
        ratios = []
        for p in (50.0, 99.0):
            if c is None or label == C_LABEL:
                ratios.append("")
                continue
            ratio = r[f"p{p:g}"] / c[f"p{p:g}"]
            r[f"p{p:g}_vs_c"] = ratio
            ok = ratio <= GOALS[p]
            ratios.append(f"[{'green' if ok else 'red'}]{ratio:.2f}x[/]")
        table.add_row(label, *(f"{r[f'p{p:g}']:.1f}" for p in PCTS), f"{r['max']:.1f}", *ratios)
    Console().print(table)
    print("goal: Python p50 <= 1.5x C, p99 <= 2x C (green: met)")
    return {"meta": meta, "unit": "us", "results": rows}


def plot(raw: dict[str, list[int]], path: Path) -> None:
    """Empirical CDFs of every variant on a log time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, samples in raw.items():
        a = np.sort(np.asarray(samples, dtype=np.float64) / 1000.0)
        y = np.arange(1, len(a) + 1) / len(a)
        ax.plot(
            a,
            y,
            label=label,
            lw=2.4 if label == C_LABEL else 1.4,
            ls="--" if label == C_LABEL else "-",
        )
    ax.set_xscale("log")
    ax.set_xlabel("write INTR_RAISE -> waiting code runs (µs, log)")
    ax.set_ylabel("fraction of interrupts")
    ax.set_title("udrv interrupt response on QEMU edu (lab guest)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.irq", description=__doc__)
    ap.add_argument("--rounds", type=int, default=2000, help="interrupts per variant (2000)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.inside:  # in the guest
        from bench.irq.guest import run_all

        address = dict(kv.split("=") for kv in os.environ["UDRV_LAB_DEVICES"].split(","))["edu"]
        raw = run_all(address, args.rounds)
        out = Path(os.environ["UDRV_LAB_RESULTS"]) / "irq-samples.json"
        out.write_text(json.dumps(raw))
        return 0

    import tempfile

    from udrv.lab.machine import Lab

    with tempfile.TemporaryDirectory(prefix="bench-irq-") as share:
        with Lab(["edu"], results=share) as lab:
            res = lab.run(
                [sys.executable, "-m", "bench.irq", "--inside", "--rounds", str(args.rounds)],
                timeout=3600,
                stream=True,
            )
            res.check()
            kernel = lab.kernel_release
        raw = json.loads((Path(share) / "irq-samples.json").read_text())
    meta = {"rounds": args.rounds, "guest_kernel": kernel, "device": "QEMU edu, TCG, intel-iommu"}
    summary = report(raw, meta)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "irq.json").write_text(json.dumps(summary, indent=2))
    try:
        plot(raw, RESULTS / "irq.png")
    except ImportError:
        print("matplotlib is missing: `pip install matplotlib` for bench/results/irq.png")
    else:
        print(f"wrote {RESULTS / 'irq.json'} and {RESULTS / 'irq.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
