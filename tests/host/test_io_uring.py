"""The io_uring layer on the host kernel, and the io_uring/ublk ABI against the uapi headers."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from udrv.kernel import io_uring as IU
from udrv.kernel import ublk as U
from udrv.kernel.io_uring import IoUring, IoUringError


def test_nop_write_read_round_trip() -> None:
    with IoUring(8, sqe128=True) as ring, tempfile.TemporaryFile() as f:
        assert ring.sqe_size == 128 and ring.sq_entries == 8
        ring.prep(IU.IORING_OP_NOP, -1, user_data=0xDEADBEEF)
        assert ring.wait(1) == [(0xDEADBEEF, 0, 0)]
        data = ctypes.create_string_buffer(os.urandom(4096), 4096)
        ring.prep(IU.IORING_OP_WRITE, f.fileno(), addr=ctypes.addressof(data), length=4096,
                  off=8192, user_data=1)  # fmt: skip
        assert ring.wait(1) == [(1, 4096, 0)]
        back = ctypes.create_string_buffer(4096)
        ring.prep(IU.IORING_OP_READ, f.fileno(), addr=ctypes.addressof(back), length=4096,
                  off=8192, user_data=2)  # fmt: skip
        assert ring.wait(1) == [(2, 4096, 0)] and back.raw == data.raw
        # An error comes back as -errno in the CQE.
        ring.prep(IU.IORING_OP_READ, 9999, addr=ctypes.addressof(back), length=1, user_data=3)
        assert ring.wait(1) == [(3, -9, 0)]  # EBADF


def test_many_completions_wrap_the_rings() -> None:
    """More operations than ring entries, in batches: head/tail wrap, nothing lost or doubled."""
    with IoUring(4) as ring:
        seen: list[int] = []
        for batch in range(50):
            for i in range(4):
                ring.prep(IU.IORING_OP_NOP, -1, user_data=batch * 4 + i)
            with pytest.raises(IoUringError, match="submission queue is full"):
                ring.prep(IU.IORING_OP_NOP, -1)
            done = ring.wait(4)
            while len(done) < 4:
                done += ring.wait(4 - len(done))
            seen += [ud for ud, res, _ in done]
        assert sorted(seen) == list(range(200))


def test_command_payload_limits() -> None:
    with IoUring(2) as small, IoUring(2, sqe128=True) as big:
        with pytest.raises(IoUringError, match="does not fit 16 bytes"):
            small.prep(IU.IORING_OP_NOP, -1, cmd=bytes(32))
        big.prep(IU.IORING_OP_NOP, -1, cmd=bytes(80), user_data=5)
        assert big.wait(1) == [(5, 0, 0)]


def test_poll_and_timeout_share_one_wait() -> None:
    """An eventfd-like fd polled in the ring: its CQE comes when it is written, not before;
    a timeout completes with -ETIME and keeps no timespec alive after submission."""
    r, w = os.pipe()
    try:
        with IoUring(4) as ring:
            ring.poll_add(r, user_data=7)
            ring.timeout(0.05, user_data=8)
            assert len(ring._keep) == 1
            ring.submit()
            assert ring._keep == []
            assert ring.wait(1) == [(8, -62, 0)]  # ETIME: the pipe is still empty
            os.write(w, b"x")
            assert ring.wait(1) == [(7, 1, 0)]  # POLLIN
    finally:
        os.close(r)
        os.close(w)


def test_an_eventfd_read_in_the_ring_is_an_interrupt_wait_and_reset_in_one() -> None:
    """What the ublk frontend's hardware-queue loop relies on instead of POLL_ADD + read(2):
    an 8-byte READ of a non-blocking eventfd stays pending (no -EAGAIN CQE) until the
    eventfd is written, then completes with the count and leaves the eventfd reset; one
    queued when the eventfd is already written completes at once."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    count = ctypes.c_uint64()
    try:
        with IoUring(4) as ring:
            ring.prep(IU.IORING_OP_READ, efd, addr=ctypes.addressof(count), length=8,
                      user_data=1)  # fmt: skip
            ring.submit()
            assert ring.completions() == []  # nothing written yet: still pending
            os.eventfd_write(efd, 3)
            assert ring.wait(1) == [(1, 8, 0)] and count.value == 3
            with pytest.raises(BlockingIOError):
                os.eventfd_read(efd)  # the READ consumed the count
            os.eventfd_write(efd, 2)  # an interrupt before the READ is queued again
            ring.prep(IU.IORING_OP_READ, efd, addr=ctypes.addressof(count), length=8,
                      user_data=2)  # fmt: skip
            assert ring.wait(1) == [(2, 8, 0)] and count.value == 2
    finally:
        os.close(efd)


