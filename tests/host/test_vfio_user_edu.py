"""udrv's edu driver on the edu model, over vfio-user: no root, no QEMU."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import udrv
from udrv.backends.vfio_user import VfioUserDevice
from udrv.dma import Direction
from udrv.drivers.edu import Edu
from udrv.drivers.edu import regs as R
from udrv.drivers.edu.driver import EduError, EduRemovedError
from udrv.errors import DeviceRemovedError, PollTimeout, RegionError, VfioUserError
from udrv.models.edu import EduModel

from .vfio_user_helpers import served


@pytest.fixture
def edu() -> Iterator[tuple[EduModel, VfioUserDevice]]:
    model = EduModel()
    with served(model) as (_, path):
        dev = udrv.open(f"vfio-user:{path}")
        assert isinstance(dev, VfioUserDevice)
        try:
            yield model, dev
        finally:
            dev.close()


def test_identification_and_config(edu: tuple[EduModel, VfioUserDevice]) -> None:
    _, dev = edu
    assert dev.config.read16(0) == 0x1234 and dev.config.read16(2) == 0x11E8
    assert dev.config.read32(0x08) >> 8 == 0x00FF00  # class
    assert dev.bar(0).read32(R.IDENT) == 0x010000ED
    info = dev.region_info(0)
    assert info.size == 1 << 20 and info.kind.value == "memory"
    with pytest.raises(RegionError, match="BAR1 is not implemented"):
        dev.bar(1)


def test_bar_sizing_through_config_space(edu: tuple[EduModel, VfioUserDevice]) -> None:
    _, dev = edu
    dev.config.write32(0x10, 0xFFFF_FFFF)
    assert dev.config.read32(0x10) == 0xFFF0_0000  # 1 MiB, 32-bit memory (PCI 3.0 6.2.5.1)
    dev.config.write16(0x00, 0xBEEF)
    assert dev.config.read16(0x00) == 0x1234  # read-only


@pytest.mark.parametrize("interrupts", ["msi", "intx", None])
def test_driver_selftest(edu: tuple[EduModel, VfioUserDevice], interrupts: str | None) -> None:
    model, dev = edu
    with Edu(dev, interrupts=interrupts, timeout=2.0) as e:
        assert e.version == (1, 0)
        assert e.check_liveness(0x12345678) and e.check_liveness(0)
        assert e.factorial(10) == 3628800
        assert e.factorial(13) == 6227020800 % 2**32  # modulo 2**32
        assert e.factorial(40, use_irq=False) == 0
        data = os.urandom(1000)
        e.dma_to_device(data, offset=100)
        assert bytes(model.buffer[100:1100]) == data  # it really went into the device
        assert e.dma_from_device(1000, offset=100) == data
        assert dev.irq.enabled == interrupts
        if interrupts == "msi":
            assert model.config.msi_enabled
    assert model.faults == []
    # The driver's close released the interrupts: the server detached the eventfds.
    assert dev.irq.enabled is None and not model.config.msi_enabled


def test_msi_enable_follows_set_irqs(edu: tuple[EduModel, VfioUserDevice]) -> None:
    model, dev = edu
    vec = dev.irq.enable("msi")[0]
    assert model.config.msi_enabled  # as vfio-pci does in the kernel
    dev.bar(0).write32(R.INTR_RAISE, 0x40)
    assert vec.wait(2.0) == 1
    assert dev.bar(0).read32(R.INTR_STATUS) == 0x40
    dev.bar(0).write32(R.INTR_ACK, 0x40)
    assert dev.bar(0).read32(R.INTR_STATUS) == 0
    dev.irq.disable()
    assert not model.config.msi_enabled


def test_intx_is_automasked_until_rearmed(edu: tuple[EduModel, VfioUserDevice]) -> None:
    _, dev = edu
    vec = dev.irq.enable("intx")[0]
    bar = dev.bar(0)
    bar.write32(R.INTR_RAISE, 1)
    assert vec.wait(2.0) == 1
    bar.write32(R.INTR_RAISE, 2)  # line still masked: no second event
    assert vec.wait(0.1) == 0
    vec.rearm()  # still asserted: fires again at once
    assert vec.wait(2.0) == 1
    bar.write32(R.INTR_ACK, 3)
    vec.rearm()
    assert vec.wait(0.1) == 0
    assert dev.config.read16(0x06) & 0x08 == 0  # Interrupt Status clear


def test_dma_through_messages_without_fd(edu: tuple[EduModel, VfioUserDevice]) -> None:
    """``dma.map`` of plain memory has no fd: the model's DMA travels as DMA_READ/DMA_WRITE."""
    model, dev = edu
    dev.set_bus_master()
    dev.dma.set_mask(28)
    dma = dev.dma
    src = bytearray(os.urandom(512))
    dst = bytearray(512)
    bar = dev.bar(0)
    with dma.map(src, Direction.TO_DEVICE) as m_src, dma.map(dst, Direction.FROM_DEVICE) as m_dst:
        for a, b, cmd in (
            (m_src.iova, R.DMA_BUFFER, 0),
            (R.DMA_BUFFER, m_dst.iova, R.DMA_CMD_TO_RAM),
        ):
            bar.write64(R.DMA_SRC, a)
            bar.write64(R.DMA_DST, b)
            bar.write64(R.DMA_COUNT, 512)
            bar.write64(R.DMA_CMD, R.DMA_CMD_START | cmd)
            bar.poll(R.DMA_CMD, R.DMA_CMD_START, 0, timeout=2.0, width=8, name="DMA_CMD")
    assert dst == src and model.faults == []


