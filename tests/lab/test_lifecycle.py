"""Lifecycles: a driver releases what it enabled, so the next driver can start on the same
device; many driver cycles leak nothing; two functions of one IOMMU group live in one
process and are both driven, through one VFIO container."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import udrv
from udrv.backends.vfio import VfioDevice
from udrv.core.device import Device
from udrv.drivers.e1000 import E1000
from udrv.drivers.e1000 import regs as ER
from udrv.drivers.edu import Edu
from udrv.drivers.edu.driver import EduError
from udrv.drivers.nvme import Nvme
from udrv.lab.pytest_plugin import bind

#: Two e1000s as functions 0 and 1 of slot 0x10: one IOMMU group (no ACS between functions).
pytestmark = pytest.mark.lab(
    "edu", "nvme:size=16M", "e1000:addr=10.0,multifunction=on", "e1000:addr=10.1"
)
Bind = Callable[[str, "str | None"], str]
FN0, FN1 = "0000:00:10.0", "0000:00:10.1"
SYS = Path("/sys/bus/pci/devices")


def bus_master(dev: Device) -> bool:
    return bool(dev.config.read16(0x04) & 0x4)  # PCI 3.0 6.2.2, command bit 2


@pytest.fixture
def functions() -> Iterator[tuple[str, str]]:
    for a in (FN0, FN1):
        bind(a, "vfio-pci")
    yield FN0, FN1
    for a in (FN0, FN1):
        bind(a, None)


def test_edu_closed_then_created_again_on_the_same_device(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        for kind in ("msi", "intx", "msi", None):
            edu = Edu(dev, interrupts=kind)
            assert edu.factorial(5) == 120
            edu.dma_to_device(b"lifecycle")
            assert edu.dma_from_device(9) == b"lifecycle"
            assert bus_master(dev) and dev.irq.enabled == kind
            edu.close()
            assert dev.irq.enabled is None and not bus_master(dev)
            with pytest.raises(EduError, match="the driver is closed"):
                edu.dma_to_device(b"x")
            edu.close()  # twice is fine


def test_e1000_closed_then_created_again_on_the_same_device(functions: tuple[str, str]) -> None:
    with udrv.open(functions[0]) as dev:
        macs = []
        for kind in ("intx", "intx", None):
            nic = E1000(dev, interrupts=kind)
            macs.append(nic.mac)
            assert bus_master(dev) and dev.irq.enabled == kind
            nic.close()
            assert dev.irq.enabled is None and not bus_master(dev)
            assert dev.bar(0).read32(ER.RCTL) == 0  # receive stopped
            nic.close()
        assert macs[0] == macs[1] == macs[2]


def test_nvme_closed_then_created_again_on_the_same_device(bound: Bind) -> None:
    with udrv.open(bound("nvme", "vfio-pci")) as dev:
        data = os.urandom(8192)
        with Nvme(dev, queues=2, depth=16) as nvme:
            nvme.write(0, memoryview(data))
            nvme.flush()
            assert dev.irq.enabled == "msix"
        assert dev.irq.enabled is None and not bus_master(dev)
        with Nvme(dev, queues=1, depth=8) as nvme:
            out = bytearray(8192)
            nvme.read(0, memoryview(out))
            assert out == data


CYCLES = 1000


def test_driver_cycles_leak_no_fd_and_no_mapping(bound: Bind) -> None:
    """Edu with MSI and its DMA staging buffer, created and closed 1000 times on one open
    device: every eventfd, mapping and IOVA is given back."""

    def resources() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), Path("/proc/self/maps").read_text().count("\n")

    with udrv.open(bound("edu", "vfio-pci")) as dev:
        Edu(dev).close()  # warm up: first-use allocations are not leaks
        before = resources()
        for i in range(CYCLES):
            edu = Edu(dev, interrupts="msi")
            if i % 250 == 0 or i == CYCLES - 1:
                assert edu.factorial(4) == 24  # by interrupt: the driver still works
            edu.close()
        after = resources()
        assert isinstance(dev, VfioDevice)
        assert dev.container.mappings == 0 and not dev.container.iova.allocated
    assert after[0] == before[0]  # fds
    assert after[1] <= before[1] + 2  # memory mappings (the allocator may keep an arena)


def _send_and_receive(tx: E1000, rx: E1000, frame: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if frame in [bytes(f) for f in rx.rx_batch()]:
            return
        assert time.monotonic() < deadline, f"{rx.dev.address} never received the frame"
        tx.tx_batch([frame])
        time.sleep(0.05)


def test_two_functions_of_one_group_in_one_process(functions: tuple[str, str]) -> None:
    a_addr, b_addr = functions
    group = {os.path.basename(os.readlink(SYS / x / "iommu_group")) for x in functions}
    assert len(group) == 1  # really one IOMMU group
    fds = len(os.listdir("/proc/self/fd"))
    with udrv.open(a_addr) as a, udrv.open(b_addr) as b:
        assert isinstance(a, VfioDevice) and isinstance(b, VfioDevice)
        assert a.group is b.group and a.container is b.container
        assert a.bar(0).read32(ER.STATUS) != 0xFFFFFFFF != b.bar(0).read32(ER.STATUS)
        with E1000(a, interrupts="intx") as na, E1000(b, interrupts="intx") as nb:
            assert na.mac != nb.mac
            # Both NICs sit on QEMU hub 0: each one's TX ring DMA reaches the other's RX ring.
            ab = nb.mac + na.mac + b"\x88\xb5" + b"A to B " + os.urandom(64)
            ba = na.mac + nb.mac + b"\x88\xb5" + b"B to A " + os.urandom(64)
            _send_and_receive(na, nb, ab)
            _send_and_receive(nb, na, ba)
            # One IOVA space: a buffer allocated through A's dma, sent by B's DMA engine.
            shared = a.dma.alloc(4096)
            frame = na.mac + nb.mac + b"\x88\xb5" + b"shared " + os.urandom(64)
            shared.array[: len(frame)] = np.frombuffer(frame, dtype=np.uint8)
            slot = nb.tx_tail
            own = int(nb.tx["addr"][slot])
            nb.tx["addr"][slot] = shared.iova
            nb.tx["length"][slot] = len(frame)
            nb.tx["cmd"][slot] = ER.TXD_CMD_EOP | ER.TXD_CMD_IFCS | ER.TXD_CMD_RS
            nb.tx["status"][slot] = 0
            nb.tx_tail = (slot + 1) % nb.ntx
            nb.bar.write32(ER.TDT, nb.tx_tail)
            deadline = time.monotonic() + 10
            got: list[bytes] = []
            while frame not in got and time.monotonic() < deadline:
                got += [bytes(f) for f in na.rx_batch()]
                time.sleep(0.05)
            assert frame in got
            assert nb.tx["status"][slot] & ER.TXD_STAT_DD
            nb.tx["addr"][slot] = own
            shared.close()
        b.close()  # A still works with the shared group and container
        assert a.bar(0).read32(ER.STATUS) != 0xFFFFFFFF
        with E1000(a, interrupts=None) as na:
            assert na.mac
    assert len(os.listdir("/proc/self/fd")) == fds  # group and container closed with the last
