"""The VFIO and UIO interrupt layers against fakes: the exact SET_IRQS requests, INTx
unmasking through the command register, counts from /dev/uioN, and restore on disable."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from udrv.core.device import Device, RegionInfo
from udrv.core.interrupts import Interrupts
from udrv.core.region import RecordingRegion, Region
from udrv.errors import IrqError
from udrv.irq import uio as uio_irq
from udrv.irq import vfio as vfio_irq
from udrv.kernel import vfio as V

DATA = Path(__file__).parent / "data" / "pci"


class FakeDevice(Device):
    """A Device whose config space is recorded memory and whose interrupts are the
    backend implementation under test (VFIO on fd 99, or UIO on a pipe)."""

    def __init__(self, backend: str, config: bytes) -> None:
        super().__init__("0000:00:04.0")
        self.backend = backend
        self._config = RecordingRegion(len(config), name="config")
        self._config.mem[:] = config

    @property
    def config(self) -> RecordingRegion:
        return self._config

    def region_info(self, index: int) -> RegionInfo:
        raise NotImplementedError

    def bar(self, index: int) -> Region:
        raise NotImplementedError

    def _open_interrupts(self) -> Interrupts:
        if self.backend == "vfio":
            return vfio_irq.VfioInterrupts(self, 99)
        return super()._open_interrupts()

    def _close(self) -> None:
        pass


class FakeVfio:
    """Answers GET_IRQ_INFO like vfio-pci for edu (INTx 1, MSI 1, MSI-X 0) and records
    every SET_IRQS as (flags, index, start, count, fds)."""

    def __init__(self, offered: dict[int, int]) -> None:
        self.offered = offered
        self.sets: list[tuple[int, int, int, int, list[int]]] = []
        self.fail_set: int | None = None

    def __call__(self, fd: int, request: int, arg: Any = 0, *, what: str, error: Any) -> int:
        assert fd == 99
        if request == V.VFIO_DEVICE_GET_IRQ_INFO:
            assert arg.argsz == ctypes.sizeof(V.vfio_irq_info)
            arg.count = self.offered.get(arg.index, 0)
            arg.flags = V.VFIO_IRQ_INFO_EVENTFD | (
                V.VFIO_IRQ_INFO_MASKABLE | V.VFIO_IRQ_INFO_AUTOMASKED if arg.index == 0 else 0
            )
            return 0
        assert request == V.VFIO_DEVICE_SET_IRQS
        argsz, flags, index, start, count = struct.unpack_from("<5I", arg)
        assert argsz == len(arg)
        nfds = (argsz - 20) // 4
        fds = list(struct.unpack_from(f"<{nfds}i", arg, 20))
        if flags & V.VFIO_IRQ_SET_DATA_EVENTFD:
            assert nfds == count
        else:
            assert nfds == 0
        if self.fail_set is not None:
            raise error(f"ioctl {what} failed", errno=self.fail_set)
        self.sets.append((flags, index, start, count, fds))
        return 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeVfio:
    f = FakeVfio({0: 1, 1: 1, 2: 0})
    monkeypatch.setattr(vfio_irq, "ioctl", f)
    return f


def edu(backend: str) -> FakeDevice:
    return FakeDevice(backend, (DATA / "edu.config").read_bytes())


def test_available_counts(fake: FakeVfio) -> None:
    dev = edu("vfio")
    assert dev.irq.available() == {"intx": 1, "msi": 1, "msix": 0}
    info = vfio_irq.irq_info(99, dev.address, "intx")
    assert info.automasked and info.maskable and info.eventfd


def test_msi_enable_sets_trigger_eventfds_and_bus_master(fake: FakeVfio) -> None:
    dev = edu("vfio")
    dev.config.clear_bits(0x04, 0x4, width=2)
    vecs = dev.irq.enable("msi")
    flags, index, start, count, fds = fake.sets[-1]
    assert (flags, index, start, count) == (
        V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER,
        V.VfioPciIrq.MSI,
        0,
        1,
    )
    assert fds == [vecs[0].fileno()]
    assert dev.config.read16(0x04) & 0x4  # Bus Master Enable: MSIs are DMA writes
    os.eventfd_write(fds[0], 1)  # the kernel signals the eventfd
    assert vecs[0].wait(1) == 1
    vecs[0].rearm()  # MSI: no UNMASK request
    assert len(fake.sets) == 1
    dev.close()  # closing the device disables
    assert fake.sets[-1][:4] == (
        V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER,
        V.VfioPciIrq.MSI,
        0,
        0,
    )
    with pytest.raises(OSError):
        os.fstat(fds[0])  # the eventfd is closed
    assert vecs[0].closed


def test_intx_rearm_is_an_unmask(fake: FakeVfio) -> None:
    dev = edu("vfio")
    vec = dev.irq.enable("intx")[0]
    vec.rearm()
    assert fake.sets[-1][:4] == (
        V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK,
        V.VfioPciIrq.INTX,
        0,
        1,
    )
    dev.close()


def test_msix_with_n_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeVfio({0: 1, 1: 1, 2: 5})  # e1000e: 5 MSI-X vectors
    monkeypatch.setattr(vfio_irq, "ioctl", fake)
    dev = FakeDevice("vfio", (DATA / "e1000e.config").read_bytes())
    vecs = dev.irq.enable("msix", 5)
    _, index, _, count, fds = fake.sets[-1]
    assert index == V.VfioPciIrq.MSIX and count == 5
    assert fds == [v.fileno() for v in vecs] and len(set(fds)) == 5
    assert [v.name for v in vecs][4] == "MSIX 4 of 0000:00:04.0"
    dev.close()


def test_refusals_name_what_is_offered(fake: FakeVfio) -> None:
    dev = edu("vfio")
    irqs = dev.irq
    assert dev.irq is irqs
    with pytest.raises(
        IrqError, match=r"offers no MSIX through the vfio backend \(it offers 1 INTX, 1 MSI\)"
    ):
        irqs.enable("msix")
    with pytest.raises(IrqError, match=r"offers 1 MSI vector.*cannot enable 2"):
        irqs.enable("msi", 2)
    with pytest.raises(IrqError, match="unknown interrupt kind"):
        irqs.enable("msi-x")
    irqs.enable("msi")
    assert irqs.enabled == "msi"
    with pytest.raises(IrqError, match="MSI is enabled; disable"):
        irqs.enable("intx")
    irqs.disable()
    assert irqs.enabled is None and irqs.vectors == []
    irqs.enable("intx")
    assert irqs.enabled == "intx"
    dev.close()


def test_set_irqs_failure_closes_the_eventfds(fake: FakeVfio) -> None:
    dev = edu("vfio")
    before = len(os.listdir("/proc/self/fd"))
    fake.fail_set = errno.EINVAL
    with pytest.raises(IrqError, match="refused to enable 1 MSI") as info:
        dev.irq.enable("msi")
    assert info.value.errno == errno.EINVAL
    assert dev.irq.enabled is None
    assert len(os.listdir("/proc/self/fd")) == before


def test_sysfs_backend_has_no_interrupts() -> None:
    dev = edu("sysfs")
    with pytest.raises(
        IrqError,
        match=r"0000:00:04.0: the sysfs backend has no interrupts; open it with backend='vfio'",
    ):
        dev.irq.enable("msi")


# -- UIO ----------------------------------------------------------------------------------


class FakeUio(FakeDevice):
    """/dev/uioN as a pipe: the test writes the kernel's 4-byte running count into it."""

    def __init__(self, tmp: Path, event: int) -> None:
        super().__init__("uio", (DATA / "edu.config").read_bytes())
        self.uio_name = "uio0"
        (tmp / "uio0").mkdir()
        (tmp / "uio0" / "event").write_text(f"{event}\n")
        self.uio_fd, self.kernel = os.pipe()

    def _open_interrupts(self) -> Interrupts:
        return uio_irq.UioInterrupts(self, self.uio_fd, self.uio_name)

    def _close(self) -> None:
        os.close(self.uio_fd)
        os.close(self.kernel)

    def interrupt(self, total: int) -> None:
        """What uio_pci_generic's handler does: mask INTx, bump the count, wake readers."""
        self.config.set_bits(uio_irq.PCI_COMMAND, uio_irq.PCI_COMMAND_INTX_DISABLE, width=2)
        os.write(self.kernel, total.to_bytes(4, "little"))


