"""Device SPECs for `udrv lab run --device SPEC` and their fixed guest PCI addresses.

A SPEC is ``NAME[:KEY=VALUE,...]``. NAME is a QEMU device model (``edu``, ``e1000``,
``e1000e``, ``nvme``, ``rtl8139``, ...). Keys the lab understands itself:

- ``size=256M``: block devices (nvme, virtio-blk-pci, ...) get a fresh sparse scratch image
  of that size (default 64M); ``file=PATH`` uses an existing raw image instead.
- ``hub=N``: NICs join QEMU hub N (default 0), so all NICs on one hub share a segment.
- ``slot=N``: pin the guest slot instead of taking the next free one.

Every other key is passed to QEMU's ``-device`` (``serial=``, ``mac=``, ``max_ioqpairs=``...).

Addresses: the control and results shares take 00:02.0 and 00:03.0; the Nth requested device
(counting from 0) is at ``0000:00:NN.0`` with NN = 4 + N, unless ``slot=`` says otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from udrv.errors import LabError

FIRST_SLOT = 4
LAST_SLOT = 0x1E  # 00:1f.x is the q35 ICH9 LPC/SATA/SMBus function
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
SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)


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
                spec.slot = int(value, 0)
                if not FIRST_SLOT <= spec.slot <= LAST_SLOT:
                    raise LabError(f"slot {value} in {text!r} is outside {FIRST_SLOT}..{LAST_SLOT}")
            else:
                spec.qemu_opts[key] = value
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

    @property
    def address(self) -> str:
        return f"0000:00:{self.slot:02x}.0"

    def qemu_args(self, scratch: Path) -> list[str]:
        s = self.spec
        ident = f"udrv{self.slot}"
        opts = {"addr": f"{self.slot:#04x}".replace("0x", ""), **s.qemu_opts}
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
                opts.setdefault("serial", f"UDRV{self.slot:04d}")
        if s.is_nic:
            args += ["-netdev", f"hubport,id={ident},hubid={s.hub}"]
            opts.setdefault("netdev", ident)
            opts.setdefault("mac", f"52:54:00:12:34:{self.slot:02x}")
        args += ["-device", ",".join([s.model] + [f"{k}={v}" for k, v in opts.items()])]
        return args


def place(specs: list[DeviceSpec]) -> list[PlacedDevice]:
    """Give every device its fixed slot (see the module docstring)."""
    taken = {s.slot for s in specs if s.slot is not None}
    if len(taken) != sum(s.slot is not None for s in specs):
        raise LabError("two devices ask for the same slot=")
    placed, counts, nxt = [], dict[str, int](), FIRST_SLOT
    for i, spec in enumerate(specs):
        slot = spec.slot
        if slot is None:
            slot = FIRST_SLOT + i
            while slot in taken:
                slot += 1
            nxt = max(nxt, slot)
        if slot > LAST_SLOT:
            raise LabError(f"too many devices: slot {slot:#x} is past the last free slot")
        taken.add(slot)
        n = counts.get(spec.model, 0)
        counts[spec.model] = n + 1
        placed.append(PlacedDevice(spec, slot, spec.model if n == 0 else f"{spec.model}.{n}"))
    return placed


def devices_env(placed: list[PlacedDevice]) -> str:
    """The value of ``UDRV_LAB_DEVICES``: ``edu=0000:00:04.0,nvme=0000:00:05.0``."""
    return ",".join(f"{d.name}={d.address}" for d in placed)
