"""Run the code of a Markdown document as a reader would copy it.

The conventions (docs/CONTRIBUTING.md says the same for writers):

- A ```python block whose first line is ``# NAME.py`` is saved as NAME.py in the run
  directory before any shell block runs; the reader is told to save it under that name.
- ```sh blocks run in order, each with ``bash -euo pipefail`` in the run directory, with the
  checkout's virtual environment first on ``PATH`` (the README tells the reader to activate it).
- A ```text block right after a ```sh block is that block's expected output: each of its
  non-empty lines must appear in what the commands print, in that order.
- ``<!-- docs: not run, REASON -->`` on the line before a block leaves that block out; the
  reason is reported. Every other python block must be named, so nothing is left untested
  by accident.

Markdown is parsed with markdown-it-py (rich's own parser), not with regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

NOT_RUN = re.compile(r"<!--\s*docs:\s*not run,\s*(.+?)\s*-->")
FILENAME = re.compile(r"#\s*([\w./-]+\.py)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    filename: str | None = None
    expected: list[str] = field(default_factory=list)
    not_run: str | None = None

    def where(self, doc: Path) -> str:
        return f"{doc.name}:{self.line}"


def blocks(doc: Path, *, strict: bool = True) -> list[Block]:
    """The fenced code blocks of ``doc``, expected outputs attached to the block before them.

    Raises:
        ValueError: (``strict``) a python block that is neither named nor marked not run, or an output
            block that follows no shell block (the message names the line).
    """
    text = doc.read_text()
    lines = text.splitlines()
    out: list[Block] = []
    for tok in MarkdownIt("commonmark").parse(text):
        if tok.type != "fence" or tok.map is None:
            continue
        start = tok.map[0]
        lang = tok.info.strip().split()[0] if tok.info.strip() else ""
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = NOT_RUN.search(prev)
        block = Block(lang, tok.content, start + 1, not_run=marker[1] if marker else None)
        if lang == "text":
            if not out or out[-1].lang != "sh":
                raise ValueError(f"{doc.name}:{start + 1}: an output block must follow a sh block")
            out[-1].expected = [ln.strip() for ln in tok.content.splitlines() if ln.strip()]
            continue
        if lang == "python":
            first = tok.content.splitlines()[0] if tok.content else ""
            name = FILENAME.match(first)
            block.filename = name[1] if name else None
            if strict and block.filename is None and block.not_run is None:
                raise ValueError(
                    f"{doc.name}:{start + 1}: a python block must start with `# NAME.py` (the "
                    "file the reader saves) or be marked <!-- docs: not run, REASON -->"
                )
        out.append(block)
    return out


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in ``output`` in order (empty: all found)."""
    pos = 0
    for i, want in enumerate(expected):
        at = output.find(want, pos)
        if at < 0:
            return expected[i:]
        pos = at + len(want)
    return []
