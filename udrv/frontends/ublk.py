"""ublk: a block driver in this process as a real disk, ``/dev/ublkbN``.

The kernel side (drivers/block/ublk_drv.c, Linux 6.0+) is driven by io_uring
``URING_CMD``s (``udrv.kernel.ublk``): control commands on ``/dev/ublk-control``
(ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV, DEL_DEV, GET_DEV_INFO, START/END_USER_RECOVERY)
and, per hardware queue, I/O commands on ``/dev/ublkcN``: a FETCH_REQ for every tag hands
the kernel a buffer; when a request arrives its FETCH completes, its descriptor (op,
sectors, start) is in the queue's read-only mmapped array, the driver serves it from or into
the tag's buffer, and COMMIT_AND_FETCH_REQ returns the result and re-arms the tag.

Each queue is a thread with its own ring. For a sync driver the thread loops on
``io_uring_enter``, which submits a batch's commits and waits for the next requests in one
call. For an ``async`` driver it runs an asyncio loop woken by the ring's fd: each request is
a task (many in flight), commits are submitted once per loop pass. A driver with hardware
queues (``udrv.block.queue``) gets the blocking loop too: requests go to ``queue_rq`` as
they arrive, the device's completion eventfd is read in the same ring (an 8-byte READ that
completes when the interrupt fires and resets the count, so an interrupt costs no system call
of its own), so is a one-second watchdog tick (TIMEOUT), and the kernel reads and writes the
device's own DMA buffers.

User recovery (``UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE``): if the process
dies, the disk stays, quiesced, its I/O held; ``Ublk(driver, dev_id=N, recover=True)`` in a
new process attaches to it and the kernel re-issues what the dead one had not completed.

A kernel before 6.15 learns that the driver died only by cancelling its outstanding FETCH
commands (ublk_uring_cmd_cancel_fn); a queue whose every tag was in the driver's hands has
none, and its disk would hang for good, neither quiesced nor deletable. So each queue has one
tag more than ``depth`` and the disk's ``queue/nr_requests`` is ``depth``: at least one FETCH
is always outstanding. (Changing the disk's I/O scheduler resets nr_requests; ``Ublk`` sets it
again on recovery.)
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import inspect
import logging
import mmap
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from udrv.block.driver import BlockDriver, is_sync
from udrv.block.queue import HardwareQueue, Op
from udrv.errors import FrontendError, UdrvError
from udrv.kernel import ublk as U
from udrv.kernel.io_uring import (
    IORING_OP_READ,
    IORING_OP_URING_CMD,
    SQE_CMD16,
    IoUring,
    IoUringError,
)

log = logging.getLogger(__name__)
DESC = struct.Struct("<IIQQ")  # struct ublksrv_io_desc
IO_CMD = struct.Struct("<HHiQ")  # struct ublksrv_io_cmd
IO_SQE = struct.Struct(SQE_CMD16 + "HHiQ")  # a whole SQE carrying a ublksrv_io_cmd
assert DESC.size == ctypes.sizeof(U.UblksrvIoDesc) and IO_CMD.size == ctypes.sizeof(U.UblksrvIoCmd)
SECTOR = 512
IRQ, TICK = 1 << 32, 2 << 32  # user_data of the ring's non-ublk entries (tags are < 4096)
FLUSH, KNOWN_OPS = int(Op.FLUSH), frozenset(map(int, Op))
BLKDEV_MIN_RQ = 4  # block/blk.h: the least queue/nr_requests the block layer takes


class UblkError(FrontendError):
    """A ublk control or I/O command failed."""


class Control:
    """``/dev/ublk-control`` and a small SQE128 ring for its commands (one thread)."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(U.CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(f"{U.CONTROL} is missing; run `modprobe ublk_drv`") from None
        except PermissionError:
            raise UblkError(f"no permission on {U.CONTROL}; run as root") from None
        self.ring = IoUring(4, sqe128=True)

    def command(self, op: int, dev_id: int, *, addr: int = 0, length: int = 0,
                data: int = 0, what: str) -> int:  # fmt: skip
        cmd = U.UblksrvCtrlCmd(dev_id=dev_id & 0xFFFFFFFF, queue_id=0xFFFF, len=length, addr=addr)
        cmd.data[0] = data
        self.ring.uring_cmd(self.fd, op, bytes(cmd), user_data=op)
        res = self.ring.wait(1)[0][1]  # one command at a time on this ring
        if res < 0:
            raise UblkError(f"ublk {what} failed", errno=-res)
        return int(res)

    def dev_info(self, dev_id: int) -> U.UblksrvCtrlDevInfo:
        info = U.UblksrvCtrlDevInfo()
        self.command(U.UBLK_U_CMD_GET_DEV_INFO, dev_id, addr=ctypes.addressof(info),
                     length=ctypes.sizeof(info), what=f"GET_DEV_INFO of device {dev_id}")  # fmt: skip
        return info

    def close(self) -> None:
        self.ring.close()
        os.close(self.fd)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recoverable(dev_id: int) -> bool:
    """Whether ``/dev/ublkbDEV_ID`` is quiesced, waiting for a new driver (its driver died)."""
    with Control() as ctl:
        try:
            return bool(ctl.dev_info(dev_id).state == U.UBLK_S_DEV_QUIESCED)
        except UblkError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
