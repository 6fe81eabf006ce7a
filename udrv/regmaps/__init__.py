"""Register maps from register descriptions: SystemRDL and IP-XACT.

A hardware team that describes its registers in SystemRDL or IP-XACT gets the same
:class:`~udrv.core.regmap.RegisterMap` classes as udrv's built-in drivers::

    from udrv.regmaps import load

    desc = load("mycard.rdl")               # or load("mycard.xml") for IP-XACT
    bar, Regs = desc.map_for()              # the map of the only BAR (or map_for(2))
    regs = Regs(dev.bar(bar))
    regs.status.decode()

The compilers are optional dependencies (``pip install 'udrv[rdl]'``): ``systemrdl-compiler``
and ``peakrdl-ipxact``. :mod:`.compile` runs them, :mod:`.convert` maps their model.
"""

from __future__ import annotations

from pathlib import Path

from udrv.regmaps.compile import BAR_PROPERTY, compile_ipxact, compile_rdl
from udrv.regmaps.convert import Description, to_maps

__all__ = ["BAR_PROPERTY", "Description", "load", "load_ipxact", "load_rdl"]


def load_rdl(path: str | Path, *, top: str | None = None, bar: int | None = None) -> Description:
    """The register maps of a SystemRDL file.

    Args:
        path: the ``.rdl`` file.
        top: the addrmap type to elaborate (default: the last one defined).
        bar: the BAR of a description without ``udrv_bar`` properties (default 0).

    Raises:
        DescriptionError: the compiler rejects the file, or udrv cannot map a construct;
            the message names the file and line.
    """
    return to_maps(compile_rdl(path, top), path, bar)


def load_ipxact(path: str | Path, *, top: str | None = None, bar: int | None = None) -> Description:
    """The register maps of an IP-XACT component (2009 or 2014 schema).

    Args, Raises: as :func:`load_rdl`.
    """
    return to_maps(compile_ipxact(path, top), path, bar)


def load(path: str | Path, *, top: str | None = None, bar: int | None = None) -> Description:
    """:func:`load_ipxact` for ``.xml``/``.ipxact`` files, :func:`load_rdl` otherwise."""
    if Path(path).suffix.lower() in (".xml", ".ipxact"):
        return load_ipxact(path, top=top, bar=bar)
    return load_rdl(path, top=top, bar=bar)
