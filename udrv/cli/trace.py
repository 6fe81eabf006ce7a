"""`udrv trace`: record a driver's register accesses, DMA and interrupts; show the timeline.

    udrv trace -o FILE -- COMMAND [ARGS...]    run COMMAND with UDRV_TRACE=FILE
    udrv trace show FILE [--limit N]           the events as a table
    udrv trace show A B [--limit N]            two traces' register accesses side by side,
                                               aligned where they do the same thing
    udrv trace qemu LOG --map M -o FILE        a device's accesses in QEMU's
                                               memory_region_ops trace (a kernel driver's)
    udrv trace merge A B ... -o FILE           one Perfetto file, one track per trace

The files are Chrome/Perfetto trace-event JSON: open them in ui.perfetto.dev as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from udrv.errors import TraceError, UdrvError
from udrv.trace import ENV


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="record a command's register accesses, DMA and interrupts (Perfetto JSON)",
        description="udrv trace -o FILE -- COMMAND ARGS... runs COMMAND (a udrv command or any "
        "program that imports udrv) with UDRV_TRACE=FILE; udrv trace show FILE prints the "
        "timeline. udrv trace qemu LOG converts a device's accesses in QEMU's "
        "memory_region_ops trace (a kernel driver's, in the lab) into the same format; udrv "
        "trace show A B puts two traces side by side, udrv trace merge A B -o FILE on one "
        "timeline. The files open in the Perfetto UI (ui.perfetto.dev).",
    )
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="where the trace goes")
    p.add_argument("--limit", type=int, metavar="N", help="show: only the first N events")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS | show FILE [FILE] | qemu LOG | merge FILE...",
        help="the command to trace (after --); `show FILE` (two files: side by side); "
        "`qemu LOG --map e1000 -o FILE` converts QEMU's memory_region_ops trace; "
        "`merge A B -o FILE` puts traces on one timeline",
    )
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    words = list(args.command)
    # REMAINDER took the options after `show`, `qemu` and `merge` too.
    if words[:1] == ["show"]:
        sp = argparse.ArgumentParser(prog="udrv trace show")
        sp.add_argument("files", type=Path, nargs="+", metavar="FILE")
        sp.add_argument("--limit", type=int, default=args.limit)
        shown = sp.parse_args(words[1:])
        if len(shown.files) == 1:
            return show(shown.files[0], limit=shown.limit)
        if len(shown.files) == 2:
            return show_side_by_side(*shown.files, limit=shown.limit)
        raise TraceError("udrv trace show: one file, or two to put side by side")
    if words[:1] == ["qemu"]:
        return cmd_qemu(words[1:], args.output)
    if words[:1] == ["merge"]:
        sp = argparse.ArgumentParser(prog="udrv trace merge")
        sp.add_argument("files", type=Path, nargs="+", metavar="FILE")
        sp.add_argument("-o", "--output", type=Path, default=args.output, metavar="FILE")
        sp.add_argument("--label", action="append", default=[], metavar="NAME",
                        help="a track's name, once per file in order (default: its own)")  # fmt: skip
        merged = sp.parse_args(words[1:])
        if merged.output is None:
            raise TraceError("udrv trace merge: give the output file with -o FILE")
        return merge(merged.files, merged.output, labels=merged.label)
    if words[:1] == ["--"]:
        words = words[1:]
    if not words:
        raise UdrvError("usage: udrv trace -o FILE -- COMMAND ARGS... (or udrv trace show FILE)")
    if args.output is None:
        raise UdrvError("udrv trace: give the output file with -o FILE")
    return run(args.output, words)


def run(output: Path, command: list[str]) -> int:
    """Run ``command`` with tracing to ``output``; returns its exit status.

    ``udrv`` as the command runs this same installation (``python -m udrv``).

    Raises:
        UdrvError: the command cannot be started, or it wrote no trace (it never imported
            udrv).
    """
    output = output.resolve()
    output.unlink(missing_ok=True)
    if command[0] == "udrv":
        command = [sys.executable, "-m", "udrv", *command[1:]]
    try:
        rc = subprocess.run(command, env={**os.environ, ENV: str(output)}).returncode
    except OSError as exc:
        raise UdrvError(f"udrv trace: cannot run {command[0]}", errno=exc.errno) from None
    if not output.exists():
        raise UdrvError(
            f"udrv trace: {command[0]} exited ({rc}) without writing {output}; it must import "
            "udrv (a udrv command, or Python code using udrv)"
        )
    events = json.loads(output.read_text())["traceEvents"]
    n = sum(e["ph"] != "M" for e in events)
    print(f"udrv trace: {n} events in {output} (udrv trace show {output})", file=sys.stderr)
    return rc


def read_trace(path: Path) -> dict[str, Any]:
    """A trace file as ``{"traceEvents": [...], ...}`` (a bare event list is accepted).

    Raises:
        TraceError: unreadable, or not a trace-event JSON file.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TraceError(f"cannot read the trace {path}", errno=exc.errno) from None
    except ValueError as exc:
        raise TraceError(
            f"{path}: not a trace-event JSON file ({exc}); make one with udrv trace -o, or "
            "convert a QEMU trace log with udrv trace qemu"
        ) from None
    if isinstance(data, list):
        data = {"traceEvents": data}
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("traceEvents"), list)
        or not all(isinstance(e, dict) for e in data["traceEvents"])
    ):
        raise TraceError(
            f"{path}: not a trace-event JSON file (no traceEvents list); make one with "
            "udrv trace -o, or convert a QEMU trace log with udrv trace qemu"
        )
    return data


