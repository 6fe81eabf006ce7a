"""`python -m bench.block`: fio through the kernel's drivers and udrv's, in one lab session.

The method (bench/block/plan.py has the details): each udrv path is compared with a reference
measured in the same session (the kernel's nvme on the same QEMU nvme device, null_blk for the
RAM disk, nbdkit + nbd-client for the nbdkit plugin); reference and candidate alternate
(A B A B A B: the repetitions, ``UDRV_BENCH_REPS``, 3 by default, each run the reference and
then the candidates), and ratios are taken within a repetition. Every repetition runs the
jobs a goal or the 1 -> 2 queue scaling compares; the other jobs, the QD1 per-I/O breakdown
and the yappi profile run once. fio measures ``UDRV_BENCH_RUNTIME`` seconds (4) per job after
a second of ramp. The estimated duration is printed first: about 16 minutes for everything
on a quiet 2-core host.

Prints, per path and job, IOPS, MB/s, mean and p99 latency and CPU time per I/O as median
(min-max) over the repetitions, the IOPS ratio to the reference in each repetition and its
median (min-max); the goals from the issues (udrv NVMe over ublk >= 50% of the kernel's nvme
at 4k QD32 and >= 60% at QD1; udrv's RAM disk over ublk >= 30% of null_blk at QD32 and >=
20% at QD1; the QD1 goals also with two ublk queues, udrv's recommended configuration, whose
workers are pinned to the CPUs blk-mq maps to their queue so that fio's I/O is served on
fio's CPU as by the kernel's nvme; an nbdkit Python plugin served by udrv over ublk >= 2x the
same plugin under nbdkit + nbd-client at 4k QD32; with two queues and two fio jobs of QD32:
NVMe >= 0.9x the kernel's nvme and the RAM disk >= 0.5x null_blk; NVMe over NBD >= 0.4x),
each with its ratio in every repetition and "met" only if it holds in all of them ("met in k
of n" otherwise); the 1 -> 2 queue scaling per repetition; the QD1 per-I/O breakdown (system
calls and context switches per I/O: counts that host load does not change); where the Python
time goes; the host's load average before and after.

``UDRV_BENCH_ONLY=nvme,ram,nbdkit,queues`` (comma-separated; all by default) picks the
comparisons: ``nbdkit`` the nbdkit comparison (with nbdkit's C memory plugin beside udrv's
RAM disk), ``queues`` the one- and two-queue jobs, and so on; a goal's reference always runs
the goal's job (``nbdkit`` brings null_blk for the RAM disk's). Writes bench/results/block.json (every repetition's figures, the spreads,
the goals with their per-rep ratios, ``met`` and ``met_in``). TCG makes absolute numbers
meaningless: read the ratios.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.block.plan import estimate_seconds, queues, schedule, settings
from bench.block.summary import summarise

RESULTS = Path(__file__).resolve().parent.parent / "results"
#: The QD1 breakdown's columns: (key in the guest's ``qd1``, heading).
PER_IO = (
    ("iops", "IOPS"),
    ("fio_switches_per_io", "fio switches/IO"),
    ("switches_per_io", "driver switches/IO"),
    ("syscalls_per_io", "driver syscalls/IO"),
    ("io_uring_enter_per_io", "io_uring_enter/IO"),
    ("read_per_io", "read/IO"),
    ("cpu_us_per_io", "driver CPU us/IO"),
)


def _spread(v: dict[str, Any], fmt: str) -> str:
    """``median (min-max)``; just the value if there is one; "-" if none."""
    if v["median"] is None:
        return "-"
    if v["min"] == v["max"]:
        return f"{v['median']:{fmt}}"
    return f"{v['median']:{fmt}} ({v['min']:{fmt}}-{v['max']:{fmt}})"


def _median(v: dict[str, Any], fmt: str) -> str:
    return "-" if v["median"] is None else f"{v['median']:{fmt}}"


def _per_rep(values: list[float | None], fmt: str) -> str:
    return ", ".join("-" if x is None else f"{x:{fmt}}" for x in values)


def report(summary: dict[str, Any], console: Console) -> None:
    """Print the paths' figures, the goals, the scaling, the QD1 breakdown and the profile."""
    n = summary["n_reps"]
    table = Table(
        title=f"fio through each path (QEMU nvme, TCG, 2 vCPUs), {n} repetition(s), reference "
        "and udrv alternating: IOPS and ratio median (min-max), the rest median; read the ratios"
    )
    for col in ("path", "job", "reps", "IOPS", "MB/s", "mean us", "p99 us", "CPU us/IO",
                "IOPS ratio per rep", "ratio", "vs"):  # fmt: skip
        table.add_column(col, justify="right", no_wrap=col in ("path", "job"))
    for path, jobs in summary["paths"].items():
        for job, row in jobs.items():
            ratio = row.get("ratio")
            table.add_row(
                path, job, str(len(row["rep_numbers"])), _spread(row["iops"], ".0f"),
                *(_median(row[k], f) for k, f in (("mbps", ".1f"), ("mean_us", ".0f"),
                                                  ("p99_us", ".0f"), ("cpu_us_per_io", ".0f"))),
                _per_rep(ratio["reps"], ".2f") if ratio else "",
                _spread(ratio, ".2f") if ratio else "", row.get("vs", ""),
            )  # fmt: skip
    console.print(table)
    goals = Table(
        title="goals (benchmark, not test): met only if met in every repetition",
        caption="queues 2, pinned: --queues 2, each queue's worker process pinned to the CPUs "
        "blk-mq maps to its queue (fio's I/O is served on fio's CPU, as by the kernel's nvme)",
    )
    for col in ("udrv path", "queues", "job", "vs", "ratio per rep", "goal", "met"):
        goals.add_column(col, justify="right")
    for g in summary["goals"]:
        if g["met"]:
            state = "[green]met[/]"
        else:
            state = f"[red]not met[/] (met in {g['met_in']} of {g['n']})"
        if g["missing_reps"]:
            state += f", missing in rep {', '.join(map(str, g['missing_reps']))}"
        goals.add_row(g["path"], queues(g["path"]), g["job"], g["reference"],
                      _per_rep(g["ratios"], ".2f"), f">= {g['minimum']}", state)  # fmt: skip
    console.print(goals)
    if summary["scaling"]:
        st = Table(title="1 -> 2 ublk queues (4k randread QD32 x2; two queues: a worker process "
                   "each, pinned to its blk-mq CPUs)")  # fmt: skip
        for col in ("path", "1 queue IOPS per rep", "2 queues IOPS per rep", "scaling per rep",
                    "scaling"):  # fmt: skip
            st.add_column(col, justify="right")
        for one, s in summary["scaling"].items():
            st.add_row(one, _per_rep(s["one"], ".0f"), _per_rep(s["two"], ".0f"),
                       _per_rep(s["scaling"]["reps"], ".2f"), _spread(s["scaling"], ".2f") + "x")  # fmt: skip
        console.print(st)
    if summary["missing"]:
        console.print(f"[red]missing (planned, not measured): {'; '.join(summary['missing'])}")
    if summary.get("qd1"):
        bt = Table(title="4k randread QD1, per I/O, first repetition (counts: independent of "
                   "host load)")  # fmt: skip
        bt.add_column("path", justify="right")
        for _, head in PER_IO:
            bt.add_column(head, justify="right")
        for name, m in summary["qd1"].items():
            bt.add_row(name, *(f"{m[k]:.2f}" if k in m else "-" for k, _ in PER_IO))
        console.print(bt)
    if summary.get("profile"):
        pt = Table(
            title="where the Python time goes (udrv nvme / ublk, 4k randread QD32, yappi CPU)"
        )
        for col in ("function", "calls", "self s", "share"):
            pt.add_column(col, justify="right")
        for p in summary["profile"][:15]:
            pt.add_row(p["function"], str(p["calls"]), f"{p['self_s']:.2f}", f"{p['share']:.0%}")
        console.print(pt)
    meta = summary.get("meta", {})
    if "host_load" in meta:
        before, after = meta["host_load"]
        console.print(f"host load average (1 min) before/after: {before:.1f} / {after:.1f} on "
                      f"{meta['host_cpus']} CPUs; the run took {meta['seconds'] / 60:.1f} min "
                      f"(estimated {meta['estimated_seconds'] / 60:.0f})")  # fmt: skip


