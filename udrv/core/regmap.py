"""Declarative register maps: a device's registers and their fields, as data.

A driver's ``regs.py`` transcribes the datasheet once, with its mnemonics::

    class EduRegs(RegisterMap):
        \"\"\"QEMU docs/specs/edu.rst, "MMIO area spec".\"\"\"
        IDENT = Register(0x00, 32, access="ro", doc="Identification: 0xRRrr00ed")
        STATUS = Register(0x20, 32, fields={
            "COMPUTING": Field(0, 1, access="ro", doc="factorial in progress"),
            "IRQFACT": Field(7, 1, doc="raise an interrupt when the factorial is done"),
        })

    EduRegs.STATUS.offset               # 0x20: the class is the single source of offsets
    regs = EduRegs(bar)                 # bound to a Region
    regs.STATUS.read()                  # one 32-bit read
    regs.STATUS.set(IRQFACT=1)          # explicit read-modify-write of one field
    regs.STATUS.decode(0x81)            # {"COMPUTING": 1, "IRQFACT": 1}
    regs.STATUS.poll(timeout=1.0, COMPUTING=0)

Values are always plain ints read with one exact-width access and decoded in Python: no
bitfield structure is ever overlaid on live registers (a C bitfield write is a hidden
read-modify-write of the whole word, at a width the compiler chooses).

Access modes (``access=`` on a register or a field):

``rw``
    read/write (default).
``ro``
    read-only: writing raises :class:`RegionError` naming the register.
``wo``
    write-only: reads return nothing meaningful, so reading raises; so does a RMW.
``w1c``
    write-1-to-clear: :meth:`BoundRegister.clear` writes just the given bits; a RMW of
    the register (``set``, ``set_bits``) never writes 1 back into its W1C bits, which
    would clear events nobody handled.
``rc``
    read-to-clear (e.g. e1000 ICR): reading has a side effect, so :meth:`RegisterMap.dump`
    skips it unless asked.

Register arrays cover per-queue registers (e1000 ``RDBAL(n)``, NVMe doorbells): see
:class:`RegisterArray`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, overload

from udrv.core.region import POLL_INTERVAL, Region
from udrv.errors import RegionError

Access = Literal["rw", "ro", "wo", "w1c", "rc"]
ACCESS_MODES: tuple[str, ...] = ("rw", "ro", "wo", "w1c", "rc")


def _check_access(access: str, what: str) -> None:
    if access not in ACCESS_MODES:
        raise ValueError(f"{what}: access must be one of {', '.join(ACCESS_MODES)}, not {access!r}")


@dataclass(frozen=True)
class Field:
    """Bits ``[shift, shift + width)`` of a register.

    Args:
        shift: the lowest bit.
        width: number of bits.
        enum: an :class:`enum.IntEnum` naming the values (``decode`` returns its members).
        access: overrides the register's access mode for these bits (``ro`` status bits in
            an ``rw`` register, ``w1c`` event bits).
        doc: the datasheet's description.
    """

    shift: int
    width: int = 1
    enum: type[enum.IntEnum] | None = None
    access: Access | None = None
    doc: str = ""
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.shift < 0 or self.width < 1 or self.shift + self.width > 64:
            raise ValueError(f"field {self.name or '?'}: bits {self.shift}+{self.width} do not fit")
        if self.access is not None:
            _check_access(self.access, f"field {self.name or '?'}")

    @property
    def mask(self) -> int:
        """The field's bits in place, e.g. ``Field(4, 2).mask == 0x30``."""
        return ((1 << self.width) - 1) << self.shift

    @property
    def max(self) -> int:
        return (1 << self.width) - 1

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
                f"field {self.name or '?'}: value {x!r} does not fit in {self.width} bit(s) "
                f"(0 to {self.max:#x})"
            )
        return (value & ~self.mask) | (x << self.shift)

    def value(self, x: int) -> int:
        """``x`` shifted into place (same checks as :meth:`put`)."""
        return self.put(0, x)

    def name_of(self, x: int) -> str:
        """``x`` as the enum's member name when there is one, else as a number."""
        if self.enum is not None:
            try:
                return f"{self.enum(x).name}({x})"
            except ValueError:
                pass
        return str(x) if self.width == 1 else f"{x:#x}"


