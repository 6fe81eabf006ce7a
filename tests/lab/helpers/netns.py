"""A kernel e1000 moved into a network namespace: the peer udrv's NIC talks to in lab tests,
and Python programs run there (a receiver that checks what udrv's NIC sent)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def kernel_peer(address: str, ns: str, ip: str) -> str:
    """Let the kernel's e1000 drive ``address``, move its interface into namespace ``ns`` with
    ``ip``/24, bring it up; returns the interface name. Undo with ``ip netns del NS``."""
    subprocess.run(["modprobe", "e1000"], check=True)
    net = Path("/sys/bus/pci/devices") / address / "net"
    for _ in range(50):  # the interface appears once the kernel's probe is done
        if net.exists():
            break
        time.sleep(0.1)
    kif = os.listdir(net)[0]
    cmd = (f"ip netns add {ns} && ip link set {kif} netns {ns} && ip -n {ns} addr add {ip}/24 "
           f"dev {kif} && ip -n {ns} link set {kif} up && ip -n {ns} link set lo up")  # fmt: skip
    subprocess.run(cmd, shell=True, check=True)
    return kif


@contextlib.contextmanager
def python_in_namespace(
    ns: str, script: str, *, ready: str = "ready", timeout: float = 30
) -> Iterator[subprocess.Popen[str]]:
    """Run ``python -c script`` in namespace ``ns`` and wait until its first line of output
    is ``ready`` (the script prints it once its socket is bound, so that nothing is sent
    before anyone listens). Yields the process, whose further output the caller collects
    with ``communicate``; a process still running at the end is killed.

    Raises:
        AssertionError: the script printed something else first, or nothing within
            ``timeout`` seconds (the message carries its stderr).
    """
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        # Byte by byte from the pipe: a buffered readline could swallow output that follows
        # the ready line, which communicate() (reading the pipe itself) would then miss.
        fd, raw, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
        while not raw.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                proc.kill()
                raise AssertionError(f"the script in namespace {ns} did not print {ready!r} "
                                     f"within {timeout:g} s: {proc.communicate()[1]}")  # fmt: skip
            byte = os.read(fd, 1)
            if not byte:
                break  # it ended
            raw += byte
        line = raw.decode(errors="replace")
        if line.strip() != ready:
            proc.kill()
            raise AssertionError(f"the script in namespace {ns} printed {line!r}, not "
                                 f"{ready!r}: {proc.communicate()[1]}")  # fmt: skip
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
