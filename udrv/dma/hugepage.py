"""DMA without an IOMMU (UIO): hugepage memory and its physical addresses.

With no IOMMU the device sees physical addresses, so DMA memory must be physically
contiguous and must not move: a 2 MiB hugepage is both (hugetlbfs pages are never swapped or
migrated while mapped). Physical addresses come from /proc/self/pagemap (bits 0-54: the page
frame number, bit 63: present; Documentation/admin-guide/mm/pagemap.rst), which needs
CAP_SYS_ADMIN to show frame numbers. The device can reach all of RAM: this is why VFIO is
the default.

The buffers live in named files of a hugetlbfs mount (:class:`DmaFiles`), not in anonymous
memory, because a driver that dies must not give its DMA memory back while the device may
still write to it. When a process is SIGKILLed the kernel tears down its memory first
(``do_exit``: ``exit_mm``) and closes its files after (``exit_files``); only that last step
reaches uio_pci_generic's release, which clears Bus Master Enable. In between, and for ever
on a kernel or UIO driver that does not clear it, the device (an e1000 with RX enabled, an
NVMe controller finishing a read) writes into pages the kernel has taken back: freed
hugepages are reused by the next hugetlb user, or return to the page allocator when the pool
shrinks (``udrv hugepages 0``) and become slab memory, and a late DMA into them corrupts the
kernel's heap. A file keeps its hugepage until it is unlinked, so nothing is freed at exit;
the next open of the same device claims the files (a lock held by a live owner says they are
in use), quiesces the device (Bus Master Enable cleared, reset where the kernel can) and only
then unlinks them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from udrv.core.device import Device
from udrv.core.dma import Dma
from udrv.dma.buffer import Direction, DmaBuffer, Mapping
from udrv.errors import DmaError

HUGEPAGE = 2 << 20
MAP_POPULATE = 0x8000  # <asm-generic/mman-common.h>
#: The 2 MiB pool (Documentation/admin-guide/mm/hugetlbpage.rst, "/sys/kernel/mm/hugepages").
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
NR_HUGEPAGES = HUGEPAGES_2M / "nr_hugepages"
PAGEMAP = "/proc/self/pagemap"
PFN_MASK = (1 << 55) - 1  # pagemap.rst: bits 0-54 page frame number
PAGE_PRESENT = 1 << 63  # pagemap.rst: bit 63 page present
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")
#: udrv's own hugetlbfs mount (2 MiB pages), mounted on first use: the DMA buffers' files.
HUGETLBFS = Path("/run/udrv/hugepages")
#: One lock file per device: held (flock) by the process that owns the device's buffers.
LOCK_DIR = Path("/run/udrv/dma-locks")
MOUNTS = "/proc/self/mounts"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HugepageStatus:
    """The 2 MiB hugepage pool: pages reserved (``nr_hugepages``) and still free."""

    total: int
    free: int


def hugepage_status(pool: Path | None = None) -> HugepageStatus:
    """How many 2 MiB hugepages are reserved and free (0/0 when the kernel has none)."""
    pool = pool or HUGEPAGES_2M
    try:
        return HugepageStatus(
            int((pool / "nr_hugepages").read_text()), int((pool / "free_hugepages").read_text())
        )
    except FileNotFoundError:
        return HugepageStatus(0, 0)
    except (OSError, ValueError) as exc:
        raise DmaError(f"cannot read the hugepage pool in {pool}: {exc}") from None


def reserve_hugepages(n: int, pool: Path | None = None) -> int:
    """Ask the kernel for ``n`` 2 MiB hugepages in total; returns how many it has now.

    The kernel may grant fewer when memory is fragmented; the caller compares.

    Raises:
        DmaError: ``n`` is negative, or the pool cannot be written (not root, no hugetlbfs).
    """
    if n < 0:
        raise DmaError(f"cannot reserve {n} hugepages; give a count >= 0")
    path = (pool or HUGEPAGES_2M) / "nr_hugepages"
    try:
        path.write_text(str(n))
        return int(path.read_text())
    except OSError as exc:
        raise DmaError(
            f"cannot reserve {n} hugepages through {path}; run as root (or boot with "
            f"hugepages={n})",
            errno=exc.errno,
        ) from None


def virt_to_phys(vaddr: int, pagemap: str | None = None) -> int:
    """The physical address of a (resident) virtual address of this process.

    Raises:
        DmaError: the page is not resident, or pagemap hides frame numbers (not root).
    """
    pagemap = pagemap or PAGEMAP
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(pagemap, "rb") as f:
            f.seek(vaddr // page * 8)
            raw = f.read(8)
    except OSError as exc:
        raise DmaError(f"cannot read {pagemap}", errno=exc.errno) from None
    if len(raw) != 8:
        raise DmaError(f"{pagemap} has no entry for virtual address {vaddr:#x}")
    (entry,) = struct.unpack("<Q", raw)
    if not entry & PAGE_PRESENT:
        raise DmaError(f"virtual address {vaddr:#x} is not resident; touch it before mapping")
    pfn = entry & PFN_MASK
    if pfn == 0:
        raise DmaError(
            f"{pagemap} hides frame numbers: physical addresses need CAP_SYS_ADMIN (run as root)"
        )
    return pfn * page + vaddr % page


def _libc_mlock(vaddr: int, length: int) -> None:
    if _libc.mlock(ctypes.c_void_p(vaddr), ctypes.c_size_t(length)) != 0:
        err = ctypes.get_errno()
        raise DmaError(
            f"mlock of {length:#x} bytes at {vaddr:#x} failed (pinned memory counts against "
            "RLIMIT_MEMLOCK: raise `ulimit -l` or run as root)",
            errno=err,
        )


def _libc_munlock(vaddr: int, length: int) -> None:
    _libc.munlock(ctypes.c_void_p(vaddr), ctypes.c_size_t(length))


def _libc_mount_hugetlbfs(target: Path) -> None:
    """mount(2) a hugetlbfs of 2 MiB pages on ``target`` (Documentation/admin-guide/mm/
    hugetlbpage.rst: ``mount -t hugetlbfs -o pagesize=2M none DIR``), mode 0700."""
    rc = _libc.mount(b"udrv-hugepages", os.fsencode(target), b"hugetlbfs", ctypes.c_ulong(0),
                     b"pagesize=2M,mode=0700")  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise DmaError(
            f"cannot mount hugetlbfs on {target} for UIO DMA buffers (run as root; the kernel "
            "needs CONFIG_HUGETLBFS)",
            errno=err,
        )


def _map_hugepage_file(fd: int) -> mmap.mmap:
    """Map a 2 MiB hugetlbfs file shared and fault its page in (ENOMEM: no free hugepage)."""
    return mmap.mmap(fd, HUGEPAGE, mmap.MAP_SHARED | MAP_POPULATE)


_libc = ctypes.CDLL(None, use_errno=True)
#: Pin and unpin process memory (mlock(2)); mount hugetlbfs and map its files; tests
#: replace them.
mlock = _libc_mlock
munlock = _libc_munlock
mount_hugetlbfs = _libc_mount_hugetlbfs
map_hugepage_file = _map_hugepage_file


def hugetlbfs_mounted(path: Path, mounts: str | None = None) -> bool:
    """Whether a hugetlbfs is mounted on ``path`` (/proc/self/mounts)."""
    try:
        with open(mounts or MOUNTS) as f:
            return any(
                len(p) > 2 and p[1] == str(path) and p[2] == "hugetlbfs"
                for p in (line.split() for line in f)
            )
    except OSError:
        return False


class DmaFiles:
    """The files that hold one device's UIO DMA buffers, claimed by one live process.

    Each buffer is one 2 MiB file ``udrv-ADDRESS-PID-N`` in :data:`HUGETLBFS`. A file keeps its
    hugepage until it is unlinked, however its process ends; :meth:`remove` unlinks it when
    the buffer is closed. The claim is a flock on ``LOCK_DIR/ADDRESS.lock``, which the kernel
    drops when the owner dies: files of the device found by a new claim belong to a dead
    driver whose device may still be writing into them, so :meth:`reclaim` calls ``quiesce``
    (which must stop the device's DMA) before it unlinks them.

    Args:
        address: the device's PCI address.
        directory: the hugetlbfs directory (tests: any directory).
        lock_dir: where the lock files go.

    Raises:
        DmaError: another live process owns the device's DMA memory.
    """

    def __init__(
        self, address: str, directory: Path | None = None, lock_dir: Path | None = None
    ) -> None:
        self.address = address
        self.directory = directory or HUGETLBFS
        self.prefix = f"udrv-{address}-"
        lock_dir = lock_dir or LOCK_DIR
        self.lock_path = lock_dir / f"{address}.lock"
        self._counter = itertools.count()
        self._lock_fd = -1
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DmaError(
                f"{address}: cannot create the DMA lock {self.lock_path} (run as root)",
                errno=exc.errno,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DmaError(
                f"{address}: another process (pid {owner}) owns this device's DMA memory "
                f"({self.lock_path} is locked); stop it first, one driver per device",
                errno=errno.EBUSY,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @classmethod
    def reclaim_dead(
        cls,
        address: str,
        quiesce: Callable[[], None],
        directory: Path | None = None,
        lock_dir: Path | None = None,
    ) -> int:
        """Free what a dead driver of ``address`` left, unless a live process owns the
        device's DMA memory (then nothing is touched). Called when a device is opened, before
        any driver can enable DMA; returns how many buffers were freed.

        Raises:
            DmaError: the lock cannot be created (not root); whatever ``quiesce`` raises.
        """
        try:
            files = cls(address, directory, lock_dir)
        except DmaError as exc:
            if exc.errno == errno.EBUSY:
                return 0
            raise
        try:
            return files.reclaim(quiesce)
        finally:
            files.close()

    def leftovers(self) -> list[Path]:
        """Files of this device that no live process owns (their driver died)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(self.prefix))

    def reclaim(self, quiesce: Callable[[], None]) -> int:
        """Free the buffers a dead driver left: ``quiesce()`` first (it must stop the device's
        DMA: Bus Master Enable cleared), then unlink them. Returns how many there were.

        Raises:
            whatever ``quiesce`` raises; the files are then kept (better leaked than reused
            under a device that may still write).
        """
        old = self.leftovers()
        if not old:
            return 0
        quiesce()
        for path in old:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        pids = sorted({p.name[len(self.prefix) :].split("-")[0] for p in old})
        log.warning("%s: freed %d DMA buffer(s) left by a driver that died (pid %s), after "
                    "stopping the device's DMA", self.address, len(old), ", ".join(pids))  # fmt: skip
        return len(old)

    def create(self) -> tuple[mmap.mmap, Path]:
        """A new 2 MiB buffer file, mapped shared and populated (its hugepage is allocated
        now, and stays until :meth:`remove`).

        Raises:
            DmaError: no free hugepage (the message says how to reserve some), or hugetlbfs
                cannot be mounted.
        """
        if self._lock_fd < 0:
            raise DmaError(f"{self.address}: its DMA files were released; open the device again")
        if self.directory == HUGETLBFS and not hugetlbfs_mounted(HUGETLBFS):
            try:
                HUGETLBFS.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DmaError(
                    f"cannot create {HUGETLBFS} for UIO DMA buffers (run as root)", errno=exc.errno
                ) from None
            mount_hugetlbfs(HUGETLBFS)
        path = self.directory / f"{self.prefix}{os.getpid()}-{next(self._counter)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DmaError(
                f"{self.address}: cannot create the DMA buffer file {path}", errno=exc.errno
            ) from None
        try:
            os.ftruncate(fd, HUGEPAGE)
            return map_hugepage_file(fd), path
        except OSError as exc:
            path.unlink()
            st = hugepage_status()
            raise DmaError(
                f"no free 2 MiB hugepage for DMA ({st.total} reserved, {st.free} free in "
                f"{HUGEPAGES_2M}); run `udrv hugepages {max(64, st.total + 16)}`",
                errno=exc.errno,
            ) from None
        finally:
            os.close(fd)

    def remove(self, path: Path) -> None:
        """Unlink a buffer's file: its hugepage is freed once it is also unmapped."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def close(self) -> None:
        """Give up the claim (files not removed stay for the next claim to reclaim)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def iommu_group_type(group: int | None, root: Path | None = None) -> str | None:
    """The kernel's IOMMU domain type of ``group`` (``/sys/kernel/iommu_groups/N/type``:
    ``identity``, ``DMA``, ``DMA-FQ``, ``blocked``, ``unmanaged``), None without a group or
    without the file (no IOMMU, or a kernel before 5.11)."""
    if group is None:
        return None
    path = (root or IOMMU_GROUPS) / str(group) / "type"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DmaError(f"cannot read the IOMMU group type from {path}", errno=exc.errno) from None


