"""The kernel reference: ``kmod/edu_irq_ref.c``, built on the host, loaded in the lab guest.

On the host, :func:`build` compiles the module against the lab kernel's headers (unpacked by
`udrv lab setup`, see :func:`udrv.lab.install.install_headers`; installed here on demand if
they are missing) and caches the ``.ko`` under the lab directory, keyed by the kernel release
and the source. The lab guest sees the host's files, so it loads that path.

In the guest, :class:`KernelReference` binds one edu device to the module and reads its
samples: the module's MSI handler timestamps "write INTR_RAISE -> the handler runs", the
event the C and Python references time up to their waiting code.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np

from udrv.errors import LabError, LabSetupError

SOURCE = Path(__file__).resolve().parent / "kmod"
MODULE = "edu_irq_ref"
DEVICE_NODE = Path("/dev") / MODULE
SYS_PCI = Path("/sys/bus/pci/devices")
#: The most rounds one run may ask for (EDU_IRQ_REF_MAX in edu_irq_ref.c).
MAX_ROUNDS = 1_000_000


def _source_digest() -> str:
    h = hashlib.sha256()
    for name in ("Kbuild", f"{MODULE}.c"):
        h.update(name.encode() + b"\0" + (SOURCE / name).read_bytes())
    return h.hexdigest()[:12]


def build(report: Callable[[str], None] = print) -> Path:
    """The module for the lab kernel, built if this source has not been built for it yet.

    Args:
        report: called with a line of progress (``print`` by default).

    Returns:
        The path of ``edu_irq_ref.ko`` (under the lab directory, visible in the guest).

    Raises:
        LabSetupError: the lab is not set up, its kernel's headers cannot be installed, or
            the build fails (the compiler's last lines are in the message).
    """
    from udrv.lab.install import headers_dir, install_headers
    from udrv.lab.paths import installed, lab_dir

    say = report
    release = installed().kernel_release  # the guest's kernel, from state.json
    out = lab_dir() / "kmod" / release / _source_digest()
    ko = out / f"{MODULE}.ko"
    if ko.exists():
        return ko
    kbuild = headers_dir(release)
    if not (kbuild / "Module.symvers").exists():
        say(f"the headers of the lab kernel {release} are missing; installing them "
            "(`udrv lab setup` installs them too)")  # fmt: skip
        kbuild = install_headers(release, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name in ("Kbuild", f"{MODULE}.c"):
            shutil.copy2(SOURCE / name, Path(tmp) / name)
        # Debian's vmlinux in the headers makes kbuild add BTF to modules, which needs pahole;
        # the module needs no BTF, so the option is switched off for this build only.
        cmd = ["make", "-C", str(kbuild), f"M={tmp}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
            raise LabSetupError(
                f"building {SOURCE / MODULE}.c against {kbuild} failed "
                f"(`{' '.join(cmd)}`):\n  " + "\n  ".join(tail)
            )
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / f"{MODULE}.ko", ko.with_suffix(".tmp"))
        ko.with_suffix(".tmp").rename(ko)
    say(f"built {ko}")
    return ko


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise LabSetupError(f"{name} is not installed; `apt-get install kmod`")
    return found


class KernelReference:
    """In the guest: ``edu_irq_ref`` loaded and bound to the edu device at ``address``.

    Args:
        ko: the built module (:func:`build`).
        address: the edu device it takes (its ``driver_override`` is set first, so that the
            module takes this device and no other).

    Raises:
        LabError: insmod failed, or the module did not bind ``address``.
    """

    def __init__(self, ko: Path, address: str) -> None:
        self.address = address
        dev = SYS_PCI / address
        if (dev / "driver").exists():
            (dev / "driver" / "unbind").write_text(address)
        (dev / "driver_override").write_text(MODULE)
        proc = subprocess.run([_tool("insmod"), str(ko)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabError(f"insmod {ko} failed: {proc.stderr.strip()}")
        self._loaded = True
        bound = dev / "driver"
        if not bound.exists() or os.path.basename(os.readlink(bound)) != MODULE:
            self.close()
            raise LabError(f"{MODULE} is loaded but did not bind {address} (see dmesg)")
        self._fd = os.open(DEVICE_NODE, os.O_RDWR | os.O_CLOEXEC)

    def measure(self, rounds: int) -> np.ndarray:
        """Run ``rounds`` interrupts in the module; their latencies in ns (uint64).

        Raises:
            ValueError: ``rounds`` is not in 1..MAX_ROUNDS.
            LabError: an interrupt did not reach the handler within 1 s.
        """
        if not 1 <= rounds <= MAX_ROUNDS:
            raise ValueError(f"rounds must be 1..{MAX_ROUNDS}, not {rounds}")
        try:
            os.write(self._fd, str(rounds).encode())
        except OSError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise LabError(
                    f"{MODULE} on {self.address}: an interrupt did not reach the handler within"
                    " 1 s (is MSI enabled? see dmesg)"
                ) from None
            raise
        want, chunks, got = rounds * 8, [], 0
        while got < want:
            chunk = os.pread(self._fd, want - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return np.frombuffer(b"".join(chunks), dtype=np.uint64)

    def close(self) -> None:
        """Close the device node and unload the module (the device is left unbound)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]
        if getattr(self, "_loaded", False):
            self._loaded = False
            subprocess.run([_tool("rmmod"), MODULE], capture_output=True, check=False)
            (SYS_PCI / self.address / "driver_override").write_text("\n")

    def __enter__(self) -> KernelReference:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
