"""A small io_uring: setup, the mmapped rings, submit and reap (``linux/io_uring.h``).

Enough for ublk: ``IORING_OP_URING_CMD`` with 128-byte SQEs (``IORING_SETUP_SQE128``: 80
bytes of command payload), POLL_ADD (a device's interrupt eventfd in the same wait) and
TIMEOUT (a watchdog tick), plus NOP/READ/WRITE for tests. No liburing binding on PyPI
supports SQE128 URING_CMD well, so this is written against the uapi header:

- ``io_uring_setup(entries, params)`` (syscall 425) fills ``struct io_uring_params`` with
  the ring offsets; with ``IORING_FEAT_SINGLE_MMAP`` the SQ and CQ rings are one mapping at
  ``IORING_OFF_SQ_RING``; the SQE array is mapped at ``IORING_OFF_SQES``.
- Submitting: write the SQE, put its index in the SQ array at ``tail & mask``, advance
  ``tail``; ``io_uring_enter(fd, to_submit, min_complete, IORING_ENTER_GETEVENTS)`` (426).
- Reaping: CQEs between ``head`` and ``tail``; advance ``head``.

x86-64 and arm64 both order plain stores before the syscall that publishes them (the
syscall is a full barrier); the kernel's tail store is read after it returns or after the
ring fd polls readable. One ring belongs to one thread.
"""

from __future__ import annotations

import ctypes
import errno as E
import mmap
import os
import struct
import time

from udrv.errors import UdrvError

SYS_io_uring_setup, SYS_io_uring_enter = 425, 426  # x86-64 and the generic table alike
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_SQE128 = 1 << 10
IORING_ENTER_GETEVENTS = 1 << 0
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_OP_NOP, IORING_OP_READ, IORING_OP_WRITE, IORING_OP_URING_CMD = 0, 22, 23, 46
IORING_OP_POLL_ADD, IORING_OP_TIMEOUT = 6, 11

#: struct io_uring_sqe up to the command area: opcode, flags, ioprio, fd, off/cmd_op
#: (cmd_op is the low 32 bits), addr, len, op flags, user_data, buf_index, personality,
#: file_index. The command payload (``cmd``) starts at byte 48.
SQE_HEAD = struct.Struct("<BBHiQQIIQHHi")
SQE_CMD_OFFSET = 48
#: A whole 64-byte SQE whose command is 16 bytes (``IoUring.put``'s layouts start with this).
SQE_CMD16 = "<BBHiIIQIIQHHi"
CQE = struct.Struct("<QiI")  # user_data, res, flags


class KernelTimespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]  # __kernel_timespec


class IoUringError(UdrvError):
    """io_uring could not be set up or entered."""


