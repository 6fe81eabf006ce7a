"""Regions: a BAR, config space or any device window, with exact-width access.

``read8/16/32/64`` and ``write8/16/32/64`` are each exactly ONE access of that width:

- :class:`MmioRegion` keeps one ``memoryview.cast`` per width over the mapping, created once.
  Indexing a cast view reads or writes one naturally aligned item of that size with a single
  load or store (CPython copies ``itemsize`` bytes through a typed pointer for the native
  formats B/H/I/Q). Never ``struct.unpack_from`` on an mmap slice: python-periphery found that
  slicing copies the whole slice, producing wider or duplicate bus accesses.
- :class:`FileRegion` uses one ``pread``/``pwrite`` of exactly the width (VFIO regions that
  cannot be mapped, I/O-port BARs, config space); the kernel turns it into one access.

Little-endian throughout: PCI registers are little-endian and so are the hosts udrv runs on
(checked at import).
"""

from __future__ import annotations

import abc
import mmap
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from udrv.errors import PollTimeout, RegionError

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("udrv's register access assumes a little-endian host")

_FMT: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}
_MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class Region(abc.ABC):
    """A window of device registers or memory.

    Attributes:
        name: for messages, e.g. ``"BAR0 of 0000:00:04.0"``.
        size: in bytes.
        readable, writable: what the backend allows.
    """

    def __init__(self, name: str, size: int, *, readable: bool = True, writable: bool = True):
        self.name, self.size = name, size
        self.readable, self.writable = readable, writable

    # -- checks ----------------------------------------------------------------------------

    def _check(self, offset: int, width: int, write: bool) -> None:
        if write and not self.writable:
            raise RegionError(
                f"{self.name} is read-only: cannot write {width} bytes at {offset:#x}"
            )
        if not write and not self.readable:
            raise RegionError(
                f"{self.name} is write-only: cannot read {width} bytes at {offset:#x}"
            )
        if offset < 0 or offset + width > self.size:
            raise RegionError(
                f"{self.name}: {width}-byte {'write' if write else 'read'} at {offset:#x} is "
                f"outside the {_human(self.size)} region"
            )
        if offset % width:
            raise RegionError(
                f"{self.name}: {width}-byte access at {offset:#x} is not {width}-byte aligned"
            )

    @staticmethod
    def _check_value(value: int, width: int) -> None:
        if not 0 <= value <= _MAX[width]:
            raise RegionError(f"value {value:#x} does not fit in {width * 8} bits")

    # -- exact-width access --------------------------------------------------------------------

    @abc.abstractmethod
    def read(self, offset: int, width: int) -> int:
        """One ``width``-byte read (1, 2, 4 or 8)."""

    @abc.abstractmethod
    def write(self, offset: int, width: int, value: int) -> None:
        """One ``width``-byte write."""

    def read8(self, offset: int) -> int:
        return self.read(offset, 1)

    def read16(self, offset: int) -> int:
        return self.read(offset, 2)

    def read32(self, offset: int) -> int:
        return self.read(offset, 4)

    def read64(self, offset: int) -> int:
        return self.read(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self.write(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self.write(offset, 8, value)

    # -- bulk ----------------------------------------------------------------------------------

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out (access widths unspecified: memory, not registers)."""
        self._check(offset, 1, False)
        self._check(offset + length - 1 if length else offset, 1, False)
        return bytes(self.read(offset + i, 1) for i in range(length))

    def write_bytes(self, offset: int, data: bytes) -> None:
        """Copy ``data`` in (access widths unspecified: memory, not registers)."""
        for i, b in enumerate(data):
            self.write(offset + i, 1, b)

    # -- read-modify-write (explicit, never implied) ----------------------------------------

    def set_bits(self, offset: int, mask: int, width: int = 4) -> int:
        """Read, OR ``mask`` in, write back; returns the value written."""
        value = self.read(offset, width) | mask
        self.write(offset, width, value)
        return value

    def clear_bits(self, offset: int, mask: int, width: int = 4) -> int:
        """Read, clear ``mask``, write back; returns the value written."""
        value = self.read(offset, width) & ~mask
        self.write(offset, width, value)
        return value

    def modify(self, offset: int, clear: int, set_: int, width: int = 4) -> int:
        value = (self.read(offset, width) & ~clear) | set_
        self.write(offset, width, value)
        return value

    def write1c(self, offset: int, mask: int, width: int = 4) -> None:
        """Clear write-1-to-clear bits: write just ``mask`` (a RMW would clear every set bit)."""
        self.write(offset, width, mask)

    set_bits32 = set_bits
    clear_bits32 = clear_bits

    # -- polling -----------------------------------------------------------------------------

    def poll(
        self,
        offset: int,
        mask: int,
        value: int,
        *,
        timeout: float,
        width: int = 4,
        interval: float = 0.0,
        name: str | None = None,
    ) -> int:
        """Wait until ``read(offset) & mask == value``; returns the last value read.

        Raises:
            PollTimeout: naming the register, mask, expected and last value.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(offset, width)
            if got & mask == value:
                return got
            if time.monotonic() > deadline:
                reg = f"{name} ({offset:#x})" if name else f"{offset:#x}"
                raise PollTimeout(
                    f"{self.name}: register {reg} & {mask:#x} did not become {value:#x} within "
                    f"{timeout:g} s (last value {got:#x})"
                )
            if interval:
                time.sleep(interval)

    def poll32(self, offset: int, mask: int, value: int, *, timeout: float, **kw: Any) -> int:
        return self.poll(offset, mask, value, timeout=timeout, width=4, **kw)

    def close(self) -> None:  # noqa: B027 - optional for subclasses
        """Release the mapping or file; further access raises."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {_human(self.size)}>"


class MmioRegion(Region):
    """A memory-mapped window; each access is one load/store of the requested width."""

    def __init__(
        self,
        buffer: mmap.mmap | bytearray | memoryview,
        *,
        name: str,
        size: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        base = memoryview(buffer)
        size = len(base) - offset if size is None else size
        super().__init__(name, size, readable=readable, writable=writable)
        self._buffer = buffer
        self._base = base[offset : offset + size]
        if offset % 8:
            raise RegionError(f"{name}: mapping offset {offset:#x} is not 8-byte aligned")
        # One view per width, made once; len(view) * width may be < size for odd sizes.
        self._views = {w: self._base[: size - size % w].cast(_FMT[w]) for w in _FMT}
        self._on_close = on_close
        self._make_accessors()

    def read(self, offset: int, width: int) -> int:
        try:
            return self._readers[width](offset)
        except KeyError:
            raise RegionError(f"{self.name}: bad access width {width}; use 1, 2, 4 or 8") from None

    def write(self, offset: int, width: int, value: int) -> None:
        try:
            writer = self._writers[width]
        except KeyError:
            raise RegionError(f"{self.name}: bad access width {width}; use 1, 2, 4 or 8") from None
        writer(offset, value)

    def _reject(self, offset: int, width: int, write: bool) -> int:
        self._check(offset, width, write)  # raises with the full message
        raise RegionError(f"{self.name}: bad {width}-byte access at {offset:#x}")

    def _make_accessors(self) -> None:
        """Per-width closures, installed as ``read8``... ``write64`` on the instance: the hot
        path is one range check and one indexed load or store, no attribute lookups."""
        self._readers: dict[int, Callable[[int], int]] = {}
        self._writers: dict[int, Callable[[int, int], None]] = {}
        pow2 = self.size & (self.size - 1) == 0
        for width, view in self._views.items():
            shift = width.bit_length() - 1
            # BARs are powers of two: then one AND finds a negative, out-of-range or unaligned
            # offset (negative ints have all high bits set). Otherwise a range check.
            bad = ~(self.size - 1) | (width - 1) if pow2 else None

            read: Callable[[int], int]
            write: Callable[[int, int], None]
            if not self.readable:

                def read(offset: int, w: int = width) -> int:
                    return self._reject(offset, w, False)
            elif bad is not None:

                def read(
                    offset: int, v: memoryview = view, b: int = bad, s: int = shift, w: int = width
                ) -> int:
                    if offset & b:
                        self._reject(offset, w, False)
                    return v[offset >> s]
            else:
                lim, m = self.size - width, width - 1

                def read(
                    offset: int, v: memoryview = view, m: int = m, lim: int = lim, s: int = shift
                ) -> int:
                    if offset & m or not 0 <= offset <= lim:
                        self._reject(offset, m + 1, False)
                    return v[offset >> s]

            if not self.writable:

                def write(offset: int, value: int, w: int = width) -> None:
                    self._reject(offset, w, True)
            else:
                ok = bad if bad is not None else None
                lim, m = self.size - width, width - 1

                def write(offset: int, value: int, v: memoryview = view, b: int | None = ok,
                          m: int = m, lim: int = lim, s: int = shift, w: int = width) -> None:  # fmt: skip
                    if (offset & b) if b is not None else (offset & m or not 0 <= offset <= lim):
                        self._reject(offset, w, True)
                    try:
                        v[offset >> s] = value
                    except (ValueError, TypeError, OverflowError):
                        self._check_value(value, w)
                        raise

            self._readers[width], self._writers[width] = read, write
            setattr(self, f"read{width * 8}", read)
            setattr(self, f"write{width * 8}", write)

    def read_bytes(self, offset: int, length: int) -> bytes:
        self._check_span(offset, length, False)
        return bytes(self._base[offset : offset + length])

    def write_bytes(self, offset: int, data: bytes) -> None:
        self._check_span(offset, len(data), True)
        self._base[offset : offset + len(data)] = data

    def _check_span(self, offset: int, length: int, write: bool) -> None:
        if (write and not self.writable) or (not write and not self.readable):
            self._check(offset, 1, write)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionError(
                f"{self.name}: {length} bytes at {offset:#x} overrun the {_human(self.size)} region"
            )

    def close(self) -> None:
        for w in (1, 2, 4, 8):  # drop the closures holding the views
            self.__dict__.pop(f"read{w * 8}", None)
            self.__dict__.pop(f"write{w * 8}", None)
        self._readers, self._writers = {}, {}
        views, self._views = self._views, {}
        for v in views.values():
            v.release()
        self._base.release()
        if self._on_close:
            self._on_close()
            self._on_close = None


class FileRegion(Region):
    """A window accessed with pread/pwrite on a file descriptor at ``base_offset``."""

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        size: int,
        base_offset: int = 0,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        super().__init__(name, size, readable=readable, writable=writable)
        self.fd, self.base_offset = fd, base_offset

    def read(self, offset: int, width: int) -> int:
        if width not in _FMT:
            raise RegionError(f"{self.name}: bad access width {width}; use 1, 2, 4 or 8")
        self._check(offset, width, False)
        try:
            data = os.pread(self.fd, width, self.base_offset + offset)
        except OSError as exc:
            raise RegionError(
                f"{self.name}: {width}-byte read at {offset:#x} failed", errno=exc.errno
            ) from None
        if len(data) != width:
            raise RegionError(
                f"{self.name}: {width}-byte read at {offset:#x} returned {len(data)} bytes"
            )
        return int.from_bytes(data, "little")

    def write(self, offset: int, width: int, value: int) -> None:
        if width not in _FMT:
            raise RegionError(f"{self.name}: bad access width {width}; use 1, 2, 4 or 8")
        self._check(offset, width, True)
        self._check_value(value, width)
        try:
            n = os.pwrite(self.fd, value.to_bytes(width, "little"), self.base_offset + offset)
        except OSError as exc:
            raise RegionError(
                f"{self.name}: {width}-byte write at {offset:#x} failed", errno=exc.errno
            ) from None
        if n != width:
            raise RegionError(f"{self.name}: {width}-byte write at {offset:#x} wrote {n} bytes")

    def read_bytes(self, offset: int, length: int) -> bytes:
        if length:
            self._check(offset, 1, False)
            self._check(offset + length - 1, 1, False)
        try:
            return os.pread(self.fd, length, self.base_offset + offset)
        except OSError as exc:
            raise RegionError(
                f"{self.name}: reading {length} bytes at {offset:#x} failed", errno=exc.errno
            ) from None


class RecordingRegion(Region):
    """A fake device window for host tests: records every access as (op, offset, width, value).

    ``on_write(offset, width, value)`` lets a test emulate the device's reaction; reads return
    what was last written (or ``initial``) unless ``on_read`` overrides.
    """

    def __init__(
        self,
        size: int,
        *,
        name: str = "fake",
        on_write: Callable[[int, int, int], None] | None = None,
        on_read: Callable[[int, int], int | None] | None = None,
    ) -> None:
        super().__init__(name, size)
        self.mem = bytearray(size)
        self.log: list[tuple[str, int, int, int]] = []
        self.on_write, self.on_read = on_write, on_read

    def read(self, offset: int, width: int) -> int:
        self._check(offset, width, False)
        value = self.on_read(offset, width) if self.on_read else None
        if value is None:
            value = int.from_bytes(self.mem[offset : offset + width], "little")
        self.log.append(("r", offset, width, value))
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width, True)
        self._check_value(value, width)
        self.log.append(("w", offset, width, value))
        self.mem[offset : offset + width] = value.to_bytes(width, "little")
        if self.on_write:
            self.on_write(offset, width, value)


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"
