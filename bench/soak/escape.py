"""`udrv lab run --device edu -- python -m bench.soak.escape [ROUNDS]`: does a device DMA escape
the emulated IOMMU right after the identity -> VFIO domain switch (issue 13's hypothesis)?

Each round binds edu to vfio-pci (its IOMMU group leaves the identity domain of
``iommu=pt``), opens it, has it DMA a pattern to its staging buffer's IOVA, and reads the
guest-physical address equal to that IOVA through the QEMU monitor (``xp``): the pattern
there means the DMA went to the IOVA taken as a physical address. Then edu goes back to no
driver (identity domain again) for the next round.
"""

from __future__ import annotations

import os
import re
import sys

import udrv
from udrv.core.bind import bind, restore
from udrv.drivers.edu import Edu
from udrv.lab.monitor import command


def guest_physical(at: int, n: int = 16) -> bytes:
    """``n`` bytes of guest-physical memory at ``at`` (HMP ``xp``)."""
    out = command(f"xp /{n}xb {at:#x}")
    return bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", out.split(":", 1)[-1]))[:n]


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    addr = dict(x.split("=", 1) for x in os.environ["UDRV_LAB_DEVICES"].split(","))["edu"]
    escapes = 0
    for i in range(rounds):
        bind(addr, "vfio-pci")
        with udrv.open(addr, dma_mask_bits=28) as dev, Edu(dev, interrupts=None) as edu:
            pattern = bytes([0xA5, i, 0x5A, 0xC3]) * 4
            iova = edu._buffer().iova
            before = guest_physical(iova)
            edu.dma_to_device(pattern)
            ok = edu.dma_from_device(len(pattern)) == pattern
            after = guest_physical(iova)
            escaped = after == pattern != before
            escapes += escaped
            print(f"round {i}: IOVA {iova:#x}, buffer {'ok' if ok else 'WRONG'}; guest-physical "
                  f"{iova:#x} {before.hex()} -> {after.hex()}: "
                  f"{'ESCAPED' if escaped else 'translated'}", flush=True)  # fmt: skip
        restore(addr)
    print(f"escapes: {escapes} of {rounds}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
