"""NvmeHardwareQueue's tag ownership: a tag (and the DMA buffer the kernel lends through it)
goes back to the frontend only when the controller is done with it."""

from __future__ import annotations

import errno
from typing import Any

from tests.host.nvme_fake import FakeDevice, FakeNvme, Model
from udrv.block.queue import Op
from udrv.drivers.nvme import Nvme
from udrv.drivers.nvme import command as C
from udrv.drivers.nvme.hwqueue import NvmeHardwareQueue

MT = 64 * 1024


def make(model: Model | None = None, timeout: float = 2) -> tuple[NvmeHardwareQueue, FakeNvme]:
    ctrl = FakeNvme(model)
    nvme = Nvme(FakeDevice(ctrl), depth=8, interrupts=False, admin_timeout=0.05)
    return NvmeHardwareQueue(nvme, nvme.io[0], 4, max_transfer=MT, timeout=timeout), ctrl


def hold_tag0_reads(qid: int, e: Any) -> Any:
    held = qid and int(e["opcode"]) == C.NVM_READ and int(e["cid"]) & 0xFFF == 0
    return "hold" if held else None


def run(hq: NvmeHardwareQueue, tag: int, op: Op, offset: int, length: int) -> None:
    assert hq.queue_rq(tag, int(op), offset, length) is None
    hq.commit()


def test_reads_writes_and_discard_through_tag_buffers() -> None:
    hq, ctrl = make()
    hq.buffer(1)[: 3 * 4096] = b"a" * 4096 + b"b" * 4096 + b"c" * 4096
    run(hq, 1, Op.WRITE, 8192, 3 * 4096)  # a PRP list
    assert hq.complete() == [(1, 3 * 4096)]
    run(hq, 2, Op.READ, 8192 + 4096, 2 * 4096)
    assert hq.complete() == [(2, 8192)]
    assert bytes(hq.buffer(2)[:8192]) == b"b" * 4096 + b"c" * 4096
    run(hq, 3, Op.DISCARD, 1 << 20, 1 << 20)
    assert hq.complete() == [(3, 1 << 20)]
    assert ctrl.dsm_ranges == [[(0, 2048, 2048)]]


def test_unsupported_features_are_refused_not_sent() -> None:
    hq, ctrl = make(Model(oncs=0))
    assert not hq.nvme.geometry.discard and not hq.nvme.geometry.write_zeroes
    assert hq.queue_rq(0, int(Op.DISCARD), 0, 4096) == -errno.EOPNOTSUPP
    assert hq.queue_rq(0, int(Op.WRITE_ZEROES), 0, 4096) == -errno.EOPNOTSUPP
    assert hq.out == 0 and not [q for q, _ in ctrl.commands if q]


def test_timed_out_tag_stays_out_until_the_abort_completes_it() -> None:
    hq, ctrl = make(Model(policy=hold_tag0_reads), timeout=2)
    run(hq, 0, Op.READ, 0, 4096)
    run(hq, 1, Op.READ, 4096, 4096)  # tag 1 completes normally
    assert hq.complete() == [(1, 4096)]
    assert [hq.expire() for _ in range(2)] == [[], []]
    assert not [e for q, e in ctrl.commands if q == 0 and int(e["opcode"]) == C.ADMIN_ABORT]
    # Over 2 s: aborted, but the tag is not handed back: the device still owns its buffer.
    assert hq.expire() == []
    aborts = [e for q, e in ctrl.commands if q == 0 and int(e["opcode"]) == C.ADMIN_ABORT]
    assert len(aborts) == 1 and int(aborts[0]["cdw10"]) >> 16 & 0xFFF == 0
    # The controller aborted it: its completion ("Command Abort Requested") frees the tag.
    assert hq.complete() == [(0, -errno.ETIMEDOUT)]
    assert hq.out == 0 and ctrl.disables == 0


def test_a_command_the_abort_cannot_stop_keeps_its_tag_until_the_controller_is_disabled() -> None:
    """The bug of issue 15 item 2: the old expire() returned the tag at the timeout while the
    controller still held the READ; the kernel then reused the buffer under a late DMA."""
    hq, ctrl = make(Model(policy=hold_tag0_reads, abort_works=False), timeout=2)
    run(hq, 0, Op.READ, 0, 4096)
    assert [hq.expire() for _ in range(5)] == [[]] * 5  # aborted at tick 3
    assert ctrl.held and ctrl.disables == 0 and hq.complete() == []
    assert hq.expire() == [(0, -errno.EIO)]  # still out a timeout after its Abort
    assert ctrl.disables == 1 and not ctrl.held  # disabled first: it owns nothing now
    assert hq.out == 0 and hq.queue_rq(1, int(Op.READ), 0, 4096) == -errno.EIO


def test_late_completion_after_abort_and_stale_generations() -> None:
    """A command that completes successfully after its Abort was refused is a success; a
    completion for a generation that is not out is dropped and counted."""
    hq, ctrl = make(Model(policy=hold_tag0_reads, abort_works=False), timeout=1)
    run(hq, 0, Op.READ, 0, 4096)
    hq.expire(), hq.expire()
    assert hq.complete() == []
    cid = ctrl.held[0].cid
    ctrl.release()
    assert hq.complete() == [(0, 4096)]
    ctrl.post(1, cid)  # the same completion again: that generation is no longer out
    ctrl.post(1, 0xFFF)  # a tag that does not exist
    assert hq.complete() == [] and hq.q.stray == 2


def test_retryable_failures_are_resubmitted_with_a_new_generation() -> None:
    left = {"n": 2}

    def policy(qid: int, e: Any) -> Any:
        if qid and int(e["opcode"]) == C.NVM_FLUSH and left["n"]:
            left["n"] -= 1
            return 0x06  # internal error, DNR clear
        return None

    hq, ctrl = make(Model(policy=policy))
    run(hq, 2, Op.FLUSH, 0, 0)
    done = []
    for _ in range(3):
        done += hq.complete()
    assert done == [(2, 0)] and hq.retried == 2
    cids = [int(e["cid"]) for q, e in ctrl.commands if q and int(e["opcode"]) == C.NVM_FLUSH]
    assert len(set(cids)) == 3 and {c & 0xFFF for c in cids} == {2}
    left["n"] = 1
    ctrl.m.policy = lambda q, e: (0x06 | C.SF_DNR) if q else None
    run(hq, 3, Op.FLUSH, 0, 0)
    assert hq.complete() == [(3, -errno.EIO)]


def test_dead_controller_fails_everything_at_once() -> None:
    hq, ctrl = make(Model(policy=hold_tag0_reads), timeout=1)
    run(hq, 0, Op.READ, 0, 4096)
    ctrl.removed = True
    hq.expire()
    assert hq.expire() == [(0, -errno.EIO)] and hq.nvme.failed is not None
