"""The lab side of bench.block (runs in the guest): :func:`bench.block.plan.schedule`, step by step.

The paths: (a) the kernel's nvme driver on QEMU's nvme; (b) udrv's NVMe driver over ublk (one
queue, and two: ``--queues 2``, a worker process per queue pinned to the CPUs blk-mq maps to
it) and (c) over NBD, on the same device, which goes back to the kernel's nvme at the start
of every repetition; (d) the kernel's null_blk (memory-backed, ``submit_queues=2``) and udrv's
RAM disk over ublk (one queue, two); (e) the same nbdkit Python plugin
(examples/plugins/ram.py, 64 MiB) under ``nbdkit python`` + the kernel's NBD client
(nbd-client) and under ``udrv plugin serve`` over ublk and over NBD; nbdkit's C ``memory``
plugin + nbd-client beside udrv's RAM disk. Each repetition runs each group's reference,
then the udrv paths compared with it (see bench/block/plan.py for the method and which jobs
run in every repetition).

Per fio job: IOPS, MB/s, mean and p99 completion latency, and CPU time per I/O: for udrv
and nbdkit the serving process's and its children's (utime + stime from /proc/PID/stat), for
the kernel's drivers fio's system time (where the kernel driver's work is billed).

For the QD1 read job of the paths in ``BREAKDOWN`` (once, in the first repetition), a per-I/O
breakdown that host load does not change: the serving processes' system calls (``strace -c
-f``, in a run of its own since strace slows it) and context switches
(``/proc/PID/task/*/status``), next to their CPU time. Last, udrv NVMe over ublk runs the 4k
QD32 read job under yappi for a profile.

Writes ``block.json`` (``reps``: per repetition path -> job -> figures; ``qd1``: the
breakdowns) to the results directory after every session, and ``block-profile.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import sh
from bench.block.plan import JOBS, PROFILE_PATH, schedule, sessions, settings
from udrv.lab.pytest_plugin import bind

TICK = os.sysconf("SC_CLK_TCK")
RAM_PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "ram.py"


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (ublk's worker processes): proc(5) ``task/TID/children``."""
    out = [pid]
    for p in out:
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                out += map(int, Path(f"/proc/{p}/task/{tid}/children").read_text().split())
        except FileNotFoundError:  # a process or thread that just ended
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime (proc(5)) of ``pid`` and its live descendants."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def fio(dev: str, job: str, pid: int | None, runtime: float, ramp: float = 1.0) -> dict[str, float]:
    """fio's ``job`` on ``dev`` for ``runtime`` s after ``ramp`` s; ``pid``: the serving
    process (None: a kernel driver). Returns the figures of the measured part."""
    before = cpu_seconds(pid) if pid else 0.0
    out = sh(f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio --time_based "
             f"--runtime={runtime:g} --ramp_time={ramp:g} --size=48M --output-format=json "
             f"{JOBS[job]}",
             timeout=runtime * 10 + 60)  # fmt: skip
    # The driver's CPU time spans fio's ramp too, its I/O count does not: take the measured
    # part's share (the rate is steady by then).
    used = (cpu_seconds(pid) - before) * runtime / (runtime + ramp) if pid else 0.0
    j = json.loads(out[out.index("{") :])["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    ios = max(side["total_ios"], 1)
    runtime_s = j["job_runtime"] / 1000
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1000,
        "mean_us": side["clat_ns"]["mean"] / 1000,
        "ios": ios,
        "fio_switches_per_io": j["ctx"] / ios,
        # udrv: the driver process; kernel: fio's system CPU share of the run
        "cpu_us_per_io": (used if pid else j["sys_cpu"] / 100 * runtime_s) / ios * 1e6,
    }


def switches(pid: int) -> int:
    """Context switches (voluntary: the thread slept; involuntary: preempted) of every
    thread of ``pid`` so far (proc(5) ``/proc/PID/task/TID/status``)."""
    total = 0
    for p in tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                status = Path(f"/proc/{p}/task/{tid}/status").read_text()
            except FileNotFoundError:  # a thread that just ended
                continue
            total += sum(
                int(n) for n in re.findall(r"^\w*voluntary_ctxt_switches:\s+(\d+)", status, re.M)
            )
    return total


