"""Regions: a BAR, config space or any device window, with exact-width register access.

``read8/16/32/64`` and ``write8/16/32/64`` are each exactly ONE bus access of that width, at a
naturally aligned offset. Devices care: a 32-bit register read as four byte reads can return
a torn value, a wider write can clobber a neighbouring register, and a read can have side
effects (read-to-clear status registers), so a duplicated read loses events.

Implementations:

- :class:`MmioRegion`: a memory-mapped window (VFIO or sysfs ``resourceN`` mmap). It keeps one
  ``memoryview.cast`` per width, created once per mapping; each call indexes one of them once.
  Never ``struct.unpack_from`` on an mmap slice: python-periphery found that slicing copies
  the whole slice first (with whatever widths ``memcpy`` picks), then decodes the copy, which
  produced duplicate and wider bus accesses.
- :class:`FileRegion`: one ``pread``/``pwrite`` of exactly the width on a file descriptor (the
  VFIO config region, VFIO I/O-port BARs, sysfs ``config`` and I/O-port ``resourceN``); the
  kernel turns each into one access of that width.
- :class:`RecordingRegion`: a test double that records every access, optionally emulating
  a device's reaction to writes (PYNQ-style host tests of drivers).

Byte order: PCI registers are little-endian, and so are the hosts udrv runs on (checked at
import), so the cast views' native order is the device's order.

Bulk copies (:meth:`Region.read`, :meth:`Region.write`, :meth:`Region.read_into`) are for
memory-like areas (buffers, ROMs); the widths they use on the bus are unspecified.

Read-modify-write is never implied: :meth:`Region.set_bits`, :meth:`Region.clear_bits`,
:meth:`Region.modify` do it explicitly, and :meth:`Region.write1c` exists because a RMW of a
write-1-to-clear register clears every bit that happened to be set.
"""

from __future__ import annotations

import abc
import functools
import mmap
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, NamedTuple, NoReturn

from udrv.errors import PollTimeout, RegionError

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("udrv's register access assumes a little-endian host, like PCI")

Width = Literal[1, 2, 4, 8]
#: The access widths in bytes, and the memoryview format that has each as its native size.
WIDTHS: tuple[Width, ...] = (1, 2, 4, 8)
_FMT: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}
_MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
#: Default pause between two reads of :meth:`Region.poll` (seconds). The kernel's timer
#: slack makes a real sleep ~50-60 µs; pass ``interval=0`` to spin.
POLL_INTERVAL = 10e-6


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) else repr(value)


