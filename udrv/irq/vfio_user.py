"""``dev.irq`` of a vfio-user device: eventfds handed to the server in DEVICE_SET_IRQS.

The same semantics as kernel VFIO (:mod:`udrv.irq.vfio`): INTx is automasked when it fires
and :meth:`Vector.rearm` sends ``ACTION_UNMASK``; MSI and MSI-X are messages. The server
sets the MSI/MSI-X Enable bit itself, as vfio-pci does.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from udrv.core.interrupts import INTX_BUSY, Interrupts
from udrv.errors import IrqError, VfioUserError
from udrv.irq.vector import Vector, eventfd_count
from udrv.kernel import vfio as V

if TYPE_CHECKING:
    from udrv.core.device import Device
    from udrv.vfio_user.client import Client

INDEXES = {"intx": V.VfioPciIrq.INTX, "msi": V.VfioPciIrq.MSI, "msix": V.VfioPciIrq.MSIX}


class VfioUserInterrupts(Interrupts):
    """The interrupts of one vfio-user device.

    Args:
        device: the device.
        client: its connection to the server.
    """

    def __init__(self, device: Device, client: Client) -> None:
        super().__init__(device)
        self.client = client
        self.fds: list[int] = []
        self._index: int | None = None

    def available(self) -> dict[str, int]:
        """Vectors per kind, from DEVICE_GET_IRQ_INFO.

        Raises:
            IrqError: the server refused or went away.
        """
        out = {}
        for kind, index in INDEXES.items():
            try:
                out[kind] = int(self.client.irq_info(index).count)
            except VfioUserError as exc:
                raise IrqError(
                    f"{self.device.address}: cannot query {kind.upper()}: {exc}"
                ) from None
        return out

    def _enable(self, kind: str, count: int) -> list[Vector]:
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self.client.set_irqs(
                INDEXES[kind],
                V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                fds=fds,
            )
        except VfioUserError as exc:
            for fd in fds:
                os.close(fd)
            if exc.errno == errno.EBUSY and kind == "intx":
                raise IrqError(
                    INTX_BUSY.format(address=self.device.address), errno=exc.errno
                ) from None
            raise IrqError(
                f"{self.device.address}: the server refused {count} {kind.upper()} vector(s): {exc}",
                errno=exc.errno,
            ) from None
        self.fds, self._index = fds, INDEXES[kind]
        rearm = self._unmask if kind == "intx" else None
        name = self.device.address
        return [
            Vector(fd, name=f"{kind.upper()} {i} of {name}", read_count=eventfd_count, rearm=rearm)
            for i, fd in enumerate(fds)
        ]

    def _unmask(self) -> None:
        try:
            self.client.set_irqs(
                V.VfioPciIrq.INTX, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK, 0, 1
            )
        except VfioUserError as exc:
            raise IrqError(f"{self.device.address}: unmasking INTx failed: {exc}") from None

    def _disable(self) -> None:
        """Detach the eventfds (the server clears MSI/MSI-X Enable), then close them."""
        index, self._index = self._index, None
        try:
            if index is not None and self.client.connected:
                # DATA_NONE + TRIGGER with count 0 disables the whole index.
                self.client.set_irqs(
                    index, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0
                )
        except VfioUserError:
            pass  # the server is gone: nothing left to detach
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
