"""Extra guest kernel parameters (udrv.lab.machine.kernel_cmdline, Lab(kernel_args=...))."""

from __future__ import annotations

from pathlib import Path

import pytest

from udrv.errors import LabError
from udrv.lab import machine
from udrv.lab.machine import KERNEL_CMDLINE, Lab, kernel_cmdline


def test_extra_parameters_come_after_the_labs_own() -> None:
    line = kernel_cmdline(True, ["slub_debug=FZPU,kmalloc-*", "page_poison=1"])
    assert line == f"{KERNEL_CMDLINE} slub_debug=FZPU,kmalloc-* page_poison=1"
    assert kernel_cmdline(True) == KERNEL_CMDLINE
    assert "intel_iommu=on" not in kernel_cmdline(False, ["page_poison=1"])


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("slub_debug=FZPU page_poison=1", "not one word"),
        ("x='y'", "not one word"),
        ("", "not one word"),
        ("console=tty0", "would replace the lab's own"),
        ("rdinit=/bin/sh", "would replace the lab's own"),
    ],
)
def test_bad_parameters_are_refused_before_booting(arg: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        kernel_cmdline(True, [arg])
    with pytest.raises(LabError, match=message):
        Lab([], kernel_args=[arg])


def test_parameters_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark that builds its own Lab (bench.net) runs with debugging on through the
    environment; an explicit list wins over it."""
    monkeypatch.setenv(machine.KERNEL_ARGS_ENV, "slub_debug=FZPU  page_poison=1")
    lab = Lab([])
    try:
        assert lab.kernel_args == ["slub_debug=FZPU", "page_poison=1"]
    finally:
        lab.close()
    lab = Lab([], kernel_args=["nokaslr"])
    try:
        assert lab.kernel_args == ["nokaslr"]
    finally:
        lab.close()
    monkeypatch.setenv(machine.KERNEL_ARGS_ENV, "console=ttyS1")
    with pytest.raises(LabError, match="console=ttyS1"):
        Lab([])


def test_qemu_boots_the_guest_with_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from types import SimpleNamespace

    inst = SimpleNamespace(vmlinuz=tmp_path / "vmlinuz", kernel_release="6.12", root=tmp_path)
    monkeypatch.setattr(machine, "installed", lambda: inst)
    monkeypatch.setattr(machine, "ensure_initramfs", lambda release, root: tmp_path / "initrd")
    monkeypatch.setattr(machine.shutil, "which", lambda name: f"/usr/bin/{name}")
    lab = Lab([], kernel_args=["slub_debug=FZPU", "page_poison=1"])
    plain = Lab([], kernel_cx16=True)
    try:
        cmd, plain_cmd = lab.qemu_command(), plain.qemu_command()
    finally:
        lab.close()
        plain.close()
    # The QEMU 7.2 workaround first (udrv.lab.cpu), then the caller's parameters.
    assert cmd[cmd.index("-append") + 1] == (
        f"{KERNEL_CMDLINE} clearcpuid=cx16 slub_debug=FZPU page_poison=1"
    )
    assert plain_cmd[plain_cmd.index("-append") + 1] == KERNEL_CMDLINE
    assert cmd[cmd.index("-cpu") + 1] == "max"
