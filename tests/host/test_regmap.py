"""Register maps: offsets, fields, access modes, arrays, RMW, polling, decode/encode."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.core.region import RecordingRegion
from udrv.core.regmap import Field, Register, RegisterArray, RegisterMap
from udrv.errors import PollTimeout, RegionError


class Speed(enum.IntEnum):
    S10 = 0
    S100 = 1
    S1000 = 2


class EduRegs(RegisterMap):
    """A slice of QEMU's edu (docs/specs/edu.rst) plus e1000/NVMe-like extras for testing."""

    SIZE = 0x2000
    IDENT = Register(0x00, 4, access="ro", reset=0x010000ED, doc="Identification: 0xRRrr00ed")
    LIVENESS = Register(0x04, 4)
    STATUS = Register(
        0x20,
        4,
        reset=0,
        fields={
            "COMPUTING": Field(0, 1, access="ro", doc="factorial in progress"),
            "IRQFACT": Field(7, 1),
        },
    )
    INTR_STATUS = Register(0x24, 4, access="ro")
    INTR_ACK = Register(0x64, 4, access="wo")
    ICR = Register(
        0x70,
        4,
        access="rc",
        fields={"TXDW": Field(0, access="w1c"), "RXT0": Field(7, access="w1c")},
    )
    CTRL = Register(
        0x78,
        4,
        reset=0x0000_0200,
        fields={
            "SLU": Field(6, 1),
            "SPEED": Field(8, 2, enum=Speed),
            "EVT": Field(12, 1, access="w1c"),
            "ID": Field(16, 16),
        },
    )
    DMA_CMD = Register(0x98, 8, fields={"START": Field(0, 1), "TO_RAM": Field(1, 1)})
    CAUSE = Register(0xA0, 2, access="w1c")
    RDBAL = RegisterArray(0x800, 0x100, 4, doc="receive descriptor base low, queue n")
    SQTDBL = RegisterArray(0x1000, 8, doc="NVMe SQyTDBL at 0x1000 + (2y) * (4 << CAP.DSTRD)")


@pytest.fixture
def dev() -> tuple[EduRegs, RecordingRegion]:
    rec = RecordingRegion(0x2000, name="BAR0 of 0000:00:04.0")
    return EduRegs(rec), rec


def test_class_attributes_are_the_single_source_of_offsets() -> None:
    assert EduRegs.STATUS.offset == 0x20
    assert EduRegs.STATUS.name == "STATUS"
    assert EduRegs.DMA_CMD.width == 8 and EduRegs.DMA_CMD.bits == 64
    assert EduRegs.STATUS.fields["IRQFACT"].mask == 0x80
    assert list(EduRegs.REGISTERS)[:3] == ["IDENT", "LIVENESS", "STATUS"]
    assert set(EduRegs.ARRAYS) == {"RDBAL", "SQTDBL"}
    assert EduRegs.at(0x9C) is EduRegs.DMA_CMD  # inside the 64-bit register
    assert EduRegs.at(0x30) is None
    assert EduRegs.describe(0x20, 0x81) == "STATUS = 0x00000081 (COMPUTING=1 IRQFACT=1)"
    assert EduRegs.describe(0x22, 0x81) == "0x22 = 0x81"


def test_read_write_are_one_access_of_the_register_width(
    dev: tuple[EduRegs, RecordingRegion],
) -> None:
    regs, rec = dev
    regs.LIVENESS.write(0x12345678)
    regs.DMA_CMD.write(0x1_0000_0003)
    regs.CAUSE.write(0x8000)
    assert regs.LIVENESS.read() == 0x12345678
    assert regs.DMA_CMD.read() == 0x1_0000_0003
    assert rec.log == [
        ("w", 0x04, 4, 0x12345678),
        ("w", 0x98, 8, 0x1_0000_0003),
        ("w", 0xA0, 2, 0x8000),
        ("r", 0x04, 4, 0x12345678),
        ("r", 0x98, 8, 0x1_0000_0003),
    ]
    assert regs.STATUS is regs.STATUS  # bound once, then cached


