"""Backends: how a :class:`~udrv.core.device.Device` reaches the hardware (VFIO, UIO, sysfs).

This module holds the region kinds the backends share on top of :mod:`udrv.core.region`:

- :class:`ConfigRegion`: config space through a file (sysfs ``config``, the VFIO config
  region). Accesses are 1, 2 or 4 bytes: a configuration request carries at most one DW
  (PCI Local Bus 3.0 §3.2.2.3.2, PCIe Base 4.0 §2.2.7), and both kernel paths would split a
  64-bit access into two 32-bit ones, so ``read64`` is refused instead of silently torn.
- :class:`PortRegion`: an I/O-port BAR through ``pread``/``pwrite`` (sysfs ``resourceN``, the
  VFIO region). x86 ``IN``/``OUT`` move at most 32 bits, so again no 64-bit access.
- :class:`SparseRegion`: a memory BAR of which only some areas may be mmapped (VFIO's
  ``VFIO_REGION_INFO_CAP_SPARSE_MMAP``: typically the MSI-X table is carved out). Each access
  goes to the mapping that covers it, else through the file: still one access per call.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

from udrv.core.region import FileRegion, MmioRegion, Region
from udrv.errors import RegionError


class _DwordFileRegion(FileRegion):
    """A FileRegion whose bus accesses are at most 32 bits wide."""

    #: what to call the region in the 64-bit refusal
    kind = "this region"

    def _refuse64(self, offset: int, op: str) -> RegionError:
        return RegionError(
            f"{self.name}: 8-byte {op} at {offset:#x} refused: {self.kind} takes 1, 2 or "
            "4-byte accesses (the kernel would split a 64-bit one into two)"
        )

    def read_width(self, offset: int, width: int) -> int:
        if width == 8:
            raise self._refuse64(offset, "read")
        return super().read_width(offset, width)

    def write_width(self, offset: int, width: int, value: int) -> None:
        if width == 8:
            raise self._refuse64(offset, "write")
        super().write_width(offset, width, value)


class ConfigRegion(_DwordFileRegion):
    """Config space through a file descriptor; 8, 16 and 32-bit accesses."""

    kind = "config space"

    def read_width(self, offset: int, width: int) -> int:
        if width == 8:
            raise self._refuse64(offset, "read")
        self._check(offset, width, "read")
        try:
            data = os.pread(self.fd, width, self.base_offset + offset)
        except OSError as exc:
            raise RegionError(
                f"{self.name}: {width}-byte read at {offset:#x} failed", errno=exc.errno
            ) from None
        if not data:
            # sysfs gives unprivileged readers only the first 64 bytes (pci-sysfs.c
            # pci_read_config: "size = dev->cfg_size" only with CAP_SYS_ADMIN), then EOF.
            raise RegionError(
                f"{self.name}: {width}-byte read at {offset:#x} is beyond what the kernel "
                "lets this user read (64 bytes unless privileged); run as root"
            )
        if len(data) != width:
            raise RegionError(
                f"{self.name}: {width}-byte read at {offset:#x} returned {len(data)} bytes"
            )
        return int.from_bytes(data, "little")


class PortRegion(_DwordFileRegion):
    """An I/O-port BAR: each access is one ``IN``/``OUT`` of 8, 16 or 32 bits.

    Bulk copies are done one byte at a time (the sysfs I/O resource files accept only
    1, 2 or 4-byte reads and writes).
    """

    kind = "an I/O-port BAR"

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        dst = memoryview(buf).cast("B")
        self._check_span(offset, len(dst), "read")
        for i in range(len(dst)):
            dst[i] = self.read_width(offset + i, 1)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self._check_span(offset, len(src), "write")
        for i, byte in enumerate(src):
            self.write_width(offset + i, 1, byte)


class SparseRegion(Region):
    """A BAR that is partly mmapped: accesses inside an area go to that mapping, the rest
    through ``fallback`` (pread/pwrite on the VFIO device fd).

    Args:
        name, size, index, readable, writable: as :class:`Region`.
        areas: ``(offset, region)`` pairs: mapped windows at those offsets, not overlapping.
            They are closed with this region.
        fallback: the whole BAR reached through system calls (not closed here: its fd
            belongs to the device).
    """

    mappable = False  # only partly: see ``areas``

    def __init__(
        self,
        name: str,
        size: int,
        *,
        areas: Sequence[tuple[int, MmioRegion]],
        fallback: Region,
        index: int | None = None,
        readable: bool = True,
        writable: bool = True,
    ) -> None:
        super().__init__(name, size, index=index, readable=readable, writable=writable)
        ordered = sorted(areas, key=lambda a: a[0])
        end = 0
        for start, region in ordered:
            if start < end or start + region.size > size:
                raise RegionError(
                    f"{name}: mmap area at {start:#x} (+{region.size:#x}) overlaps another "
                    f"or runs past the {size:#x}-byte region"
                )
            end = start + region.size
        self.areas: list[tuple[int, MmioRegion]] = ordered
        self._starts = [start for start, _ in ordered]
        self.fallback = fallback

    def _route(self, offset: int, length: int) -> tuple[Region, int, int]:
        """(region, offset in it, bytes it covers from ``offset``, at most ``length``)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            start, region = self.areas[i]
            if offset < start + region.size:
                return region, offset - start, min(length, start + region.size - offset)
        nxt = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        return self.fallback, offset, min(length, nxt - offset)

    def read_width(self, offset: int, width: int) -> int:
        self._check(offset, width, "read")
        region, at, n = self._route(offset, width)
        # Areas are page-aligned and accesses naturally aligned, so one never straddles.
        return (
            region.read_width(at, width) if n == width else self.fallback.read_width(offset, width)
        )

    def write_width(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width, "write", value)
        region, at, n = self._route(offset, width)
        if n == width:
            region.write_width(at, width, value)
        else:
            self.fallback.write_width(offset, width, value)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        dst = memoryview(buf).cast("B")
        self._check_span(offset, len(dst), "read")
        done = 0
        while done < len(dst):
            region, at, n = self._route(offset + done, len(dst) - done)
            region.read_into(at, dst[done : done + n])
            done += n

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self._check_span(offset, len(src), "write")
        done = 0
        while done < len(src):
            region, at, n = self._route(offset + done, len(src) - done)
            region.write(at, src[done : done + n])
            done += n

    def close(self) -> None:
        """Unmap the areas; further accesses raise :class:`RegionError`."""
        if not self._closed:
            self._closed = True
            for _, region in self.areas:
                region.close()
            self.fallback.close()
