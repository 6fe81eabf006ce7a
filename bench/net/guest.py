"""The lab side of bench.net (runs in the guest): same measurements through two paths.

Wiring (one QEMU hub): 04.0 udrv e1000 -> TAP udrv0 10.9.0.1 (root namespace);
05.0 kernel e1000 10.9.0.2 (namespace "peer", the iperf3 server); 06.0 kernel e1000
10.9.0.3 (namespace "ref", the kernel-to-kernel reference client).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import sh

A, B, C = "0000:00:04.0", "0000:00:05.0", "0000:00:06.0"


def iface(address: str) -> str:
    return os.listdir(f"/sys/bus/pci/devices/{address}/net")[0]


def setup() -> subprocess.Popen[str]:
    sh("modprobe e1000")
    time.sleep(1)
    sh(f"udrv bind {A}")
    for ns, addr, ip in (("peer", B, "10.9.0.2"), ("ref", C, "10.9.0.3")):
        i = iface(addr)
        sh(f"ip netns add {ns} && ip link set {i} netns {ns} && ip -n {ns} addr add {ip}/24 dev {i} "
           f"&& ip -n {ns} link set {i} up && ip -n {ns} link set lo up")  # fmt: skip
    drv = subprocess.Popen([sys.executable, "-m", "udrv", "e1000", "serve", A, "--tap", "udrv0"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert drv.stdout is not None
    drv.stdout.readline()
    sh("ip addr add 10.9.0.1/24 dev udrv0")
    sh("ip netns exec peer iperf3 -s -D -1 >/dev/null 2>&1 || true")
    sh("ping -c 3 -W 5 10.9.0.2")
    sh("ip netns exec ref ping -c 3 -W 5 10.9.0.2")
    return drv


def rtt(prefix: str) -> float:
    out = sh(f"{prefix}ping -q -c 40 -i 0.05 -W 5 10.9.0.2")
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


def main() -> int:
    drv = setup()
    paths = {"kernel": "ip netns exec ref ", "udrv": ""}
    data: dict[str, tuple[float, float, str]] = {}
    meas = [
        ("ping RTT", rtt, "ms"),
        ("UDP 64-byte frames", lambda p: udp_pps(p, 18) / 1e3, "kpps"),
        ("UDP 1514-byte frames", lambda p: udp_pps(p, 1472) / 1e3, "kpps"),
        ("TCP stream", tcp_mbps, "Mbit/s"),
    ]
    for name, fn, unit in meas:
        k, u = fn(paths["kernel"]), fn(paths["udrv"])
        data[name] = (k, u, unit)
        print(f"{name}: kernel {k:.2f} {unit}, udrv {u:.2f} {unit}", flush=True)
    drv.send_signal(signal.SIGINT)
    drv.wait(30)
    Path(os.environ["UDRV_LAB_RESULTS"], "net.json").write_text(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
