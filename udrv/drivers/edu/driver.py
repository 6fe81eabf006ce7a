"""The edu driver: identification, liveness, factorial (polled or by interrupt), DMA.

Reads like QEMU's docs/specs/edu.rst; the registers are the map :class:`.regs.EduRegs`,
used through its bound registers (``self.regs.STATUS.write_fields(IRQFACT=1)``): nothing
here is a hot path, so every access goes through the map's access rules.
"""

from __future__ import annotations

import threading
from types import TracebackType

from udrv.core.device import Device
from udrv.dma import DmaBuffer
from udrv.drivers.edu import regs
from udrv.drivers.edu.regs import DmaDirection, EduRegs
from udrv.errors import DeviceRemovedError, DriverError, PollTimeout
from udrv.irq import Vector

#: What every read of a PCI function that no longer answers returns (PCI 3.0 §6.1: a read
#: of a non-existent function completes with all ones; Linux's pci_device_is_present).
ALL_ONES = 0xFFFF_FFFF
_DMA_CMD_ALL_ONES = (1 << 8 * EduRegs.DMA_CMD.width) - 1  # DMA_CMD is 64 bits wide


class EduError(DriverError):
    """The edu device misbehaves or a request cannot be done on it."""


class EduRemovedError(EduError, DeviceRemovedError):
    """The edu device is gone (its registers read all-ones): surprise removal, e.g. QEMU's
    ``device_del``. Open it again once it is back."""


