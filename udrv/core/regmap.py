"""Declarative register maps: a device's registers and their fields, as data.

A driver's ``regs.py`` transcribes the datasheet once, with its mnemonics::

    class EduRegs(RegisterMap):
        \"\"\"QEMU docs/specs/edu.rst, "MMIO area spec".\"\"\"
        IDENT = Register(0x00, 4, access="ro", reset=0x010000ED, doc="0xRRrr00ed")
        STATUS = Register(0x20, 4, reset=0, fields={
            "COMPUTING": Field(0, access="ro", doc="factorial in progress"),
            "IRQFACT": Field(7, doc="raise an interrupt when the factorial is done"),
        })

    EduRegs.STATUS.offset               # 0x20: the class is the single source of offsets
    regs = EduRegs(bar)                 # bound to a Region
    regs.STATUS.read()                  # one 32-bit read
    regs.STATUS.set(IRQFACT=1)          # explicit read-modify-write of one field
    regs.STATUS.decode(0x81)            # {"COMPUTING": 1, "IRQFACT": 1}
    regs.STATUS.poll(timeout=1.0, COMPUTING=0)

Units, the same everywhere in udrv: a register's ``offset`` and ``width`` are in **bytes**
(``width`` is 1, 2, 4 or 8, as in :class:`~udrv.core.region.Region`); a field's ``shift`` and
``bits`` are bit positions and bit counts inside the register's value, because that is how
every datasheet draws them ("bits 15:14"). ``Register.bits`` is the width in bits, for display.

Values are always plain ints read with one exact-width access and decoded in Python: no
bitfield structure is ever overlaid on live registers (a C bitfield write is a hidden
read-modify-write of the whole word, at a width the compiler chooses).

Access modes (``access=`` on a register or a field; SystemRDL's equivalents in brackets):

``rw``
    read/write (default) [sw=rw].
``ro``
    read-only: writing raises :class:`RegionError` naming the register [sw=r].
``wo``
    write-only: reads return nothing meaningful, so reading raises; so does a RMW [sw=w].
``w1c``
    write-1-to-clear (event bits): cleared with :meth:`BoundRegister.w1c`, one write of just
    the bits to clear. A read-modify-write never writes 1 back into W1C bits, which would
    clear events nobody handled, and a RMW of a register that is W1C as a whole is refused
    [onwrite=woclr].
``w1s``
    write-1-to-set (interrupt mask set registers: e1000 IMS, NVMe INTMS): written with
    :meth:`BoundRegister.write`; 0 bits leave the state alone, so a RMW is refused
    [onwrite=woset].
``rc``
    read-to-clear (e1000 ICR, statistics): reading has a side effect, so a RMW is refused
    and :meth:`RegisterMap.dump` skips it unless asked [onread=rclr].

Every register may carry its ``reset`` value (the datasheet's "initial value"), so that a
dump can say which fields changed since reset, and fields may carry an :class:`enum.IntEnum`
naming their values. Register arrays cover per-queue and per-entry registers (e1000
``RAL(n)``, ``MTA(n)``, NVMe doorbells ``SQyTDBL(y)``): see :class:`RegisterArray`.

Hot paths (doorbells, ring tails) resolve the offset once from the class
(``RDT = E1000Regs.RDT.offset``) and call ``region.write32(RDT, tail)``; bring-up code uses the
bound registers.
"""

from __future__ import annotations

import enum
import itertools
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, overload

from udrv.core.region import POLL_INTERVAL, Region
from udrv.errors import RegionError

Access = Literal["rw", "ro", "wo", "w1c", "w1s", "rc"]
ACCESS_MODES: tuple[str, ...] = ("rw", "ro", "wo", "w1c", "w1s", "rc")
#: Access modes that accept writes (of the whole register or of a field).
WRITABLE: frozenset[str] = frozenset({"rw", "wo", "w1c", "w1s"})
#: Access modes a read returns meaningful data for.
READABLE: frozenset[str] = frozenset({"rw", "ro", "w1c", "w1s", "rc"})
_WIDTHS = (1, 2, 4, 8)


