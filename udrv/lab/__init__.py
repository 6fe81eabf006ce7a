"""The udrv hardware lab: emulated PCI devices in a QEMU guest, for drivers and tests.

See :class:`udrv.lab.machine.Lab` and `udrv lab --help`.
"""

from udrv.lab.devices import DeviceSpec
from udrv.lab.machine import Lab, LabResult

__all__ = ["DeviceSpec", "Lab", "LabResult"]
