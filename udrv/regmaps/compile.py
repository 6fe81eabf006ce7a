"""Compiling a register description with its own toolchain, errors made udrv errors.

SystemRDL goes through ``systemrdl-compiler`` (the Accellera SystemRDL 2.0 reference
implementation in Python); IP-XACT (IEEE 1685-2009/2014) through ``peakrdl-ipxact``'s
importer, which builds the same compiled model. udrv never parses either format itself.

The compiler reports problems through a message printer; udrv installs one that keeps
them, and turns them into one :class:`~udrv.errors.DescriptionError` that names the file,
the line and the compiler's cause (``edu.rdl:12:5: error: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udrv.errors import DescriptionError

#: The user-defined property that says which BAR an address block is in. A description
#: declares it (so that other SystemRDL tools accept the file too):
#: ``property udrv_bar { type = longint unsigned; component = addrmap; };``
BAR_PROPERTY = "udrv_bar"

_INSTALL = "install it with: pip install 'udrv[rdl]'"


@dataclass(frozen=True)
class Message:
    """One compiler message: where and why."""

    severity: str
    text: str
    path: str
    line: int | None
    column: int | None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.severity}: {self.text}"


def where(src_ref: Any, default_path: str) -> tuple[str, int | None, int | None]:
    """(path, line, column) of a compiler source reference (any may be unknown)."""
    if src_ref is None:
        return default_path, None, None
    path = str(getattr(src_ref, "path", None) or default_path)
    try:
        line: int | None = src_ref.line
        column: int | None = src_ref.line_selection[0] + 1
    except (AttributeError, TypeError, IndexError):
        line = column = None
    return path, line, column


def _compiler(path: Path) -> tuple[Any, list[Message]]:
    try:
        from systemrdl import RDLCompiler, component
        from systemrdl.messages import MessagePrinter
        from systemrdl.udp import UDPDefinition
    except ImportError:
        raise DescriptionError(
            f"{path}: reading register descriptions needs systemrdl-compiler; {_INSTALL}",
            path=str(path),
        ) from None

    messages: list[Message] = []

    class Keeper(MessagePrinter):
        def print_message(self, severity: Any, text: str, src_ref: Any) -> None:
            p, line, col = where(src_ref, str(path))
            messages.append(Message(severity.name.lower(), text, p, line, col))

    class UdrvBar(UDPDefinition):
        name = BAR_PROPERTY
        valid_components = {component.Addrmap}  # noqa: RUF012 (the compiler's spelling)
        valid_type = int

    rdlc = RDLCompiler(message_printer=Keeper())
    # Soft: known to the compiler (type-checked) when the file declares it, None otherwise.
    rdlc.register_udp(UdrvBar, soft=True)
    return rdlc, messages


def _fail(path: Path, what: str, messages: list[Message]) -> DescriptionError:
    errors = [m for m in messages if m.severity in ("error", "fatal")] or messages
    if not errors:
        return DescriptionError(f"{path}: {what} failed (the compiler gave no reason)")
    first = errors[0]
    text = "\n".join(str(m) for m in errors)
    return DescriptionError(text, path=first.path, line=first.line)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DescriptionError(f"{path}: no such register description file", path=str(path))


def compile_rdl(path: str | Path, top: str | None = None) -> Any:
    """Compile and elaborate a SystemRDL file.

    Args:
        path: the ``.rdl`` file.
        top: the addrmap type to elaborate (default: the last one the file defines).

    Returns:
        The compiler's ``RootNode``.

    Raises:
        DescriptionError: the file is missing, or the compiler rejects it (the message has
            file:line:column and the compiler's cause for every error).
    """
    from systemrdl.messages import RDLCompileError

    path = Path(path)
    _check_file(path)
    rdlc, messages = _compiler(path)
    try:
        rdlc.compile_file(str(path))
        return rdlc.elaborate(top_def_name=top)
    except RDLCompileError:
        raise _fail(path, "compiling", messages) from None


def compile_ipxact(path: str | Path, top: str | None = None) -> Any:
    """Import an IP-XACT component file and elaborate it.

    Args:
        path: the IP-XACT XML (2009 or 2014 schema).
        top: the addrmap to elaborate (default: the imported component's).

    Returns:
        The compiler's ``RootNode``.

    Raises:
        DescriptionError: the file is missing, peakrdl-ipxact is not installed, or the
            importer or compiler rejects it.
    """
    path = Path(path)
    _check_file(path)
    rdlc, messages = _compiler(path)
    from systemrdl.messages import RDLCompileError

    try:
        from peakrdl_ipxact import IPXACTImporter
    except ImportError:
        raise DescriptionError(
            f"{path}: reading IP-XACT needs peakrdl-ipxact; {_INSTALL}", path=str(path)
        ) from None
    try:
        IPXACTImporter(rdlc).import_file(str(path))
        return rdlc.elaborate(top_def_name=top)
    except RDLCompileError:
        raise _fail(path, "importing", messages) from None
    except Exception as exc:  # the XML parser's errors (ParseError carries the position)
        pos = getattr(exc, "position", None)
        line = pos[0] if pos else None
        at = f":{line}" if line is not None else ""
        raise DescriptionError(
            f"{path}{at}: error: not an IP-XACT file udrv can read: {exc}",
            path=str(path),
            line=line,
        ) from None
