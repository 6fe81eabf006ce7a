"""The device-model framework: a PCI function in Python, served over vfio-user.

A model declares its identity and BARs, handles BAR reads and writes by offset and width,
raises interrupts and reaches the driver's memory through the :class:`Host` (the vfio-user
server, or a test double). Long-running device work (a factorial, a DMA transfer, an NVMe
command) runs on the model's worker thread via :meth:`PciModel.defer`, like a device that
works while the CPU goes on; every entry point takes :attr:`PciModel.lock`.

    class Counter(PciModel):
        name = "counter"

        def __init__(self) -> None:
            super().__init__(ConfigSpace(vendor_id=0x1234, device_id=0x0001, class_code=0xFF0000))
            self.add_bar(0, 4096, read=self.mmio_read, write=self.mmio_write)
            self.config.add_msi(1)
            self.count = 0
            self.seal()

        def mmio_read(self, offset: int, width: int) -> int: ...
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from udrv.errors import ModelError
from udrv.kernel.vfio import VfioPciIrq, VfioPciRegion
from udrv.models.pci import (
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    BarLayout,
    ConfigSpace,
)
from udrv.pci.config import PCI_INTERRUPT_PIN

ReadHandler = Callable[[int, int], int]
WriteHandler = Callable[[int, int, int], None]


class Host(Protocol):
    """What a model needs from whoever serves it (the vfio-user server)."""

    def signal(self, index: int, vector: int) -> None:
        """Deliver one MSI (index 1) or MSI-X (index 2) message for ``vector``."""

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line (level-triggered)."""

    def dma_read(self, addr: int, size: int) -> bytes:
        """Read the driver's memory at DMA address ``addr``; raises ModelError if unmapped."""

    def dma_write(self, addr: int, data: bytes) -> None:
        """Write the driver's memory at DMA address ``addr``; raises ModelError if unmapped."""


class DetachedHost:
    """A host with no driver attached: interrupts go nowhere, DMA fails."""

    def signal(self, index: int, vector: int) -> None:
        pass

    def set_intx(self, level: bool) -> None:
        pass

    def dma_read(self, addr: int, size: int) -> bytes:
        raise ModelError(f"DMA read of {size} bytes at {addr:#x}: no driver memory is mapped")

    def dma_write(self, addr: int, data: bytes) -> None:
        raise ModelError(f"DMA write of {len(data)} bytes at {addr:#x}: no driver memory is mapped")


@dataclass
class Bar:
    """A BAR of the model: its layout and the handlers of its registers, or (a RAM BAR)
    the shared memory behind it, which the server offers the client to mmap."""

    layout: BarLayout
    read: ReadHandler
    write: WriteHandler
    memory: mmap.mmap | None = None
    fd: int = -1


def split_access(offset: int, count: int) -> list[tuple[int, int]]:
    """(offset, width) accesses covering ``count`` bytes at ``offset``: one access when the
    span is a naturally aligned 1/2/4/8 bytes, else aligned dwords with bytes at the edges."""
    if count in (1, 2, 4, 8) and offset % count == 0:
        return [(offset, count)]
    out = []
    end = offset + count
    while offset < end:
        width = 4 if offset % 4 == 0 and end - offset >= 4 else 1
        out.append((offset, width))
        offset += width
    return out


