"""`python -m bench.soak [--quick | --cycles N --mix-runs M]`: soak and chaos, bounded.

In one lab guest (three e1000s wired as in bench.net, and an nvme), in turn:
  nvme   N SIGKILLs of `udrv nvme serve` at random moments of fio verify jobs, each followed
         by `--recover`: every job passes with every block verified;
  e1000  N restarts (SIGKILL or SIGINT) of `udrv e1000 serve` under iperf3 traffic: the link
         comes back each time, no TAP interface is left over, no fd leaks into the new driver;
  mix    M runs of bench.net's traffic mix (one guest command each).
Every part is bounded in cycles and in time. A guest that dies (a kernel panic) counts as a
failure, its oops is printed, and a new guest runs the rest. A WARNING or oops the guest
survives counts as a failure too. Writes bench/results/soak.json; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent.parent / "results"
DEVICES = ["e1000", "e1000", "e1000", "nvme:size=32M"]  # e1000s at 04.0-06.0, as bench.net


class Soak:
    """The lab guest of the soak, booted again after a guest death."""

    def __init__(self, console: Console) -> None:
        from udrv.lab import Lab

        self.console = console
        # One results directory for every guest, so a dead guest's files can still be read.
        self.results = Path(tempfile.mkdtemp(prefix="udrv-soak-"))
        self.lab: Lab | None = None
        self.deaths: list[dict[str, str]] = []
        self.kernel_reports: list[dict[str, str]] = []

    def run(self, name: str, args: list[str], timeout: float) -> tuple[bool, str]:
        """Run ``python -m bench.soak.guest ARGS`` in the guest; (passed, why not)."""
        from udrv.errors import LabError
        from udrv.lab import Lab

        if self.lab is None or not self.lab.alive:
            self.lab = Lab(DEVICES, memory=1024, results=self.results).start()
        cmd = [sys.executable, "-m", "bench.soak.guest", *args]
        try:
            r = self.lab.run(cmd, timeout=timeout, stream=True)
        except LabError as e:  # the guest died (its oops is in the message) or hung
            self.console.print(f"[red]{name}: the guest died\n{e}")
            self.deaths.append({"part": name, "report": str(e)})
            self.lab.kill()
            self.lab = None
            return False, "guest died"
        if r.kernel_report:
            self.console.print(f"[red]{name}: the guest kernel reported\n{r.kernel_report}")
            self.kernel_reports.append({"part": name, "report": r.kernel_report})
        if r.timed_out:
            return False, f"timed out after {timeout:g} s"
        if r.returncode != 0:
            return False, f"exit {r.returncode}"
        return not r.kernel_report, "kernel report" if r.kernel_report else ""

    def read(self, name: str) -> dict[str, Any]:
        path = self.results / f"soak-{name}.json"
        if not path.exists():
            return {}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def close(self) -> None:
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.results, ignore_errors=True)


def summary(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    times = [r["recover_s"] for r in runs if "recover_s" in r]
    if not times:
        return {"p50": None, "max": None}
    return {"p50": statistics.median(times), "max": max(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=20, help="nvme kills and e1000 restarts")
    ap.add_argument("--mix-runs", type=int, default=10, help="runs of bench.net's traffic mix")
    ap.add_argument("--quick", action="store_true", help="3 cycles each, 1 mix run")
    ap.add_argument("--minutes", type=float, default=40, help="time bound for the whole soak")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.mix_runs = 3, 1
    console = Console()
    seed = ["--seed", str(args.seed)] if args.seed is not None else []
    start = time.monotonic()
    end = start + args.minutes * 60
    # The time of each part: its share of what is left, so time a part leaves over goes on.
    budget = {"nvme": 0.3, "e1000": 0.35, "mix": 0.35}
    out: dict[str, Any] = {"quick": args.quick, "requested": {"cycles": args.cycles,
                                                             "mix_runs": args.mix_runs}}  # fmt: skip
    soak = Soak(console)
    try:
        for part in ("nvme", "e1000"):
            share = budget[part] / (
                budget[part] + budget["mix"] + budget["e1000"] * (part == "nvme")
            )
            seconds = share * (end - time.monotonic())
            ok, why = soak.run(part, [part, "--cycles", str(args.cycles), "--seconds",
                                      f"{seconds:.0f}", *seed], timeout=seconds + 300)  # fmt: skip
            data = soak.read(part)
            runs = data.get("runs", [])
            cycles, failures = data.get("cycles", 0), data.get("failures", 0)
            if cycles < args.cycles:
                why = why or f"only {cycles} of {args.cycles} cycles in {seconds:.0f} s"
            out[part] = {"cycles": cycles, "failures": failures, "recover_s": summary(runs),
                         "passed": ok and not failures and cycles >= args.cycles,
                         "problem": why, "runs": runs}  # fmt: skip
        mix_runs, mix_fail, mix_data = 0, 0, []
        for i in range(args.mix_runs):
            if time.monotonic() > end:
                break
            mix_runs += 1
            ok, why = soak.run(f"mix {i}", ["mix", "--run", str(i)], timeout=600)
            mix_fail += not ok
            mix_data.append(soak.read(f"mix{i}") if ok else {"error": why})
        out["mix"] = {"cycles": mix_runs, "failures": mix_fail, "runs": mix_data,
                      "passed": mix_fail == 0 and mix_runs >= args.mix_runs,
                      "problem": "" if mix_runs >= args.mix_runs else
                      f"only {mix_runs} of {args.mix_runs} runs in the time bound"}  # fmt: skip
    finally:
        soak.close()
    out["guest_deaths"] = soak.deaths
    out["kernel_reports"] = soak.kernel_reports
    out["seconds"] = time.monotonic() - start
    passed = all(out[p]["passed"] for p in ("nvme", "e1000", "mix")) and not soak.deaths

    table = Table(
        title=f"soak ({'quick' if args.quick else 'full'}, {out['seconds'] / 60:.1f} min)"
    )
    for col in ("part", "cycles", "failures", "recover p50 s", "recover max s", "passed"):
        table.add_column(col, justify="right")
    for part, what in (("nvme", "nvme kill+recover"), ("e1000", "e1000 restart"),
                       ("mix", "bench.net mix")):  # fmt: skip
        p = out[part]
        rec = p.get("recover_s", {"p50": None, "max": None})
        table.add_row(what, f"{p['cycles']}/{args.mix_runs if part == 'mix' else args.cycles}",
                      str(p["failures"]),
                      f"{rec['p50']:.2f}" if rec["p50"] is not None else "-",
                      f"{rec['max']:.2f}" if rec["max"] is not None else "-",
                      "yes" if p["passed"] else f"no {p.get('problem', '')}".strip())  # fmt: skip
    console.print(table)
    console.print(f"guest deaths: {len(soak.deaths)}, kernel reports: {len(soak.kernel_reports)}")
    for part in ("nvme", "e1000"):
        for i, r in enumerate(out[part]["runs"], 1):
            if "error" in r:
                console.print(f"[red]{part} cycle {i}: {r['error']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=2))
    console.print(f"results: {RESULTS / 'soak.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
