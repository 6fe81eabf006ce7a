"""udrv.trace: the edu driver run against an emulated BAR, traced to Chrome trace JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from udrv import trace
from udrv.core.region import MmioRegion, RecordingRegion, Region
from udrv.dma.buffer import Mapping
from udrv.drivers.edu import regs
from udrv.irq.vector import Vector, eventfd_count

ADDRESS = "0000:00:04.0"
#: What Chrome/Perfetto require of each event kind (trace-event format, "Event Descriptions").
REQUIRED = {
    "X": {"name", "ph", "ts", "dur", "pid", "tid"},
    "i": {"name", "ph", "ts", "pid", "tid", "s"},
    "M": {"name", "ph", "pid", "args"},
}


class FakeEdu:
    """Enough of QEMU's edu (hw/misc/edu.c) for the driver: ids, ident, liveness, factorial
    with its interrupt on an eventfd."""

    def __init__(self) -> None:
        self.address = ADDRESS
        self.config = RecordingRegion(256, name=f"config space of {ADDRESS}")
        self.config.mem[0:4] = bytes([0x34, 0x12, 0xE8, 0x11])  # 1234:11e8
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.bar0 = MmioRegion(bytearray(1 << 20), name=f"BAR0 of {ADDRESS}", index=0)
        self.bar0.write32(regs.IDENT, 0x010000ED)
        self.dma = FakeDma()
        self.bus_master = False

    def set_bus_master(self, enable: bool = True) -> None:
        self.bus_master = enable

    def bar(self, index: int) -> Region:
        assert index == 0
        # The emulation reacts to the driver's writes after they are stored (on_write).
        return RecordingRegion(self.bar0, on_write=self.on_write)

    def on_write(self, offset: int, width: int, value: int) -> None:
        if offset == regs.LIVENESS:
            self.bar0.write32(offset, ~value & 0xFFFF_FFFF)
        elif offset == regs.FACTORIAL:
            self.bar0.write32(offset, math.factorial(value) & 0xFFFF_FFFF)
            if self.bar0.read32(regs.STATUS) & regs.STATUS_IRQFACT:
                self.bar0.write32(regs.INTR_STATUS, regs.INTR_FACTORIAL)
                os.eventfd_write(self.irq_fd, 1)
        elif offset == regs.INTR_ACK:
            self.bar0.write32(regs.INTR_STATUS, self.bar0.read32(regs.INTR_STATUS) & ~value)


class FakeDma:
    """The Device contract's ``dev.dma``, as far as the edu driver uses it."""

    def set_mask(self, bits: int) -> None:
        self.mask_bits = bits

    def alloc(self, size: int) -> Any:
        return Mapping(0x1000, size, lambda: None)


@pytest.fixture
def fake() -> FakeEdu:
    return FakeEdu()  # made before tracing starts: its own setup is no driver access


@pytest.fixture
def tracer(fake: FakeEdu) -> Iterator[trace.Tracer]:
    t = trace.enable()
    try:
        yield t
    finally:
        trace.disable()


def edu_run(fake: FakeEdu, monkeypatch: pytest.MonkeyPatch) -> None:
    from udrv.drivers.edu.driver import Edu

    edu = Edu(fake, interrupts=None)  # type: ignore[arg-type]
    edu.irq = Vector(fake.irq_fd, name=f"MSI 0 of {ADDRESS}", read_count=eventfd_count)
    assert edu.check_liveness()
    assert edu.factorial(5) == 120
    edu._staging.unmap()


def test_traced_edu_run_names_registers_in_order(
    fake: FakeEdu, tracer: trace.Tracer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    edu_run(fake, monkeypatch)
    path = tracer.save(tmp_path / "edu.json")
    events = json.loads(path.read_text())["traceEvents"]
    for e in events:
        assert REQUIRED[e["ph"]] <= set(e), e
        assert isinstance(e.get("ts", 0), (int, float))
    timed = [e for e in events if e["ph"] != "M"]
    assert [e["ts"] for e in timed] == sorted(e["ts"] for e in timed)
    bar = [e["name"] for e in timed if e["cat"] in ("mmio", "irq", "dma")]
    # The driver's sequence (edu.rst): ident, liveness, then the factorial by interrupt.
    assert bar == [
        "read IDENT",
        "write LIVENESS",
        "read LIVENESS",
        "write STATUS",
        "write FACTORIAL",
        "irq wait",
        "interrupt",
        "read INTR_STATUS",
        "write INTR_ACK",
        "read FACTORIAL",
        "dma unmap",
    ]
    by_name = {e["name"]: e for e in timed}
    assert by_name["write FACTORIAL"]["args"]["value"] == "0x00000005"
    assert by_name["read FACTORIAL"]["args"]["value"] == "0x00000078"
    assert by_name["read IDENT"]["args"]["decoded"] == (
        "IDENT = 0x010000ed (MAGIC=0xed MINOR=0x0 MAJOR=0x1)"
    )
    assert by_name["write STATUS"]["args"]["decoded"].endswith("(COMPUTING=0 IRQFACT=1)")
    assert by_name["irq wait"]["args"]["count"] == 1
    assert by_name["dma unmap"]["args"] == {"iova": "0x1000", "size": 4096}
    config = [e for e in timed if e["cat"] == "config"]
    assert [e["args"]["offset"] for e in config] == ["0x0", "0x2"]  # vendor, device ids


def test_off_means_the_original_methods(tracer: trace.Tracer) -> None:
    assert MmioRegion.read32 is not MmioRegion.__dict__["read32"].__wrapped__
    trace.disable()
    assert trace.active() is None
    assert not hasattr(MmioRegion.read32, "__wrapped__")
    assert "__init_subclass__" not in Region.__dict__
    region = MmioRegion(bytearray(64), name="plain")
    region.write32(0, 1)
    assert tracer.raw == []  # nothing recorded once off


def test_udrv_trace_env_writes_at_exit(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "t.json"
    script = (
        "import udrv\n"
        "from udrv.core.region import MmioRegion\n"
        "r = MmioRegion(bytearray(64), name='BAR2 of nowhere', index=2)\n"
        "r.write64(8, value=0x1122)\n"
        "r.read16(8)\n"
        "import os; print(os.environ.get('UDRV_TRACE'))\n"
    )
    env = {**os.environ, "UDRV_TRACE": str(out)}
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "None"  # children of a traced process do not trace
    events = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["args"]["width"], e["args"]["value"]) for e in events] == [
        ("write 0x8", 8, "0x0000000000001122"),
        ("read 0x8", 2, "0x1122"),
    ]


def test_trace_command_runs_and_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from udrv.cli.main import main

    out = tmp_path / "run.json"
    script = (
        "import sys, udrv\n"
        "from udrv.core.region import MmioRegion\n"
        "r = MmioRegion(bytearray(64), name='BAR0 of nowhere', index=0)\n"
        "r.write32(4, 0xabc)\n"
        "sys.exit(3)\n"
    )
    assert main(["trace", "-o", str(out), "--", sys.executable, "-c", script]) == 3  # its rc
    assert "udrv trace: 1 events in" in capsys.readouterr().err
    assert main(["trace", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "write 0x4" in shown and "0x00000abc" in shown and "mmio" in shown
    # A command that never imports udrv leaves no trace: a clear error, not a crash.
    assert main(["trace", "-o", str(out), "--", "true"]) == 1
    assert "without writing" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["trace", "show", str(bad)]) == 1
    assert "not a trace-event JSON file" in capsys.readouterr().err
