"""The lab side of bench.soak (runs in the guest): one part per call, results as JSON.

`python -m bench.soak.guest PART --cycles N --seconds S` runs part PART for N cycles or until
S seconds have passed, whichever comes first, and rewrites ``soak-PART.json`` in the results
directory after every cycle, so what was done survives a guest that dies half-way.

Parts:
  nvme   SIGKILL `udrv nvme serve` at a random moment of an fio verify job (write phase or
         verify phase), then `--recover` the same ublk disk; the job must pass with every
         block verified. One fio job per cycle, the disk and its recovery chain shared.
  e1000  kill (SIGKILL or SIGINT, at random) `udrv e1000 serve` under iperf3 traffic and start
         it again; the link must come back (ping), no TAP interface may be left over, and the
         restarted driver must hold as many fds as the first one.
  mix    one run of bench.net's traffic mix (ping, UDP 64 and 1514-byte frames, TCP) through
         the kernel's e1000 and through udrv's; the driver must stop cleanly afterwards.
  udp    N rounds of bench.net's UDP 1514-byte phase (iperf3 -u -b 0 -l 1472, the phase in
         which a guest panicked once, issue 13), through the kernel's e1000 and then through
         udrv's, one driver for all rounds; with --mix-every K every Kth round is the whole
         traffic mix. With --driver kernel 04.0 keeps the kernel's e1000 (10.9.0.1 in the
         root namespace): the same traffic with no udrv at all, the control.

Wiring of the network parts (one QEMU hub, as bench.net): 04.0 udrv e1000 -> TAP udrv0
10.9.0.1; 05.0 kernel e1000 10.9.0.2 in namespace "peer" (iperf3 server); 06.0 kernel e1000
10.9.0.3 in namespace "ref" (the kernel-to-kernel reference client).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import sh
from bench.net.guest import rtt, tcp_mbps, udp_pps

A, B, C = "0000:00:04.0", "0000:00:05.0", "0000:00:06.0"
FIO_SIZE_MB = 8  # per nvme cycle: 2048 4-KiB blocks written, then all read back and checked
TAP = "udrv0"


class Failure(Exception):
    """A cycle broke a soak promise; the message says which and how."""


def write_json(name: str, data: dict[str, Any]) -> None:
    path = Path(os.environ["UDRV_LAB_RESULTS"], f"soak-{name}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: the host never reads half a file


def wait_for(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    """Poll ``cond`` until true; the seconds it took, or Failure naming ``what``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise Failure(f"{what}: not within {timeout:g} s")
        time.sleep(poll)
    return time.monotonic() - start


# -- nvme: SIGKILL under fio verify, then --recover -----------------------------------------


