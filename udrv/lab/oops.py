"""Find a kernel oops, panic or warning in a guest's console log, from its first line.

When a guest dies, the last console lines are the end of a call trace, and the line that says
what went wrong (``BUG: kernel NULL pointer dereference, address: 0000000000000008``) has
scrolled away. :func:`find_oops` returns the report from that first line through its call
trace, so the lab can print what matters.

The markers are the kernel's own first lines: ``BUG:`` and ``kernel BUG at`` (lib/bug.c,
arch/x86/mm/fault.c), ``Oops:`` (arch/x86/kernel/dumpstack.c ``__die``), ``general protection
fault`` (arch/x86/kernel/traps.c), ``Kernel panic - not syncing`` (kernel/panic.c) and
``WARNING:`` (kernel/panic.c ``__warn``); the ``------------[ cut here ]------------`` line
printed just before a BUG_ON or WARN_ON belongs to the report. A report ends with the kernel's
``---[ end trace ... ]---`` / ``---[ end Kernel panic ... ]---`` line, or where the log ends
(with ``panic=-1`` the guest resets before printing the panic's end line).

Two debugging reports the kernel prints only when asked to (``slub_debug=FZPU``,
``page_poison=1``: :func:`udrv.lab.machine.kernel_cmdline`) are found as well, because they
catch memory corruption where it happens, not where it later crashes: SLUB's ``BUG
kmalloc-2k (Not tainted): Poison overwritten`` (mm/slub.c ``slab_bug``, between two rules of
``=`` and ``-``; it names the bytes written, the object's allocation and free call traces, and
ends with the ``FIX kmalloc-2k: Restoring ...`` line of ``slab_fix``), and the page allocator's
``pagealloc: memory corruption`` (mm/page_poison.c ``check_poison_mem``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ``[    9.694320] `` (printk time) before a console line.
TIMESTAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
START_RE = re.compile(
    r"^(BUG:|kernel BUG at |Oops\b|general protection fault|Kernel panic - not syncing|"
    r"WARNING:|BUG [\w.:-]+ \(.*\): |pagealloc: (memory corruption|single bit error))"
)
CUT_HERE = "------------[ cut here ]------------"
#: The rule SLUB prints before its report's ``BUG <cache> (...)`` line (mm/slub.c slab_bug).
SLAB_RULE = "=" * 77
END_RE = re.compile(r"^(---\[ end (trace|Kernel panic)\b.*\]---|FIX [\w.:-]+: )")
#: Enough for a report with registers and a deep call trace, not a whole log.
MAX_LINES = 120
#: A SLUB report also dumps the object (up to 256 lines for a 4 KiB one) between its call
#: traces: room for the allocation and free traces and the first of it.
SLAB_MAX_LINES = 200


@dataclass(frozen=True)
class Oops:
    """The first kernel report found in a console log."""

    first_line: int  # 1-based line number in the log
    text: str  # the report's lines, printk timestamps kept
    title: str  # the line that says what went wrong, without its timestamp
    later: tuple[str, ...] = ()  # first lines of the reports after this one

    def describe(self, log: str = "console.log") -> str:
        """The report for an error message, with a note on the reports that follow it."""
        out = f"--- kernel report from {log} line {self.first_line} ---\n{self.text}"
        if self.later:
            more = "\n".join(f"  {t}" for t in self.later[:3])
            out += f"\n--- {len(self.later)} more kernel report(s) follow in {log}:\n{more}"
        return out


def find_oops(console: str) -> Oops | None:
    """The first kernel oops, panic or warning in ``console``, with its call trace.

    Args:
        console: the guest's serial console text (CRLF or LF line ends).

    Returns:
        The first report, from its first line (or the ``cut here`` line before it) to its
        ``---[ end ... ]---`` line or the end of the log, at most :data:`MAX_LINES` lines;
        ``None`` when the log has none.
    """
    lines = console.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
    bare = [TIMESTAMP_RE.sub("", line) for line in lines]
    starts = [i for i, b in enumerate(bare) if START_RE.match(b)]
    if not starts:
        return None
    first = starts[0]
    end = next((i + 1 for i in range(first + 1, len(lines)) if END_RE.match(bare[i])), len(lines))
    if end == len(lines):
        # No end line (a panic with panic=-1 resets first): stop where a new report is cut.
        end = next((s - 1 for s in starts[1:] if bare[s - 1] == CUT_HERE), end)
    title = bare[first]
    slab = title.startswith("BUG ") and not title.startswith("BUG:")
    if first > 0 and bare[first - 1] in (CUT_HERE, SLAB_RULE):
        first -= 1
    later = tuple(bare[s] for s in starts if s >= end)
    end = min(end, first + (SLAB_MAX_LINES if slab else MAX_LINES))
    return Oops(first + 1, "\n".join(lines[first:end]), title, later)