def test_dma_to_unmapped_memory_never_completes(edu: tuple[EduModel, VfioUserDevice]) -> None:
    """The driver sees its timeout; the model records what it refused."""
    model, dev = edu
    with (
        Edu(dev, interrupts="msi", timeout=0.3) as e,
        pytest.raises(PollTimeout, match="no DMA completion interrupt"),
    ):
        e.dma(0x0800_0000, R.DMA_BUFFER, 16, to_ram=False)
    assert any("not in memory the client mapped" in f for f in model.faults)
    dev.irq.disable()


def test_dma_past_the_buffer_is_dropped_like_qemu(edu: tuple[EduModel, VfioUserDevice]) -> None:
    model, dev = edu
    dev.set_bus_master()
    dev.dma.set_mask(28)
    dma = dev.dma
    with dma.alloc(4096) as buf:
        bar = dev.bar(0)
        bar.write64(R.DMA_SRC, buf.iova)
        bar.write64(R.DMA_DST, R.DMA_BUFFER)
        bar.write64(R.DMA_COUNT, 4096)  # ends exactly at the end: edu_check_range refuses
        bar.write64(R.DMA_CMD, R.DMA_CMD_START)
        bar.poll(R.DMA_CMD, R.DMA_CMD_START, 0, timeout=2.0, width=8, name="DMA_CMD")
    assert "outside the buffer" in model.faults[-1]


def test_dma_needs_bus_master(edu: tuple[EduModel, VfioUserDevice]) -> None:
    model, dev = edu
    dev.set_bus_master()
    dma = dev.dma
    buf = dma.alloc(4096)
    dev.set_bus_master(False)
    bar = dev.bar(0)
    bar.write64(R.DMA_SRC, buf.iova)
    bar.write64(R.DMA_DST, R.DMA_BUFFER)
    bar.write64(R.DMA_COUNT, 8)
    bar.write64(R.DMA_CMD, R.DMA_CMD_START)
    assert model.idle(2.0)
    assert "Bus Master Enable off" in model.faults[-1]
    buf.close()


def test_dma_mask_clamps_addresses(edu: tuple[EduModel, VfioUserDevice]) -> None:
    model, dev = edu
    dev.set_bus_master()
    dev.dma.set_mask(28)
    dma = dev.dma
    with dma.alloc(4096) as buf:
        buf[0:4] = b"abcd"
        bar = dev.bar(0)
        bar.write64(R.DMA_SRC, buf.iova | (1 << 40))  # bits above 28 are dropped
        bar.write64(R.DMA_DST, R.DMA_BUFFER)
        bar.write64(R.DMA_COUNT, 4)
        bar.write64(R.DMA_CMD, R.DMA_CMD_START)
        bar.poll(R.DMA_CMD, R.DMA_CMD_START, 0, timeout=2.0, width=8, name="DMA_CMD")
    assert bytes(model.buffer[:4]) == b"abcd"


