"""Interrupts of a vfio-user device: eventfds handed to the server in DEVICE_SET_IRQS.

The same semantics as kernel VFIO (:mod:`udrv.irq.vfio`): INTx is automasked when it fires
and :meth:`Vector.rearm` sends ``ACTION_UNMASK``; MSI and MSI-X are messages. The server
sets the MSI/MSI-X Enable bit itself, as vfio-pci does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from udrv.errors import IrqError, VfioUserError
from udrv.irq.vector import Vector, eventfd_count
from udrv.kernel import vfio as V

if TYPE_CHECKING:
    from udrv.backends.vfio_user import VfioUserDevice

KINDS = {"intx": V.VfioPciIrq.INTX, "msi": V.VfioPciIrq.MSI, "msix": V.VfioPciIrq.MSIX}


class VfioUserIrqs:
    """The interrupts of one vfio-user device (the :class:`udrv.irq.Interrupts` interface:
    ``available()``, ``enable(kind, count)``, ``disable()``, ``enabled``, ``vectors``)."""

    def __init__(self, dev: VfioUserDevice) -> None:
        self.dev = dev
        self.kind: str | None = None
        self.fds: list[int] = []
        self._vectors: list[Vector] = []
        dev.on_close(self.disable)

    def available(self) -> dict[str, int]:
        """Vectors per kind, from DEVICE_GET_IRQ_INFO."""
        out = {}
        for kind, index in KINDS.items():
            try:
                out[kind] = int(self.dev.client.irq_info(index).count)
            except VfioUserError:
                out[kind] = 0
        return out

    @property
    def enabled(self) -> str | None:
        return self.kind

    @property
    def vectors(self) -> list[Vector]:
        return list(self._vectors)

    def enable(self, kind: str = "msi", count: int = 1) -> list[Vector]:
        """Enable ``count`` vectors of ``kind``; MSI/MSI-X also set Bus Master Enable.

        Raises:
            IrqError: unknown kind, another kind enabled, more vectors than offered, or the
                server refused.
        """
        if kind not in KINDS:
            raise IrqError(f"unknown interrupt kind {kind!r}; use one of {', '.join(KINDS)}")
        if self.kind is not None:
            raise IrqError(
                f"{self.dev.address}: {self.kind.upper()} is enabled; disable() it before "
                f"enabling {kind.upper()}"
            )
        offered = self.available()[kind]
        if count < 1 or count > offered:
            raise IrqError(
                f"{self.dev.address} offers {offered} {kind.upper()} vector(s); cannot enable {count}"
            )
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        try:
            self.dev.client.set_irqs(
                KINDS[kind], V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, fds=fds
            )
        except VfioUserError as exc:
            for fd in fds:
                os.close(fd)
            raise IrqError(
                f"{self.dev.address}: the server refused {count} {kind.upper()} vector(s): {exc}"
            ) from None
        self.kind, self.fds = kind, fds
        rearm = self._unmask if kind == "intx" else None
        self._vectors = [
            Vector(
                fd,
                name=f"{kind.upper()} {i} of {self.dev.address}",
                read_count=eventfd_count,
                rearm=rearm,
            )
            for i, fd in enumerate(fds)
        ]
        if kind != "intx":
            self.dev.set_bus_master()
        return list(self._vectors)

    def _unmask(self) -> None:
        try:
            self.dev.client.set_irqs(
                V.VfioPciIrq.INTX, V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_UNMASK, 0, 1
            )
        except VfioUserError as exc:
            raise IrqError(f"{self.dev.address}: unmasking INTx failed: {exc}") from None

    def disable(self) -> None:
        """Detach the eventfds (the server clears MSI/MSI-X Enable) and close them."""
        if self.kind is None:
            return
        kind, self.kind = self.kind, None
        for v in self._vectors:
            v.close()
        try:
            if self.dev.client.connected:
                # DATA_NONE + TRIGGER with count 0 disables the whole index.
                self.dev.client.set_irqs(
                    KINDS[kind], V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0
                )
        except VfioUserError:
            pass  # the server is gone: nothing left to detach
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds, self._vectors = [], []
