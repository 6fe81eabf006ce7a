"""Interrupt vectors, and their implementations for each backend.

A driver gets interrupts from its device: ``dev.irq.enable("msi")`` returns
:class:`Vector` objects (``wait(timeout)``, ``fileno()``, ``await wait_async()``, handler
threads). The interface ``dev.irq`` implements is :class:`udrv.core.interrupts.Interrupts`;
:mod:`udrv.irq.vfio` (INTx, MSI, MSI-X over ``VFIO_DEVICE_SET_IRQS``) and
:mod:`udrv.irq.uio` (INTx over ``/dev/uioN``) are what the VFIO and UIO backends hand out.
"""

from __future__ import annotations

from udrv.irq.vector import Vector

__all__ = ["Vector"]
