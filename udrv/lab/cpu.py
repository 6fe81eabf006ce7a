"""The lab guest's CPU model: QEMU's ``max`` without CMPXCHG16B, and the probe that shows why.

QEMU 7.2's TCG (Debian bookworm's QEMU) gets RFLAGS wrong after CMPXCHG16B: its helper
computes the flags from condition-code state the translator had not stored yet, so after a
POPF in one block and a CMP in the next, RFLAGS become the CMP's source operand (low 32
bits): IOPL, NT, VM and reserved bits included (``cx16_flags.c`` reproduces it in user space,
without any device: ``udrv lab cpu-probe --cpu max`` prints ``RFLAGS 0x4ad27202``). Linux's
SLUB allocator uses CMPXCHG16B on every kmalloc fast path (``this_cpu_try_cmpxchg128``) and
retries after an interrupt freed or allocated on the same CPU; under an interrupt-heavy load
(UDP floods through an e1000) the corrupted flags reached an interrupt frame and the guest
died of a double fault in ``__kmalloc_node_track_caller`` with exactly that RFLAGS (udrv
issue 13). Without CX16 in CPUID the kernel uses its own emulation
(arch/x86/lib/cmpxchg16b_emu.S: PUSHF, CLI, compare, POPF), which TCG emulates correctly.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from udrv.errors import LabSetupError

#: ``-cpu`` of every lab guest. QEMU 8.0 and later translate CMPXCHG16B inline and compute its
#: flags from the current state; with such a QEMU ``max`` alone would do.
GUEST_CPU = "max,-cx16"
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
