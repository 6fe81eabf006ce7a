"""`udrv regs`: decoding and rendering against fake regions, the access rules of `set`, and
the whole command on a fake sysfs tree (config dumps captured in the lab; regular files
stand in for ``resourceN``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from udrv.cli.main import build_parser
from udrv.cli.regs import apply, cmd_regs, parse_assignments, render, select, snapshot
from udrv.core.region import RecordingRegion
from udrv.drivers.e1000.regs import E1000Regs
from udrv.drivers.edu.regs import EduRegs
from udrv.drivers.nvme.regs import NvmeRegs
from udrv.errors import RegionError, UdrvError

from .test_backends_sysfs import add_resources
from .test_pci_sysfs import make_tree


def le(value: int, n: int = 4) -> bytes:
    return value.to_bytes(n, "little")


def test_edu_ident_decodes_major_minor_magic() -> None:
    rec = RecordingRegion(1 << 20, name="BAR0")
    rec.mem[0:4] = le(0x010000ED)
    rec.mem[0x20:0x24] = le(0x80)
    records = snapshot(EduRegs(rec), select(EduRegs, ["IDENT", "status"]))
    ident = {f["name"]: f for f in records[0]["fields"]}
    assert (ident["MAJOR"]["value"], ident["MINOR"]["value"], ident["MAGIC"]["value"]) == (
        1,
        0,
        0xED,
    )
    assert records[0]["changed"] is False  # the reset value
    assert records[1]["changed"] is True and records[1]["value"] == 0x80
    text = render(records)
    assert "  IDENT     0x0000  0x010000ed  ro " in text
    assert "   31:24 MAJOR           1" in text and "     7:0 MAGIC           0xed" in text
    assert "* STATUS    0x0020  0x00000080  rw " in text
    assert "  *     7 IRQFACT         1" in text  # changed from reset
    assert "        0 COMPUTING       0              ro" in text
    # Only the two registers were read, once each, at their width.
    assert rec.log == [("r", 0x0, 4, 0x010000ED), ("r", 0x20, 4, 0x80)]


def test_e1000_ctrl_status_decode_with_enum_names() -> None:
    rec = RecordingRegion(0x20000, name="BAR0")
    rec.mem[0:4] = le(0x0014_0241)  # FD, SLU, SPEED 1000, SDP1/ADVD3WUC as QEMU sets
    rec.mem[8:12] = le(0x0000_0283)
    text = render(snapshot(E1000Regs(rec), select(E1000Regs, ["CTRL", "STATUS"])))
    assert "     9:8 SPEED           2 MBPS_1000" in text
    assert "       1 LU              1" in text
    default = [r.name for r in select(E1000Regs, [])]
    assert "ICR" not in default and "GPRC" not in default  # read-to-clear: not by default
    assert "IMC" not in default  # write-only


def test_nvme_cap_cc_csts_and_the_previous_marker() -> None:
    rec = RecordingRegion(0x2000, name="BAR0")
    rec.mem[0:8] = le(0x0040_0820_0F01_07FF, 8)
    rec.mem[0x14:0x18] = le(0x0046_4001)  # enabled, SHN normal
    rec.mem[0x1C:0x20] = le(0x9)  # RDY, SHST complete
    regs = NvmeRegs.for_controller(rec)
    records = snapshot(regs, select(NvmeRegs, ["CAP", "CC", "CSTS"]))
    text = render(records, previous={"CAP": 0x0040_0820_0F01_07FF, "CC": 0x0046_4001, "CSTS": 1})
    assert "  * 15:14 SHN             1 NORMAL" in text
    assert "  *   3:2 SHST            2 COMPLETE" in text
    assert "< CSTS" in text and "< CC" not in text
    assert "     15:0 MQES            0x7ff" in text


def test_set_follows_the_access_rules() -> None:
    rec = RecordingRegion(0x2000, name="BAR0")
    rec.mem[0x1C:0x20] = le(0x11)  # RDY and NSSRO
    rec.mem[0x14:0x18] = le(0x0046_0001)
    regs = NvmeRegs(rec)
    # CSTS.NSSRO is RW1C: one write of just that bit, no read-modify-write.
    ((reg, what),) = parse_assignments(NvmeRegs, ["csts.nssro=1"])
    assert apply(regs.bind(reg), what) == "CSTS: write-1-to-clear 0x10"
    assert rec.log == [("w", 0x1C, 4, 0x10)]
    rec.log.clear()
    # CC.SHN by enum name: a read-modify-write that keeps EN and the entry sizes.
    ((reg, what),) = parse_assignments(NvmeRegs, ["CC.SHN=normal"])
    assert apply(regs.bind(reg), what) == "CC: read-modify-write 0x464001"
    # INTMS is write-1-to-set: one write of the bits, no read.
    ((reg, what),) = parse_assignments(NvmeRegs, ["INTMS=0x3"])
    assert apply(regs.bind(reg), what) == "INTMS: wrote 0x3"
    assert rec.log[-1] == ("w", 0x0C, 4, 3) and rec.log[-2][0] == "w"
    rec.log.clear()
    for words, message in (
        (["CSTS.RDY=0"], r"setting field RDY of register CSTS \(0x1c\) refused: it is read-only"),
        (["CAP=1"], r"writing register CAP \(0x0\) refused: it is read-only"),
        (["CSTS.NSSRO=1", "CSTS.CFS=1"], "mixes write-1-to-clear fields"),
    ):
        plan = parse_assignments(NvmeRegs, words)
        with pytest.raises(RegionError, match=message):
            for reg, what in plan:
                apply(regs.bind(reg), what)
    assert rec.log == []  # nothing reached the device


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], "give REG.FIELD=VALUE"),
        (["CC.EN"], r"'CC.EN' is not REG.FIELD=VALUE"),
        (["CC.XX=1"], r"register CC has no field 'XX' \(fields: EN, CSS"),
        (["NOPE=1"], r"NvmeRegs has no register 'NOPE'"),
        (["CC.MPS=16"], r"field CC.MPS: value 16 does not fit in 4 bit\(s\)"),
        (["CC.SHN=later"], r"'later' is not a number; or one of NONE, NORMAL, ABRUPT"),
        (["AQA=0x1_0000_0000"], "does not fit the 32-bit register AQA"),
        (["CC=1", "CC.EN=1"], "given both whole and by fields"),
    ],
)
def test_set_syntax_errors_name_the_problem(words: list[str], message: str) -> None:
    with pytest.raises(RegionError, match=message):
        parse_assignments(NvmeRegs, words)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path, "edu", "0000:00:04.0")
    make_tree(tmp_path, "e1000e", "0000:00:05.0", driver="e1000e", group=4)
    make_tree(tmp_path, "rtl8139", "0000:00:07.0", group=6)
    for a in ("0000:00:04.0", "0000:00:05.0", "0000:00:07.0"):
        add_resources(tmp_path, a)
    bar0 = tmp_path / "devices" / "0000:00:04.0" / "resource0"
    with open(bar0, "r+b") as f:
        f.write(le(0x010000ED))
    return tmp_path / "devices"


def run(tree: Path, *argv: str) -> int:
    args = build_parser().parse_args(["regs", *argv])
    return cmd_regs(args, root=tree)


def test_command_reads_an_unbound_edu_through_sysfs(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tree, "00:04.0") == 0
    out = capsys.readouterr().out
    assert out.startswith("0000:00:04.0 edu [1234:11e8] BAR0 via sysfs\n")
    assert "   31:24 MAJOR           1" in out
    assert "INTR_ACK" not in out  # write-only
    assert run(tree, "1234:11e8", "ident", "--json") == 0
    (record,) = json.loads(capsys.readouterr().out)["registers"]
    assert record["value"] == 0x010000ED and record["fields"][0]["name"] == "MAJOR"


def test_command_set_writes_through_the_map(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bar0 = tree / "0000:00:04.0" / "resource0"
    assert run(tree, "00:04.0", "set", "STATUS.IRQFACT=1", "DMA_CMD.DIRECTION=to_ram") == 0
    captured = capsys.readouterr()
    assert "STATUS: read-modify-write 0x80" in captured.err
    assert "writing through sysfs" in captured.err
    assert "* STATUS" in captured.out
    raw = bar0.read_bytes()
    assert raw[0x20:0x24] == le(0x80) and raw[0x98:0xA0] == le(0x2, 8)
    with pytest.raises(RegionError, match=r"setting field COMPUTING .* read-only"):
        run(tree, "00:04.0", "set", "STATUS.COMPUTING=1")
    assert bar0.read_bytes() == raw
    with pytest.raises(RegionError, match="INTR_ACK is write-only: it cannot be shown"):
        run(tree, "00:04.0", "INTR_ACK")


def test_command_refuses_to_write_behind_a_kernel_driver(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bar0 = tree / "0000:00:05.0" / "resource0"
    with pytest.raises(
        UdrvError, match=r"bound to the kernel driver e1000e: .*udrv bind 0000:00:05.0"
    ):
        run(tree, "00:05.0", "set", "CTRL.SLU=1")
    assert not any(bar0.read_bytes()[:4])
    assert run(tree, "00:05.0", "CTRL", "STATUS") == 0  # reading is fine, read-only
    assert "e1000 (82574L)" in capsys.readouterr().out
    assert run(tree, "00:05.0", "set", "CTRL.SLU=1", "--force") == 0
    assert bar0.read_bytes()[:4] == le(0x40)


def test_command_names_the_devices_it_knows(tree: Path) -> None:
    with pytest.raises(UdrvError, match=r"0000:00:07.0 \(10ec:8139.*no built-in register map"):
        run(tree, "00:07.0")


def test_watch_marks_what_changed_since_the_last_refresh(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bar0 = tree / "0000:00:04.0" / "resource0"
    sleeps: list[float] = []

    def device_changes_while_we_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C
        with open(bar0, "r+b") as f:  # the device finishes a factorial meanwhile
            f.seek(0x08)
            f.write(le(120))

    monkeypatch.setattr("udrv.cli.regs.time.sleep", device_changes_while_we_sleep)
    with pytest.raises(KeyboardInterrupt):
        run(tree, "00:04.0", "FACTORIAL", "STATUS", "--watch", "0.5")
    first, second = capsys.readouterr().out.split("\n\n")
    assert sleeps == [0.5, 0.5]
    assert "  FACTORIAL 0x0008  0x00000000" in first
    assert "< FACTORIAL 0x0008  0x00000078" in second
    assert "  STATUS    0x0020  0x00000000" in second  # unchanged, as at reset


def test_a_bar_the_kernel_driver_claimed_gets_the_fix_in_the_error(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strict-devmem kernels refuse to mmap a BAR a driver claimed (EINVAL, seen in the lab
    with Linux's nvme driver): the error must say to unbind the device."""
    import mmap

    def refuse(*args: object, **kw: object) -> mmap.mmap:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr("udrv.backends.sysfs.mmap.mmap", refuse)
    with pytest.raises(
        RegionError,
        match=r"resource0 .*\[EINVAL\].*; e1000e has claimed this BAR: unbind 0000:00:05.0 "
        r"from e1000e \(or `udrv bind 0000:00:05.0`\)",
    ):
        run(tree, "00:05.0", "STATUS")
