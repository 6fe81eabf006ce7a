"""The lab machine: a QEMU q35 guest (TCG) with an emulated IOMMU and the requested devices.

The guest mounts the host's ``/`` read-only over 9p, under a tmpfs overlay, so it runs the
host's own Python, udrv checkout and tools. Two more 9p shares are writable: the control
channel (the host drops numbered scripts there, the guest agent runs them and writes their
output and exit code back) and the results directory, mounted at its host path.

Usage::

    with Lab(["edu", "nvme:size=256M"]) as lab:
        lab.devices["edu"]                      # "0000:00:04.0"
        r = lab.run(["lspci", "-n"], timeout=30)
        r.returncode, r.stdout
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType

from udrv.errors import LabError, LabSetupError, LabTimeout
from udrv.lab import cpu as lab_cpu
from udrv.lab.devices import (
    DeviceSpec,
    PlacedDevice,
    check_models,
    devices_env,
    place,
    qemu_models,
)
from udrv.lab.install import ensure_initramfs
from udrv.lab.monitor import Relay
from udrv.lab.oops import find_oops
from udrv.lab.paths import installed, lab_dir

#: Kernel modules the agent loads at boot: the interfaces user-space drivers use.
GUEST_MODULES = (
    "vfio-pci",
    "vfio_iommu_type1",
    "uio_pci_generic",
    "ublk_drv",
    "nbd",
    "cuse",
    "tun",
    "null_blk",
)
#: Host environment variables a command in the guest keeps (besides UDRV_*).
ENV_KEEP = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TERM", "CI", "USER")
#: loglevel=5: the console shows KERN_WARNING and above, so a WARNING and its call trace
#: (printed at the default level 4) reach console.log before a later panic does; a boot adds
#: three such lines.
KERNEL_CMDLINE = (
    "console=ttyS0 quiet loglevel=5 panic=-1 intel_iommu=on iommu=pt mitigations=off "
    "no_timer_check tsc=reliable 8250.nr_uarts=1 rdinit=/init"
)
#: Extra kernel parameters for every guest this process boots (space-separated), so that a
#: benchmark that builds its own Lab can be run with debugging on, e.g.
#: ``UDRV_LAB_KERNEL_ARGS="slub_debug=FZPU page_poison=1" python -m bench.net``.
KERNEL_ARGS_ENV = "UDRV_LAB_KERNEL_ARGS"
#: What a kernel parameter may contain here: no spaces or quotes (one word on the command
#: line), enough for ``slub_debug=FZPU,kmalloc-*`` or ``trace_event=net:*``.
_KERNEL_ARG = re.compile(r"[A-Za-z0-9_.,:;=*+/@-]+")
#: Parameters the lab itself depends on (the console it reads, the init that runs commands).
_LAB_OWNED = ("console=", "rdinit=", "init=")
QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


@dataclass
class LabResult:
    """The outcome of one command in the guest."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    #: The first oops/WARNING the guest kernel printed during the command (it survived it),
    #: with its call trace; None if it printed none.
    kernel_report: str | None = None

    def check(self) -> LabResult:
        """Raise LabTimeout/LabError (with the kernel's report, if any) unless it exited 0."""
        report = f"\n{self.kernel_report}" if self.kernel_report else ""
        if self.timed_out:
            raise LabTimeout(
                f"`{shlex.join(self.args)}` timed out in the lab after {self.seconds:.0f} s"
                + report
            )
        if self.returncode != 0:
            raise LabError(
                f"`{shlex.join(self.args)}` exited {self.returncode} in the lab:\n"
                f"{self.stdout}{self.stderr}" + report
            )
        return self


def kernel_cmdline(iommu: bool = True, extra: Sequence[str] = ()) -> str:
    """The guest kernel's command line: :data:`KERNEL_CMDLINE` (without ``intel_iommu=on``
    when there is no IOMMU) and then ``extra`` (a later parameter wins over an earlier one).

    Args:
        iommu: the guest has the emulated Intel IOMMU.
        extra: kernel parameters, one word each (e.g. ``slub_debug=FZPU``, ``page_poison=1``:
            Documentation/admin-guide/kernel-parameters.txt).

    Raises:
        LabError: a parameter is not one plain word, or would replace one the lab needs.
    """
    base = KERNEL_CMDLINE if iommu else KERNEL_CMDLINE.replace("intel_iommu=on", "")
    for arg in extra:
        if not _KERNEL_ARG.fullmatch(arg):
            raise LabError(
                f"kernel parameter {arg!r} is not one word of letters, digits and _.,:;=*+/@-; "
                "pass each parameter separately (e.g. 'slub_debug=FZPU' 'page_poison=1')"
            )
        if arg.startswith(_LAB_OWNED):
            raise LabError(
                f"kernel parameter {arg!r} would replace the lab's own ({', '.join(_LAB_OWNED)}"
                "...): the lab reads the serial console and runs its agent as init"
            )
    return " ".join([base, *extra])


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # No QEMU outlives a killed host process.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()


