"""`python -m bench.block`: fio through the kernel's drivers and udrv's, in one lab session.

Prints IOPS, MB/s, p99 latency and CPU time per I/O for every path and job, the ratios
udrv / kernel, the goals from the issues (udrv NVMe over ublk >= 50% of the kernel's nvme at
4k QD32 and >= 60% at QD1; udrv's RAM disk over ublk >= 30% of null_blk at QD32 and >= 20%
at QD1; an nbdkit Python plugin served by udrv over ublk >= 2x the same plugin under nbdkit +
nbd-client at 4k QD32; with two ublk queues, each a worker process, and two fio jobs of QD32:
NVMe >= 0.9x the kernel's nvme and the RAM disk >= 0.5x null_blk) with met / not met, the
1 -> 2 queue scaling, the QD1 per-I/O breakdown (system calls and context
switches per I/O: counts that host load does not change) and where the Python time goes.
``UDRV_BENCH_ONLY=nbdkit`` runs only the nbdkit comparison, ``UDRV_BENCH_ONLY=queues`` only the
one- and two-queue jobs.
Writes bench/results/block.json. TCG makes absolute numbers meaningless: read the ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent.parent / "results"
GOALS = (  # (path, reference, job, minimum ratio)
    ("udrv nvme / ublk", "kernel nvme", "4k randread QD32", 0.5),
    ("udrv nvme / ublk", "kernel nvme", "4k randwrite QD32", 0.5),
    ("udrv ram / ublk", "kernel null_blk", "4k randread QD32", 0.3),
    ("udrv nvme / ublk", "kernel nvme", "4k randread QD1", 0.6),
    ("udrv ram / ublk", "kernel null_blk", "4k randread QD1", 0.2),
    ("udrv plugin / ublk", "nbdkit python / nbd-client", "4k randread QD32", 2.0),
    ("udrv plugin / ublk", "nbdkit python / nbd-client", "4k randwrite QD32", 2.0),
    ("udrv nvme / ublk 2q", "kernel nvme", "4k randread QD32 x2", 0.9),
    ("udrv ram / ublk 2q", "kernel null_blk", "4k randread QD32 x2", 0.5),
    ("udrv nvme / nbd", "kernel nvme", "4k randread QD32", 0.4),
)
QUEUES_JOB = "4k randread QD32 x2"  # the 1 -> 2 queue scaling: (one queue, two queues)
SCALING = (("udrv nvme / ublk", "udrv nvme / ublk 2q"), ("udrv ram / ublk", "udrv ram / ublk 2q"))
#: The QD1 breakdown's columns: (key in block-qd1.json, heading).
PER_IO = (
    ("iops", "IOPS"),
    ("fio_switches_per_io", "fio switches/IO"),
    ("switches_per_io", "driver switches/IO"),
    ("syscalls_per_io", "driver syscalls/IO"),
    ("io_uring_enter_per_io", "io_uring_enter/IO"),
    ("read_per_io", "read/IO"),
    ("cpu_us_per_io", "driver CPU us/IO"),
)
REFERENCES = {  # path prefix -> the path its IOPS are compared with
    "udrv nvme": "kernel nvme",
    "udrv ram": "kernel null_blk",
    "udrv plugin": "nbdkit python / nbd-client",
    "nbdkit memory": "udrv ram / ublk",
}


def reference(name: str) -> str | None:
    return next((ref for prefix, ref in REFERENCES.items() if name.startswith(prefix)), None)


def main() -> int:
    from udrv.lab import Lab

    console = Console()
    with Lab(["nvme:size=64M"], memory=1536, cpus=2) as lab:
        r = lab.run([sys.executable, "-m", "bench.block.guest"], timeout=1500, stream=True)
        path = lab.results / "block.json"
        data = json.loads(path.read_text()) if r.returncode == 0 and path.exists() else {}
        qd1_path = lab.results / "block-qd1.json"
        qd1 = json.loads(qd1_path.read_text()) if qd1_path.exists() else {}
        prof_path = lab.results / "block-profile.json"
        profile = json.loads(prof_path.read_text()) if prof_path.exists() else []
    if not data:
        console.print("[red]the lab part failed")
        return 1
    table = Table(title="fio through each path (QEMU nvme, TCG, 2 vCPUs): read the ratios")
    for col in ("path", "job", "IOPS", "MB/s", "mean us", "p99 us", "CPU us/IO", "IOPS ratio",
                "vs"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, jobs in data.items():
        ref_name = reference(name)
        ref = data.get(ref_name or "", {})
        for job, m in jobs.items():
            ratio = m["iops"] / ref[job]["iops"] if job in ref else None
            table.add_row(name, job, f"{m['iops']:.0f}", f"{m['mbps']:.1f}",
                          f"{m.get('mean_us', 0):.0f}", f"{m['p99_us']:.0f}",
                          f"{m['cpu_us_per_io']:.0f}", f"{ratio:.2f}" if ratio else "-",
                          ref_name if ratio else "")  # fmt: skip
    console.print(table)
    goals = Table(title="goals (benchmark, not test)")
    for col in ("udrv path", "job", "vs", "ratio", "goal", "met"):
        goals.add_column(col, justify="right")
    met = {}
    for udrv_path, ref, job, goal in GOALS:
        if udrv_path in data and ref in data and job in data[udrv_path]:
            ratio = data[udrv_path][job]["iops"] / data[ref][job]["iops"]
            met[f"{udrv_path} {job}"] = {"ratio": ratio, "goal": goal, "met": ratio >= goal}
            goals.add_row(udrv_path, job, ref, f"{ratio:.2f}", f">= {goal}", "yes" if ratio >= goal else "no")  # fmt: skip
    console.print(goals)
    scaling = {}
    st = Table(title=f"1 -> 2 ublk queues ({QUEUES_JOB}; two queues: a worker process each)")
    for col in ("path", "1 queue IOPS", "2 queues IOPS", "scaling", "CPU us/IO 1q", "CPU us/IO 2q"):
        st.add_column(col, justify="right")
    for one, two in SCALING:
        a, b = data.get(one, {}).get(QUEUES_JOB), data.get(two, {}).get(QUEUES_JOB)
        if a and b:
            scaling[one] = {"one": a["iops"], "two": b["iops"], "scaling": b["iops"] / a["iops"]}
            st.add_row(one, f"{a['iops']:.0f}", f"{b['iops']:.0f}", f"{b['iops'] / a['iops']:.2f}x",
                       f"{a['cpu_us_per_io']:.0f}", f"{b['cpu_us_per_io']:.0f}")  # fmt: skip
    if scaling:
        console.print(st)
    if qd1:
        bt = Table(title="4k randread QD1, per I/O (counts: independent of host load)")
        bt.add_column("path", justify="right")
        for _, head in PER_IO:
            bt.add_column(head, justify="right")
        for name, m in qd1.items():
            bt.add_row(name, *(f"{m[k]:.2f}" if k in m else "-" for k, _ in PER_IO))
        console.print(bt)
    if profile:
        pt = Table(
            title="where the Python time goes (udrv nvme / ublk, 4k randread QD32, yappi CPU)"
        )
        for col in ("function", "calls", "self s", "share"):
            pt.add_column(col, justify="right")
        for p in profile[:15]:
            pt.add_row(p["function"], str(p["calls"]), f"{p['self_s']:.2f}", f"{p['share']:.0%}")
        console.print(pt)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "block.json").write_text(
        json.dumps(
            {"paths": data, "goals": met, "scaling": scaling, "qd1": qd1, "profile": profile},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