def test_narrow_accesses_below_0x80_read_all_ones(edu: tuple[EduModel, VfioUserDevice]) -> None:
    _, dev = edu
    assert dev.bar(0).read16(R.IDENT) == 0xFFFF  # edu.c: only 4-byte accesses there
    assert dev.bar(0).read64(R.DMA_SRC) == 0


def test_reset_returns_to_power_on(edu: tuple[EduModel, VfioUserDevice]) -> None:
    _, dev = edu
    bar = dev.bar(0)
    bar.write32(R.LIVENESS, 5)
    bar.write32(R.STATUS, R.STATUS_IRQFACT)
    dev.set_bus_master()
    assert bar.read32(R.LIVENESS) == 0xFFFF_FFFA
    dev.reset()
    assert bar.read32(R.LIVENESS) == 0 and bar.read32(R.STATUS) == 0  # edu.c power-on values
    assert dev.config.read16(0x04) & 0x4 == 0
    assert bar.read32(R.IDENT) == 0x010000ED


def test_server_keeps_state_across_clients() -> None:
    model = EduModel()
    with served(model) as (_, path):
        with udrv.open(f"vfio-user:{path}") as dev:
            dev.bar(0).write32(R.LIVENESS, 0xA5A5)
        with udrv.open(f"vfio-user:{path}") as dev:
            assert dev.bar(0).read32(R.LIVENESS) == 0xFFFF5A5A


def test_open_without_server_names_the_fix() -> None:
    with pytest.raises(VfioUserError, match=r"udrv emulate edu --socket /nonexistent\.sock"):
        udrv.open("vfio-user:/nonexistent.sock")


def test_server_gone_is_a_clear_error() -> None:
    model = EduModel()
    with served(model) as (server, path):
        dev = udrv.open(f"vfio-user:{path}")
        assert dev.bar(0).read32(0) == 0x010000ED
        assert server.connection is not None
        server.connection.ch.close()
        with pytest.raises(RegionError, match=r"closed the connection|ENOTCONN|went away"):
            for _ in range(100):
                dev.bar(0).read32(0)
        dev.close()


@pytest.mark.parametrize("interrupts", ["msi", None])
def test_surprise_removal_is_reported_as_removal(
    edu: tuple[EduModel, VfioUserDevice], interrupts: str | None
) -> None:
    """After a surprise removal every read is all-ones: each operation says the device is
    gone (not busy, not slow), with an error that is both an EduError and the generic
    DeviceRemovedError."""
    model, dev = edu
    with Edu(dev, interrupts=interrupts, timeout=0.3) as e:
        assert e.factorial(5) == 120
        model.surprise_remove()
        assert dev.bar(0).read32(R.IDENT) == 0xFFFF_FFFF
        with pytest.raises(EduRemovedError, match=r"factorial of 5: the device is gone"):
            e.factorial(5)
        # DMA_CMD reads all-ones, START included: gone, not "a transfer is already running".
        with pytest.raises(EduRemovedError, match="starting a DMA transfer: the device is gone"):
            e.dma_to_device(b"x")
        with pytest.raises(DeviceRemovedError, match="gone"):
            e.dma_from_device(16)
        with pytest.raises(EduRemovedError, match="liveness check"):
            e.check_liveness()
    with pytest.raises(EduRemovedError, match="config space reads all-ones: the device is gone"):
        Edu(dev)


class RemovedMidTransfer(EduModel):
    """edu that disappears the moment a DMA transfer is started (before it completes)."""

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        super().mmio_write(offset, width, value)
        if offset == R.DMA_CMD and value & R.DMA_CMD_START:
            self.surprise_remove()