def intx_disabled(dev: FakeDevice) -> bool:
    return bool(dev.config.read16(0x04) & (1 << 10))


def test_uio_counts_deltas_from_the_event_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uio_irq, "UIO_CLASS", tmp_path)
    dev = FakeUio(tmp_path, event=41)  # 41 interrupts happened before we enabled
    dev.config.set_bits(0x04, 1 << 10, width=2)  # masked from a previous user
    irqs = dev.irq
    assert irqs.available() == {"intx": 1, "msi": 0, "msix": 0}
    with pytest.raises(IrqError, match=r"offers no MSI .*it offers 1 INTX.*backend='vfio'"):
        irqs.enable("msi")
    vec = irqs.enable("intx")[0]
    assert not intx_disabled(dev)  # enable unmasks
    dev.interrupt(42)
    assert intx_disabled(dev)
    assert vec.wait(1) == 1  # not 42
    dev.config.log.clear()
    vec.rearm()
    # Re-enable = a config write that clears Interrupt Disable (no irqcontrol write).
    writes = [e for e in dev.config.log if e[0] == "w"]
    assert writes and writes[-1][1:3] == (0x04, 2)
    assert not intx_disabled(dev)
    dev.interrupt(45)  # three more (two were coalesced by the kernel)
    assert vec.wait(1) == 3
    dev.close()
    assert intx_disabled(dev)  # restored as found


