"""The VFIO and UIO interrupt layers against fakes: the exact SET_IRQS requests, INTx
unmasking through the command register, counts from /dev/uioN, and restore on disable."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import udrv.irq
from udrv.core.region import RecordingRegion
from udrv.errors import IrqError
from udrv.irq import uio as uio_irq
from udrv.irq import vfio as vfio_irq
from udrv.kernel import vfio as V

DATA = Path(__file__).parent / "data" / "pci"


class FakeDevice:
    """Just enough of a Device for the interrupt layers (duck-typed)."""

    def __init__(self, backend: str, config: bytes) -> None:
        self.address, self.backend = "0000:00:04.0", backend
        self.config = RecordingRegion(len(config), name="config")
        self.config.mem[:] = config
        self.device_fd = 99
        self.hooks: list[Callable[[], None]] = []

    def on_close(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)

    def set_bus_master(self, enable: bool = True) -> None:
        self.config.set_bits(0x04, 0x4, width=2)

    def close(self) -> None:
        while self.hooks:
            self.hooks.pop()()


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
    assert udrv.irq.available(dev) == {"intx": 1, "msi": 1, "msix": 0}  # type: ignore[arg-type]
    info = vfio_irq.irq_info(dev, "intx")  # type: ignore[arg-type]
    assert info.automasked and info.maskable and info.eventfd


def test_msi_enable_sets_trigger_eventfds_and_bus_master(fake: FakeVfio) -> None:
    dev = edu("vfio")
    dev.config.clear_bits(0x04, 0x4, width=2)
    vecs = udrv.irq.enable(dev, "msi")  # type: ignore[arg-type]
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
    dev.close()  # the close hook disables
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
    vec = udrv.irq.enable(dev, "intx")[0]  # type: ignore[arg-type]
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
    vecs = udrv.irq.enable(dev, "msix", 5)  # type: ignore[arg-type]
    _, index, _, count, fds = fake.sets[-1]
    assert index == V.VfioPciIrq.MSIX and count == 5
    assert fds == [v.fileno() for v in vecs] and len(set(fds)) == 5
    assert [v.name for v in vecs][4] == "MSIX 4 of 0000:00:04.0"
    dev.close()


def test_refusals_name_what_is_offered(fake: FakeVfio) -> None:
    dev = edu("vfio")
    irqs = udrv.irq.for_device(dev)  # type: ignore[arg-type]
    assert udrv.irq.for_device(dev) is irqs  # type: ignore[arg-type]
    with pytest.raises(IrqError, match="offers 0 MSIX vector"):
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
        udrv.irq.enable(dev, "msi")  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL
    assert len(os.listdir("/proc/self/fd")) == before


def test_sysfs_backend_has_no_interrupts() -> None:
    dev = edu("sysfs")
    assert udrv.irq.available(dev) == {"intx": 0, "msi": 0, "msix": 0}  # type: ignore[arg-type]
    with pytest.raises(IrqError, match="backend='vfio'"):
        udrv.irq.enable(dev, "msi")  # type: ignore[arg-type]


# -- UIO ----------------------------------------------------------------------------------


class FakeUio(FakeDevice):
    """/dev/uioN as a pipe: the test writes the kernel's 4-byte running count into it."""

    def __init__(self, tmp: Path, event: int) -> None:
        super().__init__("uio", (DATA / "edu.config").read_bytes())
        self.uio_name = "uio0"
        (tmp / "uio0").mkdir()
        (tmp / "uio0" / "event").write_text(f"{event}\n")
        self.uio_fd, self.kernel = os.pipe()

    def interrupt(self, total: int) -> None:
        """What uio_pci_generic's handler does: mask INTx, bump the count, wake readers."""
        self.config.set_bits(uio_irq.PCI_COMMAND, uio_irq.PCI_COMMAND_INTX_DISABLE, width=2)
        os.write(self.kernel, total.to_bytes(4, "little"))

    def close(self) -> None:
        super().close()
        os.close(self.uio_fd)
        os.close(self.kernel)


def intx_disabled(dev: FakeDevice) -> bool:
    return bool(dev.config.read16(0x04) & (1 << 10))


def test_uio_counts_deltas_from_the_event_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uio_irq, "UIO_CLASS", tmp_path)
    dev = FakeUio(tmp_path, event=41)  # 41 interrupts happened before we enabled
    dev.config.set_bits(0x04, 1 << 10, width=2)  # masked from a previous user
    irqs = udrv.irq.for_device(dev)  # type: ignore[arg-type]
    assert irqs.available() == {"intx": 1, "msi": 0, "msix": 0}
    with pytest.raises(IrqError, match="one INTx vector only"):
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
    with pytest.raises(IrqError, match="no INTx pin"):
        udrv.irq.enable(dev, "intx")  # type: ignore[arg-type]
    dev.close()


def test_uio_event_count_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(IrqError, match=r"uio7/event"):
        uio_irq.event_count("uio7", tmp_path)
