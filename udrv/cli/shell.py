"""`udrv shell`: an interactive Python with a device open and its registers bound.

    udrv shell ADDRESS [--rdl FILE | --ipxact FILE] [--top NAME] [--bar N] [--backend B]

Names bound: ``dev`` (the device), ``bar0``... (its memory BARs), ``regs`` (the register
map, built-in or from the description, bound to its BAR), ``dma`` and ``irq`` (the device's
DMA and interrupt APIs, made on first use). In ``regs``, a register shows itself decoded,
its fields read and write by name, and tab completion lists both::

    >>> regs.status
    status = 0x00000000 (computing=0 irq_enable=0)
    >>> regs.status.irq_enable = 1          # read-modify-write through the access rules
    >>> regs.ident.major
    1

IPython is used when installed, else Python's own console (with readline completion).
When stdin is not a terminal the shell runs it as a script: each statement is executed as
typed at the prompt (expression values are printed), and the first exception ends the run
with exit status 1.
"""

from __future__ import annotations

import argparse
import code
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from udrv.core.regmap import BoundRegister, RegisterMap
from udrv.pci.sysfs import SYSFS_PCI, find


class Lazy:
    """An object made on first use (``dma``, ``irq``: setting them up has effects on the
    device, such as bus mastering or interrupt vectors)."""

    def __init__(self, what: str, make: Callable[[], Any]) -> None:
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_make", make)
        object.__setattr__(self, "_obj", None)

    def _get(self) -> Any:
        if self._obj is None:
            object.__setattr__(self, "_obj", self._make())
        return self._obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __dir__(self) -> list[str]:
        return dir(self._get())

    def __repr__(self) -> str:
        return repr(self._obj) if self._obj is not None else f"<{self._what}, made on first use>"


class ShellRegister:
    """A bound register for interactive use: fields as attributes, repr decoded."""

    def __init__(self, bound: BoundRegister) -> None:
        object.__setattr__(self, "bound", bound)

    def _field(self, name: str) -> str | None:
        fields = self.bound.reg.fields
        if name in fields:
            return name
        for n in fields:
            if n.lower() == name.lower():
                return n
        return None

    def __getattr__(self, name: str) -> Any:
        f = self._field(name)
        if f is not None:
            return self.bound.get(f)  # one read of the register
        return getattr(self.bound, name)

    def __setattr__(self, name: str, value: int) -> None:
        f = self._field(name)
        if f is None:
            raise AttributeError(f"register {self.bound.name} has no field {name!r}")
        reg = self.bound.reg
        if reg.field_access(reg.fields[f]) == "w1c":
            self.bound.w1c(**{f: value})
        elif reg.access in ("wo", "w1s"):
            self.bound.write_fields(**{f: value})
        else:
            self.bound.set(**{f: value})

    def __dir__(self) -> list[str]:
        return sorted({*dir(self.bound), *self.bound.reg.fields})

    def __repr__(self) -> str:
        if not self.bound.reg.readable:
            return f"<{self.bound.name}: write-only>"
        return self.bound.format()


class ShellRegs:
    """A bound :class:`RegisterMap` for interactive use: registers as :class:`ShellRegister`,
    names case-insensitive, repr a dump of the readable registers."""

    def __init__(self, regs: RegisterMap) -> None:
        object.__setattr__(self, "map", regs)

    def __getattr__(self, name: str) -> Any:
        regmap = type(self.map)
        for n in (*regmap.REGISTERS, *regmap.ARRAYS):
            if n.lower() == name.lower():
                attr = getattr(self.map, n)
                return ShellRegister(attr) if isinstance(attr, BoundRegister) else attr
        return getattr(self.map, name)

    def __setattr__(self, name: str, value: int) -> None:
        bound = self.__getattr__(name)
        if not isinstance(bound, ShellRegister):
            raise AttributeError(f"{type(self.map).__name__} has no register {name!r}")
        bound.bound.write(value)

    def __dir__(self) -> list[str]:
        regmap = type(self.map)
        return sorted({*regmap.REGISTERS, *regmap.ARRAYS, "dump", "lookup", "bind", "region"})

    def __repr__(self) -> str:
        return "\n".join(reg.format(value) for reg, value in self.map.dump())