def syscalls(summary: str) -> dict[str, int]:
    """``{syscall: calls}`` from ``strace -c``'s table (columns: % time, seconds,
    usecs/call, calls, [errors,] syscall)."""
    out = {}
    for line in summary.splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1] != "total" and f[-1].isidentifier() and f[3].isdigit():
            out[f[-1]] = int(f[3])
    return out


def breakdown(dev: str, job: str, pid: int | None, runtime: float) -> dict[str, float]:
    """Per I/O of ``job`` on ``dev`` (no ramp: the counts cover exactly fio's I/Os): fio's
    context switches, and the serving process's (``pid``) CPU us, context switches and
    system calls (the last in a second run under ``strace -c -f``)."""
    before = switches(pid) if pid else 0
    m = fio(dev, job, pid, runtime, ramp=0)
    out = {"iops": m["iops"], "fio_switches_per_io": m["fio_switches_per_io"]}
    if not pid:
        return out
    out["cpu_us_per_io"] = m["cpu_us_per_io"]
    out["switches_per_io"] = (switches(pid) - before) / m["ios"]
    if shutil.which("strace"):
        log = Path(f"/tmp/strace-{pid}.txt")
        # Every process of the server (ublk's queue workers are its children): -f follows
        # only the threads and the children started from now on.
        attach = [arg for p in tree(pid) for arg in ("-p", str(p))]
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(log), *attach])
        time.sleep(1)  # attached to every thread
        traced = fio(dev, job, None, runtime, ramp=0)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        calls = syscalls(log.read_text())
        n = traced["ios"]
        out["syscalls_per_io"] = sum(calls.values()) / n
        out.update({f"{name}_per_io": c / n for name, c in calls.items()})
    return out


def serve(args: list[str], profile: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "udrv", *args]
    if profile:
        cmd = [sys.executable, "-m", "bench.block.profile", str(profile), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    if not path:
        raise RuntimeError(f"udrv {' '.join(args)} did not start (exit {proc.wait()})")
    for _ in range(100):
        if os.path.exists(path):
            break
        time.sleep(0.1)
    return proc, path


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def nbdkit(args: list[str], sock: Path, dev: str) -> subprocess.Popen[bytes]:
    """``nbdkit ARGS`` on ``sock``, attached to ``dev`` by nbd-client (the kernel's client)."""
    sock.unlink(missing_ok=True)
    pidfile = sock.with_suffix(".pid")  # nbdkit writes it once it accepts connections
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "-P", str(pidfile), *args])
    for _ in range(400):
        if pidfile.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    sh(f"nbd-client -unix {sock} {dev} -N '' -b 512 -nonetlink")
    return proc


def nbdkit_stop(proc: subprocess.Popen[bytes], dev: str) -> None:
    sh(f"nbd-client -d {dev}")
    proc.terminate()
    proc.wait(60)
    for _ in range(200):  # the device is free again when its pid file is gone
        if not Path(f"/sys/block/{Path(dev).name}/pid").exists():
            break
        time.sleep(0.05)


