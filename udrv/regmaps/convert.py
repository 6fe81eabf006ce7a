"""A compiled register description (SystemRDL's model) as udrv :class:`RegisterMap` classes.

What maps to what:

- **BARs**: an addrmap with the user-defined property ``udrv_bar = N`` is BAR N, its
  registers at offsets from the addrmap's own address. The elaborated top addrmap, or its
  direct child addrmaps, may carry it; when none does, the whole top is one BAR (``bar``,
  default 0), or its only child addrmap is (IP-XACT's single address block). IP-XACT has
  no such property: give ``bar``.
- **Registers**: ``regwidth`` of 8, 16, 32 or 64 bits, accessed at that width (an
  ``accesswidth`` below ``regwidth`` would need split accesses, which udrv's registers do
  not do). Regfiles and nested addrmaps are flattened, their names joined with ``_``.
- **Access** (SystemRDL 2.0 section 9.4-9.6): ``sw=rw`` -> rw, ``sw=r`` -> ro,
  ``sw=w`` -> wo, ``onwrite=woclr`` -> w1c, ``onwrite=woset`` -> w1s, ``onread=rclr`` -> rc.
  Other side effects (``wzc``, ``wot``, ``rset``...) and ``sw=na``/write-once fields have
  no udrv equivalent and are refused. A register whose fields all share a mode takes it;
  mixed registers are ``rw`` with per-field modes (``ro`` or ``wo`` when no field is
  writable or readable).
- **Reset values**: the fields' ``reset`` values combined; ``None`` when a field has none.
- **Enumerations**: a field's ``encode`` enum becomes an :class:`enum.IntEnum`.
- **Arrays**: a one-dimensional register array becomes a :class:`RegisterArray`; arrays
  of regfiles or with more dimensions are refused.
- Memories (``mem``) are not registers and are left out.

Every refusal is a :class:`~udrv.errors.DescriptionError` with the file and line of the
construct, as the compiler reports its own errors.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udrv.core.regmap import Access, Field, Register, RegisterArray, RegisterMap
from udrv.errors import DescriptionError
from udrv.regmaps.compile import BAR_PROPERTY, where


@dataclass(frozen=True)
class Description:
    """The register maps of one description, by BAR.

    Attributes:
        path: the description file.
        name: the elaborated top addrmap's name.
        maps: BAR index -> a :class:`RegisterMap` subclass (bind it as any built-in map:
            ``desc.maps[0](dev.bar(0))``).
    """

    path: Path
    name: str
    maps: dict[int, type[RegisterMap]]

    def map_for(self, bar: int | None = None) -> tuple[int, type[RegisterMap]]:
        """The map of BAR ``bar``, or the only one.

        Raises:
            DescriptionError: no block for that BAR, or several BARs and none chosen.
        """
        if bar is None:
            if len(self.maps) == 1:
                return next(iter(self.maps.items()))
            raise DescriptionError(
                f"{self.path}: {self.name} describes BARs {sorted(self.maps)}; choose one "
                "with --bar N",
                path=str(self.path),
            )
        if bar not in self.maps:
            raise DescriptionError(
                f"{self.path}: {self.name} has no registers in BAR{bar} (it describes BARs "
                f"{sorted(self.maps)})",
                path=str(self.path),
            )
        return bar, self.maps[bar]


def _refuse(node: Any, path: Path, why: str) -> DescriptionError:
    p, line, col = where(node.inst.inst_src_ref or node.inst.def_src_ref, str(path))
    at = f":{line}" if line is not None else ""
    at += f":{col}" if line is not None and col is not None else ""
    return DescriptionError(
        f"{p}{at}: error: udrv cannot map {node.get_path()}: {why}", path=p, line=line
    )


def _doc(node: Any) -> str:
    desc = node.get_property("desc")
    if desc:
        return " ".join(str(desc).split())
    name = node.get_property("name")
    return "" if name == node.inst_name else str(name)


def _field_access(node: Any, path: Path) -> Access:
    from systemrdl.rdltypes import AccessType, OnReadType, OnWriteType

    sw = node.get_property("sw")
    onread = node.get_property("onread")
    onwrite = node.get_property("onwrite")
    if sw in (AccessType.na, AccessType.rw1, AccessType.w1):
        raise _refuse(node, path, f"sw={sw.name} has no udrv access mode (rw, r, w are mapped)")
    if onread is not None and onread != OnReadType.rclr:
        raise _refuse(node, path, f"onread={onread.name} is not supported (only rclr)")
    if onwrite is not None and onwrite not in (OnWriteType.woclr, OnWriteType.woset):
        raise _refuse(node, path, f"onwrite={onwrite.name} is not supported (only woclr, woset)")
    if onread == OnReadType.rclr:
        if sw != AccessType.r or onwrite is not None:
            raise _refuse(node, path, "a read-to-clear field must be read-only for udrv")
        return "rc"
    if onwrite == OnWriteType.woclr:
        return "w1c"
    if onwrite == OnWriteType.woset:
        return "w1s"
    return {AccessType.rw: "rw", AccessType.r: "ro", AccessType.w: "wo"}[sw]  # type: ignore[return-value]


def _enum(node: Any) -> type[enum.IntEnum] | None:
    encode = node.get_property("encode")
    if encode is None:
        return None
    members = [(m.name, m.value) for m in encode]
    made: type[enum.IntEnum] = enum.IntEnum(encode.type_name, members)  # type: ignore[misc]
    return made


def _register_parts(node: Any, path: Path) -> dict[str, Any]:
    """The keyword arguments of :class:`Register` for a RegNode."""
    regwidth = node.get_property("regwidth")
    if regwidth not in (8, 16, 32, 64):
        raise _refuse(node, path, f"regwidth={regwidth}; udrv registers are 8/16/32/64 bits")
    if node.get_property("accesswidth") != regwidth:
        raise _refuse(
            node,
            path,
            f"accesswidth={node.get_property('accesswidth')} below regwidth={regwidth} "
            "needs split accesses, which udrv registers do not make",
        )
    fields: dict[str, Field] = {}
    modes: dict[str, Access] = {}
    reset: int | None = 0
    for f in node.fields():
        mode = _field_access(f, path)
        modes[f.inst_name] = mode
        fields[f.inst_name] = Field(f.lsb, f.width, enum=_enum(f), access=mode, doc=_doc(f))
        r = f.get_property("reset")
        if isinstance(r, int) and reset is not None:
            reset |= r << f.lsb
        else:
            reset = None  # no reset, or reset from a signal: unknown to software
    kinds = set(modes.values())
    if len(kinds) == 1:
        access: Access = kinds.pop()
        fields = {n: Field(f.shift, f.bits, enum=f.enum, doc=f.doc) for n, f in fields.items()}
    elif "rc" in kinds:
        raise _refuse(node, path, "read-to-clear fields next to fields of other kinds")
    elif not kinds & {"rw", "wo", "w1c", "w1s"}:
        access = "ro"
    elif not kinds & {"rw", "ro", "w1c", "w1s"}:
        access = "wo"
    else:
        access = "rw"
    return {
        "width": regwidth // 8,
        "access": access,
        "reset": reset,
        "fields": fields,
        "doc": _doc(node),
    }


def _registers(node: Any, block: Any, path: Path, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, Register or RegisterArray) of every register under ``node``, flattened."""
    from systemrdl.node import AddrmapNode, MemNode, RegfileNode, RegNode

    for child in node.children():
        name = prefix + child.inst_name
        if isinstance(child, MemNode):
            continue
        offset = child.raw_absolute_address - block.raw_absolute_address
        if isinstance(child, RegNode):
            if hasattr(RegisterMap, name) or name in ("region", "base", "arrays"):
                raise _refuse(child, path, f"the name {name} clashes with the RegisterMap API")
            parts = _register_parts(child, path)
            dims = child.array_dimensions or []
            if len(dims) > 1:
                raise _refuse(child, path, "multi-dimensional register arrays")
            try:
                if not dims:
                    yield name, Register(offset, name=name, **parts)
                else:
                    stride = child.array_stride or parts["width"]
                    yield name, RegisterArray(offset, stride, dims[0], name=name, **parts)
            except ValueError as exc:
                raise _refuse(child, path, str(exc)) from None
        elif isinstance(child, (RegfileNode, AddrmapNode)):
            if child.is_array:
                raise _refuse(child, path, "arrays of regfiles/addrmaps (make it a register array)")
            if isinstance(child, AddrmapNode) and child.get_property(BAR_PROPERTY) is not None:
                raise _refuse(child, path, f"{BAR_PROPERTY} inside another BAR's block")
            yield from _registers(child, block, path, f"{name}_")


