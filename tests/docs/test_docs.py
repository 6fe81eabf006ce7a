"""The docs are executed: every block of the README's quick start and of the tutorials runs
as a reader would copy it (see :mod:`tests.docs.mdrun` for the conventions), and printed
output shown in the docs is checked against what the commands print.

These tests boot the lab from the host (each ``udrv lab run`` in a doc boots its own guest),
so they are lab-tier: without the lab they skip with the command that enables them, and under
``CI=true`` they fail instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_lab
from tests.docs.mdrun import Block, blocks, missing_lines

ROOT = Path(__file__).resolve().parents[2]
#: The documents whose every block runs (the README's quick start is checked separately).
TUTORIALS = [
    ROOT / "docs" / "tutorial-first-driver.md",
    ROOT / "docs" / "your-own-device.md",
    ROOT / "docs" / "bringup-tutorial.md",
]
BLOCK_TIMEOUT = 600


def _shell_blocks() -> list[tuple[Path, Block]]:
    return [(d, b) for d in TUTORIALS for b in blocks(d) if b.lang == "sh"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # As after `. .venv/bin/activate`, which the README tells the reader to do.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    return env


def _run(doc: Path, block: Block) -> subprocess.CompletedProcess[str]:
    """Run ``block`` in the checkout (where the reader is), with the doc's named files saved
    where it says; files that were not there before are removed afterwards."""
    written = []
    for b in blocks(doc):
        if b.filename and b.not_run is None:
            path = ROOT / b.filename
            if not path.exists():
                written.append(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code)
    try:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("doc", "block"),
    [pytest.param(d, b, id=b.where(d)) for d, b in _shell_blocks()],
)
def test_tutorial_block(doc: Path, block: Block) -> None:
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    require_lab()
    res = _run(doc, block)
    shown = f"$ {block.code}\n--- stdout\n{res.stdout[-6000:]}\n--- stderr\n{res.stderr[-6000:]}"
    assert res.returncode == 0, f"{block.where(doc)} exited {res.returncode}\n{shown}"
    missing = missing_lines(block.expected, res.stdout + res.stderr)
    assert not missing, f"{block.where(doc)}: the doc shows {missing!r}, not printed\n{shown}"


def test_every_python_block_is_run_or_says_why() -> None:
    """A snippet the reader cannot run as shown is a bug in the doc (mdrun raises); a named
    file must be run by a shell block or imported by another named file."""
    for doc in TUTORIALS:
        named = [b for b in blocks(doc) if b.lang == "python" and b.filename and not b.not_run]
        shells = "\n".join(b.code for b in blocks(doc) if b.lang == "sh")
        for b in named:
            stem = Path(b.filename or "").stem
            imported = any(f"import {stem}" in o.code or f"from {stem} " in o.code
                           for o in named if o is not b)  # fmt: skip
            assert b.filename in shells or imported, f"{b.where(doc)}: {b.filename} is never run"


def test_readme_quick_start() -> None:
    """The README starts with the two commands; `make demo` (the main job) runs as written.
    (`make test` is the command that runs this test: CI runs it.)"""
    first = next(b for b in blocks(ROOT / "README.md", strict=False) if b.lang == "sh")
    commands = [ln.split("#")[0].strip() for ln in first.code.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]
    require_lab()
    res = subprocess.run(
        ["make", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "3628800" in res.stdout, res.stdout[-4000:]


def test_readme_models_without_the_lab() -> None:
    """The README's second block (device models, no lab, no root) runs as written."""
    block = [b for b in blocks(ROOT / "README.md", strict=False) if b.lang == "sh"][1]
    assert "udrv emulate edu" in block.code
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert missing_lines(["0x010000ed", "DMA round trip of 256 bytes: ok"], res.stdout) == []
