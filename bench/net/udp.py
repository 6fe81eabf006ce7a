"""`python -m bench.net.udp`: where udrv's e1000 loses UDP packet rate against the kernel's.

One lab guest with bench.net's wiring (bench/net/guest.py): 04.0 udrv's e1000 behind TAP
udrv0 10.9.0.1 (root namespace), 05.0 the kernel's e1000 10.9.0.2 (namespace ``peer``, the
iperf3 server), 06.0 the kernel's e1000 10.9.0.3 (namespace ``ref``, the kernel-to-kernel
reference client). The measure is bench.net's: ``iperf3 -u -b 0 -l 18`` (64-byte frames)
and ``-l 1472`` (1514-byte frames) for 4 s, delivered packets per second at the peer.

Several driver variants, each a code tree and its ``udrv e1000 serve`` options: by default
the working tree with its offloads (``offload``) and with ``--no-offload``; ``--variant
NAME=REV[:OPTION,...]`` adds the driver as it was at a git revision (its ``udrv`` package is
unpacked into the results share and run from there), ``.`` being the working tree. Every
round runs, per variant, the kernel path and then that variant for each frame size (kernel,
A, kernel, B, ...), so a slow moment of the shared host hits a variant and its kernel run
alike; the ratio of a round is the variant's rate over the kernel run just before it.

Per udrv run it also records the driver's CPU time per frame (``/proc/PID/stat`` utime +
stime over the frames the TAP handed it, ``/sys/class/net/udrv0/statistics/tx_packets``)
and the frames the TAP dropped for want of a reader (``tx_dropped``). After the rounds,
each variant serves one short 64-byte run under ``strace -c -f`` (system calls per frame)
and, with ``--profile``, one under yappi (bench.net.profile: the top functions by CPU).

Reading the figures: with ``-b 0`` the sender offers far more than the driver takes, and a
TAP has no back-pressure (tun orphans the sender's skbs; a full queue drops, counted in
``tx_dropped``): 80-90 % of the frames offered to udrv0 are dropped there. The rate is then
set by the driver's CPU per frame against the sender's share of the guest's one vCPU, and
the kernel runs of the same session vary by up to 2x: the CPU column is the steadier one.

Everything goes to bench/results/net-udp.json (the driver logs, strace summaries and profiles
to bench/results/net-udp/); the tables print the per-round figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent  # the tree this script runs from
RESULTS = ROOT / "bench" / "results"
SIZES = {"64": 18, "1514": 1472}  # frame bytes -> iperf3 -l (UDP payload): 14 + 20 + 8 + l
SECONDS = 4  # per iperf3 run, as bench.net
TRACE_SECONDS = 3
PEER = "10.9.0.2"


@dataclass
class Variant:
    """One driver to measure: a code tree (None: this one) and ``serve`` options."""

    name: str
    rev: str | None = None  # git revision; None: the working tree
    args: list[str] = field(default_factory=list)
    code: str | None = None  # where its udrv package was unpacked (set by the host side)


def parse_variant(spec: str) -> Variant:
    """``NAME=REV[:OPTION,...]`` -> :class:`Variant`. REV ``.`` is the working tree; each
    OPTION is a ``udrv e1000 serve`` option without its dashes (``no-offload``,
    ``itr-us=200``, ``polling``).

    Raises:
        ValueError: not of that form.
    """
    name, sep, rest = spec.partition("=")
    rev, _, opts = rest.partition(":")
    args = [f"--{o}" for o in opts.split(",") if o]
    if not sep or not name or not rev or any(not re.fullmatch(r"--[a-z][a-z-]*(=\w+)?", a)
                                             for a in args):  # fmt: skip
        raise ValueError(f"--variant {spec!r}: expected NAME=REV[:OPTION,...], e.g. "
                         "old=main:no-offload (REV '.' for the working tree)")  # fmt: skip
    return Variant(name, None if rev == "." else rev, args)


# -- parsers (pure; tested on the host) ----------------------------------------------------


def proc_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from a ``/proc/PID/stat`` line: fields 14 and 15
    (proc(5)), counted after the ``(comm)`` field, which may itself hold spaces."""
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # rest[0] is field 3 (state)


