"""UIO DMA support: the hugepage pool, pagemap decoding, and the errors that name the fix."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest

from udrv.cli.main import main
from udrv.core.device import Device, RegionInfo
from udrv.core.dma import Dma
from udrv.core.region import Region
from udrv.dma import Direction
from udrv.dma import hugepage as H
from udrv.errors import DmaError


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "nr_hugepages").write_text("0\n")
    (tmp_path / "free_hugepages").write_text("0\n")
    monkeypatch.setattr(H, "HUGEPAGES_2M", tmp_path)  # never the host's real pool
    return tmp_path


def test_reserve_and_status(pool: Path) -> None:
    assert H.hugepage_status() == H.HugepageStatus(0, 0)
    assert H.reserve_hugepages(8) == 8
    assert (pool / "nr_hugepages").read_text() == "8"
    with pytest.raises(DmaError, match="count >= 0"):
        H.reserve_hugepages(-1)


def test_reserve_without_permission_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DmaError, match="run as root") as info:
        H.reserve_hugepages(4, tmp_path / "missing")
    assert info.value.errno is not None


def test_cli_reserves_and_reports(pool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hugepages", "16"]) == 0
    assert (pool / "nr_hugepages").read_text() == "16"
    assert "16 reserved" in capsys.readouterr().out


def _pagemap(tmp_path: Path, vaddr: int, entry: int) -> str:
    path = tmp_path / "pagemap"
    path.write_bytes(b"\0" * (vaddr // 4096 * 8) + struct.pack("<Q", entry))
    return str(path)


def test_virt_to_phys_decodes_pfn_and_offset(tmp_path: Path) -> None:
    vaddr = 0x7000 + 0x123
    pm = _pagemap(
        tmp_path, vaddr, H.PAGE_PRESENT | (1 << 62) | 0xABCDE
    )  # bit 62: swapped flag noise
    assert H.virt_to_phys(vaddr, pm) == (0xABCDE & H.PFN_MASK) * 4096 + 0x123


def test_virt_to_phys_errors(tmp_path: Path) -> None:
    with pytest.raises(DmaError, match="not resident"):
        H.virt_to_phys(0x3000, _pagemap(tmp_path, 0x3000, 0xABC))
    with pytest.raises(DmaError, match="CAP_SYS_ADMIN"):
        H.virt_to_phys(0x3000, _pagemap(tmp_path, 0x3000, H.PAGE_PRESENT))


def test_real_pagemap_of_this_process() -> None:
    """Root sees a frame number, others see 0: either a value or the CAP_SYS_ADMIN error."""
    import ctypes

    buf = ctypes.create_string_buffer(4096)
    buf[0] = b"x"
    addr = ctypes.addressof(buf)
    try:
        phys = H.virt_to_phys(addr)
    except DmaError as exc:
        assert "CAP_SYS_ADMIN" in str(exc)
    else:
        assert phys % 4096 == addr % 4096 and phys > 0


class _Dev(Device):
    """A UIO-like device: only its address matters to the DMA layer."""

    backend = "uio"

    def __init__(self) -> None:
        super().__init__("0000:00:04.0")

    @property
    def config(self) -> Region:
        raise NotImplementedError

    def region_info(self, index: int) -> RegionInfo:
        raise NotImplementedError

    def bar(self, index: int) -> Region:
        raise NotImplementedError

    def _open_dma(self) -> Dma:
        return H.HugepageDma(self)

    def _close(self) -> None:
        pass


def test_alloc_without_hugepages_names_udrv_hugepages(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_hugepage(fd: int) -> mmap.mmap:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")  # hugetlbfs with an empty pool

    monkeypatch.setattr(H, "map_hugepage_file", no_hugepage)
    dev = _Dev()
    dev.dma.set_mask(28)
    with pytest.raises(DmaError, match=r"0 reserved.*run `udrv hugepages 64`"):
        dev.dma.alloc(4096)
    with pytest.raises(DmaError, match="2 MiB hugepage at most"):
        dev.dma.alloc(3 << 20)
    assert list(H.HUGETLBFS.iterdir()) == []  # the failed buffer's file is gone


# -- streaming mappings under UIO (issue 13 item 1) ---------------------------------------

PAGE = mmap.PAGESIZE
REAL_PAGEMAP = "/proc/self/pagemap"
PM_EXCLUSIVE = 1 << 56  # pagemap.rst: page exclusively mapped


def _real_entry(vaddr: int) -> int:
    with open(REAL_PAGEMAP, "rb") as f:
        f.seek(vaddr // PAGE * 8)
        return int(struct.unpack("<Q", f.read(8))[0])


class Pins:
    """Stands in for mlock/munlock; at mlock time it records what the real pagemap says
    about every page (present, exclusively mapped), i.e. whether the pages were given their
    own frames before being pinned."""

    def __init__(self) -> None:
        self.locked: list[tuple[int, int]] = []
        self.state_at_lock: list[tuple[bool, bool]] = []

    def mlock(self, vaddr: int, length: int) -> None:
        assert vaddr % PAGE == 0 and length % PAGE == 0
        self.locked.append((vaddr, length))
        for p in range(vaddr, vaddr + length, PAGE):
            e = _real_entry(p)
            self.state_at_lock.append((bool(e & H.PAGE_PRESENT), bool(e & PM_EXCLUSIVE)))

    def munlock(self, vaddr: int, length: int) -> None:
        self.locked.remove((vaddr, length))


@pytest.fixture
def pins(monkeypatch: pytest.MonkeyPatch) -> Pins:
    p = Pins()
    monkeypatch.setattr(H, "mlock", p.mlock)
    monkeypatch.setattr(H, "munlock", p.munlock)
    return p


def fake_pagemap(tmp_path: Path, frames: dict[int, int]) -> str:
    """A sparse pagemap file: virtual page address -> frame number (present)."""
    path = tmp_path / "pagemap"
    with open(path, "wb") as f:
        for vaddr, pfn in frames.items():
            f.seek(vaddr // PAGE * 8)
            f.write(struct.pack("<Q", H.PAGE_PRESENT | pfn))
    return str(path)


def test_map_touches_and_pins_every_page_even_the_last_of_an_unaligned_buffer(
    pins: Pins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mem = mmap.mmap(-1, 3 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never touched
    arr = np.frombuffer(mem, dtype=np.uint8)
    base = arr.ctypes.data
    assert not _real_entry(base + 2 * PAGE) & H.PAGE_PRESENT
    frames = {base + i * PAGE: 0x1000 + i for i in range(3)}  # contiguous
    monkeypatch.setattr(H, "PAGEMAP", fake_pagemap(tmp_path, frames))
    dev = _Dev()
    view = arr[100 : 2 * PAGE + 10]  # 10 bytes into the third page
    m = dev.dma.map(view, Direction.FROM_DEVICE)
    # Written (own frame, not the shared zero page) before being pinned, every page.
    assert pins.state_at_lock == [(True, True)] * 3
    assert pins.locked == [(base, 3 * PAGE)]
    assert m.iova == 0x1000 * PAGE + 100 and m.segments == [(m.iova, len(view))]
    assert not view.any()  # touching did not change the contents
    m.unmap()
    assert pins.locked == []  # unpinned
    del arr, view, m
    mem.close()


def test_discontiguous_buffer_map_refuses_and_map_sg_splits(
    pins: Pins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = np.zeros(4 * PAGE, dtype=np.uint8)
    start = -buf.ctypes.data % PAGE
    view = buf[start + 50 : start + 3 * PAGE - 20]  # three pages
    first = view.ctypes.data - 50
    frames = {first: 0x2000, first + PAGE: 0x2001, first + 2 * PAGE: 0x9000}
    monkeypatch.setattr(H, "PAGEMAP", fake_pagemap(tmp_path, frames))
    dev = _Dev()
    with pytest.raises(DmaError, match=r"not physically contiguous .*2 separate runs.*map_sg"):
        dev.dma.map(view)
    assert pins.locked == []  # the refused mapping was unpinned
    sg = dev.dma.map_sg([view], max_segment=1 << 20, boundary=1 << 30)
    assert sg.segments == [(0x2000 * PAGE + 50, 2 * PAGE - 50), (0x9000 * PAGE, PAGE - 20)]
    assert sg.maps[0].iova == 0x2000 * PAGE + 50  # the first byte's address, not the last run's
    dev.close()  # unpins what is still mapped
    assert pins.locked == []


def test_physical_address_beyond_the_mask(
    pins: Pins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = bytearray(100)
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    page = addr & ~(PAGE - 1)
    monkeypatch.setattr(H, "PAGEMAP", fake_pagemap(tmp_path, {page: 1 << 20, page + PAGE: 1 << 20}))
    dev = _Dev()
    dev.dma.set_mask(32)  # frame 1 << 20 is at 4 GiB
    with pytest.raises(DmaError, match="beyond the device's 32-bit DMA mask"):
        dev.dma.map(buf)
    assert pins.locked == []


# -- UIO DMA under a translating IOMMU (issue 15 item 3) ----------------------------------


def test_translating_iommu_group_is_refused(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "type").write_text("DMA-FQ\n")
    with pytest.raises(
        DmaError,
        match=r"0000:00:04.0: UIO DMA .* IOMMU group 7 translates them .*'DMA-FQ'.*"
        r"`udrv bind 0000:00:04.0`.*iommu=pt",
    ):
        H.HugepageDma(_Dev(), 7, tmp_path)
    (tmp_path / "7" / "type").write_text("identity\n")
    H.HugepageDma(_Dev(), 7, tmp_path)  # passthrough: physical addresses work
    H.HugepageDma(_Dev(), None, tmp_path)  # no IOMMU at all
    H.HugepageDma(_Dev(), 8, tmp_path)  # no type file (kernels before 5.11)


# -- a killed driver's DMA memory (issue 13: the guest panic hunt) ------------------------
#
# Under UIO a SIGKILLed driver leaves its device with bus mastering and (an e1000) RX on:
# the kernel frees the process's memory (exit_mm) before it closes /dev/uioN (exit_files,
# where uio_pci_generic clears Bus Master Enable), so the device may write into pages the
# kernel hands out again. The buffers are named hugetlbfs files instead: nothing is freed
# at exit, and the next open frees them only after stopping the device.

FAKE_PHYS = 0x4000_0000


class _QuiescedDev(_Dev):
    """Records Bus Master Enable changes and which buffer files existed at each."""

    def __init__(self) -> None:
        super().__init__()
        self.bme: list[tuple[bool, list[str]]] = []

    def set_bus_master(self, enable: bool = True) -> None:
        self.bme.append((enable, sorted(p.name for p in H.HUGETLBFS.iterdir())))


@pytest.fixture
def phys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(H, "virt_to_phys", lambda vaddr, pagemap=None: FAKE_PHYS)


def _killed_driver() -> tuple[int, list[str]]:
    """Fork a 'driver' that allocates two DMA buffers for 0000:00:04.0 and is SIGKILLed with
    them; (its pid, the files that were there while it lived)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            dev = _Dev()
            dev.dma.alloc(4096)
            dev.dma.alloc(8192)
            os.write(w, b"ok")
            signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 2) == b"ok"
    os.close(r)
    alive = sorted(p.name for p in H.HUGETLBFS.iterdir())
    # While it lives, nobody else may take the device's DMA memory, nor free it.
    with pytest.raises(DmaError, match=rf"another process \(pid {pid}\) owns") as busy:
        H.DmaFiles("0000:00:04.0")
    assert busy.value.errno == errno.EBUSY
    assert H.DmaFiles.reclaim_dead("0000:00:04.0", lambda: pytest.fail("quiesced")) == 0
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid, alive


