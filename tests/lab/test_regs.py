"""`udrv regs` on QEMU's edu: the register map decodes the live device, and `set` changes it
through the map's access rules."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import udrv
from udrv.drivers.edu.regs import EduRegs

pytestmark = pytest.mark.lab("edu")
Bind = Callable[[str, "str | None"], str]


def regs(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `udrv regs ...` as a user would; check the exit status and that errors are clean.
    (Each run takes 10-30 s in the emulated guest on a loaded host, hence the long timeout.)"""
    r = subprocess.run(
        [sys.executable, "-m", "udrv", "regs", *args], capture_output=True, text=True, timeout=600
    )
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1 and r.stderr.startswith("udrv: error: "), (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    return r


def fields(record: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["value"] for f in record["fields"]}


@pytest.mark.parametrize("driver", ["vfio-pci", None])
def test_regs_decodes_the_edu_identification(bound: Bind, driver: str | None) -> None:
    address = bound("edu", driver)  # VFIO, or sysfs (read-only) when no driver has it
    out = json.loads(regs(address, "IDENT", "STATUS", "--json").stdout)
    ident, status = out["registers"]
    assert ident["value"] == 0x010000ED
    assert fields(ident) == {"MAJOR": 1, "MINOR": 0, "MAGIC": 0xED}
    assert ident["changed"] is False
    assert status["name"] == "STATUS" and set(fields(status)) == {"IRQFACT", "COMPUTING"}
    text = regs(address).stdout
    backend = "vfio" if driver else "sysfs"
    assert text.startswith(f"{address} edu [1234:11e8] BAR0 via {backend}\n")
    assert "31:24 MAJOR           1" in text and "7:0 MAGIC           0xed" in text
    assert "INTR_ACK" not in text  # write-only: never read


def test_regs_set_changes_the_device(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    # edu.rst: the liveness register reads back the inversion of what was written.
    r = regs(address, "set", "LIVENESS=0x12345678", "--json")
    assert "LIVENESS: wrote 0x12345678" in r.stderr
    (record,) = json.loads(r.stdout)["registers"]
    assert record["value"] == 0xEDCBA987
    # A field by name: a read-modify-write of STATUS that the device keeps.
    r = regs(address, "set", "STATUS.IRQFACT=1")
    assert "STATUS: read-modify-write 0x80" in r.stderr
    with udrv.open(address) as dev:
        live = EduRegs(dev.bar(0))
        assert live.STATUS.decode() == {"COMPUTING": 0, "IRQFACT": 1}
        assert live.LIVENESS.read() == 0xEDCBA987
        live.STATUS.clear("IRQFACT")
        assert live.STATUS.read() == 0
    # The map's access rules refuse before anything reaches the device.
    r = regs(address, "set", "STATUS.COMPUTING=1", ok=False)
    assert "setting field COMPUTING of register STATUS (0x20) refused: it is read-only" in r.stderr
    r = regs(address, "set", "IDENT=0", ok=False)
    assert "writing register IDENT (0x0) refused: it is read-only" in r.stderr
    assert json.loads(regs(address, "STATUS", "--json").stdout)["registers"][0]["value"] == 0
