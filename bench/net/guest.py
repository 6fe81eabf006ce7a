"""The lab side of bench.net (runs in the guest): same measurements through two paths.

Wiring (one QEMU hub): 04.0 udrv e1000 -> TAP udrv0 10.9.0.1 (root namespace);
05.0 kernel e1000 10.9.0.2 (namespace "peer", the iperf3 server); 06.0 kernel e1000
10.9.0.3 (namespace "ref", the kernel-to-kernel reference client).

Each measure runs kernel then udrv, alternately ``ROUNDS`` times (ABAB), so that a slow
moment of the shared host hits both paths, and keeps every round's pair: the host judges
each goal round by round (``bench.net.__main__.summarize``). With
``UDRV_BENCH_PROFILE=1`` the driver then runs once more under yappi and strace for a
ping series and a TCP stream, and the notes say where its time and system calls go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import sh

A, B, C = "0000:00:04.0", "0000:00:05.0", "0000:00:06.0"
ROUNDS = 3
PINGS = 40


def iface(address: str) -> str:
    return os.listdir(f"/sys/bus/pci/devices/{address}/net")[0]


def start_driver(profile: Path | None = None) -> subprocess.Popen[str]:
    args = ["e1000", "serve", A, "--tap", "udrv0"]
    cmd = [sys.executable, "-m", "udrv", *args]
    if profile:
        cmd = [sys.executable, "-m", "bench.net.profile", str(profile), *args]
    drv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert drv.stdout is not None
    drv.stdout.readline()
    sh("ip addr add 10.9.0.1/24 dev udrv0")
    sh("ping -c 3 -W 5 10.9.0.2")
    return drv


def stop_driver(drv: subprocess.Popen[str]) -> str:
    drv.send_signal(signal.SIGINT)
    return drv.communicate(timeout=60)[1]


def setup() -> subprocess.Popen[str]:
    sh("modprobe e1000")
    time.sleep(1)
    sh(f"udrv bind {A}")
    for ns, addr, ip in (("peer", B, "10.9.0.2"), ("ref", C, "10.9.0.3")):
        i = iface(addr)
        sh(f"ip netns add {ns} && ip link set {i} netns {ns} && ip -n {ns} addr add {ip}/24 dev {i} "
           f"&& ip -n {ns} link set {i} up && ip -n {ns} link set lo up")  # fmt: skip
    drv = start_driver()
    sh("ip netns exec peer iperf3 -s -D >/dev/null 2>&1 || true")
    sh("ip netns exec ref ping -c 3 -W 5 10.9.0.2")
    return drv


def rtt(prefix: str) -> float:
    out = sh(f"{prefix}ping -q -c {PINGS} -i 0.05 -W 5 10.9.0.2")
    return float(re.search(r"= [\d.]+/([\d.]+)/", out)[1])  # type: ignore[index]


def iperf(prefix: str, args: str) -> dict:  # type: ignore[type-arg]
    sh("ip netns exec peer sh -c 'pgrep iperf3 || iperf3 -s -D'")
    time.sleep(0.5)
    return json.loads(sh(f"{prefix}iperf3 -c 10.9.0.2 -t 4 -J {args}", timeout=120))


def udp_pps(prefix: str, length: int) -> float:
    j = iperf(prefix, f"-u -b 0 -l {length}")
    s = j["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def tcp_mbps(prefix: str) -> float:
    return iperf(prefix, "")["end"]["sum_received"]["bits_per_second"] / 1e6


def counters(line: str) -> dict[str, int]:
    """``name=value`` pairs of the driver's exit line (software and device counters)."""
    out: dict[str, int] = {}
    for k, v in re.findall(r"(\w+)=(\d+)", line):
        out.setdefault(k, int(v))  # the software counters come first, the device's after
    return out


def profile_run(results: Path) -> list[str]:
    """The driver under yappi (CPU time per function), then under ``strace -c`` (system calls
    per ping round trip), for PINGS pings and a 4 s TCP stream each."""
    notes = []
    prof = results / "net-profile.json"
    drv = start_driver(prof)
    rtt("")
    tcp_mbps("")
    err = stop_driver(drv)
    c = counters(err)
    if prof.exists():
        p = json.loads(prof.read_text())
        notes.append(f"driver busy {p['cpu_s'] / p['wall_s']:.0%} of the time it served "
                     f"({p['cpu_s']:.1f} s CPU in {p['wall_s']:.1f} s: ping series + TCP "
                     "stream); top functions by self time (yappi CPU):")  # fmt: skip
        notes += [f"  {t['share']:6.1%} {t['calls']:8d} calls  {t['function']}"
                  for t in p["top"][:12]]  # fmt: skip
    if c.get("tx_good_packets") and c.get("tx_packets"):
        notes.append(f"TSO: {c['tx_packets']} frames from the kernel became "
                     f"{c['tx_good_packets']} frames on the wire "
                     f"({c['tx_good_packets'] / c['tx_packets']:.1f} per frame)")  # fmt: skip
    if shutil.which("strace"):
        drv = start_driver()
        log = Path("/tmp/strace-net.txt")
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(log), "-p", str(drv.pid)])
        time.sleep(1)
        rtt("")
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        stop_driver(drv)
        calls = {}
        for line in log.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[3].isdigit() and f[-1] not in ("total",):
                calls[f[-1]] = int(f[3])
        per = {k: v / PINGS for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
        notes.append(
            "system calls per ping round trip (strace -c, incl. the 3 setup pings): "
            + ", ".join(f"{k} {v:.1f}" for k, v in list(per.items())[:8])
        )
    return notes


def main() -> int:
    drv = setup()
    paths = {"kernel": "ip netns exec ref ", "udrv": ""}
    data: dict[str, dict[str, object]] = {}
    meas: list[tuple[str, Callable[[str], float], str]] = [
        ("ping RTT", rtt, "ms"),
        ("UDP 64-byte frames", lambda p: udp_pps(p, 18) / 1e3, "kpps"),
        ("UDP 1514-byte frames", lambda p: udp_pps(p, 1472) / 1e3, "kpps"),
        ("TCP stream", tcp_mbps, "Mbit/s"),
    ]
    for name, fn, unit in meas:
        ks, us = [], []
        for _ in range(ROUNDS):
            ks.append(fn(paths["kernel"]))
            us.append(fn(paths["udrv"]))
        # Round i's pair (ks[i], us[i]) ran back to back: the ratio is taken per round.
        data[name] = {"unit": unit, "kernel": ks, "udrv": us}
        pairs = ", ".join(f"{k:.2f}/{u:.2f}" for k, u in zip(ks, us, strict=True))
        print(f"{name} ({unit}, kernel/udrv per round): {pairs}", flush=True)
    err = stop_driver(drv)
    notes = [f"each measure: {ROUNDS} rounds, kernel then udrv in each (ABAB)"]
    notes.append("driver counters: " + err.strip().splitlines()[-1][:400] if err.strip() else "")
    results = Path(os.environ["UDRV_LAB_RESULTS"])
    if os.environ.get("UDRV_BENCH_PROFILE"):
        notes += profile_run(results)
    (results / "net.json").write_text(json.dumps({"measures": data, "notes": notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