def test_put_packs_one_sqe_and_clears_a_long_command_left_in_the_slot() -> None:
    import struct

    layout = struct.Struct(IU.SQE_CMD16 + "HHiQ")
    assert layout.size == 64
    with IoUring(2, sqe128=True) as ring:
        ring.prep(IU.IORING_OP_NOP, -1, user_data=1, cmd=b"\xff" * 80)  # slot 0, all 128 bytes
        assert ring.wait(1) == [(1, 0, 0)]
        ring.prep(IU.IORING_OP_NOP, -1, user_data=2)  # slot 1
        assert ring.wait(1) == [(2, 0, 0)]
        ring.put(layout, IU.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 7, 9, -5, 1 << 40)
        slot0 = bytes(ring.sqes[:128])
        assert slot0[64:] == bytes(64)  # the old command's tail is gone
        assert struct.unpack_from("<HHiQ", slot0, 48) == (7, 9, -5, 1 << 40)
        assert ring.wait(1) == [(3, 0, 0)]
        for i in range(2):  # a full ring refuses
            ring.put(layout, IU.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0, 10 + i, 0, 0, 0, 0, 0, 0, 0)
        with pytest.raises(IoUringError, match="full"):
            ring.put(layout, IU.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0)
        done = ring.wait(2)
        assert sorted(ud for ud, _, _ in done) == [10, 11]


def _cq_full(ring: IoUring) -> bool:
    return (ring._u32[ring._cq_tail] - ring._u32[ring._cq_head]) & 0xFFFFFFFF >= ring.cq_entries


def test_a_full_cq_answered_with_ebusy_is_reaped_not_spun_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """io_uring_enter(2): with IORING_FEAT_NODROP, EBUSY means "the CQ overflowed: reap, then
    enter again". The fake kernel says EBUSY while the CQ is full; entering again without
    reaping would spin forever (here: fail after 100 entries)."""
    real = IU._syscall
    with IoUring(4) as ring:
        assert ring.cq_entries == 8
        for batch in range(2):  # 8 NOPs complete, none reaped: the CQ is full
            for i in range(4):
                ring.prep(IU.IORING_OP_NOP, -1, user_data=batch * 4 + i)
            ring.submit()
        assert _cq_full(ring)
        entered = {"busy": 0, "all": 0}

        def kernel(nr: int, *args: object) -> int:
            entered["all"] += 1
            if entered["all"] > 100:
                raise AssertionError("io_uring_enter re-entered 100 times without reaping")
            if nr == IU.SYS_io_uring_enter and _cq_full(ring):
                entered["busy"] += 1
                ctypes.set_errno(errno.EBUSY)
                return -1
            return int(real(nr, *args))

        monkeypatch.setattr(IU, "_syscall", kernel)
        ring.prep(IU.IORING_OP_NOP, -1, user_data=8)
        assert ring.submit(wait=1) == 1
        assert entered["busy"] == 1
        # Nothing lost, nothing doubled, in completion order.
        assert [ud for ud, _, _ in ring.completions()] == list(range(9))
        assert ring.completions() == []