class Region(abc.ABC):
    """A window of device registers or memory: a BAR, config space, a ROM.

    Subclasses implement :meth:`read_width`, :meth:`write_width`, :meth:`read_into` and
    :meth:`write`; the named accessors, RMW helpers and polling are built on them (and
    :class:`MmioRegion` overrides the named accessors with faster ones).

    Attributes:
        name: for messages, e.g. ``"BAR0 of 0000:00:04.0"``.
        index: the BAR number (VFIO region index: 0-5 BARs, 6 ROM, 7 config), or ``None``.
        size: in bytes.
        readable, writable: what the backend allows; violations raise :class:`RegionError`.
        mappable: whether the window is memory-mapped (accesses are loads and stores) rather
            than reached through system calls.
    """

    mappable: bool = False

    def __init__(
        self,
        name: str,
        size: int,
        *,
        index: int | None = None,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        if size <= 0:
            raise RegionError(f"{name}: a region needs a positive size, not {size}")
        self.name, self.size, self.index = name, size, index
        self.readable, self.writable = readable, writable
        self._closed = False

    # -- checks (the slow path: only when something is wrong, or for the syscall backends) --

    def _problem(self, offset: int, width: int, op: str, value: object = None) -> str | None:
        """Why a ``width``-byte ``op`` ("read"/"write") at ``offset`` is refused, or None."""
        if self._closed:
            return f"{self.name} is closed: {width}-byte {op} at {_hex(offset)} refused"
        if width not in _MAX:
            return f"{self.name}: bad access width {width}; use 1, 2, 4 or 8 bytes"
        if op == "write" and not self.writable:
            return (
                f"{self.name} is read-only: {width}-byte write at {_hex(offset)} refused "
                "(the backend opened it without write access)"
            )
        if op == "read" and not self.readable:
            return f"{self.name} is write-only: {width}-byte read at {_hex(offset)} refused"
        if not isinstance(offset, int):
            return f"{self.name}: offset {offset!r} is not an int"
        if offset < 0 or offset + width > self.size:
            return (
                f"{self.name}: {width}-byte {op} at {_hex(offset)} is outside the "
                f"{_human(self.size)} region (offsets 0x0-{self.size - width:#x})"
            )
        if offset % width:
            return (
                f"{self.name}: {width}-byte {op} at {_hex(offset)} is not {width}-byte "
                f"aligned; use a multiple of {width}"
            )
        if op == "write" and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX[width]
        ):
            return (
                f"{self.name}: {width}-byte write at {_hex(offset)}: value {_hex(value)} "
                f"does not fit in {width * 8} bits (0 to {_MAX[width]:#x})"
            )
        return None

    def _check(self, offset: int, width: int, op: str, value: object = None) -> None:
        problem = self._problem(offset, width, op, value)
        if problem is not None:
            raise RegionError(problem)

    def _fail(self, offset: int, width: int, op: str, value: object = None) -> NoReturn:
        """Raise the RegionError that explains why an access failed (the fast paths call this
        after a cheap check or the memoryview itself refused)."""
        problem = self._problem(offset, width, op, value)
        raise RegionError(problem or f"{self.name}: {width}-byte {op} at {_hex(offset)} failed")

    def _check_span(self, offset: int, length: int, op: str) -> None:
        if self._closed:
            raise RegionError(f"{self.name} is closed: {length}-byte {op} refused")
        if op == "write" and not self.writable:
            raise RegionError(f"{self.name} is read-only: {length}-byte write refused")
        if op == "read" and not self.readable:
            raise RegionError(f"{self.name} is write-only: {length}-byte read refused")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionError(
                f"{self.name}: {length}-byte bulk {op} at {_hex(offset)} runs outside the "
                f"{_human(self.size)} region"
            )

    # -- exact-width access --------------------------------------------------------------

    @abc.abstractmethod
    def read_width(self, offset: int, width: int) -> int:
        """One ``width``-byte (1, 2, 4 or 8) little-endian read at ``offset``.

        Raises:
            RegionError: bad width, offset outside the region or not a multiple of the
                width, region closed or not readable.
        """

    @abc.abstractmethod
    def write_width(self, offset: int, width: int, value: int) -> None:
        """One ``width``-byte little-endian write of ``value`` at ``offset``.

        Raises:
            RegionError: as :meth:`read_width`, or ``value`` does not fit in the width, or the
                region is read-only.
        """

    def read8(self, offset: int) -> int:
        """One 8-bit read."""
        return self.read_width(offset, 1)

    def read16(self, offset: int) -> int:
        """One 16-bit read."""
        return self.read_width(offset, 2)

    def read32(self, offset: int) -> int:
        """One 32-bit read."""
        return self.read_width(offset, 4)

    def read64(self, offset: int) -> int:
        """One 64-bit read."""
        return self.read_width(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        """One 8-bit write."""
        self.write_width(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        """One 16-bit write."""
        self.write_width(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        """One 32-bit write."""
        self.write_width(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        """One 64-bit write."""
        self.write_width(offset, 8, value)

    # -- bulk copies (memory-like areas; bus access widths unspecified) ------------------

    @abc.abstractmethod
    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill the writable buffer ``buf`` with ``len(buf)`` bytes from ``offset``.

        Raises:
            RegionError: the span runs outside the region, or it is closed/not readable.
        """

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out from ``offset``.

        Raises:
            RegionError: the span runs outside the region, or it is closed/not readable.
        """
        self._check_span(offset, length, "read")
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    @abc.abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in at ``offset``.

        Raises:
            RegionError: the span runs outside the region, or it is closed/read-only.
        """

    # -- read-modify-write, always explicit ----------------------------------------------

    def set_bits(self, offset: int, mask: int, width: int = 4) -> int:
        """Read, OR ``mask`` in, write back (two accesses); returns the value written."""
        value = self.read_width(offset, width) | mask
        self.write_width(offset, width, value)
        return value

    def clear_bits(self, offset: int, mask: int, width: int = 4) -> int:
        """Read, clear the bits of ``mask``, write back; returns the value written."""
        value = self.read_width(offset, width) & ~mask
        self.write_width(offset, width, value)
        return value

    def modify(self, offset: int, clear: int, set: int, width: int = 4) -> int:
        """Read, clear ``clear``, OR ``set`` in, write back; returns the value written.

        The usual way to change a multi-bit field: ``modify(CTRL, SPEED_MASK, SPEED_1000)``.
        """
        value = (self.read_width(offset, width) & ~clear) | set
        self.write_width(offset, width, value)
        return value

    def write1c(self, offset: int, mask: int, width: int = 4) -> None:
        """Clear the write-1-to-clear (W1C/RW1C) bits in ``mask``: write just ``mask``.

        In a W1C register (interrupt causes, PCIe status bits) writing 1 clears a bit and
        writing 0 leaves it alone. A read-modify-write would write back every bit that reads
        as 1, clearing events the driver has not handled yet; so this is a single write of
        ``mask`` with no read.
        """
        self.write_width(offset, width, mask)

    def set_bits32(self, offset: int, mask: int) -> int:
        """:meth:`set_bits` on a 32-bit register."""
        return self.set_bits(offset, mask, 4)

    def clear_bits32(self, offset: int, mask: int) -> int:
        """:meth:`clear_bits` on a 32-bit register."""
        return self.clear_bits(offset, mask, 4)

    def modify32(self, offset: int, clear: int, set: int) -> int:
        """:meth:`modify` on a 32-bit register."""
        return self.modify(offset, clear, set, 4)

    def write1c32(self, offset: int, mask: int) -> None:
        """:meth:`write1c` on a 32-bit register."""
        self.write_width(offset, 4, mask)

    # -- polling -------------------------------------------------------------------------

    def poll(
        self,
        offset: int,
        mask: int,
        value: int,
        timeout: float,
        *,
        width: int = 4,
        interval: float = POLL_INTERVAL,
        name: str | None = None,
    ) -> int:
        """Read until ``read_width(offset, width) & mask == value``; returns the last value.

        The register is always read at least once after the deadline passed, so a
        descheduled caller does not time out on a device that did finish.

        Args:
            timeout: seconds until :class:`PollTimeout`.
            interval: seconds to sleep between reads (0 spins).
            name: the register's name, for the error message.

        Raises:
            PollTimeout: naming the region, register, mask, expected and last value.
            RegionError: a bad access, or ``value`` has bits outside ``mask`` (it could
                never match).
        """
        if value & ~mask:
            raise RegionError(
                f"{self.name}: polling {offset:#x} for {value:#x} under mask {mask:#x} can "
                "never succeed: the value has bits outside the mask"
            )
        read = self.read_width
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            got = read(offset, width)
            if got & mask == value:
                return got
            if now >= deadline:
                reg = f"{name} ({offset:#x})" if name else f"{offset:#x}"
                raise PollTimeout(
                    f"{self.name}: register {reg} & {mask:#x} did not become {value:#x} within "
                    f"{timeout:g} s (last value {got:#0{2 + 2 * width}x}); the device did not "
                    "finish: check it is enabled and not in reset"
                )
            if interval:
                time.sleep(interval)

    # One spelling per width, as read8..read64: ``poll32(offset, mask, value, timeout,
    # interval=..., name=...)`` is ``poll(..., width=4)``.
    poll8 = functools.partialmethod(poll, width=1)
    poll16 = functools.partialmethod(poll, width=2)
    poll32 = functools.partialmethod(poll, width=4)
    poll64 = functools.partialmethod(poll, width=8)

    # -- lifetime ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the mapping or file; further accesses raise :class:`RegionError`."""
        self._closed = True

    def __enter__(self) -> Region:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"<{type(self).__name__} {self.name}, {_human(self.size)}{state}>"


class MmioRegion(Region):
    """A memory-mapped window; each named accessor is one load or store of its width.

    Args:
        buffer: the mapping (``mmap.mmap``), or for tests a ``bytearray``/``memoryview``.
        name: for messages, e.g. ``"BAR0 of 0000:00:04.0"``.
        size: bytes of the window (default: the rest of ``buffer`` after ``offset``).
        offset: where the window starts in ``buffer``; a multiple of 8 so that every access
            is naturally aligned in memory as well as in the region.
        readable, writable: what is allowed; ``writable`` needs a writable buffer.
        index: the BAR/region index, if any.
        close_buffer: also close ``buffer`` (an mmap) in :meth:`close`.
        on_close: called at the end of :meth:`close`.

    Why one call is exactly one access (CPython 3.11, x86-64): indexing a 1-D memoryview of
    the native formats B/H/I/Q goes ``memory_subscript`` -> ``memory_item`` ->
    ``unpack_single``, which copies ``itemsize`` bytes with ``memcpy`` into a local of that C
    type; with a constant size the compiler emits one load. Storing goes ``memory_ass_sub``
    -> ``pack_single``, one ``memcpy`` from a typed local, one store. Disassembling this
    interpreter's libpython3.11 shows ``movzbl``/``movzwl``/``movl``/``movq`` loads in
    ``memory_item`` and 8/16/32/64-bit ``mov`` stores in ``pack_single``, so 64-bit is one
    access too. The C code is not ``volatile``, so this rests on what compilers do (nothing
    makes them split a register-sized copy), not on a language guarantee: the lab proves
    the widths with QEMU's ``memory_region_ops_read/write`` trace events. Natural alignment
    (checked on every call) also makes each access single-copy atomic on x86-64.
    """

    mappable = True

    def __init__(
        self,
        buffer: mmap.mmap | bytearray | memoryview,
        *,
        name: str,
        size: int | None = None,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
        index: int | None = None,
        close_buffer: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        root = memoryview(buffer)
        if root.ndim != 1 or root.itemsize != 1:
            root = root.cast("B")
        if size is None:
            size = len(root) - offset
        try:
            if offset < 0 or offset % 8 or size <= 0 or offset + size > len(root):
                raise RegionError(
                    f"{name}: a {size}-byte window at {offset:#x} does not fit in a "
                    f"{len(root)}-byte buffer (the offset must be a non-negative multiple of 8)"
                )
            if writable and root.readonly:
                raise RegionError(
                    f"{name}: writable=True but the mapping is read-only; map it with "
                    "PROT_WRITE or pass writable=False"
                )
        except RegionError:
            root.release()
            raise
        super().__init__(name, size, index=index, readable=readable, writable=writable)
        self._buffer = buffer if close_buffer else None
        self._on_close = on_close
        self._root = root
        self._base = root[offset : offset + size]
        # The views are made once, here. Writes go through ``_wN``: a read-only view when the
        # region is read-only, so the memoryview itself refuses (TypeError) at no cost to the
        # checked path. Reads of a write-only region go to a released view (ValueError).
        wbase = self._base if writable else self._base.toreadonly()
        self._views: list[memoryview] = [self._base, wbase]
        r: dict[int, memoryview] = {}
        w: dict[int, memoryview] = {}
        for width, fmt in _FMT.items():
            # cast needs a length that is a multiple of the item size; the tail of an odd
            # size is unreachable at that width anyway (offset + width > size).
            usable = size - size % width
            w[width] = wbase[:usable].cast(fmt)
            if readable:
                r[width] = self._base[:usable].cast(fmt)
            else:
                r[width] = memoryview(b"").cast(fmt)
                r[width].release()
            self._views += [r[width], w[width]]
        self._r1, self._r2, self._r4, self._r8 = r[1], r[2], r[4], r[8]
        self._w1, self._w2, self._w4, self._w8 = w[1], w[2], w[4], w[8]
        # One AND rejects a negative offset (negative ints have all high bits set), one at or
        # beyond the next power of two >= size, and an unaligned one. Between size and that
        # power of two the view itself raises IndexError. BARs are powers of two, so for
        # them this mask is the whole bounds check.
        span = 1 << (size - 1).bit_length()
        self._bad1 = ~(span - 1)
        self._bad2 = ~(span - 1) | 1
        self._bad4 = ~(span - 1) | 3
        self._bad8 = ~(span - 1) | 7

    # The hot path: an AND, a shift, one index of a cast view. Everything that can go wrong
    # (closed, read-only, bad value, past the end) makes the memoryview raise, and only then
    # does _fail() work out which it was. try costs nothing in 3.11 when nothing is raised.

    def read8(self, offset: int) -> int:
        if offset & self._bad1:
            self._fail(offset, 1, "read")
        try:
            return self._r1[offset]
        except (IndexError, ValueError):
            self._fail(offset, 1, "read")

    def read16(self, offset: int) -> int:
        if offset & self._bad2:
            self._fail(offset, 2, "read")
        try:
            return self._r2[offset >> 1]
        except (IndexError, ValueError):
            self._fail(offset, 2, "read")

    def read32(self, offset: int) -> int:
        if offset & self._bad4:
            self._fail(offset, 4, "read")
        try:
            return self._r4[offset >> 2]
        except (IndexError, ValueError):
            self._fail(offset, 4, "read")

    def read64(self, offset: int) -> int:
        if offset & self._bad8:
            self._fail(offset, 8, "read")
        try:
            return self._r8[offset >> 3]
        except (IndexError, ValueError):
            self._fail(offset, 8, "read")

    def write8(self, offset: int, value: int) -> None:
        if offset & self._bad1:
            self._fail(offset, 1, "write", value)
        try:
            self._w1[offset] = value
        except (IndexError, ValueError, TypeError):
            self._fail(offset, 1, "write", value)

    def write16(self, offset: int, value: int) -> None:
        if offset & self._bad2:
            self._fail(offset, 2, "write", value)
        try:
            self._w2[offset >> 1] = value
        except (IndexError, ValueError, TypeError):
            self._fail(offset, 2, "write", value)

    def write32(self, offset: int, value: int) -> None:
        if offset & self._bad4:
            self._fail(offset, 4, "write", value)
        try:
            self._w4[offset >> 2] = value
        except (IndexError, ValueError, TypeError):
            self._fail(offset, 4, "write", value)

    def write64(self, offset: int, value: int) -> None:
        if offset & self._bad8:
            self._fail(offset, 8, "write", value)
        try:
            self._w8[offset >> 3] = value
        except (IndexError, ValueError, TypeError):
            self._fail(offset, 8, "write", value)

    def read_width(self, offset: int, width: int) -> int:
        if width == 4:
            return self.read32(offset)
        if width == 1:
            return self.read8(offset)
        if width == 2:
            return self.read16(offset)
        if width == 8:
            return self.read64(offset)
        self._fail(offset, width, "read")

    def write_width(self, offset: int, width: int, value: int) -> None:
        if width == 4:
            self.write32(offset, value)
        elif width == 1:
            self.write8(offset, value)
        elif width == 2:
            self.write16(offset, value)
        elif width == 8:
            self.write64(offset, value)
        else:
            self._fail(offset, width, "write", value)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        dst = memoryview(buf).cast("B")
        self._check_span(offset, len(dst), "read")
        dst[:] = self._base[offset : offset + len(dst)]

    def read(self, offset: int, length: int) -> bytes:
        self._check_span(offset, length, "read")
        return bytes(self._base[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self._check_span(offset, len(src), "write")
        self._base[offset : offset + len(src)] = src

    def close(self) -> None:
        """Release every view, then (with ``close_buffer``) the mmap; safe to call twice.

        All the views share one export of the buffer, which lasts until the last of them is
        released; an mmap with a live export cannot be closed (``BufferError``), which is why
        the views go first. Accessors called afterwards raise :class:`RegionError`.
        """
        if self._closed:
            return
        self._closed = True
        for view in self._views:
            view.release()
        self._root.release()
        if self._buffer is not None and isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
        self._buffer = None
        if self._on_close is not None:
            hook, self._on_close = self._on_close, None
            hook()


class FileRegion(Region):
    """A window reached with ``pread``/``pwrite`` at ``base_offset`` of a file descriptor.

    Each named accessor is one system call of exactly the width, which the kernel (vfio-pci's
    region rw, sysfs ``config``/``resourceN`` of I/O BARs) turns into one access of that width.
    The fd belongs to the caller: :meth:`close` does not close it.
    """

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        size: int,
        base_offset: int = 0,
        readable: bool = True,
        writable: bool = True,
        index: int | None = None,
    ) -> None:
        super().__init__(name, size, index=index, readable=readable, writable=writable)
        self.fd, self.base_offset = fd, base_offset

    def read_width(self, offset: int, width: int) -> int:
        self._check(offset, width, "read")
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

    def write_width(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width, "write", value)
        try:
            n = os.pwrite(self.fd, value.to_bytes(width, "little"), self.base_offset + offset)
        except OSError as exc:
            raise RegionError(
                f"{self.name}: {width}-byte write at {offset:#x} failed", errno=exc.errno
            ) from None
        if n != width:
            raise RegionError(f"{self.name}: {width}-byte write at {offset:#x} wrote {n} bytes")

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        dst = memoryview(buf).cast("B")
        self._check_span(offset, len(dst), "read")
        done = 0
        while done < len(dst):
            try:
                n = os.preadv(self.fd, [dst[done:]], self.base_offset + offset + done)
            except OSError as exc:
                raise RegionError(
                    f"{self.name}: reading {len(dst)} bytes at {offset:#x} failed",
                    errno=exc.errno,
                ) from None
            if n == 0:
                raise RegionError(
                    f"{self.name}: reading {len(dst)} bytes at {offset:#x} stopped after "
                    f"{done} (sysfs shows non-root users only the first 64 bytes of config "
                    "space: run as root)"
                )
            done += n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self._check_span(offset, len(src), "write")
        done = 0
        while done < len(src):
            try:
                n = os.pwrite(self.fd, src[done:], self.base_offset + offset + done)
            except OSError as exc:
                raise RegionError(
                    f"{self.name}: writing {len(src)} bytes at {offset:#x} failed",
                    errno=exc.errno,
                ) from None
            if n == 0:
                raise RegionError(
                    f"{self.name}: writing {len(src)} bytes at {offset:#x} stopped after {done}"
                )
            done += n


class Access(NamedTuple):
    """One access seen by a :class:`RecordingRegion`.

    ``op`` is ``"r"``/``"w"`` for an exact-width access (``width`` in bytes, ``value`` an int)
    or ``"read"``/``"write"`` for a bulk copy (``width`` is the length, ``value`` the bytes).
    Compares equal to a plain tuple: ``log == [("w", 0x20, 4, 0x80)]``.
    """

    op: str
    offset: int
    width: int
    value: int | bytes


class RecordingRegion(Region):
    """A test double: records every access as an :class:`Access` in :attr:`log`.

    ``RecordingRegion(4096)`` is a fake device window backed by zeroed memory (:attr:`mem`,
    which tests may preload); ``RecordingRegion(region)`` wraps and records a real one.
    All the checks of a real region apply (bounds, alignment, value range, read-only).

    Args:
        target: a size for a memory-backed fake, or the Region to wrap.
        on_write: ``on_write(offset, width, value)`` runs after each exact-width write is
            stored: emulate the device here (set a status bit, invert a value...).
        on_read: ``on_read(offset, width)`` may return the value a read sees (recorded as
            such) or ``None`` to read the memory.
    """

    def __init__(
        self,
        target: int | Region,
        *,
        name: str | None = None,
        readable: bool = True,
        writable: bool = True,
        on_write: Callable[[int, int, int], None] | None = None,
        on_read: Callable[[int, int], int | None] | None = None,
    ) -> None:
        self._mem: bytearray | None = None
        if isinstance(target, Region):
            self.target = target
            readable, writable = readable and target.readable, writable and target.writable
        else:
            self._mem = bytearray(target)
            self.target = MmioRegion(self._mem, name=name or "fake")
        super().__init__(
            name or self.target.name,
            self.target.size,
            index=self.target.index,
            readable=readable,
            writable=writable,
        )
        self.mappable = self.target.mappable
        self.log: list[Access] = []
        self.on_write, self.on_read = on_write, on_read

    @property
    def mem(self) -> bytearray:
        """The backing memory of a fake made from a size (writable: preload it)."""
        if self._mem is None:
            raise RegionError(f"{self.name}: a RecordingRegion wrapping a region has no mem")
        return self._mem

    def read_width(self, offset: int, width: int) -> int:
        self._check(offset, width, "read")
        value = self.on_read(offset, width) if self.on_read else None
        if value is None:
            value = self.target.read_width(offset, width)
        self.log.append(Access("r", offset, width, value))
        return value

    def write_width(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width, "write", value)
        self.log.append(Access("w", offset, width, value))
        self.target.write_width(offset, width, value)
        if self.on_write:
            self.on_write(offset, width, value)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        n = memoryview(buf).nbytes
        self._check_span(offset, n, "read")
        self.target.read_into(offset, buf)
        self.log.append(Access("read", offset, n, bytes(buf)))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        self._check_span(offset, len(data), "write")
        self.log.append(Access("write", offset, len(data), data))
        self.target.write(offset, data)

    def writes(self) -> list[tuple[int, int, int]]:
        """The exact-width writes so far as (offset, width, value)."""
        return [
            (a.offset, a.width, a.value)
            for a in self.log
            if a.op == "w" and isinstance(a.value, int)
        ]

    def close(self) -> None:
        """Close; a wrapped region stays open (its owner closes it), a fake's memory goes."""
        if not self._closed:
            super().close()
            if self._mem is not None:
                self.target.close()
