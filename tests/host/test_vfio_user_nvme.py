"""udrv's NVMe driver on the NVMe model, over vfio-user: bring-up, I/O, errors, faults."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

import udrv
from udrv.core.device import Device
from udrv.drivers.nvme import AsyncNvme, Nvme
from udrv.drivers.nvme.command import SF_DNR
from udrv.drivers.nvme.driver import NvmeError
from udrv.errors import PollTimeout
from udrv.kernel.vfio import VfioPciRegion
from udrv.models.nvme import (
    ACQ,
    AQA,
    ASQ,
    CC,
    CC_EN,
    CSTS,
    CSTS_RDY,
    SC_LBA_OUT_OF_RANGE,
    NvmeModel,
)
from udrv.models.pci import PCI_COMMAND_MASTER

from .vfio_user_helpers import served


@pytest.fixture
def nvme_dev() -> Iterator[tuple[NvmeModel, Device]]:
    model = NvmeModel(size=8 << 20, max_queues=4)
    with served(model) as (_, path):
        dev = udrv.open(f"vfio-user:{path}")
        try:
            yield model, dev
        finally:
            dev.close()


def test_bring_up_and_identify(nvme_dev: tuple[NvmeModel, Device]) -> None:
    model, dev = nvme_dev
    with Nvme(dev, queues=3, depth=16) as n:
        assert n.controller.model == "udrv NVMe model" and n.controller.mdts == 128 * 1024
        assert n.active_namespaces() == [1]
        assert (n.namespace.blocks, n.namespace.block_size) == (16384, 512)
        assert len(n.io) == 3 and sorted(model.sqs) == [0, 1, 2, 3]
        assert [q.vector for q in n.io] == n.dev.irq.vectors[1:]  # MSI-X vector per CQ
        assert model.config.msix_enabled
    assert model.csts & 0xC == 0x8  # CSTS.SHST: shutdown complete
    assert sorted(model.sqs) == [0] and sorted(model.cqs) == [0]  # I/O queues deleted


@pytest.mark.parametrize("length", [512, 4096, 8192, 12288, 128 * 1024, 300 * 1024 + 512])
def test_read_write_prps_and_lists(nvme_dev: tuple[NvmeModel, Device], length: int) -> None:
    """One page, two pages (PRP2 a page), more (PRP2 a PRP list), several commands."""
    model, dev = nvme_dev
    data = os.urandom(length)
    with Nvme(dev, depth=8) as n:
        n.write(512 * 7, memoryview(data))
        assert model._store_read(512 * 7, length) == data  # it reached the medium
        back = bytearray(length)
        n.read(512 * 7, memoryview(back))
        assert back == data
    assert model.faults == []


def test_flush_write_zeroes_discard(nvme_dev: tuple[NvmeModel, Device]) -> None:
    model, dev = nvme_dev
    with Nvme(dev) as n:
        n.write(0, memoryview(b"\xff" * 16384))
        n.write_zeroes(0, 4096)
        n.discard(8192, 4096)
        n.flush()
    assert model._store_read(0, 4096) == bytes(4096)
    assert model._store_read(4096, 4096) == b"\xff" * 4096
    assert model._store_read(8192, 4096) == bytes(4096)
    assert model._store_read(12288, 4096) == b"\xff" * 4096


def test_lba_out_of_range_is_a_status(nvme_dev: tuple[NvmeModel, Device]) -> None:
    """The namespace shrinks under the driver: its next read past the end fails with the
    controller's status, LBA Out of Range (SCT 0, SC 0x80)."""
    model, dev = nvme_dev
    with Nvme(dev) as n:
        model.blocks = 8
        with pytest.raises(NvmeError, match="LBA out of range") as exc:
            n.read(8 * 512, memoryview(bytearray(512)))
        assert exc.value.status is not None and exc.value.status & 0xFF == SC_LBA_OUT_OF_RANGE
        n.read(0, memoryview(bytearray(512)))  # inside: fine


