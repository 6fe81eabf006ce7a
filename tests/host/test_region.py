"""Regions: exact widths, bounds, alignment, permissions, polling, RMW, bulk copies, fakes."""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.core.region import FileRegion, MmioRegion, RecordingRegion, Region
from udrv.errors import PollTimeout, RegionError

WIDTHS = (1, 2, 4, 8)


@pytest.fixture
def mem() -> Iterator[MmioRegion]:
    m = mmap.mmap(-1, 4096)
    r = MmioRegion(m, name="BAR0 of test")
    yield r
    r.close()
    m.close()


@given(
    st.sampled_from(WIDTHS),
    st.integers(0, 4095),
    st.data(),
)
def test_each_width_touches_exactly_its_bytes(width: int, where: int, data: st.DataObject) -> None:
    buf = bytearray(os.urandom(4096))
    before = bytes(buf)
    r = MmioRegion(buf, name="t")
    offset = min(where, 4096 - width) // width * width
    value = data.draw(st.integers(0, (1 << (8 * width)) - 1))
    getattr(r, f"write{width * 8}")(offset, value)
    assert buf[offset : offset + width] == value.to_bytes(width, "little")
    assert buf[:offset] == before[:offset] and buf[offset + width :] == before[offset + width :]
    assert getattr(r, f"read{width * 8}")(offset) == value
    assert r.read_width(offset, width) == value
    r.close()


def test_64bit_write_on_an_anonymous_mmap_changes_exactly_8_bytes() -> None:
    m = mmap.mmap(-1, 4096)
    m.write(b"\xa5" * 4096)
    r = MmioRegion(m, name="t")
    r.write64(0x100, 0x0102030405060708)
    r.close()
    raw = m[:]
    m.close()
    changed = [i for i in range(4096) if raw[i] != 0xA5]
    assert changed == list(range(0x100, 0x108))
    assert raw[0x100:0x108] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_named_accessors_are_little_endian(mem: MmioRegion) -> None:
    mem.write64(8, 0x1122334455667788)
    assert (mem.read8(8), mem.read8(15), mem.read16(8), mem.read16(14)) == (
        0x88,
        0x11,
        0x7788,
        0x1122,
    )
    assert (mem.read32(8), mem.read32(12), mem.read64(8)) == (
        0x55667788,
        0x11223344,
        0x1122334455667788,
    )
    mem.write16(2, 0xBEEF)
    assert mem.read(0, 4) == b"\x00\x00\xef\xbe"


def test_window_at_an_offset_of_the_buffer() -> None:
    buf = bytearray(64)
    r = MmioRegion(buf, name="w", offset=16, size=32)
    r.write32(0, 0xDEADBEEF)
    assert buf[16:20] == b"\xef\xbe\xad\xde"
    with pytest.raises(RegionError, match="4-byte write at 0x20 is outside the 32 bytes region"):
        r.write32(32, 0)
    with pytest.raises(RegionError, match="multiple of 8"):
        MmioRegion(buf, name="w", offset=4, size=8)
    with pytest.raises(RegionError, match="does not fit"):
        MmioRegion(buf, name="w", offset=32, size=64)


