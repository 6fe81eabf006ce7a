"""The lab guest's CPU (udrv/lab/cpu.py): QEMU 7.2's TCG gets RFLAGS wrong after CMPXCHG16B,
which killed lab guests under interrupt-heavy load (issue 13); the lab boots its guest kernel
with clearcpuid=cx16 so that the kernel never executes it. Each test boots its own guests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_lab

REPO = Path(__file__).resolve().parents[2]


def cpu_probe(*args: str) -> subprocess.CompletedProcess[str]:
    require_lab()
    return subprocess.run([sys.executable, "-m", "udrv", "lab", "cpu-probe", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_lab_guest_kernel_never_uses_cmpxchg16b_and_user_space_keeps_x86_64_v2() -> None:
    """Fails without the workaround: the guest kernel uses CMPXCHG16B (cpu-probe exit 1)."""
    require_lab()
    from udrv.lab import Lab

    with Lab() as lab:
        flags = lab.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], timeout=60, check=True)
        assert " cx16 " not in flags.stdout.rstrip() + " ", flags.stdout  # the kernel's view
        # CPUID still offers it to user space: NumPy (x86-64-v2) imports.
        r = lab.run([sys.executable, "-c", "import numpy, udrv.drivers.e1000"], timeout=120,
                    cwd=REPO)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.kernel_report is None, r.kernel_report
    r = cpu_probe()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "guest kernel uses CMPXCHG16B: no" in r.stdout, r.stdout


def test_cmpxchg16b_flags_bug_reproduced_without_udrv() -> None:
    """The reproduction without udrv or any device, `udrv lab cpu-probe --kernel-cx16`: the
    same RFLAGS as the panic's oops (RDI 0xff28445f4ad27000 -> RFLAGS 0x4ad27202), and a
    kernel that uses the instruction. If RFLAGS come out right, the installed QEMU is fixed
    (8.0 and later translate CMPXCHG16B inline) and the workaround could go."""
    r = cpu_probe("--kernel-cx16")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed: RFLAGS 0x4ad27202" in r.stdout, r.stdout
    assert "guest kernel uses CMPXCHG16B: yes" in r.stdout, r.stdout