def test_removal_during_a_dma_transfer() -> None:
    """Removed while the transfer runs: the completion never comes; the timeout is reported
    as the removal it is."""
    with served(RemovedMidTransfer()) as (_, path):
        dev = udrv.open(f"vfio-user:{path}")
        try:
            e = Edu(dev, interrupts="msi", timeout=0.3)
            with pytest.raises(EduRemovedError, match=r"DMA of 8 bytes: the device is gone"):
                e.dma_to_device(b"12345678")
            e.close()
        finally:
            dev.close()


class StuckTransfer(EduModel):
    """edu whose DMA engine never finishes: DMA_CMD.START stays set."""

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if offset == R.DMA_CMD and value & R.DMA_CMD_START:
            self.dma_cmd = value  # started, never run
            return
        super().mmio_write(offset, width, value)


def test_a_busy_device_is_still_busy() -> None:
    """A live device whose transfer never ends: a timeout, then busy; never "removed"."""
    with served(StuckTransfer()) as (_, path):
        dev = udrv.open(f"vfio-user:{path}")
        try:
            with Edu(dev, interrupts=None, timeout=0.2) as e:
                with pytest.raises(PollTimeout) as timeout:
                    e.dma_to_device(b"x")
                with pytest.raises(EduError, match="already running") as busy:
                    e.dma_to_device(b"x")
                for err in (timeout.value, busy.value):
                    assert not isinstance(err, DeviceRemovedError)
        finally:
            dev.close()


def test_interrupt_storm_does_not_confuse_the_driver(edu: tuple[EduModel, VfioUserDevice]) -> None:
    model, dev = edu
    with Edu(dev, interrupts="msi", timeout=2.0) as e:
        model.interrupt_storm(500)  # MSIs with nothing in INTR_STATUS
        assert e.factorial(6) == 720
        model.interrupt_storm(500)
        data = os.urandom(64)
        e.dma_to_device(data)
        assert e.dma_from_device(64) == data


class FramebufferModel(EduModel):
    """edu plus a RAM BAR2: the server hands its memfd over, the client mmaps it."""

    def __init__(self) -> None:
        super().__init__()
        self.add_bar(2, 64 * 1024, is_64bit=True, prefetchable=True)
        self.seal()


def test_ram_bar_is_mmapped_by_the_client() -> None:
    model = FramebufferModel()
    with served(model) as (_, path), udrv.open(f"vfio-user:{path}") as dev:
        info = dev.region_info(2)
        assert info.mappable and info.is_64bit and info.prefetchable
        fb = dev.bar(2)
        assert fb.mappable  # loads and stores, no messages
        fb.write64(0x100, 0x1122_3344_5566_7788)
        assert model.bar_memory(2)[0x100:0x108] == (0x1122_3344_5566_7788).to_bytes(8, "little")
        model.bar_memory(2)[0x200:0x204] = b"\xde\xad\xbe\xef"
        assert fb.read32(0x200) == 0xEFBEADDE
        # The same memory through REGION_READ, as a client without mmap would see it.
        assert dev.client.region_read(2, 0x100, 8) == (0x1122_3344_5566_7788).to_bytes(8, "little")


def test_a_client_waits_for_a_server_that_is_still_starting(tmp_path: Path) -> None:
    """`udrv emulate edu --socket P &` then a client at once: the client waits for the socket
    (up to STARTUP_WAIT) instead of failing; with no server at all it fails naming the fix."""
    from udrv.vfio_user.server import Server

    path = str(tmp_path / "late.sock")
    servers: list[Server] = []
    timer = threading.Timer(0.4, lambda: servers.append(Server(EduModel(), path).start()))
    timer.start()
    try:
        with udrv.open(f"vfio-user:{path}") as dev:
            assert dev.bar(0).read32(R.IDENT) == 0x010000ED
    finally:
        timer.join()
        for s in servers:
            s.stop()
    t0 = time.monotonic()
    with pytest.raises(VfioUserError, match="start a server first"):
        udrv.open(f"vfio-user:{tmp_path / 'nobody.sock'}")
    assert time.monotonic() - t0 < 10