def check_physical_dma(address: str, group: int | None, root: Path | None = None) -> None:
    """Refuse DMA with physical addresses when an IOMMU translates the device's accesses.

    With the group's domain ``identity`` (``iommu=pt``, or no IOMMU at all) a device address
    is a physical address; with a translating domain (``DMA``, AMD IOMMU or ``intel_iommu=on``
    without ``iommu=pt``) every physical address the device is given faults in the IOMMU
    (Documentation/ABI/testing/sysfs-kernel-iommu_groups, "type").

    Raises:
        DmaError: the domain translates; the message says to use VFIO or boot with iommu=pt.
    """
    kind = iommu_group_type(group, root)
    if kind is not None and kind != "identity":
        path = (root or IOMMU_GROUPS) / str(group) / "type"
        raise DmaError(
            f"{address}: UIO DMA hands the device physical addresses, but its IOMMU group "
            f"{group} translates them ({path} is {kind!r}, not 'identity'), so every DMA "
            f"would fault. Use VFIO (`udrv bind {address}`, then backend='vfio'), or boot with "
            "iommu=pt to let devices use physical addresses"
        )


class HugepageDma(Dma):
    """``dev.dma`` of a UIO device: physical addresses of pinned memory.

    Args:
        device: the device.
        iommu_group: its IOMMU group (None: no IOMMU); DMA is refused unless the group's
            domain is ``identity`` (see :func:`check_physical_dma`).
        groups_root: ``/sys/kernel/iommu_groups`` (tests use a fake tree).
        files: the device's claimed :class:`DmaFiles` (the UIO backend claims them when it
            opens the device, before a driver can enable DMA); None: claimed on the first
            :meth:`alloc`, reclaiming a dead driver's files after clearing Bus Master Enable.

    Raises:
        DmaError: the IOMMU translates the device's addresses.
    """

    def __init__(
        self,
        device: Device,
        iommu_group: int | None = None,
        groups_root: Path | None = None,
        files: DmaFiles | None = None,
    ) -> None:
        check_physical_dma(device.address, iommu_group, groups_root)
        super().__init__(device)
        self._live: list[Mapping] = []
        self._lock = threading.Lock()
        self._files = files
        self._own_files = False  # claimed here (not handed over): released by close()

    def _claimed(self) -> DmaFiles:
        if self._files is None:
            self._files = DmaFiles(self.device.address)
            self._own_files = True
            self._files.reclaim(lambda: self.device.set_bus_master(False))
        return self._files

    def _check(self, phys: int, length: int) -> None:
        if phys + length > self.limit:
            raise DmaError(
                f"{self.device.address}: physical address {phys:#x} is beyond the device's "
                f"{self.mask_bits}-bit DMA mask; use VFIO, which maps an IOVA below the mask"
            )

    def _track(self, m: Mapping) -> None:
        with self._lock:
            self._live.append(m)

    def _forget(self, m: Mapping) -> None:
        with self._lock:
            if m in self._live:
                self._live.remove(m)

    def alloc(self, size: int, direction: Direction = Direction.BIDIRECTIONAL) -> DmaBuffer:
        """Consistent memory from one hugepage (at most 2 MiB: physically contiguous)."""
        if not 0 < size <= HUGEPAGE:
            raise DmaError(
                f"{self.device.address}: under UIO a DMA buffer is one 2 MiB hugepage at "
                f"most, not {size} bytes"
            )
        self._fix_mask()
        files = self._claimed()
        mem, path = files.create()  # a named file: its page outlives a killed process
        vaddr = np.frombuffer(mem, dtype=np.uint8).ctypes.data
        try:
            phys = virt_to_phys(vaddr)
            self._check(phys, size)
        except BaseException:
            mem.close()
            files.remove(path)
            raise
        holder: list[Mapping] = []

        def release() -> None:
            self._forget(holder[0])
            files.remove(path)  # freed once DmaBuffer.close() unmaps it too

        buf = DmaBuffer(mem, size, phys, release)
        holder.append(buf)
        self._track(buf)
        return buf

    def _pin(self, buffer: Any, direction: Direction) -> Mapping:
        """Pin every page of ``buffer`` and find its physically contiguous runs."""
        arr = np.frombuffer(buffer, dtype=np.uint8)
        addr = self.device.address
        if len(arr) == 0:
            raise DmaError(f"{addr}: cannot map an empty buffer for DMA")
        if Direction.FROM_DEVICE in direction and not arr.flags.writeable:
            raise DmaError(
                f"{addr}: the device would write into a read-only buffer; pass a writable one "
                "or Direction.TO_DEVICE"
            )
        self._fix_mask()
        page = mmap.PAGESIZE
        va, end = arr.ctypes.data, arr.ctypes.data + len(arr)
        first_page = va & ~(page - 1)
        span = ((end + page - 1) & ~(page - 1)) - first_page
        # Give every page its own frame before taking its address: a page never written may
        # be the shared zero page (a device write would land in memory every process reads)
        # and a copy-on-write page moves on the next store. Writing each page's first byte
        # back to itself breaks both (the buffer's own first and last pages included); mlock
        # then keeps the frames resident (never swapped out) while the device owns them.
        # mlock does not forbid migration by compaction (sysctl vm.compact_unevictable_allowed
        # decides): memory from alloc() (a hugepage) is the safe choice for long-lived DMA.
        if arr.flags.writeable:
            for p in range(first_page, end, page):
                i = max(p, va) - va
                arr[i] = arr[i]
        mlock(first_page, span)
        try:
            spans: list[tuple[int, int]] = []
            while va < end:
                n = min(end, (va // page + 1) * page) - va
                phys = virt_to_phys(va)
                self._check(phys, n)
                if spans and spans[-1][0] + spans[-1][1] == phys:
                    spans[-1] = (spans[-1][0], spans[-1][1] + n)
                else:
                    spans.append((phys, n))
                va += n
        except BaseException:
            munlock(first_page, span)
            raise
        holder: list[Mapping] = []

        def release() -> None:
            munlock(first_page, span)
            self._forget(holder[0])

        m = Mapping(spans[0][0], len(arr), release, segments=spans, owner=buffer)
        holder.append(m)
        self._track(m)
        return m

    def map(self, buffer: Any, direction: Direction = Direction.BIDIRECTIONAL) -> Mapping:
        """Streaming mapping of memory that is physically contiguous (e.g. in a hugepage);
        its pages are pinned (mlock) until :meth:`Mapping.unmap`.

        Raises:
            DmaError: the buffer spans physically discontiguous pages (use :meth:`map_sg`,
                which returns one segment per contiguous run), or beyond the mask.
        """
        m = self._pin(buffer, direction)
        if len(m.segments) != 1:
            m.unmap()
            raise DmaError(
                f"{self.device.address}: the buffer is not physically contiguous (it spans "
                f"{len(m.segments)} separate runs of pages); use map_sg(), or a buffer from "
                "dev.dma.alloc() (one hugepage)"
            )
        return m

    def _map_for_sg(self, buffer: Any, direction: Direction) -> Mapping:
        return self._pin(buffer, direction)

    def _release_all(self) -> None:
        with self._lock:
            live = list(self._live)
        if live and not self.device.closed:
            # Whoever enabled it, the device must not DMA into memory about to be freed.
            with contextlib.suppress(Exception):
                self.device.set_bus_master(False)
        for m in reversed(live):
            with contextlib.suppress(Exception):
                m.close()
        if self._files is not None and self._own_files:
            self._files.close()
