"""`udrv regs --rdl/--ipxact`: a live device decoded and written through a description's map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.host.test_cli_regs import le, run, tree
from tests.host.test_rdl import EDU_RDL, TIMER_XML
from udrv.errors import DescriptionError, RegionError, UdrvError

__all__ = ["tree"]  # the fixture, shared with test_cli_regs


def test_rdl_decodes_the_live_ident(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tree, "--rdl", str(EDU_RDL), "00:04.0", "ident", "status", "--json") == 0
    ident, status = json.loads(capsys.readouterr().out)["registers"]
    assert ident["value"] == 0x010000ED and not ident["changed"]
    assert {f["name"]: f["value"] for f in ident["fields"]} == {
        "major": 1,
        "minor": 0,
        "magic": 0xED,
    }
    assert [f["name"] for f in status["fields"]] == ["irq_enable", "computing"]
    assert run(tree, "00:04.0", "--rdl", str(EDU_RDL)) == 0
    out = capsys.readouterr().out
    assert out.startswith("0000:00:04.0 edu (edu.rdl) [1234:11e8] BAR0 via sysfs\n")
    assert "intr_ack" not in out  # write-only: not read


def test_rdl_set_writes_a_field_through_the_access_rules(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bar0 = tree / "0000:00:04.0" / "resource0"
    rdl = str(EDU_RDL)
    assert run(tree, "--rdl", rdl, "00:04.0", "set", "status.irq_enable=1") == 0
    assert "status: read-modify-write 0x80" in capsys.readouterr().err
    assert bar0.read_bytes()[0x20:0x24] == le(0x80)
    assert run(tree, "--rdl", rdl, "00:04.0", "set", "dma_cmd.direction=TO_RAM") == 0
    assert bar0.read_bytes()[0x98:0xA0] == le(2, 8)
    before = bar0.read_bytes()
    with pytest.raises(RegionError, match="read-only"):
        run(tree, "--rdl", rdl, "00:04.0", "set", "ident.major=2")
    assert bar0.read_bytes() == before


def test_description_for_a_device_without_a_builtin_map(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bar0 = tree / "0000:00:07.0" / "resource0"
    with open(bar0, "r+b") as f:
        f.seek(0x14)
        f.write(le(0x1234))
    assert run(tree, "--ipxact", str(TIMER_XML), "00:07.0", "COMPARE[1]", "--json") == 0
    (record,) = json.loads(capsys.readouterr().out)["registers"]
    assert (record["name"], record["offset"], record["value"]) == ("COMPARE(1)", 0x14, 0x1234)


def test_bad_options_are_named(tree: Path) -> None:
    with pytest.raises(DescriptionError, match="no registers in BAR2"):
        run(tree, "00:04.0", "--rdl", str(EDU_RDL), "--bar", "2")
    with pytest.raises(UdrvError, match="--top and --bar go with --rdl"):
        run(tree, "00:04.0", "--bar", "0")
    with pytest.raises(SystemExit):
        run(tree, "00:04.0", "--rdl", str(EDU_RDL), "--ipxact", str(TIMER_XML))


def shell(tree: Path, monkeypatch: pytest.MonkeyPatch, script: str, *argv: str) -> int:
    import io

    from udrv.cli.main import build_parser
    from udrv.cli.shell import cmd_shell

    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    return cmd_shell(build_parser().parse_args(["shell", *argv]), root=tree)


def test_shell_from_stdin_reads_and_writes_registers(
    tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = (
        "regs.ident.major, regs.ident.minor, hex(regs.ident.magic)\n"
        "regs.status.irq_enable = 1\n"
        "hex(bar0.read32(0x20))\n"
        "regs.status\n"
        "for name in ('liveness', 'factorial'):\n"
        "    print(name, getattr(regs, name).offset)\n"
        "\n"
        "sorted(n for n in dir(regs.status) if n in ('computing', 'irq_enable', 'read'))\n"
    )
    assert shell(tree, monkeypatch, script, "--rdl", str(EDU_RDL), "00:04.0") == 0
    assert capsys.readouterr().out.splitlines() == [
        "(1, 0, '0xed')",
        "'0x80'",
        "status = 0x00000080 (computing=0 irq_enable=1)",
        "liveness 4",
        "factorial 8",
        "['computing', 'irq_enable', 'read']",
    ]
    assert (tree / "0000:00:04.0" / "resource0").read_bytes()[0x20:0x24] == le(0x80)


def test_shell_script_stops_at_the_first_exception(
    tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = "regs.IDENT.MAJOR = 2\nprint('not reached')\n"
    assert shell(tree, monkeypatch, script, "00:04.0") == 1  # the built-in map
    captured = capsys.readouterr()
    assert "not reached" not in captured.out
    assert "setting field MAJOR of register IDENT (0x0) refused: it is read-only" in captured.err
    assert (tree / "0000:00:04.0" / "resource0").read_bytes()[:4] == le(0x010000ED)
