"""Interrupts on edu: raise (0x60) and acknowledge (0x64), every way to wait."""

from __future__ import annotations

import asyncio
import select
import threading
from collections.abc import Callable

import pytest

import udrv
import udrv.irq
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
        vec = udrv.irq.enable(dev, kind)[0]
        bar = dev.bar(0)
        assert vec.poll() == 0  # nothing pending before we raise
        for i in range(20):
            assert _roundtrip(bar, vec, 1 << (i % 8)) >= 1
        assert vec.wait(0.3) == 0  # acknowledged: no further interrupt


def test_offered_vectors(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        assert udrv.irq.available(dev) == {"intx": 1, "msi": 1, "msix": 0}
        with pytest.raises(IrqError, match="offers 0 MSIX vector"):
            udrv.irq.enable(dev, "msix")
        with pytest.raises(IrqError, match="offers 1 MSI vector"):
            udrv.irq.enable(dev, "msi", 2)


def test_select_asyncio_and_handler_thread(bound: Bind) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev:
        vec = udrv.irq.enable(dev, "msi")[0]
        bar = dev.bar(0)
        bar.write32(R.INTR_RAISE, 1)
        r, _, _ = select.select([vec], [], [], 5)
        assert r == [vec]
        assert vec.wait(0) == 1
        bar.write32(R.INTR_ACK, 1)

        async def one() -> int:
            bar.write32(R.INTR_RAISE, 2)
            n = await asyncio.wait_for(vec.wait_async(), 5)
            bar.write32(R.INTR_ACK, 2)
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
            bar.write32(R.INTR_ACK, 4)

        asyncio.run(cancelled())

        seen: list[int] = []
        done = threading.Event()

        def handler(count: int) -> None:
            seen.append(bar.read32(R.INTR_STATUS))
            bar.write32(R.INTR_ACK, seen[-1])
            if len(seen) == 3:
                done.set()

        vec.start_handler(handler)
        for v in (0x10, 0x20, 0x40):
            bar.write32(R.INTR_RAISE, v)
            deadline = len(seen) + 1
            for _ in range(500):
                if len(seen) >= deadline:
                    break
                done.wait(0.01)
        assert done.wait(5)
        vec.stop_handler()
        assert seen == [0x10, 0x20, 0x40]


def test_disable_on_close_restores_the_device(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    for _ in range(2):  # a second open after close works and can enable again
        with udrv.open(address) as dev:
            vec = udrv.irq.enable(dev, "msi")[0]
            assert _roundtrip(dev.bar(0), vec) == 1
    # MSI is off again in config space (MSI cap Message Control bit 0).
    with udrv.open(address, backend="sysfs") as dev:
        cap = dev.config.read8(0x34)
        while cap and dev.config.read8(cap) != 0x05:
            cap = dev.config.read8(cap + 1)
        assert cap and dev.config.read16(cap + 2) & 1 == 0
