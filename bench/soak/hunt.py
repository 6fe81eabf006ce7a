"""`python -m bench.soak.hunt [--rounds N] [--minutes M] [--control] [--kernel-arg P]...`:
hunt the guest panic of issue 13 where it starts.

One run of bench.net in six died in its UDP 1514-byte phase with a fault inside kmalloc in
interrupt context: a slab freelist that something had overwritten earlier. A crash there
says nothing about the writer, so the guests here boot with SLUB debugging and page
poisoning (``slub_debug=FZPU page_poison=1``): a write into a freed kmalloc object (a late
DMA, say) is reported when the object is next allocated or checked, with the bytes written
and the object's allocation and free call traces; a write into a freed page when the page
is next allocated. Then bench.net's wiring (three e1000s on one QEMU hub: 04.0 udrv's behind
TAP, 05.0/06.0 the kernel's in namespaces) runs the UDP phase round after round, kernel path
and udrv path, every ``--mix-every`` rounds the whole traffic mix. ``--control`` runs the
same traffic with the kernel's e1000 on 04.0: no udrv at all.

Rounds run in chunks of ``--per-guest``, each in a freshly booted guest (the panic came once
per guest, a minute or two after boot: what the setup does, binding 04.0 away from the
kernel's e1000 to vfio-pci, happens again each time); a guest that dies is counted and the
hunt goes on. Every kernel report (oops, SLUB or page-poison report, WARNING) is printed and
kept; each guest's whole console log is copied to ``bench/results/hunt/``; the summary goes to
``bench/results/hunt/<driver>-<time>.json``. Exits 1 if any guest reported anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

RESULTS = Path(__file__).resolve().parent.parent / "results" / "hunt"
DEVICES = ["e1000", "e1000", "e1000"]  # bench.net's wiring, nothing else in the guest
DEBUG_ARGS = ["slub_debug=FZPU", "page_poison=1"]
POWER_OFF = "sysrq: Power Off"  # the lab's close() (drivers/tty/sysrq.c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100, help="UDP-phase rounds in all")
    ap.add_argument("--minutes", type=float, default=45, help="time bound")
    ap.add_argument("--mix-every", type=int, default=5, help="every Kth round the whole mix")
    ap.add_argument("--per-guest", type=int, default=5, help="rounds per freshly booted guest")
    ap.add_argument("--control", action="store_true", help="the kernel's e1000 on 04.0")
    ap.add_argument("--kernel-arg", action="append", default=None, metavar="PARAM",
                    help=f"guest kernel parameters (default: {' '.join(DEBUG_ARGS)})")  # fmt: skip
    args = ap.parse_args()
    from udrv.errors import LabError
    from udrv.lab import Lab
    from udrv.lab.oops import find_oops

    console = Console()
    driver = "kernel" if args.control else "udrv"
    kernel_args = args.kernel_arg if args.kernel_arg is not None else DEBUG_ARGS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shared = Path(tempfile.mkdtemp(prefix="udrv-hunt-"))
    start = time.monotonic()
    end = start + args.minutes * 60
    out: dict[str, Any] = {"driver": driver, "kernel_args": kernel_args, "rounds": 0,
                           "failures": 0, "guests": [], "deaths": [], "kernel_reports": [],
                           "runs": []}  # fmt: skip
    lab: Lab | None = None

    def retire(lab: Lab, died: bool) -> None:
        """Keep the guest's console log; remove its session unless it died."""
        n = len(out["guests"])
        dest = RESULTS / f"{driver}-{stamp}-guest{n}-console.log"
        shutil.copy(lab.console_log, dest)
        # Boot included; what follows the lab's power-off (init dies with the guest, which
        # the kernel reports as a panic) is not a finding.
        text = dest.read_text(errors="replace").split(POWER_OFF)[0]
        oops = find_oops(text)
        out["guests"].append({"console": str(dest), "died": died, "session": str(lab.session),
                              "first_report": oops.title if oops else None})  # fmt: skip
        if not died:
            shutil.rmtree(lab.session, ignore_errors=True)

    chunk_no = 0
    try:
        while out["rounds"] < args.rounds and time.monotonic() < end - 60:
            if lab is None:
                try:
                    lab = Lab(DEVICES, memory=1024, results=shared, kernel_args=kernel_args,
                              keep=True).start()  # fmt: skip
                except LabError as e:  # did not boot (or died booting): its report is in e
                    console.print(f"[red]a guest did not boot\n{e}")
                    out["deaths"].append({"chunk": "boot", "report": str(e)})
                    continue
                console.print(f"guest {len(out['guests'])} up: kernel args {kernel_args}")
            n = min(args.per_guest, args.rounds - out["rounds"])
            name = f"udp{chunk_no}"
            chunk_no += 1
            left = end - time.monotonic()
            cmd = [sys.executable, "-m", "bench.soak.guest", "udp", "--cycles", str(n),
                   "--seconds", f"{left - 60:.0f}", "--driver", driver,
                   "--mix-every", str(args.mix_every), "--name", name]  # fmt: skip
            try:
                r = lab.run(cmd, timeout=left, stream=True)
            except LabError as e:  # the guest died: its first report is in the message
                console.print(f"[red]chunk {name}: the guest died\n{e}")
                out["deaths"].append({"chunk": name, "report": str(e)})
                lab.kill()
                retire(lab, died=True)
                lab = None
            else:
                if r.kernel_report:
                    console.print(
                        f"[red]chunk {name}: the guest kernel reported\n{r.kernel_report}"
                    )
                    out["kernel_reports"].append({"chunk": name, "report": r.kernel_report})
                if r.returncode != 0:
                    console.print(f"[yellow]chunk {name}: exit {r.returncode}")
                lab.close()  # the next chunk boots afresh
                retire(lab, died=False)
                lab = None
            path = shared / f"soak-{name}.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            out["rounds"] += data.get("cycles", 0)
            out["failures"] += data.get("failures", 0)
            out["runs"] += data.get("runs", [])
            out["seconds"] = time.monotonic() - start
            (RESULTS / f"{driver}-{stamp}.json").write_text(json.dumps(out, indent=1))
    finally:
        if lab is not None:
            lab.close()
            retire(lab, died=False)
        shutil.rmtree(shared, ignore_errors=True)
    out["seconds"] = time.monotonic() - start
    (RESULTS / f"{driver}-{stamp}.json").write_text(json.dumps(out, indent=1))
    console.print(
        f"hunt ({driver}, {' '.join(kernel_args)}): {out['rounds']} rounds in "
        f"{len(out['guests'])} guest(s), {out['seconds'] / 60:.1f} min; {out['failures']} failed "
        f"rounds, {len(out['deaths'])} guest deaths, {len(out['kernel_reports'])} kernel reports; "
        f"{RESULTS / f'{driver}-{stamp}.json'}"
    )
    reported = [g for g in out["guests"] if g["first_report"]]
    for g in reported:
        console.print(f"[red]{g['console']}: {g['first_report']}")
    return 1 if out["deaths"] or out["kernel_reports"] or reported else 0


if __name__ == "__main__":
    sys.exit(main())