class Register:
    """One register: offset in bytes, width in bits, access mode and named fields.

    Used as a class attribute of a :class:`RegisterMap`, which gives it its name. On the
    class it is this (unbound) description; on a bound map it is a :class:`BoundRegister`.
    """

    def __init__(
        self,
        offset: int,
        width: int = 32,
        *,
        access: Access = "rw",
        fields: Mapping[str, Field] | None = None,
        doc: str = "",
        name: str = "",
    ) -> None:
        if width not in (8, 16, 32, 64):
            raise ValueError(f"register {name or '?'}: width is in bits: 8, 16, 32 or 64")
        if offset < 0 or offset % (width // 8):
            raise ValueError(
                f"register {name or '?'} at {offset:#x} is not aligned to its {width} bits"
            )
        _check_access(access, f"register {name or '?'}")
        self.offset, self.width, self.access, self.doc = offset, width, access, doc
        self.name = name
        self.fields: dict[str, Field] = {}
        taken = 0
        for fname, f in (fields or {}).items():
            f = replace(f, name=fname)
            if f.shift + f.width > width:
                raise ValueError(
                    f"register {name or '?'}: field {fname} (bits {f.shift}+{f.width}) does "
                    f"not fit in {width} bits"
                )
            if taken & f.mask:
                raise ValueError(f"register {name or '?'}: field {fname} overlaps another field")
            taken |= f.mask
            self.fields[fname] = f
        self._qualify()

    def _qualify(self) -> None:
        if self.name:
            self.fields = {k: replace(f, name=f"{self.name}.{k}") for k, f in self.fields.items()}

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
    def nbytes(self) -> int:
        return self.width // 8

    @property
    def max(self) -> int:
        return (1 << self.width) - 1

    def field_access(self, f: Field) -> str:
        return f.access or self.access

    @property
    def w1c_mask(self) -> int:
        """Bits that are write-1-to-clear (the register's, or its w1c fields')."""
        if self.access == "w1c":
            return self.max
        return sum(f.mask for f in self.fields.values() if f.access == "w1c")

    @property
    def reserved_mask(self) -> int:
        """Bits no field describes (0 when the register declares no fields)."""
        if not self.fields:
            return 0
        return self.max & ~sum(f.mask for f in self.fields.values())

    def field(self, name: str) -> Field:
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
        text = f"{self.name} = {value:#0{2 + self.width // 4}x}"
        parts = [f"{n}={f.name_of(f.get(value))}" for n, f in self.fields.items()]
        if value & self.reserved_mask:
            parts.append(f"reserved={value & self.reserved_mask:#x}")
        return f"{text} ({' '.join(parts)})" if parts else text

    def __repr__(self) -> str:
        return f"<Register {self.name or '?'} {self.offset:#x} {self.width}-bit {self.access}>"


class RegisterArray:
    """Registers repeated at a stride: ``RDBAL(n)`` is at ``base + n * stride``.

    Args:
        base: offset of element 0.
        stride: bytes between elements. Where the stride is only known at run time (NVMe
            doorbells: ``4 << CAP.DSTRD``), declare the spec's minimum and pass the real one
            when binding: ``NvmeRegs(bar, strides={"SQyTDBL": 8 << dstrd})``.
        count: number of elements (``None``: limited by the region only).
        width, access, fields, doc: as for :class:`Register`, shared by every element.
    """

    def __init__(
        self,
        base: int,
        stride: int,
        count: int | None = None,
        width: int = 32,
        *,
        access: Access = "rw",
        fields: Mapping[str, Field] | None = None,
        doc: str = "",
        name: str = "",
    ) -> None:
        self.base, self.stride, self.count, self.doc, self.name = base, stride, count, doc, name
        self._template = Register(base, width, access=access, fields=fields, doc=doc, name=name)
        if stride % self._template.nbytes or stride <= 0:
            raise ValueError(f"register array {name or '?'}: stride {stride} breaks alignment")

    def __set_name__(self, owner: type, name: str) -> None:
        if not self.name:
            self.name = name
            self._template = Register(
                self.base,
                self._template.width,
                access=self._template.access,
                fields=self._template.fields,
                doc=self.doc,
                name=name,
            )

    @property
    def width(self) -> int:
        return self._template.width

    def offset(self, i: int, stride: int | None = None) -> int:
        """Offset of element ``i``.

        Raises:
            RegionError: ``i`` is negative or not below ``count``.
        """
        if not isinstance(i, int) or i < 0 or (self.count is not None and i >= self.count):
            limit = f"0-{self.count - 1}" if self.count is not None else "0 or more"
            raise RegionError(f"register array {self.name}: index {i!r} is out of range ({limit})")
        return self.base + i * (self.stride if stride is None else stride)

    def __call__(self, i: int, stride: int | None = None) -> Register:
        """Element ``i`` as a :class:`Register` named ``NAME(i)``."""
        t = self._template
        return Register(
            self.offset(i, stride),
            t.width,
            access=t.access,
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
        bound = BoundRegisterArray(self, obj, obj.strides.get(self.name))
        obj.__dict__[self.name] = bound
        return bound

    def __repr__(self) -> str:
        return f"<RegisterArray {self.name or '?'} {self.base:#x}+n*{self.stride:#x}>"


class BoundRegister:
    """A :class:`Register` of a bound :class:`RegisterMap`: reads and writes the device.

    Every method is one access (``read``, ``write``, ``clear``) or an explicit
    read-modify-write of two (``set``, ``set_bits``, ``clear_bits``).
    """

    __slots__ = ("offset", "reg", "region")

    def __init__(self, reg: Register, region: Region, offset: int) -> None:
        self.reg, self.region, self.offset = reg, region, offset

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
        if self.reg.access == "wo":
            raise self._refuse("reading", "write-only (reads return undefined data)")
        return self.region.read_width(self.offset, self.reg.nbytes)

    def write(self, value: int) -> None:
        """One write of ``value`` (for a ``w1c`` register: the 1 bits clear).

        Raises:
            RegionError: the register is read-only, or the value does not fit.
        """
        if self.reg.access in ("ro", "rc"):
            raise self._refuse("writing", "read-only")
        self.region.write_width(self.offset, self.reg.nbytes, value)

    def write_fields(self, **fields: int) -> int:
        """Write the named fields, every other bit 0 (no read); returns the value written."""
        value = self.reg.encode(0, **fields)
        self.write(value)
        return value

    def _rmw(self, clear: int, set_: int, what: str) -> int:
        if self.reg.access in ("wo", "w1c"):
            raise self._refuse(
                f"{what} (read-modify-write) of",
                "write-only" if self.reg.access == "wo" else "write-1-to-clear: use clear()",
            )
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
                register cannot be read-modify-written (``wo``, ``w1c``).
        """
        clear = set_ = 0
        for name, x in fields.items():
            f = self.reg.field(name)
            if self.reg.field_access(f) in ("ro", "rc"):
                raise self._refuse(f"setting field {name} of", "read-only")
            set_ = f.put(set_, x)
            clear |= f.mask
        return self._rmw(clear, set_, "set")

    def set_bits(self, mask: int) -> int:
        """Read, OR ``mask`` in, write back; returns the value written."""
        return self._rmw(0, mask, "set_bits")

    def clear_bits(self, mask: int) -> int:
        """Read, clear ``mask``, write back; returns the value written."""
        return self._rmw(mask, 0, "clear_bits")

    def clear(self, mask: int = 0, **fields: int) -> int:
        """Write-1-to-clear: write just ``mask`` plus the named fields' bits (no read).

        ``regs.ICR.clear(RXT0=1)`` or ``regs.INTR_STATUS.clear(0x100)``; returns the value
        written.
        """
        value = self.reg.encode(mask, **fields)
        self.write(value)
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
            width=self.reg.nbytes,
            interval=interval,
            name=self.reg.name,
        )

    def __repr__(self) -> str:
        return f"<BoundRegister {self.reg.name} {self.offset:#x} of {self.region.name}>"


class BoundRegisterArray:
    """A :class:`RegisterArray` of a bound map: ``regs.RDBAL(0).write(lo)``."""

    def __init__(self, array: RegisterArray, regs: RegisterMap, stride: int | None) -> None:
        self.array, self.regs, self.stride = array, regs, stride

    def offset(self, i: int) -> int:
        """Offset of element ``i`` in the region (with the map's base and bound stride)."""
        return self.regs.base + self.array.offset(i, self.stride)

    def __call__(self, i: int) -> BoundRegister:
        reg = self.array(i, self.stride)
        return BoundRegister(reg, self.regs.region, self.regs.base + reg.offset)

    def __repr__(self) -> str:
        return f"<BoundRegisterArray {self.array.name} of {self.regs.region.name}>"


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
            if a.offset + a.nbytes > b.offset and frozenset((an, bn)) not in aliases:
                raise TypeError(
                    f"{cls.__name__}: {an} ({a.offset:#x}, {a.width} bits) overlaps "
                    f"{bn} ({b.offset:#x}); fix the offsets or list the pair in ALIASES"
                )
        if cls.SIZE is not None:
            for n, r in ordered:
                if r.offset + r.nbytes > cls.SIZE:
                    raise TypeError(f"{cls.__name__}: {n} at {r.offset:#x} is past SIZE")
        cls.REGISTERS = dict(ordered)
        cls.ARRAYS = arrays

    def __init__(
        self, region: Region, *, base: int = 0, strides: Mapping[str, int] | None = None
    ) -> None:
        self.region, self.base = region, base
        self.strides: dict[str, int] = dict(strides or {})
        unknown = set(self.strides) - set(self.ARRAYS)
        if unknown:
            raise RegionError(
                f"{type(self).__name__}: strides given for unknown arrays {sorted(unknown)}"
            )

    @classmethod
    def at(cls, offset: int) -> Register | None:
        """The register that covers byte ``offset`` (for naming peeks), or ``None``."""
        for reg in cls.REGISTERS.values():
            if reg.offset <= offset < reg.offset + reg.nbytes:
                return reg
        return None

    @classmethod
    def describe(cls, offset: int, value: int) -> str:
        """``format()`` of the register at ``offset``, else the bare value."""
        reg = cls.at(offset)
        if reg is None or reg.offset != offset:
            return f"{offset:#x} = {value:#x}"
        return reg.format(value)

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
            out.append((reg, self.region.read_width(self.base + reg.offset, reg.nbytes)))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} on {self.region.name} at {self.base:#x}>"