def _check_access(access: str, what: str) -> None:
    if access not in ACCESS_MODES:
        raise ValueError(f"{what}: access must be one of {', '.join(ACCESS_MODES)}, not {access!r}")


@dataclass(frozen=True)
class Field:
    """Bits ``[shift, shift + bits)`` of a register.

    Args:
        shift: the lowest bit.
        bits: number of bits.
        enum: an :class:`enum.IntEnum` naming the values (``decode`` returns its members).
        access: overrides the register's access mode for these bits (``ro`` status bits in
            an ``rw`` register, ``w1c`` event bits).
        doc: the datasheet's description.
    """

    shift: int
    bits: int = 1
    enum: type[enum.IntEnum] | None = None
    access: Access | None = None
    doc: str = ""
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.shift < 0 or self.bits < 1 or self.shift + self.bits > 64:
            raise ValueError(f"field {self.name or '?'}: bits {self.shift}+{self.bits} do not fit")
        if self.access is not None:
            _check_access(self.access, f"field {self.name or '?'}")

    @property
    def mask(self) -> int:
        """The field's bits in place, e.g. ``Field(4, 2).mask == 0x30``."""
        return ((1 << self.bits) - 1) << self.shift

    @property
    def max(self) -> int:
        return (1 << self.bits) - 1

    @property
    def span(self) -> str:
        """The datasheet's notation: ``"15:14"``, or ``"7"`` for one bit."""
        hi = self.shift + self.bits - 1
        return str(hi) if self.bits == 1 else f"{hi}:{self.shift}"

    def get(self, value: int) -> int:
        """The field's value within the register value ``value``."""
        return (value >> self.shift) & self.max

    def put(self, value: int, x: int) -> int:
        """``value`` with this field replaced by ``x``.

        Raises:
            RegionError: ``x`` does not fit in the field.
        """
        if isinstance(x, bool):
            x = int(x)
        if not isinstance(x, int) or not 0 <= x <= self.max:
            raise RegionError(
                f"field {self.name or '?'}: value {x!r} does not fit in {self.bits} bit(s) "
                f"(0 to {self.max:#x})"
            )
        return (value & ~self.mask) | (x << self.shift)

    def value(self, x: int) -> int:
        """``x`` shifted into place (same checks as :meth:`put`)."""
        return self.put(0, x)

    def enum_name(self, x: int) -> str | None:
        """The enum member's name for ``x``, or ``None`` (no enum, or not a member)."""
        if self.enum is None:
            return None
        try:
            return self.enum(x).name
        except ValueError:
            return None

    def name_of(self, x: int) -> str:
        """``x`` as the enum's member name when there is one, else as a number."""
        name = self.enum_name(x)
        if name is not None:
            return f"{name}({x})"
        return str(x) if self.bits == 1 else f"{x:#x}"

    def parse(self, text: str) -> int:
        """A value given as text: a number (``0x1f``, ``12``) or an enum member's name.

        Raises:
            RegionError: neither a number nor a member name; the message lists the names.
        """
        try:
            return int(text, 0)
        except ValueError:
            pass
        if self.enum is not None:
            for member in self.enum:
                if member.name.lower() == text.lower():
                    return int(member)
        names = f"; or one of {', '.join(m.name for m in self.enum)}" if self.enum else ""
        raise RegionError(f"field {self.name or '?'}: {text!r} is not a number{names}")


@dataclass(frozen=True)
class FieldValue:
    """One field of a register value, decoded for display (see :meth:`Register.explain`).

    Attributes:
        name, span, access, doc: the field's (``span`` as the datasheet writes it, "15:14").
        value: the field's value.
        enum: the enum member's name for ``value``, or ``None``.
        changed: whether it differs from the register's reset value (``None``: no reset
            value declared).
    """

    name: str
    span: str
    access: str
    value: int
    enum: str | None
    changed: bool | None
    doc: str