class Paths:
    """Opens each path of the schedule: binds QEMU's nvme to the kernel's driver or to
    vfio-pci, loads null_blk, starts udrv's servers and nbdkit.

    Args:
        addr: the nvme device's PCI address.
        results: the results directory (the yappi profile goes there).
    """

    def __init__(self, addr: str, results: Path) -> None:
        self.addr, self.results = addr, results
        self.null_blk = False
        self.sock, self.nbd_dev = Path("/tmp/nbdkit.sock"), "/dev/nbd7"  # udrv takes nbd0 on

    @contextmanager
    def open(self, path: str) -> Iterator[tuple[str, int | None]]:
        """``path`` set up for fio: yields its block device and the serving process's pid
        (None for the kernel's drivers: their CPU time is fio's system time)."""
        if path == "kernel nvme":
            yield self._kernel_nvme(), None
        elif path == "kernel null_blk":
            if not self.null_blk:  # memory-backed, like the RAM disk; a queue per CPU as 2q
                sh("modprobe null_blk nr_devices=1 gb=1 memory_backed=1 queue_mode=2 irqmode=0 "
                   "submit_queues=2")  # fmt: skip
                self.null_blk = True
            yield "/dev/nullb0", None
        elif path.startswith("nbdkit"):
            plugin = (
                ["python", str(RAM_PLUGIN), "size=64M"] if "python" in path else ["memory", "64M"]
            )
            kit = nbdkit(plugin, self.sock, self.nbd_dev)
            try:
                yield self.nbd_dev, kit.pid
            finally:
                nbdkit_stop(kit, self.nbd_dev)
        else:
            with self._udrv(path) as served:
                yield served

    def _kernel_nvme(self) -> str:
        sh("modprobe nvme")  # here, not before: loaded, it takes the device if it is free
        bind(self.addr, "nvme")
        ctrl = os.listdir(f"/sys/bus/pci/devices/{self.addr}/nvme")[0]
        for _ in range(100):
            if os.path.exists(f"/dev/{ctrl}n1"):
                break
            time.sleep(0.1)
        return f"/dev/{ctrl}n1"

    @contextmanager
    def _udrv(self, path: str) -> Iterator[tuple[str, int | None]]:
        """``udrv nvme|ram|plugin / ublk|nbd [2q]`` (and PROFILE_PATH) served by udrv."""
        what, front = path.split(" (")[0].split(" / ")
        front, _, two = front.partition(" ")
        args = ["--frontend", front, "--depth", "32", "--queues", "2" if two == "2q" else "1"]
        if what == "udrv nvme":
            bind(self.addr, "vfio-pci")  # from the kernel's nvme, in each repetition
            args = ["nvme", "serve", self.addr, *args]
        elif what == "udrv ram":
            args = ["ramdisk", "serve", "64M", *args]
        elif what == "udrv plugin":
            args = ["plugin", "serve", str(RAM_PLUGIN), "size=64M", *args]
        else:
            raise ValueError(f"bench.block: no way to open the path {path!r}")
        profile = self.results / "block-profile.json" if path == PROFILE_PATH else None
        proc, dev = serve(args, profile)
        try:
            yield dev, proc.pid
        finally:
            stop(proc)


def main() -> int:
    cfg = settings()
    steps = schedule(cfg.only, cfg.reps)
    results = Path(os.environ["UDRV_LAB_RESULTS"])
    addr = dict(x.split("=", 1) for x in os.environ["UDRV_LAB_DEVICES"].split(","))["nvme"]
    reps: list[dict[str, dict[str, dict[str, float]]]] = [{} for _ in range(cfg.reps)]
    qd1: dict[str, dict[str, float]] = {}  # path: the QD1 read job's per-I/O breakdown
    if any(s.kind == "profile" for s in steps) and importlib.util.find_spec("yappi") is None:
        print("no profile: yappi is missing (pip install -e '.[bench]')", flush=True)
        steps = [s for s in steps if s.kind != "profile"]
    sh("modprobe ublk_drv && modprobe nbd nbds_max=8")
    paths = Paths(addr, results)
    t0 = time.monotonic()
    for rep, path, session in sessions(steps):
        print(f"[{time.monotonic() - t0:4.0f} s] rep {rep + 1}/{cfg.reps}: {path}", flush=True)
        with paths.open(path) as (dev, pid):
            for step in session:
                if step.kind == "fio":
                    m = fio(dev, step.job, pid, cfg.runtime)
                    reps[rep].setdefault(path, {})[step.job] = m
                    print(
                        f"  {step.job}: {m['iops']:.0f} IOPS, mean {m['mean_us']:.0f} us, "
                        f"p99 {m['p99_us']:.0f} us, CPU {m['cpu_us_per_io']:.0f} us/IO",
                        flush=True,
                    )
                elif step.kind == "breakdown":
                    qd1[path] = breakdown(dev, step.job, pid, cfg.runtime)
                    per_io = ", ".join(f"{k} {v:.2f}" for k, v in qd1[path].items())
                    print(f"  {step.job}, per I/O: {per_io}", flush=True)
                else:  # the profile: the server writes it when it stops
                    fio(dev, step.job, None, cfg.runtime)
        # After every session, so that a run that fails later still leaves what it measured.
        (results / "block.json").write_text(json.dumps({"reps": reps, "qd1": qd1}, indent=1))
    print(f"[{time.monotonic() - t0:4.0f} s] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
