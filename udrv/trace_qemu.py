"""A device's register accesses from QEMU's ``memory_region_ops`` trace, as a udrv trace.

QEMU traces every access a device model sees, whoever makes it: a kernel driver in the
guest as much as udrv. Converting that log into the trace-event file :mod:`udrv.trace`
writes puts a kernel driver's bring-up next to udrv's: ``udrv trace show`` prints it,
Perfetto opens it, ``udrv trace show KERNEL UDRV`` aligns the two. In the lab::

    udrv lab run --device e1000 --trace 'memory_region_ops_*' --trace-file k.log -- modprobe e1000
    udrv trace qemu k.log --map e1000 -o kernel-e1000.json

One line of QEMU 7.2's log backend (``softmmu/trace-events``; the ``PID@SEC.USEC:``
prefix is there when QEMU runs with ``-msg timestamp=on``, as the lab's does when tracing)::

    4242@1764440000.123456:memory_region_ops_write cpu 0 mr 0x55d1c2a0 addr 0xfebc00d8 \
value 0xffffffff size 4 name 'e1000-mmio'

``addr`` is absolute (``memory_region_to_absolute_addr``): the guest-physical address for a
memory BAR, the port for an I/O BAR. ``mr`` is the MemoryRegion's host pointer, one per
device instance and QEMU run, so it tells two devices of one model apart. A BAR is aligned
to its size (PCI Local Bus 3.0, 6.2.5.1), so the BAR's base is the address with the low
bits cleared, unless the model's BAR size varies (NVMe): then ``base`` must be given.

The 8254x's I/O BAR is a window onto the same registers (SDM 13.3: write the register's
offset to IOADDR, then read or write IODATA). Linux's e1000 issues CTRL.RST on the
82540/82544/82545/82546 that way (``e1000_reset_hw``: they "can't ack the 64-bit write
when issuing the reset"), so an IODATA access is named after the register IOADDR selects,
with ``via: IODATA``. (QEMU's e1000 ignores its I/O BAR: such a reset changes nothing
there.)
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udrv.core.regmap import RegisterMap
from udrv.errors import TraceError
from udrv.trace import WindowNames

#: One memory_region_ops_read/write line of QEMU's log backend (QEMU 7.2,
#: softmmu/trace-events), with the optional ``-msg timestamp=on`` prefix.
LINE = re.compile(
    r"^(?:(?P<pid>\d+)@(?P<sec>\d+)\.(?P<usec>\d+):)?"
    r"memory_region_ops_(?P<op>read|write) cpu (?P<cpu>-?\d+) mr 0x(?P<mr>[0-9a-f]+) "
    r"addr 0x(?P<addr>[0-9a-f]+) value 0x(?P<value>[0-9a-f]+) size (?P<size>\d+) "
    r"name '(?P<name>[^']*)'\s*$"
)


@dataclass(frozen=True)
class QemuModel:
    """Where a QEMU device model's registers appear in its trace.

    Attributes:
        name: the ``--map`` name.
        regmap: ``module:class`` of udrv's register map of the BAR.
        region: the QEMU MemoryRegion name of that BAR's registers.
        bar_size: the BAR's size, or ``None`` when it depends on the model's options.
        io_region: the MemoryRegion name of an I/O BAR that is a window onto the registers.
        io_regmap: ``module:class`` of its map (one with a ``WINDOW``, see
            :class:`udrv.trace.WindowNames`).
        io_size: the I/O BAR's size.
        source: where QEMU names the regions (for the reader).
    """

    name: str
    regmap: str
    region: str
    bar_size: int | None
    io_region: str | None = None
    io_regmap: str = ""
    io_size: int = 0
    source: str = ""


def _load_map(spec: str) -> type[RegisterMap]:
    module, cls = spec.split(":")
    found: type[RegisterMap] = getattr(importlib.import_module(module), cls)
    return found


#: QEMU 7.2's models of the devices udrv drives.
MODELS: dict[str, QemuModel] = {
    m.name: m
    for m in (
        QemuModel("e1000", "udrv.drivers.e1000.regs:E1000Regs", "e1000-mmio", 0x20000,
                  io_region="e1000-io", io_regmap="udrv.drivers.e1000.regs:E1000IoRegs",
                  io_size=0x40, source="hw/net/e1000.c: PNPMMIO_SIZE 0x20000, IOPORT_SIZE 0x40"),
        QemuModel("edu", "udrv.drivers.edu.regs:EduRegs", "edu-mmio", 1 << 20,
                  source="hw/misc/edu.c: 1 MiB"),
        # The "nvme" region sits at offset 0 of the "nvme-bar0" container, whose size
        # depends on max_ioqpairs and msix_qsize (hw/nvme/ctrl.c nvme_bar_size).
        QemuModel("nvme", "udrv.drivers.nvme.regs:NvmeRegs", "nvme", None,
                  source="hw/nvme/ctrl.c"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class QemuAccess:
    """One traced access.

    Attributes:
        line: its line number in the log (1-based).
        time: host time in seconds since the epoch, or ``None`` (no ``-msg timestamp=on``).
        pid: QEMU's process id (0 when not printed).
        cpu: the vCPU that made it (-1: not a CPU, e.g. a device's DMA).
        mr: the MemoryRegion's pointer (one per device instance).
        op: ``"read"`` or ``"write"``.
        addr, value, size, name: as QEMU prints them (size in bytes).
    """

    line: int
    time: float | None
    pid: int
    cpu: int
    mr: int
    op: str
    addr: int
    value: int
    size: int
    name: str


def parse(path: str | Path) -> Iterator[QemuAccess]:
    """Every memory_region_ops access in QEMU's trace log ``path``, in order.

    Other lines (other events, QEMU's messages) are skipped.

    Raises:
        TraceError: the file cannot be read.
    """
    path = Path(path)
    try:
        with open(path, errors="replace") as f:
            for n, text in enumerate(f, 1):
                m = LINE.match(text)
                if m is not None:
                    yield _access(n, m)
    except OSError as exc:
        raise TraceError(f"cannot read the QEMU trace {path}", errno=exc.errno) from None


def _access(n: int, m: re.Match[str]) -> QemuAccess:
    stamp = None
    if m["sec"] is not None:
        stamp = int(m["sec"]) + int(m["usec"]) / 10 ** len(m["usec"])
    return QemuAccess(
        line=n,
        time=stamp,
        pid=int(m["pid"] or 0),
        cpu=int(m["cpu"]),
        mr=int(m["mr"], 16),
        op=m["op"],
        addr=int(m["addr"], 16),
        value=int(m["value"], 16),
        size=int(m["size"]),
        name=m["name"],
    )


def _pick(
    accesses: list[QemuAccess], region: str, size: int | None, base: int | None, what: str
) -> tuple[int, int] | None:
    """(mr, base) of the one instance of QEMU region ``region`` to convert, or ``None``
    when the trace has none.

    The base of an instance is its address with the bits below ``size`` cleared (a BAR is
    aligned to its size); with no ``size``, its lowest address (a driver reads the first
    register of the BAR early: NVMe's CAP), chosen as the nearest at or above ``base``.

    Raises:
        TraceError: several instances and no ``base`` to choose, or none at ``base``.
    """
    groups: dict[int, list[QemuAccess]] = {}
    for a in accesses:
        if a.name == region:
            groups.setdefault(a.mr, []).append(a)
    if not groups:
        return None
    bases = {
        mr: (g[0].addr & ~(size - 1)) if size else min(a.addr for a in g)
        for mr, g in groups.items()
    }
    hint = (
        "the first number of the BAR's line in the guest's /sys/bus/pci/devices/ADDRESS/"
        "resource, or lspci -v's 'Memory at' / 'I/O ports at'"
    )
    if base is not None:
        if size:
            chosen = [mr for mr, b in bases.items() if b == base]
        else:
            above = sorted((b, mr) for mr, b in bases.items() if b >= base)
            chosen = [above[0][1]] if above else []
        if not chosen:
            seen = ", ".join(f"{b:#x}" for b in sorted(bases.values()))
            raise TraceError(
                f"no {region!r} region at {what} {base:#x} in the trace (it has {seen}); "
                f"the {what} is {hint}"
            )
        return chosen[0], base
    if size is None:
        raise TraceError(
            f"the {region!r} BAR's size depends on the device's options: give its {what}, {hint}"
        )
    if len(groups) > 1:
        listed = ", ".join(f"{bases[mr]:#x} ({len(g)} accesses)" for mr, g in groups.items())
        raise TraceError(
            f"the trace has {len(groups)} {region!r} devices, at {listed}: pick one with its {what}"
        )
    mr = next(iter(groups))
    return mr, bases[mr]


#: How far apart two MemoryRegions of one device's state may be. QEMU's E1000State holds
#: ``MemoryRegion mmio; MemoryRegion io;`` one after the other (hw/net/e1000.c), so the
#: I/O BAR's region is the next one after the memory BAR's, sizeof(MemoryRegion) bytes on.
SIBLING_DISTANCE = 0x1000


def _sibling(accesses: list[QemuAccess], region: str, size: int, mr: int) -> tuple[int, int] | None:
    """(mr, base) of the instance of ``region`` that belongs to the same device as the
    MemoryRegion ``mr`` (the nearest one after it in QEMU's memory), or ``None``."""
    near = {
        a.mr: a.addr & ~(size - 1)
        for a in accesses
        if a.name == region and 0 < a.mr - mr < SIBLING_DISTANCE
    }
    if not near:
        return None
    sibling = min(near)
    return sibling, near[sibling]


@dataclass
class Conversion:
    """What :func:`convert` made: the trace and what it chose.

    Attributes:
        trace: ``{"traceEvents": [...], ...}``, the format :meth:`udrv.trace.Tracer.save`
            writes.
        events: how many register accesses it holds.
        base: the register BAR's base address.
        io_base: the I/O window's base port, or ``None`` (no I/O accesses).
        timestamps: whether QEMU printed times (without, accesses are 1 µs apart).
    """

    trace: dict[str, Any]
    events: int
    base: int
    io_base: int | None
    timestamps: bool

    def save(self, path: str | Path) -> Path:
        """Write the trace to ``path`` (JSON); returns the path.

        Raises:
            TraceError: the file cannot be written.
        """
        path = Path(path)
        try:
            path.write_text(json.dumps(self.trace))
        except OSError as exc:
            raise TraceError(f"cannot write {path}", errno=exc.errno) from None
        return path


def convert(
    log: str | Path,
    model: str = "e1000",
    *,
    base: int | None = None,
    io_base: int | None = None,
    since: float | None = None,
    until: float | None = None,
    label: str | None = None,
) -> Conversion:
    """The accesses to one device's registers in QEMU trace ``log``, named from udrv's map.

    Args:
        log: a QEMU trace log with ``memory_region_ops_read/write`` events.
        model: a key of :data:`MODELS` (``e1000``, ``edu``, ``nvme``).
        base: the register BAR's guest-physical base; needed when the log holds several
            devices of the model, or the BAR's size varies (NVMe).
        io_base: the I/O BAR's port, when the log holds several devices' I/O BARs.
        since, until: keep only accesses stamped in ``[since, until)`` (host time, seconds
            since the epoch, as QEMU stamps lines).
        label: the trace's process name (default ``"QEMU trace: <region> @ <base>"``).

    Returns:
        The trace (one track per vCPU), with times from the first access kept.

    Raises:
        TraceError: an unknown model, an unreadable log, a log without accesses to the
            device (the message says what it does hold), an ambiguous device.
    """
    if model not in MODELS:
        raise TraceError(f"no QEMU model named {model!r}; known: {', '.join(sorted(MODELS))}")
    m = MODELS[model]
    log = Path(log)
    windowed = since is not None or until is not None
    lo, hi = since or 0.0, until or float("inf")
    wanted = {m.region, m.io_region}
    # A log is mostly other devices' accesses (the guest's disks, timers, consoles): only
    # this model's are kept, and the names of the others for the error message.
    accesses: list[QemuAccess] = []
    seen: set[str] = set()
    for a in parse(log):
        if windowed:
            if a.time is None:
                raise TraceError(
                    f"{log}: since/until need timestamps; run QEMU with -msg timestamp=on"
                )
            if not lo <= a.time < hi:
                continue
        seen.add(a.name)
        if a.name in wanted:
            accesses.append(a)
    runs: dict[int, list[float]] = {}
    for a in accesses:
        if a.name == m.region:
            runs.setdefault(a.pid, []).extend([] if a.time is None else [a.time])
    if len(runs) > 1:  # a log QEMU appended to (MemoryRegion pointers are per run)
        spans = ", ".join(
            f"pid {pid}" + (f" from {min(t):.6f} to {max(t):.6f}" if t else "")
            for pid, t in runs.items()
        )
        raise TraceError(
            f"{log} holds {len(runs)} QEMU runs with {model} accesses ({spans}): pick one "
            "with --since/--until (host time, as the lines are stamped), or trace to a new file"
        )
    if runs:
        (pid,) = runs
        accesses = [a for a in accesses if a.pid == pid]
    picked = _pick(accesses, m.region, m.bar_size, base, "base")
    if picked is None:
        names = sorted(seen)
        held = f"accesses to {', '.join(repr(n) for n in names[:12])}" if names else "none"
        window = " in the given time window" if since is not None or until is not None else ""
        raise TraceError(
            f"{log}: no {model} register accesses (QEMU region {m.region!r}){window}; it has "
            f"{held}. Trace with --trace 'memory_region_ops_*' while the driver runs"
        )
    mr, bar_base = picked
    io: tuple[int, int] | None = None
    if m.io_region is not None and io_base is not None:
        io = _pick(accesses, m.io_region, m.io_size, io_base, "I/O base")
    elif m.io_region is not None:
        io = _sibling(accesses, m.io_region, m.io_size, mr)
    regmap = _load_map(m.regmap)
    io_map = _load_map(m.io_regmap) if io is not None else None
    region = f"{m.region} @ {bar_base:#x}"
    io_name = f"{m.io_region} @ {io[1]:#x}" if io else ""
    mine = [a for a in accesses if a.mr == mr or (io is not None and a.mr == io[0])]
    stamped = all(a.time is not None for a in mine)
    t0 = mine[0].time if stamped and mine[0].time is not None else 0.0
    pid = mine[0].pid
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": label or f"QEMU trace: {region}"}},
    ]  # fmt: skip
    for cpu in sorted({a.cpu for a in mine}):
        name = f"vCPU {cpu}" if cpu >= 0 else "no CPU"
        events.append(
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": cpu, "args": {"name": name}}
        )
    namer = WindowNames()
    for i, a in enumerate(mine):
        if a.mr == mr:
            offset, where, amap = a.addr - bar_base, region, regmap
        else:  # the I/O window
            assert io is not None and io_map is not None
            offset, where, amap = a.addr - io[1], io_name, io_map
        info: dict[str, Any] = {"region": where, "offset": f"{offset:#x}"}
        target = namer.name(a.mr, amap, offset, a.op == "write", a.value, info) or f"{offset:#x}"
        info |= {"width": a.size, "value": f"{a.value:#0{2 + 2 * a.size}x}", "line": a.line}
        ts = (a.time - t0) * 1e6 if stamped and a.time is not None else float(i)
        events.append(
            {"name": f"{a.op} {target}", "cat": "mmio", "ph": "i", "s": "t", "ts": round(ts, 3),
             "pid": pid, "tid": a.cpu, "args": info}
        )  # fmt: skip
    other = {
        "source": "qemu memory_region_ops",
        "log": str(log),
        "model": model,
        "region": region,
        "start": t0 if stamped else None,
    }
    trace = {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}
    return Conversion(trace, len(mine), bar_base, io[1] if io else None, stamped)
