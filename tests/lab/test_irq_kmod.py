"""bench/irq in the lab: its kernel reference (edu_irq_ref, built on the host against the lab
kernel's headers that `udrv lab setup` installs) measures real interrupts, and the interleaved
measurement runs end to end. One guest with the bench's edu devices."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_lab

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_lab()
    from bench.irq.guest import DEVICES
    from udrv.lab import Lab

    with Lab(DEVICES, results=tmp_path_factory.mktemp("results")) as lab:
        yield lab


@pytest.fixture(scope="module")
def ko() -> Path:
    require_lab()
    from bench.irq import kmod

    return kmod.build(lambda _: None)


def _guest_json(lab: Any, code: str) -> Any:
    """Run ``code`` with python3 in the guest; it leaves its answer in ``out.json``."""
    res = lab.run(["python3", "-c", textwrap.dedent(code)], timeout=600, cwd=REPO, check=True)
    assert res.kernel_report is None, res.kernel_report  # no oops or WARNING on the way
    return json.loads((lab.results / "out.json").read_text())


def test_kernel_module_times_every_interrupt_in_its_msi_handler(lab: Any, ko: Path) -> None:
    got = _guest_json(
        lab,
        f"""
        import errno, json, os, subprocess
        from pathlib import Path
        from bench.irq.kmod import DEVICE_NODE, KernelReference

        def handled():  # the module's MSI in /proc/interrupts (one CPU)
            for line in Path("/proc/interrupts").read_text().splitlines():
                if line.rstrip().endswith("edu_irq_ref"):
                    return int(line.split()[1])

        address = "{lab.devices["edu.2"]}"
        with KernelReference(Path("{ko}"), address) as k:
            before = handled()
            samples = k.measure(200).tolist()
            again = k.measure(3).tolist()
            after = handled()
            fd = os.open(DEVICE_NODE, os.O_RDWR)
            try:
                os.write(fd, b"0")
                refused = None
            except OSError as exc:
                refused = errno.errorcode[exc.errno]
            os.close(fd)
            driver = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{{address}}/driver"))
        lsmod = subprocess.run(["lsmod"], capture_output=True, text=True).stdout
        out = dict(samples=samples, again=again, handled=after - before, refused=refused,
                   driver=driver, loaded_after="edu_irq_ref" in lsmod,
                   bound_after=os.path.exists(f"/sys/bus/pci/devices/{{address}}/driver"))
        Path(os.environ["UDRV_LAB_RESULTS"], "out.json").write_text(json.dumps(out))
        """,
    )
    assert got["driver"] == "edu_irq_ref"
    assert len(got["samples"]) == 200 and len(got["again"]) == 3
    assert got["handled"] == 203  # every sample is one MSI through the module's handler
    # Latencies in ns: positive and sane for TCG (the whole round trip is microseconds; a
    # value near 0 or above 50 ms is a clock or bookkeeping bug, not a slow machine).
    assert all(500 < ns < 50_000_000 for ns in got["samples"] + got["again"])
    assert got["refused"] == "EINVAL"  # 0 rounds is refused by the module itself
    assert not got["loaded_after"] and not got["bound_after"]  # close() unloads and unbinds


@pytest.mark.slow  # make soak: `make test` stays under 30 minutes
def test_interleaved_measurement_runs_every_variant(lab: Any, ko: Path, tmp_path: Path) -> None:
    c_exe = lab.results / "vfio_msi_ref"
    subprocess.run(
        ["gcc", "-O2", "-o", str(c_exe), str(REPO / "bench/irq/vfio_msi_ref.c")], check=True
    )
    devices = lab.devices
    got = _guest_json(
        lab,
        f"""
        import json, os
        from pathlib import Path
        from bench.irq.guest import run_all

        res = run_all({devices!r}, Path("{ko}"), Path("{c_exe}"), rounds=30, block=1, reps=2)
        Path(os.environ["UDRV_LAB_RESULTS"], "out.json").write_text(json.dumps(res))
        """,
    )
    from bench.irq.guest import C_LABEL, KERNEL, PY_LABELS

    assert len(got["reps"]) == 2
    for rep in got["reps"]:
        assert set(rep) == {KERNEL, C_LABEL, *PY_LABELS.values()}
        for label, samples in rep.items():
            assert len(samples) == 30, label
            assert all(0 < ns < 5_000_000_000 for ns in samples), label
    # Every variant counts how often it slept per round; a handler thread sleeps every round
    # (it waits in select for the interrupt), so its count cannot be 0.
    assert set(got["sleeps"]) == {KERNEL, C_LABEL, *PY_LABELS.values()}
    assert all(s >= 0 for s in got["sleeps"].values())
    assert got["sleeps"][PY_LABELS["thread"]] >= 1