def register(sub: Any) -> None:
    from udrv.cli.regs import add_backend_options, add_description_options

    p = sub.add_parser(
        "shell",
        help="interactive Python with a device open: dev, bar0.., regs, dma, irq",
        description="An interactive Python (IPython when installed) with the device open and "
        "dev, bar0.., regs (its register map: built-in, or --rdl/--ipxact), dma and irq "
        "bound. With stdin not a terminal, runs stdin as a script (exit 1 on an exception).",
    )
    p.add_argument("address", help="PCI address or vendor:device")
    add_description_options(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_shell)


def namespace(dev: Any, regs: RegisterMap | None) -> dict[str, Any]:
    """The names the shell binds for ``dev``."""

    def make_dma() -> Any:
        dma = dev.dma
        return dma() if callable(dma) and not hasattr(dma, "alloc") else dma

    ns: dict[str, Any] = {
        "dev": dev,
        "regs": ShellRegs(regs) if regs is not None else None,
        "dma": Lazy("the device's DMA API (dma.alloc(size))", make_dma),
        "irq": Lazy("the device's interrupts (irq.enable('msi'))", lambda: dev.irq),
    }
    from udrv.core.device import RegionKind

    for info in dev.bars:
        if info.kind != RegionKind.MEMORY:
            continue
        try:
            ns[f"bar{info.index}"] = dev.bar(info.index)
        except Exception:  # an unmappable BAR (I/O ports, a kernel that refuses): leave it out
            continue
    return ns


class ScriptConsole(code.InteractiveConsole):
    """Runs statements as the interactive prompt would, remembering the first failure."""

    failed = False

    def showtraceback(self) -> None:
        self.failed = True
        super().showtraceback()

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        self.failed = True
        super().showsyntaxerror(filename)

    def write(self, data: str) -> None:
        sys.stderr.write(data)


def run_script(ns: dict[str, Any], text: str) -> int:
    """Execute ``text`` line by line as at the prompt; 1 on the first exception, else 0."""
    console = ScriptConsole(ns, filename="<stdin>")
    for line in text.splitlines():
        console.push(line)
        if console.failed:
            return 1
    console.push("")  # end a trailing block
    return 1 if console.failed else 0


def interact(ns: dict[str, Any], banner: str) -> None:
    """IPython when installed, else the standard console with tab completion."""
    try:
        import IPython
    except ImportError:
        try:
            import readline
            import rlcompleter

            readline.set_completer(rlcompleter.Completer(ns).complete)
            readline.parse_and_bind("tab: complete")
        except ImportError:  # pragma: no cover - readline is in every Linux CPython
            pass
        code.interact(banner=banner, local=ns, exitmsg="")
        return
    IPython.start_ipython(argv=["--no-banner"], user_ns=ns, display_banner=False)


def cmd_shell(args: argparse.Namespace, root: Path = SYSFS_PCI) -> int:
    """Run `udrv shell` (``root``: the sysfs PCI devices directory; tests use a fake tree)."""
    import udrv
    from udrv.cli.regs import _backend, bind_map, description_map, known_device

    known = description_map(args)
    info = find(args.address, root)
    if known is None:  # None still: the shell gives dev and the BARs without a map
        known = known_device(info.vendor, info.device, info.class_code)
    backend = _backend(info, args.backend)
    writable = backend != "sysfs" or not info.driver or args.force
    if backend == "sysfs" and not writable:
        print(
            f"note: {info.address} is bound to {info.driver}: BARs are read-only "
            "(--force to write behind that driver)",
            file=sys.stderr,
        )
    with udrv.open(info.address, backend, writable=writable, root=root) as dev:
        regs = bind_map(known, dev.bar(known.bar)) if known is not None else None
        ns = namespace(dev, regs)
        if not sys.stdin.isatty():
            return run_script(ns, sys.stdin.read())
        what = f"regs: {known.name} on BAR{known.bar}" if known else "no register map"
        names = ", ".join(k for k in ns if k.startswith("bar"))
        banner = (
            f"udrv shell: {info.address} [{info.ids}] via {dev.backend}; {what}\n"
            f"names: dev, {names}, regs, dma, irq (try regs, regs.<TAB>)"
        )
        interact(ns, banner)
    return 0