def test_access_modes_are_enforced_naming_the_register(
    dev: tuple[EduRegs, RecordingRegion],
) -> None:
    regs, rec = dev
    with pytest.raises(
        RegionError,
        match=r"BAR0 of 0000:00:04.0: writing register IDENT \(0x0\) refused: it is read-only",
    ):
        regs.IDENT.write(1)
    with pytest.raises(RegionError, match=r"writing register ICR .* read-only"):
        regs.ICR.write(1)
    with pytest.raises(
        RegionError, match=r"reading register INTR_ACK \(0x64\) refused: it is write-only"
    ):
        regs.INTR_ACK.read()
    with pytest.raises(RegionError, match="write-only"):
        regs.INTR_ACK.set_bits(1)
    with pytest.raises(RegionError, match="write-1-to-clear: use w1c"):
        regs.CAUSE.set_bits(1)
    with pytest.raises(
        RegionError,
        match=r"setting field COMPUTING of register STATUS \(0x20\) refused: it is read-only$",
    ):
        regs.STATUS.set(COMPUTING=1)
    assert rec.log == []  # nothing reached the device
    regs.INTR_ACK.write(0x100)
    assert rec.log == [("w", 0x64, 4, 0x100)]


def test_set_is_an_explicit_rmw_of_only_the_named_fields(
    dev: tuple[EduRegs, RecordingRegion],
) -> None:
    regs, rec = dev
    rec.mem[0x78:0x7C] = (0xABCD_0041).to_bytes(4, "little")  # ID=0xabcd, SLU=1, S10
    assert regs.CTRL.set(SPEED=Speed.S1000) == 0xABCD_0241
    assert rec.log == [("r", 0x78, 4, 0xABCD_0041), ("w", 0x78, 4, 0xABCD_0241)]
    assert regs.CTRL.decode() == {"SLU": 1, "SPEED": Speed.S1000, "EVT": 0, "ID": 0xABCD}
    assert regs.STATUS.set(IRQFACT=1) == 0x80
    assert regs.STATUS.clear_bits(0x80) == 0
    with pytest.raises(
        RegionError, match=r"register CTRL has no field 'SPED' \(fields: SLU, SPEED, EVT, ID\)"
    ):
        regs.CTRL.set(SPED=1)
    with pytest.raises(
        RegionError, match=r"field CTRL.SPEED: value 4 does not fit in 2 bit\(s\) \(0 to 0x3\)"
    ):
        regs.CTRL.set(SPEED=4)


def test_rmw_never_writes_back_w1c_bits(dev: tuple[EduRegs, RecordingRegion]) -> None:
    """An event pending in CTRL.EVT (W1C) must survive a RMW of another field."""
    regs, rec = dev
    rec.mem[0x78:0x7C] = (1 << 12).to_bytes(4, "little")
    written = regs.CTRL.set(SLU=1)
    assert written == 0x40  # EVT written as 0: not cleared
    assert regs.CTRL.set(SLU=1, EVT=1) & (1 << 12)  # unless asked for


def test_w1c_writes_only_the_bits_with_no_read(dev: tuple[EduRegs, RecordingRegion]) -> None:
    regs, rec = dev
    rec.mem[0x70:0x74] = b"\xff\xff\xff\xff"
    assert regs.CAUSE.w1c(0x8001) == 0x8001
    assert regs.CTRL.w1c(EVT=1) == 1 << 12
    assert regs.ICR.w1c(RXT0=1, TXDW=1) == 0x81  # read-to-clear, and W1C in its cause bits
    assert rec.log == [("w", 0xA0, 2, 0x8001), ("w", 0x78, 4, 0x1000), ("w", 0x70, 4, 0x81)]
    assert regs.STATUS.write_fields(IRQFACT=1) == 0x80


