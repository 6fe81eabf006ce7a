"""`udrv demo`, the part that runs in the lab guest: a Python driver on emulated hardware.

1. The PCI devices as a driver sees them (enumeration + config space).
2. edu bound to vfio-pci, driven from Python, published as /dev/edu0 through CUSE.
3. Ordinary programs use /dev/edu0: the shell computes a factorial, a C program does DMA.
4. Interrupt response times (MSI through VFIO, Python waiting in a blocking read).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import udrv
from udrv.pci.sysfs import devices

console = Console(highlight=False)
EDU_CLIENT = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "edu_uapi.h"
int main(void) {
    int fd = open("/dev/edu0", O_RDWR);
    char out[64] = "DMA through the IOMMU, driven by Python", in[64] = {0};
    struct edu_dma d = { .buf = (uintptr_t)out, .len = sizeof(out), .offset = 0 };
    if (fd < 0 || ioctl(fd, EDU_IOC_DMA_TO_DEVICE, &d)) { perror("edu0"); return 1; }
    d.buf = (uintptr_t)in;
    if (ioctl(fd, EDU_IOC_DMA_FROM_DEVICE, &d)) { perror("edu0"); return 1; }
    printf("C program: sent %zu bytes to the device and back: \"%s\" (%s)\n", sizeof(out), in,
        memcmp(in, out, sizeof(in)) ? "MISMATCH" : "intact");
    return 0;
}
"""


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1 << 10 else f"{n}B"


def show_devices() -> None:
    table = Table("address", "ids", "class", "driver", "IOMMU group", "BARs")
    for d in devices():
        bars = ", ".join(f"BAR{b.index} {b.kind} {_size(b.size)}" for b in d.bars if b.index < 6)
        table.add_row(
            d.address, d.ids, f"{d.class_code:06x}", d.driver or "-", str(d.iommu_group), bars
        )
    console.print(table)


def main() -> int:
    lab = dict(
        item.split("=", 1) for item in os.environ.get("UDRV_LAB_DEVICES", "").split(",") if item
    )
    edu = lab.get("edu")
    step("1. PCI devices in the lab guest, as udrv enumerates them")
    show_devices()
    if not edu:
        console.print("no edu device in this lab; run with --device edu")
        return 1
    step(f"2. edu at {edu}: bind to vfio-pci, open through the IOMMU, serve /dev/edu0")
    dev_dir = Path("/sys/bus/pci/devices") / edu
    (dev_dir / "driver_override").write_text("vfio-pci")
    Path("/sys/bus/pci/drivers_probe").write_text(edu)
    server = subprocess.Popen(
        [sys.executable, "-m", "udrv", "edu", "serve", edu, "--name", "edu0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        console.print(server.stdout.readline().strip())
        step("3. Ordinary programs use /dev/edu0")
        r = subprocess.run(
            "exec 3<>/dev/edu0; printf '\\012\\000\\000\\000' >&3; od -An -tu4 -N4 <&3",
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        console.print(f"shell: printf 10 > /dev/edu0; od < /dev/edu0  ->  10! = {r.stdout.strip()}")
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = Path(tmp) / "client.c", Path(tmp) / "client"
            src.write_text(EDU_CLIENT)
            include = Path(udrv.__file__).parent / "drivers" / "edu"
            if shutil.which("gcc"):
                subprocess.run(["gcc", "-I", str(include), "-o", str(exe), str(src)], check=True)
                console.print(
                    subprocess.run([str(exe)], capture_output=True, text=True).stdout.strip()
                )
    finally:
        server.send_signal(2)
        server.wait(20)
    step("4. Interrupt response: write edu's raise register -> Python code runs (MSI, VFIO)")
    from udrv.tools.irqlat import measure, percentiles

    t = Table("wait style", "n", "p50 us", "p90 us", "p99 us", "max us")
    for style in ("blocking", "epoll", "asyncio", "thread"):
        p = percentiles(measure(edu, style, rounds=100))
        t.add_row(style, f"{p['n']:.0f}", *(f"{p[k]:.0f}" for k in ("p50", "p90", "p99", "max")))
    console.print(t)
    console.print(
        "(TCG emulation: compare ratios, not absolute numbers; `make bench` has the C reference)"
    )
    (dev_dir / "driver" / "unbind").write_text(edu)
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