class PciModel:
    """Base class of device models. Subclasses build the config space and BARs in
    ``__init__`` (then call :meth:`seal`) and override :meth:`reset`.

    Attributes:
        name: the model's name (``udrv emulate NAME``).
        config: the :class:`~udrv.models.pci.ConfigSpace`.
        host: where interrupts and DMA go; a :class:`DetachedHost` until a server attaches.
        lock: held around every access and every deferred job.
        faults: what the model refused or could not do (guest errors), newest last.
        intx_unmaskable_shared: behave like a device whose INTx line is shared and that has
            no PCI 2.3 INTx masking: the server refuses INTx eventfds with EBUSY, as vfio-pci
            does (a fault to test a driver's fallback to polling).
    """

    name = "model"
    intx_unmaskable_shared = False

    def __init__(self, config: ConfigSpace) -> None:
        self.config = config
        self.bars: dict[int, Bar] = {}
        self.host: Host = DetachedHost()
        self.lock = threading.RLock()
        self.faults: list[str] = []
        self._msix_table = bytearray()
        self._msix_pending: set[int] = set()
        self._intx_level = False
        self._jobs: list[tuple[float, int, Callable[[], None]]] = []
        self._job_seq = itertools.count()
        self._job_cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._generation = 0  # bumped by reset: jobs queued before it are dropped
        self.removed = False  # surprise removal: see surprise_remove()

    # -- building ------------------------------------------------------------------------

    def add_bar(
        self,
        index: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        io: bool = False,
        is_64bit: bool = False,
        prefetchable: bool = False,
    ) -> None:
        """Declare BAR ``index`` with its register handlers.

        ``read(offset, width)`` returns the value of a ``width``-byte (1, 2, 4, 8) read at
        ``offset``; ``write(offset, width, value)`` performs a write. Without handlers the
        BAR is RAM (a memfd): the model reads it as :meth:`bar_memory`, and the client may
        mmap it (VFIO_REGION_INFO_FLAG_MMAP), so its accesses never reach the model.
        """
        layout = BarLayout(index, size, io=io, is_64bit=is_64bit, prefetchable=prefetchable)
        if (read is None) != (write is None):
            raise ModelError(f"BAR{index}: give both read and write handlers, or neither (RAM)")
        if read is None and io:
            raise ModelError(f"BAR{index}: an I/O BAR cannot be RAM (it cannot be mmapped)")
        self.config.add_bar(layout)
        if read is None or write is None:
            fd = os.memfd_create(f"udrv-{self.name}-bar{index}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED)
            bar = Bar(layout, self._ram_read(mem), self._ram_write(mem), mem, fd)
        else:
            bar = Bar(layout, read, write)
        self.bars[index] = bar

    def bar_memory(self, index: int) -> mmap.mmap:
        """The memory of RAM BAR ``index`` (shared with a client that mmapped it)."""
        bar = self.bars.get(index)
        if bar is None or bar.memory is None:
            raise ModelError(f"{self.name}: BAR{index} is not a RAM BAR")
        return bar.memory

    @staticmethod
    def _ram_read(mem: mmap.mmap) -> ReadHandler:
        return lambda offset, width: int.from_bytes(mem[offset : offset + width], "little")

    @staticmethod
    def _ram_write(mem: mmap.mmap) -> WriteHandler:
        def write(offset: int, width: int, value: int) -> None:
            mem[offset : offset + width] = value.to_bytes(width, "little")

        return write

    def add_msix(self, vectors: int, bar: int, table_offset: int, pba_offset: int) -> None:
        """An MSI-X capability with its table and PBA in ``bar`` (the framework serves them:
        the model's handlers never see those offsets)."""
        if bar not in self.bars:
            raise ModelError(f"MSI-X table in BAR{bar}, which is not declared; add_bar() first")
        msix = self.config.add_msix(vectors, bar, table_offset, pba_offset)
        self._msix_table = bytearray(PCI_MSIX_ENTRY_SIZE * msix.vectors)
        for v in range(vectors):  # vectors start masked (PCI 3.0 §6.8.2.9)
            self._msix_table[v * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT

    def seal(self) -> None:
        """Call at the end of ``__init__``: the config space as built is the reset state."""
        self.config.seal()
        self._msix_reset = bytes(self._msix_table)

    # -- what the server calls -------------------------------------------------------------

    def region_size(self, index: int) -> int:
        """Bytes of VFIO region ``index`` (0-5 BARs, 7 config space); 0 when absent."""
        if index == VfioPciRegion.CONFIG:
            return len(self.config.data)
        bar = self.bars.get(index)
        return bar.layout.size if bar else 0

    def irq_count(self, index: int) -> int:
        """Vectors offered for VFIO IRQ ``index`` (0 INTx, 1 MSI, 2 MSI-X)."""
        if index == VfioPciIrq.INTX:
            return 1 if self.config.get(PCI_INTERRUPT_PIN, 1) else 0
        if index == VfioPciIrq.MSI:
            return self.config.msi_vectors
        if index == VfioPciIrq.MSIX:
            return self.config.msix.vectors if self.config.msix else 0
        return 0

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """``count`` bytes of region ``index`` at ``offset``.

        Raises:
            ModelError: no such region, or the span runs outside it.
        """
        with self.lock:
            if self.removed:
                return b"\xff" * count  # nothing answers: the read completes as all-ones
            if index == VfioPciRegion.CONFIG:
                return self.config.read(offset, count)
            bar = self._bar(index, offset, count)
            out = bytearray()
            for off, width in split_access(offset, count):
                value = self._bar_read(bar, off, width)
                out += (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` to region ``index`` at ``offset``.

        Raises:
            ModelError: no such region, or the span runs outside it.
        """
        with self.lock:
            if self.removed:
                return  # writes to a removed device go nowhere
            if index == VfioPciRegion.CONFIG:
                before = bytes(self.config.data)
                self.config.write(offset, data)
                self._config_written(before)
                return
            bar = self._bar(index, offset, len(data))
            for off, width in split_access(offset, len(data)):
                rel = off - offset
                self._bar_write(bar, off, width, int.from_bytes(data[rel : rel + width], "little"))

    def device_reset(self) -> None:
        """VFIO_USER_DEVICE_RESET: config space and device state back to power-on."""
        with self.lock:
            self._generation += 1
            with self._job_cv:
                self._jobs.clear()
            self.config.reset()
            self._msix_table[:] = self._msix_reset
            self._msix_pending.clear()
            self.set_intx(False)
            self.reset()

    def close(self) -> None:
        """Stop the worker thread; free RAM BARs."""
        with self._job_cv:
            self._stopping = True
            self._job_cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(5)
        for bar in self.bars.values():
            if bar.fd >= 0:
                os.close(bar.fd)
                bar.fd = -1
                with contextlib.suppress(BufferError):
                    bar.memory.close()  # type: ignore[union-attr]

    # -- faults on purpose ---------------------------------------------------------------

    def surprise_remove(self) -> None:
        """The device is gone (hot-unplugged, link down): from now on every read returns
        all-ones, writes are dropped, queued device work is abandoned and no interrupt or
        DMA happens; what a driver sees when a card disappears under it."""
        with self.lock:
            self.removed = True
            self._generation += 1
            with self._job_cv:
                self._jobs.clear()

    def interrupt_storm(self, count: int, vector: int = 0) -> None:
        """Signal ``count`` interrupts on ``vector`` with no cause behind them (a stuck or
        misbehaving device): the driver must not lose its way or its real interrupts."""
        with self.lock:
            for _ in range(count):
                self.raise_irq(vector)

    # -- what subclasses override -----------------------------------------------------------

    def reset(self) -> None:
        """Return the device registers to their reset values (config space is done)."""

    def config_written(self) -> None:
        """Software wrote config space (command register, MSI/MSI-X control...)."""

    # -- services for subclasses -----------------------------------------------------------

    def raise_irq(self, vector: int = 0) -> None:
        """Signal an interrupt the way the function is set up: an MSI-X or MSI message for
        ``vector`` when enabled, else assert INTx (level: :meth:`set_intx` lowers it)."""
        cfg = self.config
        if self.removed:
            return
        if cfg.msix_enabled:
            if vector >= (cfg.msix.vectors if cfg.msix else 0):
                self.fault(f"MSI-X vector {vector} does not exist")
                return
            if cfg.msix_masked or self._msix_vector_masked(vector):
                self._msix_pending.add(vector)  # PBA bit; sent when unmasked (§6.8.2.10)
                return
            self.host.signal(VfioPciIrq.MSIX, vector)
        elif cfg.msi_enabled:
            if vector < cfg.msi_enabled_vectors:
                self.host.signal(VfioPciIrq.MSI, vector)
        else:
            self.set_intx(True)

    @property
    def intx_asserted(self) -> bool:
        """The INTx line's level (the device's, before Interrupt Disable)."""
        return self._intx_level

    def set_intx(self, level: bool) -> None:
        """Drive INTx; the Interrupt Status bit follows, Interrupt Disable gates delivery."""
        self._intx_level = level
        self.config.set_intx_status(level)
        self.host.set_intx(level and not self.config.command & PCI_COMMAND_INTX_DISABLE)

    def dma_read(self, addr: int, size: int) -> bytes:
        """Read the driver's memory (only with Bus Master Enable, PCI 3.0 §6.2.2).

        Raises:
            ModelError: bus mastering is off, or the range is not mapped for DMA.
        """
        self._check_master("read", addr, size)
        if self.removed:
            raise ModelError(f"{self.name}: removed, no DMA")
        return self.host.dma_read(addr, size)

    def dma_write(self, addr: int, data: bytes) -> None:
        """Write the driver's memory; see :meth:`dma_read`."""
        self._check_master("write", addr, len(data))
        if self.removed:
            raise ModelError(f"{self.name}: removed, no DMA")
        self.host.dma_write(addr, data)

    def defer(self, job: Callable[[], None], delay: float = 0.0) -> None:
        """Run ``job`` on the worker thread after ``delay`` seconds, holding :attr:`lock`.

        A reset drops the jobs queued before it. A job's ModelError is recorded in
        :attr:`faults`.
        """
        gen = self._generation
        with self._job_cv:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"model {self.name}", daemon=True)  # fmt: skip
                self._worker.start()
            heapq.heappush(self._jobs, (time.monotonic() + delay, next(self._job_seq), lambda: self._run(job, gen)))  # fmt: skip
            self._job_cv.notify()

    def fault(self, what: str) -> None:
        """Record a guest error (what real hardware would ignore or log)."""
        self.faults.append(what)
        del self.faults[:-100]

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait until no job is queued (tests); True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._job_cv:
                if not self._jobs and not self._busy:
                    return True
            time.sleep(0.001)
        return False

    _busy = False

    # -- internals ---------------------------------------------------------------------------

    def _run(self, job: Callable[[], None], gen: int) -> None:
        with self.lock:
            if gen != self._generation:
                return
            try:
                job()
            except ModelError as exc:
                self.fault(str(exc))

    def _work(self) -> None:
        while True:
            with self._job_cv:
                while not self._stopping:
                    if self._jobs:
                        wait = self._jobs[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._job_cv.wait(wait)
                    else:
                        self._job_cv.wait()
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._jobs)
                self._busy = True
            try:
                job()
            except Exception as exc:  # a model bug must not kill the device thread silently
                self.fault(f"internal error in {self.name}: {exc!r}")
            finally:
                self._busy = False

    def _check_master(self, op: str, addr: int, size: int) -> None:
        if not self.config.command & PCI_COMMAND_MASTER:
            raise ModelError(
                f"{self.name}: DMA {op} of {size} bytes at {addr:#x} with Bus Master Enable "
                "off (PCI command bit 2); the driver must set it"
            )

    def _bar(self, index: int, offset: int, count: int) -> Bar:
        bar = self.bars.get(index)
        if bar is None:
            raise ModelError(f"{self.name}: region {index} does not exist")
        if offset < 0 or count <= 0 or offset + count > bar.layout.size:
            raise ModelError(
                f"{self.name}: {count}-byte access at {offset:#x} is outside BAR{index} "
                f"({bar.layout.size:#x} bytes)"
            )
        return bar

    def _in_msix(self, bar: Bar, offset: int) -> tuple[str, int] | None:
        msix = self.config.msix
        if msix is None or msix.bar != bar.layout.index:
            return None
        if msix.table_offset <= offset < msix.table_offset + len(self._msix_table):
            return "table", offset - msix.table_offset
        pba_size = 8 * ((msix.vectors + 63) // 64)
        if msix.pba_offset <= offset < msix.pba_offset + pba_size:
            return "pba", offset - msix.pba_offset
        return None

    def _bar_read(self, bar: Bar, offset: int, width: int) -> int:
        where = self._in_msix(bar, offset)
        if where is None:
            return bar.read(offset, width)
        kind, rel = where
        if kind == "table":
            return int.from_bytes(self._msix_table[rel : rel + width], "little")
        pba = sum(1 << v for v in self._msix_pending)
        return (pba >> (8 * rel)) & ((1 << (8 * width)) - 1)

    def _bar_write(self, bar: Bar, offset: int, width: int, value: int) -> None:
        where = self._in_msix(bar, offset)
        if where is None:
            bar.write(offset, width, value)
            return
        kind, rel = where
        if kind == "pba":
            return  # read-only (PCI 3.0 §6.8.2.10)
        self._msix_table[rel : rel + width] = value.to_bytes(width, "little")
        self._deliver_pending()

    def msix_set_masked(self, vector: int, masked: bool) -> None:
        """Set a vector's Mask bit as system software would (vfio-pci does when it enables
        MSI-X vectors); pending messages go out on unmask."""
        at = vector * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL
        if at < len(self._msix_table):
            ctrl = self._msix_table[at] & ~PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._msix_table[at] = ctrl | (PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0)
            self._deliver_pending()

    def _msix_vector_masked(self, vector: int) -> bool:
        ctrl = self._msix_table[vector * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL]
        return bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _deliver_pending(self) -> None:
        if not self.config.msix_enabled or self.config.msix_masked:
            return
        for v in sorted(self._msix_pending):
            if not self._msix_vector_masked(v):
                self._msix_pending.discard(v)
                self.host.signal(VfioPciIrq.MSIX, v)

    def _config_written(self, before: bytes) -> None:
        # Interrupt Disable may have changed: re-evaluate the INTx line.
        self.host.set_intx(self._intx_level and not self.config.command & PCI_COMMAND_INTX_DISABLE)
        self._deliver_pending()
        with contextlib.suppress(ModelError):
            self.config_written()