def test_injected_status_error(nvme_dev: tuple[NvmeModel, Device]) -> None:
    """A retryable error (DNR=0) is retried and the read succeeds; one marked Do Not Retry
    reaches the caller."""
    model, dev = nvme_dev
    with Nvme(dev) as n:
        model.inject.status = 0x06  # Internal Error, retryable: fires once, the retry succeeds
        n.read(0, memoryview(bytearray(512)))
        assert model.inject.status is None
        model.inject.status = 0x06 | SF_DNR
        with pytest.raises(NvmeError, match="internal error"):
            n.read(0, memoryview(bytearray(512)))
        n.read(0, memoryview(bytearray(512)))  # fires once


def test_injected_wrong_command_id(nvme_dev: tuple[NvmeModel, Device]) -> None:
    """A completion for a command id nobody waits for is consumed and counted; the command
    it should have completed times out (and keeps its buffers: the controller is disabled)."""
    model, dev = nvme_dev
    n = Nvme(dev, timeout=0.3, admin_timeout=0.3)
    model.inject.wrong_cid = True
    with pytest.raises((NvmeError, PollTimeout)):
        n.flush()
    assert sum(q.stray for q in n.io) == 1
    with pytest.raises(NvmeError, match="disabled"):
        n.flush()
    n.dev.close()  # the controller was disabled: no clean shutdown to do


def test_lost_completion_times_out(nvme_dev: tuple[NvmeModel, Device]) -> None:
    model, dev = nvme_dev
    with Nvme(dev, timeout=0.3) as n:
        model.inject.drop_completion = True
        with pytest.raises(PollTimeout):
            n.flush()
        n.dev.close()  # the queue is out of step now: do not try a clean shutdown


def test_dma_outside_mapped_memory_is_a_transfer_error() -> None:
    """The server loses the driver's memory (here: every DMA mapping dropped): the command
    completes with Data Transfer Error instead of touching anything."""
    model = NvmeModel(size=1 << 20)
    with served(model) as (server, path), udrv.open(f"vfio-user:{path}") as dev:
        n = Nvme(dev)
        assert server.connection is not None
        with model.lock:
            queues = {r.addr for r in server.connection.dma if r.size < 64 * 1024}
            # keep the queues (small buffers), drop the data buffers
            server.connection.dma = [r for r in server.connection.dma if r.addr in queues]
        with pytest.raises(NvmeError, match="data transfer error"):
            n.read(0, memoryview(bytearray(128 * 1024)))
        assert "not in memory the client mapped" in model.faults[-1]
        dev.close()


def test_async_driver_interrupt_per_queue(nvme_dev: tuple[NvmeModel, Device]) -> None:
    model, dev = nvme_dev
    data = os.urandom(64 * 1024)

    async def main(a: AsyncNvme) -> bytes:
        await asyncio.gather(*(a.write(i * 8192, memoryview(data[i * 8192 : (i + 1) * 8192])) for i in range(8)))  # fmt: skip
        out = bytearray(len(data))
        await a.read(0, memoryview(out))
        return bytes(out)

    with Nvme(dev, queues=2, depth=16) as n:
        a = AsyncNvme(n, timeout=5.0)
        assert asyncio.run(main(a)) == data
    assert model.faults == []


def test_bad_admin_queue_setup_sets_cfs(nvme_dev: tuple[NvmeModel, Device]) -> None:
    model, dev = nvme_dev
    bar = dev.bar(0)
    bar.write32(0x24, 0)  # AQA: 1-entry queues are invalid
    bar.write32(0x14, 1)
    assert bar.read32(0x1C) & 0x2  # CSTS.CFS
    assert "enabled with AQA" in model.faults[-1]