class Edu:
    """A driver bound to one edu device.

    Args:
        device: from ``udrv.open("1234:11e8")``.
        interrupts: ``"msi"``, ``"intx"`` or ``None`` (polled only).
        timeout: seconds any single operation may take before EduError/PollTimeout.
        dma_mask_bits: the device's DMA address width (QEMU's ``dma_mask``; 28 by default).

    Raises:
        EduError: the device is not an edu (wrong ids or identification magic).
    """

    def __init__(
        self,
        device: Device,
        *,
        interrupts: str | None = "msi",
        timeout: float = 5.0,
        dma_mask_bits: int = regs.DMA_MASK_BITS,
    ) -> None:
        self.dev = device
        self.timeout = timeout
        self.bar = device.bar(regs.BAR)
        self.regs = EduRegs(self.bar)
        self._lock = threading.Lock()  # one factorial / DMA at a time: the device has one unit
        cfg = device.config
        vendor, dev_id = cfg.read16(0x00), cfg.read16(0x02)
        if vendor == dev_id == 0xFFFF:
            raise EduRemovedError(
                f"{device.address}: config space reads all-ones: the device is gone (removed "
                "or powered off); nothing answers at this address"
            )
        if (vendor, dev_id) != (regs.VENDOR_ID, regs.DEVICE_ID):
            raise EduError(f"{device.address} is {vendor:04x}:{dev_id:04x}, not an edu (1234:11e8)")
        ident = self.regs.IDENT.decode()
        if ident["MAGIC"] != regs.IDENT_MAGIC:
            raise EduError(
                f"{device.address}: identification register reads "
                f"{EduRegs.IDENT.encode(**ident):#010x}, expected 0xRRrr00ed; is BAR0 mapped?"
            )
        self.version = (ident["MAJOR"], ident["MINOR"])
        self.irq: Vector | None = None
        self._staging: DmaBuffer | None = None
        self._master = False
        # Bring-up, undone in reverse by close(): bus mastering (DMA and MSI are memory
        # writes by the device), the DMA staging buffer, the interrupt.
        self.dma_mask_bits = dma_mask_bits
        device.dma.set_mask(dma_mask_bits)
        device.set_bus_master()
        self._master = True
        try:
            self._staging = device.dma.alloc(regs.DMA_BUFFER_SIZE)
            if interrupts:
                self.irq = device.irq.enable_or_poll(interrupts)  # None: polled
        except BaseException:
            self.close()
            raise

    # -- basics ----------------------------------------------------------------------------

    def check_removed(self, what: str) -> None:
        """Raise :class:`EduRemovedError` if the device is gone: IDENT, whose magic byte is
        0xed on a live edu, reads all-ones. Called when an operation went wrong (a register
        reading all-ones, a missing interrupt), so a removal is not reported as a busy or
        slow device.

        Args:
            what: the operation that went wrong, for the message.
        """
        if self.bar.read32(regs.IDENT) == ALL_ONES:
            raise EduRemovedError(
                f"{self.dev.address}: {what}: the device is gone (its registers read "
                "all-ones: removed, e.g. by QEMU device_del, or powered off); open it again "
                "once it is back"
            )

    def check_liveness(self, value: int = 0x12345678) -> bool:
        """Write ``value`` to the liveness register; the device must return its inversion.

        Raises:
            EduRemovedError: the device is gone.
        """
        self.regs.LIVENESS.write(value)
        if self.regs.LIVENESS.read() == (~value & 0xFFFF_FFFF):
            return True
        self.check_removed("liveness check")
        return False

    def factorial(self, n: int, *, use_irq: bool | None = None) -> int:
        """n! modulo 2**32, computed by the device.

        Args:
            use_irq: wait for the completion interrupt (default: when interrupts are set up)
                instead of polling STATUS.COMPUTING.

        Raises:
            PollTimeout: the device did not finish within the timeout.
            EduRemovedError: the device is gone.
        """
        if not 0 <= n <= 0xFFFF_FFFF:
            raise ValueError(f"factorial input {n} does not fit the 32-bit register")
        irq = self.irq is not None if use_irq is None else use_irq
        with self._lock:
            try:
                if irq:
                    if self.irq is None:
                        raise EduError(f"{self.dev.address}: interrupts are not set up")
                    self.regs.STATUS.write_fields(IRQFACT=1)
                    self.regs.FACTORIAL.write(n)
                    self._wait_irq(regs.INTR_FACTORIAL, "factorial")
                else:
                    self.regs.STATUS.write_fields(IRQFACT=0)
                    self.regs.FACTORIAL.write(n)
                    self.regs.STATUS.poll(COMPUTING=0, timeout=self.timeout)
            except PollTimeout:
                self.check_removed(f"factorial of {n}")
                raise
            result = self.regs.FACTORIAL.read()
            if result == ALL_ONES:  # never a factorial: n! is 1 or even
                self.check_removed(f"factorial of {n}")
            return result

    # -- interrupts -------------------------------------------------------------------------

    def _wait_irq(self, cause: int, what: str) -> None:
        """Wait for the interrupt with ``cause`` and acknowledge it (edu.rst "IRQ controller")."""
        assert self.irq is not None
        while True:
            if not self.irq.wait(self.timeout):
                raise PollTimeout(
                    f"{self.dev.address}: no {what} interrupt within "
                    f"{self.timeout:g} s ({self.regs.INTR_STATUS.format()})"
                )
            status = self.regs.INTR_STATUS.read()
            if status:
                self.regs.INTR_ACK.write(status)  # every cause seen, not only ``cause``
            self.irq.rearm()
            if status & cause:
                return

    # -- DMA -------------------------------------------------------------------------------

    def dma_to_device(self, data: bytes, offset: int = 0) -> None:
        """Copy ``data`` into the device's 4 KiB buffer at ``offset`` by DMA (RAM -> edu)."""
        self._check_span(offset, len(data))
        with self._lock:
            buf = self._buffer()
            buf.array[: len(data)] = memoryview(data)
            self._transfer(buf.iova, regs.DMA_BUFFER + offset, len(data), DmaDirection.FROM_RAM)

    def dma_from_device(self, length: int, offset: int = 0) -> bytes:
        """Copy ``length`` bytes out of the device's buffer at ``offset`` by DMA (edu -> RAM)."""
        self._check_span(offset, length)
        with self._lock:
            buf = self._buffer()
            self._transfer(regs.DMA_BUFFER + offset, buf.iova, length, DmaDirection.TO_RAM)
            return bytes(buf.array[:length])

    def dma(self, src: int, dst: int, length: int, *, to_ram: bool) -> None:
        """A raw transfer between a DMA address (IOVA) and a device-buffer address."""
        dev_addr = src if to_ram else dst
        self._check_span(dev_addr - regs.DMA_BUFFER, length)
        ram = dst if to_ram else src
        if ram + length > 1 << self.dma_mask_bits:
            raise EduError(
                f"{self.dev.address}: DMA address {ram:#x}+{length:#x} is beyond edu's "
                f"{self.dma_mask_bits}-bit DMA mask"
            )
        with self._lock:
            self._transfer(
                src, dst, length, DmaDirection.TO_RAM if to_ram else DmaDirection.FROM_RAM
            )

    def _buffer(self) -> DmaBuffer:
        if self._staging is None:
            raise EduError(f"{self.dev.address}: the driver is closed; create a new Edu")
        return self._staging

    def _check_span(self, offset: int, length: int) -> None:
        if length <= 0 or offset < 0 or offset + length > regs.DMA_BUFFER_USABLE:
            raise EduError(
                f"{self.dev.address}: DMA of {length} bytes at buffer offset {offset} "
                f"does not fit the device buffer (4 KiB; the last byte is unusable "
                f"in QEMU's edu, so offset + length <= {regs.DMA_BUFFER_USABLE})"
            )

    def _transfer(self, src: int, dst: int, length: int, direction: DmaDirection) -> None:
        # edu.rst "DMA controller": source, destination, count, then start (+ IRQ when done).
        cmd = self.regs.DMA_CMD.read()
        if cmd == _DMA_CMD_ALL_ONES:  # START reads 1 too, but a live edu has bits 63:3 clear
            self.check_removed("starting a DMA transfer")
        if cmd & regs.DMA_CMD_START:
            raise EduError(f"{self.dev.address}: a DMA transfer is already running (device busy)")
        self.regs.DMA_SRC.write(src)
        self.regs.DMA_DST.write(dst)
        self.regs.DMA_COUNT.write(length)
        irq = self.irq is not None
        self.regs.DMA_CMD.write_fields(START=1, DIRECTION=direction, IRQ=int(irq))
        try:
            if irq:
                self._wait_irq(regs.INTR_DMA, "DMA completion")
            self.regs.DMA_CMD.poll(START=0, timeout=self.timeout)
        except PollTimeout:
            self.check_removed(f"DMA of {length} bytes")
            raise

    def close(self) -> None:
        """Release what the driver enabled, in reverse order: the interrupt, bus mastering,
        the staging buffer. The device stays open (and can take a new ``Edu``); safe to
        call twice."""
        if self.dev.closed:
            return  # closing the device released all of it
        if self.irq is not None:
            self.irq = None
            self.dev.irq.disable()
        if self._master:
            self._master = False
            self.dev.set_bus_master(False)  # the device stops before its memory goes
        if self._staging is not None:
            staging, self._staging = self._staging, None
            staging.close()

    def __enter__(self) -> Edu:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
