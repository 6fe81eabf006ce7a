"""`udrv lab setup` and `udrv lab run`: the QEMU hardware lab."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from typing import Any

from rich.console import Console

from udrv.errors import LabError

EPILOG = """\
examples:
  udrv lab setup
  udrv lab run --device edu -- sh -c 'cat /sys/bus/pci/devices/*/device'
  udrv lab run --device nvme:size=256M --device e1000 -- lspci -nn
  udrv lab run --device e1000:slot=5 --device e1000:slot=5,fn=1 -- lspci -s 05

Device N (from 0) is at guest address 0000:00:(04+N).0 unless slot=/fn= place it (devices
sharing a slot are functions of one multi-function device, one of them fn=0); the command
sees them in UDRV_LAB_DEVICES (e.g. edu=0000:00:04.0,nvme=0000:00:05.0) and the results
share, writable and visible on the host, in UDRV_LAB_RESULTS.
"""


def register(sub: Any) -> None:
    lab = sub.add_parser("lab", help="the QEMU hardware lab (emulated PCI devices)")
    lsub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    setup = lsub.add_parser("setup", help="install QEMU, a 6.12 guest kernel and the initramfs")
    setup.set_defaults(func=cmd_setup)

    probe = lsub.add_parser(
        "cpu-probe",
        help="check that the guest CPU keeps RFLAGS right after CMPXCHG16B (udrv/lab/cpu.py)",
    )
    probe.add_argument("--cpu", default="max", metavar="MODEL", help="QEMU -cpu model (max)")
    probe.add_argument("--kernel-cx16", action="store_true",
                       help="let the guest kernel use CMPXCHG16B (no clearcpuid=cx16)")  # fmt: skip
    probe.set_defaults(func=cmd_cpu_probe)

    run = lsub.add_parser(
        "run",
        help="boot a guest with devices and run a command in it",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--device",
        "-d",
        action="append",
        default=[],
        metavar="SPEC",
        help="QEMU device NAME[:KEY=VALUE,...], e.g. edu, nvme:size=256M, e1000:slot=5,fn=1",
    )
    run.add_argument("--memory", type=int, default=1024, metavar="MB", help="guest memory (1024)")
    run.add_argument("--cpus", type=int, default=1, help="guest CPUs (1)")
    run.add_argument("--no-iommu", action="store_true", help="no emulated IOMMU (UIO only)")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="kill the command after S seconds (exit 124)",
    )
    run.add_argument(
        "--results",
        default="results",
        metavar="DIR",
        help="host directory shared read-write at the same path (./results)",
    )
    run.add_argument(
        "--trace",
        action="append",
        default=[],
        metavar="PATTERN",
        help="QEMU trace events, e.g. 'memory_region_ops_*'",
    )
    run.add_argument("--trace-file", default=None, metavar="FILE", help="where trace events go")
    run.add_argument("--keep", action="store_true", help="keep the session dir (console log)")
    run.add_argument(
        "--kernel-arg",
        action="append",
        default=None,
        metavar="PARAM",
        help="extra guest kernel parameter, e.g. slub_debug=FZPU (repeat for more; default: "
        "$UDRV_LAB_KERNEL_ARGS)",
    )
    run.add_argument("--cpu", default="max", metavar="MODEL", help="QEMU -cpu model (max)")
    run.add_argument(
        "--kernel-cx16",
        action="store_true",
        help="let the guest kernel use CMPXCHG16B, which QEMU 7.2's TCG gets wrong (the lab "
        "boots it with clearcpuid=cx16; see udrv/lab/cpu.py)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=cmd_run)


def cmd_setup(args: argparse.Namespace) -> int:
    from udrv.lab.install import setup

    console = Console(stderr=True)
    with console.status("setting up the lab") as status:

        def report(msg: str) -> None:
            status.update(msg)
            console.log(msg)

        setup(report)
    return 0


def cmd_cpu_probe(args: argparse.Namespace) -> int:
    """Build udrv/lab/cx16_flags.c on the host and run it in a guest: does the emulated CPU
    keep RFLAGS right after CMPXCHG16B, and does the guest kernel use the instruction?
    Exit status 1 when both go wrong: the guest kernel is exposed."""
    import tempfile
    from pathlib import Path

    from udrv.lab.cpu import build_probe
    from udrv.lab.machine import Lab

    with tempfile.TemporaryDirectory(prefix="udrv-cpu-probe-") as tmp:
        probe = build_probe(Path(tmp))
        with Lab(cpu=args.cpu, kernel_cx16=args.kernel_cx16) as lab:
            r = lab.run([str(probe)], timeout=120)
            flags = lab.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], timeout=60).stdout
    kernel_uses = " cx16 " in flags.rstrip() + " "
    print(f"-cpu {lab.cpu}, kernel parameters {' '.join(lab.workaround_args) or '(none)'}:")
    print(r.stdout, end="")
    print(f"guest kernel uses CMPXCHG16B: {'yes' if kernel_uses else 'no'}")
    return 1 if r.returncode and kernel_uses else 0


def cmd_run(args: argparse.Namespace) -> int:
    from udrv.lab.machine import Lab

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LabError("no command given: udrv lab run [OPTIONS] -- CMD...")
    if args.trace_file and not args.trace:
        raise LabError("--trace-file needs at least one --trace PATTERN")
    lab = Lab(
        args.device,
        memory=args.memory,
        cpus=args.cpus,
        iommu=not args.no_iommu,
        results=args.results,
        trace=args.trace,
        trace_file=args.trace_file,
        keep=args.keep,
        kernel_args=args.kernel_arg,
        cpu=args.cpu,
        kernel_cx16=args.kernel_cx16,
    )
    # SIGTERM (e.g. from a CI timeout) ends the guest like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    start = time.monotonic()
    with lab:
        boot = time.monotonic() - start
        print(
            f"udrv lab: guest up in {boot:.1f} s; devices: {lab.devices or 'none'}", file=sys.stderr
        )
        result = lab.run(cmd, timeout=args.timeout, stream=True)
    if result.kernel_report:
        print(
            f"udrv lab: the guest kernel reported a problem during the command:\n"
            f"{result.kernel_report}",
            file=sys.stderr,
        )
    if args.keep:
        print(f"udrv lab: session files in {lab.session}", file=sys.stderr)
    if result.timed_out:
        print(
            f"udrv lab: `{shlex.join(cmd)}` timed out after {args.timeout:g} s and was killed",
            file=sys.stderr,
        )
        return 124
    return result.returncode
