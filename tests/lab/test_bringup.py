"""Bring-up tools on QEMU's edu: its SystemRDL description decodes and writes the live
device (`udrv regs --rdl`), `udrv shell` driven from stdin, `udrv trace` of the selftest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import udrv
from udrv.drivers.edu.regs import EduRegs

pytestmark = pytest.mark.lab("edu")
Bind = Callable[[str, "str | None"], str]
EDU_RDL = str(Path(udrv.__file__).parent / "drivers" / "edu" / "edu.rdl")


def udrv_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`udrv ARGS` as a user runs it; exit status 0 and no traceback required.
    (Each run takes 10-30 s in the emulated guest on a loaded host.)"""
    r = subprocess.run(
        [sys.executable, "-m", "udrv", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return r


def fields(record: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["value"] for f in record["fields"]}


def test_rdl_decodes_the_live_edu_and_a_field_write_changes_it(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    out = json.loads(udrv_cli("regs", address, "--rdl", EDU_RDL, "--json").stdout)
    assert out["map"] == "EduRegs"
    records = {r["name"]: r for r in out["registers"]}
    assert records["ident"]["value"] == 0x010000ED
    assert fields(records["ident"]) == {"major": 1, "minor": 0, "magic": 0xED}
    assert fields(records["status"]) == {"irq_enable": 0, "computing": 0}
    assert "intr_ack" not in records  # write-only: never read
    # edu.rst: liveness reads back the inversion of what was written; written by field.
    r = udrv_cli("regs", "--rdl", EDU_RDL, address, "set", "liveness.value=0x12345678", "--json")
    (liveness,) = json.loads(r.stdout)["registers"]
    assert liveness["value"] == 0xEDCBA987
    r = udrv_cli("regs", "--rdl", EDU_RDL, address, "set", "status.irq_enable=1")
    assert "status: read-modify-write 0x80" in r.stderr
    with udrv.open(address) as dev:
        live = EduRegs(dev.bar(0))
        assert live.LIVENESS.read() == 0xEDCBA987
        assert live.STATUS.decode() == {"COMPUTING": 0, "IRQFACT": 1}
        live.STATUS.clear("IRQFACT")


def test_shell_driven_from_stdin_reads_and_writes_registers(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    script = (
        "regs.ident.major, regs.ident.minor, hex(regs.ident.magic)\n"
        "regs.liveness = 0x0f0f0f0f\n"
        "hex(regs.liveness.read())\n"
        "regs.factorial = 6\n"
        "_ = regs.status.poll(computing=0, timeout=5)\n"
        "regs.factorial.read()\n"
        "hex(bar0.read32(0x04))\n"
    )
    r = udrv_cli("shell", address, "--rdl", EDU_RDL, stdin=script)
    assert r.stdout.splitlines() == ["(1, 0, '0xed')", "'0xf0f0f0f0'", "720", "'0xf0f0f0f0'"]
    r = subprocess.run(
        [sys.executable, "-m", "udrv", "shell", address],
        input="regs.IDENT.MAJOR = 2\nprint('not reached')\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and "not reached" not in r.stdout
    assert "IDENT (0x0) refused: it is read-only" in r.stderr


def test_trace_of_the_selftest_loads_with_the_factorial_and_its_interrupt(
    bound: Bind, tmp_path: Path
) -> None:
    address = bound("edu", "vfio-pci")
    out = tmp_path / "selftest.json"
    r = udrv_cli("trace", "-o", str(out), "--", "udrv", "edu", "selftest", address)
    assert "10! = 3628800 (interrupt)" in r.stdout
    with open(out) as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e["ph"] in ("X", "i")]
    for e in events:
        assert {"name", "ph", "ts", "pid", "tid"} <= set(e)
        assert e["ph"] == "i" or e["dur"] >= 0
    names = [e["name"] for e in events if e["cat"] in ("mmio", "irq", "dma")]
    # The factorial by interrupt (edu.rst): enable its IRQ, write n, the interrupt, status,
    # acknowledge, read n!.
    start = names.index("write FACTORIAL")
    assert names[start - 1] == "write STATUS"
    assert names[start : start + 6] == [
        "write FACTORIAL",
        "irq wait",
        "interrupt",
        "read INTR_STATUS",
        "write INTR_ACK",
        "read FACTORIAL",
    ]
    by_name = {e["name"]: e for e in events}
    assert by_name["write FACTORIAL"]["args"]["value"] == "0x0000000a"
    assert by_name["read FACTORIAL"]["args"]["value"] == f"{3628800:#010x}"
    assert by_name["write STATUS"]["args"]["decoded"].endswith("IRQFACT=1)")
    # Interrupts enabled before, DMA after: the staging buffer and a transfer's registers.
    assert names.index("irq enable") < start < names.index("write DMA_CMD")
    assert "dma alloc" in names
    assert by_name["dma alloc"]["args"]["size"] == 4096
    shown = udrv_cli("trace", "show", str(out)).stdout
    assert "write FACTORIAL" in shown and "interrupt" in shown
