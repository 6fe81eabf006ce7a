"""Where the lab keeps what it installs: ``$UDRV_LAB_DIR``, default ``~/.cache/udrv/lab``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from udrv.errors import LabSetupError

#: Modules the 9p root and the overlay need before the guest can see the host's files; they
#: live (decompressed: busybox insmod cannot read .ko.xz) in the initramfs.
INITRAMFS_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "overlay")


def lab_dir() -> Path:
    """The lab's cache directory."""
    env = os.environ.get("UDRV_LAB_DIR")
    return Path(env) if env else Path.home() / ".cache" / "udrv" / "lab"


@dataclass(frozen=True)
class Installed:
    """What `udrv lab setup` installed: the guest kernel and its initramfs."""

    kernel_release: str  # uname -r inside the guest, e.g. "6.12.117+deb12-amd64"
    package: str  # the Debian package it came from
    root: Path  # the unpacked package: boot/vmlinuz-*, lib/modules/<release>/
    initramfs: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kernel_release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.kernel_release


def state_file() -> Path:
    return lab_dir() / "state.json"


def installed() -> Installed:
    """What `udrv lab setup` installed.

    Raises:
        LabSetupError: the lab is not set up, or its files have gone.
    """
    path = state_file()
    try:
        state = json.loads(path.read_text())
        inst = Installed(
            kernel_release=state["kernel_release"],
            package=state["package"],
            root=Path(state["root"]),
            initramfs=Path(state["initramfs"]),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise LabSetupError(
            f"the lab is not set up ({path} is missing or unreadable: {exc}); run `udrv lab setup`"
        ) from None
    for need in (inst.vmlinuz, inst.modules / "modules.dep"):
        if not need.exists():
            raise LabSetupError(f"the lab's {need} is missing; run `udrv lab setup` again")
    return inst


def save_state(inst: Installed) -> None:
    state_file().write_text(
        json.dumps(
            {
                "kernel_release": inst.kernel_release,
                "package": inst.package,
                "root": str(inst.root),
                "initramfs": str(inst.initramfs),
            },
            indent=2,
        )
    )
