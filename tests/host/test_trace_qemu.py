"""udrv.trace_qemu and `udrv trace qemu/show/merge`: QEMU's memory_region_ops trace of the
kernel's e1000 probe, converted, shown next to a udrv trace, merged.

The sample (tests/host/data/qemu-7.2-e1000-probe.log) is 53 lines of a real log: QEMU 7.2
with ``-trace enable=memory_region_ops_*,file=...`` and ``-msg timestamp=on`` (the lab's
``Lab(["e1000"], trace=[...])``) while Linux 6.12's e1000 probed the lab's e1000 (BAR0 at
0xfebc0000, I/O BAR at 0xc0c0): the probe's first reads, e1000_reset_hw and the start of the
EEPROM checksum (EECD bit-banged, STATUS reads flushing each write), with the accesses to
other devices (PCI config, APIC, IOAPIC) that happened in between.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host.test_trace import REQUIRED
from udrv import trace
from udrv.cli import trace as trace_cli
from udrv.cli.main import main
from udrv.core.region import MmioRegion
from udrv.drivers.e1000.regs import E1000IoRegs, E1000Regs
from udrv.errors import TraceError
from udrv.trace_qemu import LINE, convert, parse

SAMPLE = Path(__file__).parent / "data" / "qemu-7.2-e1000-probe.log"
BAR0, IO = 0xFEBC0000, 0xC0C0


def timed(trace_: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace_["traceEvents"] if e["ph"] != "M"]


def test_every_memory_region_ops_line_of_the_sample_parses() -> None:
    lines = [n for n in SAMPLE.read_text().splitlines() if "memory_region_ops_" in n]
    accesses = list(parse(SAMPLE))
    assert len(accesses) == len(lines)
    first = accesses[0]
    m = LINE.match(lines[0])
    assert m is not None
    assert first.time == pytest.approx(int(m["sec"]) + int(m["usec"]) / 1e6)
    assert all(a.time is not None and a.pid > 0 for a in accesses)


def test_kernel_reset_is_named_from_the_map_with_the_io_window() -> None:
    conv = convert(SAMPLE, "e1000", label="kernel e1000")
    assert (conv.base, conv.io_base, conv.timestamps) == (BAR0, IO, True)
    events = timed(conv.trace)
    assert conv.events == len(events)
    names = [e["name"] for e in events]
    # Linux 6.12 e1000_reset_hw on the 82540 (e1000_hw.c), in order.
    reset = [
        "write IMC", "write RCTL", "write TCTL", "read STATUS", "read CTRL",
        "write IOADDR", "write CTRL", "read MANC", "write MANC", "write IMC", "read ICR",
    ]  # fmt: skip
    starts = [i for i in range(len(names)) if names[i : i + len(reset)] == reset]
    assert len(starts) == 1, names
    start = starts[0]
    # Before it, the probe reads STATUS (e1000_set_media_type) and masks interrupts.
    assert names[:start] == ["read STATUS", "read STATUS", "write IMC", "read STATUS", "read EECD"]
    ctrl, ioaddr, rst = events[start + 4], events[start + 5], events[start + 6]
    assert ioaddr["args"] | {"line": 0} == {
        "region": f"e1000-io @ {IO:#x}", "offset": "0x0", "register": "IOADDR",
        "selects": "CTRL", "width": 4, "value": "0x00000000", "line": 0,
    }  # fmt: skip
    assert rst["args"]["via"] == "IODATA" and rst["args"]["offset"] == "0x4"
    assert int(rst["args"]["value"], 16) == int(ctrl["args"]["value"], 16) | 1 << 26
    assert "RST=1" in rst["args"]["decoded"]
    # Other devices' accesses are not in the trace; every event is on BAR0 or the window.
    assert {e["args"]["region"] for e in events} == {
        f"e1000-mmio @ {BAR0:#x}",
        f"e1000-io @ {IO:#x}",
    }
    # Times: microseconds from the first access, from QEMU's stamps, in order.
    ts = [e["ts"] for e in events]
    assert ts[0] == 0 and ts == sorted(ts) and ts[-1] > 0
    for e in conv.trace["traceEvents"]:  # what Perfetto/Chrome require of each kind
        assert REQUIRED[e["ph"]] <= set(e), e
    meta = {e["name"]: e["args"]["name"] for e in conv.trace["traceEvents"] if e["ph"] == "M"}
    assert meta == {"process_name": "kernel e1000", "thread_name": "vCPU 0"}


def test_offsets_are_relative_to_the_bar_and_arrays_are_named(tmp_path: Path) -> None:
    log = tmp_path / "q.log"
    log.write_text(
        "1@5.000001:memory_region_ops_write cpu 0 mr 0x10 addr 0xfebc5404 value 0x80005634 "
        "size 4 name 'e1000-mmio'\n"
        "1@5.000003:memory_region_ops_write cpu 0 mr 0x10 addr 0xfebc520c value 0x0 "
        "size 4 name 'e1000-mmio'\n"
        "1@5.000007:memory_region_ops_read cpu 0 mr 0x10 addr 0xfebc0028 value 0x0 "
        "size 4 name 'e1000-mmio'\n"
    )
    events = timed(convert(log, "e1000").trace)
    assert [(e["name"], e["args"]["offset"], e["ts"]) for e in events] == [
        ("write RAH(0)", "0x5404", 0),
        ("write MTA(3)", "0x520c", 2),
        ("read 0x28", "0x28", 6),  # FCAL, not in udrv's map: named by its offset
    ]
    assert "AV=1" in events[0]["args"]["decoded"]


def test_log_without_timestamps_keeps_order(tmp_path: Path) -> None:
    log = tmp_path / "q.log"
    log.write_text(re.sub(r"(?m)^\d+@[\d.]+:", "", SAMPLE.read_text()))
    conv = convert(log, "e1000")
    assert not conv.timestamps
    ts = [e["ts"] for e in timed(conv.trace)]
    assert ts == [float(i) for i in range(len(ts))]
    with pytest.raises(TraceError, match="since/until need timestamps"):
        convert(log, "e1000", since=1.0)


def test_time_window(tmp_path: Path) -> None:
    accesses = [a for a in parse(SAMPLE) if a.name.startswith("e1000")]
    middle = accesses[len(accesses) // 2].time
    assert middle is not None
    early = convert(SAMPLE, "e1000", until=middle)
    late = convert(SAMPLE, "e1000", since=middle)
    assert early.events + late.events == len(accesses)
    with pytest.raises(TraceError, match=r"no e1000 register accesses .* in the given time window"):
        convert(SAMPLE, "e1000", since=accesses[-1].time + 1)  # type: ignore[operator]


def two_e1000s(tmp_path: Path) -> Path:
    """The sample plus a second e1000 (another MemoryRegion, BAR0 at 0xfeb80000)."""
    extra = "20291@1795977958.000001:memory_region_ops_read cpu 0 mr 0x99 addr 0xfeb80008 " \
        "value 0x80080783 size 4 name 'e1000-mmio'\n"  # fmt: skip
    log = tmp_path / "two.log"
    log.write_text(SAMPLE.read_text() + extra)
    return log


def test_several_devices_need_a_base(tmp_path: Path) -> None:
    log = two_e1000s(tmp_path)
    with pytest.raises(TraceError, match=r"2 'e1000-mmio' devices, at .*0xfeb80000 \(1 acc"):
        convert(log, "e1000")
    assert convert(log, "e1000", base=BAR0).events == convert(SAMPLE, "e1000").events
    other = timed(convert(log, "e1000", base=0xFEB80000).trace)
    assert [e["name"] for e in other] == ["read STATUS"]
    with pytest.raises(TraceError, match=r"no 'e1000-mmio' region at base 0xfe000000.*resource"):
        convert(log, "e1000", base=0xFE000000)


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no QEMU model named 'e1000e'; known: e1000, edu, nvme"):
        convert(SAMPLE, "e1000e")
    with pytest.raises(TraceError, match=r"cannot read the QEMU trace .*missing.log.*ENOENT"):
        convert(tmp_path / "missing.log", "e1000")
    with pytest.raises(TraceError, match=r"cannot read the QEMU trace.*EISDIR"):
        convert(tmp_path, "e1000")
    # A log of another device: the error says what the log does hold.
    with pytest.raises(TraceError, match=r"no edu register accesses \(QEMU region 'edu-mmio'\)"
                       r"; it has accesses to .*'e1000-mmio'"):  # fmt: skip
        convert(SAMPLE, "edu")
    empty = tmp_path / "empty.log"
    empty.write_text("qemu-system-x86_64: warning: something\n")
    with pytest.raises(TraceError, match=r"it has none\. Trace with --trace 'memory_region_ops_"):
        convert(empty, "e1000")
    # NVMe's BAR size depends on its options: the base must be given.
    nvme = tmp_path / "nvme.log"
    nvme.write_text(
        "1@5.000001:memory_region_ops_read cpu 0 mr 0x10 addr 0xfebd0000 value 0x2014030 "
        "size 4 name 'nvme'\n"
        "1@5.000002:memory_region_ops_read cpu 0 mr 0x10 addr 0xfebd001c value 0x1 "
        "size 4 name 'nvme'\n"
    )
    with pytest.raises(TraceError, match="size depends on the device's options: give its base"):
        convert(nvme, "nvme")
    names = [e["name"] for e in timed(convert(nvme, "nvme", base=0xFEBD0000).trace)]
    assert names == ["read CAP", "read CSTS"]


def test_cli_qemu_show_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernel.json"
    assert main(["trace", "qemu", str(SAMPLE), "--map", "e1000", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"e1000 register accesses (BAR at {BAR0:#x}, I/O window at {IO:#x}) in {out}" in err
    assert main(["trace", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "write IOADDR" in shown and "via IODATA" in shown and "RST=1" in shown
    assert main(["trace", "qemu", str(two_e1000s(tmp_path)), "-o", str(out)]) == 1
    assert "pick one with its base" in capsys.readouterr().err
    assert main(["trace", "qemu", str(SAMPLE)]) == 1
    assert "give the output file with -o FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace", "qemu", str(SAMPLE), "--map", "nope", "-o", str(out)])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trace", "qemu", str(SAMPLE), "--base", "febc", "-o", str(out)])
    assert "'febc' is not a number (0xfebc0000)" in capsys.readouterr().err


@pytest.fixture
def udrv_trace(tmp_path: Path) -> Iterator[Path]:
    """udrv's reset of an e1000 (the driver's first steps), traced on an emulated BAR0."""
    bar = MmioRegion(bytearray(E1000Regs.SIZE), name="BAR0 of 0000:00:04.0", index=0)
    bar.write32(E1000Regs.CTRL.offset, 0x140240)  # before tracing: the device's state
    io = MmioRegion(bytearray(0x40), name="BAR1 of 0000:00:04.0", index=1)
    tracer = trace.enable()
    try:
        regs = E1000Regs(bar)
        regs.IMC.write(0xFFFFFFFF)
        regs.RCTL.write(0)
        regs.TCTL.write_fields(PSP=1)
        regs.STATUS.read()
        ctrl = regs.CTRL.read()
        regs.ITR.write(0x1234)
        # The reset through the I/O BAR, named through the window map (udrv.trace names
        # an e1000's I/O BAR with it by itself; here the emulated BAR has no device).
        window = E1000IoRegs(io)
        window.IOADDR.write(E1000Regs.CTRL.offset)
        window.IODATA.write(ctrl | 1 << 26)
        regs.CTRL.write(ctrl | 1 << 26)
        regs.CTRL.read()
        regs.CTRL.read()
        regs.IMC.write(0xFFFFFFFF)
        regs.ICR.read()
        yield tracer.save(tmp_path / "udrv.json")
    finally:
        trace.disable()


def test_side_by_side_pairs_the_same_steps(
    udrv_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = convert(SAMPLE, "e1000", label="kernel e1000").save(tmp_path / "kernel.json")
    rows = trace_cli.align(trace_cli.load(kernel), trace_cli.load(udrv_trace))
    view = [
        (left[0]["name"] if left else None, right[0]["name"] if right else None, mark)
        for left, right, mark in rows
    ]
    # The reset's steps pair, the reset through the I/O window too; udrv's ITR probe, its
    # second reset through BAR0 and its two CTRL polls (collapsed) are its own.
    start = view.index(("write IMC", "write IMC", "="))
    assert view[start : start + 8] == [
        ("write IMC", "write IMC", "="),
        ("write RCTL", "write RCTL", "="),
        ("write TCTL", "write TCTL", "="),
        ("read STATUS", "read STATUS", "~"),  # the emulated BAR reads 0
        ("read CTRL", "read CTRL", "="),
        (None, "write ITR", ">"),
        ("write IOADDR", "write IOADDR", "="),
        ("write CTRL", "write CTRL", "="),  # through IODATA, the same value: CTRL | RST
    ]
    assert rows[start + 7][1][0]["args"]["via"] == "IODATA"  # type: ignore[index]
    again = [r for r in rows[start + 8 :] if r[1] and r[1][0]["name"] == "write CTRL"]
    assert [(r[0], r[2], "via" in r[1][0]["args"]) for r in again] == [(None, ">", False)]  # type: ignore[index]
    polls = [r for r in rows if r[1] and r[1][0]["name"] == "read CTRL" and r[1][1] == 2]
    assert len(polls) == 1  # two reads in a row of the same value: one row, x2
    assert main(["trace", "show", str(kernel), str(udrv_trace)]) == 0
    shown = capsys.readouterr().out
    assert "kernel e1000" in shown and "read CTRL x2" in shown
    # Bad input for the two-column view.
    no_mmio = tmp_path / "none.json"
    no_mmio.write_text(json.dumps({"traceEvents": []}))
    assert main(["trace", "show", str(kernel), str(no_mmio)]) == 1
    assert "none.json: no register accesses to compare" in capsys.readouterr().err
    assert main(["trace", "show", str(kernel), str(kernel), str(kernel)]) == 1
    assert "one file, or two" in capsys.readouterr().err
    assert main(["trace", "show", str(tmp_path / "missing.json")]) == 1
    assert "cannot read the trace" in capsys.readouterr().err


def test_merge_puts_each_trace_on_its_own_track(
    udrv_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = convert(SAMPLE, "e1000", label="kernel e1000").save(tmp_path / "kernel.json")
    out = tmp_path / "both.json"
    args = ["trace", "merge", str(kernel), str(udrv_trace), "--label", "", "--label", "udrv"]
    assert main([*args, "-o", str(out)]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {1: "kernel e1000", 2: "udrv"}
    for pid in (1, 2):  # each starts at 0
        assert min(e["ts"] for e in events if e["pid"] == pid and "ts" in e) == 0
    mine = [e["name"] for e in events if e["pid"] == 2 and e["ph"] == "X"]
    assert mine[:2] == ["write IMC", "write RCTL"]
    assert trace_cli.load(out)  # and it loads back as a trace
    assert main(["trace", "merge", str(kernel), "-o", str(out)]) == 1
    assert "give two traces or more" in capsys.readouterr().err
    assert main(["trace", "merge", str(kernel), str(udrv_trace)]) == 1
    assert "give the output file with -o FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    shutil.copy(SAMPLE, bad)  # a QEMU log, not a trace
    assert main(["trace", "merge", str(kernel), str(bad), "-o", str(out)]) == 1
    assert "bad.json: not a trace-event JSON file" in capsys.readouterr().err


def test_a_log_with_two_qemu_runs_asks_for_a_window(tmp_path: Path) -> None:
    """QEMU appends to an existing trace file: two runs, the same BAR, other pointers."""
    first = SAMPLE.read_text()
    second = re.sub(r"(?m)^20291@1795977957\.", "5151@1795978957.", first)
    log = tmp_path / "twice.log"
    log.write_text(first + second.replace("mr 0x7ffb1045", "mr 0x7ffc2045"))
    with pytest.raises(TraceError, match=r"holds 2 QEMU runs with e1000 accesses \(pid 20291 from "
                       r".* pid 5151 .*pick one with --since/--until"):  # fmt: skip
        convert(log, "e1000")
    one = convert(log, "e1000", since=1795978957)
    assert one.events == convert(SAMPLE, "e1000").events
    assert one.io_base == IO
