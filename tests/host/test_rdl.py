"""Register maps from SystemRDL and IP-XACT descriptions (udrv.regmaps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from udrv.core.region import RecordingRegion
from udrv.drivers.edu.regs import EduRegs
from udrv.errors import DescriptionError, RegionError
from udrv.regmaps import load, load_ipxact, load_rdl

EDU_RDL = Path(__file__).parents[2] / "udrv" / "drivers" / "edu" / "edu.rdl"
TIMER_XML = Path(__file__).parent / "data" / "regmaps" / "timer.xml"
#: The RDL's field names that differ from the built-in map's beyond case.
RENAMED = {"IRQ_ENABLE": "IRQFACT"}


def edu_rdl_map() -> type:
    bar, regs = load_rdl(EDU_RDL).map_for()
    assert bar == 0  # from the file's udrv_bar property
    return regs


def test_edu_rdl_matches_the_builtin_map() -> None:
    rdl = edu_rdl_map()
    assert [n.upper() for n in rdl.REGISTERS] == list(EduRegs.REGISTERS)
    for name, reg in rdl.REGISTERS.items():
        ref = EduRegs.REGISTERS[name.upper()]
        assert (reg.offset, reg.width, reg.access, reg.reset) == (
            ref.offset,
            ref.width,
            ref.access,
            ref.reset,
        ), name
        if not ref.fields:
            continue  # the built-in map leaves LIVENESS, FACTORIAL... without fields
        got = {
            RENAMED.get(n.upper(), n.upper()): (f.shift, f.bits, reg.field_access(f))
            for n, f in reg.fields.items()
        }
        want = {n: (f.shift, f.bits, ref.field_access(f)) for n, f in ref.fields.items()}
        assert got == want, name
    direction = rdl.REGISTERS["dma_cmd"].fields["direction"].enum
    assert direction is not None
    assert {m.name: int(m) for m in direction} == {"FROM_RAM": 0, "TO_RAM": 1}


def test_edu_rdl_map_decodes_and_writes_through_access_rules() -> None:
    fake = RecordingRegion(4096)
    fake.mem[0:4] = (0x010000ED).to_bytes(4, "little")
    regs = edu_rdl_map()(fake)
    assert regs.ident.decode() == {"magic": 0xED, "minor": 0, "major": 1}
    assert regs.status.set(irq_enable=1) == 0x80
    assert fake.writes() == [(0x20, 4, 0x80)]
    with pytest.raises(RegionError, match="read-only"):
        regs.status.set(computing=1)
    with pytest.raises(RegionError, match="read-only"):
        regs.ident.write(0)
    with pytest.raises(RegionError, match="write-only"):
        regs.intr_ack.read()
    cmd = type(regs).REGISTERS["dma_cmd"]
    assert cmd.field("direction").parse("to_ram") == 1
    assert cmd.encode(start=1, direction=1, irq=1) == 0b111


def test_ipxact_component_loads() -> None:
    desc = load(TIMER_XML, bar=2)
    assert desc.name.startswith("timer")
    bar, regs = desc.map_for()
    assert bar == 2
    ctrl, status = regs.REGISTERS["CTRL"], regs.REGISTERS["STATUS"]
    assert (ctrl.offset, ctrl.width, ctrl.access, ctrl.reset) == (0, 4, "rw", 0x10)
    mode = ctrl.fields["MODE"]
    assert (mode.shift, mode.bits) == (4, 2)
    assert mode.enum is not None and mode.enum_name(2) == "FREERUN"
    assert status.offset == 4
    assert status.field_access(status.fields["RUNNING"]) == "ro"
    assert status.w1c_mask == 0b10
    compare = regs.ARRAYS["COMPARE"]
    assert (compare.base, compare.stride, compare.count) == (0x10, 4, 4)
    assert compare(3).offset == 0x1C and compare(3).reset == 0xFFFF_FFFF

    fake = RecordingRegion(4096)
    bound = regs(fake)
    fake.mem[4] = 0b11  # RUNNING and EXPIRED set
    assert bound.STATUS.w1c(EXPIRED=1) == 0b10
    bound.CTRL.set(MODE=1)  # a RMW leaves no W1C trap here; it reads then writes once
    assert fake.writes() == [(4, 4, 0b10), (0, 4, 0x10)]


def test_several_bars_from_udrv_bar(tmp_path: Path) -> None:
    rdl = tmp_path / "card.rdl"
    rdl.write_text(
        "property udrv_bar { type = longint unsigned; component = addrmap; };\n"
        "addrmap card {\n"
        "  addrmap { udrv_bar = 0; reg { field {} en[0:0] = 0; } ctrl @ 0x10; } bar0 @ 0x0;\n"
        "  addrmap { udrv_bar = 2; reg { field { sw = r; } v[31:0]; } id @ 0x4; } bar2 @ 0x1000;\n"
        "};\n"
    )
    desc = load(rdl)
    assert sorted(desc.maps) == [0, 2]
    assert desc.map_for(2)[1].REGISTERS["id"].offset == 4  # from its own block, not 0x1004
    assert desc.map_for(0)[1].REGISTERS["ctrl"].offset == 0x10
    with pytest.raises(DescriptionError, match=r"BARs \[0, 2\]; choose one with --bar"):
        desc.map_for()
    with pytest.raises(DescriptionError, match="no registers in BAR1"):
        desc.map_for(1)


BAD_SYNTAX = """addrmap bad {
    reg {
        field { sw = rw; } x[0:0] = 0
    } ctrl @ 0x0;
};
"""

UNSUPPORTED = """addrmap bad {
    reg {
        field { sw = rw; onwrite = wzc; } x[0:0] = 0;
    } ctrl @ 0x0;
};
"""

SPLIT_ACCESS = """addrmap bad {
    reg { regwidth = 64; accesswidth = 32; field {} x[63:0] = 0; } wide @ 0x0;
};
"""

RESERVED_NAME = """addrmap bad {
    reg { field {} x[0:0] = 0; } dump @ 0x0;
};
"""


def test_read_only_and_write_only_registers_share_an_address(tmp_path: Path) -> None:
    rdl = tmp_path / "fifo.rdl"
    rdl.write_text(
        "addrmap fifo {\n"
        "  reg { field { sw = r; } d[31:0]; } rx @ 0x0;\n"
        "  reg { field { sw = w; } d[31:0]; } tx @ 0x0;\n"
        "};\n"
    )
    regs = load_rdl(rdl).map_for()[1]
    assert [(r.name, r.offset, r.access) for r in regs.REGISTERS.values()] == [
        ("rx", 0, "ro"),
        ("tx", 0, "wo"),
    ]


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    rdl = tmp_path / "bad.rdl"
    rdl.write_text(BAD_SYNTAX)
    with pytest.raises(DescriptionError) as info:
        load_rdl(rdl)
    assert f"{rdl}:4:5: error: missing ';'" in str(info.value)
    assert (info.value.path, info.value.line) == (str(rdl), 4)


@pytest.mark.parametrize(
    ("text", "line", "cause"),
    [
        (UNSUPPORTED, 3, "onwrite=wzc is not supported"),
        (SPLIT_ACCESS, 2, "accesswidth=32 below regwidth=64"),
        (RESERVED_NAME, 2, "the name dump clashes with the RegisterMap API"),
    ],
)
def test_unsupported_construct_names_file_line_and_cause(
    tmp_path: Path, text: str, line: int, cause: str
) -> None:
    rdl = tmp_path / "unsupported.rdl"
    rdl.write_text(text)
    with pytest.raises(DescriptionError, match=cause) as info:
        load_rdl(rdl)
    assert str(info.value).startswith(f"{rdl}:{line}:")
    assert "udrv cannot map" in str(info.value)
    assert info.value.line == line


def test_bad_ipxact_and_missing_files(tmp_path: Path) -> None:
    xml = tmp_path / "broken.xml"
    xml.write_text(TIMER_XML.read_text().replace("</ipxact:register>", "", 1))
    with pytest.raises(DescriptionError, match=r"broken\.xml:\d+: error: not an IP-XACT file"):
        load_ipxact(xml)
    with pytest.raises(DescriptionError, match="no such register description file"):
        load_rdl(tmp_path / "missing.rdl")


def test_top_selects_the_addrmap(tmp_path: Path) -> None:
    rdl = tmp_path / "two.rdl"
    rdl.write_text(
        "addrmap a { reg { field {} x[0:0] = 0; } ra @ 0x0; };\n"
        "addrmap b { reg { field {} y[0:0] = 0; } rb @ 0x8; };\n"
    )
    assert list(load_rdl(rdl).map_for()[1].REGISTERS) == ["rb"]  # the last one by default
    assert list(load_rdl(rdl, top="a").map_for()[1].REGISTERS) == ["ra"]
    with pytest.raises(DescriptionError, match=r"two\.rdl"):
        load_rdl(rdl, top="c")