MESSAGES: list[tuple[Callable[[Region], object], str]] = [
    (
        lambda r: r.read32(4096),
        r"^BAR0 of test: 4-byte read at 0x1000 is outside the 4 KiB region \(offsets 0x0-0xffc\)$",
    ),
    (lambda r: r.read32(-4), "4-byte read at -0x4 is outside the 4 KiB region"),
    (lambda r: r.read8(-1), "1-byte read at -0x1 is outside"),
    (lambda r: r.read64(4096 - 4), "8-byte read at 0xffc is outside"),
    (lambda r: r.write16(4095, 0), "2-byte write at 0xfff is outside"),
    (lambda r: r.write8(1 << 40, 0), "outside"),
    (lambda r: r.read32(2), "4-byte read at 0x2 is not 4-byte aligned; use a multiple of 4"),
    (lambda r: r.read16(1), "not 2-byte aligned"),
    (lambda r: r.write64(4, 0), "8-byte write at 0x4 is not 8-byte aligned"),
    (
        lambda r: r.write32(0, 1 << 32),
        r"value 0x100000000 does not fit in 32 bits \(0 to 0xffffffff\)",
    ),
    (lambda r: r.write8(0, 256), "value 0x100 does not fit in 8 bits"),
    (lambda r: r.write16(0, -1), "value -0x1 does not fit in 16 bits"),
    (lambda r: r.write64(0, 1 << 64), "does not fit in 64 bits"),
    (lambda r: r.write32(0, 1.0), "value 1.0 does not fit"),  # type: ignore[arg-type]
    (lambda r: r.read_width(0, 3), "bad access width 3; use 1, 2, 4 or 8"),
    (lambda r: r.write_width(0, 16, 0), "bad access width 16"),
    (lambda r: r.read(4000, 100), "100-byte bulk read at 0xfa0 runs outside the 4 KiB region"),
    (lambda r: r.write(-1, b"x"), "bulk write at -0x1 runs outside"),
]


@pytest.mark.parametrize(("call", "message"), MESSAGES)
def test_bad_access_is_a_clear_error(
    mem: MmioRegion, call: Callable[[Region], object], message: str
) -> None:
    with pytest.raises(RegionError, match=message):
        call(mem)
    assert mem.read(0, 4096) == bytes(4096)  # and nothing was written


@pytest.mark.parametrize(("call", "message"), MESSAGES)
def test_file_and_recording_regions_give_the_same_errors(
    call: Callable[[Region], object], message: str
) -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(4096)
        fr = FileRegion(f.fileno(), name="BAR0 of test", size=4096)
        with pytest.raises(RegionError, match=message):
            call(fr)
    rec = RecordingRegion(4096, name="BAR0 of test")
    with pytest.raises(RegionError, match=message):
        call(rec)
    assert rec.log == []  # refused accesses never reach the device


@given(st.integers(1, 3 * 4096), st.sampled_from(WIDTHS), st.integers(-64, 3 * 4096 + 64))
def test_bounds_for_any_size(size: int, width: int, offset: int) -> None:
    """Sizes that are not powers of two use the view's own IndexError for the upper bound."""
    r = MmioRegion(bytearray(size + 8), name="odd", size=size)
    ok = offset >= 0 and offset + width <= size and offset % width == 0
    if ok:
        r.write_width(offset, width, 1)
        assert r.read_width(offset, width) == 1
    else:
        with pytest.raises(RegionError):
            r.read_width(offset, width)
        with pytest.raises(RegionError):
            r.write_width(offset, width, 1)


def test_read_only_region_refuses_writes_of_every_kind() -> None:
    buf = bytearray(b"\x11" * 64)
    r = MmioRegion(buf, name="ROM of 0000:00:04.0", writable=False)
    for w in WIDTHS:
        with pytest.raises(
            RegionError, match=rf"ROM of 0000:00:04.0 is read-only: {w}-byte write at 0x8 refused"
        ):
            r.write_width(8, w, 0)
    with pytest.raises(RegionError, match="read-only"):
        r.write(0, b"\0")
    with pytest.raises(RegionError, match="read-only"):
        r.set_bits32(0, 1)
    assert buf == bytearray(b"\x11" * 64)
    assert r.read32(0) == 0x11111111


def test_read_only_mmap_must_be_declared_read_only() -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
        with pytest.raises(RegionError, match="mapping is read-only"):
            MmioRegion(m, name="t")
        r = MmioRegion(m, name="t", writable=False, close_buffer=True)
        assert r.read64(0) == 0
        with pytest.raises(RegionError, match="read-only"):
            r.write64(0, 1)
        r.close()
        assert m.closed


def test_write_only_region_refuses_reads() -> None:
    r = MmioRegion(bytearray(16), name="doorbells", readable=False)
    r.write32(4, 7)
    with pytest.raises(RegionError, match="doorbells is write-only: 4-byte read at 0x4 refused"):
        r.read32(4)