def main() -> int:
    from udrv.lab import Lab

    console = Console()
    console.width = max(console.width, 190)  # a pipe gets 80 columns: too few for the tables
    try:
        cfg = settings()
    except ValueError as e:
        console.print(f"[red]bench.block: {e}")
        return 2
    steps = schedule(cfg.only, cfg.reps)
    estimate = estimate_seconds(steps, cfg.runtime)
    n_fio = sum(1 for s in steps if s.kind != "breakdown")
    console.print(
        f"bench.block: {', '.join(sorted(cfg.only))}; {cfg.reps} repetition(s), {n_fio} fio "
        f"jobs of {cfg.runtime:g} s (+1 s ramp) and the QD1 breakdowns: about "
        f"{estimate / 60:.0f} minutes on a quiet host"
    )
    load_before, t0 = os.getloadavg()[0], time.monotonic()
    with Lab(["nvme:size=64M"], memory=1536, cpus=2) as lab:
        r = lab.run([sys.executable, "-m", "bench.block.guest"],
                    timeout=max(1800, 3 * estimate), stream=True)  # fmt: skip
        path = lab.results / "block.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        prof_path = lab.results / "block-profile.json"
        profile = json.loads(prof_path.read_text()) if prof_path.exists() else []
    if not data:
        console.print("[red]the lab part failed before measuring anything")
        return 1
    summary: dict[str, Any] = {
        "meta": {
            "only": sorted(cfg.only),
            "reps": cfg.reps,
            "runtime_s": cfg.runtime,
            "host_load": [load_before, os.getloadavg()[0]],
            "host_cpus": os.cpu_count(),
            "seconds": time.monotonic() - t0,
            "estimated_seconds": estimate,
            "guest_exit": r.returncode,
        },
        **summarise(data["reps"], steps),
        "qd1": data.get("qd1", {}),
        "profile": profile,
        "repetitions": data["reps"],
    }
    report(summary, console)
    if r.returncode:
        console.print(f"[red]the lab part failed (exit {r.returncode}): the tables hold what it "
                      "measured before")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "block.json").write_text(json.dumps(summary, indent=2))
    return 1 if r.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
