"""The NVMe driver on QEMU's nvme device."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

import udrv
from udrv.drivers.nvme import Nvme, NvmeError
from udrv.errors import FrontendError

pytestmark = pytest.mark.lab("nvme:size=32M,serial=udrvtest1", "edu")
Bind = Callable[[str, "str | None"], str]


def test_identify_matches_the_qemu_options(bound: Bind) -> None:
    address = bound("nvme", "vfio-pci")
    out = subprocess.run(
        ["udrv", "nvme", "identify", address], capture_output=True, text=True, check=True
    ).stdout
    assert "QEMU NVMe Ctrl" in out and "serial udrvtest1" in out
    assert "namespace 1: 65536 blocks of 512 bytes = 32 MiB" in out


def test_read_write_flush_zeroes_discard(bound: Bind) -> None:
    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev, queues=2, depth=16) as nvme:
        assert nvme.geometry.size == 32 << 20 and len(nvme.io) == 2
        for offset, size in (
            (0, 512),
            (4096, 8192),
            (1 << 20, 300 * 1024),
            (nvme.geometry.size - 4096, 4096),
        ):
            data = os.urandom(size)
            nvme.write(offset, memoryview(data))
            back = bytearray(size)
            nvme.read(offset, memoryview(back))
            assert back == data, (offset, size)
        nvme.flush()
        nvme.write_zeroes(4096, 4096)
        back = bytearray(8192)
        nvme.read(4096, memoryview(back))
        assert back[:4096] == bytes(4096) and back[4096:] != bytes(4096)
        # Deallocate: what deallocated blocks read back is up to the device (DLFEAT); the
        # command must succeed and leave the neighbours alone.
        keep = os.urandom(4096)
        nvme.write((2 << 20) + 512 * 1024, memoryview(keep))
        nvme.discard(2 << 20, 512 * 1024)
        back = bytearray(4096)
        nvme.read((2 << 20) + 512 * 1024, memoryview(back))
        assert back == keep


def test_bad_requests_have_clear_errors(bound: Bind, lab_devices: dict[str, str]) -> None:
    with (
        udrv.open(bound("nvme", "vfio-pci")) as dev,
        pytest.raises(NvmeError, match=r"queue depth 5000 is outside 2\.\.2048 \(CAP\.MQES"),
    ):
        Nvme(dev, depth=5000)
    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev) as nvme:
        with pytest.raises(FrontendError, match="past the end of the disk"):
            nvme.read(nvme.geometry.size, memoryview(bytearray(512)))
        with pytest.raises(FrontendError, match="not aligned to 512"):
            nvme.write(100, memoryview(bytes(512)))
    with (
        udrv.open(bound("edu", "vfio-pci")) as dev,
        pytest.raises(NvmeError, match="not an NVMe controller"),
    ):
        Nvme(dev)


def test_no_such_namespace(bound: Bind) -> None:
    with (
        udrv.open(bound("nvme", "vfio-pci")) as dev,
        pytest.raises(NvmeError, match=r"no namespace 7; active: \[1\]"),
    ):
        Nvme(dev, nsid=7)


@pytest.mark.parametrize("interrupts", [True, False], ids=["msix", "polled"])
def test_async_many_commands_in_flight(bound: Bind, interrupts: bool) -> None:
    """32 concurrent writes then reads of distinct random blocks per loop, two loops (threads)
    on two queue pairs; every block reads back what was written to it."""
    import asyncio
    import random
    import threading

    from udrv.drivers.nvme import AsyncNvme

    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev, queues=2, depth=16,
                                                          interrupts=interrupts) as nvme:  # fmt: skip
        assert all((q.vector is not None) == interrupts for q in nvme.io)
        drv = AsyncNvme(nvme)
        blocks = drv.geometry.num_blocks
        errors: list[BaseException] = []
        both_done, checked = threading.Barrier(3), threading.Barrier(3)

        async def job(seed: int) -> int:
            rng = random.Random(seed)
            sizes = [rng.choice((512, 4096, 64 * 1024, 300 * 1024)) for _ in range(32)]
            offsets = [
                (seed * blocks // 2 + i * (blocks // 64)) * 512 for i in range(32)
            ]  # disjoint
            datas = [os.urandom(n) for n in sizes]
            await asyncio.gather(
                *(drv.write(o, memoryview(d)) for o, d in zip(offsets, datas, strict=True))
            )
            await drv.flush()
            backs = [bytearray(n) for n in sizes]
            await asyncio.gather(
                *(drv.read(o, memoryview(b)) for o, b in zip(offsets, backs, strict=True))
            )
            assert backs == [bytearray(d) for d in datas]
            with pytest.raises(FrontendError, match="past the end"):
                await drv.read(drv.geometry.size, memoryview(bytearray(512)))
            await drv.write_zeroes(offsets[0], 4096)
            back = bytearray(4096)
            await drv.read(offsets[0], memoryview(back))
            assert back == bytes(4096)
            await drv.discard(offsets[1], 512)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, both_done.wait, 60)
            await loop.run_in_executor(None, checked.wait, 60)  # keep the loop (and queue)
            return len(sizes)

        def thread(seed: int) -> None:
            try:
                asyncio.run(job(seed))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        both_done.wait(120)
        # A third loop while both live has no queue pair left: a clear error, no sharing.
        with pytest.raises(NvmeError, match="more frontend queues than the 2 NVMe I/O queue"):
            asyncio.run(drv.read(0, memoryview(bytearray(512))))
        checked.wait(10)
        for t in threads:
            t.join(120)
        assert not errors, errors
        # Once a loop is closed its queue pair serves the next one.
        back = bytearray(512)
        asyncio.run(drv.read(0, memoryview(back)))
        drv.close()


def test_msix_vector_per_queue_fires(bound: Bind) -> None:
    """MSI-X with several vectors on a real device: each I/O completion queue's own vector
    fires for its completions, and only it."""
    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev, queues=2, depth=8) as nvme:
        assert dev.irq.enabled == "msix" and len(dev.irq.vectors) == 3  # admin + 2 I/O
        q1, q2 = nvme.io
        assert q1.vector is not None and q2.vector is not None
        q1.vector.poll(), q2.vector.poll()  # nothing pending from bring-up on these
        for q in (q1, q2):
            other = q2 if q is q1 else q1
            nvme._rw_on(q, 0x02, 0, 4096, nvme._prp[nvme.io.index(q)])  # NVM Read
            assert q.vector.wait(5.0) >= 1
            assert other.vector is not None and other.vector.poll() == 0


def test_a_completion_nobody_waits_for_is_consumed(bound: Bind) -> None:
    """A real controller's completion for a command id no caller waits for (pushed behind
    the driver's back, as a late completion of a timed-out command would arrive) is
    consumed and counted; the synchronous command queued behind it completes, and so do the
    ones after it."""
    from udrv.drivers.nvme import command as C

    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev, depth=8, interrupts=False) as nvme:
        q = nvme.io[0]
        with q.lock:
            q.push(C.flush(nvme.namespace.nsid), 0xBEEF)  # nobody waits for 0xBEEF
        nvme.flush()
        assert q.stray == 1
        for i in range(20):  # around the queue more than twice: head, phase and doorbell agree
            data = os.urandom(4096)
            nvme.write(i * 4096, memoryview(data))
            back = bytearray(4096)
            nvme.read(i * 4096, memoryview(back))
            assert back == data
        assert q.stray == 1


@pytest.mark.lab("nvme:size=32M,serial=udrvtest2,mdts=3,msix_qsize=2")
def test_few_vectors_and_small_mdts(bound: Bind) -> None:
    """QEMU's nvme with 2 MSI-X vectors and MDTS 3 (32 KiB): three I/O queues get vector 0
    (shared with the admin queue), vector 1 and polling; transfers and Write Zeroes are
    split at 32 KiB; all three queues move data."""
    import asyncio
    import threading

    from udrv.drivers.nvme import AsyncNvme

    with udrv.open(bound("nvme", "vfio-pci")) as dev, Nvme(dev, queues=3, depth=16) as nvme:
        assert dev.irq.enabled == "msix" and len(dev.irq.vectors) == 2
        vectors = [q.vector for q in nvme.io]
        assert vectors[0] is dev.irq.vectors[0] and vectors[1] is dev.irq.vectors[1]
        assert vectors[2] is None
        g = nvme.geometry
        assert g.max_transfer == 32 * 1024 and g.max_write_zeroes == 32 * 1024
        assert g.discard and g.write_zeroes  # QEMU's ONCS has both
        data = os.urandom(200 * 1024)
        nvme.write(0, memoryview(data))
        nvme.write_zeroes(4096, 100 * 1024)  # four commands
        back = bytearray(len(data))
        nvme.read(0, memoryview(back))
        assert back[:4096] == data[:4096] and back[4096 : 104 * 1024] == bytes(100 * 1024)
        assert back[104 * 1024 :] == data[104 * 1024 :]
        drv = AsyncNvme(nvme)
        errors: list[BaseException] = []
        started = threading.Barrier(3)

        async def job(i: int) -> None:
            blob = os.urandom(96 * 1024)
            await drv.write((1 << 20) * (i + 1), memoryview(blob))
            got = bytearray(len(blob))
            await drv.read((1 << 20) * (i + 1), memoryview(got))
            assert got == blob
            await drv.write_zeroes((1 << 20) * (i + 1), 64 * 1024)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)

        def thread(i: int) -> None:
            try:
                asyncio.run(job(i))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        drv.close()
