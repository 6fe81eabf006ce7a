"""The lab guest's CPU: why its kernel is told not to use CMPXCHG16B, and the probe that shows it.

QEMU 7.2's TCG (Debian bookworm's QEMU) gets RFLAGS wrong after CMPXCHG16B: its helper
computes the flags from condition-code state the translator had not stored yet, so after a
POPF in one block and a CMP in the next, RFLAGS become the CMP's source operand (low 32
bits): IOPL, NT, VM and reserved bits included. ``cx16_flags.c`` reproduces it in user space
without udrv or any device (``udrv lab cpu-probe`` prints ``RFLAGS 0x4ad27202``). Linux's SLUB
allocator uses CMPXCHG16B on every kmalloc fast path (``this_cpu_try_cmpxchg128``) and
retries when an interrupt allocated or freed on the same CPU in between; under an
interrupt-heavy load (UDP floods through an e1000) the corrupted flags reached an interrupt
frame and the guest died of a double fault in ``__kmalloc_node_track_caller`` with exactly
that RFLAGS, on the retry path, the registers those of a failed CMPXCHG16B (udrv issue 13).

The workaround: the guest kernel boots with ``clearcpuid=cx16`` and so emulates the
instruction (arch/x86/lib/cmpxchg16b_emu.S: PUSHF, CLI, compare, POPF), which TCG gets right.
Hiding CX16 from CPUID instead (``-cpu max,-cx16``) is not an option: NumPy's wheels are
built for x86-64-v2, which includes CMPXCHG16B, and refuse to import without it. User
space still sees the bug; no program the lab runs reads flags after a CMPXCHG16B other
than ZF (the one flag QEMU gets right). QEMU 8.0 and later translate CMPXCHG16B inline.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from udrv.errors import LabSetupError

#: Guest kernel parameters of the workaround (Documentation/arch/x86/cpuinfo.rst: the kernel
#: clears the feature before patching its alternatives; it taints itself with 'S').
KERNEL_ARGS = ("clearcpuid=cx16",)
PROBE_SOURCE = Path(__file__).with_name("cx16_flags.c")


def build_probe(dest: Path) -> Path:
    """Compile the CMPXCHG16B flags probe into ``dest`` (a directory the guest can read: the
    lab shares the host's root). Exit status 1 and a line per case when RFLAGS are wrong.

    Raises:
        LabSetupError: no C compiler (``udrv lab setup`` installs gcc).
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LabSetupError("gcc is missing: run `udrv lab setup` (it installs gcc)")
    out = dest / "cx16_flags"
    r = subprocess.run([gcc, "-O1", "-o", str(out), str(PROBE_SOURCE)], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode:
        raise LabSetupError(f"compiling {PROBE_SOURCE} failed: {r.stderr.strip()}")
    return out
