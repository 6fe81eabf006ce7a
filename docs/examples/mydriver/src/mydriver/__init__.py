"""A third-party driver for a "counter" PCI function: BAR0 register 0x0 counts what is
written to 0x4, and the device raises MSI 0 when the count passes a threshold at 0x8."""

from __future__ import annotations

from udrv.core.device import Device

COUNT, ADD, THRESHOLD = 0x0, 0x4, 0x8


class Counter:
    def __init__(self, dev: Device) -> None:
        if (dev.config.read16(0), dev.config.read16(2)) != (0x1234, 0xC0DE):
            raise ValueError(f"{dev.address} is not a counter")
        self.bar = dev.bar(0)
        self.vec = dev.irq.enable("msi")[0]

    def add(self, n: int) -> int:
        self.bar.write32(ADD, n)
        return self.bar.read32(COUNT)

    def wait_threshold(self, threshold: int, timeout: float = 2.0) -> bool:
        self.bar.write32(THRESHOLD, threshold)
        return self.vec.wait(timeout) > 0