def _blocks(top: Any, path: Path, bar: int | None) -> list[tuple[int, Any]]:
    from systemrdl.node import AddrmapNode, MemNode, RegNode

    own = top.get_property(BAR_PROPERTY)
    if own is not None:
        return [(own, top)]  # the file says; --bar then only selects
    blocks = [
        (c.get_property(BAR_PROPERTY), c)
        for c in top.children()
        if isinstance(c, AddrmapNode) and c.get_property(BAR_PROPERTY) is not None
    ]
    if not blocks:
        # IP-XACT's importer wraps each addressBlock in an addrmap of the memoryMap's: a
        # lone wrapped block is the BAR's map, without its name as a prefix.
        inner = [c for c in top.children() if not isinstance(c, MemNode)]
        if len(inner) == 1 and isinstance(inner[0], AddrmapNode) and not inner[0].is_array:
            top = inner[0]
        return [(0 if bar is None else bar, top)]
    outside = [c for c in top.children() if isinstance(c, RegNode)]
    if outside:
        raise _refuse(outside[0], path, f"a register outside every {BAR_PROPERTY} block")
    seen: dict[int, Any] = {}
    for n, b in blocks:
        if n in seen:
            raise _refuse(b, path, f"BAR{n} is also {seen[n].get_path()}")
        seen[n] = b
    return blocks


