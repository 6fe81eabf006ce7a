"""The lab guest's CPU (udrv/lab/cpu.py): QEMU 7.2's TCG gets RFLAGS wrong after CMPXCHG16B,
which killed lab guests under interrupt-heavy load (issue 13); the lab's CPU model hides
CMPXCHG16B so that the guest kernel never executes it. Each test boots its own guest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_lab


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_lab()
    from udrv.lab.cpu import build_probe

    yield build_probe(tmp_path_factory.mktemp("cx16"))


def run_probe(probe: Path, **lab_args: str) -> tuple[int, str, str]:
    """The probe's exit status and output, and the guest's /proc/cpuinfo flags."""
    from udrv.lab import Lab

    with Lab(**lab_args) as lab:  # type: ignore[arg-type]
        r = lab.run([str(probe)], timeout=120)
        flags = lab.run(["sh", "-c", "grep -m1 '^flags' /proc/cpuinfo"], timeout=60)
        assert r.kernel_report is None, r.kernel_report
    return r.returncode, r.stdout, flags.stdout


def test_lab_guest_never_sees_wrong_rflags_after_cmpxchg16b(probe: Path) -> None:
    """Fails with ``-cpu max``: the probe prints RFLAGS 0x4ad27202 and exits 1."""
    rc, out, flags = run_probe(probe)
    assert rc == 0, out
    assert "not offered" in out and " cx16 " not in flags + " ", (out, flags)


def test_plain_max_cpu_shows_the_qemu_bug_the_lab_avoids() -> None:
    """The reproduction without udrv or any device, `udrv lab cpu-probe --cpu max` under this
    QEMU: the same RFLAGS as the panic's oops (RDI 0xff28445f4ad27000 -> RFLAGS 0x4ad27202).
    If this fails because RFLAGS are right, the installed QEMU is fixed (8.0 and later
    translate CMPXCHG16B inline) and the lab could go back to plain ``max``."""
    require_lab()
    r = subprocess.run([sys.executable, "-m", "udrv", "lab", "cpu-probe", "--cpu", "max"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "-cpu max:" in r.stdout and "failed: RFLAGS 0x4ad27202" in r.stdout, r.stdout
