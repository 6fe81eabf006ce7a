"""`udrv regs` on QEMU's edu: the register map decodes the live device, and `set` changes it
through the map's access rules."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import udrv
from udrv.drivers.edu.regs import EduRegs

pytestmark = pytest.mark.lab("edu")  # the last test asks for its own guest
Bind = Callable[[str, "str | None"], str]


def regs(*args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
    """Run `udrv regs ...` as a user would; check the exit status (``ok``: 0, or 1 with a
    clean error; ``None``: either) and that errors are clean.
    (Each run takes 10-30 s in the emulated guest on a loaded host, hence the long timeout.)"""
    r = subprocess.run(
        [sys.executable, "-m", "udrv", "regs", *args], capture_output=True, text=True, timeout=600
    )
    if ok is None:
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    elif ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 1 and r.stderr.startswith("udrv: error: "), (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    return r


def fields(record: dict[str, Any]) -> dict[str, int]:
    return {f["name"]: f["value"] for f in record["fields"]}


@pytest.mark.parametrize("driver", ["vfio-pci", None])
def test_regs_decodes_the_edu_identification(bound: Bind, driver: str | None) -> None:
    address = bound("edu", driver)  # VFIO, or sysfs (read-only) when no driver has it
    out = json.loads(regs(address, "IDENT", "STATUS", "--json").stdout)
    ident, status = out["registers"]
    assert ident["value"] == 0x010000ED
    assert fields(ident) == {"MAJOR": 1, "MINOR": 0, "MAGIC": 0xED}
    assert ident["changed"] is False
    assert status["name"] == "STATUS" and set(fields(status)) == {"IRQFACT", "COMPUTING"}
    text = regs(address).stdout
    backend = "vfio" if driver else "sysfs"
    assert text.startswith(f"{address} edu [1234:11e8] BAR0 via {backend}\n")
    assert "31:24 MAJOR           1" in text and "7:0 MAGIC           0xed" in text
    assert "INTR_ACK" not in text  # write-only: never read


def test_regs_set_changes_the_device(bound: Bind) -> None:
    address = bound("edu", "vfio-pci")
    # edu.rst: the liveness register reads back the inversion of what was written.
    r = regs(address, "set", "LIVENESS=0x12345678", "--json")
    assert "LIVENESS: wrote 0x12345678" in r.stderr
    (record,) = json.loads(r.stdout)["registers"]
    assert record["value"] == 0xEDCBA987
    # A field by name: a read-modify-write of STATUS that the device keeps.
    r = regs(address, "set", "STATUS.IRQFACT=1")
    assert "STATUS: read-modify-write 0x80" in r.stderr
    with udrv.open(address) as dev:
        live = EduRegs(dev.bar(0))
        assert live.STATUS.decode() == {"COMPUTING": 0, "IRQFACT": 1}
        assert live.LIVENESS.read() == 0xEDCBA987
        live.STATUS.clear("IRQFACT")
        assert live.STATUS.read() == 0
    # The map's access rules refuse before anything reaches the device.
    r = regs(address, "set", "STATUS.COMPUTING=1", ok=False)
    assert "setting field COMPUTING of register STATUS (0x20) refused: it is read-only" in r.stderr
    r = regs(address, "set", "IDENT=0", ok=False)
    assert "writing register IDENT (0x0) refused: it is read-only" in r.stderr
    assert json.loads(regs(address, "STATUS", "--json").stdout)["registers"][0]["value"] == 0


def wait_for(path: Path, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip() == want):
        assert time.monotonic() < deadline, f"{path} did not become {want!r}"
        time.sleep(0.2)


@pytest.mark.lab("nvme:size=16M", "e1000")
def test_regs_decodes_what_kernel_drivers_programmed(lab_devices: dict[str, str]) -> None:
    """Linux's nvme and e1000 drivers run the devices, then let go of them: `udrv regs`
    refuses to write behind a driver, explains why it cannot map a claimed BAR (this guest's
    kernel maps no BAR a driver has claimed), and after the unbind decodes what the drivers
    left in the registers."""
    nvme, nic = lab_devices["nvme"], lab_devices["e1000"]
    subprocess.run(["modprobe", "nvme"], check=True)
    subprocess.run(["modprobe", "e1000"], check=True)
    ctrl = next(Path(f"/sys/bus/pci/devices/{nvme}/nvme").iterdir())
    wait_for(ctrl / "state", "live")
    r = regs(nvme, "set", "CC.SHN=normal", ok=False)
    assert "bound to the kernel driver nvme" in r.stderr and f"udrv bind {nvme}" in r.stderr
    r = regs(nvme, "CC", ok=None)
    if r.returncode:  # a strict-devmem kernel (the lab's) maps no BAR a driver claimed
        assert f"has claimed this BAR: unbind {nvme} from nvme" in r.stderr, r.stderr
    else:
        assert "via sysfs" in r.stdout
    # Unbinding shuts the controller down (nvme_dev_disable: CC.SHN = normal, wait SHST).
    Path(f"/sys/bus/pci/devices/{nvme}/driver/unbind").write_text(nvme)
    out = json.loads(regs(nvme, "CAP", "CC", "CSTS", "--json").stdout)
    cap, cc, csts = (fields(r) for r in out["registers"])
    # What Linux programmed: 4 KiB pages, 64-byte SQEs, 16-byte CQEs, and CC.CSS = 110b
    # (all I/O command sets) when CAP.CSS says the controller has them (bit 43), else NVM.
    css = 0b110 if cap["CSS"] & 1 << 6 else 0
    assert (cc["CSS"], cc["MPS"], cc["IOSQES"], cc["IOCQES"]) == (css, 0, 6, 4)
    assert cc["SHN"] == 1 and csts["SHST"] == 2 and csts["CFS"] == 0
    assert cap["CSS"] & 1 and cap["MQES"] >= 1
    text = regs(nvme, "CC", "CSTS").stdout
    assert text.startswith(f"{nvme} NVMe [") and "via sysfs" in text
    assert f"6:4 CSS             {css} {'ALL_IO' if css else 'NVM'}" in text
    assert "15:14 SHN             1 NORMAL" in text and "3:2 SHST            2 COMPLETE" in text

    net = next(Path(f"/sys/bus/pci/devices/{nic}/net").iterdir())
    subprocess.run(["ip", "link", "set", net.name, "up"], check=True)
    r = regs(nic, "set", "CTRL.SLU=0", ok=False)
    assert "bound to the kernel driver e1000" in r.stderr
    Path(f"/sys/bus/pci/devices/{nic}/driver/unbind").write_text(nic)
    ctrl_reg, status = json.loads(regs(nic, "CTRL", "STATUS", "--json").stdout)["registers"]
    assert fields(ctrl_reg)["RST"] == 0  # the reset the driver's remove() did has completed
    assert fields(status)["FD"] == 1
    assert next(f for f in status["fields"] if f["name"] == "SPEED")["enum"] == "MBPS_1000"
