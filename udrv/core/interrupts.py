"""The interrupt part of the device contract: ``dev.irq``.

    irq = dev.irq                        # the backend's implementation (VFIO, UIO)
    irq.available()                      # {"intx": 1, "msi": 1, "msix": 0}
    vec = irq.enable("msi")[0]           # a udrv.irq.Vector: wait(), fileno(), await
    dev.bar(0).write32(0x60, 1)          # edu: raise
    vec.wait(timeout=1.0)
    dev.bar(0).write32(0x64, 1)          # acknowledge on the device
    vec.rearm()                          # INTx: let it fire again (no-op for MSI)
    irq.disable()                        # also done by dev.close()

A PCI function uses one kind at a time: INTx, MSI or MSI-X, never two (PCI Local Bus 3.0
§6.8: "a function is permitted to use either MSI or MSI-X, but not both"; with MSI on, INTx
is disabled). This class holds what every backend shares (the kinds, the checks in the order
a user needs them, Bus Master Enable for messages); a backend implements :meth:`available`,
:meth:`_enable` and :meth:`_disable`.
"""

from __future__ import annotations

import abc
import errno
import logging
from typing import TYPE_CHECKING

from udrv.errors import IrqError
from udrv.irq.vector import Vector

log = logging.getLogger(__name__)

#: vfio-pci's EBUSY for INTx (drivers/vfio/pci/vfio_pci_intrs.c: request_irq of a shared line
#: without PCI 2.3 masking, which vfio-pci needs to mask a level-triggered line for us).
INTX_BUSY = (
    "{address}: its INTx line is shared with another device and it has no PCI 2.3 INTx "
    "masking, so the kernel cannot give it to user space (EBUSY); use MSI, or poll the device"
)

if TYPE_CHECKING:
    from udrv.core.device import Device

#: The interrupt kinds, in the order PCI introduced them.
KINDS = ("intx", "msi", "msix")


class Interrupts(abc.ABC):
    """The interrupts of one device. Get it as ``dev.irq`` (one object per open device).

    Args:
        device: the device these interrupts belong to.
    """

    #: Added to the refusal when a kind is not offered (what else the user could do).
    not_offered_hint = ""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._kind: str | None = None
        self._vectors: list[Vector] = []

    @abc.abstractmethod
    def available(self) -> dict[str, int]:
        """Vectors the device offers through this backend, per kind (0: not offered).

        Returns:
            ``{"intx": n, "msi": n, "msix": n}``.
        """

    @abc.abstractmethod
    def _enable(self, kind: str, count: int) -> list[Vector]:
        """Enable ``count`` vectors of ``kind`` (already checked as offered and free)."""

    @abc.abstractmethod
    def _disable(self) -> None:
        """Tear the enabled vectors down and restore the device's interrupt state."""

    @property
    def enabled(self) -> str | None:
        """The kind enabled now (``"intx"``, ``"msi"``, ``"msix"``), or None."""
        return self._kind

    @property
    def vectors(self) -> list[Vector]:
        """The enabled vectors (empty when disabled)."""
        return list(self._vectors)

    def enable(self, kind: str = "msi", count: int = 1) -> list[Vector]:
        """Enable ``count`` vectors of ``kind``.

        MSI and MSI-X also set Bus Master Enable: a message is a memory write by the device
        (PCI 3.0 §6.8), which it can make only as a bus master. The vectors stay enabled
        until :meth:`disable` or ``dev.close()``.

        Args:
            kind: ``"intx"``, ``"msi"`` or ``"msix"``.
            count: vectors to enable (INTx and UIO: 1).

        Returns:
            The vectors, in order (MSI-X: vector ``i`` is table entry ``i``).

        Raises:
            IrqError: unknown kind; the device does not offer that kind or that many (the
                message says what it offers); another kind is enabled; the backend refused.
        """
        if kind not in KINDS:
            raise IrqError(f"unknown interrupt kind {kind!r}; use one of {', '.join(KINDS)}")
        addr = self.device.address
        offered = self.available()
        if offered.get(kind, 0) == 0:
            has = [f"{n} {k.upper()}" for k, n in offered.items() if n]
            what = ", ".join(has) if has else "no interrupts at all"
            raise IrqError(
                f"{addr} offers no {kind.upper()} through the {self.device.backend} backend "
                f"(it offers {what}){self.not_offered_hint}"
            )
        if count < 1 or count > offered[kind]:
            raise IrqError(
                f"{addr} offers {offered[kind]} {kind.upper()} vector(s); cannot enable {count}"
            )
        if self._kind is not None:
            raise IrqError(
                f"{addr}: {self._kind.upper()} is enabled; disable() it before enabling "
                f"{kind.upper()}"
            )
        self._vectors = self._enable(kind, count)
        self._kind = kind
        if kind != "intx":
            self.device.set_bus_master()
        return list(self._vectors)

    def enable_or_poll(self, kind: str) -> Vector | None:
        """One vector of ``kind``, or None when the kernel cannot hand this device's INTx
        line to user space: the line is shared with another device and the device has no
        PCI 2.3 INTx masking (Command bit 10 / Status bit 3), so vfio-pci cannot mask it for
        us and refuses with EBUSY. The driver then polls; this is logged, not raised.

        Raises:
            IrqError: as :meth:`enable`, for every other refusal.
        """
        try:
            return self.enable(kind)[0]
        except IrqError as exc:
            if kind != "intx" or exc.errno != errno.EBUSY:
                raise
            log.warning("%s; polling instead of waiting for interrupts", exc)
            return None

    def disable(self) -> None:
        """Disable the enabled vectors (their handler threads stop, their fds close) and
        restore the device's interrupt state; a no-op when nothing is enabled.

        Raises:
            IrqError: a handler thread had failed (its exception is chained) or did not stop.
                The vectors are disabled all the same.
        """
        if self._kind is None:
            return
        vectors, self._vectors, self._kind = self._vectors, [], None
        errors: list[IrqError] = []
        for v in vectors:
            try:
                v.close()
            except IrqError as exc:
                errors.append(exc)
        self._disable()
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        state = f"{self._kind.upper()} x{len(self._vectors)}" if self._kind else "disabled"
        return f"<{type(self).__name__} of {self.device.address}: {state}>"
