"""UIO DMA support: the hugepage pool, pagemap decoding, and the errors that name the fix."""

from __future__ import annotations

import mmap
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


def test_alloc_without_hugepages_names_udrv_hugepages(pool: Path) -> None:
    if H.hugepage_status(Path("/sys/kernel/mm/hugepages/hugepages-2048kB")).free:
        pytest.skip("this machine has free hugepages reserved")
    dev = _Dev()
    dev.dma.set_mask(28)
    with pytest.raises(DmaError, match=r"0 reserved.*run `udrv hugepages 64`"):
        dev.dma.alloc(4096)
    with pytest.raises(DmaError, match="2 MiB hugepage at most"):
        dev.dma.alloc(3 << 20)


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
