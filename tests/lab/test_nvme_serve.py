"""`udrv nvme serve`: the Python NVMe driver as /dev/ublkbN and /dev/nbdN for unchanged tools.

The devices of test_nvme.py (an nvme with a known serial, an edu as a wrong device), two CPUs:
the kernel gives ublk one hardware queue per CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from udrv.irq.affinity import find_irq, vfio_irq_name

pytestmark = pytest.mark.lab("nvme:size=32M,serial=udrvtest1", "edu", cpus=2)
Bind = Callable[[str, "str | None"], str]
SIZE = 32 << 20


def sh(cmd: str, timeout: float = 180) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


class Server:
    """`udrv nvme serve ...` in a subprocess; ``path`` is the line it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "udrv", "nvme", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()
        assert self.path, self.proc.communicate(timeout=30)[1]
        deadline = time.monotonic() + 20
        while not (self.path.startswith("nbd") or os.path.exists(self.path)):
            assert time.monotonic() < deadline, f"{self.path} did not appear"
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def nvme(bound: Bind) -> Iterator[str]:
    subprocess.run(["modprobe", "ublk_drv"], check=True)
    subprocess.run(["modprobe", "nbd", "nbds_max=4"], check=True)
    yield bound("nvme", "vfio-pci")
    subprocess.run(["umount", "/mnt"], capture_output=True)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (proc(5) ``/proc/PID/task/TID/children``)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def cpu_set(text: str) -> frozenset[int]:
    """CPUs from a kernel CPU list: ``0-1``, ``0, 1``, ``0,2-3``."""
    out: set[int] = set()
    for part in text.replace(" ", "").strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def fio(dev: str, *args: str, timeout: float = 300) -> dict:  # type: ignore[type-arg]
    out = sh(f"fio --name=v --filename={dev} --direct=1 --ioengine=libaio --output-format=json "
             + " ".join(args), timeout=timeout)  # fmt: skip
    return json.loads(out[out.index("{") :])  # type: ignore[no-any-return]


