"""`python -m bench.net [--host-only]`: per-packet cost on the host, then a lab comparison of
udrv's e1000 with the kernel's e1000 driver on the same QEMU wiring."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.net.synthetic import IXY_PY_MPPS, per_packet_ns

RESULTS = Path(__file__).resolve().parent.parent / "results"


def host_part(console: Console) -> dict[str, object]:
    table = Table(title="e1000 driver cost per packet (host, synthetic ring, 60-byte frames)")
    for col in ("batch", "RX ns/pkt", "TX ns/pkt", "RX+TX Mpps (1 core)", "vs ixy.py 0.16 Mpps"):
        table.add_column(col, justify="right")
    rows = {}
    for batch in (1, 32, 256):
        rx, tx = per_packet_ns(batch)
        mpps = 1e3 / (rx + tx)
        rows[str(batch)] = {"rx_ns": rx, "tx_ns": tx, "mpps": mpps, "vs_ixy": mpps / IXY_PY_MPPS}
        table.add_row(
            str(batch), f"{rx:.0f}", f"{tx:.0f}", f"{mpps:.2f}", f"{mpps / IXY_PY_MPPS:.1f}x"
        )
    console.print(table)
    return rows


def lab_part(console: Console) -> dict[str, object]:
    from udrv.lab import Lab

    with Lab(["e1000", "e1000", "e1000"], memory=1024) as lab:
        r = lab.run([sys.executable, "-m", "bench.net.guest"], timeout=900, stream=True)
        data = json.loads((lab.results / "net.json").read_text()) if r.returncode == 0 else {}
    if not data:
        console.print("[red]the lab part failed")
        return {}
    table = Table(title="udrv e1000 vs kernel e1000, same QEMU hub (TCG: compare ratios)")
    for col in ("measure", "kernel <-> kernel", "udrv <-> kernel", "udrv / kernel"):
        table.add_column(col, justify="right")
    for name, (k, u, unit) in data.items():
        table.add_row(name, f"{k:.1f} {unit}", f"{u:.1f} {unit}", f"{u / k:.2f}" if k else "-")
    console.print(table)
    return data


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host-only", action="store_true")
    args = ap.parse_args()
    console = Console()
    out: dict[str, object] = {"host": host_part(console)}
    if not args.host_only:
        out["lab"] = lab_part(console)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "net.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