class Lab:
    """A booted lab guest (context manager).

    Args:
        devices: device SPECs (see :mod:`udrv.lab.devices`).
        memory: guest memory in MiB.
        cpus: guest CPUs (TCG runs one host thread per CPU).
        iommu: put the devices behind an emulated Intel IOMMU (needed for VFIO).
        results: host directory shared read-write at the same path in the guest.
        trace: QEMU trace event patterns (e.g. ``memory_region_ops_*``), written to ``trace_file``.
        boot_timeout: seconds to wait for the guest to come up.
        keep: keep the session directory (console log, scratch images) after close. It is
            kept anyway when the guest dies or does not boot, and the error says where.
        cpu: QEMU ``-cpu`` model.
        kernel_cx16: let the guest kernel use CMPXCHG16B. By default it boots with
            ``clearcpuid=cx16``: QEMU 7.2's TCG corrupts RFLAGS after that instruction, which
            killed guests (see :mod:`udrv.lab.cpu`); True reproduces that.
        kernel_args: extra guest kernel parameters (see :func:`kernel_cmdline`), e.g.
            ``["slub_debug=FZPU", "page_poison=1"]`` to catch memory corruption where it
            happens; None: from the environment variable ``UDRV_LAB_KERNEL_ARGS``.

    Raises:
        LabSetupError: QEMU or the lab kernel is missing (run `udrv lab setup`).
        LabError: the guest did not boot or died; the message carries the kernel's first
            oops/panic report with its call trace (else the console's last lines).
    """

    def __init__(
        self,
        devices: Iterable[str | DeviceSpec] = (),
        *,
        memory: int = 1024,
        cpus: int = 1,
        iommu: bool = True,
        results: str | Path | None = None,
        trace: Sequence[str] = (),
        trace_file: str | Path | None = None,
        boot_timeout: float = 90.0,
        keep: bool = False,
        qemu_args: Sequence[str] = (),
        kernel_args: Sequence[str] | None = None,
        cpu: str = "max",
        kernel_cx16: bool = False,
    ) -> None:
        if kernel_args is None:
            kernel_args = shlex.split(os.environ.get(KERNEL_ARGS_ENV, ""))
        self.kernel_args = list(kernel_args)
        kernel_cmdline(iommu, self.kernel_args)  # bad parameters fail here, before booting
        specs = [d if isinstance(d, DeviceSpec) else DeviceSpec.parse(d) for d in devices]
        self.placed: list[PlacedDevice] = place(specs)
        self.devices: dict[str, str] = {d.name: d.address for d in self.placed}
        self.memory, self.cpus, self.iommu, self.cpu = memory, cpus, iommu, cpu
        self.kernel_cx16 = kernel_cx16
        self.trace, self.trace_file = list(trace), Path(trace_file) if trace_file else None
        self.boot_timeout, self.keep, self.extra_qemu_args = boot_timeout, keep, list(qemu_args)
        self.session = Path(tempfile.mkdtemp(prefix="udrv-lab-"))
        self.ctl = self.session / "ctl"
        self.ctl.mkdir()
        self.results = Path(results).resolve() if results else self.session / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.console_log = self.session / "console.log"
        self.qemu_log = self.session / "qemu.log"
        self.kernel_release = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._n = 0
        self.monitor_socket = self.session / "monitor.sock"
        self._relay = Relay(self.monitor_socket, self.ctl)

    @property
    def workaround_args(self) -> list[str]:
        """Kernel parameters the lab adds for QEMU's sake (:mod:`udrv.lab.cpu`)."""
        return [] if self.kernel_cx16 else list(lab_cpu.KERNEL_ARGS)

    # -- lifecycle -------------------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        inst = installed()
        if shutil.which(QEMU) is None:
            raise LabSetupError(f"{QEMU} is not installed; run `udrv lab setup`")
        fs = "security_model=none,multidevs=remap"
        cmd = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "tcg",
            "-cpu",
            self.cpu,
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory),
            "-machine",
            "q35,kernel-irqchip=split" if self.iommu else "q35",
            "-serial",
            f"file:{self.console_log}",
            "-kernel",
            str(inst.vmlinuz),
            "-initrd",
            str(ensure_initramfs(inst.kernel_release, inst.root)),
            "-append",
            kernel_cmdline(self.iommu, [*self.workaround_args, *self.kernel_args]),
        ]
        if self.iommu:
            # Before any PCI device, so every device is behind it.
            cmd += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
        cmd += [
            "-fsdev",
            f"local,id=fsroot,path=/,readonly=on,{fs}",
            "-device",
            "virtio-9p-pci,fsdev=fsroot,mount_tag=udrvroot,addr=02.0",
            "-fsdev",
            f"local,id=fsctl,path={self.ctl},{fs}",
            "-device",
            "virtio-9p-pci,fsdev=fsctl,mount_tag=udrvctl,addr=03.0,multifunction=on",
            "-fsdev",
            f"local,id=fsres,path={self.results},{fs}",
            # Functions 1+ of slot 3 keep slots 4.. free for the requested devices.
            "-device",
            "virtio-9p-pci,fsdev=fsres,mount_tag=udrvresults,addr=03.1",
        ]
        # HMP for the guest's requests (udrv.lab.monitor): link up/down and the like.
        cmd += ["-monitor", f"unix:{self.monitor_socket},server=on,wait=off"]
        for dev in self.placed:
            cmd += dev.qemu_args(self.session)
        if self.trace:
            out = self.trace_file or self.session / "trace.log"
            # QEMU 7.2 takes the trace file from the last -trace option: name it on each.
            cmd += [a for p in self.trace for a in ("-trace", f"enable={p},file={out}")]
            # Each line gets QEMU's "PID@SEC.USEC:" prefix (host time): udrv trace qemu
            # puts the accesses on a timeline with it.
            cmd += ["-msg", "timestamp=on"]
        return cmd + self.extra_qemu_args

    def start(self) -> Lab:
        """Boot the guest and wait until its agent is ready.

        Raises:
            LabSetupError: QEMU or the lab kernel is missing.
            LabError: a device model QEMU does not have, or the guest did not boot.
        """
        try:
            inst = installed()
            # A misspelt model would otherwise surface as "the guest stopped while booting".
            check_models([d.spec for d in self.placed], qemu_models(QEMU, lab_dir()))
        except LabError:
            self.close()
            raise
        agent = resources.files("udrv.lab").joinpath("agent.sh").read_bytes()
        (self.ctl / "agent.sh").write_bytes(agent)
        session_env = {
            "UDRV_LAB_RESULTS": str(self.results),
            "UDRV_LAB_KERNEL": str(inst.root),
            "UDRV_LAB_MODULES": " ".join(GUEST_MODULES),
            "UDRV_LAB_DEVICES": devices_env(self.placed),
        }
        (self.ctl / "session.env").write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in session_env.items())
        )
        cmd = self.qemu_command()
        if self.trace_file is not None:
            # QEMU appends to an existing trace file: one file, one session.
            self.trace_file.unlink(missing_ok=True)
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.boot_timeout
        ready = self.ctl / "ready"
        try:
            while not ready.exists():
                if self._proc.poll() is not None:
                    raise LabError(f"the lab guest stopped while booting\n{self._post_mortem()}")
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the lab guest did not come up within {self.boot_timeout:.0f} s\n"
                        f"{self._post_mortem()}"
                    )
                time.sleep(0.02)
            self.kernel_release = ready.read_text().strip()
            self._relay.start()
        except BaseException:
            self.close()
            raise
        return self

    def _post_mortem(self) -> str:
        """What the guest left: the kernel's first oops/panic report with its call trace, else
        the last console lines; QEMU's own messages. The session directory is kept (and named)
        so the whole console log and the scratch images can be read afterwards."""
        self.keep = True
        parts = []
        with contextlib.suppress(OSError):
            tail = self.qemu_log.read_text(errors="replace").strip().splitlines()[-10:]
            if tail:
                parts.append(f"--- {self.qemu_log.name} (last lines) ---\n" + "\n".join(tail))
        console = ""
        with contextlib.suppress(OSError):
            console = self.console_log.read_text(errors="replace")
        oops = find_oops(console)
        if oops is not None:
            parts.append(oops.describe(self.console_log.name))
        elif console.strip():
            tail = console.strip().splitlines()[-25:]
            parts.append(f"--- {self.console_log.name} (last lines) ---\n" + "\n".join(tail))
        else:
            parts.append("(no console output)")
        parts.append(f"udrv lab: session files kept in {self.session} (console.log, qemu.log)")
        return "\n".join(parts)

    def _console_size(self) -> int:
        try:
            return self.console_log.stat().st_size
        except OSError:
            return 0

    def _kernel_report_since(self, mark: int) -> str | None:
        """The first kernel report printed on the console after byte ``mark``."""
        try:
            data = self.console_log.read_bytes()
        except OSError:
            return None
        oops = find_oops(data[mark:].decode(errors="replace"))
        if oops is None:
            return None
        line = oops.first_line + data[:mark].count(b"\n")
        return dataclasses.replace(oops, first_line=line).describe(self.console_log.name)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Power the guest off (kill it if it does not stop) and remove the session files."""
        proc, self._proc = self._proc, None
        self._relay.stop()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                (self.ctl / "poweroff").touch()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self.keep:
            shutil.rmtree(self.session, ignore_errors=True)

    def kill(self) -> None:
        """Stop the guest at once (timeouts, Ctrl-C)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.close()

    def __enter__(self) -> Lab:
        return self.start() if self._proc is None else self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            self.close()
        else:
            self.kill()

    # -- commands --------------------------------------------------------------------------

    def _script(
        self, args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float | None
    ) -> str:
        keep = {k: v for k, v in os.environ.items() if k in ENV_KEEP or k.startswith("UDRV_")}
        # The interpreter running udrv first, so `python3` in the guest is this one, not a shim.
        keep["PATH"] = f"{Path(sys.executable).parent}:{keep.get('PATH', '/usr/bin:/bin')}"
        keep |= {
            "UDRV_LAB": "1",
            "UDRV_LAB_DEVICES": devices_env(self.placed),
            "UDRV_LAB_RESULTS": str(self.results),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        keep |= env
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(keep.items())]
        lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
        prefix = f"timeout -k 5 {timeout:g} " if timeout else ""
        lines.append(prefix + shlex.join(args))
        return "\n".join(lines) + "\n"

    def run(
        self,
        args: Sequence[str] | str,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stream: bool | Callable[[str, bytes], None] = False,
        check: bool = False,
    ) -> LabResult:
        """Run a command as root in the guest, in ``cwd`` (default: the host's cwd).

        Args:
            args: the command; a string runs through ``sh -c``.
            timeout: seconds; the command is killed after that and ``timed_out`` is set.
            env: extra environment variables.
            stream: True copies output live to this process's stdout/stderr; a callable gets
                ``("stdout"|"stderr", chunk)``.
            check: raise LabError/LabTimeout unless it exits 0.

        Returns:
            The result; ``kernel_report`` holds the first oops or WARNING the guest kernel
            printed while the command ran (the guest survived it).

        Raises:
            LabError: the guest is not running or died during the command.
        """
        if not self.alive:
            raise LabError("the lab guest is not running; use `with Lab(...) as lab:`")
        argv = ["sh", "-c", args] if isinstance(args, str) else list(args)
        n, self._n = self._n, self._n + 1
        console_mark = self._console_size()
        script = self._script(argv, env or {}, Path(cwd or os.getcwd()).resolve(), timeout)
        tmp = self.ctl / f"{n}.sh.tmp"
        tmp.write_text(script)
        tmp.rename(self.ctl / f"{n}.sh")
        sink: Callable[[str, bytes], None] | None
        if stream is True:

            def sink(name: str, data: bytes) -> None:
                out = sys.stdout if name == "stdout" else sys.stderr
                out.flush()
                out.buffer.write(data)
                out.buffer.flush()
        else:
            sink = stream or None
        out = {"stdout": bytearray(), "stderr": bytearray()}
        paths = {"stdout": self.ctl / f"{n}.out", "stderr": self.ctl / f"{n}.err"}
        rc_path = self.ctl / f"{n}.rc"
        start = time.monotonic()
        backstop = start + timeout + 60 if timeout else None

        def pump() -> None:
            for name, path in paths.items():
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(len(out[name]))
                    data = f.read()
                    if data:
                        out[name] += data
                        if sink:
                            sink(name, data)

        while True:
            done = rc_path.exists()
            pump()
            if done:
                break
            if not self.alive:
                raise LabError(
                    f"the lab guest died while running `{shlex.join(argv)}`\n{self._post_mortem()}"
                )
            if backstop and time.monotonic() > backstop:
                self.kill()
                raise LabTimeout(
                    f"`{shlex.join(argv)}` did not stop after {timeout:g} s; the guest was killed"
                )
            time.sleep(0.02)
        seconds = time.monotonic() - start
        rc = int(rc_path.read_text().strip() or 255)
        result = LabResult(
            args=argv,
            returncode=rc,
            stdout=out["stdout"].decode(errors="replace"),
            stderr=out["stderr"].decode(errors="replace"),
            seconds=seconds,
            timed_out=timeout is not None and rc in (124, 137) and seconds >= timeout,
            kernel_report=self._kernel_report_since(console_mark),
        )
        for p in (*paths.values(), rc_path, self.ctl / f"{n}.sh"):
            with contextlib.suppress(OSError):
                p.unlink()
        return result.check() if check else result
