"""Device SPECs for `udrv lab run --device SPEC` and their fixed guest PCI addresses.

A SPEC is ``NAME[:KEY=VALUE,...]``. NAME is a QEMU device model (``edu``, ``e1000``,
``e1000e``, ``nvme``, ``rtl8139``, ...). Keys the lab understands itself:

- ``size=256M``: block devices (nvme, virtio-blk-pci, ...) get a fresh sparse scratch image
  of that size (default 64M); ``file=PATH`` uses an existing raw image instead.
- ``hub=N``: NICs join QEMU hub N (default 0), so all NICs on one hub share a segment.
- ``slot=N``: pin the guest slot instead of taking the next free one.
- ``fn=N``: with ``slot=``, the PCI function (0-7) in that slot. Several devices share a slot
  as functions of one multi-function device: each needs its own ``fn``, one of them ``fn=0``
  (it gets QEMU's ``multifunction=on``). ``addr=SS.F`` (QEMU's own spelling, hex) is read as
  ``slot=0xSS,fn=F``, so the lab still knows where the device is.

Every other key is passed to QEMU's ``-device`` (``serial=``, ``mac=``, ``max_ioqpairs=``...).

Addresses: the control and results shares take 00:02.0 and 00:03.x; the Nth requested device
(counting from 0) is at ``0000:00:NN.0`` with NN = 4 + N, unless ``slot=``/``fn=`` say otherwise.
The functions of one slot sit on the q35 root bus without ACS between them, so the guest puts
them in one IOMMU group (verified: ``e1000:slot=5`` + ``e1000:slot=5,fn=1`` -> both in one
``/sys/kernel/iommu_groups/N``), which is what VFIO group-viability tests need.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from udrv.errors import LabError, LabSetupError

FIRST_SLOT = 4
LAST_SLOT = 0x1E  # 00:1f.x is the q35 ICH9 LPC/SATA/SMBus function
LAST_FN = 7  # PCI Local Bus 3.0, 6.2.1: eight functions per device
ADDR_RE = re.compile(r"^([0-9a-f]{1,2})(?:\.([0-7]))?$", re.IGNORECASE)
BLOCK_MODELS = {"nvme", "virtio-blk-pci", "virtio-blk", "megasas", "pvscsi"}
NIC_MODELS = {
    "e1000",
    "e1000e",
    "e1000-82544gc",
    "e1000-82545em",
    "rtl8139",
    "ne2k_pci",
    "virtio-net-pci",
    "virtio-net",
    "vmxnet3",
    "i82550",
    "i82551",
    "i82557a",
    "i82557b",
    "i82557c",
    "i82558a",
    "i82558b",
    "i82559a",
    "i82559b",
    "i82559c",
    "i82559er",
    "i82562",
    "i82801",
    "pcnet",
}
#: One line of `qemu-system-x86_64 -device help`:
#: ``name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"``.
HELP_RE = re.compile(r'^name "([^"]+)"(?:, bus ([^,]+))?(?:, alias "([^"]+)")?')
SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)


def _number(value: str, key: str, text: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise LabError(
            f"bad {key}={value} in device spec {text!r}: expected a number (5 or 0x5)"
        ) from None


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text)
    if not m:
        raise LabError(f"bad size {text!r}: use a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


@dataclass
class DeviceSpec:
    """One requested device: a QEMU model plus options."""

    model: str
    qemu_opts: dict[str, str] = field(default_factory=dict)
    size: int = 64 << 20
    file: Path | None = None
    hub: int = 0
    slot: int | None = None
    fn: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        model, _, rest = text.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", model):
            raise LabError(
                f"bad device spec {text!r}: expected NAME[:KEY=VALUE,...], e.g. nvme:size=256M"
            )
        spec = cls(model=model)
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise LabError(f"bad option {item!r} in device spec {text!r}: expected KEY=VALUE")
            if key == "size":
                spec.size = parse_size(value)
            elif key == "file":
                spec.file = Path(value).resolve()
            elif key == "hub":
                spec.hub = int(value)
            elif key == "slot":
                spec.slot = _number(value, "slot", text)
            elif key == "fn":
                spec.fn = _number(value, "fn", text)
            elif key == "addr":
                m = ADDR_RE.match(value)
                if not m:
                    raise LabError(
                        f"bad addr={value} in {text!r}: expected SLOT[.FN] in hex, e.g. addr=10.1"
                    )
                spec.slot, spec.fn = int(m.group(1), 16), int(m.group(2) or "0")
            else:
                spec.qemu_opts[key] = value
        if spec.slot is not None and not FIRST_SLOT <= spec.slot <= LAST_SLOT:
            raise LabError(
                f"slot {spec.slot:#x} in {text!r} is outside {FIRST_SLOT}..{LAST_SLOT} "
                f"({FIRST_SLOT:#x}..{LAST_SLOT:#x})"
            )
        if spec.fn is not None:
            if spec.slot is None:
                raise LabError(f"fn= in {text!r} needs slot=: e.g. {model}:slot=5,fn={spec.fn}")
            if not 0 <= spec.fn <= LAST_FN:
                raise LabError(f"fn={spec.fn} in {text!r} is outside 0..{LAST_FN}")
        return spec

    @property
    def is_block(self) -> bool:
        return self.model in BLOCK_MODELS

    @property
    def is_nic(self) -> bool:
        return self.model in NIC_MODELS


@dataclass
class PlacedDevice:
    """A device with its guest slot and the QEMU arguments that create it."""

    spec: DeviceSpec
    slot: int
    name: str  # unique per session: "edu", or "e1000.1" for the second e1000
    fn: int = 0
    multifunction: bool = False  # function 0 of a slot with more functions

    @property
    def address(self) -> str:
        return f"0000:00:{self.slot:02x}.{self.fn}"

    @property
    def ident(self) -> str:
        """QEMU id of the device's netdev/drive: ``udrv5``, ``udrv5f1`` for function 1."""
        return f"udrv{self.slot}" + (f"f{self.fn}" if self.fn else "")

    def qemu_args(self, scratch: Path) -> list[str]:
        s = self.spec
        ident = self.ident
        addr = f"{self.slot:02x}" + (f".{self.fn}" if self.fn else "")
        opts = {"addr": addr, **s.qemu_opts}
        if self.multifunction:
            opts.setdefault("multifunction", "on")
        args: list[str] = []
        if s.is_block:
            image = s.file
            if image is None:
                image = scratch / f"{self.name}.img"
                with open(image, "wb") as f:
                    f.truncate(s.size)
            args += ["-drive", f"file={image},if=none,id={ident},format=raw,cache=unsafe"]
            opts.setdefault("drive", ident)
            if s.model == "nvme":
                opts.setdefault(
                    "serial", f"UDRV{self.slot:04d}" + (f"F{self.fn}" if self.fn else "")
                )
        if s.is_nic:
            args += ["-netdev", f"hubport,id={ident},hubid={s.hub}"]
            opts.setdefault("netdev", ident)
            # Unique per slot and function: 52:54:00:12:34:SS for function 0, :35:SS for 1...
            opts.setdefault("mac", f"52:54:00:12:{0x34 + self.fn:02x}:{self.slot:02x}")
        args += ["-device", ",".join([s.model] + [f"{k}={v}" for k, v in opts.items()])]
        return args


