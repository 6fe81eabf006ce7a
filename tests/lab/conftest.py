"""What udrv's own lab tests share (the fixtures `lab_devices` and `bound` come with the
pytest plugin, :mod:`udrv.lab.pytest_plugin`)."""

from __future__ import annotations

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
