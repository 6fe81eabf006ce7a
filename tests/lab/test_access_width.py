"""Proof that each read8/16/32/64 and write8/16/32/64 is exactly one bus access of that width.

A host-side test: it boots its own lab guest with QEMU's ``memory_region_ops_read/write``
trace events (every access a device model sees, with its size), runs accesses through
``udrv.open`` in the guest, then reads the trace.

Which device for which width (QEMU 7.2 MemoryRegionOps):

- edu (hw/misc/edu.c) declares ``valid`` and ``impl`` sizes 4..8, so QEMU's memory core
  (``memory_region_access_valid``) would refuse a 1 or 2-byte access before edu sees it (read
  from the source, not exercised here): edu proves 32 and 64-bit;
- rtl8139 (hw/net/rtl8139.c) has ``impl`` 1..4 for its register file, reached both through
  its I/O BAR (BAR0) and a memory alias (BAR1): it proves 8, 16 and 32-bit accesses through
  the mmap (MmioRegion) and through VFIO's pread/pwrite (PortRegion). Both BARs show up in
  the trace under the register file's name, ``rtl8139``.

Marker writes to edu's liveness register bracket the accesses, and the test asserts the trace
between them holds exactly the expected accesses to these devices, in order, and no others.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tests.conftest import require_lab

GUEST = r"""
import json, os
from pathlib import Path
import udrv

SYS = Path("/sys/bus/pci/devices")
devs = dict(kv.split("=") for kv in os.environ["UDRV_LAB_DEVICES"].split(","))
for addr in devs.values():
    (SYS / addr / "driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(addr)
out = []
with udrv.open(devs["edu"]) as edu, udrv.open(devs["rtl8139"]) as rtl:
    e, mem, io = edu.bar(0), rtl.bar(1), rtl.bar(0)
    kinds = [type(r).__name__ for r in (e, mem, io)]
    e.write32(0x04, 0xA5A50001)                        # marker: start
    out.append(e.read32(0x00))
    e.write32(0x04, 0x12345678)
    out.append(e.read32(0x04))
    e.write64(0x80, 0x1122334455667788)
    out.append(e.read64(0x80))
    for r in (mem, io):                                # rtl8139 MAR0-7 (multicast filter)
        r.write8(0x08, 0x11)
        out.append(r.read8(0x08))
        r.write16(0x0A, 0x2233)
        out.append(r.read16(0x0A))
        r.write32(0x0C, 0x44556677)
        out.append(r.read32(0x0C))
    e.write32(0x04, 0xA5A50002)                        # marker: end
print(json.dumps({"kinds": kinds, "reads": out}))
"""

LINE = re.compile(
    r"memory_region_ops_(?P<op>read|write) cpu -?\d+ mr 0x[0-9a-f]+ addr 0x(?P<addr>[0-9a-f]+) "
    r"value 0x(?P<value>[0-9a-f]+) size (?P<size>\d+) name '(?P<name>[^']*)'"
)


def parse(trace: Path, sizes: dict[str, int]) -> list[tuple[str, str, int, int, int]]:
    """(op, region name, offset, size, value) of every traced access to the regions named in
    ``sizes`` (name -> region size).

    QEMU 7.2 traces the absolute address (I/O port or physical address of the region in its
    own address space; rtl8139's memory BAR is an alias of the I/O region, so both show the
    I/O port). BARs are aligned to their size, so the offset is the address modulo the size.
    """
    out = []
    with open(trace, errors="replace") as f:
        for line in f:
            m = LINE.search(line)
            if m and m["name"] in sizes:
                offset = int(m["addr"], 16) % sizes[m["name"]]
                out.append((m["op"], m["name"], offset, int(m["size"]), int(m["value"], 16)))
    return out


def test_each_access_is_one_bus_access_of_its_width(tmp_path: Path) -> None:
    require_lab()
    trace = tmp_path / "trace.log"
    # One -trace pattern: the lab passes file= with the first pattern only, and QEMU 7.2
    # takes the trace file from the last -trace option.
    from udrv.lab import Lab

    with Lab(["edu", "rtl8139"], trace=["memory_region_ops_*"], trace_file=trace) as lab:
        run = lab.run([sys.executable, "-c", GUEST], timeout=300)
    assert run.returncode == 0, run.stderr
    stdout = run.stdout
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["MmioRegion", "MmioRegion", "PortRegion"]
    reads = iter(result["reads"])

    accesses = parse(trace, {"edu-mmio": 1 << 20, "rtl8139": 0x100})
    start = accesses.index(("write", "edu-mmio", 0x04, 4, 0xA5A50001))
    end = accesses.index(("write", "edu-mmio", 0x04, 4, 0xA5A50002))
    seen = accesses[start + 1 : end]

    edu = [
        ("read", "edu-mmio", 0x00, 4, next(reads)),
        ("write", "edu-mmio", 0x04, 4, 0x12345678),
        ("read", "edu-mmio", 0x04, 4, next(reads)),
        ("write", "edu-mmio", 0x80, 8, 0x1122334455667788),
        ("read", "edu-mmio", 0x80, 8, next(reads)),
    ]
    rtl = []
    for _ in ("mmio", "io"):
        rtl += [
            ("write", "rtl8139", 0x08, 1, 0x11),
            ("read", "rtl8139", 0x08, 1, next(reads)),
            ("write", "rtl8139", 0x0A, 2, 0x2233),
            ("read", "rtl8139", 0x0A, 2, next(reads)),
            ("write", "rtl8139", 0x0C, 4, 0x44556677),
            ("read", "rtl8139", 0x0C, 4, next(reads)),
        ]
    assert seen == edu + rtl
    # And the values made the round trip (edu inverts offset 4).
    assert [a[4] for a in seen if a[0] == "read"] == [
        0x010000ED,
        0xEDCBA987,
        0x1122334455667788,
        *[0x11, 0x2233, 0x44556677] * 2,
    ]