def test_busy_with_nothing_to_reap_gives_up_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def kernel(nr: int, *args: object) -> int:
        ctypes.set_errno(errno.EAGAIN)
        return -1

    with IoUring(2) as ring:
        monkeypatch.setattr(IU, "_syscall", kernel)
        monkeypatch.setattr(IoUring, "BUSY_TIMEOUT", 0.05)
        ring.prep(IU.IORING_OP_NOP, -1, user_data=1)
        with pytest.raises(
            IoUringError, match=r"stayed busy for 0.05 s with no completion to reap \(1 SQEs"
        ) as exc:
            ring.submit(wait=1)
        assert exc.value.errno == errno.EAGAIN


def test_sqes_left_by_an_interrupted_enter_are_submitted_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = IU._syscall
    interrupt = [True]

    def kernel(nr: int, *args: object) -> int:
        if nr == IU.SYS_io_uring_enter and interrupt:
            interrupt.pop()
            ctypes.set_errno(errno.EINTR)  # a signal before anything was consumed
            return -1
        return int(real(nr, *args))

    with IoUring(4) as ring:
        monkeypatch.setattr(IU, "_syscall", kernel)
        ring.prep(IU.IORING_OP_NOP, -1, user_data=1)
        assert ring.submit() == 0  # interrupted; the SQE stays queued in the ring
        ring.prep(IU.IORING_OP_NOP, -1, user_data=2)
        assert ring.submit(wait=2) == 2
        assert sorted(ud for ud, _, _ in ring.completions()) == [1, 2]


def test_closed_ring() -> None:
    ring = IoUring(2)
    ring.close()
    ring.close()  # idempotent
    assert ring.fd == -1


# -- ABI against the headers -------------------------------------------------------------------

#: ours == the header's: size, and the offset of every field both versions name (Debian 12's
#: header predates dev_path_len in ublksrv_ctrl_cmd and user_addr in the ring offsets).
FULL = {
    "ublksrv_ctrl_cmd": (U.UblksrvCtrlCmd, ("dev_id", "queue_id", "len", "addr", "data")),
    "ublksrv_io_desc": (U.UblksrvIoDesc, None),
    "ublksrv_io_cmd": (U.UblksrvIoCmd, None),
    "ublk_param_basic": (U.UblkParamBasic, None),
    "ublk_param_discard": (U.UblkParamDiscard, None),
    "io_sqring_offsets": (IU._SqOffsets, ("head", "tail", "ring_mask", "ring_entries", "flags",
                                          "dropped", "array")),
    "io_cqring_offsets": (IU._CqOffsets, ("head", "tail", "ring_mask", "ring_entries",
                                          "overflow", "cqes", "flags")),
    "io_uring_params": (IU.IoUringParams, None),
}  # fmt: skip


def _fields(name: str) -> tuple[str, ...]:
    t, fields = FULL[name]
    return fields or tuple(f[0] for f in t._fields_)


SQE_FIELDS = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data",
              "buf_index", "personality", "file_index", "addr3")  # fmt: skip
