"""First lab tests: the guest sees the emulated devices and the kernel interfaces drivers use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab("edu")


def test_edu_is_visible_at_its_fixed_address(lab_devices: dict[str, str]) -> None:
    assert lab_devices == {"edu": "0000:00:04.0"}
    dev = Path("/sys/bus/pci/devices") / lab_devices["edu"]
    assert (dev / "vendor").read_text().strip() == "0x1234"
    assert (dev / "device").read_text().strip() == "0x11e8"
    # No kernel driver claims edu: a user-space driver gets it as it is.
    assert not (dev / "driver").exists()


def test_binding_edu_to_vfio_pci_creates_its_group_node(lab_devices: dict[str, str]) -> None:
    dev = Path("/sys/bus/pci/devices") / lab_devices["edu"]
    group = os.readlink(dev / "iommu_group").rsplit("/", 1)[1]
    (dev / "driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(lab_devices["edu"])
    try:
        assert os.readlink(dev / "driver").endswith("/vfio-pci")
        assert Path(f"/dev/vfio/{group}").exists()
    finally:
        (dev / "driver" / "unbind").write_text(lab_devices["edu"])
        (dev / "driver_override").write_text("\n")
    assert not Path(f"/dev/vfio/{group}").exists()


@pytest.mark.parametrize(
    "node", ["/dev/vfio/vfio", "/dev/ublk-control", "/dev/nbd0", "/dev/cuse", "/dev/net/tun"]
)
def test_kernel_interfaces_exist(node: str) -> None:
    assert Path(node).exists(), f"{node} missing: the lab agent did not load its module"


def test_results_share_is_writable() -> None:
    results = Path(os.environ["UDRV_LAB_RESULTS"])
    probe = results / f"probe-{time.monotonic_ns()}"
    probe.write_text("from the guest")
    assert probe.read_text() == "from the guest"
    probe.unlink()
