"""Memory-ordering barriers for drivers: ``mb``, ``rmb``, ``wmb``, ``dma_rmb``, ``dma_wmb``.

The names and meanings are the Linux kernel's (Documentation/memory-barriers.txt, "CPU
MEMORY BARRIERS" and ``dma_rmb()``/``dma_wmb()`` under "Explicit kernel barriers"); a driver
calls them where a kernel driver would:

``dma_wmb()``
    between filling a descriptor or DMA buffer and handing it to the device by a store to
    DMA memory (setting an OWN/valid bit the device polls).
``wmb()``
    between writing DMA memory and ringing a doorbell (an MMIO write) that makes the
    device read it.
``dma_rmb()``
    between reading a descriptor's DONE/phase bit and reading the rest of it.
``rmb()``
    between an MMIO read that says "data is ready" and reading that data from DMA memory.
``mb()``
    where a store must be visible before a later load (rare: e.g. re-checking a ring after
    re-enabling its interrupt).

x86-64 (what udrv runs on today)
--------------------------------
udrv maps BARs uncached: vfio-pci and sysfs ``resourceN`` mmaps use ``pgprot_noncached``
(UC-), which is UC unless an MTRR makes the range write-combining; DMA memory is ordinary
write-back RAM, kept coherent by bus snooping. Under the x86 memory model (Intel SDM Vol. 3A
§9.2.2 "Memory Ordering in P6 and More Recent Processor Families" and §12.3 "Methods of
Caching Available" for UC; §8.2.2 and §11.3 in editions before 2023):

- stores are not reordered with other stores, and UC stores reach the bus in program
  order, so a doorbell store cannot overtake the descriptor stores before it: ``wmb()`` and
  ``dma_wmb()`` need no instruction;
- loads are not reordered with other loads: ``rmb()`` and ``dma_rmb()`` need none;
- a load may pass an older store to a different location: ``mb()`` needs a real fence.

Linux agrees: on x86-64 ``dma_rmb()``/``dma_wmb()`` are compiler barriers only; its
``wmb()``/``rmb()`` are ``sfence``/``lfence``, which only matter for write-combining and
non-temporal accesses that udrv does not make (do not map BARs through ``resourceN_wc``).

The compiler half of a barrier is free in CPython: every register access and every numpy or
memoryview store into DMA memory is a call into C through a function pointer that the C
compiler cannot see through, and the interpreter runs bytecode in program order, so no load
or store is moved across another Python-level access. So on x86-64 ``wmb``, ``rmb``,
``dma_wmb`` and ``dma_rmb`` are no-ops, kept so that drivers state their ordering needs and
stay correct on architectures where they are not.

``mb()`` runs a LOCK-prefixed instruction, which the SDM (§9.2.2) orders against all loads
and stores: CPython's ``threading.Lock`` is a POSIX semaphore on Linux, and glibc's
``sem_trywait``/``sem_post`` are each a ``lock cmpxchg`` (checked by disassembling glibc
2.36 on the development machine). About 100 ns.

Other architectures
-------------------
arm64, riscv64, ppc64le need real fence instructions (``dsb st``/``dmb oshld``, ``fence``,
``sync``), ordering device and normal memory; nothing reachable from pure Python emits them.
No libc exports a fence function (``__sync_synchronize``/``atomic_thread_fence`` are compiler
built-ins), and lock operations there give only acquire/release ordering within the inner
shareable domain, which does not cover devices. Rather than pretend, every barrier raises
:class:`NotImplementedError` there when called, so a driver stops before its first doorbell
instead of racing its device. Supporting them means shipping a small compiled helper.
"""

from __future__ import annotations

import platform
import threading

__all__ = ["ARCH", "SUPPORTED", "VERIFIED_CPUS", "dma_rmb", "dma_wmb", "mb", "rmb", "wmb"]

#: CPUs whose memory ordering these barriers are verified for.
VERIFIED_CPUS = ("x86_64", "amd64")
#: The machine the barriers were chosen for.
ARCH = platform.machine().lower()
#: Whether the barriers here are correct on this machine (x86-64 only, for now).
SUPPORTED = ARCH in VERIFIED_CPUS

_fence_lock = threading.Lock()


def _unsupported(name: str) -> None:
    raise NotImplementedError(
        f"udrv.core.barrier.{name}() is not implemented on {ARCH}: that architecture needs "
        "real fence instructions for device ordering, which pure Python cannot emit; only "
        "x86-64 is supported"
    )


if SUPPORTED:

    def mb() -> None:
        """Full barrier: earlier loads and stores are globally visible before later ones.

        A lock round trip: glibc's semaphore operations are ``lock cmpxchg`` on x86-64,
        a full fence (SDM Vol. 3A §9.2.2).
        """
        # acquire() succeeds only through a locked compare-and-swap on this thread, and
        # release() is another one; a contended acquire just waits its turn.
        _fence_lock.acquire()
        _fence_lock.release()

    def rmb() -> None:
        """Read barrier: no-op on x86-64 (loads are not reordered with loads)."""

    def wmb() -> None:
        """Write barrier: no-op on x86-64 (stores, including UC MMIO stores, stay in order)."""

    def dma_rmb() -> None:
        """Read barrier between two reads of coherent DMA memory: no-op on x86-64."""

    def dma_wmb() -> None:
        """Write barrier between two writes to coherent DMA memory: no-op on x86-64."""

else:  # pragma: no cover - exercised only on other architectures

    def mb() -> None:
        """Full barrier (not implemented on this architecture)."""
        _unsupported("mb")

    def rmb() -> None:
        """Read barrier (not implemented on this architecture)."""
        _unsupported("rmb")

    def wmb() -> None:
        """Write barrier (not implemented on this architecture)."""
        _unsupported("wmb")

    def dma_rmb() -> None:
        """DMA read barrier (not implemented on this architecture)."""
        _unsupported("dma_rmb")

    def dma_wmb() -> None:
        """DMA write barrier (not implemented on this architecture)."""
        _unsupported("dma_wmb")