def test_file_backed_namespace(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "disk.img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    model = NvmeModel(backing=path)
    with served(model) as (_, sock), udrv.open(f"vfio-user:{sock}") as dev, Nvme(dev) as n:
        n.write(4096, memoryview(b"persist!" * 64))
        n.flush()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(512) == b"persist!" * 64


def test_surprise_removal_is_reported(nvme_dev: tuple[NvmeModel, Device]) -> None:
    """Registers read all-ones: the driver must not wait forever and must say the controller
    is dead (CSTS.CFS reads set) or gone (the whole register reads all-ones)."""
    model, dev = nvme_dev
    n = Nvme(dev, timeout=0.3)
    model.surprise_remove()
    with pytest.raises((PollTimeout, NvmeError), match=r"CSTS\.CFS|all-ones"):
        n.flush()
    dev.close()


def test_abort_answers_not_aborted() -> None:
    """Abort (5.1) is accepted; nothing is ever pending in the model, so DW0 bit 0 says
    "not aborted", which the spec allows (udrv's driver aborts commands that time out)."""
    model = NvmeModel(size=1 << 20)
    dw = [0x08] + [0] * 9 + [(7 << 16) | 1] + [0] * 5  # Abort CID 7 on SQ 1
    assert model._admin(0x08, dw) == 1


class AccessOrder(NvmeModel):
    """The model, recording in order what a driver's bring-up does to Bus Master Enable
    (PCI command register bit 2), CC.EN and CSTS.RDY (Base 2.0 §3.1.4.5, §3.1.4.6)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.events: list[str] = []

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self.lock:
            master = self.config.command & PCI_COMMAND_MASTER
            super().region_write(index, offset, data)
            if index == VfioPciRegion.CONFIG and master != self.config.command & PCI_COMMAND_MASTER:
                self.events.append(f"BME={int(not master)}")
            elif index == 0 and offset == CC and len(data) == 4:
                self.events.append(f"CC.EN={int.from_bytes(data, 'little') & CC_EN}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        data = super().region_read(index, offset, count)
        if index == 0 and offset == CSTS and count == 4:
            self.events.append(f"CSTS.RDY={data[0] & CSTS_RDY}")
        return data


def test_bus_mastering_waits_until_a_controller_left_enabled_is_disabled() -> None:
    """A driver that died (under UIO, no reset between owners) left the controller enabled,
    its queues pointing at memory that is no longer its own, and Bus Master Enable cleared
    (what closing the device does). Until CC.EN = 0 has taken effect (CSTS.RDY = 0) the
    controller may still fetch from those queues: the new driver must set Bus Master Enable
    only after that (Base 2.0 §3.5.1: initialisation starts from CSTS.RDY = 0)."""
    model = AccessOrder(size=1 << 20)
    # The dead driver's controller: admin queues at addresses it mapped, enabled and ready.
    model.mmio_write(AQA, 4, (31 << 16) | 31)
    model.mmio_write(ASQ, 8, 0x7000_0000)
    model.mmio_write(ACQ, 8, 0x7001_0000)
    model.mmio_write(CC, 4, CC_EN | (6 << 16) | (4 << 20))
    assert model.csts & CSTS_RDY and not model.config.command & PCI_COMMAND_MASTER
    with served(model) as (_, path), udrv.open(f"vfio-user:{path}") as dev:
        with Nvme(dev, depth=8) as n:
            assert n.active_namespaces() == [1]
        ev = model.events
    assert "BME=1" in ev and "CC.EN=0" in ev, ev
    disabled = ev.index("CC.EN=0")
    assert "CSTS.RDY=0" in ev[disabled:], ev
    not_ready = ev.index("CSTS.RDY=0", disabled)
    assert ev.index("BME=1") > not_ready, f"Bus Master Enable set before CSTS.RDY = 0: {ev}"
    # and before the new admin queue is enabled, which needs DMA
    assert ev.index("BME=1") < ev.index("CC.EN=1", not_ready), ev
    assert model.faults == []
