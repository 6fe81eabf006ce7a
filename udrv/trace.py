"""Tracing a driver in-process: register accesses, DMA and interrupts, with timestamps.

Off by default, and then nothing in udrv changes: no flag is tested on any access path.
Tracing is switched on for a whole process, before any device is opened, by

- ``UDRV_TRACE=FILE`` in the environment when ``udrv`` is imported, or
- ``udrv trace -o FILE -- COMMAND ARGS...``, which runs the command with that variable, or
- :func:`enable` from Python (tests).

Enabling replaces the exact-width methods of every :class:`~udrv.core.region.Region` class
(``read8``...``write64``, ``read_width``, ``write_width``) and the DMA and interrupt entry
points with wrappers that time the call and keep one event. Drivers look their accessors up
when they bind (``BoundRegister`` keeps ``region.read32``), so they pick up the wrappers as
long as tracing starts first. A nested call (``read32`` -> ``read_width``) is one event.

At exit (or :meth:`Tracer.save`) the events are written in the Chrome trace-event format
(``{"traceEvents": [...]}``, ``ph`` ``"X"`` complete events and ``"i"`` instants, ``ts`` and
``dur`` in microseconds) that Perfetto (ui.perfetto.dev) and chrome://tracing open. Register
accesses are named from the register map the driver bound to that region, or else from
udrv's built-in map of the device (edu, 8254x, NVMe): ``write FACTORIAL``.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from udrv.core.region import Region
from udrv.core.regmap import Register, RegisterMap

ENV = "UDRV_TRACE"
_REGION_METHODS = (
    *(f"read{n}" for n in (8, 16, 32, 64)),
    *(f"write{n}" for n in (8, 16, 32, 64)),
    "read_width",
    "write_width",
)
#: (module, class, method, category) of the DMA and interrupt entry points. Missing ones
#: are skipped: the device-contract layout (udrv.core.dma.Dma, udrv.core.interrupts) and
#: the older one (per-backend classes in udrv.dma, udrv.irq.Interrupts) are both listed, and
#: a call that goes through both is one event.
_API_METHODS = (
    ("udrv.core.dma", "Dma", "alloc", "dma"),
    ("udrv.core.dma", "Dma", "map", "dma"),
    ("udrv.core.dma", "Dma", "map_sg", "dma"),
    ("udrv.core.interrupts", "Interrupts", "enable", "irq"),
    ("udrv.core.interrupts", "Interrupts", "disable", "irq"),
    ("udrv.dma.vfio", "VfioDma", "alloc", "dma"),
    ("udrv.dma.vfio", "VfioDma", "map", "dma"),
    ("udrv.dma.vfio", "VfioDma", "map_sg", "dma"),
    ("udrv.dma.hugepage", "HugepageDma", "alloc", "dma"),
    ("udrv.dma.hugepage", "HugepageDma", "map", "dma"),
    ("udrv.dma.hugepage", "HugepageDma", "map_sg", "dma"),
    ("udrv.dma.buffer", "Mapping", "unmap", "dma"),
    ("udrv.dma.sg", "SgList", "unmap", "dma"),
    ("udrv.irq", "Interrupts", "enable", "irq"),
    ("udrv.irq", "Interrupts", "disable", "irq"),
    ("udrv.irq.vector", "Vector", "wait", "irq"),
)
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


class Tracer:
    """The events of one process, kept raw while it runs and formatted when saved.

    Args:
        path: where :meth:`save` writes (``None``: only :meth:`events`).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.start = time.perf_counter_ns()
        self.pid = os.getpid()
        # (category, name, t0 ns, t1 ns, thread, args); region events keep the Region itself
        # in args (naming happens at save time, off the measured path).
        self.raw: list[tuple[str, str, int, int, int, Any]] = []
        self.maps: dict[int, tuple[type[RegisterMap], int]] = {}
        self._local = threading.local()

    # -- recording ------------------------------------------------------------------------

    def _busy(self) -> bool:
        return getattr(self._local, "busy", False)

    def region_method(self, fn: Callable[..., Any], op: str) -> Callable[..., Any]:
        """``fn`` (a Region method) recording one ``mmio`` event per outermost call."""
        write = op.startswith("write")
        width = None if op.endswith("_width") else int(op[4 + write :]) // 8
        raw, local = self.raw, self._local

        names = ("offset", "width", "value") if width is None else ("offset", "value")

        @functools.wraps(fn)
        def traced(region: Region, *args: int, **kwargs: int) -> Any:
            if getattr(local, "busy", False):
                return fn(region, *args, **kwargs)
            local.busy = True
            t0 = time.perf_counter_ns()
            try:
                result = fn(region, *args, **kwargs)
            finally:
                local.busy = False
            t1 = time.perf_counter_ns()
            given = dict(zip(names, args, strict=False)) | kwargs
            w = width if width is not None else given["width"]
            value = given["value"] if write else result
            raw.append(
                ("mmio", "write" if write else "read", t0, t1, threading.get_native_id(),
                 (region, given["offset"], w, value))
            )  # fmt: skip
            return result

        return traced

    def api_method(self, fn: Callable[..., Any], name: str, cat: str) -> Callable[..., Any]:
        """``fn`` (a DMA or interrupt method) recording one event with its arguments."""
        raw, local = self.raw, self._local

        @functools.wraps(fn)
        def traced(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(local, "busy", False):
                return fn(obj, *args, **kwargs)
            local.busy = True
            t0 = time.perf_counter_ns()
            try:
                result = fn(obj, *args, **kwargs)
            finally:
                local.busy = False
            t1 = time.perf_counter_ns()
            raw.append((cat, name, t0, t1, threading.get_native_id(), (obj, args, kwargs, result)))
            return result

        return traced

    def bound(self, regs: RegisterMap) -> None:
        """Note that ``regs`` is bound to its region (names that region's accesses)."""
        self.maps[id(regs.region)] = (type(regs), regs.base)

    # -- formatting -----------------------------------------------------------------------

    def _map_of(
        self, region: Region, cache: dict[int, Any]
    ) -> tuple[type[RegisterMap], int] | None:
        key = id(region)
        if key in self.maps:
            return self.maps[key]
        if key not in cache:
            cache[key] = _builtin_map(region)
        found: tuple[type[RegisterMap], int] | None = cache[key]
        return found

    def events(self) -> list[dict[str, Any]]:
        """The trace events so far (Chrome trace-event format), in time order."""
        out: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
             "args": {"name": f"udrv {self.pid}"}}
        ]  # fmt: skip
        cache: dict[int, Any] = {}
        names = WindowNames()
        for cat, name, t0, t1, tid, args in sorted(self.raw, key=lambda e: e[2]):
            event: dict[str, Any] = {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": (t0 - self.start) / 1000,
                "dur": (t1 - t0) / 1000,
                "pid": self.pid,
                "tid": tid,
            }
            if cat == "mmio":
                event["name"], event["args"] = self._mmio(name, args, cache, names)
                if "config space" in event["args"]["region"]:
                    event["cat"] = "config"
            else:
                event["name"], event["args"] = _api(name, args)
            out.append(event)
            if name == "wait" and args[3]:  # the interrupt arrived: an instant at its return
                out.append(
                    {"name": "interrupt", "cat": "irq", "ph": "i", "s": "t",
                     "ts": (t1 - self.start) / 1000, "pid": self.pid, "tid": tid,
                     "args": {"vector": getattr(args[0], "name", "?"), "count": args[3]}}
                )  # fmt: skip
        return out

    def _mmio(
        self, op: str, args: Any, cache: dict[int, Any], names: WindowNames
    ) -> tuple[str, dict[str, Any]]:
        region, offset, width, value = args
        info: dict[str, Any] = {
            "region": region.name,
            "offset": f"{offset:#x}",
            "width": width,
            "value": f"{value:#0{2 + 2 * width}x}",
        }
        target = f"{offset:#x}"
        found = self._map_of(region, cache)
        if found is not None:
            regmap, base = found
            named = names.name(id(region), regmap, offset - base, op == "write", value, info)
            target = named or target
        return f"{op} {target}", info

    def save(self, path: str | Path | None = None) -> Path:
        """Write the events as ``{"traceEvents": [...]}``; returns the path.

        Raises:
            ValueError: no path given here or at construction.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("Tracer.save: give a path")
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ns"}))
        tmp.replace(target)
        return target


def register_at(regmap: type[RegisterMap], offset: int) -> Register | None:
    """The register of ``regmap`` that covers byte ``offset``, array elements included
    (``MTA(3)``, at the array's declared layout), or ``None``."""
    reg = regmap.at(offset)
    if reg is not None:
        return reg
    for array in regmap.ARRAYS.values():
        rel = offset - array.base
        if rel < 0 or rel % array.stride >= array.width:
            continue
        index = rel // array.stride
        if array.count is None or index < array.count:
            return array(index)
    return None


def name_access(
    regmap: type[RegisterMap], offset: int, value: int, info: dict[str, Any]
) -> str | None:
    """Name the access at ``offset`` (from the map's start) with ``value`` from ``regmap``.

    Adds ``register`` (and ``decoded``, when the access covers the whole register and it
    has fields) to ``info``, the event's arguments.

    Returns:
        The register's name (``STATUS``, ``RAL(0)``, ``CAP+4`` for a partial access), or
        ``None`` when no register covers ``offset``.
    """
    reg = register_at(regmap, offset)
    if reg is None:
        return None
    delta = offset - reg.offset
    target = reg.name if not delta else f"{reg.name}+{delta}"
    info["register"] = target
    if not delta and reg.fields:
        info["decoded"] = reg.format(value)
    return target


class WindowNames:
    """Names accesses in time order, following address/data windows.

    A map with a ``WINDOW = (ADDRESS, DATA, TARGET)`` class attribute (the 8254x's I/O BAR,
    :class:`~udrv.drivers.e1000.regs.E1000IoRegs`) is a window: a write to its ADDRESS
    register selects a register of TARGET by offset, and DATA accesses reach that register;
    they are named after it, with ``via`` set to DATA.
    """

    def __init__(self) -> None:
        self.selected: dict[Any, int] = {}  # window (a key per region) -> selected offset

    def name(
        self,
        key: Any,
        regmap: type[RegisterMap],
        offset: int,
        write: bool,
        value: int,
        info: dict[str, Any],
    ) -> str | None:
        """:func:`name_access` for the access at ``offset`` of the region ``key``."""
        window = getattr(regmap, "WINDOW", None)
        if window is None:
            return name_access(regmap, offset, value, info)
        address, data, target = window
        if offset == regmap.REGISTERS[data].offset and key in self.selected:
            selected = self.selected[key]
            info["via"] = data
            return name_access(target, selected, value, info) or f"{selected:#x}"
        name = name_access(regmap, offset, value, info)
        if write and offset == regmap.REGISTERS[address].offset:
            self.selected[key] = value
            reg = register_at(target, value)
            if reg is not None:
                info["selects"] = reg.name
        return name


def _api(name: str, args: Any) -> tuple[str, dict[str, Any]]:
    obj, pargs, kwargs, result = args
    info: dict[str, Any] = {}
    if name in ("alloc", "map", "map_sg"):
        size = pargs[0] if pargs else kwargs.get("size", kwargs.get("buffer"))
        if isinstance(size, int):
            info["size"] = size
        elif size is not None:
            info["size"] = len(memoryview(size).cast("B")) if name == "map" else str(size)
        iova = getattr(result, "iova", None)
        if iova is not None:
            info["iova"] = f"{iova:#x}"
        return f"dma {name}", info
    if name == "unmap":
        iova = getattr(obj, "iova", None)
        if iova is not None:
            info["iova"] = f"{iova:#x}"
            info["size"] = getattr(obj, "length", None)
        return "dma unmap", info
    if name == "wait":
        info = {"vector": getattr(obj, "name", "?"), "count": result}
        if pargs or kwargs:
            info["timeout"] = pargs[0] if pargs else kwargs.get("timeout")
        return "irq wait", info
    # Interrupts.enable/disable
    if pargs:
        info["kind"] = pargs[0]
    info.update({k: v for k, v in kwargs.items() if isinstance(v, (int, str))})
    if isinstance(result, list):
        info["vectors"] = [getattr(v, "name", "?") for v in result]
    return f"irq {name}", info


def _builtin_map(region: Region) -> tuple[type[RegisterMap], int] | None:
    """udrv's built-in map for a BAR of a known device (by the address in its name)."""
    m = _PCI_ADDRESS.search(region.name)
    if m is None or region.index is None or "config" in region.name:
        return None
    try:
        from udrv.cli.regs import known_device
        from udrv.pci.sysfs import find

        info = find(m.group(0))
        known = known_device(info.vendor, info.device, info.class_code)
    except Exception:  # naming is best effort: an unnamed access keeps its offset
        return None
    if known is None:
        return None
    if known.bar == region.index:
        return known.regmap, 0
    from udrv.drivers.e1000.regs import E1000IoRegs, E1000Regs

    if known.regmap is E1000Regs and any(b.index == region.index and b.is_io for b in info.bars):
        return E1000IoRegs, 0  # the I/O BAR: a window onto BAR0 (SDM 13.3)
    return None


# -- switching it on ----------------------------------------------------------------------

_tracer: Tracer | None = None
#: (owner, attribute, what it was before, or _ABSENT) for disable().
_patched: list[tuple[type, str, Any]] = []
_ABSENT = object()


def active() -> Tracer | None:
    """The process's tracer, or ``None`` when tracing is off."""
    return _tracer


def _region_classes() -> Iterator[type]:
    todo: list[type] = [Region]
    while todo:
        cls = todo.pop()
        yield cls
        todo.extend(cls.__subclasses__())


def _patch(owner: type, name: str, value: Any) -> None:
    _patched.append((owner, name, owner.__dict__.get(name, _ABSENT)))
    setattr(owner, name, value)


def _patch_region_class(tracer: Tracer, cls: type) -> None:
    for op in _REGION_METHODS:
        fn = cls.__dict__.get(op)
        if fn is not None:
            _patch(cls, op, tracer.region_method(fn, op))


def enable(path: str | Path | None = None, *, at_exit: bool = False) -> Tracer:
    """Start tracing this process (idempotent: returns the running tracer).

    Args:
        path: the file :meth:`Tracer.save` writes.
        at_exit: save when the process exits.

    Returns:
        The tracer.
    """
    global _tracer
    if _tracer is not None:
        return _tracer
    tracer = Tracer(path)
    for cls in _region_classes():
        _patch_region_class(tracer, cls)

    # Region classes defined later (backends imported after this) are patched as they are
    # made.
    def init_subclass(cls: type, **kwargs: Any) -> None:
        _patch_region_class(tracer, cls)

    _patch(Region, "__init_subclass__", classmethod(init_subclass))
    for module, cls_name, method, cat in _API_METHODS:
        try:
            owner = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        fn = owner.__dict__.get(method)
        if fn is not None:
            _patch(owner, method, tracer.api_method(fn, method, cat))
    original_init = RegisterMap.__init__

    @functools.wraps(original_init)
    def init(self: RegisterMap, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        tracer.bound(self)

    _patch(RegisterMap, "__init__", init)
    _tracer = tracer
    if at_exit:
        atexit.register(tracer.save)
    return tracer


def disable() -> Tracer | None:
    """Stop tracing: every method is the original again. Returns the tracer (its events
    stay), or ``None`` when tracing was off."""
    global _tracer
    tracer, _tracer = _tracer, None
    while _patched:
        owner, name, before = _patched.pop()
        if before is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, before)
    return tracer


def enable_from_env() -> Tracer | None:
    """Enable tracing to ``$UDRV_TRACE`` when it is set (called when udrv is imported).

    The variable is removed from the environment, so that processes this one starts do not
    write the same file.
    """
    path = os.environ.pop(ENV, "")
    if not path:
        return None
    return enable(path, at_exit=True)