def test_a_killed_drivers_buffers_outlive_it_until_the_device_is_stopped(phys: None) -> None:
    pid, alive = _killed_driver()
    assert alive == [f"udrv-0000:00:04.0-{pid}-0", f"udrv-0000:00:04.0-{pid}-1"]
    # Dead: its memory is still allocated (the device may still write into it)...
    assert sorted(p.name for p in H.HUGETLBFS.iterdir()) == alive
    # ...until the next open stops the device; only then are the buffers freed.
    calls: list[list[str]] = []
    n = H.DmaFiles.reclaim_dead(
        "0000:00:04.0", lambda: calls.append(sorted(p.name for p in H.HUGETLBFS.iterdir()))
    )
    assert n == 2 and calls == [alive]
    assert list(H.HUGETLBFS.iterdir()) == []


def test_a_device_that_cannot_be_stopped_keeps_the_memory(phys: None) -> None:
    _killed_driver()

    def fails() -> None:
        raise DmaError("config space gone")

    with pytest.raises(DmaError, match="config space gone"):
        H.DmaFiles.reclaim_dead("0000:00:04.0", fails)
    assert len(list(H.HUGETLBFS.iterdir())) == 2  # leaked, not handed back under the device


def test_first_alloc_after_a_killed_driver_clears_bus_mastering_first(phys: None) -> None:
    """Without the backend's open-time reclaim (any Device with HugepageDma), the first
    alloc claims the files: Bus Master Enable goes off while the dead driver's files still
    exist, and they are gone afterwards."""
    _, alive = _killed_driver()
    dev = _QuiescedDev()
    buf = dev.dma.alloc(4096)
    assert dev.bme == [(False, alive)]
    assert [p.name for p in H.HUGETLBFS.iterdir()] == [f"udrv-0000:00:04.0-{os.getpid()}-0"]
    buf.close()
    dev.close()


def test_a_closed_buffer_frees_its_file_and_close_stops_dma_first(phys: None) -> None:
    dev = _QuiescedDev()
    a = dev.dma.alloc(4096)
    dev.dma.alloc(4096)
    assert a.iova == FAKE_PHYS and len(list(H.HUGETLBFS.iterdir())) == 2
    a.close()
    assert len(list(H.HUGETLBFS.iterdir())) == 1
    dev.close()  # the other buffer: bus mastering off while it still existed, then freed
    assert dev.bme == [(False, [f"udrv-0000:00:04.0-{os.getpid()}-1"])]
    assert list(H.HUGETLBFS.iterdir()) == []
    H.DmaFiles("0000:00:04.0").close()  # the claim was given up