def test_uio_no_pin_no_interrupts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uio_irq, "UIO_CLASS", tmp_path)
    dev = FakeUio(tmp_path, event=0)
    dev.config.write8(0x3D, 0)
    with pytest.raises(IrqError, match=r"offers no INTX .*it offers no interrupts at all"):
        dev.irq.enable("intx")
    dev.close()


def test_uio_event_count_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(IrqError, match=r"uio7/event"):
        uio_irq.event_count("uio7", tmp_path)


# -- the contract's checks, in the order a user needs them ---------------------------------


def test_a_missing_kind_is_reported_before_a_conflict(fake: FakeVfio) -> None:
    """Issue 16: MSI-X asked for while INTx is on, on a device without MSI-X, must say the
    device has no MSI-X, not that INTx is in the way."""
    dev = edu("vfio")
    dev.irq.enable("intx")
    with pytest.raises(IrqError, match="offers no MSIX") as info:
        dev.irq.enable("msix")
    assert "INTX is enabled" not in str(info.value)
    with pytest.raises(IrqError, match="INTX is enabled; disable"):
        dev.irq.enable("msi")  # offered, so now the conflict is the reason
    dev.close()


def test_disable_reraises_a_handler_failure_and_still_disables(fake: FakeVfio) -> None:
    """Issue 13 item 4: an exception of the handler thread is not lost when the vector
    closes; the device is torn down all the same."""
    dev = edu("vfio")
    vec = dev.irq.enable("msi")[0]
    vec.start_handler(lambda n: 1 / 0)
    os.eventfd_write(vec.fileno(), 1)
    for _ in range(200):
        if not vec.handler_running:
            break
        time.sleep(0.01)
    with pytest.raises(IrqError, match="ZeroDivisionError") as info:
        dev.irq.disable()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert dev.irq.enabled is None and vec.closed
    assert fake.sets[-1][3] == 0  # the index was disabled (count 0)
    dev.close()


def test_device_close_reports_a_handler_failure(fake: FakeVfio) -> None:
    dev = edu("vfio")
    vec = dev.irq.enable("msi")[0]
    vec.start_handler(lambda n: 1 / 0)
    os.eventfd_write(vec.fileno(), 1)
    for _ in range(200):
        if not vec.handler_running:
            break
        time.sleep(0.01)
    with pytest.raises(IrqError, match=r"handler of MSI 0 of 0000:00:04\.0 failed"):
        dev.close()
    assert dev.closed and fake.sets[-1][3] == 0


def test_stuck_handler_leaves_the_vector_alone_after_a_stop_timeout(fake: FakeVfio) -> None:
    """Issue 13 item 4: after a stop timeout the owner disables the vector and closes its
    eventfd; the thread, once its handler returns, must neither re-arm the disabled vector
    (an UNMASK ioctl on a torn-down index) nor select on the closed fd's number (which a new
    file may have taken)."""
    dev = edu("vfio")
    vec = dev.irq.enable("intx")[0]
    release, entered = threading.Event(), threading.Event()

    def stuck(n: int) -> None:
        entered.set()
        release.wait(10)

    vec.start_handler(stuck)
    os.eventfd_write(vec.fileno(), 1)
    assert entered.wait(5)
    with pytest.raises(IrqError, match=r"did not stop within 0\.1 s"):
        vec.stop_handler(timeout=0.1)
    number = vec.fileno()
    threads = [t for t in threading.enumerate() if t.name == "irq INTX 0 of 0000:00:04.0"]
    dev.irq.disable()  # closes the eventfd
    sets_after_disable = len(fake.sets)
    # Put a readable eventfd at the old number, as a reused fd would be.
    reuse = os.eventfd(1, os.EFD_NONBLOCK)
    if reuse != number:
        os.dup2(reuse, number)
    try:
        release.set()
        for t in threads:
            t.join(5)
            assert not t.is_alive()
        assert len(fake.sets) == sets_after_disable  # no UNMASK after the teardown
        assert os.eventfd_read(number) == 1  # the reused fd was not consumed
    finally:
        os.close(reuse)
        if reuse != number:
            os.close(number)
    assert len(threads) == 1
    dev.close()