_libc = ctypes.CDLL(None, use_errno=True)
WORKERS = ("threads", "processes", "auto")


def free_threaded() -> bool:
    """This interpreter runs Python threads in parallel (a free-threaded build with the GIL
    off: ``sys._is_gil_enabled()`` is False, Python 3.13+)."""
    gil = getattr(sys, "_is_gil_enabled", None)
    return gil is not None and not gil()


def _become_worker(parent: int) -> None:
    """In a forked queue worker: die with the parent (PR_SET_PDEATHSIG, prctl(2): a server
    killed with SIGKILL must not leave workers serving a disk that nobody can stop, and
    recovery needs every worker gone), leave SIGINT to the parent (a terminal sends it to
    the whole process group; the parent stops the device, which ends the workers), SIGTERM
    back to its default (the parent's Python handler must not run here)."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise UblkError("prctl(PR_SET_PDEATHSIG) failed", errno=ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl: nobody to serve for
        raise UblkError(f"the server process {parent} died while its workers started")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


class _Queue:
    """One hardware queue: its descriptors, buffers, ring and serving loop.

    :meth:`prepare` runs in the process that opened the char device: the kernel lets only
    the first mm that maps a queue's descriptors map any other (``ublk_ch_mmap``), and a
    driver's hardware queue allocates its DMA memory there, before any fork. :meth:`run`
    runs in the queue's worker (a thread, or a forked process): the task that submits the
    queue's FETCHes becomes its ``ubq_daemon``, the only one whose commands the kernel
    accepts from then on (``__ublk_ch_uring_cmd``)."""

    ring: IoUring  # made by the worker (:meth:`_start`)

    def __init__(self, ublk: Ublk, q_id: int) -> None:
        self.ublk, self.q_id = ublk, q_id
        self.driver = ublk.driver
        self.geometry = g = ublk.driver.geometry
        self.disk_size, self.bs_mask = g.size, g.block_size - 1
        self.tags, self.buf_size = ublk.tags, ublk.max_io
        self.counts = ublk._counts  # requests served, one slot per queue, shared across fork
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.aborted: set[int] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hwq: HardwareQueue | None = None
        self.thread: threading.Thread | None = None  # the worker, in thread mode
        self.pid = 0  # the worker, in process mode
        self.pidfd = self.ready_fd = -1
        self.status: int | None = None  # the worker process's wait status, once reaped
        self._flush_scheduled = False
        self._irq_count = ctypes.c_uint64()  # where the interrupt eventfd's READ puts its count

    # -- in the process that opened /dev/ublkcN --------------------------------------------------

    def prepare(self) -> None:
        """Map the descriptors, get the driver's hardware queue (or buffers of our own)."""
        self.hwq = hwq = self.driver.hardware_queue(self.q_id, self.tags)
        self.descs = mmap.mmap(self.ublk.cdev_fd, U.cmd_buf_size(self.tags), mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=U.cmd_buf_offset(self.q_id))  # fmt: skip
        if hwq is not None:
            if hwq.tags < self.tags or hwq.buffer_size < self.buf_size:
                raise UblkError(f"the driver's hardware queue {self.q_id} has {hwq.tags} tags of "
                                f"{hwq.buffer_size} bytes; ublk needs {self.tags} of "
                                f"{self.buf_size}")  # fmt: skip
            self.addrs = [hwq.address(t) for t in range(self.tags)]
        else:
            # An anonymous mmap is MAP_SHARED: a forked worker's buffers are these pages.
            self.bufs = mmap.mmap(-1, self.tags * self.buf_size)
            whole = memoryview(self.bufs)
            size = self.buf_size
            self.views = [whole[t * size : (t + 1) * size] for t in range(self.tags)]
            base = ctypes.addressof(ctypes.c_char.from_buffer(self.bufs))
            self.addrs = [base + t * size for t in range(self.tags)]

    def release(self, *, keep_hwq: bool = False) -> None:
        """Give back what :meth:`prepare` took. ``keep_hwq``: the worker died with requests
        possibly still at the device; its hardware queue (DMA memory) is left alone."""
        if self.hwq is not None and not keep_hwq:
            self.hwq.close()
        for v in getattr(self, "views", []):
            v.release()
        for name in ("bufs", "descs"):
            m = getattr(self, name, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a driver kept a view of a buffer: the GC unmaps it
                    log.warning("ublk%d queue %d: a buffer is still referenced; leaving it to "
                                "the garbage collector", self.ublk.dev_id, self.q_id)  # fmt: skip

    # -- in the worker ---------------------------------------------------------------------------

    def run(self, ready: Callable[[BaseException | None], None]) -> None:
        """Make the ring, FETCH every tag, call ``ready`` (with the error if that failed) and
        serve until the kernel aborts every tag (STOP_DEV, or the device quiesced)."""
        try:
            self._start()
        except BaseException as exc:
            log.debug("ublk%d queue %d setup failed", self.ublk.dev_id, self.q_id, exc_info=True)
            self.error = exc
            ready(exc)
            return
        ready(None)
        try:
            if self.hwq is not None:
                self._serve_hardware_queue()
            elif self.loop is None:
                self._serve_blocking()
            else:
                self.loop.add_reader(self.ring.fd, self._on_completions)
                self.loop.run_forever()
        except BaseException as exc:
            self.error = exc
            log.exception("ublk%d queue %d failed", self.ublk.dev_id, self.q_id)

    def _start(self) -> None:
        if self.hwq is None and not is_sync(self.driver):
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        self.ring = ring = IoUring(self.tags + 2, sqe128=True)  # + the IRQ read and the TICK
        if self.hwq is not None:
            if self.hwq.fileno() >= 0:
                self._read_irq(self.hwq.fileno())
            ring.timeout(1.0, TICK)
        fd = self.ublk.cdev_fd
        for tag in range(self.tags):
            ring.uring_cmd(fd, U.UBLK_U_IO_FETCH_REQ, IO_CMD.pack(self.q_id, tag, 0, self.addrs[tag]),
                           tag)  # fmt: skip
        ring.submit()

    def close_ring(self) -> None:
        """Closing the ring cancels our commands in the kernel, which is what lets the char
        device go (DEL_DEV waits for that)."""
        ring = self.__dict__.pop("ring", None)
        if ring is not None:
            ring.close()
        if self.loop is not None:
            self.loop.close()

    def thread_main(self) -> None:
        """The worker thread: :meth:`run`, then the queue's teardown."""
        try:
            self.run(lambda exc: self.ready.set())
        finally:
            self.ready.set()
            try:
                self.close_ring()
                self.release()
            finally:
                self.ublk._queue_done.set()

    def process_main(self, ready_fd: int, parent: int) -> None:
        """The forked worker: :meth:`run`, close the ring, ``os._exit``. Never returns: the
        parent's objects (the device, its DMA mappings, atexit hooks) are the parent's to
        close; a worker closing a DMA buffer would unmap it from the shared container."""
        code = 2
        try:
            _become_worker(parent)

            def ready(exc: BaseException | None) -> None:
                msg = b"ok" if exc is None else f"{exc}".encode(errors="replace")[:4000]
                os.write(ready_fd, msg or type(exc).__name__.encode())
                os.close(ready_fd)

            self.run(ready)
            self.close_ring()
            code = 0 if self.error is None else 1
        except BaseException:
            log.exception("ublk%d queue %d: worker failed", self.ublk.dev_id, self.q_id)
        finally:
            os._exit(code)

    # -- the hot path --------------------------------------------------------------------------

    def _serve_blocking(self) -> None:
        """A sync driver needs no event loop: one io_uring_enter both submits the last
        batch's commits and waits for the next requests."""
        ring = self.ring
        while len(self.aborted) < self.tags:
            done = ring.completions()
            if not done:
                ring.submit(wait=1)
                continue
            for tag, res, _ in done:
                if res == U.UBLK_IO_RES_OK:
                    self._dispatch(tag)
                else:
                    self._note_failure(tag, res)

    def _serve_hardware_queue(self) -> None:
        """blk-mq's shape: each new request goes to ``queue_rq``, the batch to ``commit``;
        completions come from the device's eventfd (read in this ring), from a look at the
        queue after each batch (an interrupt can be late, or under TCG lost), or from busy
        polling when the queue has no interrupt; the TICK drives ``expire``."""
        ring, hwq, commit = self.ring, self.hwq, self._commit
        assert hwq is not None
        irq = hwq.fileno()
        started = 0  # requests the device holds
        while len(self.aborted) < self.tags:
            done = ring.completions()
            if not done:
                if started and irq < 0:
                    ring.submit()  # busy polling: push out commits, do not sleep
                else:
                    ring.submit(wait=1)
                    continue
            for ud, res, _ in done:
                if ud < IRQ:
                    if res != U.UBLK_IO_RES_OK:
                        self._note_failure(ud, res)
                        continue
                    r = self._queue_rq(ud)
                    if r is None:
                        started += 1
                    else:
                        commit(ud, r)
                elif ud == IRQ:
                    if res < 0 and res != -errno.EAGAIN and res != -errno.EINTR:
                        raise UblkError(f"ublk{self.ublk.dev_id} queue {self.q_id}: reading the "
                                        f"interrupt eventfd failed: {os.strerror(-res)}")  # fmt: skip
                    self._read_irq(irq)
                elif ud == TICK:
                    for tag, r in hwq.expire():
                        started -= 1
                        commit(tag, r)
                    ring.timeout(1.0, TICK)
            hwq.commit()
            if started:
                for tag, r in hwq.complete():
                    started -= 1
                    commit(tag, r)

    def _read_irq(self, fd: int) -> None:
        """Queue an 8-byte READ of the interrupt eventfd: its CQE comes when the device
        interrupts, and the read resets the count (eventfd(2)). A POLL_ADD would need an
        ``os.read`` per interrupt besides: one system call more per request at QD1."""
        self.ring.prep(IORING_OP_READ, fd, addr=ctypes.addressof(self._irq_count), length=8,
                       user_data=IRQ)  # fmt: skip

    def _queue_rq(self, tag: int) -> int | None:
        op_flags, nr, sector, _ = DESC.unpack_from(self.descs, tag * DESC.size)
        op, offset, length = op_flags & 0xFF, sector * SECTOR, nr * SECTOR
        if op not in KNOWN_OPS:
            return -errno.EOPNOTSUPP
        try:
            self._check(op, offset, length)
            return self.hwq.queue_rq(tag, op, offset, length)  # type: ignore[union-attr]
        except Exception as exc:
            return self._errno(exc, op, offset, length)

    def _check(self, op: int, offset: int, length: int) -> None:
        """Raise unless the request is aligned and on the disk (the block layer sees to that;
        one cheap test per request, the geometry's words when it fails)."""
        if op != FLUSH and (offset + length > self.disk_size or (offset | length) & self.bs_mask):
            self.geometry.check(offset, length, f"ublk op {op}")

    def _note_failure(self, tag: int, res: int) -> None:
        if res != U.UBLK_IO_RES_ABORT:  # ABORT: the queue is going away; do not re-arm
            log.error("ublk%d queue %d tag %d: I/O command failed: %s", self.ublk.dev_id,
                      self.q_id, tag, os.strerror(-res))  # fmt: skip
        self.aborted.add(tag)

    def _on_completions(self) -> None:
        for tag, res, _ in self.ring.completions():
            if res == U.UBLK_IO_RES_OK:
                self._dispatch(tag)
            else:
                self._note_failure(tag, res)
        if self.ring._pending:
            self.ring.submit()
        if len(self.aborted) == self.tags:
            assert self.loop is not None
            self.loop.stop()

    def _dispatch(self, tag: int) -> None:
        op_flags, nr, sector, _ = DESC.unpack_from(self.descs, tag * DESC.size)
        op, offset, length = op_flags & 0xFF, sector * SECTOR, nr * SECTOR
        d = self.driver
        try:
            self._check(op, offset, length)
            if op == U.UBLK_IO_OP_READ:
                r: Any = d.read(offset, self.views[tag][:length])
            elif op == U.UBLK_IO_OP_WRITE:
                r = d.write(offset, self.views[tag][:length])
            elif op == U.UBLK_IO_OP_FLUSH:
                r = d.flush()
            elif op == U.UBLK_IO_OP_DISCARD:
                r = d.discard(offset, length)
            elif op == U.UBLK_IO_OP_WRITE_ZEROES:
                r = d.write_zeroes(offset, length)
            else:
                self._commit(tag, -errno.EOPNOTSUPP)
                return
        except Exception as exc:
            self._commit(tag, self._errno(exc, op, offset, length))
            return
        if r is None or not inspect.isawaitable(r):
            self._commit(tag, length)
        elif self.loop is not None:
            self.loop.create_task(self._finish(tag, r, op, offset, length))
        else:  # a sync driver that returned an awaitable after all (rare): finish it here
            asyncio.run(self._finish(tag, r, op, offset, length))

    async def _finish(self, tag: int, r: Awaitable[Any], op: int, offset: int, length: int) -> None:
        try:
            await r
        except Exception as exc:
            self._commit(tag, self._errno(exc, op, offset, length))
        else:
            self._commit(tag, length)
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.ring._pending:
            self.ring.submit()

    def _errno(self, exc: BaseException, op: int, offset: int, length: int) -> int:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        # str(exc), not exc: a kept log record must not keep the request's buffer alive.
        log.warning("ublk%d: op %d at %#x+%#x failed: %s", self.ublk.dev_id, op, offset, length,
                    str(exc))  # fmt: skip
        return -int(code)

    def _commit(self, tag: int, result: int) -> None:
        self.counts[self.q_id] += 1
        self.ring.put(IO_SQE, IORING_OP_URING_CMD, 0, 0, self.ublk.cdev_fd,
                      U.UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0, 0, 0, 0, tag, 0, 0, 0,
                      self.q_id, tag, result, self.addrs[tag])  # fmt: skip


class Ublk:
    """``driver`` as ``/dev/ublkbN`` (context manager). ``modprobe ublk_drv`` first.

    Each queue is served by a worker of its own: a thread, or a forked process, which gets
    past the GIL (see ``docs/block-device-in-python.md``, "Several queues"). In process mode
    this object's process opens the device, maps every queue's descriptors, asks the driver
    for its hardware queues (DMA memory, interrupt eventfds) and then forks one worker per
    queue; each worker makes its own io_uring and serves one queue. Call :meth:`start` from a
    thread that lives as long as the device (the main thread): the workers die with it
    (PR_SET_PDEATHSIG).

    Args:
        driver: the block driver; an ``async`` one gets an event loop per queue.
        queues: hardware queues; blk-mq maps CPUs onto them (the kernel allows one per CPU).
        depth: requests in flight per queue, 4..4095 (4: the block layer's least nr_requests).
        dev_id: the device number; -1: the kernel picks.
        recover: attach to the quiesced ``/dev/ublkbDEV_ID`` whose driver died, instead of
            adding a device; its queues and depth are the ones it was created with.
        workers: ``"threads"``; ``"processes"`` (the driver must say it can be served from
            forked processes: :attr:`BlockDriver.multiprocess
            <udrv.block.driver.BlockDriver.multiprocess>`); ``"auto"``: processes when there
            are several queues, the driver allows it and the GIL is on, else threads.
    """

    def __init__(self, driver: BlockDriver, *, queues: int = 1, depth: int = 64,
                 dev_id: int = -1, recover: bool = False, workers: str = "threads") -> None:  # fmt: skip
        if not 1 <= depth < U.UBLK_MAX_QUEUE_DEPTH or queues < 1:
            raise UblkError(f"queues={queues}, depth={depth}: need queues >= 1 and depth 1..4095")
        if recover and dev_id < 0:
            raise UblkError("recover=True needs the dev_id of the device to resume")
        if workers not in WORKERS:
            raise UblkError(f"workers={workers!r}: choose one of {', '.join(WORKERS)}")
        if workers == "processes" and not driver.multiprocess:
            raise UblkError(f"workers='processes': {type(driver).__name__} keeps its state in "
                            "this process's memory (multiprocess is False), so forked workers "
                            "would each see a copy; use workers='threads'")  # fmt: skip
        self.driver, self.queues, self.workers = driver, queues, workers
        self.depth = max(depth, BLKDEV_MIN_RQ)
        self.tags = self.depth + 1  # the kernel's queue_depth: one FETCH always outstanding
        self.dev_id, self.recover = dev_id, recover
        g = driver.geometry
        self.max_io = g.max_transfer
        self.path = ""
        self.cdev_fd = -1
        self.mode = "threads"  # what start() chose
        self._ctl: Control | None = None
        self._queues: list[_Queue] = []
        self._counts = memoryview(bytearray(8)).cast("Q")  # requests served, per queue
        self._queue_done = threading.Event()  # a queue ended, or stop(): wait() returns
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)  # stop() wakes a process-mode wait()
        self._reap_lock = threading.Lock()  # wait() and stop() may both reap a worker
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._added = False  # the device is this object's to stop and delete

    # -- bring-up ------------------------------------------------------------------------------

    def start(self) -> Ublk:
        self._ctl = ctl = Control()
        try:
            if self.recover:
                self._start_recovery(ctl)
            else:
                self._add(ctl)
            self.mode = self._choose_mode()
            # MAP_SHARED (an anonymous mmap's default): what forked workers count shows here.
            self._counts = memoryview(mmap.mmap(-1, 8 * self.queues)).cast("Q")
            self._open_cdev()
            self._queues = [_Queue(self, q) for q in range(self.queues)]
            for q in self._queues:
                q.prepare()
            if self.mode == "processes":
                self._fork_workers()
            else:
                self._start_threads()
            pid = os.getpid()
            if self.recover:
                ctl.command(U.UBLK_U_CMD_END_USER_RECOVERY, self.dev_id, data=pid,
                            what=f"END_USER_RECOVERY of /dev/ublkb{self.dev_id}")  # fmt: skip
            else:
                ctl.command(U.UBLK_U_CMD_START_DEV, self.dev_id, data=pid,
                            what=f"START_DEV of /dev/ublkb{self.dev_id}")  # fmt: skip
            self.path = f"/dev/ublkb{self.dev_id}"
            deadline = time.monotonic() + 10
            while not os.path.exists(self.path):
                if time.monotonic() > deadline:
                    raise UblkError(f"{self.path} did not appear")
                time.sleep(0.01)
            self._limit_requests()
            if self.mode == "processes":
                self._pin_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _pin_workers(self) -> None:
        """Each worker on its queue's CPUs, as ublksrv pins its queue threads: blk-mq sends
        a CPU's requests to that CPU's queue, and the task work that hands a request to the
        worker then runs where it was submitted, instead of waking the worker on the other
        CPU (lab, RAM disk, two queues, two fio jobs of QD32: 1833 IOPS pinned, 1073 not;
        one queue 839). The CPUs: ``/sys/block/ublkbN/mq/Q/cpu_list`` (blk-mq-sysfs.c)."""
        for q in self._queues:
            path = Path(f"/sys/block/ublkb{self.dev_id}/mq/{q.q_id}/cpu_list")
            try:
                cpus = {int(c) for c in path.read_text().replace(",", " ").split()}
                os.sched_setaffinity(q.pid, cpus)
            except (OSError, ValueError) as exc:
                log.info("ublk%d queue %d: worker not pinned to its CPUs: %s", self.dev_id,
                         q.q_id, exc)  # fmt: skip
                continue
            # The completion interrupt too, or every completion wakes the worker from the
            # other CPU (udrv.irq.affinity).
            try:
                if q.hwq is not None:
                    q.hwq.steer_interrupt(cpus)
            except UdrvError as exc:
                log.info("ublk%d queue %d: interrupt not steered to CPUs %s: %s",
                         self.dev_id, q.q_id, sorted(cpus), exc)  # fmt: skip

    def _choose_mode(self) -> str:
        if self.workers == "auto":
            many = self.queues > 1 and self.driver.multiprocess
            return "processes" if many and not free_threaded() else "threads"
        return self.workers

    def _start_threads(self) -> None:
        for q in self._queues:
            q.thread = threading.Thread(target=q.thread_main, name=f"ublk{self.dev_id}q{q.q_id}",
                                        daemon=True)  # fmt: skip
            q.thread.start()
        for q in self._queues:
            q.ready.wait()
            if q.error is not None:
                raise UblkError(f"ublk{self.dev_id} queue {q.q_id}: {q.error}")

    def _fork_workers(self) -> None:
        """One worker process per queue. SIGINT and SIGTERM stay blocked across the forks,
        so that none reaches a child before it has set its own dispositions."""
        parent = os.getpid()
        sigs = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            for q in self._queues:
                r, w = os.pipe2(os.O_CLOEXEC)
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    q.process_main(w, parent)  # never returns
                os.close(w)
                q.pid, q.ready_fd, q.pidfd = pid, r, os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for q in self._queues:
            self._await_ready(q)

    def _await_ready(self, q: _Queue) -> None:
        """The worker's first message: ``ok`` once its FETCHes are in, else why it failed.
        START_DEV waits (uninterruptibly but for signals) for every queue's FETCHes, so it
        must not be sent before every worker said ``ok``."""
        ready, _, _ = select.select([q.ready_fd], [], [], 60)
        msg = os.read(q.ready_fd, 4096) if ready else b""
        os.close(q.ready_fd)
        q.ready_fd = -1
        if msg != b"ok":
            why = msg.decode(errors="replace") or (
                "its worker did not report within 60 s" if not ready else "its worker died"
            )
            raise UblkError(f"ublk{self.dev_id} queue {q.q_id} (worker pid {q.pid}): {why}")

    def _add(self, ctl: Control) -> None:
        flags = U.UBLK_F_USER_RECOVERY | U.UBLK_F_USER_RECOVERY_REISSUE | U.UBLK_F_CMD_IOCTL_ENCODE
        info = U.UblksrvCtrlDevInfo(nr_hw_queues=self.queues, queue_depth=self.tags,
                                    max_io_buf_bytes=self.max_io, dev_id=self.dev_id & 0xFFFFFFFF,
                                    ublksrv_pid=os.getpid(), flags=flags)  # fmt: skip
        try:
            ctl.command(U.UBLK_U_CMD_ADD_DEV, self.dev_id, addr=ctypes.addressof(info),
                        length=ctypes.sizeof(info), what="ADD_DEV")  # fmt: skip
        except UblkError as exc:
            if exc.errno == errno.EEXIST:
                raise UblkError(f"/dev/ublkb{self.dev_id} exists already; pick another dev_id, "
                                f"or resume it with recover=True if its driver died") from None  # fmt: skip
            raise
        self.dev_id, self._added = int(info.dev_id), True
        if info.nr_hw_queues != self.queues:  # the kernel caps queues at the CPU count
            log.info("ublk%d: %d queue(s), not %d: the kernel allows one per CPU", self.dev_id,
                     info.nr_hw_queues, self.queues)  # fmt: skip
        self.queues, self.tags = int(info.nr_hw_queues), int(info.queue_depth)
        self.max_io = int(info.max_io_buf_bytes)
        self._set_params(ctl)

    def _set_params(self, ctl: Control) -> None:
        g = self.driver.geometry
        shift = g.block_size.bit_length() - 1
        p = U.UblkParams()
        p.len, p.types = ctypes.sizeof(p), U.UBLK_PARAM_TYPE_BASIC
        b = p.basic
        b.attrs = U.UBLK_ATTR_VOLATILE_CACHE if g.volatile_cache else 0
        b.attrs |= U.UBLK_ATTR_READ_ONLY if g.read_only else 0
        b.logical_bs_shift, b.physical_bs_shift = shift, max(shift, 12)
        b.io_min_shift, b.io_opt_shift = shift, max(shift, 12)
        b.max_sectors = self.max_io // SECTOR
        b.dev_sectors = g.size // SECTOR
        if g.discard or g.write_zeroes:
            p.types |= U.UBLK_PARAM_TYPE_DISCARD
            d = p.discard
            d.discard_granularity = g.block_size
            d.max_discard_sectors = 0xFFFFFFFF >> 9 if g.discard else 0
            most = g.max_write_zeroes // SECTOR or 0xFFFFFFFF >> 9
            d.max_write_zeroes_sectors = most if g.write_zeroes else 0
            d.max_discard_segments = 1
        ctl.command(U.UBLK_U_CMD_SET_PARAMS, self.dev_id, addr=ctypes.addressof(p),
                    length=ctypes.sizeof(p), what=f"SET_PARAMS of ublk{self.dev_id}")  # fmt: skip

    def _start_recovery(self, ctl: Control) -> None:
        name = f"/dev/ublkb{self.dev_id}"
        deadline = time.monotonic() + 15
        while True:  # the dead driver's files are closed a little after it died
            try:
                info = ctl.dev_info(self.dev_id)
            except UblkError as exc:
                if exc.errno == errno.ENODEV:
                    raise UblkError(f"no ublk device {self.dev_id} to recover") from None
                raise
            if info.state == U.UBLK_S_DEV_LIVE and _alive(info.ublksrv_pid):
                raise UblkError(f"{name} is live, served by pid {info.ublksrv_pid}; stop that "
                                "driver first (recovery is for a driver that died)")  # fmt: skip
            if info.state == U.UBLK_S_DEV_QUIESCED:
                try:
                    ctl.command(U.UBLK_U_CMD_START_USER_RECOVERY, self.dev_id,
                                what=f"START_USER_RECOVERY of {name}")  # fmt: skip
                    self._added = True  # ours now: stop() stops and deletes it
                    break
                except UblkError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
            if time.monotonic() > deadline:
                state = U.STATE_NAMES.get(info.state, str(info.state))
                raise UblkError(f"{name} is {state} (driver pid {info.ublksrv_pid}), not waiting "
                                "for recovery; is its driver still running?")  # fmt: skip
            time.sleep(0.1)
        if not info.flags & U.UBLK_F_USER_RECOVERY:
            raise UblkError(f"{name} was created without UBLK_F_USER_RECOVERY")
        if info.max_io_buf_bytes < self.max_io:
            self.max_io = int(info.max_io_buf_bytes)
        self.queues, self.tags = int(info.nr_hw_queues), int(info.queue_depth)
        self.depth = max(self.tags - 1, 1)

    def _limit_requests(self) -> None:
        """``queue/nr_requests`` = depth < the queue's tags: one FETCH stays outstanding (see
        the module's docstring)."""
        attr = Path(f"/sys/block/ublkb{self.dev_id}/queue/nr_requests")
        try:
            attr.write_text(str(self.depth))
            got = int(attr.read_text())
        except (OSError, ValueError) as exc:
            got, why = -1, str(exc)
        else:
            why = f"it reads {got}"
        if got != self.depth:
            log.warning("ublk%d: could not set %s to %d (%s); if this process dies holding every "
                        "request of a queue, the disk hangs until reboot", self.dev_id, attr,
                        self.depth, why)  # fmt: skip

    def _open_cdev(self) -> None:
        cdev = f"/dev/ublkc{self.dev_id}"
        deadline = time.monotonic() + 10
        while True:
            try:
                self.cdev_fd = os.open(cdev, os.O_RDWR | os.O_CLOEXEC)
                return
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise UblkError(f"{cdev} did not appear (devtmpfs mounted?)") from None
                time.sleep(0.01)
            except OSError as exc:
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)  # the previous driver's fd is still being released
                    continue
                raise UblkError(f"cannot open {cdev}", errno=exc.errno) from None

    # -- running and teardown --------------------------------------------------------------------

    def wait(self) -> None:
        """Until :meth:`stop` (e.g. from a signal handler's thread) or a queue ends.

        Raises:
            UblkError: a queue failed (its driver raised; :meth:`stop` then deletes the
                device), or a worker process was killed: the device is left quiesced, its
                I/O held, for ``Ublk(..., recover=True)`` in a new process.
        """
        if self.mode == "processes":
            self._wait_processes()
            return
        # One event that stop() and an ending queue both set: no periodic wake-up (a 0.2 s
        # poll here took the GIL from the queue threads five times a second for nothing).
        # A signal still interrupts the wait on the main thread and runs its handler.
        self._queue_done.wait()
        failed = [q for q in self._queues if q.error is not None]
        if failed and not self._stop.is_set():
            raise UblkError(f"ublk{self.dev_id} queue {failed[0].q_id} failed: {failed[0].error}")

    def _wait_processes(self) -> None:
        """Sleep in select(2) on the workers' pidfds (readable when the process ends) and the
        pipe :meth:`stop` writes to; a signal runs its handler on the way (PEP 475)."""
        by_fd = {q.pidfd: q for q in self._queues if q.pidfd >= 0}
        ready, _, _ = select.select([self._wake_r, *by_fd], [], [])
        if self._stop.is_set() or self._wake_r in ready:
            return
        q = by_fd[ready[0]]
        status = self._reap(q)
        # Killed: leave the disk for recovery. Ended by itself with status 0: the kernel
        # aborted its commands, which it does on its own only when it quiesces the disk
        # after another worker died (ublk_quiesce_work_fn): recovery too.
        if os.WIFSIGNALED(status) or (status == 0 and recoverable(self.dev_id)):
            self._abandon()
            how = (f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
                   if os.WIFSIGNALED(status) else "ended: the kernel quiesced the disk")  # fmt: skip
            raise UblkError(f"/dev/ublkb{self.dev_id}: the worker of queue {q.q_id} (pid {q.pid}) "
                            f"{how}; the disk stays, quiesced, its I/O held: resume it with "
                            f"recover=True (udrv ... serve --recover {self.dev_id})")  # fmt: skip
        raise UblkError(f"ublk{self.dev_id} queue {q.q_id} failed: its worker (pid {q.pid}) "
                        f"exited with status {os.waitstatus_to_exitcode(status)}; its log is above")  # fmt: skip

    def _reap(self, q: _Queue, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds for ``q``'s worker process to end, SIGKILL it if
        it has not, and return its wait status."""
        with self._reap_lock:
            if q.status is None:
                if timeout is not None and not select.select([q.pidfd], [], [], timeout)[0]:
                    log.warning("ublk%d queue %d: worker pid %d did not end in %g s; killing "
                                "it", self.dev_id, q.q_id, q.pid, timeout)  # fmt: skip
                    signal.pidfd_send_signal(q.pidfd, signal.SIGKILL)
                q.status = os.waitpid(q.pid, 0)[1]
                os.close(q.pidfd)
                q.pidfd = -1
            return q.status

    def _abandon(self) -> None:
        """A worker was killed: end the others the same way and leave the device to the
        kernel, which quiesces it (ublk_quiesce_work_fn) for a new server's recovery; a
        STOP_DEV here would fail the held I/O instead."""
        self._added = False
        for q in self._queues:
            if q.status is None and q.pidfd >= 0:
                signal.pidfd_send_signal(q.pidfd, signal.SIGKILL)

    @property
    def served(self) -> int:
        """Requests completed so far."""
        return sum(self._counts)

    def stop(self) -> None:
        """STOP_DEV (the disk goes; the kernel aborts the queues' commands), join, DEL_DEV.

        Safe to call from several threads (a signal handler's and the main one): the first
        does the work, the others wait for it."""
        self._stop.set()
        self._queue_done.set()  # wake wait()
        with self._stop_lock:
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
            try:
                self._stop_locked()
            finally:
                for fd in (self._wake_r, self._wake_w):
                    if fd >= 0:
                        os.close(fd)
                self._wake_r = self._wake_w = -1

    def _stop_locked(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return

        def teardown_command(op: int, name: str) -> None:  # logged, never raised: go on
            if self._added:
                try:
                    ctl.command(op, self.dev_id, what=f"{name} of ublk{self.dev_id}")
                except (UblkError, IoUringError) as exc:
                    log.warning("%s", exc)

        try:
            teardown_command(U.UBLK_U_CMD_STOP_DEV, "STOP_DEV")
            for q in self._queues:
                self._end_worker(q)
            if self.cdev_fd >= 0:
                os.close(self.cdev_fd)
                self.cdev_fd = -1
            teardown_command(U.UBLK_U_CMD_DEL_DEV, "DEL_DEV")  # waits for the char device to go
        finally:
            self._ctl = None
            ctl.close()

    def _end_worker(self, q: _Queue) -> None:
        """Join ``q``'s worker (after STOP_DEV aborted its commands) and release the queue."""
        if q.thread is not None:
            q.thread.join(10)
            if q.thread.is_alive() and q.loop is not None:
                q.loop.call_soon_threadsafe(q.loop.stop)
                q.thread.join(10)
            return  # the thread released its queue
        if q.ready_fd >= 0:
            os.close(q.ready_fd)
            q.ready_fd = -1
        if q.pid:
            status = self._reap(q, timeout=10)
            clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            if not clean and q.hwq is not None:
                log.warning("ublk%d queue %d: its worker ended with status %#x; its hardware "
                            "queue's memory stays mapped until the driver closes", self.dev_id,
                            q.q_id, status)  # fmt: skip
            q.release(keep_hwq=not clean)
        else:  # prepared, never started
            q.release()

    def __enter__(self) -> Ublk:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
