"""The counter device as a model: the driver's tests run against it, no hardware needed."""

from __future__ import annotations

from udrv.models.base import PciModel
from udrv.models.pci import ConfigSpace


class CounterModel(PciModel):
    name = "counter"

    def __init__(self) -> None:
        super().__init__(ConfigSpace(vendor_id=0x1234, device_id=0xC0DE, class_code=0xFF0000))
        self.add_bar(0, 4096, read=self.mmio_read, write=self.mmio_write)
        self.config.add_msi(1)
        self.seal()
        self.reset()

    def reset(self) -> None:
        self.count, self.threshold = 0, 0xFFFF_FFFF

    def mmio_read(self, offset: int, width: int) -> int:
        return {0x0: self.count, 0x8: self.threshold}.get(offset, 0)

    def mmio_write(self, offset: int, width: int, value: int) -> None:
        if offset == 0x4:
            self.count = (self.count + value) & 0xFFFF_FFFF
        elif offset == 0x8:
            self.threshold = value
        if self.count >= self.threshold:
            self.defer(lambda: self.raise_irq(0))  # the device interrupts a moment later
