"""Which CPU the kernel runs a vector's interrupt handler on.

A user-space driver's interrupt travels twice: the device's MSI reaches the kernel's handler
(vfio-pci's, which signals the vector's eventfd), and the eventfd wakes the driver. When the
two run on different CPUs the wake-up is an inter-processor interrupt; under QEMU's TCG
that costs milliseconds (the lab, RAM disk over ublk, QD1: 1677-2078 IOPS with everything
on one vCPU, 302-384 across two). So a driver thread pinned to some CPUs asks the kernel to
handle its vector there too, as the kernel's own nvme driver spreads its queues' vectors
over the CPUs that submit to them (``pci_alloc_irq_vectors_affinity``).

The kernel's interrupt for a vector is found by the name vfio-pci gives it
(drivers/vfio/pci/vfio_pci_intrs.c: ``vfio-msi[N](DDDD:BB:DD.F)``, ``vfio-msix[N](...)``,
``vfio-intx(...)``) in ``/proc/interrupts``, and steered through
``/proc/irq/N/smp_affinity_list`` (Documentation/core-api/irq/irq-affinity.rst).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from udrv.errors import IrqError

PROC_INTERRUPTS = Path("/proc/interrupts")
PROC_IRQ = Path("/proc/irq")


def vfio_irq_name(kind: str, index: int, address: str) -> str:
    """The action name vfio-pci registers for vector ``index`` of ``kind`` ("intx", "msi",
    "msix") of the device at ``address``."""
    if kind == "intx":
        return f"vfio-intx({address})"
    return f"vfio-{kind}[{index}]({address})"


def find_irq(name: str, interrupts: str | None = None) -> int | None:
    """The kernel's interrupt number whose handler is called ``name``, or None.

    Args:
        name: the action name as the driver registered it (:func:`vfio_irq_name`).
        interrupts: the text of ``/proc/interrupts`` (read when None).
    """
    text = PROC_INTERRUPTS.read_text() if interrupts is None else interrupts
    for line in text.splitlines():
        number, sep, rest = line.partition(":")
        if not sep or not number.strip().isdigit():
            continue  # the CPU header, NMI, LOC and the other per-CPU counters
        # The actions are the line's last field(s), after the chip and the hwirq; a shared
        # line lists several, comma-separated.
        actions = [a.strip() for a in rest.split(",")]
        if any(a == name or a.endswith(" " + name) for a in actions):
            return int(number)
    return None


def set_irq_affinity(irq: int, cpus: Iterable[int], *, what: str, root: Path = PROC_IRQ) -> None:
    """Have the kernel handle interrupt ``irq`` on ``cpus``.

    Raises:
        IrqError: the kernel refused (not root, or a CPU that is offline), naming the path.
    """
    cpu_list = ",".join(str(c) for c in sorted(set(cpus)))
    path = root / str(irq) / "smp_affinity_list"
    try:
        path.write_text(cpu_list)
    except OSError as exc:
        raise IrqError(
            f"{what}: cannot steer interrupt {irq} to CPUs {cpu_list}: writing {path} "
            f"failed ({exc.strerror}); run as root, with CPUs that are online",
            errno=exc.errno,
        ) from None
