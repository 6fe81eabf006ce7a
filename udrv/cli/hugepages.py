"""`udrv hugepages N`: reserve 2 MiB hugepages for DMA under UIO (no IOMMU)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hugepages",
        help="reserve 2 MiB hugepages for UIO DMA buffers (show the pool without N)",
        description=(
            "Set the number of reserved 2 MiB hugepages (/sys/kernel/mm/hugepages/"
            "hugepages-2048kB/nr_hugepages). Under UIO, udrv's DMA buffers live in them: "
            "they are physically contiguous and never move. Needs root."
        ),
    )
    p.add_argument("count", nargs="?", type=int, help="total hugepages to reserve (e.g. 64)")
    p.set_defaults(func=cmd_hugepages)


def cmd_hugepages(args: argparse.Namespace) -> int:
    from udrv.dma.hugepage import hugepage_status, reserve_hugepages
    from udrv.errors import DmaError

    if args.count is not None:
        got = reserve_hugepages(args.count)
        if got < args.count:
            raise DmaError(
                f"asked for {args.count} hugepages, the kernel reserved {got} (memory is "
                "fragmented or short); try fewer, or reserve at boot with "
                f"hugepages={args.count} on the kernel command line"
            )
    st = hugepage_status()
    print(f"2 MiB hugepages: {st.total} reserved, {st.free} free ({st.total * 2} MiB)")
    return 0
