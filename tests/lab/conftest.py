"""Fixtures for tests that run inside the lab guest."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SYS = Path("/sys/bus/pci/devices")

#: One guest runs the backend and CLI tests: edu, e1000e, a two-function slot 00:10
#: (rtl8139 + e1000 sharing an IOMMU group, to build an unviable group) and an nvme.
BACKEND_DEVICES = (
    "edu",
    "e1000e",
    "rtl8139:addr=10.0,multifunction=on",
    "e1000:addr=10.1",
    "nvme:size=16M",
)
RTL8139, E1000 = "0000:00:10.0", "0000:00:10.1"  # placed by addr=, not by the lab's slots


def bind(address: str, driver: str | None) -> None:
    """Bind ``address`` to ``driver`` (None: no driver) with driver_override + drivers_probe."""
    dev = SYS / address
    if (dev / "driver").exists():
        if os.path.basename(os.readlink(dev / "driver")) == driver:
            return
        (dev / "driver" / "unbind").write_text(address)
    (dev / "driver_override").write_text(driver or "\n")
    if driver:
        Path("/sys/bus/pci/drivers_probe").write_text(address)
        assert os.path.basename(os.readlink(dev / "driver")) == driver


@pytest.fixture
def bound(lab_devices: dict[str, str]) -> Iterator[Callable[[str, str | None], str]]:
    """``bound("edu", "vfio-pci")`` -> address; the device is unbound again afterwards."""
    done: list[str] = []

    def _bind(name: str, driver: str | None) -> str:
        address = lab_devices[name]
        bind(address, driver)
        done.append(address)
        return address

    yield _bind
    for address in done:
        bind(address, None)