def _class_name(text: str) -> str:
    words = re.split(r"\W+|_", text)
    return "".join(w[:1].upper() + w[1:] for w in words if w) or "Imported"


def _map_class(
    name: str, registers: dict[str, Any], aliases: tuple[tuple[str, str], ...], doc: str
) -> type[RegisterMap]:
    """:meth:`RegisterMap.define`, on a base that lists the overlapping pairs when there are
    any: SystemRDL allows a read-only and a write-only register at one address, and aliases."""
    base: type[RegisterMap] = RegisterMap
    if aliases:

        class Aliased(RegisterMap):
            ALIASES = aliases

        base = Aliased
    return base.define(name, registers, doc=doc)


def to_maps(root: Any, path: str | Path, bar: int | None = None) -> Description:
    """Build the :class:`RegisterMap` classes of a compiled description.

    Args:
        root: the compiler's elaborated ``RootNode``.
        path: the description file (for messages).
        bar: the BAR of a description that does not say (see the module docstring).

    Returns:
        The maps by BAR.

    Raises:
        DescriptionError: a construct udrv cannot map, with its file and line.
    """
    path = Path(path)
    top = root.top
    maps: dict[int, type[RegisterMap]] = {}
    for n, block in _blocks(top, path, bar):
        attrs = dict(_registers(block, block, path))
        regs = sorted(
            ((k, r) for k, r in attrs.items() if isinstance(r, Register)),
            key=lambda kv: kv[1].offset,
        )
        aliases = tuple(
            (a, b)
            for (a, ra), (b, rb) in itertools.pairwise(regs)
            if ra.offset + ra.width > rb.offset
        )
        doc = _doc(block) or f"{block.get_path()} from {path.name}"
        try:
            maps[n] = _map_class(_class_name(f"{block.inst_name}_regs"), attrs, aliases, doc)
        except (TypeError, ValueError) as exc:
            raise _refuse(block, path, str(exc)) from None
    return Description(path, top.inst_name, maps)
