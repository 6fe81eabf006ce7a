"""A kernel e1000 moved into a network namespace: the peer udrv's NIC talks to in lab tests."""

from __future__ import annotations

import os
import subprocess
import time
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
