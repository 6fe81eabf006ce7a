"""The kernel's e1000 bring-up from QEMU's trace, next to udrv's own trace of the same NIC.

A host-side test: it boots its own guest with QEMU's ``memory_region_ops_*`` trace events on
(each line stamped with the host time), reads the e1000's BAR addresses from the guest's
sysfs, loads the kernel's e1000 driver (its probe resets and sets up the NIC), then hands the
NIC to vfio-pci and brings it up with udrv's driver, traced (``UDRV_TRACE``). The QEMU log holds
both drivers' accesses; the host times around each step pick them apart.

What Linux 6.12's e1000 does at probe (drivers/net/ethernet/intel/e1000/e1000_hw.c
``e1000_reset_hw``, for the 82540 QEMU emulates): IMC all ones, RCTL 0, TCTL.PSP, a STATUS
read to flush, CTRL read, then CTRL | RST through the I/O BAR (IOADDR = CTRL's offset, IODATA =
the value: the 82540 "can't ack the 64-bit write when issuing the reset"), MANC read and
written, IMC all ones again, ICR read.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import require_lab
from udrv.cli import trace as trace_cli
from udrv.trace_qemu import convert

BRINGUP = """
import os, udrv
from udrv.core.bind import bind
from udrv.drivers.e1000 import E1000
bind(os.environ["ADDR"], "vfio-pci")  # the kernel's e1000 lets go of it (e1000_remove)
with udrv.open(os.environ["ADDR"]) as dev:
    with E1000(dev, rx_ring=8, tx_ring=8, interrupts=None, link_timeout=2.0) as nic:
        print(nic.describe())
"""
#: e1000_reset_hw on the 82540, in order (names as udrv's map has them).
KERNEL_RESET = [
    ("write IMC", "0xffffffff"),
    ("write RCTL", "0x00000000"),
    ("write TCTL", None),
    ("read STATUS", None),
    ("read CTRL", None),
    ("write IOADDR", "0x00000000"),
    ("write CTRL", None),  # via IODATA, RST set
    ("read MANC", None),
    ("write MANC", None),
    ("write IMC", "0xffffffff"),
    ("read ICR", None),
]


def _subsequence(events: list[dict[str, Any]], wanted: list[tuple[str, str | None]]) -> list[int]:
    """Indexes of ``wanted`` (name, value or None) found in order, each right after the
    previous one's (nothing else in between)."""
    names = [(e["name"], e["args"]["value"]) for e in events]
    for start in range(len(names)):
        if names[start][0] != wanted[0][0]:
            continue
        found = []
        for k, (name, value) in enumerate(wanted):
            i = start + k
            if i >= len(names) or names[i][0] != name or (value and names[i][1] != value):
                break
            found.append(i)
        if len(found) == len(wanted):
            return found
    raise AssertionError(f"{wanted} not found in order in {names[:80]}...")