def test_w1c_is_refused_where_the_bits_are_not_w1c(dev: tuple[EduRegs, RecordingRegion]) -> None:
    """Writing 1 to a bit that is not W1C sets it: w1c() must not be a disguised write."""
    regs, rec = dev
    with pytest.raises(
        RegionError,
        match=r"write-1-to-clear of register STATUS \(0x20\) refused: it is not "
        r"write-1-to-clear \(rw\)",
    ):
        regs.STATUS.w1c(IRQFACT=1)
    with pytest.raises(RegionError, match=r"bits 0x40 of register CTRL .* only in bits 0x1000"):
        regs.CTRL.w1c(SLU=1)
    with pytest.raises(RegionError, match=r"bits 0x2 of register ICR"):
        regs.ICR.w1c(0x2)
    with pytest.raises(RegionError, match="give the bits"):
        regs.CAUSE.w1c()
    assert rec.log == []


def test_clear_of_a_rw_field_makes_it_zero(dev: tuple[EduRegs, RecordingRegion]) -> None:
    """The old clear() wrote the bits it meant to clear (turning IRQFACT on); clear() is a
    read-modify-write that leaves the field 0 and the other bits as they were."""
    regs, rec = dev
    rec.mem[0x78:0x7C] = (0xABCD_0241).to_bytes(4, "little")
    assert regs.CTRL.clear("SLU") == 0xABCD_0201
    assert int.from_bytes(rec.mem[0x78:0x7C], "little") == 0xABCD_0201
    regs.STATUS.write_fields(IRQFACT=1)
    regs.STATUS.clear("IRQFACT")
    assert regs.STATUS.get("IRQFACT") == 0
    assert rec.mem[0x20] == 0
    with pytest.raises(RegionError, match=r"clearing field EVT of .* use w1c\(\)"):
        regs.CTRL.clear("EVT")
    with pytest.raises(RegionError, match=r"clearing field COMPUTING .* read-only"):
        regs.STATUS.clear("COMPUTING")


def test_rmw_is_refused_on_w1s_and_read_to_clear_registers() -> None:
    class Nic(RegisterMap):
        ICR = Register(0xC0, 4, access="rc")
        IMS = Register(0xD0, 4, access="w1s")

    rec = RecordingRegion(0x100, name="BAR0")
    regs = Nic(rec)
    with pytest.raises(RegionError, match=r"set_bits \(read-modify-write\) of register ICR .*"
                       r"read-to-clear"):  # fmt: skip
        regs.ICR.set_bits(1)
    with pytest.raises(RegionError, match="write-1-to-set: write"):
        regs.IMS.clear_bits(1)
    assert rec.log == []
    regs.IMS.write(0x84)
    assert rec.writes() == [(0xD0, 4, 0x84)]


def test_reset_values_and_changed_fields() -> None:
    assert EduRegs.IDENT.reset == 0x010000ED
    assert EduRegs.CTRL.changed_from_reset(0x0000_0240) == {
        "SLU": True,
        "SPEED": False,
        "EVT": False,
        "ID": False,
    }
    assert EduRegs.LIVENESS.changed_from_reset(5) is None  # no reset value declared
    with pytest.raises(ValueError, match="reset 0x10000 does not fit"):
        Register(0x0, 2, reset=0x10000)


def test_field_parse_takes_numbers_and_enum_names() -> None:
    speed = EduRegs.CTRL.fields["SPEED"]
    assert speed.parse("0x2") == 2 and speed.parse("s100") == 1
    assert speed.span == "9:8" and EduRegs.CTRL.fields["SLU"].span == "6"
    with pytest.raises(RegionError, match=r"'fast' is not a number; or one of S10, S100, S1000"):
        speed.parse("fast")


def test_lookup_by_name_and_array_element(dev: tuple[EduRegs, RecordingRegion]) -> None:
    _, rec = dev
    assert EduRegs.lookup("status") is EduRegs.STATUS
    assert EduRegs.lookup("RDBAL[2]").offset == 0xA00
    with pytest.raises(RegionError, match=r"EduRegs has no register 'NOPE' \(registers: IDENT"):
        EduRegs.lookup("NOPE")
    nvme = EduRegs(rec, strides={"SQTDBL": 16})
    nvme.bind(EduRegs.lookup("SQTDBL(2)")).write(7)  # bound with the run-time stride
    assert rec.writes() == [(0x1020, 4, 7)]


