"""The CMPXCHG16B flags probe (udrv/lab/cx16_flags.c) on the host's real CPU: the lab's
evidence for its guest CPU model is only as good as the probe, so the probe must pass on
hardware that implements the SDM (it fails in a QEMU 7.2 TCG guest: tests/lab/test_lab_cpu.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from udrv.lab.cpu import build_probe


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is missing: `apt-get install gcc` (or `udrv lab setup`)")
    return build_probe(tmp_path_factory.mktemp("cx16"))


def test_probe_finds_rflags_right_on_real_hardware(probe: Path) -> None:
    r = subprocess.run([str(probe)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    if "not offered" in r.stdout:  # a CPU without CMPXCHG16B: nothing to check
        return
    failed, succeeded = (int(line.split("RFLAGS ")[1].split()[0], 16) for line in lines)
    # The CMP before it set CF and PF (0x1000 - RDI borrows); CMPXCHG16B changes only ZF.
    assert failed == 0x207 and succeeded == 0x247, lines