def place(specs: list[DeviceSpec]) -> list[PlacedDevice]:
    """Give every device its fixed slot and function (see the module docstring).

    Raises:
        LabError: two devices want the same slot and function, a slot has functions but no
            function 0, or there are more devices than free slots.
    """
    pinned: dict[int, dict[int, DeviceSpec]] = {}
    for spec in specs:
        if spec.slot is None:
            continue
        fns = pinned.setdefault(spec.slot, {})
        fn = spec.fn or 0
        if fn in fns:
            other = fns[fn].model
            raise LabError(
                f"{other} and {spec.model} both ask for slot={spec.slot:#x} function {fn}: "
                f"devices may share a slot only as distinct functions (add fn=1, fn=2, ...)"
            )
        fns[fn] = spec
    for slot, fns in pinned.items():
        if 0 not in fns:
            first = min(fns)
            raise LabError(
                f"{fns[first].model} asks for slot={slot:#x},fn={first} but no device is "
                f"function 0 of that slot: add one with slot={slot:#x} (the guest finds a "
                f"slot's functions only through function 0)"
            )
    taken = set(pinned)
    placed: list[PlacedDevice] = []
    counts: dict[str, int] = {}
    for i, spec in enumerate(specs):
        slot = FIRST_SLOT + i if spec.slot is None else spec.slot
        if spec.slot is None:
            while slot in taken:
                slot += 1
        if slot > LAST_SLOT:
            raise LabError(f"too many devices: slot {slot:#x} is past the last free slot")
        taken.add(slot)
        n = counts.get(spec.model, 0)
        counts[spec.model] = n + 1
        fn = spec.fn or 0
        multi = fn == 0 and len(pinned.get(slot, {})) > 1
        name = spec.model if n == 0 else f"{spec.model}.{n}"
        placed.append(PlacedDevice(spec, slot, name, fn=fn, multifunction=multi))
    return placed


