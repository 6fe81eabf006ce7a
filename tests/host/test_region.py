"""Regions: exact widths, bounds, alignment, read-only, polling, RMW, recording fakes."""

from __future__ import annotations

import mmap
import os
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.core.region import FileRegion, MmioRegion, RecordingRegion
from udrv.errors import PollTimeout, RegionError


@pytest.fixture
def mem() -> MmioRegion:
    return MmioRegion(mmap.mmap(-1, 4096), name="BAR0 of test")


@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 511), st.data())
def test_each_width_touches_exactly_its_bytes(width: int, slot: int, data: st.DataObject) -> None:
    buf = bytearray(os.urandom(4096))
    before = bytes(buf)
    r = MmioRegion(buf, name="t")
    offset = slot * 8 % (4096 - 8) // width * width
    value = data.draw(st.integers(0, (1 << (8 * width)) - 1))
    r.write(offset, width, value)
    assert buf[offset : offset + width] == value.to_bytes(width, "little")
    assert buf[:offset] == before[:offset] and buf[offset + width :] == before[offset + width :]
    assert r.read(offset, width) == value


def test_named_accessors(mem: MmioRegion) -> None:
    mem.write64(8, 0x1122334455667788)
    assert (mem.read8(8), mem.read16(8), mem.read32(8), mem.read32(12)) == (
        0x88,
        0x7788,
        0x55667788,
        0x11223344,
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.read32(4096), "4-byte read at 0x1000 is outside the 4 KiB region"),
        (lambda r: r.read32(-4), "outside"),
        (lambda r: r.write16(4095, 0), "outside"),
        (lambda r: r.read32(2), "not 4-byte aligned"),
        (lambda r: r.write64(4, 0), "not 8-byte aligned"),
        (lambda r: r.write32(0, 1 << 32), "does not fit in 32 bits"),
        (lambda r: r.write8(0, -1), "does not fit in 8 bits"),
        (lambda r: r.read(0, 3), "bad access width 3"),
    ],
)
def test_bad_access_is_a_clear_error(mem: MmioRegion, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RegionError, match=message):
        call(mem)


def test_read_only_region_refuses_writes() -> None:
    r = MmioRegion(bytearray(64), name="ROM", writable=False)
    with pytest.raises(RegionError, match="ROM is read-only"):
        r.write32(0, 1)
    assert r.read32(0) == 0


def test_rmw_helpers_and_write1c() -> None:
    rec = RecordingRegion(16)
    rec.write32(0, 0b1010)
    rec.set_bits(0, 0b0001)
    rec.clear_bits(0, 0b1000)
    assert rec.read32(0) == 0b0011
    rec.log.clear()
    rec.write1c(0, 0b0010)
    assert rec.log == [("w", 0, 4, 0b0010)]  # no read: a RMW would clear every set bit


def test_poll_timeout_names_register_mask_and_last_value(mem: MmioRegion) -> None:
    mem.write32(0x20, 0x81)
    assert mem.poll32(0x20, 0x80, 0x80, timeout=0.1) == 0x81
    with pytest.raises(
        PollTimeout,
        match=r"register STATUS \(0x20\) & 0x1 did not become 0x0 within 0.05 s \(last value 0x81\)",
    ):
        mem.poll32(0x20, 0x1, 0, timeout=0.05, name="STATUS")


def test_file_region_uses_one_pread_per_access() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(bytes(range(64)))
        f.flush()
        r = FileRegion(f.fileno(), name="config", size=32, base_offset=16)
        assert r.read32(0) == int.from_bytes(bytes(range(16, 20)), "little")
        r.write16(2, 0xBEEF)
        assert os.pread(f.fileno(), 2, 18) == b"\xef\xbe"
        with pytest.raises(RegionError, match="outside the 32 bytes region"):
            r.read32(32)


def test_recording_region_emulates_a_device() -> None:
    def on_write(offset: int, width: int, value: int) -> None:
        if offset == 4:  # like edu's liveness register
            rec.mem[4:8] = (~value & 0xFFFFFFFF).to_bytes(4, "little")

    rec = RecordingRegion(16, on_write=on_write)
    rec.write32(4, 0x0F0F0F0F)
    assert rec.read32(4) == 0xF0F0F0F0
    assert rec.log == [("w", 4, 4, 0x0F0F0F0F), ("r", 4, 4, 0xF0F0F0F0)]


def test_close_releases_the_mapping() -> None:
    m = mmap.mmap(-1, 4096)
    r = MmioRegion(m, name="t")
    r.read32(0)
    r.close()
    m.close()  # would raise BufferError if a view were still exported