def test_register_arrays(dev: tuple[EduRegs, RecordingRegion]) -> None:
    regs, rec = dev
    assert EduRegs.RDBAL.offset(3) == 0xB00
    assert EduRegs.RDBAL(2).offset == 0xA00 and EduRegs.RDBAL(2).name == "RDBAL(2)"
    regs.RDBAL(1).write(0x1000)
    assert rec.log == [("w", 0x900, 4, 0x1000)]
    with pytest.raises(RegionError, match=r"register array RDBAL: index 4 is out of range \(0-3\)"):
        regs.RDBAL(4)
    with pytest.raises(RegionError, match="index -1"):
        EduRegs.RDBAL.offset(-1)
    # NVMe: SQyTDBL = 0x1000 + (2y) * (4 << CAP.DSTRD); with DSTRD=1 the stride is 16.
    nvme = EduRegs(rec, strides={"SQTDBL": 2 * (4 << 1)})
    assert nvme.SQTDBL.offset(3) == 0x1000 + 2 * 3 * 8
    assert regs.SQTDBL.offset(3) == 0x1000 + 3 * 8
    nvme.SQTDBL(2).write(5)
    assert rec.log[-1] == ("w", 0x1020, 4, 5)
    with pytest.raises(RegionError, match="unknown arrays"):
        EduRegs(rec, strides={"NOPE": 8})
    # Base and stride both known only at run time: CQyHDBL = 0x1000 + (2y + 1) * (4 << DSTRD).
    cq = EduRegs(rec, arrays={"SQTDBL": (0x1000 + 16, 32)})
    assert cq.SQTDBL.offset(1) == 0x1030
    assert EduRegs.SQTDBL.offset(1) == 0x1008  # the class keeps the declared layout


def test_map_at_a_base_inside_the_region() -> None:
    rec = RecordingRegion(0x4000)
    regs = EduRegs(rec, base=0x2000)
    regs.LIVENESS.write(1)
    regs.RDBAL(0).write(2)
    assert rec.writes() == [(0x2004, 4, 1), (0x2800, 4, 2)]


def test_poll_by_field_and_by_mask(dev: tuple[EduRegs, RecordingRegion]) -> None:
    regs, rec = dev
    rec.mem[0x20] = 0x81
    assert regs.STATUS.poll(timeout=0.1, IRQFACT=1) == 0x81
    assert regs.DMA_CMD.poll(0x1, 0, timeout=0.1) == 0
    assert rec.log[-1] == ("r", 0x98, 8, 0)  # polled at the register's width
    with pytest.raises(
        PollTimeout,
        match=r"register STATUS \(0x20\) & 0x1 did not become 0x0 .*last value 0x00000081",
    ):
        regs.STATUS.poll(timeout=0.02, COMPUTING=0)
    with pytest.raises(RegionError, match="give a mask"):
        regs.STATUS.poll(timeout=0.1)


def test_dump_skips_write_only_and_read_to_clear(dev: tuple[EduRegs, RecordingRegion]) -> None:
    regs, rec = dev
    names = [r.name for r, _ in regs.dump()]
    assert "INTR_ACK" not in names and "ICR" not in names and "IDENT" in names
    assert "ICR" in [r.name for r, _ in regs.dump(side_effects=True)]
    assert all(a.op == "r" and a.offset != 0x64 for a in rec.log)
    assert [b.name for b in regs][:2] == ["IDENT", "LIVENESS"]


def test_format_names_fields_enums_and_reserved_bits() -> None:
    assert (
        EduRegs.CTRL.format(0x0000_0240) == "CTRL = 0x00000240 (SLU=1 SPEED=S1000(2) EVT=0 ID=0x0)"
    )
    assert (
        EduRegs.CTRL.format(0x0000_0301)
        == "CTRL = 0x00000301 (SLU=0 SPEED=0x3 EVT=0 ID=0x0 reserved=0x1)"
    )
    assert EduRegs.DMA_CMD.format(3) == "DMA_CMD = 0x0000000000000003 (START=1 TO_RAM=1)"
    assert EduRegs.IDENT.format(0x010000ED) == "IDENT = 0x010000ed"