def test_kernel_e1000_bringup_next_to_udrv(tmp_path: Path) -> None:
    require_lab()
    from udrv.lab import Lab

    log = tmp_path / "qemu.log"
    results = tmp_path / "results"
    with Lab(["e1000"], trace=["memory_region_ops_*"], trace_file=log, results=results) as lab:
        addr = lab.devices["e1000"]
        t0 = time.time()
        res = lab.run(["sh", "-c", f"cat /sys/bus/pci/devices/{addr}/resource && modprobe e1000"],
                      timeout=300, check=True)  # fmt: skip
        t1 = time.time()
        lines = res.stdout.splitlines()
        bar0, bar1 = int(lines[0].split()[0], 16), int(lines[1].split()[0], 16)
        udrv_json = results / "udrv-e1000.json"
        # UDRV_TRACE, as `udrv trace -o` sets it, without a second Python to start under
        # TCG. A generous timeout: with every access traced, the guest's clock runs fast.
        run = lab.run([sys.executable, "-c", BRINGUP], timeout=900, check=True,
                      env={"ADDR": addr, "UDRV_TRACE": str(udrv_json)})  # fmt: skip
        assert "82540EM" in run.stdout
        t2 = time.time()

    kernel = convert(log, "e1000", base=bar0, since=t0, until=t1, label="kernel e1000")
    assert kernel.timestamps and kernel.base == bar0 and kernel.io_base == bar1
    kevents = [e for e in kernel.trace["traceEvents"] if e["ph"] != "M"]
    # The reset, decoded with the datasheet's names: the CTRL write with RST set goes
    # through the I/O window, selected by IOADDR = 0 (CTRL).
    at = _subsequence(kevents, KERNEL_RESET)
    ioaddr, rst = kevents[at[5]], kevents[at[6]]
    assert ioaddr["args"]["selects"] == "CTRL"
    assert ioaddr["args"]["region"] == f"e1000-io @ {bar1:#x}"
    assert rst["args"]["via"] == "IODATA"
    assert "RST=1" in rst["args"]["decoded"]
    ctrl_read = int(kevents[at[4]]["args"]["value"], 16)
    assert int(rst["args"]["value"], 16) == ctrl_read | 1 << 26  # CTRL | CTRL.RST (13.4.1)
    # Times from QEMU's stamps, in order, within the probe's window.
    ts = [e["ts"] for e in kevents]
    assert ts == sorted(ts) and 0 < ts[-1] <= (t1 - t0) * 1e6
    kernel_json = kernel.save(tmp_path / "kernel-e1000.json")

    # udrv's trace of its own bring-up: the same reset steps, named by the same map.
    uevents = trace_cli.load(udrv_json)
    bar0_events = [e for e in uevents if e["cat"] == "mmio" and "BAR0" in e["args"]["region"]]
    assert [e["name"] for e in bar0_events[:5]] == [
        "write IMC", "write RCTL", "write TCTL", "read STATUS", "read CTRL",
    ]  # fmt: skip

    # udrv's driver resets through the I/O BAR too (then through BAR0: QEMU ignores the I/O
    # BAR); its tracer names that through the window like the converter does.
    io_events = [e for e in uevents if e["cat"] == "mmio" and "BAR1" in e["args"]["region"]]
    assert [(e["name"], e["args"].get("via")) for e in io_events] == [
        ("write IOADDR", None), ("write CTRL", "IODATA"),
    ]  # fmt: skip
    assert "RST=1" in io_events[1]["args"]["decoded"]

    # QEMU saw exactly what udrv's tracer recorded on BAR0: same registers, same values.
    # (Before them in that window: the kernel's e1000_remove, as bind() unbinds it.)
    seen = convert(log, "e1000", base=bar0, since=t1, until=t2)
    qemu_view = [
        (e["name"], e["args"]["value"])
        for e in seen.trace["traceEvents"]
        if e["ph"] != "M" and e["args"]["region"].startswith("e1000-mmio")
    ]
    assert len(qemu_view) > len(bar0_events)
    assert qemu_view[-len(bar0_events) :] == [(e["name"], e["args"]["value"]) for e in bar0_events]

    # Side by side: the reset steps pair up, with the same values where both write the same.
    rows = trace_cli.align(trace_cli.load(kernel_json), uevents)
    paired = [(trace_cli._key(left[0]), mark) for left, right, mark in rows if left and right]
    for step in ("write IMC", "write RCTL", "write TCTL", "read STATUS", "read CTRL",
                 "write IOADDR", "write CTRL via IODATA"):  # fmt: skip
        assert (step, "=") in paired or (step, "~") in paired, (step, paired[:20])
    assert ("write IMC", "=") in paired  # both mask every interrupt: 0xffffffff
    assert trace_cli.show_side_by_side(kernel_json, udrv_json, limit=40) == 0

    # One Perfetto file, a track group per driver.
    merged = tmp_path / "both.json"
    assert trace_cli.merge([kernel_json, udrv_json], merged, labels=["", "udrv e1000"]) == 0
    events = json.loads(merged.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {1: "kernel e1000", 2: "udrv e1000"}