def load(path: Path) -> list[dict[str, Any]]:
    """The timed events of a trace file, in time order.

    Raises:
        TraceError: unreadable, or not a trace-event JSON file.
    """
    events = read_trace(path)["traceEvents"]
    try:
        timed = [e for e in events if e.get("ph") in ("X", "i", "B", "E")]
        return sorted(timed, key=lambda e: float(e["ts"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(
            f"{path}: not a trace-event JSON file (an event without a time: {exc}); make one "
            "with udrv trace -o"
        ) from None


def _label(path: Path, events: list[dict[str, Any]]) -> str:
    """The trace's process name, else the file's name."""
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            name = e.get("args", {}).get("name")
            if name:
                return str(name)
    return path.name


def _details(e: dict[str, Any]) -> str:
    a = e.get("args", {})
    if e.get("cat") in ("mmio", "config"):
        text = f"{a.get('value', '')}"
        if "decoded" in a:
            text = a["decoded"].split(" = ", 1)[-1]
        via = f" via {a['via']}" if "via" in a else ""
        where = f"{a.get('region', '')} {a.get('offset', '')}/{a.get('width', '')}{via}"
        return f"{text}  [{where}]"
    return " ".join(f"{k}={v}" for k, v in a.items())


def show(path: Path, *, limit: int | None = None) -> int:
    """Print the timeline of a trace file (time from the first event, duration, event)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    events = load(path)
    if not events:
        print(f"{path}: no events")
        return 0
    t0 = events[0]["ts"]
    table = Table(title=f"{path} ({len(events)} events)")
    for col, just in (("ms", "right"), ("µs", "right"), ("kind", "left"), ("event", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_column("details", overflow="fold")
    for e in events[:limit]:
        dur = f"{e['dur']:.1f}" if "dur" in e else ""
        # escape: "[e1000-mmio @ ...]" would otherwise be taken for rich markup and dropped
        table.add_row(
            f"{(e['ts'] - t0) / 1000:.3f}", dur, e.get("cat", ""), escape(e["name"]),
            escape(_details(e)),
        )  # fmt: skip
    Console(width=max(Console().width, 140)).print(table)
    return 0


# -- two traces -----------------------------------------------------------------------------


def _accesses(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The register accesses (BAR, not config space) among ``events``."""
    return [e for e in events if e.get("cat") == "mmio"]


def _value(e: dict[str, Any]) -> str:
    return str(e.get("args", {}).get("value", ""))


def _key(e: dict[str, Any]) -> str:
    """What makes two accesses the same step: operation, register, and the window used."""
    via = e.get("args", {}).get("via")
    return f"{e['name']} via {via}" if via else str(e["name"])


def collapse(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Runs of the same access with the same value (a poll) as one (event, count) each."""
    out: list[tuple[dict[str, Any], int]] = []
    for e in events:
        if out and _key(out[-1][0]) == _key(e) and _value(out[-1][0]) == _value(e):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((e, 1))
    return out


Row = tuple[tuple[dict[str, Any], int] | None, tuple[dict[str, Any], int] | None, str]


def align(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[Row]:
    """Two traces' register accesses in rows, paired where both do the same thing.

    Each trace's accesses are collapsed (:func:`collapse`), then matched by operation and
    register (``write CTRL``, and the window it went through) with :class:`difflib.SequenceMatcher`, so a step one driver
    takes and the other does not shows up as a row with one side empty.

    Returns:
        (left, right, mark) rows; a side is (event, count) or ``None``; mark is ``=``
        (same access, same value), ``~`` (same access, another value), ``<`` (left only),
        ``>`` (right only).
    """
    import difflib

    left, right = collapse(_accesses(a)), collapse(_accesses(b))
    keys_l = [_key(e) for e, _ in left]
    keys_r = [_key(e) for e, _ in right]
    rows: list[Row] = []
    matcher = difflib.SequenceMatcher(None, keys_l, keys_r, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for x, y in zip(left[i1:i2], right[j1:j2], strict=True):
                rows.append((x, y, "=" if _value(x[0]) == _value(y[0]) else "~"))
        else:
            rows += [(x, None, "<") for x in left[i1:i2]]
            rows += [(None, y, ">") for y in right[j1:j2]]
    return rows


def show_side_by_side(path_a: Path, path_b: Path, *, limit: int | None = None) -> int:
    """Print the register accesses of two traces side by side (see :func:`align`).

    Raises:
        TraceError: a file is unreadable, not a trace, or has no register accesses.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    traces = []
    for path in (path_a, path_b):
        events = load(path)
        if not _accesses(events):
            raise TraceError(f"{path}: no register accesses to compare")
        traces.append((path, events, _label(path, read_trace(path)["traceEvents"])))
    (pa, ea, la), (pb, eb, lb) = traces
    rows = align(ea, eb)
    t0 = {id(ea): _accesses(ea)[0]["ts"], id(eb): _accesses(eb)[0]["ts"]}
    same = sum(mark in "=~" for *_, mark in rows)
    table = Table(
        title=escape(f"{la} ({pa.name}) | {lb} ({pb.name}): {len(rows)} rows, {same} paired"),
        caption="= same access and value, ~ same access, another value, < or > one side only; "
        "xN: N times in a row; ms from each trace's first access",
    )
    for col, just in (("ms", "right"), (escape(la), "left"), ("value", "left"), ("", "center"),
                      ("ms", "right"), (escape(lb), "left"), ("value", "left")):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]

    def cells(side: tuple[dict[str, Any], int] | None, start: float) -> list[str]:
        if side is None:
            return ["", "", ""]
        e, n = side
        name = _key(e) + (f" x{n}" if n > 1 else "")
        return [f"{(e['ts'] - start) / 1000:.3f}", escape(name), _value(e)]

    for left, right, mark in rows[:limit]:
        table.add_row(*cells(left, t0[id(ea)]), mark, *cells(right, t0[id(eb)]))
    Console(width=max(Console().width, 140)).print(table)
    return 0


def merge(files: list[Path], output: Path, *, labels: list[str] | None = None) -> int:
    """Write one trace holding ``files``, each as its own process (a Perfetto track group)
    named by its label, times shifted so that each starts at its first event.

    Raises:
        TraceError: fewer than two files, more labels than files, an unreadable trace.
    """
    labels = labels or []
    if len(files) < 2:
        raise TraceError("udrv trace merge: give two traces or more")
    if len(labels) > len(files):
        raise TraceError(f"udrv trace merge: {len(labels)} labels for {len(files)} files")
    out: list[dict[str, Any]] = []
    for n, path in enumerate(files, 1):
        events = read_trace(path)["traceEvents"]
        timed = load(path)
        start = timed[0]["ts"] if timed else 0
        name = labels[n - 1] if n <= len(labels) and labels[n - 1] else _label(path, events)
        out.append({"name": "process_name", "ph": "M", "pid": n, "tid": 0,
                    "args": {"name": name}})  # fmt: skip
        out.append({"name": "process_sort_index", "ph": "M", "pid": n, "tid": 0,
                    "args": {"sort_index": n}})  # fmt: skip
        for e in events:
            if e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index"):
                continue
            e = {**e, "pid": n}
            if "ts" in e:
                e["ts"] = e["ts"] - start
            out.append(e)
    try:
        output.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ns"}))
    except OSError as exc:
        raise TraceError(f"cannot write {output}", errno=exc.errno) from None
    print(f"udrv trace merge: {len(files)} traces in {output}", file=sys.stderr)
    return 0


# -- QEMU's trace ---------------------------------------------------------------------------


def cmd_qemu(words: list[str], output: Path | None) -> int:
    """`udrv trace qemu LOG --map MODEL [--base ADDR] -o FILE`."""
    from udrv import trace_qemu

    sp = argparse.ArgumentParser(
        prog="udrv trace qemu",
        description="Convert a device's accesses in QEMU's memory_region_ops trace (e.g. "
        "`udrv lab run --trace 'memory_region_ops_*' --trace-file LOG`) into a udrv trace, "
        "its registers named from udrv's map.",
    )
    sp.add_argument("log", type=Path, help="QEMU's trace log")
    sp.add_argument("--map", default="e1000", choices=sorted(trace_qemu.MODELS),
                    help="the device model (default e1000)")  # fmt: skip
    sp.add_argument("--base", type=_int, metavar="ADDR",
                    help="the register BAR's guest-physical address (needed when the log has "
                    "several such devices, and for nvme): the first number of the BAR's line "
                    "in the guest's /sys/bus/pci/devices/ADDRESS/resource")  # fmt: skip
    sp.add_argument(
        "--io-base",
        type=_int,
        metavar="PORT",
        help="the I/O BAR's port, when the log has several e1000s",
    )
    sp.add_argument("--since", type=float, metavar="SECONDS",
                    help="only accesses from this host time on (seconds since the epoch, as "
                    "QEMU stamps its lines)")  # fmt: skip
    sp.add_argument(
        "--until", type=float, metavar="SECONDS", help="only accesses before this host time"
    )
    sp.add_argument("--label", help="the trace's name in show and Perfetto")
    sp.add_argument("-o", "--output", type=Path, default=output, metavar="FILE")
    a = sp.parse_args(words)
    if a.output is None:
        raise TraceError("udrv trace qemu: give the output file with -o FILE")
    conv = trace_qemu.convert(a.log, a.map, base=a.base, io_base=a.io_base, since=a.since,
                              until=a.until, label=a.label)  # fmt: skip
    conv.save(a.output)
    io = f", I/O window at {conv.io_base:#x}" if conv.io_base is not None else ""
    print(
        f"udrv trace qemu: {conv.events} {a.map} register accesses (BAR at {conv.base:#x}{io}) "
        f"in {a.output} (udrv trace show {a.output})",
        file=sys.stderr,
    )
    if not conv.timestamps:
        print(
            "udrv trace qemu: the log has no timestamps (QEMU ran without -msg timestamp=on); "
            "the accesses are placed 1 us apart, in order",
            file=sys.stderr,
        )
    return 0


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (0xfebc0000)") from None
