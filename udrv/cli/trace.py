"""`udrv trace`: record a driver's register accesses, DMA and interrupts; show the timeline.

    udrv trace -o FILE -- COMMAND [ARGS...]    run COMMAND with UDRV_TRACE=FILE
    udrv trace show FILE [--limit N]           the events as a table

The file is Chrome/Perfetto trace-event JSON: open it in ui.perfetto.dev as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from udrv.errors import UdrvError
from udrv.trace import ENV


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="record a command's register accesses, DMA and interrupts (Perfetto JSON)",
        description="udrv trace -o FILE -- COMMAND ARGS... runs COMMAND (a udrv command or any "
        "program that imports udrv) with UDRV_TRACE=FILE; udrv trace show FILE prints the "
        "timeline. The file opens in the Perfetto UI (ui.perfetto.dev).",
    )
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="where the trace goes")
    p.add_argument("--limit", type=int, metavar="N", help="show: only the first N events")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS | show FILE",
        help="the command to trace (after --), or `show FILE`",
    )
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    words = list(args.command)
    if words[:1] == ["show"]:
        # REMAINDER took the options after `show` too.
        sp = argparse.ArgumentParser(prog="udrv trace show")
        sp.add_argument("file", type=Path)
        sp.add_argument("--limit", type=int, default=args.limit)
        shown = sp.parse_args(words[1:])
        return show(shown.file, limit=shown.limit)
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


def load(path: Path) -> list[dict[str, Any]]:
    """The timed events of a trace file, in time order.

    Raises:
        UdrvError: not a trace-event JSON file.
    """
    try:
        data = json.loads(path.read_text())
        events = data["traceEvents"] if isinstance(data, dict) else data
        timed = [e for e in events if e.get("ph") in ("X", "i", "B", "E")]
        return sorted(timed, key=lambda e: e["ts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UdrvError(
            f"{path}: not a trace-event JSON file ({exc}); make one with udrv trace -o"
        ) from None


def _details(e: dict[str, Any]) -> str:
    a = e.get("args", {})
    if e.get("cat") in ("mmio", "config"):
        text = f"{a.get('value', '')}"
        if "decoded" in a:
            text = a["decoded"].split(" = ", 1)[-1]
        return f"{text}  [{a.get('region', '')} {a.get('offset', '')}/{a.get('width', '')}]"
    return " ".join(f"{k}={v}" for k, v in a.items())


def show(path: Path, *, limit: int | None = None) -> int:
    """Print the timeline of a trace file (time from the first event, duration, event)."""
    from rich.console import Console
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
        table.add_row(f"{(e['ts'] - t0) / 1000:.3f}", dur, e.get("cat", ""), e["name"], _details(e))
    Console(width=max(Console().width, 140)).print(table)
    return 0