class _SqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class _CqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class IoUringParams(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


assert ctypes.sizeof(IoUringParams) == 120

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL while blocked
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class IoUring:
    """One io_uring (context manager). ``sqe128`` gives 80-byte command payloads.

    Args:
        entries: SQ size (a power of two; the CQ gets twice as many).
        sqe128: 128-byte SQEs, as ublk's commands need.
    """

    #: Seconds :meth:`submit` keeps retrying EBUSY/EAGAIN when there is nothing to reap.
    BUSY_TIMEOUT = 5.0

    def __init__(self, entries: int, *, sqe128: bool = False) -> None:
        p = IoUringParams()
        p.flags = IORING_SETUP_CLAMP | (IORING_SETUP_SQE128 if sqe128 else 0)
        fd = _syscall(SYS_io_uring_setup, ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            err = ctypes.get_errno()
            hint = {
                E.ENOSYS: "; the kernel lacks io_uring (CONFIG_IO_URING)",
                E.EPERM: "; io_uring is disabled (sysctl kernel.io_uring_disabled)",
                E.EINVAL: "; the kernel is too old for these flags (SQE128 needs Linux 5.19)",
            }.get(err, "")
            raise IoUringError(f"io_uring_setup({entries}) failed{hint}", errno=err)
        self.fd: int = fd
        self.sqe_size = 128 if sqe128 else 64
        self._zero_sqe = bytes(self.sqe_size)
        if not p.features & IORING_FEAT_SINGLE_MMAP:
            os.close(fd)
            raise IoUringError("io_uring without IORING_FEAT_SINGLE_MMAP (Linux < 5.4)")
        so, co = p.sq_off, p.cq_off
        ring_size = max(so.array + p.sq_entries * 4, co.cqes + p.cq_entries * CQE.size)
        self._ring = mmap.mmap(fd, ring_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQ_RING)  # fmt: skip
        self._sqes = mmap.mmap(fd, p.sq_entries * self.sqe_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)  # fmt: skip
        ring = memoryview(self._ring)
        self._u32 = ring.cast("I")
        self.sqes = memoryview(self._sqes)
        self.sq_entries, self.cq_entries = p.sq_entries, p.cq_entries
        self._sq_head, self._sq_tail = so.head // 4, so.tail // 4
        self._sq_mask = self._u32[so.ring_mask // 4]
        self._sq_array = so.array // 4
        self._cq_head, self._cq_tail = co.head // 4, co.tail // 4
        self._cq_mask = self._u32[co.ring_mask // 4]
        self._cqes = ring[co.cqes : co.cqes + p.cq_entries * CQE.size]
        self._tail = self._u32[self._sq_tail]
        self._pending = 0  # SQEs queued, not yet submitted
        self._backlog: list[tuple[int, int, int]] = []  # CQEs reaped by submit(), not yet seen
        self._keep: list[object] = []  # what queued SQEs point at, until they are submitted
        self._dirty = bytearray(self.sq_entries)  # slots whose bytes 64..127 are not zero
        # The SQ array maps ring slots to SQE indexes: keep it the identity.
        for i in range(self.sq_entries):
            self._u32[self._sq_array + i] = i

    # -- submission ------------------------------------------------------------------------

    def sqe(self) -> int:
        """The byte offset in :attr:`sqes` of the next free SQE (zeroed), or raise if full."""
        head = self._u32[self._sq_head]
        if self._tail - head >= self.sq_entries:
            raise IoUringError("the submission queue is full; submit() first")
        off = (self._tail & self._sq_mask) * self.sqe_size
        self.sqes[off : off + self.sqe_size] = self._zero_sqe
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._pending += 1
        return off

    def prep(self, opcode: int, fd: int, *, off: int = 0, addr: int = 0, length: int = 0,
             op_flags: int = 0, user_data: int = 0, cmd: bytes = b"") -> None:  # fmt: skip
        """Queue one SQE. For URING_CMD, ``off`` is ``cmd_op`` and ``cmd`` the payload."""
        at = self.sqe()
        SQE_HEAD.pack_into(self.sqes, at, opcode, 0, 0, fd, off, addr, length, op_flags,
                           user_data, 0, 0, 0)  # fmt: skip
        if cmd:
            room = self.sqe_size - SQE_CMD_OFFSET
            if len(cmd) > room:
                raise IoUringError(f"a {len(cmd)}-byte command does not fit {room} bytes")
            self.sqes[at + SQE_CMD_OFFSET : at + SQE_CMD_OFFSET + len(cmd)] = cmd
            if SQE_CMD_OFFSET + len(cmd) > 64:
                self._dirty[at // self.sqe_size] = 1

    def put(self, layout: struct.Struct, *values: object) -> None:
        """Queue one SQE in a single ``pack_into``: the hot path's alternative to :meth:`prep`.

        ``layout`` packs the whole first 64 bytes (header and a 16-byte command, see
        ``SQE_CMD16``); of a 128-byte SQE the rest stays zero.
        """
        tail = self._tail
        if tail - self._u32[self._sq_head] >= self.sq_entries:
            raise IoUringError("the submission queue is full; submit() first")
        slot = tail & self._sq_mask
        at = slot * self.sqe_size
        if self._dirty[slot]:
            self.sqes[at + 64 : at + self.sqe_size] = self._zero_sqe[64:]
            self._dirty[slot] = 0
        layout.pack_into(self.sqes, at, *values)
        self._tail = (tail + 1) & 0xFFFFFFFF
        self._pending += 1

    def uring_cmd(self, fd: int, cmd_op: int, payload: bytes, user_data: int) -> None:
        self.prep(IORING_OP_URING_CMD, fd, off=cmd_op, user_data=user_data, cmd=payload)

    def poll_add(self, fd: int, user_data: int, events: int = 0x1) -> None:
        """One CQE (res: the ready events) once ``fd`` polls ready; ``events`` go in the
        SQE's ``poll32_events`` (default POLLIN)."""
        self.prep(IORING_OP_POLL_ADD, fd, op_flags=events, user_data=user_data)

    def timeout(self, seconds: float, user_data: int) -> None:
        """One CQE with res ``-ETIME`` after ``seconds`` (count 0: time alone ends it)."""
        ts = KernelTimespec(int(seconds), int(seconds % 1 * 1e9))
        self._keep.append(ts)  # the kernel reads it when the SQE is submitted
        self.prep(IORING_OP_TIMEOUT, -1, addr=ctypes.addressof(ts), length=1,
                  user_data=user_data)  # fmt: skip

    def submit(self, wait: int = 0) -> int:
        """Publish queued SQEs and enter; with ``wait`` block until that many CQEs exist.

        Returns:
            How many SQEs the kernel consumed.

        Raises:
            IoUringError: ``io_uring_enter`` failed, or stayed busy (EBUSY/EAGAIN) for
                :attr:`BUSY_TIMEOUT` seconds with no completion to reap.
        """
        self._u32[self._sq_tail] = self._tail  # publish (the syscall orders it)
        self._pending = 0
        deadline = 0.0
        while True:
            # What the kernel has not consumed yet: it advances the SQ head as it submits, so
            # SQEs left over by an interrupted or partial enter are submitted again.
            n = (self._tail - self._u32[self._sq_head]) & 0xFFFFFFFF
            flags = IORING_ENTER_GETEVENTS if wait else 0
            r = _syscall(SYS_io_uring_enter, self.fd, n, wait, flags, None, 0)
            if r >= 0:
                if self._keep:
                    self._keep.clear()
                return int(r)
            err = ctypes.get_errno()
            if err == E.EINTR:
                if not wait:
                    return 0
                continue
            if err == E.EBUSY or err == E.EAGAIN:
                # EBUSY: the CQ is full and the kernel holds completions it cannot post until
                # we make room (io_uring_enter(2), IORING_FEAT_NODROP); EAGAIN: it is short
                # of resources. Entering again without reaping would spin forever: reap into
                # the backlog (completions() hands it out first), then enter again.
                reaped = self._reap()
                if reaped:
                    self._backlog += reaped
                    wait = max(0, wait - len(reaped))  # they count toward what we wait for
                    continue
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.BUSY_TIMEOUT
                elif now > deadline:
                    raise IoUringError(
                        f"io_uring_enter stayed busy for {self.BUSY_TIMEOUT:g} s with no "
                        f"completion to reap ({n} SQEs pending)",
                        errno=err,
                    )
                time.sleep(0.001)
                continue
            raise IoUringError("io_uring_enter failed", errno=err)

    # -- completion ------------------------------------------------------------------------

    def completions(self) -> list[tuple[int, int, int]]:
        """Reap every available CQE: ``[(user_data, res, flags)]``, oldest first."""
        if self._backlog:
            out, self._backlog = self._backlog, []
            return out + self._reap()
        return self._reap()

    def _reap(self) -> list[tuple[int, int, int]]:
        u32, head = self._u32, self._u32[self._cq_head]
        tail = u32[self._cq_tail]
        if head == tail:
            return []
        mask, size = self._cq_mask, CQE.size
        start, end = head & mask, tail & mask
        if start < end:
            out = list(CQE.iter_unpack(self._cqes[start * size : end * size]))
        else:  # wrapped (or full)
            out = list(CQE.iter_unpack(self._cqes[start * size :]))
            out += CQE.iter_unpack(self._cqes[: end * size])
        u32[self._cq_head] = tail
        return out

    def wait(self, n: int = 1) -> list[tuple[int, int, int]]:
        """Submit what is queued, block for ``n`` completions, reap them (and any others)."""
        done = self.completions()
        if len(done) < n:
            self.submit(n - len(done))
            done += self.completions()
        elif self._pending:
            self.submit()
        return done

    def close(self) -> None:
        if self.fd < 0:
            return
        os.close(self.fd)  # the mappings keep the ring alive until they go too
        self.fd = -1
        self.sqes.release()
        self._cqes.release()
        self._u32.release()
        try:
            self._sqes.close()
            self._ring.close()
        except BufferError:  # someone holds a view of the rings: the GC unmaps them
            pass

    def __enter__(self) -> IoUring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd
