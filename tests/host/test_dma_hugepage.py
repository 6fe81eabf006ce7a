"""UIO DMA support: the hugepage pool, pagemap decoding, and the errors that name the fix."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from udrv.cli.main import main
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


class _Dev:
    address, backend = "0000:00:04.0", "uio"

    def on_close(self, hook: object) -> None:
        pass


def test_alloc_without_hugepages_names_udrv_hugepages(pool: Path) -> None:
    if H.hugepage_status(Path("/sys/kernel/mm/hugepages/hugepages-2048kB")).free:
        pytest.skip("this machine has free hugepages reserved")
    dma = H.HugepageDma(_Dev(), mask_bits=28)  # type: ignore[arg-type]
    with pytest.raises(DmaError, match=r"0 reserved.*run `udrv hugepages 64`"):
        dma.alloc(4096)
    with pytest.raises(DmaError, match="2 MiB hugepage at most"):
        dma.alloc(3 << 20)