class Register:
    """One register: offset and width in bytes, access mode, reset value and named fields.

    Used as a class attribute of a :class:`RegisterMap`, which gives it its name. On the
    class it is this (unbound) description; on a bound map it is a :class:`BoundRegister`.

    Args:
        offset: byte offset in the map.
        width: bytes, 1, 2, 4 or 8 (as for :class:`~udrv.core.region.Region`).
        access: the register's access mode (fields may override it).
        reset: the value after reset, or ``None`` when the datasheet leaves it open
            (capabilities, implementation-specific values).
        fields: name -> :class:`Field`.
        doc: the datasheet's title and section.
    """

    def __init__(
        self,
        offset: int,
        width: int = 4,
        *,
        access: Access = "rw",
        reset: int | None = None,
        fields: Mapping[str, Field] | None = None,
        doc: str = "",
        name: str = "",
    ) -> None:
        if width not in _WIDTHS:
            raise ValueError(
                f"register {name or '?'}: width is in bytes: 1, 2, 4 or 8, not {width!r}"
            )
        if offset < 0 or offset % width:
            raise ValueError(
                f"register {name or '?'} at {offset:#x} is not aligned to its {width} bytes"
            )
        _check_access(access, f"register {name or '?'}")
        self.offset, self.width, self.access, self.doc = offset, width, access, doc
        self.name = name
        if reset is not None and not 0 <= reset <= self.max:
            raise ValueError(f"register {name or '?'}: reset {reset:#x} does not fit")
        self.reset = reset
        self.fields: dict[str, Field] = {}
        taken = 0
        for fname, f in (fields or {}).items():
            f = replace(f, name=fname)
            if f.shift + f.bits > self.bits:
                raise ValueError(
                    f"register {name or '?'}: field {fname} (bits {f.shift}+{f.bits}) does "
                    f"not fit in {self.bits} bits"
                )
            if taken & f.mask:
                raise ValueError(f"register {name or '?'}: field {fname} overlaps another field")
            taken |= f.mask
            self.fields[fname] = f
        self._qualify()

    def _qualify(self) -> None:
        if self.name:
            base = self.name.split("(")[0]
            self.fields = {k: replace(f, name=f"{base}.{k}") for k, f in self.fields.items()}

    def __set_name__(self, owner: type, name: str) -> None:
        if not self.name:
            self.name = name
            self._qualify()

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Register: ...
    @overload
    def __get__(self, obj: RegisterMap, owner: type | None = None) -> BoundRegister: ...
    def __get__(self, obj: RegisterMap | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        bound = BoundRegister(self, obj.region, obj.base + self.offset)
        obj.__dict__[self.name] = bound  # cache: later lookups are a plain dict hit
        return bound

    # -- description ---------------------------------------------------------------------

    @property
    def bits(self) -> int:
        """The width in bits (for display; :attr:`width` is in bytes)."""
        return self.width * 8

    @property
    def max(self) -> int:
        return (1 << self.bits) - 1

    @property
    def readable(self) -> bool:
        return self.access in READABLE

    def field_access(self, f: Field) -> str:
        """The access mode of field ``f`` in this register."""
        return f.access or self.access

    def _mask_of(self, *modes: str) -> int:
        if self.access in modes:
            return self.max
        return sum(f.mask for f in self.fields.values() if f.access in modes)

    @property
    def w1c_mask(self) -> int:
        """Bits that are write-1-to-clear (the register's, or its w1c fields')."""
        return self._mask_of("w1c")

    @property
    def reserved_mask(self) -> int:
        """Bits no field describes (0 when the register declares no fields)."""
        if not self.fields:
            return 0
        return self.max & ~sum(f.mask for f in self.fields.values())

    def field(self, name: str) -> Field:
        """Field ``name``.

        Raises:
            RegionError: no such field; the message lists the register's fields.
        """
        try:
            return self.fields[name]
        except KeyError:
            known = ", ".join(self.fields) or "none"
            raise RegionError(
                f"register {self.name} has no field {name!r} (fields: {known})"
            ) from None

    def decode(self, value: int) -> dict[str, int]:
        """The fields of ``value`` by name (enum members where the field has an enum)."""
        out: dict[str, int] = {}
        for name, f in self.fields.items():
            x = f.get(value)
            if f.enum is not None:
                try:
                    x = f.enum(x)
                except ValueError:
                    pass
            out[name] = x
        return out

    def changed_from_reset(self, value: int) -> dict[str, bool] | None:
        """Per field, whether ``value`` differs from the reset value (``None``: no reset)."""
        if self.reset is None:
            return None
        return {n: f.get(value) != f.get(self.reset) for n, f in self.fields.items()}

    def explain(self, value: int) -> list[FieldValue]:
        """Every field of ``value`` with its enum name and whether it changed from reset,
        highest bits first (the datasheet's order)."""
        changed = self.changed_from_reset(value)
        return [
            FieldValue(
                name=n,
                span=f.span,
                access=self.field_access(f),
                value=f.get(value),
                enum=f.enum_name(f.get(value)),
                changed=None if changed is None else changed[n],
                doc=f.doc,
            )
            for n, f in sorted(self.fields.items(), key=lambda kv: -kv[1].shift)
        ]

    def encode(self, base: int = 0, **fields: int) -> int:
        """``base`` with the named fields replaced.

        Raises:
            RegionError: an unknown field, or a value that does not fit.
        """
        value = base
        for name, x in fields.items():
            value = self.field(name).put(value, x)
        return value

    def format(self, value: int) -> str:
        """One line for humans: ``STATUS = 0x00000081 (COMPUTING=1 IRQFACT=1)``."""
        text = f"{self.name} = {value:#0{2 + self.width * 2}x}"
        parts = [f"{n}={f.name_of(f.get(value))}" for n, f in self.fields.items()]
        if value & self.reserved_mask:
            parts.append(f"reserved={value & self.reserved_mask:#x}")
        return f"{text} ({' '.join(parts)})" if parts else text

    def __repr__(self) -> str:
        return f"<Register {self.name or '?'} {self.offset:#x} {self.width}-byte {self.access}>"


class RegisterArray:
    """Registers repeated at a stride: ``RAL(n)`` is at ``base + n * stride``.

    Args:
        base: offset of element 0.
        stride: bytes between elements. Where the layout is only known at run time (NVMe
            doorbells: ``0x1000 + (2y + 1) * (4 << CAP.DSTRD)``), declare the spec's layout
            for the smallest stride and pass the real one when binding:
            ``NvmeRegs(bar, arrays={"CQyHDBL": (0x1000 + s, 2 * s)})``.
        count: number of elements (``None``: limited by the region only).
        width, access, reset, fields, doc: as for :class:`Register`, shared by every element.
    """

    def __init__(
        self,
        base: int,
        stride: int,
        count: int | None = None,
        width: int = 4,
        *,
        access: Access = "rw",
        reset: int | None = None,
        fields: Mapping[str, Field] | None = None,
        doc: str = "",
        name: str = "",
    ) -> None:
        self.base, self.stride, self.count, self.doc, self.name = base, stride, count, doc, name
        self._template = Register(
            base, width, access=access, reset=reset, fields=fields, doc=doc, name=name
        )
        if stride <= 0 or stride % width:
            raise ValueError(f"register array {name or '?'}: stride {stride} breaks alignment")

    def __set_name__(self, owner: type, name: str) -> None:
        if not self.name:
            self.name = name
            self._template.name = name
            self._template._qualify()

    @property
    def width(self) -> int:
        """Bytes per element."""
        return self._template.width

    def _check_index(self, i: int) -> None:
        if not isinstance(i, int) or i < 0 or (self.count is not None and i >= self.count):
            limit = f"0-{self.count - 1}" if self.count is not None else "0 or more"
            raise RegionError(f"register array {self.name}: index {i!r} is out of range ({limit})")

    def offset(self, i: int, stride: int | None = None, base: int | None = None) -> int:
        """Offset of element ``i`` (with a run-time ``stride``/``base`` when given).

        Raises:
            RegionError: ``i`` is negative or not below ``count``.
        """
        self._check_index(i)
        return (self.base if base is None else base) + i * (
            self.stride if stride is None else stride
        )

    def __call__(self, i: int, stride: int | None = None, base: int | None = None) -> Register:
        """Element ``i`` as a :class:`Register` named ``NAME(i)``."""
        t = self._template
        return Register(
            self.offset(i, stride, base),
            t.width,
            access=t.access,
            reset=t.reset,
            fields={k: replace(f, name="") for k, f in t.fields.items()},
            doc=t.doc,
            name=f"{self.name}({i})",
        )

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> RegisterArray: ...
    @overload
    def __get__(self, obj: RegisterMap, owner: type | None = None) -> BoundRegisterArray: ...
    def __get__(self, obj: RegisterMap | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        base, stride = obj.arrays.get(self.name, (self.base, self.stride))
        bound = BoundRegisterArray(self, obj, base, stride)
        obj.__dict__[self.name] = bound
        return bound

    def __repr__(self) -> str:
        return f"<RegisterArray {self.name or '?'} {self.base:#x}+n*{self.stride:#x}>"


class BoundRegister:
    """A :class:`Register` of a bound :class:`RegisterMap`: reads and writes the device.

    Every method is one access (``read``, ``write``, ``write_fields``, ``w1c``) or an
    explicit read-modify-write of two (``set``, ``set_bits``, ``clear_bits``, ``clear``).
    The access rules of the map are checked before anything reaches the device.
    """

    __slots__ = ("_read", "_read_ok", "_write", "_write_ok", "offset", "reg", "region")

    def __init__(self, reg: Register, region: Region, offset: int) -> None:
        self.reg, self.region, self.offset = reg, region, offset
        # The region's exact-width accessors and the access rules, looked up once:
        # read()/write() then cost one check and one call more than the region's own.
        self._read: Callable[[int], int] = getattr(region, f"read{reg.bits}")
        self._write: Callable[[int, int], None] = getattr(region, f"write{reg.bits}")
        self._read_ok = reg.access != "wo"
        self._write_ok = reg.access not in ("ro", "rc")

    @property
    def name(self) -> str:
        return self.reg.name

    def _refuse(self, what: str, why: str) -> RegionError:
        return RegionError(
            f"{self.region.name}: {what} register {self.reg.name} ({self.offset:#x}) refused: "
            f"it is {why}"
        )

    def read(self) -> int:
        """One read of the register's width.

        Raises:
            RegionError: the register is write-only, or the access fails.
        """
        if not self._read_ok:
            raise self._refuse("reading", "write-only (reads return undefined data)")
        return self._read(self.offset)

    def write(self, value: int) -> None:
        """One write of ``value`` (for ``w1c``/``w1s`` registers: the 1 bits clear/set).

        Raises:
            RegionError: the register is read-only or read-to-clear, or the value does not
                fit.
        """
        if not self._write_ok:
            raise self._refuse("writing", "read-only")
        self._write(self.offset, value)

    def write_fields(self, **fields: int) -> int:
        """Write the named fields, every other bit 0 (no read); returns the value written.

        Raises:
            RegionError: a field is read-only or unknown, or a value does not fit.
        """
        for name in fields:
            self._check_writable_field(name, "writing")
        value = self.reg.encode(0, **fields)
        self.write(value)
        return value

    def _check_writable_field(self, name: str, what: str) -> Field:
        f = self.reg.field(name)
        if self.reg.field_access(f) not in WRITABLE:
            raise self._refuse(f"{what} field {name} of", "read-only")
        return f

    def _rmw(self, clear: int, set_: int, what: str) -> int:
        access = self.reg.access
        if access in ("wo", "w1c", "w1s", "rc"):
            why = {
                "wo": "write-only",
                "w1c": "write-1-to-clear: use w1c()",
                "w1s": "write-1-to-set: write() only the bits to set",
                "rc": "read-to-clear (a read loses its events)",
            }[access]
            raise self._refuse(f"{what} (read-modify-write) of", why)
        old = self.read()
        # Writing back a 1 read from a W1C bit would clear it: send 0 there unless the
        # caller sets it on purpose.
        value = ((old & ~self.reg.w1c_mask) & ~clear) | set_
        self.write(value)
        return value

    def set(self, **fields: int) -> int:
        """Read, replace the named fields, write back; returns the value written.

        Raises:
            RegionError: a field is read-only or unknown, the value does not fit, or the
                register cannot be read-modify-written (``wo``, ``w1c``, ``w1s``, ``rc``).
        """
        clear = set_ = 0
        for name, x in fields.items():
            f = self._check_writable_field(name, "setting")
            set_ = f.put(set_, x)
            clear |= f.mask
        return self._rmw(clear, set_, "set")

    def clear(self, *names: str) -> int:
        """Read, make the named fields 0, write back; returns the value written.

        This is a read-modify-write for ``rw`` fields; a W1C field is cleared with
        :meth:`w1c` instead (writing 0 to it would clear nothing).

        Raises:
            RegionError: a field is unknown, read-only or W1C, or the register cannot be
                read-modify-written.
        """
        mask = 0
        for name in names:
            f = self._check_writable_field(name, "clearing")
            if self.reg.field_access(f) == "w1c":
                raise self._refuse(f"clearing field {name} of", "write-1-to-clear: use w1c()")
            mask |= f.mask
        return self._rmw(mask, 0, "clear")

    def set_bits(self, mask: int) -> int:
        """Read, OR ``mask`` in, write back; returns the value written."""
        return self._rmw(0, mask, "set_bits")

    def clear_bits(self, mask: int) -> int:
        """Read, clear ``mask``, write back; returns the value written."""
        return self._rmw(mask, 0, "clear_bits")

    def w1c(self, mask: int = 0, **fields: int) -> int:
        """Write-1-to-clear: one write of just ``mask`` plus the named fields' bits (no
        read): ``regs.ICR.w1c(RXT0=1)``, ``regs.CSTS.w1c(NSSRO=1)``; returns the value written.

        Raises:
            RegionError: a bit or field that is not write-1-to-clear (writing it would set
                or change state instead of clearing an event), or nothing to clear.
        """
        value = self.reg.encode(mask, **fields)
        w1c = self.reg.w1c_mask
        if not w1c:
            raise self._refuse("write-1-to-clear of", f"not write-1-to-clear ({self.reg.access})")
        if value & ~w1c:
            raise self._refuse(
                f"write-1-to-clear of bits {value & ~w1c:#x} of",
                f"write-1-to-clear only in bits {w1c:#x}",
            )
        if not value:
            raise RegionError(f"w1c of {self.reg.name}: give the bits or fields to clear")
        self._write(self.offset, value)
        return value

    def get(self, name: str) -> int:
        """Read the register once and return field ``name``."""
        return self.reg.field(name).get(self.read())

    def decode(self, value: int | None = None) -> dict[str, int]:
        """Fields by name of ``value`` (default: read the register once)."""
        return self.reg.decode(self.read() if value is None else value)

    def format(self, value: int | None = None) -> str:
        """:meth:`Register.format` of ``value`` (default: read the register once)."""
        return self.reg.format(self.read() if value is None else value)

    def poll(
        self,
        mask: int | None = None,
        value: int = 0,
        *,
        timeout: float,
        interval: float = POLL_INTERVAL,
        **fields: int,
    ) -> int:
        """Read until ``read() & mask == value``, or until the named fields have the given
        values: ``regs.CSTS.poll(RDY=1, timeout=5)``; returns the last value read.

        Raises:
            PollTimeout: naming the region, register, mask, expected and last value.
        """
        if self.reg.access == "wo":
            raise self._refuse("polling", "write-only")
        m = 0 if mask is None else mask
        v = value
        for name, x in fields.items():
            f = self.reg.field(name)
            m |= f.mask
            v = f.put(v, x)
        if not m:
            raise RegionError(f"poll of {self.reg.name}: give a mask or field=value")
        return self.region.poll(
            self.offset,
            m,
            v,
            timeout,
            width=self.reg.width,
            interval=interval,
            name=self.reg.name,
        )

    def __repr__(self) -> str:
        return f"<BoundRegister {self.reg.name} {self.offset:#x} of {self.region.name}>"


class BoundRegisterArray:
    """A :class:`RegisterArray` of a bound map: ``regs.RAL(0).write(lo)``."""

    def __init__(self, array: RegisterArray, regs: RegisterMap, base: int, stride: int) -> None:
        self.array, self.regs, self.base, self.stride = array, regs, base, stride

    def offset(self, i: int) -> int:
        """Offset of element ``i`` in the region (with the map's base and bound layout)."""
        return self.regs.base + self.array.offset(i, self.stride, self.base)

    def __call__(self, i: int) -> BoundRegister:
        reg = self.array(i, self.stride, self.base)
        return BoundRegister(reg, self.regs.region, self.regs.base + reg.offset)

    def __repr__(self) -> str:
        return f"<BoundRegisterArray {self.array.name} of {self.regs.region.name}>"


#: What a bound map sets on itself; a register cannot have these names.
_INSTANCE_ATTRS = frozenset({"region", "base", "arrays"})
_ELEMENT = re.compile(r"^(\w+)[(\[](\d+)[)\]]$")


class RegisterMap:
    """Base class of a device's register map; subclass it with :class:`Register` and
    :class:`RegisterArray` class attributes.

    Class attributes ``SIZE`` (bytes the map spans, checked at class creation when set) and
    the collected ``REGISTERS`` (name -> Register, by offset) and ``ARRAYS`` describe it.
    Overlapping registers are an error at class creation (a transcription mistake), unless
    listed in ``ALIASES`` (pairs of names that share an offset by design).

    Args:
        region: the Region to bind to (usually ``dev.bar(n)``).
        base: offset of the map inside the region (a block of registers within a BAR).
        strides: run-time strides for register arrays, by name.
        arrays: run-time ``(base, stride)`` of register arrays, by name (both depend on the
            device, as for NVMe doorbells).

    Raises:
        RegionError: a stride or layout for an array the map does not have.
    """

    SIZE: ClassVar[int | None] = None
    ALIASES: ClassVar[tuple[tuple[str, str], ...]] = ()
    REGISTERS: ClassVar[dict[str, Register]] = {}
    ARRAYS: ClassVar[dict[str, RegisterArray]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        regs: dict[str, Register] = {}
        arrays: dict[str, RegisterArray] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                if isinstance(attr, Register):
                    regs[name] = attr
                elif isinstance(attr, RegisterArray):
                    arrays[name] = attr
        ordered = sorted(regs.items(), key=lambda kv: kv[1].offset)
        aliases = {frozenset(p) for p in cls.ALIASES}
        for (an, a), (bn, b) in itertools.pairwise(ordered):
            if a.offset + a.width > b.offset and frozenset((an, bn)) not in aliases:
                raise TypeError(
                    f"{cls.__name__}: {an} ({a.offset:#x}, {a.width} bytes) overlaps "
                    f"{bn} ({b.offset:#x}); fix the offsets or list the pair in ALIASES"
                )
        if cls.SIZE is not None:
            for n, r in ordered:
                if r.offset + r.width > cls.SIZE:
                    raise TypeError(f"{cls.__name__}: {n} at {r.offset:#x} is past SIZE")
        cls.REGISTERS = dict(ordered)
        cls.ARRAYS = arrays

    def __init__(
        self,
        region: Region,
        *,
        base: int = 0,
        strides: Mapping[str, int] | None = None,
        arrays: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.region, self.base = region, base
        layout = {n: (a.base, a.stride) for n, a in self.ARRAYS.items()}
        unknown = (set(strides or {}) | set(arrays or {})) - set(self.ARRAYS)
        if unknown:
            raise RegionError(
                f"{type(self).__name__}: strides given for unknown arrays {sorted(unknown)}"
            )
        for name, stride in (strides or {}).items():
            layout[name] = (layout[name][0], stride)
        layout.update(arrays or {})
        self.arrays: dict[str, tuple[int, int]] = layout

    @classmethod
    def define(
        cls,
        name: str,
        registers: Mapping[str, Register | RegisterArray],
        *,
        size: int | None = None,
        doc: str = "",
    ) -> type[RegisterMap]:
        """A map described by data rather than by a ``class`` statement: what an importer
        of register descriptions (SystemRDL, IP-XACT) returns. The same checks run as for a
        class (overlaps, ``SIZE``), and names are given to the registers as attributes.

        Args:
            name: the map's (class) name, e.g. the description's top block.
            registers: attribute name -> :class:`Register` or :class:`RegisterArray`; the
                names must be Python identifiers (``regs.STATUS``).
            size: bytes the map spans (checked), or ``None``.
            doc: the description's text.

        Raises:
            TypeError: overlapping registers or one past ``size`` (from the class checks).
            ValueError: a name that is not an identifier or clashes with the map's API.
        """
        for key in registers:
            if not key.isidentifier() or hasattr(RegisterMap, key) or key in _INSTANCE_ATTRS:
                raise ValueError(f"register map {name}: {key!r} cannot be a register name")
        namespace: dict[str, Any] = {"SIZE": size, "__doc__": doc, **registers}
        return types.new_class(name, (cls,), exec_body=lambda ns: ns.update(namespace))

    @classmethod
    def at(cls, offset: int) -> Register | None:
        """The register that covers byte ``offset`` (for naming peeks), or ``None``."""
        for reg in cls.REGISTERS.values():
            if reg.offset <= offset < reg.offset + reg.width:
                return reg
        return None

    @classmethod
    def describe(cls, offset: int, value: int) -> str:
        """``format()`` of the register at ``offset``, else the bare value."""
        reg = cls.at(offset)
        if reg is None or reg.offset != offset:
            return f"{offset:#x} = {value:#x}"
        return reg.format(value)

    @classmethod
    def lookup(cls, name: str) -> Register:
        """The register named ``name`` (case-insensitive), or element ``NAME(i)``/``NAME[i]``
        of an array, as declared (default array layout).

        Raises:
            RegionError: no such register; the message lists the map's names.
        """
        m = _ELEMENT.match(name)
        key = (m.group(1) if m else name).upper()
        if m:
            for n, a in cls.ARRAYS.items():
                if n.upper() == key:
                    return a(int(m.group(2)))
        else:
            for n, r in cls.REGISTERS.items():
                if n.upper() == key:
                    return r
        known = ", ".join([*cls.REGISTERS, *(f"{n}(i)" for n in cls.ARRAYS)])
        raise RegionError(f"{cls.__name__} has no register {name!r} (registers: {known})")

    def bind(self, reg: Register) -> BoundRegister:
        """``reg`` (from :meth:`lookup`, or an array element) bound to this map's region.

        Array elements are placed with the map's run-time layout.
        """
        m = _ELEMENT.match(reg.name)
        if m and m.group(1) in self.ARRAYS:
            bound: BoundRegisterArray = getattr(self, m.group(1))
            return bound(int(m.group(2)))
        return BoundRegister(reg, self.region, self.base + reg.offset)

    def __iter__(self) -> Iterator[BoundRegister]:
        """The bound registers (not arrays), by offset."""
        for name in self.REGISTERS:
            yield getattr(self, name)

    def dump(self, *, side_effects: bool = False) -> list[tuple[Register, int]]:
        """Read every readable register once: (register, value) by offset.

        Registers that are write-only are skipped, and so are read-to-clear ones unless
        ``side_effects`` (reading them would lose the events they hold).
        """
        out = []
        for reg in self.REGISTERS.values():
            if reg.access == "wo" or (reg.access == "rc" and not side_effects):
                continue
            out.append((reg, self.region.read_width(self.base + reg.offset, reg.width)))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} on {self.region.name} at {self.base:#x}>"