def test_declaration_mistakes_are_caught_at_class_creation() -> None:
    with pytest.raises(TypeError, match=r"A \(0x0, 8 bytes\) overlaps B \(0x4\)"):

        class Bad(RegisterMap):
            A = Register(0x0, 8)
            B = Register(0x4, 4)

    class Aliased(RegisterMap):
        ALIASES = (("RBR", "THR"),)
        RBR = Register(0x0, 1, access="ro")
        THR = Register(0x0, 1, access="wo")

    assert set(Aliased.REGISTERS) == {"RBR", "THR"}
    with pytest.raises(TypeError, match="past SIZE"):

        class Big(RegisterMap):
            SIZE = 0x10
            A = Register(0x10, 4)

    with pytest.raises(ValueError, match="not aligned"):
        Register(0x2, 4)
    with pytest.raises(ValueError, match="width is in bytes: 1, 2, 4 or 8, not 32"):
        Register(0x0, 32)
    with pytest.raises(ValueError, match="does not fit in 16 bits"):
        Register(0x0, 2, fields={"X": Field(12, 8)})
    with pytest.raises(ValueError, match="overlaps another field"):
        Register(0x0, 4, fields={"X": Field(0, 4), "Y": Field(3, 1)})
    with pytest.raises(ValueError, match="access must be one of"):
        Register(0x0, 4, access="rx")  # type: ignore[arg-type]


FIELDS = EduRegs.CTRL.fields


@given(st.integers(0, 0xFFFF_FFFF))
def test_decode_encode_round_trip(value: int) -> None:
    reg = EduRegs.CTRL
    decoded = reg.decode(value)
    assert reg.encode(value & reg.reserved_mask, **decoded) == value
    for name, f in FIELDS.items():
        assert f.get(value) == decoded[name]
        assert f.put(value, f.get(value)) == value


@given(st.integers(0, 0xFFFF_FFFF), st.sampled_from(list(FIELDS)), st.data())
def test_put_changes_only_its_field(value: int, name: str, data: st.DataObject) -> None:
    f = FIELDS[name]
    x = data.draw(st.integers(0, f.max))
    new = f.put(value, x)
    assert f.get(new) == x
    assert new & ~f.mask == value & ~f.mask
    with pytest.raises(RegionError, match="does not fit"):
        f.put(value, f.max + 1)
    with pytest.raises(RegionError, match="does not fit"):
        f.put(value, -1)


def test_a_map_defined_from_data_behaves_like_a_class() -> None:
    """What a SystemRDL/IP-XACT importer builds: registers with access, reset, enums, arrays."""
    Regs = RegisterMap.define(
        "edu_rdl",
        {
            "ident": Register(0x0, 4, access="ro", reset=0x010000ED,
                              fields={"major": Field(24, 8), "minor": Field(16, 8)}),
            "status": Register(0x20, 4, reset=0, fields={"speed": Field(8, 2, enum=Speed)}),
            "irq_ack": Register(0x64, 4, access="wo"),
            "buf": RegisterArray(0x100, 4, 4, access="rw"),
        },
        size=0x200,
        doc="edu, from a description",
    )  # fmt: skip
    assert Regs.__name__ == "edu_rdl" and Regs.__doc__ == "edu, from a description"
    assert list(Regs.REGISTERS) == ["ident", "status", "irq_ack"]
    assert Regs.lookup("STATUS").fields["speed"].name == "status.speed"
    rec = RecordingRegion(0x200)
    regs = Regs(rec)
    regs.status.set(speed=Speed.S100)
    regs.buf(3).write(9)
    assert rec.writes() == [(0x20, 4, 0x100), (0x10C, 4, 9)]
    with pytest.raises(RegionError, match=r"irq_ack .* write-only"):
        regs.irq_ack.read()
    with pytest.raises(TypeError, match=r"a .* overlaps b"):
        RegisterMap.define("bad", {"a": Register(0, 8), "b": Register(4, 4)})
    with pytest.raises(TypeError, match="past SIZE"):
        RegisterMap.define("big", {"a": Register(0x10, 4)}, size=0x10)
    for key in ("2x", "dump", "region"):
        with pytest.raises(ValueError, match=f"{key!r} cannot be a register name"):
            RegisterMap.define("bad", {key: Register(0, 4)})