def files_round_trip(dev: str) -> None:
    """mkfs.ext4, mount, write files, unmount, mount again: the files are intact."""
    sh(f"mkfs.ext4 -q -F {dev}")
    sh(f"mount {dev} /mnt")
    blobs = {f"f{i}": os.urandom(n) for i, n in enumerate((1, 4096, 300_000, 2 << 20))}
    for name, data in blobs.items():
        Path("/mnt", name).write_bytes(data)
    sh("umount /mnt")
    sh(f"mount {dev} /mnt")
    for name, data in blobs.items():
        got = Path("/mnt", name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    sh("umount /mnt")


def write_acknowledged(dev: str) -> bytes:
    """4 MiB of random data at the start of ``dev``, written and flushed (fsync)."""
    data = os.urandom(4 << 20)
    with open(dev, "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())  # acknowledged: FLUSH done
    return data


def busy_fio(dev: str, depth: int) -> subprocess.Popen[str]:
    """fio keeping ``depth`` random 4k reads and writes in flight past the first 8 MiB."""
    return subprocess.Popen(
        ["fio", "--name=busy", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
         "--rw=randrw", "--bs=4k", "--offset=8M", "--size=16M", f"--iodepth={depth}",
         "--time_based", "--runtime=120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_reads(dev: str, job: subprocess.Popen[str], reads: int = 500) -> None:
    """Until ``reads`` reads of ``dev`` completed (/sys/block/NAME/stat), fio still running."""
    stat = Path(f"/sys/block/{os.path.basename(dev)}/stat")
    deadline = time.monotonic() + 120
    while int(stat.read_text().split()[0]) < reads:
        assert job.poll() is None and time.monotonic() < deadline, "fio ended or stalled"
        time.sleep(0.02)


def assert_reads_back(data: bytes, *server_args: str) -> None:
    """A new `udrv nvme serve SERVER_ARGS` reads ``data`` at the start of the disk."""
    again = Server(*server_args)
    try:
        with open(again.path, "rb", buffering=0) as f:
            assert f.read(len(data)) == data
    finally:
        again.stop()


def test_ublk_filesystem_and_fio_verify(nvme: str) -> None:
    srv = Server(nvme, "--queues", "2", "--depth", "16")
    try:
        assert srv.path.startswith("/dev/ublkb")
        name = os.path.basename(srv.path)
        assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == SIZE
        assert Path(f"/sys/block/{name}/queue/logical_block_size").read_text().strip() == "512"
        assert len(os.listdir(f"/sys/block/{name}/mq")) == 2  # two hardware queues
        assert len(children(srv.proc.pid)) == 2  # served by a worker process each
        # Each queue's worker runs on the CPU blk-mq maps to its queue, and so does the
        # kernel's handler of its completion vector (I/O queue q + 1 has MSI-X vector q + 1).
        workers = {frozenset(os.sched_getaffinity(pid)) for pid in children(srv.proc.pid)}
        for q in range(2):
            cpus = cpu_set(Path(f"/sys/block/{name}/mq/{q}/cpu_list").read_text())
            assert cpus in workers, (q, cpus, workers)
            irq = find_irq(vfio_irq_name("msix", q + 1, nvme))
            assert irq is not None, Path("/proc/interrupts").read_text()
            assert cpu_set(Path(f"/proc/irq/{irq}/smp_affinity_list").read_text()) == cpus
        files_round_trip(srv.path)
        r = fio(srv.path, "--rw=randwrite --bs=4k --size=8M --iodepth=16 --numjobs=2",
                "--offset_increment=12M --verify=crc32c --verify_fatal=1 --group_reporting")  # fmt: skip
        assert all(j["error"] == 0 for j in r["jobs"])
        assert r["jobs"][0]["write"]["total_ios"] == 2 * 2048
        assert r["jobs"][0]["read"]["total_ios"] == 2 * 2048  # the verify pass
        # Discard reaches the controller as Dataset Management (the kernel accepts it).
        sh(f"blkdiscard -o 0 -l 1M {srv.path}")
        # Past the end: refused by the kernel before the driver; the disk keeps working.
        r2 = subprocess.run(["dd", "if=/dev/zero", f"of={srv.path}", "bs=4k", f"seek={SIZE // 4096}",
                             "count=1", "oflag=direct"], capture_output=True, text=True)  # fmt: skip
        assert r2.returncode != 0 and "No space left" in r2.stderr
        sh(f"dd if={srv.path} of=/dev/null bs=1M count=4 iflag=direct")
    finally:
        err = srv.stop()
    assert "udrv: stopped" in err
    deadline = time.monotonic() + 10
    while os.path.exists(srv.path):  # DEL_DEV removed the disk
        assert time.monotonic() < deadline, f"{srv.path} stayed after the driver stopped"
        time.sleep(0.1)


def test_polled_queues_fio_verify(nvme: str) -> None:
    """--polled: no MSI-X; the ublk queue thread busy-polls the completion queue while
    commands are out and sleeps in io_uring_enter when none are."""
    srv = Server(nvme, "--polled", "--depth", "8")
    try:
        r = fio(srv.path, "--rw=randwrite --bs=4k --size=4M --iodepth=16",
                "--verify=crc32c --verify_fatal=1")  # fmt: skip
        assert r["jobs"][0]["error"] == 0 and r["jobs"][0]["read"]["total_ios"] == 1024
    finally:
        srv.stop()


def test_stop_under_load_releases_the_disk_and_keeps_acknowledged_data(nvme: str) -> None:
    """SIGINT while fio keeps 16 requests in the NVMe queue: the driver completes or fails
    them, removes the disk and shuts the controller down; fio ends (with errors), and a
    new driver reads back what was written and acknowledged before."""
    srv = Server(nvme, "--depth", "16")
    data = write_acknowledged(srv.path)
    job = busy_fio(srv.path, 16)
    try:
        wait_for_reads(srv.path, job)
    finally:
        err = srv.stop()
    assert "udrv: stopped" in err
    job.communicate(timeout=60)  # the disk went away under it: fio ends, it does not hang
    assert not os.path.exists(srv.path)
    assert_reads_back(data, nvme, "--depth", "16")


def test_killed_driver_recovers_and_fio_verify_passes(nvme: str) -> None:
    """SIGKILL in the middle of an fio verify job; a new driver resumes the same disk with
    --recover; the kernel re-issues what was in flight and verification passes. fio's
    iodepth is the driver's depth: every request can be in the driver's hands at the kill."""
    srv = Server(nvme, "--queues", "1", "--depth", "16")
    dev_id = int(srv.path.removeprefix("/dev/ublkb"))
    job = subprocess.Popen(
        ["fio", "--name=k", f"--filename={srv.path}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c",
         "--verify_fatal=1", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stat = Path(f"/sys/block/{os.path.basename(srv.path)}/stat")
    deadline = time.monotonic() + 120
    try:  # kill a quarter into the write phase, however fast the driver is
        while int(stat.read_text().split()[4]) < 1024:  # writes completed
            assert job.poll() is None and time.monotonic() < deadline, "fio ended or stalled"
            time.sleep(0.02)
    finally:
        srv.kill()
    assert os.path.exists(srv.path)  # the disk stays, quiesced, its I/O held
    time.sleep(0.5)
    again = Server(nvme, "--recover", str(dev_id), "--queues", "1", "--depth", "16")
    try:
        assert again.path == srv.path
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err
        r = json.loads(out[out.index("{") :])["jobs"][0]
        assert r["error"] == 0 and r["read"]["total_ios"] == 4096  # every block verified
    finally:
        again.stop()


@pytest.mark.slow  # make soak: `make test` stays under 30 minutes
@pytest.mark.parametrize("victim", ["worker", "server"])
def test_two_queues_killed_worker_or_server_recovers_and_fio_verify_passes(
    nvme: str, victim: str
) -> None:
    """Two queues, a worker process each; fio writes through both. SIGKILL one worker (the
    server then kills the other and exits, leaving the disk quiesced) or the server (its
    workers die with it: PR_SET_PDEATHSIG); --recover resumes the disk with two new
    workers, the kernel re-issues what was held, and every block verifies."""
    srv = Server(nvme, "--queues", "2", "--depth", "16")
    dev_id = int(srv.path.removeprefix("/dev/ublkb"))
    workers = children(srv.proc.pid)
    assert len(workers) == 2
    job = subprocess.Popen(
        ["fio", "--name=k", f"--filename={srv.path}", "--direct=1", "--ioengine=libaio",
         "--rw=randwrite", "--bs=4k", "--size=8M", "--offset_increment=16M", "--numjobs=2",
         "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--group_reporting",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stat = Path(f"/sys/block/{os.path.basename(srv.path)}/stat")
    deadline = time.monotonic() + 120
    try:  # kill a quarter into the write phase
        while int(stat.read_text().split()[4]) < 1024:  # writes completed
            assert job.poll() is None and time.monotonic() < deadline, "fio ended or stalled"
            time.sleep(0.02)
    finally:
        os.kill(workers[1] if victim == "worker" else srv.proc.pid, signal.SIGKILL)
    _, err = srv.proc.communicate(timeout=60)
    if victim == "worker":
        assert srv.proc.returncode == 1, err
        assert "was killed by SIGKILL" in err and f"--recover {dev_id}" in err, err
        assert "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its server"
        time.sleep(0.05)
    assert os.path.exists(srv.path)  # the disk stays, quiesced, its I/O held
    again = Server(nvme, "--recover", str(dev_id), "--queues", "2", "--depth", "16")
    try:
        assert again.path == srv.path and len(children(again.proc.pid)) == 2
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err
        r = json.loads(out[out.index("{") :])["jobs"][0]
        assert r["error"] == 0 and r["read"]["total_ios"] == 2 * 2048  # every block verified
    finally:
        again.stop()


def test_nbd_device_filesystem_and_fio_verify(nvme: str) -> None:
    srv = Server(nvme, "--frontend", "nbd", "--queues", "2", "--depth", "16")
    try:
        assert srv.path.startswith("/dev/nbd")
        name = os.path.basename(srv.path)
        assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == SIZE
        files_round_trip(srv.path)
        r = fio(srv.path, "--rw=randwrite --bs=4k --size=4M --iodepth=16",
                "--verify=crc32c --verify_fatal=1")  # fmt: skip
        assert r["jobs"][0]["error"] == 0 and r["jobs"][0]["read"]["total_ios"] == 1024
        sh(f"blkdiscard -o 0 -l 1M {srv.path}")
    finally:
        srv.stop()
    assert int(Path(f"/sys/block/{name}/size").read_text()) == 0  # disconnected


def test_nbd_socket_for_nbdinfo_and_nbdcopy(nvme: str, tmp_path: Path) -> None:
    sock = tmp_path / "nvme.sock"
    srv = Server(nvme, "--frontend", "nbd", "--listen", str(sock))
    try:
        uri = srv.path
        assert uri.startswith("nbd+unix://") and str(sock) in uri
        info = json.loads(sh(f"nbdinfo --json '{uri}'"))
        assert info["exports"][0]["export-size"] == SIZE
        data = tmp_path / "in.img"
        data.write_bytes(os.urandom(4 << 20) + bytes(SIZE - (4 << 20)))
        sh(f"nbdcopy {data} '{uri}'")
        sh(f"nbdcopy '{uri}' {tmp_path / 'out.img'}")
        assert (tmp_path / "out.img").read_bytes() == data.read_bytes()
    finally:
        srv.stop()


def test_bad_inputs(nvme: str, lab_devices: dict[str, str], bound: Bind) -> None:
    def fails(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "udrv", "nvme", "serve", *args],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        return r.stderr

    err = fails(nvme, "--depth", "5000")
    assert "--depth 5000 needs NVMe queues of 5002 entries" in err
    assert "is outside 2..2048 (CAP.MQES" in err
    assert "is outside 2..2048 (CAP.MQES" in fails(nvme, "--frontend", "nbd", "--depth", "5000")
    assert "no namespace 7; active: [1]" in fails(nvme, "--nsid", "7")
    assert "--recover is for --frontend ublk" in fails(nvme, "--frontend", "nbd", "--recover", "0")
    edu = bound("edu", "vfio-pci")
    assert "not an NVMe controller" in fails(edu)