def strace_counts(text: str) -> dict[str, tuple[int, int]]:
    """``strace -c`` summary -> {syscall: (calls, errors)}, without the total line."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or not f[3].isdigit() or f[-1] == "total":
            continue
        errors = int(f[4]) if len(f) == 6 and f[4].isdigit() else 0
        out[f[-1]] = (int(f[3]), errors)
    return out


def udp_rate(report: dict[str, Any]) -> float:
    """Delivered packets per second from an ``iperf3 -u -J`` client report (as bench.net:
    sent minus what the server found lost, over the run's seconds)."""
    s = report["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def driver_counters(stderr: str) -> dict[str, int]:
    """``name=value`` pairs of the driver's exit line (the software counters come first)."""
    lines = stderr.strip().splitlines()
    out: dict[str, int] = {}
    for k, v in re.findall(r"(\w+)=(\d+)", lines[-1] if lines else ""):
        out.setdefault(k, int(v))
    return out


def summarize(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant and frame size: the per-round ratios (variant / the kernel run just
    before it), their median and spread, the medians of both rates, the driver's CPU
    microseconds per frame and the share of frames the TAP dropped."""
    out: dict[str, dict[str, Any]] = {}
    for name, per_size in data["runs"].items():
        out[name] = {}
        for size, runs in per_size.items():
            if not runs:
                continue
            ratios = [r["udrv_pps"] / r["kernel_pps"] for r in runs if r["kernel_pps"]]
            cpu = [r["cpu_us_per_frame"] for r in runs if r.get("cpu_us_per_frame") is not None]
            drop = [r["tap_dropped"] / max(1, r["tap_dropped"] + r["tap_frames"]) for r in runs]
            out[name][size] = {
                "ratios": ratios,
                "ratio": statistics.median(ratios) if ratios else None,
                "spread": (min(ratios), max(ratios)) if ratios else None,
                "kernel_kpps": statistics.median(r["kernel_pps"] for r in runs) / 1e3,
                "udrv_kpps": statistics.median(r["udrv_pps"] for r in runs) / 1e3,
                "cpu_us_per_frame": statistics.median(cpu) if cpu else None,
                "cpu_rounds": cpu,
                "tap_drop_share": statistics.median(drop) if drop else None,
            }
    return out


# -- guest side ----------------------------------------------------------------------------


def _sh(cmd: str, timeout: float = 120) -> str:
    from bench import sh

    return sh(cmd, timeout)


class Driver:
    """``udrv e1000 serve`` of one variant on 04.0 / udrv0, addressed and pinged."""

    def __init__(self, v: Variant, results: Path, profile: Path | None = None) -> None:
        from bench.net.guest import A

        self.variant = v
        self.log = results / f"driver-{v.name}.log"
        head = ["bench.net.profile", str(profile)] if profile else ["udrv"]
        cmd = [sys.executable, "-m", *head, "e1000", "serve", A, "--tap", "udrv0", *v.args]
        env = dict(os.environ)
        cwd = str(ROOT)
        if v.code:
            # `python -m` puts the working directory first on sys.path: the variant's udrv
            # comes from there, bench (for the profile wrapper) from this tree.
            cwd, env["PYTHONPATH"] = v.code, str(ROOT)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                         cwd=cwd, env=env)  # fmt: skip
        assert self.proc.stdout is not None
        try:
            if not self.proc.stdout.readline():
                raise RuntimeError(f"driver {v.name} did not start: "
                                   f"{self.log.read_text()[-2000:]}")  # fmt: skip
            _sh("ip addr add 10.9.0.1/24 dev udrv0")
            _sh(f"ping -c 3 -W 5 {PEER}")
        except BaseException:
            self.stop()
            raise

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(Path(f"/proc/{self.proc.pid}/stat").read_text())

    def stop(self) -> dict[str, int]:
        """SIGINT (SIGKILL if it is still there after 2 minutes), wait; the counters of its
        exit line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return driver_counters(self.log.read_text())


def tap_stats() -> tuple[int, int]:
    """(frames the kernel handed to udrv0's reader, frames it dropped for want of room)."""
    d = Path("/sys/class/net/udrv0/statistics")
    return int((d / "tx_packets").read_text()), int((d / "tx_dropped").read_text())


def iperf_udp(prefix: str, length: int, seconds: int = SECONDS) -> dict[str, Any]:
    _sh("ip netns exec peer sh -c 'pgrep iperf3 || iperf3 -s -D'")
    time.sleep(0.5)
    out = _sh(f"{prefix}iperf3 -c {PEER} -t {seconds} -J -u -b 0 -l {length}", timeout=120)
    report: dict[str, Any] = json.loads(out)
    return report


def tcp_mbps(prefix: str) -> float:
    """An ``iperf3`` TCP stream of SECONDS, as bench.net measures it: received Mbit/s."""
    _sh("ip netns exec peer sh -c 'pgrep iperf3 || iperf3 -s -D'")
    time.sleep(0.5)
    rep = json.loads(_sh(f"{prefix}iperf3 -c {PEER} -t {SECONDS} -J", timeout=120))
    return float(rep["end"]["sum_received"]["bits_per_second"]) / 1e6


def udrv_run(drv: Driver, length: int) -> dict[str, Any]:
    """One iperf3 run through udrv with the driver's CPU time and the TAP's counters."""
    frames0, dropped0 = tap_stats()
    ticks0 = drv.cpu_ticks()
    rep = iperf_udp("", length)
    ticks = drv.cpu_ticks() - ticks0
    frames, dropped = (a - b for a, b in zip(tap_stats(), (frames0, dropped0), strict=True))
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return {
        "udrv_pps": udp_rate(rep),
        "tap_frames": frames,
        "tap_dropped": dropped,
        "cpu_s": cpu_s,
        "cpu_us_per_frame": cpu_s / frames * 1e6 if frames else None,
        "iperf_cpu": rep["end"].get("cpu_utilization_percent", {}),
    }


def wire() -> None:
    """bench.net's wiring, without starting a driver (guest.py's setup)."""
    from bench.net.guest import A, B, C, iface

    _sh("modprobe e1000")
    time.sleep(1)
    _sh(f"{sys.executable} -m udrv bind {A}")
    for ns, addr, ip in (("peer", B, PEER), ("ref", C, "10.9.0.3")):
        i = iface(addr)
        _sh(f"ip netns add {ns} && ip link set {i} netns {ns} && ip -n {ns} addr add {ip}/24 "
            f"dev {i} && ip -n {ns} link set {i} up && ip -n {ns} link set lo up")  # fmt: skip
    _sh("ip netns exec peer iperf3 -s -D >/dev/null 2>&1 || true")
    _sh(f"ip netns exec ref ping -c 3 -W 5 {PEER}")


def trace_run(v: Variant, results: Path) -> dict[str, Any]:
    """One short 64-byte run with the driver under ``strace -c -f``: system calls per frame."""
    drv = Driver(v, results)
    log = results / f"strace-{v.name}.txt"
    try:
        frames0, _ = tap_stats()
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(log), "-p",
                                   str(drv.proc.pid)])  # fmt: skip
        time.sleep(1)
        rep = iperf_udp("", SIZES["64"], TRACE_SECONDS)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        frames = tap_stats()[0] - frames0
    finally:
        counters = drv.stop()
    calls = strace_counts(log.read_text()) if log.exists() else {}
    return {
        "frames": frames,
        "pps_traced": udp_rate(rep),
        "calls": calls,
        "per_frame": {k: c / frames for k, (c, _) in calls.items()} if frames else {},
        "counters": counters,
    }


def profile_run(v: Variant, results: Path) -> dict[str, Any]:
    """One 64-byte run with the driver under yappi (bench.net.profile)."""
    out = results / f"profile-{v.name}.json"
    drv = Driver(v, results, profile=out)
    try:
        frames0, _ = tap_stats()
        iperf_udp("", SIZES["64"])
        frames = tap_stats()[0] - frames0
    finally:
        drv.stop()
    prof = json.loads(out.read_text()) if out.exists() else {}
    return {"frames": frames, **prof}


def _measure_variant(v: Variant, rnd: int, results: Path, data: dict[str, Any]) -> None:
    """One round of one variant: a driver, then per frame size the kernel run and its run."""
    drv = Driver(v, results)
    try:
        for size, length in SIZES.items():
            k = udp_rate(iperf_udp("ip netns exec ref ", length))
            u = udrv_run(drv, length)
            u["kernel_pps"] = k
            data["runs"][v.name][size].append(u)
            print(f"round {rnd + 1} {size} B: kernel {k / 1e3:.2f} kpps, {v.name} "
                  f"{u['udrv_pps'] / 1e3:.2f} kpps ({u['udrv_pps'] / (k or 1):.2f}x), "
                  f"{u['cpu_us_per_frame'] or 0:.0f} us CPU/frame, "
                  f"TAP dropped {u['tap_dropped']}", flush=True)  # fmt: skip
        if "tcp" in data:  # the TCP stream bench.net measures, to see it keeps its gain
            k = tcp_mbps("ip netns exec ref ")
            u = tcp_mbps("")
            data["tcp"][v.name].append({"kernel_mbps": k, "udrv_mbps": u})
            print(f"round {rnd + 1} TCP: kernel {k:.0f} Mbit/s, {v.name} {u:.0f} Mbit/s "
                  f"({u / (k or 1):.2f}x)", flush=True)  # fmt: skip
    finally:
        data["counters"][v.name].append(drv.stop())


def guest_main(config: Path) -> int:
    """The lab side: rounds, then the strace and profile passes; the results are written
    after every step, so that a variant that fails (its error is kept) or a time-out
    leaves what was measured."""
    cfg = json.loads(config.read_text())
    results = Path(os.environ["UDRV_LAB_RESULTS"])
    out = results / "net-udp.json"
    variants = [Variant(**v) for v in cfg["variants"]]
    wire()
    data: dict[str, Any] = {"runs": {v.name: {s: [] for s in SIZES} for v in variants},
                            "counters": {v.name: [] for v in variants}, "errors": []}  # fmt: skip
    if cfg.get("tcp"):
        data["tcp"] = {v.name: [] for v in variants}

    def step(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # kept in the results; the other variants go on
            data["errors"].append(f"{what}: {exc!r}"[:3000])
            print(f"{what} failed: {exc!r}", file=sys.stderr, flush=True)
            return None
        finally:
            out.write_text(json.dumps(data, indent=1))

    for rnd in range(cfg["rounds"]):
        for v in variants:
            step(f"round {rnd + 1} {v.name}",
                 lambda v=v, r=rnd: _measure_variant(v, r, results, data))  # fmt: skip
    if shutil.which("strace"):
        data["strace"] = {}
        for v in variants:
            t = step(f"strace {v.name}", lambda v=v: trace_run(v, results))
            if t is not None:
                data["strace"][v.name] = t
    profiled = cfg.get("profile", "").split(",")
    if any(profiled):
        data["profile"] = {}
        for v in variants:
            if "all" in profiled or v.name in profiled:
                p = step(f"profile {v.name}", lambda v=v: profile_run(v, results))
                if p is not None:
                    data["profile"][v.name] = p
    out.write_text(json.dumps(data, indent=1))
    return 0


# -- host side -----------------------------------------------------------------------------


def unpack(rev: str, dest: Path) -> None:
    """The ``udrv`` package as it was at ``rev``, into ``dest``.

    Raises:
        RuntimeError: git does not know ``rev``.
    """
    dest.mkdir(parents=True)
    git = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "udrv"], capture_output=True)
    if git.returncode:
        raise RuntimeError(f"git archive {rev}: {git.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=git.stdout, check=True)


def report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, shutil.get_terminal_size().columns))
    summary = summarize(data)
    table = Table(title="UDP through udrv's e1000 vs the kernel's e1000 (same QEMU hub, TCG): "
                  "per round, the variant over the kernel run just before it")  # fmt: skip
    for col in ("variant", "frame", "kernel kpps", "udrv kpps", "ratio per round",
                "median (min-max)", "driver CPU us/frame per round", "TAP dropped"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, per_size in summary.items():
        for size, s in per_size.items():
            ratio = (f"{s['ratio']:.2f} ({s['spread'][0]:.2f}-{s['spread'][1]:.2f})"
                     if s["ratio"] is not None else "-")  # fmt: skip
            table.add_row(name, f"{size} B", f"{s['kernel_kpps']:.2f}", f"{s['udrv_kpps']:.2f}",
                          " ".join(f"{r:.2f}" for r in s["ratios"]), ratio,
                          " ".join(f"{c:.0f}" for c in s["cpu_rounds"]),
                          f"{s['tap_drop_share']:.0%}" if s["tap_drop_share"] is not None
                          else "-")  # fmt: skip
    console.print(table)
    for name, runs in data.get("tcp", {}).items():
        if runs:
            ratios = [r["udrv_mbps"] / r["kernel_mbps"] for r in runs if r["kernel_mbps"]]
            console.print(f"{name}: TCP stream per round (Mbit/s, kernel/udrv): "
                          + ", ".join(f"{r['kernel_mbps']:.0f}/{r['udrv_mbps']:.0f}" for r in runs)
                          + f"; ratios {' '.join(f'{x:.2f}' for x in ratios)}, median "
                          f"{statistics.median(ratios):.2f}")  # fmt: skip
    for name, t in data.get("strace", {}).items():
        top = sorted(t["per_frame"].items(), key=lambda kv: -kv[1])[:8]
        errs = {k: e for k, (_, e) in t["calls"].items() if e}
        c = t.get("counters", {})
        batches = (f"; {c['to_nic'] / c['port_batches']:.1f} frames per TAP read batch, "
                   f"{c['to_nic'] / max(1, c['wakeups']):.1f} per wake-up"
                   if c.get("port_batches") else "")  # fmt: skip
        console.print(f"{name}: system calls per frame (strace -c, {t['frames']} frames, 64 B): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in top)
                      + (f"; errors {errs}" if errs else "") + batches)  # fmt: skip
    for name, p in data.get("profile", {}).items():
        if p.get("top"):
            console.print(f"{name}: busy {p['cpu_s'] / p['wall_s']:.0%}, {p['frames']} frames; "
                          "top functions by self time (yappi CPU):")  # fmt: skip
            for t in p["top"][:12]:
                console.print(f"  {t['share']:6.1%} {t['calls']:8d} calls  {t['function']}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.net.udp", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", action="append", type=parse_variant, metavar="NAME=REV[:OPTION,...]",
                    help="a driver to measure (REV '.': the working tree); default: "
                    "offload=. and no-offload=.:no-offload")  # fmt: skip
    ap.add_argument("--profile", nargs="?", const="all", default="", metavar="NAME,...",
                    help="also a yappi run of these variants (default: all)")  # fmt: skip
    ap.add_argument("--tcp", action="store_true",
                    help="also bench.net's TCP stream per variant and round")  # fmt: skip
    ap.add_argument("--guest", type=Path, help=argparse.SUPPRESS)  # the lab side's config
    args = ap.parse_args(argv)
    if args.guest:
        return guest_main(args.guest)
    from udrv.lab import Lab

    variants = args.variant or [
        parse_variant("offload=."),
        parse_variant("no-offload=.:no-offload"),
    ]
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    load = os.getloadavg()
    print(f"host load average: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    # The results share (the same path in the guest): the unpacked variants, the driver
    # logs, strace summaries and profiles stay there for a look afterwards.
    share = RESULTS / "net-udp"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    for v in variants:
        if v.rev:
            v.code = str(share / f"code-{v.name}")
            unpack(v.rev, Path(v.code))
    config = share / "config.json"
    config.write_text(json.dumps({"rounds": args.rounds, "profile": args.profile, "tcp": args.tcp,
                                  "variants": [asdict(v) for v in variants]}))  # fmt: skip
    with Lab(["e1000", "e1000", "e1000"], memory=1024, results=share) as lab:
        r = lab.run([sys.executable, "-m", "bench.net.udp", "--guest", str(config)],
                    timeout=3600, stream=True, cwd=ROOT)  # fmt: skip
    out = share / "net-udp.json"
    data = json.loads(out.read_text()) if out.exists() else None
    if data is None:
        print("the lab part failed before measuring anything", file=sys.stderr)
        return 1
    if r.returncode or data["errors"]:
        print(f"the lab part exited with {r.returncode}; errors: {data['errors']}",
              file=sys.stderr)  # fmt: skip
    data["load"] = load
    data["variants"] = [asdict(v) | {"code": None} for v in variants]
    data["summary"] = summarize(data)
    report(data)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "net-udp.json").write_text(json.dumps(data, indent=1))
    return 1 if r.returncode or data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