def test_close_releases_the_mapping_and_later_access_is_a_clear_error() -> None:
    m = mmap.mmap(-1, 4096)
    hooks: list[str] = []
    r = MmioRegion(m, name="BAR2 of x", on_close=lambda: hooks.append("closed"))
    read32 = r.read32  # a bound method kept by a driver
    r.read32(0)
    r.close()
    r.close()  # twice is fine
    m.close()  # would raise BufferError if any view were still exported
    assert hooks == ["closed"]
    with pytest.raises(RegionError, match="BAR2 of x is closed: 4-byte read at 0x0 refused"):
        read32(0)
    with pytest.raises(RegionError, match="closed"):
        r.write8(0, 1)
    with pytest.raises(RegionError, match="closed"):
        r.read(0, 1)
    assert "closed" in repr(r)


def test_context_manager_closes() -> None:
    with MmioRegion(bytearray(8), name="t") as r:
        r.write8(0, 1)
    assert r.closed


def test_bulk_copies(mem: MmioRegion) -> None:
    mem.write(0x10, bytes(range(32)))
    assert mem.read(0x10, 32) == bytes(range(32))
    buf = bytearray(8)
    mem.read_into(0x14, buf)
    assert buf == bytes(range(4, 12))
    assert mem.read(0, 0) == b""
    assert mem.read32(0x10) == 0x03020100


def test_rmw_helpers() -> None:
    rec = RecordingRegion(16)
    rec.write32(0, 0b1010)
    assert rec.set_bits32(0, 0b0001) == 0b1011
    assert rec.clear_bits32(0, 0b1000) == 0b0011
    assert rec.modify32(0, 0b0011, 0b0100) == 0b0100
    assert rec.set_bits(8, 0x8000, width=2) == 0x8000
    assert rec.mem[8:10] == b"\x00\x80"
    assert rec.modify(8, 0xFFFF, 0x12, width=8) == 0x12  # a 64-bit modify reads 8 bytes
    assert rec.log[1:3] == [("r", 0, 4, 0b1010), ("w", 0, 4, 0b1011)]
    assert rec.log[-2:] == [("r", 8, 8, 0x8000), ("w", 8, 8, 0x12)]


def test_write1c_writes_only_the_mask_and_never_reads() -> None:
    rec = RecordingRegion(16)
    rec.write32(0, 0b1111)
    rec.log.clear()
    rec.write1c32(0, 0b0010)
    rec.write1c(4, 0x1, width=2)
    assert rec.log == [("w", 0, 4, 0b0010), ("w", 4, 2, 0x1)]


def test_poll_returns_the_matching_value(mem: MmioRegion) -> None:
    mem.write32(0x20, 0x81)
    assert mem.poll32(0x20, 0x80, 0x80, 0.1) == 0x81
    assert mem.poll(0x20, 0xFF, 0x81, timeout=0.1, width=8) == 0x81


def test_poll_timeout_names_region_register_mask_and_last_value(mem: MmioRegion) -> None:
    mem.write32(0x20, 0x81)
    t0 = time.monotonic()
    with pytest.raises(
        PollTimeout,
        match=r"^BAR0 of test: register STATUS \(0x20\) & 0x1 did not become 0x0 within 0.05 s \(last value 0x00000081\)",
    ):
        mem.poll32(0x20, 0x1, 0, 0.05, name="STATUS")
    assert 0.05 <= time.monotonic() - t0 < 1.0
    with pytest.raises(PollTimeout, match=r"register 0x24 & 0xff did not become 0x1"):
        mem.poll(0x24, 0xFF, 1, timeout=0.0, interval=0)
    with pytest.raises(RegionError, match="can never succeed"):
        mem.poll32(0x20, 0x1, 0x2, 1.0)


def test_poll_sees_a_change_made_by_the_device() -> None:
    """The device (on_read) finishes after three reads: poll keeps reading until then."""
    reads = 0

    def on_read(offset: int, width: int) -> int | None:
        nonlocal reads
        reads += 1
        return 0 if reads >= 3 else 1

    rec = RecordingRegion(64, on_read=on_read)
    assert rec.poll32(0x20, 1, 0, 1.0, interval=0) == 0
    assert [a.op for a in rec.log] == ["r", "r", "r"]