class BlockServer:
    """`udrv nvme serve ...`; ``path`` is the device it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "udrv", "nvme", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()
        if not self.path:
            raise Failure(f"udrv nvme serve {' '.join(args)} did not start: "
                          f"{self.proc.communicate(timeout=30)[1][-2000:]}")  # fmt: skip
        wait_for(f"{self.path} to appear", lambda: os.path.exists(self.path), 30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise Failure(f"udrv nvme serve exited {self.proc.returncode} on SIGINT: {err[-2000:]}")


def ios_done(stat: Path) -> int:
    f = stat.read_text().split()
    return int(f[0]) + int(f[4])  # reads + writes completed (Documentation/block/stat.rst)


def nvme_cycle(srv: BlockServer, args: list[str], rng: random.Random) -> tuple[BlockServer, dict[str, Any]]:  # fmt: skip
    """One fio verify job on ``srv``'s disk, SIGKILL at a random moment, ``--recover``."""
    blocks = FIO_SIZE_MB * 256
    stat = Path(f"/sys/block/{os.path.basename(srv.path)}/stat")
    dev_id = int(srv.path.removeprefix("/dev/ublkb"))
    base = ios_done(stat)
    # A random point of the job, counted in completed I/Os: the write pass is the first
    # `blocks`, fio's verify reads the next `blocks`.
    at = rng.randrange(1, 2 * blocks - 16)
    job = subprocess.Popen(
        ["fio", "--name=soak", f"--filename={srv.path}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", f"--size={FIO_SIZE_MB}M", "--iodepth=16",
         f"--randseed={rng.randrange(1 << 31)}", "--verify=crc32c", "--verify_fatal=1",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for("fio to reach the kill point", lambda: ios_done(stat) - base >= at
                 or job.poll() is not None, 300, poll=0.005)  # fmt: skip
        if job.poll() is not None:
            raise Failure(f"fio ended before the kill point ({at} I/Os): {job.communicate()[1]}")
        srv.kill()
        killed = time.monotonic()
        held = ios_done(stat)
        if not os.path.exists(srv.path):
            raise Failure(f"{srv.path} went away with its driver (no recovery)")
        again = BlockServer(*args, "--recover", str(dev_id))
        if again.path != srv.path:
            raise Failure(f"--recover {dev_id} served {again.path}, not {srv.path}")
        ready = time.monotonic() - killed
        # Recovered: the kernel re-issues what it held and I/O completes again (or fio ended).
        wait_for("I/O to resume after --recover",
                 lambda: ios_done(stat) > held or job.poll() is not None, 120, poll=0.005)  # fmt: skip
        resumed = time.monotonic() - killed
        out, err = job.communicate(timeout=600)
    except BaseException:
        if job.poll() is None:
            job.kill()
            job.wait()
        raise
    if job.returncode != 0:
        raise Failure(f"fio exited {job.returncode} after the recovery: {err[-2000:]}")
    r = json.loads(out[out.index("{") :])["jobs"][0]
    if r["error"] != 0 or r["read"]["total_ios"] != blocks:
        raise Failure(
            f"fio: error {r['error']}, {r['read']['total_ios']} of {blocks} blocks verified"
        )
    phase = "write" if at < blocks else "verify"
    return again, {"kill_at_io": at, "phase": phase, "ready_s": ready, "recover_s": resumed,
                   "verified_blocks": r["read"]["total_ios"]}  # fmt: skip


def part_nvme(cycles: int, deadline: float, rng: random.Random) -> dict[str, Any]:
    addr = dict(x.split("=", 1) for x in os.environ["UDRV_LAB_DEVICES"].split(","))["nvme"]
    sh("modprobe ublk_drv")
    sh(f"udrv bind {addr}")
    args = [addr, "--queues", "1", "--depth", "16"]
    srv = BlockServer(*args)
    out: dict[str, Any] = {"cycles": 0, "failures": 0, "runs": []}
    try:
        while out["cycles"] < cycles and time.monotonic() < deadline:
            out["cycles"] += 1
            try:
                srv, run = nvme_cycle(srv, args, rng)
            except Failure as e:
                out["failures"] += 1
                run = {"error": str(e)}
                if srv.proc.poll() is not None:  # the chain broke: start on a fresh disk
                    srv = BlockServer(*args)
            out["runs"].append(run)
            print(f"nvme cycle {out['cycles']}: {run}", flush=True)
            write_json("nvme", out)
    finally:
        if srv.proc.poll() is None:
            srv.stop()
    return out


# -- e1000: restarts under iperf3 traffic ---------------------------------------------------


def iface(address: str) -> str:
    return os.listdir(f"/sys/bus/pci/devices/{address}/net")[0]


def net_setup() -> None:
    """The two kernel-driven peers in their namespaces and udrv's NIC on vfio-pci (idempotent:
    every part and every mix run calls it in the same guest)."""
    if "peer" in sh("ip netns list"):
        return
    sh("modprobe e1000")
    wait_for("the kernel e1000s", lambda: all(
        Path(f"/sys/bus/pci/devices/{a}/net").exists() for a in (B, C)), 30)  # fmt: skip
    sh(f"udrv bind {A}")
    for ns, addr, ip in (("peer", B, "10.9.0.2"), ("ref", C, "10.9.0.3")):
        i = iface(addr)
        sh(f"ip netns add {ns} && ip link set {i} netns {ns} && ip -n {ns} addr add {ip}/24 dev {i} "
           f"&& ip -n {ns} link set {i} up && ip -n {ns} link set lo up")  # fmt: skip


def net_ifaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_nic() -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "udrv", "e1000", "serve", A, "--tap", TAP],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    # Bounded: a driver that hangs while starting is a failure, not a stuck soak.
    if not select.select([proc.stdout], [], [], 120)[0]:
        proc.kill()
        raise Failure(f"udrv e1000 serve printed nothing in 120 s: {proc.communicate()[1][-2000:]}")
    line = proc.stdout.readline()
    if f"{TAP}: 82540EM" not in line:
        err = proc.communicate(timeout=30)[1] if proc.poll() is not None else ""
        raise Failure(f"udrv e1000 serve did not start: {line}{err[-2000:]}")
    sh(f"ip addr add 10.9.0.1/24 dev {TAP}")
    return proc


def stop_nic(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGINT) -> str:
    """Stop the driver; its stderr. Its TAP must go with it."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT and proc.returncode != 0:
        raise Failure(f"udrv e1000 serve exited {proc.returncode} on SIGINT: {err[-2000:]}")
    wait_for(f"{TAP} to go with its driver", lambda: not Path(f"/sys/class/net/{TAP}").exists(), 15)
    return err


def link_up() -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "1", "10.9.0.2"],
                          capture_output=True).returncode == 0  # fmt: skip


def e1000_cycle(proc: subprocess.Popen[str], baseline: dict[str, Any], rng: random.Random) -> tuple[subprocess.Popen[str], dict[str, Any]]:  # fmt: skip
    """Traffic through the running driver, kill it at a random moment, start a new one."""
    mode = rng.choice(["tcp", "udp"])
    server = subprocess.Popen(["ip", "netns", "exec", "peer", "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    client = subprocess.Popen(["iperf3", "-c", "10.9.0.2", "-t", "60",
                               *(["-u", "-b", "50M", "-l", "1472"] if mode == "udp" else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sig = rng.choice([signal.SIGKILL, signal.SIGINT])
    try:
        time.sleep(rng.uniform(1.0, 4.0))
        if client.poll() is not None:
            raise Failure(f"iperf3 -c ended before the restart: {client.communicate()[0][-1000:]}")
        killed = time.monotonic()
        stop_nic(proc, sig)
        stopped = time.monotonic()
        leftover = net_ifaces() - baseline["ifaces"]
        if leftover:
            raise Failure(f"interfaces left after the driver stopped: {sorted(leftover)}")
        proc = start_nic()
        started = time.monotonic()
        wait_for("ping 10.9.0.2 through the restarted driver", link_up, 30, poll=0)
        recover = time.monotonic() - killed  # from the signal to the first ping answered
        fds = fd_count(proc.pid)
        if fds != baseline["fds"]:
            raise Failure(f"the restarted driver holds {fds} fds, the first one {baseline['fds']}")
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
            p.wait()
    return proc, {"traffic": mode, "signal": sig.name, "recover_s": recover,
                  "stop_s": stopped - killed, "start_s": started - stopped,
                  "link_s": recover - (started - killed), "fds": fds,
                  "file_nr": int(Path("/proc/sys/fs/file-nr").read_text().split()[0])}  # fmt: skip


def part_e1000(cycles: int, deadline: float, rng: random.Random) -> dict[str, Any]:
    net_setup()
    baseline: dict[str, Any] = {"ifaces": net_ifaces()}
    proc = start_nic()
    wait_for("ping 10.9.0.2 through udrv0", link_up, 30, poll=0)
    baseline["fds"] = fd_count(proc.pid)
    out: dict[str, Any] = {"cycles": 0, "failures": 0, "first_fds": baseline["fds"], "runs": []}
    try:
        while out["cycles"] < cycles and time.monotonic() < deadline:
            out["cycles"] += 1
            try:
                proc, run = e1000_cycle(proc, baseline, rng)
            except Failure as e:
                out["failures"] += 1
                run = {"error": str(e)}
                if proc.poll() is not None:
                    if Path(f"/sys/class/net/{TAP}").exists():
                        raise  # cannot start another driver on a TAP that stayed
                    proc = start_nic()
            out["runs"].append(run)
            print(f"e1000 cycle {out['cycles']}: {run}", flush=True)
            write_json("e1000", out)
    finally:
        if proc.poll() is None:
            stop_nic(proc)
    return out


# -- mix: bench.net's traffic mix -----------------------------------------------------------


def part_mix(run: int) -> dict[str, Any]:
    net_setup()
    proc = start_nic()
    try:
        wait_for("ping 10.9.0.2 through udrv0", link_up, 30, poll=0)
        data: dict[str, float] = {}
        for name, fn in (("ping RTT ms", rtt), ("UDP 64-byte kpps", lambda p: udp_pps(p, 18) / 1e3),
                         ("UDP 1514-byte kpps", lambda p: udp_pps(p, 1472) / 1e3),
                         ("TCP Mbit/s", tcp_mbps)):  # fmt: skip
            for path, prefix in (("kernel", "ip netns exec ref "), ("udrv", "")):
                data[f"{name} {path}"] = fn(prefix)
    finally:
        stop_nic(proc)
    print(f"mix run {run}: {data}", flush=True)
    return data


# -- udp: the phase that once panicked, over and over ----------------------------------------


def kernel_nic_setup() -> str:
    """The control wiring: 04.0 on the kernel's e1000 as 10.9.0.1 in the root namespace, the
    peers as in :func:`net_setup` (idempotent, as that); the interface name."""
    if "peer" in sh("ip netns list"):
        return iface(A)
    sh("modprobe e1000")
    wait_for("the kernel e1000s", lambda: all(
        Path(f"/sys/bus/pci/devices/{a}/net").exists() for a in (A, B, C)), 30)  # fmt: skip
    for ns, addr, ip in (("peer", B, "10.9.0.2"), ("ref", C, "10.9.0.3")):
        i = iface(addr)
        sh(f"ip netns add {ns} && ip link set {i} netns {ns} && ip -n {ns} addr add {ip}/24 dev {i} "
           f"&& ip -n {ns} link set {i} up && ip -n {ns} link set lo up")  # fmt: skip
    name = iface(A)
    sh(f"ip addr add 10.9.0.1/24 dev {name} && ip link set {name} up")
    return name


UDP_PHASE = (("UDP 1514-byte kpps", lambda p: udp_pps(p, 1472) / 1e3),)
MIX = (("ping RTT ms", rtt), ("UDP 64-byte kpps", lambda p: udp_pps(p, 18) / 1e3),
       *UDP_PHASE, ("TCP Mbit/s", tcp_mbps))  # fmt: skip


def part_udp(rounds: int, deadline: float, driver: str, mix_every: int, name: str) -> dict[str, Any]:  # fmt: skip
    proc = None
    if driver == "udrv":
        net_setup()
        proc = start_nic()
    else:
        kernel_nic_setup()
    out: dict[str, Any] = {"driver": driver, "cycles": 0, "failures": 0, "runs": []}
    try:
        wait_for("ping 10.9.0.2 through 04.0", link_up, 30, poll=0)
        while out["cycles"] < rounds and time.monotonic() < deadline:
            out["cycles"] += 1
            full = mix_every > 0 and out["cycles"] % mix_every == 0
            run: dict[str, Any] = {"mix": full}
            try:
                for what, fn in MIX if full else UDP_PHASE:
                    # 04.0's path is "udrv", or "kernel 04.0" in the control.
                    for path, prefix in (("kernel", "ip netns exec ref "),
                                         ("udrv" if proc else "kernel 04.0", "")):  # fmt: skip
                        run[f"{what} {path}"] = round(fn(prefix), 3)
                if proc is not None and proc.poll() is not None:
                    raise Failure(f"udrv e1000 serve exited {proc.returncode}")
            except (Failure, RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
                out["failures"] += 1
                run["error"] = str(e)[-1000:]
            out["runs"].append(run)
            print(f"udp round {out['cycles']}: {run}", flush=True)
            write_json(name, out)
    finally:
        if proc is not None and proc.poll() is None:
            stop_nic(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["nvme", "e1000", "mix", "udp"])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--run", type=int, default=0, help="mix: the run's number (its file name)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--driver", choices=["udrv", "kernel"], default="udrv",
                    help="udp: who drives 04.0 (kernel: the control)")  # fmt: skip
    ap.add_argument("--mix-every", type=int, default=0, help="udp: every Kth round the mix")
    ap.add_argument("--name", default="udp", help="udp: the results file's name")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    print(f"soak {args.part}: seed {seed}", flush=True)
    deadline = time.monotonic() + args.seconds
    if args.part == "nvme":
        out = part_nvme(args.cycles, deadline, rng)
    elif args.part == "e1000":
        out = part_e1000(args.cycles, deadline, rng)
    elif args.part == "udp":
        out = part_udp(args.cycles, deadline, args.driver, args.mix_every, args.name)
        write_json(args.name, out)
        return 1 if out["failures"] else 0
    else:
        write_json(f"mix{args.run}", part_mix(args.run))
        return 0
    out["seed"] = seed
    write_json(args.part, out)
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
