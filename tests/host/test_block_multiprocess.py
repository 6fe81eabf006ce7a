"""What ublk's process-per-queue mode relies on, without a kernel: memory that a forked
worker and its parent (and the device) all see, an NVMe admin queue that only its owner
drives, and the choice between threads and processes."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.host.nvme_fake import Model
from tests.host.test_dma_vfio import FakeContainer, FakeVfioDevice
from tests.host.test_nvme_hwqueue import hold_tag0_reads, make, run
from udrv.block.driver import BlockDriver, BlockGeometry
from udrv.block.queue import Op
from udrv.block.ram import RamDisk
from udrv.drivers.nvme import command as C
from udrv.frontends import ublk
from udrv.frontends.ublk import Ublk, UblkError


def in_child(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a forked process; return what it returned (JSON) or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = {"ok": work()}
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = json.loads(f.read() or b'{"error": "the child died"}')
    os.waitpid(pid, 0)
    if "error" in data:
        raise AssertionError(data["error"])
    return data["ok"]


def test_dma_buffer_written_by_a_forked_worker_is_what_the_device_reads() -> None:
    """A MAP_PRIVATE buffer would be the child's own copy after fork: the device (the
    parent's pinned pages) would read stale data, and the child would not see DMA writes."""
    iommu = FakeContainer()
    buf = FakeVfioDevice(iommu).dma.alloc(8192)
    iommu.dma_write(buf.iova + 4096, b"from the device")

    def worker() -> str:
        buf.array[:11] = memoryview(b"from worker")
        return bytes(buf.array[4096 : 4096 + 15]).decode()

    assert in_child(worker) == "from the device"
    assert iommu.dma_read(buf.iova, 11) == b"from worker"
    buf.close()


def test_ram_disk_is_shared_with_forked_workers_and_discard_zeroes() -> None:
    disk = RamDisk(1 << 20)
    assert disk.multiprocess

    def worker() -> None:
        disk.write(8192, memoryview(b"w" * 8192))

    in_child(worker)
    out = bytearray(12288)
    disk.read(4096, memoryview(out))
    assert out == bytes(4096) + b"w" * 8192
    disk.discard(4096 + 512, 3 * 4096)  # partial pages at both ends, whole ones freed
    disk.read(4096, memoryview(out))
    assert out == bytes(12288)
    disk.read(16384, memoryview(out[:512]))
    disk.close()


def test_a_forked_queue_worker_never_sends_admin_commands() -> None:
    """The admin queue's state is the parent's: a worker's timed-out command gets no Abort
    (it would corrupt the admin queue); a timeout later the worker disables the controller
    and fails the tag, as when an Abort fails."""
    hq, ctrl = make(Model(policy=hold_tag0_reads), timeout=2)

    def worker() -> dict[str, Any]:
        run(hq, 0, Op.READ, 0, 4096)
        first = [hq.expire() for _ in range(5)]  # over the timeout at tick 3
        aborts = [e for q, e in ctrl.commands if q == 0 and int(e["opcode"]) == C.ADMIN_ABORT]
        last = hq.expire()  # still out a timeout after the (refused) Abort
        return {"first": first, "aborts": len(aborts), "last": last,
                "disables": ctrl.disables}  # fmt: skip

    got = in_child(worker)
    assert got == {"first": [[]] * 5, "aborts": 0, "last": [[0, -errno.EIO]], "disables": 1}
    # In the process that made the controller the Abort still goes out.
    run(hq, 0, Op.READ, 0, 4096)
    for _ in range(3):
        hq.expire()
    assert [e for q, e in ctrl.commands if q == 0 and int(e["opcode"]) == C.ADMIN_ABORT]


class PlainDriver(BlockDriver):
    """Data in a bytearray: a forked worker would write its own copy."""

    geometry = BlockGeometry(512, 64)

    def __init__(self) -> None:
        self.data = bytearray(self.geometry.size)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data


@pytest.mark.parametrize(
    ("driver", "queues", "free_threaded", "mode"),
    [
        ("ram", 2, False, "processes"),
        ("ram", 2, True, "threads"),  # no GIL: threads run in parallel already
        ("ram", 1, False, "threads"),
        ("plain", 2, False, "threads"),  # its state is not shared across fork
    ],
)
def test_auto_picks_processes_only_where_they_help_and_are_safe(
    monkeypatch: pytest.MonkeyPatch, driver: str, queues: int, free_threaded: bool, mode: str
) -> None:
    monkeypatch.setattr(ublk, "free_threaded", lambda: free_threaded)
    d = RamDisk(1 << 20) if driver == "ram" else PlainDriver()
    u = Ublk(d, queues=queues, workers="auto")
    try:
        assert u._choose_mode() == mode
    finally:
        u.stop()


def test_free_threaded_follows_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ublk.sys, "_is_gil_enabled", lambda: False, raising=False)
    assert ublk.free_threaded()
    monkeypatch.setattr(ublk.sys, "_is_gil_enabled", lambda: True, raising=False)
    assert not ublk.free_threaded()
    monkeypatch.delattr(ublk.sys, "_is_gil_enabled")
    assert not ublk.free_threaded()  # before 3.13: always a GIL


def test_bad_worker_choices_are_refused_with_the_fix() -> None:
    with pytest.raises(UblkError, match=r"PlainDriver keeps its state .* use workers='threads'"):
        Ublk(PlainDriver(), queues=2, workers="processes")
    with pytest.raises(UblkError, match="workers='fibres': choose one of threads, processes"):
        Ublk(PlainDriver(), workers="fibres")
