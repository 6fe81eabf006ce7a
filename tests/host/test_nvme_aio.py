"""AsyncNvme against the model controller: retries, and a timed-out command's slot (its
bounce buffer) kept until the controller has completed it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.host.nvme_fake import FakeDevice, FakeNvme, Model
from udrv.drivers.nvme import AsyncNvme, Nvme, NvmeError
from udrv.drivers.nvme import command as C
from udrv.errors import PollTimeout


def make(model: Model, timeout: float = 30.0) -> tuple[AsyncNvme, FakeNvme]:
    ctrl = FakeNvme(model)
    nvme = Nvme(FakeDevice(ctrl), depth=8, interrupts=False, admin_timeout=0.5)
    return AsyncNvme(nvme, timeout=timeout), ctrl


def flushes(ctrl: FakeNvme) -> int:
    return sum(1 for q, e in ctrl.commands if q and int(e["opcode"]) == C.NVM_FLUSH)


def test_retryable_failures_are_retried() -> None:
    left = {"n": 2, "status": 0x06}

    def policy(qid: int, e: Any) -> Any:
        if qid and int(e["opcode"]) == C.NVM_FLUSH and left["n"]:
            left["n"] -= 1
            return left["status"]
        return None

    drv, ctrl = make(Model(policy=policy))

    async def main() -> None:
        await drv.flush()
        assert flushes(ctrl) == 3
        left.update(n=1, status=0x06 | C.SF_DNR)
        with pytest.raises(NvmeError, match="do not retry"):
            await drv.flush()
        assert flushes(ctrl) == 4

    asyncio.run(main())
    drv.close()


def test_timed_out_slot_is_kept_until_the_controller_completes_it() -> None:
    def hold_reads(qid: int, e: Any) -> Any:
        return "hold" if qid and int(e["opcode"]) == C.NVM_READ else None

    drv, ctrl = make(Model(policy=hold_reads), timeout=0.3)

    async def main() -> None:
        with pytest.raises(PollTimeout, match=r"did not complete within 0\.3 s"):
            await drv.read(0, memoryview(bytearray(4096)))
        (lq,) = drv._queues.values()
        (cid,) = lq.lost
        assert cid not in lq.free  # its buffer is still the controller's
        for _ in range(100):  # the Abort runs in an executor thread
            if not ctrl.held:
                break
            await asyncio.sleep(0.02)
        assert not ctrl.held  # aborted: its completion is in the CQ
        await drv.flush()  # reaps it
        assert not lq.lost and cid in lq.free

    asyncio.run(main())
    drv.close()