def devices_env(placed: list[PlacedDevice]) -> str:
    """The value of ``UDRV_LAB_DEVICES``: ``edu=0000:00:04.0,nvme=0000:00:05.0``."""
    return ",".join(f"{d.name}={d.address}" for d in placed)


# -- which models this QEMU has -------------------------------------------------------------


def parse_device_help(text: str) -> dict[str, str | None]:
    """Parse `qemu-system-x86_64 -device help` into ``{name or alias: bus}``.

    Args:
        text: the command's output (category headers and blank lines are skipped).

    Returns:
        Every model name and alias, mapped to its bus (``"PCI"``, ``"usb-bus"``, ...) or
        ``None`` for devices that sit on no bus (CPUs, ``nvme-subsys``).
    """
    models: dict[str, str | None] = {}
    for line in text.splitlines():
        m = HELP_RE.match(line.strip())
        if m:
            name, bus, alias = m.groups()
            models[name] = bus
            if alias:
                models[alias] = bus
    return models


def qemu_models(qemu: str, cache_dir: Path) -> dict[str, str | None]:
    """The device models ``qemu`` offers, asked once and cached in ``cache_dir``.

    The cache is keyed by the binary's path, size and mtime, so a QEMU upgrade asks again.

    Raises:
        LabSetupError: QEMU is missing or its ``-device help`` fails.
    """
    path = shutil.which(qemu)
    if path is None:
        raise LabSetupError(f"{qemu} is not installed; run `udrv lab setup`")
    st = os.stat(path)
    key = {"qemu": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = cache_dir / "qemu-device-models.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return dict(saved["models"])
    try:
        out = subprocess.run(
            [path, "-device", "help"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabSetupError(f"`{qemu} -device help` failed: {exc}; run `udrv lab setup`") from None
    models = parse_device_help(out)
    if not models:
        raise LabSetupError(f"`{qemu} -device help` listed no devices; run `udrv lab setup`")
    # A cache we cannot write only costs the next run 30 ms.
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "models": models}))
        tmp.replace(cache)
    return models


def check_models(specs: Iterable[DeviceSpec], models: dict[str, str | None]) -> None:
    """Refuse models QEMU does not have, or that are not PCI devices, before booting.

    Raises:
        LabError: naming the model, the closest names QEMU has and where to see them all.
    """
    for spec in specs:
        if spec.model not in models:
            close = difflib.get_close_matches(spec.model, models, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise LabError(
                f"QEMU has no device model {spec.model!r}: {hint}"
                f"`qemu-system-x86_64 -device help` lists them all"
            )
        bus = models[spec.model]
        if bus != "PCI":
            raise LabError(
                f"{spec.model!r} is not a PCI device (QEMU puts it on "
                f"{'bus ' + bus if bus else 'no bus'}); the lab places PCI devices only"
            )
