"""The vfio-user backend: a :class:`~udrv.core.device.Device` served by a vfio-user server
(``udrv.open("vfio-user:/tmp/edu.sock")``), such as a device model from ``udrv emulate``.

Config space and trapped BARs go through REGION_READ/REGION_WRITE (one message per access,
of exactly the access's width); a BAR the server offers with a file descriptor is mmapped
(whole, or the areas of its sparse-mmap capability). Interrupts are eventfds handed over
in SET_IRQS (:mod:`udrv.irq.vfio_user`), DMA memory is memfd-backed and handed over in
DMA_MAP (:mod:`udrv.dma.vfio_user`). No root, no kernel VFIO.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

from udrv.core.device import Device, RegionInfo, RegionKind
from udrv.core.dma import Dma
from udrv.core.interrupts import Interrupts
from udrv.core.region import MmioRegion, Region
from udrv.dma.vfio_user import VfioUserDma
from udrv.errors import RegionError, VfioUserError
from udrv.irq.vfio_user import VfioUserInterrupts
from udrv.kernel import vfio as V
from udrv.vfio_user import protocol as P
from udrv.vfio_user.client import Client

#: The selector prefix that picks this backend.
SCHEME = "vfio-user:"


class SocketRegion(Region):
    """A region reached with REGION_READ/REGION_WRITE messages: one message per access,
    carrying exactly the access's width (the server performs one access of that width)."""

    def __init__(self, client: Client, index: int, *, name: str, size: int) -> None:
        super().__init__(name, size, index=index)
        self.client = client

    def read_width(self, offset: int, width: int) -> int:
        self._check(offset, width, "read")
        return int.from_bytes(self._io(lambda: self.client.region_read(self.index or 0, offset, width), offset, width, "read"), "little")  # fmt: skip

    def write_width(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width, "write", value)
        data = value.to_bytes(width, "little")
        self._io(lambda: self.client.region_write(self.index or 0, offset, data), offset, width, "write")  # fmt: skip

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        dst = memoryview(buf).cast("B")
        self._check_span(offset, len(dst), "read")
        if len(dst):
            dst[:] = self._io(lambda: self.client.region_read(self.index or 0, offset, len(dst)), offset, len(dst), "read")  # fmt: skip

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        src = bytes(memoryview(data).cast("B"))
        self._check_span(offset, len(src), "write")
        if src:
            self._io(lambda: self.client.region_write(self.index or 0, offset, src), offset, len(src), "write")  # fmt: skip

    def _io(self, fn: Any, offset: int, n: int, op: str) -> Any:
        try:
            return fn()
        except VfioUserError as exc:
            raise RegionError(f"{self.name}: {n}-byte {op} at {offset:#x} failed: {exc}") from None