def test_file_region_uses_one_exact_pread_or_pwrite() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(64)))
        f.flush()
        r = FileRegion(f.fileno(), name="config", size=32, base_offset=16, index=7)
        assert not r.mappable and r.index == 7
        assert r.read32(0) == int.from_bytes(bytes(range(16, 20)), "little")
        assert r.read64(8) == int.from_bytes(bytes(range(24, 32)), "little")
        r.write16(2, 0xBEEF)
        assert os.pread(f.fileno(), 4, 16) == b"\x10\x11\xef\xbe"
        r.write(4, b"abcd")
        assert r.read(2, 6) == b"\xef\xbeabcd"
        buf = bytearray(4)
        r.read_into(4, buf)
        assert buf == b"abcd"
        with pytest.raises(RegionError, match="outside the 32 bytes region"):
            r.read32(32)


def test_file_region_short_transfer_and_errno() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(bytes(8))
        f.flush()
        r = FileRegion(f.fileno(), name="config", size=64)
        with pytest.raises(RegionError, match="4-byte read at 0x8 returned 0 bytes"):
            r.read32(8)
        with pytest.raises(RegionError, match="stopped after 8"):
            r.read(0, 16)
    rfd, wfd = os.pipe()
    os.close(wfd)
    try:
        r = FileRegion(rfd, name="config", size=64)
        with pytest.raises(
            RegionError, match=r"4-byte write at 0x0 failed: \[EBADF\]|\[ESPIPE\]"
        ) as ei:
            r.write32(0, 1)
        assert ei.value.errno is not None
    finally:
        os.close(rfd)


def test_recording_region_emulates_a_device() -> None:
    def on_write(offset: int, width: int, value: int) -> None:
        if offset == 4:  # like edu's LIVENESS: reads back the inversion
            rec.mem[4:8] = (~value & 0xFFFFFFFF).to_bytes(4, "little")

    rec = RecordingRegion(16, on_write=on_write)
    rec.write32(4, 0x0F0F0F0F)
    assert rec.read32(4) == 0xF0F0F0F0
    assert rec.log == [("w", 4, 4, 0x0F0F0F0F), ("r", 4, 4, 0xF0F0F0F0)]
    assert rec.writes() == [(4, 4, 0x0F0F0F0F)]


def test_recording_region_wraps_a_real_region_and_logs_bulk_copies() -> None:
    buf = bytearray(64)
    inner = MmioRegion(buf, name="BAR0 of 0000:00:04.0", index=0)
    rec = RecordingRegion(inner)
    assert (rec.name, rec.size, rec.index, rec.mappable) == ("BAR0 of 0000:00:04.0", 64, 0, True)
    rec.write64(8, 0xAABB)
    rec.write(16, b"hi")
    assert rec.read(16, 2) == b"hi"
    assert buf[8:10] == b"\xbb\xaa"
    assert rec.log == [("w", 8, 8, 0xAABB), ("write", 16, 2, b"hi"), ("read", 16, 2, b"hi")]
    with pytest.raises(RegionError, match="has no mem"):
        rec.mem  # noqa: B018
    rec.close()
    assert not inner.closed  # the wrapped region belongs to its owner
    with pytest.raises(RegionError, match="read-only"):
        RecordingRegion(MmioRegion(bytearray(8), name="ro", writable=False)).write8(0, 1)


def test_zero_size_region_is_refused() -> None:
    with pytest.raises(RegionError, match="positive size"):
        FileRegion(0, name="empty", size=0)


@pytest.mark.parametrize(
    ("bits", "value"), [(8, 0x81), (16, 0x8001), (32, 0x8000_0001), (64, 1 << 63 | 1)]
)
def test_pollN_reads_exactly_N_bits(bits: int, value: int) -> None:
    """poll8/16/32 make one access of their width per read, as read8/16/32 do."""
    rec = RecordingRegion(64, on_read=lambda offset, width: value)
    mask = 1 << (bits - 1)
    assert getattr(rec, f"poll{bits}")(0x20, mask, mask, 1.0, interval=0) == value
    assert [(a.op, a.width) for a in rec.log] == [("r", bits // 8)]
