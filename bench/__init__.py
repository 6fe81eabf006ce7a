"""udrv benchmarks: each prints a table of ratios against a reference measured in the same run."""

import subprocess


def sh(cmd: str, timeout: float = 120) -> str:
    """Run a shell command in the guest; its stdout, or RuntimeError with its output."""
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{cmd}: {r.stdout}{r.stderr}")
    return r.stdout
