"""The NVMe driver's synchronous path and its decisions from Identify data, against a model
controller (tests/host/nvme_fake.py) built from the specification."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.host.nvme_fake import FakeDevice, FakeNvme, Model
from udrv.drivers.nvme import Nvme, NvmeError
from udrv.drivers.nvme import command as C
from udrv.drivers.nvme import driver as D
from udrv.drivers.nvme.driver import NvmeRemovedError
from udrv.errors import PollTimeout


def make(model: Model | None = None, msix: int = 0, **kw: Any) -> tuple[Nvme, FakeNvme]:
    ctrl = FakeNvme(model)
    return Nvme(FakeDevice(ctrl, msix), interrupts=msix > 0, **kw), ctrl


def ops(ctrl: FakeNvme, qid: int) -> list[int]:
    return [int(e["opcode"]) for q, e in ctrl.commands if q == qid]


def test_bring_up_and_round_trip_through_prp_lists() -> None:
    nvme, ctrl = make(queues=2, depth=16)
    assert ops(ctrl, 0)[:4] == [C.ADMIN_IDENTIFY, C.ADMIN_IDENTIFY, C.ADMIN_IDENTIFY,
                                C.ADMIN_SET_FEATURES]  # fmt: skip
    assert ops(ctrl, 0)[4:] == [C.ADMIN_CREATE_CQ, C.ADMIN_CREATE_SQ] * 2
    assert len(nvme.io) == 2 and nvme.geometry.size == 65536 * 512
    for offset, size in ((0, 512), (4096, 8192), (1 << 20, 300 * 1024), (512, 512 * 1024 + 512)):
        data = os.urandom(size)
        nvme.write(offset, memoryview(data))
        back = bytearray(size)
        nvme.read(offset, memoryview(back))
        assert back == data, (offset, size)
    nvme.close()
    assert ctrl.csts >> 2 & 3 == 2  # shutdown complete
    assert ops(ctrl, 0)[-4:] == [C.ADMIN_DELETE_SQ, C.ADMIN_DELETE_CQ] * 2


def test_features_follow_oncs_and_vwc() -> None:
    nvme, ctrl = make(Model(oncs=0, vwc=0))
    g = nvme.geometry
    assert (g.discard, g.write_zeroes, g.volatile_cache, g.max_write_zeroes) == (False,) * 3 + (0,)
    with pytest.raises(NvmeError, match=r"discard is not supported: .*ONCS bit 2"):
        nvme.discard(0, 4096)
    with pytest.raises(NvmeError, match=r"write zeroes is not supported: .*ONCS bit 3"):
        nvme.write_zeroes(0, 4096)
    assert not [
        e for q, e in ctrl.commands if q and int(e["opcode"]) in (C.NVM_DSM, C.NVM_WRITE_ZEROES)
    ]
    g = make(Model(oncs=0x04, vwc=1))[0].geometry
    assert (g.discard, g.write_zeroes, g.volatile_cache) == (True, False, True)
    g = make(Model(oncs=0x08, vwc=0))[0].geometry
    assert (g.discard, g.write_zeroes, g.volatile_cache) == (False, True, False)


def test_write_zeroes_is_capped_by_mdts_and_split() -> None:
    """MDTS 3 with 4 KiB pages: 32 KiB per command, so 100 KiB takes four commands."""
    nvme, ctrl = make(Model(mdts=3))
    assert nvme.geometry.max_write_zeroes == 32 * 1024 and nvme.geometry.max_transfer == 32 * 1024
    nvme.write(0, memoryview(b"\xff" * 200 * 512))
    nvme.write_zeroes(0, 100 * 1024)
    wz = [e for q, e in ctrl.commands if q and int(e["opcode"]) == C.NVM_WRITE_ZEROES]
    assert [(int(e["cdw10"]), (int(e["cdw12"]) & 0xFFFF) + 1) for e in wz] == [
        (0, 64), (64, 64), (128, 64), (192, 8)]  # fmt: skip
    back = bytearray(200 * 512)
    nvme.read(0, memoryview(back))
    assert back == bytes(200 * 512)


def test_discard_sends_several_ranges_in_one_command() -> None:
    """A namespace of 2**33 blocks: discarding all of it needs three ranges of at most
    2**32 - 1 blocks, in one Dataset Management command (NR = 2)."""
    nvme, ctrl = make(Model(nsze=1 << 33))
    nvme.discard(0, (1 << 33) * 512)
    assert ctrl.dsm_ranges == [[(0, C.DSM_MAX_BLOCKS, 0), (0, C.DSM_MAX_BLOCKS, C.DSM_MAX_BLOCKS),
                                (0, 2, 2 * C.DSM_MAX_BLOCKS)]]  # fmt: skip
    dsm = [e for q, e in ctrl.commands if q and int(e["opcode"]) == C.NVM_DSM]
    assert int(dsm[0]["cdw10"]) == 2 and int(dsm[0]["cdw11"]) == C.DSM_AD


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Model(lbafs=[(8, 9), (0, 12)]), r"8 bytes of metadata per block.*--lbaf=1"),
        (Model(lbafs=[(8, 9)], flbas=0x10), r"8 bytes of extended metadata.*no LBA format without"),
        (Model(dps=1, lbafs=[(0, 9)]), r"protection information type 1"),
    ],
)
def test_namespaces_with_metadata_or_protection_are_refused(model: Model, message: str) -> None:
    with pytest.raises(NvmeError, match=r"0000:00:05.0: cannot serve namespace 1: .*" + message):
        make(model)


def test_version_1_0_scans_namespaces_without_cns_02h() -> None:
    nvme, ctrl = make(Model(version=0x0001_0000, nn=3))
    assert nvme.active_namespaces() == [1, 2, 3]
    cns = [int(e["cdw10"]) & 0xFF for q, e in ctrl.commands if int(e["opcode"]) == C.ADMIN_IDENTIFY]
    assert C.CNS_ACTIVE_NS_LIST not in cns
    nvme, ctrl = make(Model(version=0x0001_0100, nn=2))
    assert nvme.active_namespaces() == [1, 2]


def test_minimum_page_size_above_4k_is_refused() -> None:
    with pytest.raises(NvmeError, match=r"smallest memory page \(CAP.MPSMIN\) is 16 KiB"):
        make(Model(mpsmin=2))


@pytest.mark.parametrize(
    ("rtd3e", "minimum", "expected"),
    [(0, 5.0, 5.0), (1_000_000, 5.0, 5.0), (10_500_000, 5.0, 10.0), (120_000_000, 5.0, 60.0),
     (0, 8.0, 8.0), (3_000_000, 2.0, 3.0)],
)  # fmt: skip
def test_shutdown_time_is_rtd3e_clamped_as_linux(
    rtd3e: int, minimum: float, expected: float
) -> None:
    assert D.shutdown_time(rtd3e, minimum) == expected


def test_shutdown_waits_rtd3e() -> None:
    nvme, _ = make(Model(rtd3e=20_000_000))
    assert nvme.shutdown_timeout == 20.0


@pytest.mark.parametrize(
    ("available", "queues", "expected"),
    [
        (5, 4, (5, [1, 2, 3, 4])),  # enough: admin on 0, queue i on i
        (3, 4, (3, [0, 1, 2, None])),  # fewer: queue 1 shares 0 with admin, queue 4 polled
        (1, 2, (1, [0, None])),
        (0, 2, (0, [None, None])),
    ],
)
def test_vector_plan(available: int, queues: int, expected: tuple[int, list[int | None]]) -> None:
    assert D.vector_plan(available, queues) == expected


def test_fewer_msix_vectors_than_queues_share_and_poll() -> None:
    nvme, ctrl = make(msix=2, queues=3)
    assert nvme.dev.irq.calls == [("msix", 2)]
    assert [q.vector.n if q.vector else None for q in nvme.io] == [0, 1, None]
    assert [ctrl.cqs[q].vector for q in (1, 2, 3)] == [0, 1, None]
    assert ctrl.intms == 0  # INTMS is reserved under MSI-X


def test_polled_controller_masks_pin_interrupts() -> None:
    _, ctrl = make(queues=1)
    assert ctrl.intms == 0xFFFF_FFFF and ctrl.cqs[1].vector is None


# -- recovery --------------------------------------------------------------------------------


def test_a_completion_for_an_unknown_command_is_consumed() -> None:
    """A stray CQE ahead of the real one: counted, the CQ head moves past it, and the command
    and the next ones still complete."""
    nvme, ctrl = make()
    q = nvme.io[0]
    ctrl.post(1, 0x7777)  # nobody sent 0x7777
    nvme.flush()
    assert q.stray == 1 and q.head == 2
    assert ctrl.events[-1] == "cq1"  # the CQ head doorbell told the controller
    nvme.write(0, memoryview(b"x" * 512))
    assert q.stray == 1


def test_retryable_errors_are_retried_and_dnr_ones_are_not() -> None:
    fails = {"n": 2, "status": 0x06}  # internal error, DNR clear

    def policy(qid: int, e: Any) -> Any:
        if qid and int(e["opcode"]) == C.NVM_FLUSH and fails["n"]:
            fails["n"] -= 1
            return fails["status"]
        return None

    nvme, ctrl = make(Model(policy=policy), retries=5)
    nvme.flush()  # two failures, then success
    assert ops(ctrl, 1).count(C.NVM_FLUSH) == 3
    fails.update(n=1, status=0x06 | C.SF_DNR)
    with pytest.raises(NvmeError, match=r"SC 0x06.*do not retry") as info:
        nvme.flush()
    assert info.value.status == 0x06 | C.SF_DNR and ops(ctrl, 1).count(C.NVM_FLUSH) == 4
    fails.update(n=10, status=0x06)
    with pytest.raises(NvmeError, match="internal error"):
        nvme.flush()
    assert ops(ctrl, 1).count(C.NVM_FLUSH) == 4 + 6  # first try and five retries


def hold_reads(qid: int, e: Any) -> Any:
    return "hold" if qid and int(e["opcode"]) == C.NVM_READ else None


def test_a_timed_out_command_is_aborted() -> None:
    nvme, ctrl = make(Model(policy=hold_reads), timeout=0.05)
    with pytest.raises(PollTimeout, match=r"did not complete within 0.05 s; aborted "
                                          r"\(SCT 0 SC 0x07"):  # fmt: skip
        nvme.read(0, memoryview(bytearray(512)))
    aborts = [e for q, e in ctrl.commands if q == 0 and int(e["opcode"]) == C.ADMIN_ABORT]
    assert len(aborts) == 1 and int(aborts[0]["cdw10"]) & 0xFFFF == 1  # SQID 1
    assert ctrl.disables == 0 and nvme.failed is None
    nvme.write(0, memoryview(b"y" * 512))  # the queue still works


def test_a_command_that_outlives_its_abort_disables_the_controller() -> None:
    """The device keeps the command (and may still DMA into the bounce buffer): the driver
    disables the controller before anyone can reuse the buffer, then refuses commands."""
    nvme, ctrl = make(Model(policy=hold_reads, abort_works=False), timeout=0.05)
    with pytest.raises(PollTimeout, match="the controller was disabled"):
        nvme.read(0, memoryview(bytearray(512)))
    assert ctrl.disables == 1 and not ctrl.held  # CC.EN 1 -> 0 dropped the command
    with pytest.raises(NvmeError, match=r"disabled after: .*did not complete"):
        nvme.flush()
    nvme.close()  # no shutdown of a disabled controller, no error


def test_all_ones_csts_is_reported_as_removal() -> None:
    nvme, ctrl = make(Model(policy=hold_reads), timeout=0.05)
    ctrl.removed = True
    with pytest.raises(NvmeRemovedError, match="CSTS reads all-ones: the device is gone"):
        nvme.read(0, memoryview(bytearray(512)))
    with pytest.raises(NvmeRemovedError, match="CAP reads all-ones"):
        Nvme(FakeDevice(ctrl), interrupts=False)


def test_barriers_between_sqe_and_doorbell_and_after_the_phase_bit(monkeypatch: Any) -> None:
    nvme, ctrl = make()
    events = ctrl.events
    events.clear()
    monkeypatch.setattr(D, "wmb", lambda: events.append("wmb"))
    monkeypatch.setattr(D, "dma_rmb", lambda: events.append("dma_rmb"))
    nvme.flush()
    assert events == ["wmb", "sq1", "dma_rmb", "cq1"]