MACROS = ("UBLK_CMD_GET_DEV_INFO", "UBLK_CMD_ADD_DEV", "UBLK_CMD_DEL_DEV", "UBLK_CMD_START_DEV",
          "UBLK_CMD_STOP_DEV", "UBLK_CMD_SET_PARAMS", "UBLK_CMD_START_USER_RECOVERY",
          "UBLK_CMD_END_USER_RECOVERY", "UBLK_IO_FETCH_REQ", "UBLK_IO_COMMIT_AND_FETCH_REQ",
          "UBLK_F_USER_RECOVERY", "UBLK_F_USER_RECOVERY_REISSUE", "UBLK_S_DEV_QUIESCED",
          "UBLK_IO_OP_WRITE_ZEROES", "UBLK_ATTR_VOLATILE_CACHE", "UBLK_PARAM_TYPE_DISCARD",
          "UBLKSRV_CMD_BUF_OFFSET", "IORING_SETUP_SQE128", "IORING_OFF_SQES",
          "IORING_OP_URING_CMD", "IORING_OP_READ", "IORING_OP_WRITE", "IORING_FEAT_SINGLE_MMAP",
          "IORING_OP_POLL_ADD", "IORING_OP_TIMEOUT")  # fmt: skip


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    if not shutil.which("gcc") or not Path("/usr/include/linux/ublk_cmd.h").exists():
        pytest.skip("gcc or the uapi headers are missing: `apt-get install gcc linux-libc-dev`")
    lines = []
    for name in FULL:
        offs = " ".join(f'printf(" %zu", offsetof(struct {name}, {f}));' for f in _fields(name))
        lines.append(f'printf("{name} %zu", sizeof(struct {name})); {offs} printf("\\n");')
    offs = " ".join(f'printf(" %zu", offsetof(struct io_uring_sqe, {f}));' for f in SQE_FIELDS)
    lines.append(f'printf("io_uring_sqe %zu", sizeof(struct io_uring_sqe)); {offs} printf("\\n");')
    common = ("nr_hw_queues", "queue_depth", "state", "max_io_buf_bytes", "dev_id", "ublksrv_pid",
              "flags", "ublksrv_flags")  # fmt: skip
    offs = " ".join(f'printf(" %zu", offsetof(struct ublksrv_ctrl_dev_info, {f}));' for f in common)
    lines.append(
        f'printf("dev_info %zu", sizeof(struct ublksrv_ctrl_dev_info)); {offs} printf("\\n");'
    )
    lines.append('printf("ublk_params %zu %zu\\n", offsetof(struct ublk_params, basic), '
                 "offsetof(struct ublk_params, discard));")  # fmt: skip
    lines += [f'printf("{m} %llu\\n", (unsigned long long)({m}));' for m in MACROS]
    src = tmp_path_factory.mktemp("uring") / "abi.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/io_uring.h>\n"
                   "#include <linux/ublk_cmd.h>\nint main(void) {\n" + "\n".join(lines)
                   + "\nreturn 0; }\n")  # fmt: skip
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in out.splitlines()}


@pytest.mark.parametrize("name", sorted(FULL))
def test_struct_layouts(header: dict[str, list[int]], name: str) -> None:
    t = FULL[name][0]
    assert [ctypes.sizeof(t)] + [getattr(t, f).offset for f in _fields(name)] == header[name]


def test_sqe_and_dev_info_and_params(header: dict[str, list[int]]) -> None:
    # SQE_HEAD packs the fields in header order; its offsets are the header's.
    import struct

    sizes = [struct.calcsize("<" + c) for c in "BBHiQQIIQHHi"]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))] + [IU.SQE_CMD_OFFSET]
    assert header["io_uring_sqe"] == [64, *offsets]
    # Debian 12's header calls the owner ids reserved0; the common fields must agree.
    d = U.UblksrvCtrlDevInfo
    assert header["dev_info"] == [ctypes.sizeof(d)] + [
        getattr(d, f).offset for f in ("nr_hw_queues", "queue_depth", "state", "max_io_buf_bytes",
                                       "dev_id", "ublksrv_pid", "flags", "ublksrv_flags")]  # fmt: skip
    assert header["ublk_params"] == [U.UblkParams.basic.offset, U.UblkParams.discard.offset]


@pytest.mark.parametrize("name", MACROS)
def test_constants(header: dict[str, list[int]], name: str) -> None:
    ours = getattr(U, name, None)
    if ours is None:
        ours = getattr(IU, name)
    assert ours == header[name][0]


def test_ioctl_encoded_commands_and_descriptor_mmap() -> None:
    # Linux 6.12 ublk_cmd.h: _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) and friends.
    assert U.UBLK_U_CMD_ADD_DEV == 0xC0207504
    assert U.UBLK_U_CMD_GET_DEV_INFO == 0x80207502
    assert U.UBLK_U_IO_FETCH_REQ == 0xC0107520
    assert U.UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xC0107521
    # Queue q's descriptors sit at q * round_up(4096 * 24, 4096); the mapping is depth * 24.
    assert U.cmd_buf_offset(0) == 0 and U.cmd_buf_offset(3) == 3 * 98304
    assert U.cmd_buf_size(64) == 4096 and U.cmd_buf_size(200) == 8192
