"""Steering a vector's kernel interrupt to the CPUs its waiter runs on (udrv.irq.affinity)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from udrv.errors import IrqError
from udrv.irq import affinity
from udrv.irq.vector import Vector, eventfd_count

# /proc/interrupts of the lab guest (6.12, q35 + intel-iommu): an NVMe under vfio-pci with
# three MSI-X vectors, an edu's INTx under vfio-pci sharing a line with another handler.
INTERRUPTS = """\
            CPU0       CPU1
   0:         46          0   IO-APIC   2-edge      timer
   4:        312          0   IO-APIC   4-edge      ttyS0
  11:          7          0  IR-IO-APIC   11-fasteoi   uhci_hcd:usb1, vfio-intx(0000:00:05.0)
  24:          0          0  IR-PCI-MSIX-0000:00:04.0    0-edge      vfio-msix[0](0000:00:04.0)
  25:       1812          3  IR-PCI-MSIX-0000:00:04.0    1-edge      vfio-msix[1](0000:00:04.0)
  26:          0       2020  IR-PCI-MSIX-0000:00:04.0    2-edge      vfio-msix[2](0000:00:04.0)
  27:         12          0  IR-PCI-MSI-0000:00:06.0    0-edge      vfio-msi[0](0000:00:06.0)
 NMI:          0          0   Non-maskable interrupts
 LOC:       9361       8876   Local timer interrupts
 ERR:          0
"""


@pytest.mark.parametrize(
    ("name", "irq"),
    [
        (affinity.vfio_irq_name("msix", 1, "0000:00:04.0"), 25),
        (affinity.vfio_irq_name("msix", 2, "0000:00:04.0"), 26),
        (affinity.vfio_irq_name("msi", 0, "0000:00:06.0"), 27),
        (affinity.vfio_irq_name("intx", 0, "0000:00:05.0"), 11),  # a shared line
    ],
)
def test_find_irq_by_the_name_vfio_pci_registers(name: str, irq: int) -> None:
    assert affinity.find_irq(name, INTERRUPTS) == irq


def test_find_irq_does_not_match_another_vector_or_device() -> None:
    # vfio-msix[1] must not match vfio-msix[10], nor another function's vector 1.
    text = INTERRUPTS.replace("vfio-msix[1](0000:00:04.0)", "vfio-msix[10](0000:00:04.0)")
    assert affinity.find_irq("vfio-msix[1](0000:00:04.0)", text) is None
    assert affinity.find_irq("vfio-msix[1](0000:00:04.1)", INTERRUPTS) is None
    assert affinity.find_irq("timer", INTERRUPTS) == 0  # header and per-CPU rows skipped


def test_set_irq_affinity_writes_the_cpu_list(tmp_path: Path) -> None:
    (tmp_path / "25").mkdir()
    (tmp_path / "25" / "smp_affinity_list").write_text("0-1\n")
    affinity.set_irq_affinity(25, [1, 0, 1], what="MSIX 1 of 0000:00:04.0", root=tmp_path)
    assert (tmp_path / "25" / "smp_affinity_list").read_text() == "0,1"


def test_set_irq_affinity_refusal_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(IrqError) as e:  # no such interrupt directory: what a kernel refuses
        affinity.set_irq_affinity(99, [3], what="MSIX 1 of 0000:00:04.0", root=tmp_path)
    msg = str(e.value)
    assert "MSIX 1 of 0000:00:04.0" in msg and str(tmp_path / "99" / "smp_affinity_list") in msg
    assert "CPUs 3" in msg and "root" in msg


def test_vector_without_a_kernel_interrupt_steers_nothing() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        v = Vector(fd, name="MSIX 0 of vfio-user:/tmp/s", read_count=eventfd_count)
        assert v.set_affinity({0}) is False
        v.close()
        with pytest.raises(IrqError, match="disabled"):
            v.set_affinity({0})
    finally:
        os.close(fd)


def test_vector_whose_interrupt_is_gone_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(affinity, "find_irq", lambda name: None)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        v = Vector(fd, name="MSIX 1 of 0000:00:04.0", read_count=eventfd_count,
                   irq_name="vfio-msix[1](0000:00:04.0)")  # fmt: skip
        with pytest.raises(IrqError, match=r"no interrupt called vfio-msix\[1\]"):
            v.set_affinity({0})
    finally:
        os.close(fd)
