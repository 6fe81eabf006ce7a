"""The lab side of bench.block (runs in the guest): the same fio jobs through every path.

(a) the kernel's nvme driver on QEMU's nvme; (b) udrv's NVMe driver over ublk and (c) over
NBD, on the same device; (d) the kernel's null_blk (memory-backed) and udrv's RAM disk over
ublk. For udrv, the driver process's CPU time (utime + stime from /proc/PID/stat) per I/O;
for the kernel paths, fio's system time per I/O (where the kernel driver's work is billed).
Then (e) the same nbdkit Python plugin (examples/plugins/ram.py, 64 MiB) under
``nbdkit python`` + the kernel's NBD client (nbd-client), and under ``udrv plugin serve``
over ublk and over NBD; and nbdkit's C ``memory`` plugin + nbd-client beside udrv's RAM disk.
Finally udrv NVMe over ublk runs the 4k QD32 read job under yappi for a profile.

``UDRV_BENCH_ONLY=nbdkit`` runs only (e) (with udrv's RAM disk beside nbdkit's memory).

Several queues: the job ``4k randread QD32 x2`` (two fio jobs of QD32; blk-mq sends each
job's CPU to its queue) through the kernel's nvme and null_blk (``submit_queues=2``), and
through udrv's NVMe and RAM disk over ublk with one queue and with two (``--queues 2``: a
worker process per queue; their CPU time is counted with the server's).
``UDRV_BENCH_ONLY=queues`` runs only these.

For the QD1 read job on each udrv ublk path, a per-I/O breakdown that host load does not
change: the driver process's system calls (``strace -c -f``, in a run of its own since strace
slows it) and its context switches (``/proc/PID/task/*/status``), next to its CPU time.
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
from pathlib import Path

from bench import sh
from udrv.lab.pytest_plugin import bind

JOBS = {  # name: fio arguments
    "4k randread QD1": "--rw=randread --bs=4k --iodepth=1",
    "4k randread QD32": "--rw=randread --bs=4k --iodepth=32",
    "4k randwrite QD1": "--rw=randwrite --bs=4k --iodepth=1",
    "4k randwrite QD32": "--rw=randwrite --bs=4k --iodepth=32",
    "128k seqread QD8": "--rw=read --bs=128k --iodepth=8",
}
NULL_JOBS = ("4k randread QD1", "4k randread QD32", "4k randwrite QD32")
#: Two fio jobs of QD32 each (blk-mq maps each job's CPU to a queue): for 1 -> 2 queues.
QUEUES_JOB = "4k randread QD32 x2"
JOBS[QUEUES_JOB] = "--rw=randread --bs=4k --iodepth=32 --numjobs=2 --group_reporting"
RUNTIME = float(os.environ.get("UDRV_BENCH_RUNTIME", "5"))
TICK = os.sysconf("SC_CLK_TCK")
ONLY = set(filter(None, os.environ.get("UDRV_BENCH_ONLY", "nvme,ram,nbdkit,queues").split(",")))
RAM_PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "ram.py"
NBDKIT_JOBS = ("4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32")


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


def fio(dev: str, job: str, pid: int | None, ramp: float = 1.0) -> dict[str, float]:
    before = cpu_seconds(pid) if pid else 0.0
    out = sh(f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio --time_based "
             f"--runtime={RUNTIME:g} --ramp_time={ramp:g} --size=48M --output-format=json "
             f"{JOBS[job]}",
             timeout=RUNTIME * 10 + 60)  # fmt: skip
    # The driver's CPU time spans fio's ramp too, its I/O count does not: take the measured
    # part's share (the rate is steady by then).
    used = (cpu_seconds(pid) - before) * RUNTIME / (RUNTIME + ramp) if pid else 0.0
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


def breakdown(dev: str, job: str, pid: int | None) -> dict[str, float]:
    """Per I/O of ``job`` on ``dev`` (no ramp: the counts cover exactly fio's I/Os): fio's
    context switches, and the serving process's (``pid``) CPU us, context switches and
    system calls (the last in a second run under ``strace -c -f``)."""
    before = switches(pid) if pid else 0
    m = fio(dev, job, pid, ramp=0)
    out = {"iops": m["iops"], "fio_switches_per_io": m["fio_switches_per_io"]}
    if not pid:
        return out
    out["cpu_us_per_io"] = m["cpu_us_per_io"]
    out["switches_per_io"] = (switches(pid) - before) / m["ios"]
    if shutil.which("strace"):
        log = Path(f"/tmp/strace-{pid}.txt")
        tracer = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(log), "-p", str(pid)])
        time.sleep(1)  # attached to every thread
        traced = fio(dev, job, None, ramp=0)
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


def main() -> int:
    results = Path(os.environ["UDRV_LAB_RESULTS"])
    addr = dict(x.split("=", 1) for x in os.environ["UDRV_LAB_DEVICES"].split(","))["nvme"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    qd1: dict[str, dict[str, float]] = {}  # path: the QD1 read job's per-I/O breakdown

    def per_io(path_name: str, dev: str, pid: int | None) -> None:
        qd1[path_name] = breakdown(dev, "4k randread QD1", pid)
        print(path_name, "QD1 per I/O", qd1[path_name], flush=True)

    def run(path_name: str, dev: str, jobs: tuple[str, ...], pid: int | None) -> None:
        out[path_name] = {}
        for job in jobs:
            out[path_name][job] = fio(dev, job, pid)
            print(path_name, job, out[path_name][job], flush=True)

    if "nbdkit" in ONLY:  # (e) first: it needs no device binding
        sh("modprobe ublk_drv && modprobe nbd nbds_max=8")
        sock, nbd_dev = Path("/tmp/nbdkit.sock"), "/dev/nbd7"  # udrv takes the first free one
        kit = nbdkit(["python", str(RAM_PLUGIN), "size=64M"], sock, nbd_dev)
        try:
            run("nbdkit python / nbd-client", nbd_dev, NBDKIT_JOBS, kit.pid)
        finally:
            nbdkit_stop(kit, nbd_dev)
        for front in ("ublk", "nbd"):
            proc, dev = serve(["plugin", "serve", str(RAM_PLUGIN), "size=64M", "--frontend",
                               front, "--depth", "32"])  # fmt: skip
            try:
                run(f"udrv plugin / {front}", dev, NBDKIT_JOBS, proc.pid)
            finally:
                stop(proc)
        kit = nbdkit(["memory", "64M"], sock, nbd_dev)
        try:
            run("nbdkit memory (C) / nbd-client", nbd_dev, NULL_JOBS, kit.pid)
        finally:
            nbdkit_stop(kit, nbd_dev)
        if "ram" not in ONLY:
            proc, dev = serve(["ramdisk", "serve", "64M", "--depth", "32"])
            try:
                run("udrv ram / ublk", dev, NULL_JOBS, proc.pid)
            finally:
                stop(proc)
    if not ONLY & {"nvme", "ram", "queues"}:
        (results / "block.json").write_text(json.dumps(out, indent=1))
        return 0
    base = tuple(j for j in JOBS if j != QUEUES_JOB)
    two = (QUEUES_JOB,) if "queues" in ONLY else ()
    nvme_jobs = (base if "nvme" in ONLY else ()) + two
    # (a) the kernel's nvme driver (one queue per CPU: two here)
    sh("modprobe nvme")
    bind(addr, "nvme")
    ctrl = os.listdir(f"/sys/bus/pci/devices/{addr}/nvme")[0]
    for _ in range(100):
        if os.path.exists(f"/dev/{ctrl}n1"):
            break
        time.sleep(0.1)
    run("kernel nvme", f"/dev/{ctrl}n1", nvme_jobs, None)
    if "nvme" in ONLY:
        per_io("kernel nvme", f"/dev/{ctrl}n1", None)
    bind(addr, None)
    bind(addr, "vfio-pci")
    # (b), (c): udrv NVMe over ublk (one queue, then two: a worker process each), then NBD
    sh("modprobe ublk_drv && modprobe nbd")
    variants = [("ublk", ["--queues", "1"], nvme_jobs)]
    if two:
        variants.append(("ublk 2q", ["--queues", "2"], two))
    if "nvme" in ONLY:
        variants.append(("nbd", [], base))
    for name, extra, jobs in variants:
        front = name.split()[0]
        proc, dev = serve(["nvme", "serve", addr, "--frontend", front, "--depth", "32", *extra])
        try:
            run(f"udrv nvme / {name}", dev, jobs, proc.pid)
            if name == "ublk" and "nvme" in ONLY:
                per_io("udrv nvme / ublk", dev, proc.pid)
        finally:
            stop(proc)
    # (d) null_blk (memory-backed, like the RAM disk; a queue per CPU as udrv's 2q) vs udrv's
    # RAM disk over ublk
    null_jobs = (NULL_JOBS if "ram" in ONLY else ()) + two
    sh("modprobe null_blk nr_devices=1 gb=1 memory_backed=1 queue_mode=2 irqmode=0 "
       "submit_queues=2")  # fmt: skip
    run("kernel null_blk", "/dev/nullb0", null_jobs, None)
    if "ram" in ONLY:
        per_io("kernel null_blk", "/dev/nullb0", None)
    for name, queues, jobs in [("ublk", "1", null_jobs), ("ublk 2q", "2", two)]:
        if not jobs:
            continue
        proc, dev = serve(["ramdisk", "serve", "64M", "--depth", "32", "--queues", queues])
        try:
            run(f"udrv ram / {name}", dev, jobs, proc.pid)
            if name == "ublk" and "ram" in ONLY:
                per_io("udrv ram / ublk", dev, proc.pid)
        finally:
            stop(proc)
    (results / "block-qd1.json").write_text(json.dumps(qd1, indent=1))
    (results / "block.json").write_text(json.dumps(out, indent=1))
    if "nvme" not in ONLY:
        return 0
    # where the Python time goes: udrv NVMe over ublk, 4k random reads at QD32
    if importlib.util.find_spec("yappi") is None:
        print("no profile: yappi is missing (pip install -e '.[bench]')", flush=True)
        return 0
    prof = results / "block-profile.json"
    proc, dev = serve(["nvme", "serve", addr, "--frontend", "ublk", "--depth", "32"], prof)
    try:
        fio(dev, "4k randread QD32", None)
    finally:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
