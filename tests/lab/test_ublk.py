"""ublk and NBD frontends with RAM-backed drivers, in process, on the lab's 6.12 kernel."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from udrv.block.queue import HardwareQueue, Op
from udrv.block.ram import RamDisk
from udrv.frontends.nbd import NbdDevice
from udrv.frontends.ublk import Control, Ublk, UblkError, recoverable

pytestmark = pytest.mark.lab(cpus=2)
SIZE = 32 << 20


@pytest.fixture(autouse=True)
def modules() -> None:
    subprocess.run(["modprobe", "ublk_drv"], check=True)
    subprocess.run(["modprobe", "nbd", "nbds_max=4"], check=True)


def sh(cmd: str, timeout: float = 180) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def fio_verify(dev: str, size: str = "8M", extra: str = "") -> dict:  # type: ignore[type-arg]
    out = sh(f"fio --name=v --filename={dev} --direct=1 --ioengine=libaio --rw=randwrite "
             f"--bs=4k --size={size} --iodepth=16 --verify=crc32c --verify_fatal=1 "
             f"--output-format=json {extra}")  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    return job  # type: ignore[no-any-return]


class CountingRam(RamDisk):
    """A RAM disk that counts calls and can be told to fail reads of one block."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls = 0
        self.bad_offset = -1

    def read(self, offset: int, buf: memoryview) -> None:
        self.calls += 1
        if offset <= self.bad_offset < offset + len(buf):
            raise OSError(errno.EIO, "injected media error")
        super().read(offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        self.calls += 1
        super().write(offset, data)


class AsyncRam(RamDisk):
    """The same disk behind ``async def`` methods; records how many requests overlap."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.inflight = self.max_inflight = 0

    async def _track(self) -> None:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        await asyncio.sleep(0.001)  # a device's latency: others run meanwhile
        self.inflight -= 1

    async def read(self, offset: int, buf: memoryview) -> None:  # type: ignore[override]
        await self._track()
        RamDisk.read(self, offset, buf)

    async def write(self, offset: int, data: memoryview) -> None:  # type: ignore[override]
        await self._track()
        RamDisk.write(self, offset, data)


class RamQueue(HardwareQueue):
    """A hardware queue over a RAM disk that completes requests later: at ``commit`` they
    become done and, with ``interrupt``, an eventfd says so (as a device's MSI-X would)."""

    def __init__(self, disk: QueuedRam, tags: int, interrupt: bool) -> None:
        self.disk, self.tags, self.buffer_size = disk, tags, disk.geometry.max_transfer
        self.mem = mmap.mmap(-1, tags * self.buffer_size)
        self.view = memoryview(self.mem)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if interrupt else -1
        self.queued: list[tuple[int, int]] = []
        self.done: list[tuple[int, int]] = []
        self.out = self.max_out = self.started = 0
        self.closed = False

    def address(self, tag: int) -> int:
        return self.base + tag * self.buffer_size

    def buffer(self, tag: int) -> memoryview:
        return self.view[tag * self.buffer_size : (tag + 1) * self.buffer_size]

    def queue_rq(self, tag: int, op: Op, offset: int, length: int) -> int | None:
        d = self.disk
        if op == Op.READ:
            self.buffer(tag)[:length] = d._view[offset : offset + length]
        elif op == Op.WRITE:
            d._view[offset : offset + length] = self.buffer(tag)[:length]
        elif op in (Op.DISCARD, Op.WRITE_ZEROES):
            d._view[offset : offset + length] = bytes(length)
        bad = offset <= d.bad_offset < offset + length
        self.queued.append((tag, -errno.EIO if bad else length))
        self.started += 1
        self.out += 1
        self.max_out = max(self.max_out, self.out)
        return None

    def commit(self) -> None:
        if self.queued:
            self.done += self.queued
            self.queued = []
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def complete(self) -> list[tuple[int, int]]:
        done, self.done = self.done, []
        self.out -= len(done)
        return done

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True
        self.view.release()
        self.mem.close()
        if self.fd >= 0:
            os.close(self.fd)


class QueuedRam(RamDisk):
    """A RAM disk that the ublk frontend must serve through hardware queues."""

    def __init__(self, size: int, interrupt: bool) -> None:
        super().__init__(size)
        self.interrupt, self.bad_offset = interrupt, -1
        self.queues: list[RamQueue] = []

    def hardware_queue(self, index: int, tags: int) -> RamQueue:
        q = RamQueue(self, tags, self.interrupt)
        self.queues.append(q)
        return q

    def read(self, offset: int, buf: memoryview) -> None:
        raise AssertionError("read() called: the frontend ignored the hardware queues")

    write = read  # type: ignore[assignment]


@pytest.fixture
def ram() -> Iterator[CountingRam]:
    d = CountingRam(SIZE)
    yield d
    d.close()


def test_two_queues_fio_verify_discard_and_teardown(ram: CountingRam) -> None:
    with Ublk(ram, queues=2, depth=16) as u:
        name = os.path.basename(u.path)
        assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == SIZE
        assert sorted(os.listdir(f"/sys/block/{name}/mq")) == ["0", "1"]
        assert int(Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text()) > 0
        job = fio_verify(u.path, extra="--numjobs=2 --offset_increment=12M --group_reporting")
        assert job["read"]["total_ios"] == 2 * 2048
        sh(f"dd if=/dev/urandom of={u.path} bs=64k count=16 oflag=direct")
        sh(f"blkdiscard -o 0 -l 1M {u.path}")
        assert ram._view[: 1 << 20] == bytes(1 << 20)  # the driver saw the discard
        served = u.served
        assert served >= 4 * 2048
        path = u.path
    assert not os.path.exists(path) and not os.path.exists(path.replace("ublkb", "ublkc"))


def test_async_driver_keeps_many_requests_in_flight() -> None:
    d = AsyncRam(SIZE)
    with Ublk(d, queues=1, depth=8) as u:
        name = os.path.basename(u.path)
        assert Path(f"/sys/block/{name}/queue/nr_requests").read_text().strip() == "8"
        with Control() as ctl:  # one tag more than depth: a FETCH is always outstanding
            assert ctl.dev_info(u.dev_id).queue_depth == 9
        fio_verify(u.path, size="4M")
    # iodepth 16: not one at a time, and never the reserved tag
    assert 4 <= d.max_inflight <= 8, d.max_inflight


@pytest.mark.parametrize("interrupt", [True, False], ids=["eventfd", "polled"])
def test_hardware_queues_fio_verify_and_errors(interrupt: bool) -> None:
    d = QueuedRam(SIZE, interrupt)
    d.bad_offset = 1 << 20
    with Ublk(d, queues=2, depth=8) as u:
        fio_verify(u.path, size="4M", extra="--offset=2M")
        r = subprocess.run(["dd", f"if={u.path}", "of=/dev/null", "bs=4k", "skip=256", "count=1",
                            "iflag=direct"], capture_output=True, text=True)  # fmt: skip
        assert r.returncode != 0 and "Input/output error" in r.stderr
        d.bad_offset = -1  # blkdiscard probes the disk first
        sh(f"dd if=/dev/urandom of={u.path} bs=64k count=16 oflag=direct")
        sh(f"blkdiscard -o 0 -l 1M {u.path}")
        assert d._view[: 1 << 20] == bytes(1 << 20)  # the queue saw the discard
    assert len(d.queues) == 2 and all(q.closed for q in d.queues)
    assert sum(q.started for q in d.queues) >= 2 * 1024
    assert max(q.max_out for q in d.queues) <= 8  # never the spare tag
    d.close()


def test_driver_errors_reach_the_application_and_the_disk_lives_on(ram: CountingRam) -> None:
    ram.bad_offset = 1 << 20
    with Ublk(ram) as u:
        r = subprocess.run(["dd", f"if={u.path}", "of=/dev/null", "bs=4k", "skip=256", "count=1",
                            "iflag=direct"], capture_output=True, text=True)  # fmt: skip
        assert r.returncode != 0 and "Input/output error" in r.stderr
        sh(f"dd if={u.path} of=/dev/null bs=4k count=16 iflag=direct")  # still served
        # Past the end: the block layer refuses before the driver.
        calls = ram.calls
        r = subprocess.run(["dd", "if=/dev/zero", f"of={u.path}", "bs=4k", f"seek={SIZE // 4096}",
                            "count=1", "oflag=direct"], capture_output=True, text=True)  # fmt: skip
        assert r.returncode != 0 and ram.calls == calls


def test_bad_inputs(ram: CountingRam) -> None:
    with Ublk(ram) as u:
        with pytest.raises(UblkError, match=f"/dev/ublkb{u.dev_id} exists already"):
            Ublk(ram, dev_id=u.dev_id).start()
        with pytest.raises(UblkError, match=rf"is live, served by pid {os.getpid()}"):
            Ublk(ram, dev_id=u.dev_id, recover=True).start()
        assert not recoverable(u.dev_id)
    with pytest.raises(UblkError, match="no ublk device 99 to recover"):
        Ublk(ram, dev_id=99, recover=True).start()
    with pytest.raises(UblkError, match="depth=5000"):
        Ublk(ram, depth=5000)


def test_nbd_device_two_connections_and_clean_stop(ram: CountingRam) -> None:
    nbd = NbdDevice(ram, connections=2)
    with nbd:
        name = os.path.basename(nbd.path)
        assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == SIZE
        fio_verify(nbd.path, size="4M")
        sh(f"mkfs.ext4 -q -F {nbd.path}")
    assert int(Path(f"/sys/block/{name}/size").read_text()) == 0
    calls = ram.calls
    r = subprocess.run(["dd", f"if={nbd.path}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                       capture_output=True, text=True)  # fmt: skip
    assert "0+0 records in" in r.stderr and ram.calls == calls  # an empty disk, driver untouched


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (proc(5) ``/proc/PID/task/TID/children``)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def test_a_process_per_queue_fio_verify_over_both_queues(ram: CountingRam) -> None:
    """workers="processes": each queue is served by a forked worker of its own (the parent
    only waits); the RAM disk's MAP_SHARED data is one disk for both; stop() ends them."""
    with Ublk(ram, queues=2, depth=16, workers="processes") as u:
        assert u.mode == "processes"
        pids = [q.pid for q in u._queues]
        assert sorted(children(os.getpid())) == sorted(pids) and os.getpid() not in pids
        for q, pid in enumerate(pids):  # each on its queue's CPUs
            cpus = Path(f"/sys/block/{os.path.basename(u.path)}/mq/{q}/cpu_list").read_text()
            assert os.sched_getaffinity(pid) == {int(c) for c in cpus.replace(",", " ").split()}
        assert {frozenset(os.sched_getaffinity(pid)) for pid in pids} == {
            frozenset({0}),
            frozenset({1}),
        }  # two CPUs, two queues: one each
        job = fio_verify(u.path, extra="--numjobs=2 --offset_increment=12M --group_reporting")
        assert job["read"]["total_ios"] == 2 * 2048
        sh(f"blkdiscard -o 0 -l 1M {u.path}")
        assert ram._view[: 1 << 20] == bytes(1 << 20)  # a worker's discard, seen here
        per_queue = list(u._counts)
        assert all(n > 0 for n in per_queue) and sum(per_queue) >= 4 * 2048, per_queue
        assert ram.calls == 0  # every request was served in a worker, not this process
        path = u.path
    assert not os.path.exists(path) and not os.path.exists(path.replace("ublkb", "ublkc"))
    assert not children(os.getpid())  # reaped


def test_ramdisk_serve_two_queues_sigint_stops_every_worker() -> None:
    """`udrv ramdisk serve --queues 2`: processes by default; SIGINT (which a terminal sends
    to the whole process group, workers included) stops the device and every worker."""
    proc = subprocess.Popen([sys.executable, "-m", "udrv", "ramdisk", "serve", "32M", "--queues",
                             "2", "--depth", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    try:
        assert path.startswith("/dev/ublkb"), proc.communicate(timeout=30)[1]
        workers = children(proc.pid)
        assert len(workers) == 2
        fio_verify(path, extra="--numjobs=2 --offset_increment=12M --group_reporting")
        # One process group: a terminal's ^C reaches the server and both workers, as here.
        assert {os.getpgid(pid) for pid in workers} == {os.getpgid(proc.pid)}
        for pid in [proc.pid, *workers]:
            os.kill(pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "udrv: stopped (signal)" in err, err
    assert not os.path.exists(path) and not os.path.exists(path.replace("ublkb", "ublkc"))
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the server"
