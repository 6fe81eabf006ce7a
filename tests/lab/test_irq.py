"""Interrupts on edu: raise (0x60) and acknowledge (0x64), every way to wait."""

from __future__ import annotations

import asyncio
import select
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import udrv
from udrv.drivers.edu import regs as R
from udrv.errors import IrqError

pytestmark = pytest.mark.lab("edu")
Bind = Callable[[str, "str | None"], str]


def _roundtrip(bar, vec, value: int = 1) -> int:  # type: ignore[no-untyped-def]
    bar.write32(R.INTR_RAISE, value)
    n = vec.wait(5)
    assert bar.read32(R.INTR_STATUS) & value
    bar.write32(R.INTR_ACK, value)
    vec.rearm()
    return int(n)


@pytest.mark.parametrize(
    ("driver", "kind"), [("vfio-pci", "msi"), ("vfio-pci", "intx"), ("uio_pci_generic", "intx")]
)
def test_raise_and_ack(bound: Bind, driver: str, kind: str) -> None:
    with udrv.open(bound("edu", driver)) as dev:
        vec = dev.irq.enable(kind)[0]
        bar = dev.bar(0)
        assert vec.poll() == 0  # nothing pending before we raise
        for i in range(20):
            assert _roundtrip(bar, vec, 1 << (i % 8)) >= 1
        assert vec.wait(0.3) == 0  # acknowledged: no further interrupt


def test_offered_vectors(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        assert dev.irq.available() == {"intx": 1, "msi": 1, "msix": 0}
        with pytest.raises(IrqError, match=r"offers no MSIX .*it offers 1 INTX, 1 MSI"):
            dev.irq.enable("msix")
        with pytest.raises(IrqError, match="offers 1 MSI vector"):
            dev.irq.enable("msi", 2)


@pytest.mark.parametrize(
    ("driver", "kind"), [("vfio-pci", "msi"), ("vfio-pci", "intx"), ("uio_pci_generic", "intx")]
)
def test_select_asyncio_and_handler_thread(bound: Bind, driver: str, kind: str) -> None:
    with udrv.open(bound("edu", driver)) as dev:
        vec = dev.irq.enable(kind)[0]
        bar = dev.bar(0)

        def ack(value: int) -> None:
            bar.write32(R.INTR_ACK, value)
            vec.rearm()

        bar.write32(R.INTR_RAISE, 1)
        r, _, _ = select.select([vec], [], [], 5)
        assert r == [vec]
        assert vec.wait(0) == 1
        ack(1)

        async def one() -> int:
            bar.write32(R.INTR_RAISE, 2)
            n = await asyncio.wait_for(vec.wait_async(), 5)
            ack(2)
            return n

        assert asyncio.run(one()) == 1

        async def cancelled() -> None:
            task = asyncio.ensure_future(vec.wait_async())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Nothing is left registered on the loop: a new wait works.
            bar.write32(R.INTR_RAISE, 4)
            assert await asyncio.wait_for(vec.wait_async(), 5) == 1
            ack(4)

        asyncio.run(cancelled())

        seen: list[int] = []
        done = threading.Event()

        def handler(count: int) -> None:
            seen.append(bar.read32(R.INTR_STATUS))
            bar.write32(R.INTR_ACK, seen[-1])  # the thread re-arms after we return
            if len(seen) == 3:
                done.set()

        vec.start_handler(handler)
        for v in (0x10, 0x20, 0x40):
            n = len(seen)
            bar.write32(R.INTR_RAISE, v)
            for _ in range(500):
                if len(seen) > n:
                    break
                done.wait(0.01)
        assert done.wait(5)
        vec.stop_handler()
        assert seen == [0x10, 0x20, 0x40]


SHARED = ("edu:slot=4", "edu:slot=12")  # q35 routes both to one IO-APIC pin (GSI 20)


@pytest.mark.lab(*SHARED)
@pytest.mark.parametrize(
    "drivers",
    [
        ("vfio-pci", "vfio-pci"),
        ("uio_pci_generic", "uio_pci_generic"),
        ("vfio-pci", "uio_pci_generic"),
    ],
)
def test_shared_intx_line_delivers_to_the_right_device(
    bound: Bind, drivers: tuple[str, str]
) -> None:
    """Two devices on one INTx line each get their own interrupts (the seed's limit).

    Both vfio-pci and uio_pci_generic request the line IRQF_SHARED and claim an interrupt
    only when their device's Interrupt Status bit (PCI 2.3, status register bit 3) is set,
    masking it with Interrupt Disable; so each user-space driver sees only its device's.
    """
    a, b = bound("edu", drivers[0]), bound("edu.1", drivers[1])
    irq = [Path(f"/sys/bus/pci/devices/{x}/irq") for x in (a, b)]
    with udrv.open(a) as da, udrv.open(b) as db:
        va, vb = da.irq.enable("intx")[0], db.irq.enable("intx")[0]
        assert irq[0].read_text() == irq[1].read_text()  # really one line
        bars = (da.bar(0), db.bar(0))
        for _ in range(5):
            for me, other, bar in ((va, vb, bars[0]), (vb, va, bars[1])):
                bar.write32(R.INTR_RAISE, 1)
                assert me.wait(5) >= 1
                assert other.wait(0.05) == 0  # the neighbour saw nothing
                bar.write32(R.INTR_ACK, 1)
                me.rearm()
            # Both at once: both get theirs.
            bars[0].write32(R.INTR_RAISE, 2)
            bars[1].write32(R.INTR_RAISE, 2)
            assert va.wait(5) >= 1 and vb.wait(5) >= 1
            for bar, v in zip(bars, (va, vb), strict=True):
                bar.write32(R.INTR_ACK, 2)
                v.rearm()
        assert va.wait(0.1) == 0 and vb.wait(0.1) == 0


def test_disable_on_close_restores_the_device(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    for _ in range(2):  # a second open after close works and can enable again
        with udrv.open(address) as dev:
            vec = dev.irq.enable("msi")[0]
            assert _roundtrip(dev.bar(0), vec) == 1
    # MSI is off again in config space (MSI cap Message Control bit 0).
    with udrv.open(address, backend="sysfs") as dev:
        cap = dev.config.read8(0x34)
        while cap and dev.config.read8(cap) != 0x05:
            cap = dev.config.read8(cap + 1)
        assert cap and dev.config.read16(cap + 2) & 1 == 0


def _cap(config, cap_id: int) -> int:  # type: ignore[no-untyped-def]
    cap = config.read8(0x34)
    while cap and config.read8(cap) != cap_id:
        cap = config.read8(cap + 1)
    return int(cap)


@pytest.mark.lab("e1000e")
def test_msix_with_n_vectors(bound: Bind) -> None:
    """e1000e offers 5 MSI-X vectors: enable all five, then disable restores the device."""
    address = bound("e1000e", "vfio-pci")
    with udrv.open(address) as dev:
        irqs = dev.irq
        assert irqs.available()["msix"] == 5
        vecs = irqs.enable("msix", 5)
        assert len({v.fileno() for v in vecs}) == 5
        msix = _cap(dev.config, 0x11)  # PCI 3.0 6.8.2: MSI-X capability
        assert dev.config.read16(msix + 2) & 0x8000  # MSI-X Enable
        assert all(v.poll() == 0 for v in vecs)
        irqs.disable()
        assert not dev.config.read16(msix + 2) & 0x8000
        assert len(irqs.enable("msix", 2)) == 2  # re-enable with another count works