class VfioUserDevice(Device):
    """A device behind a vfio-user server.

    Args:
        path: the server's Unix socket.
        timeout: seconds each request may take.

    Raises:
        VfioUserError: cannot connect (the message says how to start a server), or the
            server's device is not a PCI device.
    """

    backend = "vfio-user"

    def __init__(
        self, path: str, *, timeout: float = 5.0, dma_mask_bits: int | None = None
    ) -> None:
        super().__init__(f"{SCHEME}{path}")
        self.path = path
        self.client = Client(path, timeout=timeout)
        try:
            info = self.client.device_info()
            if not info.flags & V.VFIO_DEVICE_FLAGS_PCI:
                raise VfioUserError(
                    f"{self.address}: the server's device is not a PCI device "
                    f"(DEVICE_GET_INFO flags {info.flags:#x})"
                )
            self.device_flags = int(info.flags)
            self.num_regions, self.num_irqs = int(info.num_regions), int(info.num_irqs)
            cfg_info, _, fd = self.client.region_info(V.VfioPciRegion.CONFIG)
            if fd is not None:
                os.close(fd)
            if cfg_info.size < 64:
                raise VfioUserError(
                    f"{self.address}: config space region is {cfg_info.size} bytes (need 256)"
                )
        except BaseException:
            self.client.close()
            raise
        self._config = SocketRegion(
            self.client, V.VfioPciRegion.CONFIG, name=f"config space of {self.address}",
            size=int(cfg_info.size),
        )  # fmt: skip
        self._bars: dict[int, Region] = {}
        self._infos: dict[int, RegionInfo] = {}
        if dma_mask_bits is not None:
            try:
                self.dma._set_mask(dma_mask_bits, f"udrv.open(dma_mask_bits={dma_mask_bits})")
            except BaseException:
                self.close()
                raise

    @property
    def config(self) -> Region:
        return self._config

    def _open_interrupts(self) -> Interrupts:
        return VfioUserInterrupts(self, self.client)

    def _open_dma(self) -> Dma:
        return VfioUserDma(self, self.client)

    def region_info(self, index: int) -> RegionInfo:
        if index in self._infos:
            return self._infos[index]
        if not 0 <= index <= 5:
            raise RegionError(f"{self.address}: BAR{index} does not exist (BARs are 0-5)")
        try:
            info, payload, fd = self.client.region_info(index)
        except VfioUserError as exc:
            raise RegionError(f"{self.address}: cannot describe BAR{index}: {exc}") from None
        if fd is not None:
            os.close(fd)
        if info.size == 0:
            raise RegionError(f"{self.address}: BAR{index} is not implemented by the device")
        bar_reg = self.config.read32(0x10 + 4 * index)
        io = bool(bar_reg & 0x1)
        flags = int(info.flags)
        areas = tuple(_sparse_areas(payload, info))
        result = RegionInfo(
            index=index,
            kind=RegionKind.IO if io else RegionKind.MEMORY,
            size=int(info.size),
            readable=bool(flags & V.VFIO_REGION_INFO_FLAG_READ),
            writable=bool(flags & V.VFIO_REGION_INFO_FLAG_WRITE),
            mappable=bool(flags & V.VFIO_REGION_INFO_FLAG_MMAP),
            is_64bit=not io and (bar_reg & 0x6) == 0x4,
            prefetchable=not io and bool(bar_reg & 0x8),
            mmap_areas=areas,
        )
        self._infos[index] = result
        return result

    def bar(self, index: int) -> Region:
        if index in self._bars:
            return self._bars[index]
        info = self.region_info(index)
        name = f"BAR{index} of {self.address}"
        region: Region = SocketRegion(self.client, index, name=name, size=info.size)
        if info.mappable and not info.mmap_areas:
            mapped = self._mmap_whole(index, name, info)
            if mapped is not None:
                region.close()
                region = mapped
        self._bars[index] = region
        return region

    def _mmap_whole(self, index: int, name: str, info: RegionInfo) -> Region | None:
        """The BAR mmapped from the fd the server sends with its region info, if it does."""
        raw, _, fd = self.client.region_info(index)
        if fd is None:
            return None
        try:
            prot = (mmap.PROT_READ if info.readable else 0) | (mmap.PROT_WRITE if info.writable else 0)  # fmt: skip
            mem = mmap.mmap(fd, info.size, mmap.MAP_SHARED, prot, offset=int(raw.offset))
        except (OSError, ValueError) as exc:
            raise RegionError(f"{name}: cannot mmap the server's fd: {exc}") from None
        finally:
            os.close(fd)
        return MmioRegion(mem, name=name, index=index, readable=info.readable, writable=info.writable, close_buffer=True)  # fmt: skip

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET.

        Raises:
            VfioUserError: the server cannot reset the device or refused.
        """
        if not self.device_flags & V.VFIO_DEVICE_FLAGS_RESET:
            raise VfioUserError(f"{self.address}: the server's device does not support reset")
        self.client.reset()

    def _close(self) -> None:
        for region in self._bars.values():
            with contextlib.suppress(Exception):
                region.close()
        self._bars.clear()
        self._config.close()
        self.client.close()


def _sparse_areas(payload: bytes, info: P.vfio_region_info) -> list[tuple[int, int]]:
    """The (offset, size) areas of a VFIO_REGION_INFO_CAP_SPARSE_MMAP capability, if any.

    A BAR with sparse areas is still reached through messages as a whole (correct, if
    slower than mapping the areas).
    """
    if not info.flags & V.VFIO_REGION_INFO_FLAG_CAPS or not info.cap_offset:
        return []
    try:
        for cap in V.capabilities(payload, int(info.cap_offset)):
            if cap.id == V.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                return V.sparse_mmap_areas(payload, cap)[:64]
    except ValueError:
        pass  # a broken chain: treat the region as unmappable
    return []
