"""PCI addresses (``0000:00:04.0``) and device selectors (an address, or ``vendor:device``).

An address names one function: domain (16 bits), bus (8 bits), device/slot (5 bits) and
function (3 bits), printed the way the kernel names ``/sys/bus/pci/devices`` entries
(PCI Local Bus Spec 3.0 §3.2.2.3.2: bus/device/function of a configuration transaction;
the domain/segment is the PCI Firmware Spec's segment group).

A selector is what a user types to pick a device: an address (``00:04.0``; it always has a
``.function`` part) or a ``vendor:device`` id filter in hex (``1234:11e8``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from udrv.errors import AddressError

_ADDR = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<slot>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])"
)
_IDS = re.compile(r"(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})")
#: The accepted forms, quoted by every AddressError.
FORMS = "0000:00:04.0, 00:04.0, or a vendor:device id such as 1234:11e8"


@dataclass(frozen=True, order=True)
class PciAddress:
    """domain:bus:slot.function, printed as the kernel does: ``0000:00:04.0``.

    Attributes:
        domain: PCI segment (0-0xffff).
        bus: bus number (0-0xff).
        slot: device number on the bus (0-0x1f).
        function: function number (0-7).
    """

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.domain <= 0xFFFF and 0 <= self.bus <= 0xFF and 0 <= self.slot <= 0x1F
                and 0 <= self.function <= 7):  # fmt: skip
            raise AddressError(f"PCI address out of range: {self.domain:x}:{self.bus:x}:"
                               f"{self.slot:x}.{self.function:x} (slots are 00-1f, functions 0-7); "
                               f"use {FORMS}")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:00:04.0`` or ``00:04.0`` (domain 0).

        Raises:
            AddressError: naming the text and the accepted forms.
        """
        m = _ADDR.fullmatch(text.strip())
        if not m:
            raise AddressError(f"{text!r} is not a PCI address; use {FORMS}")
        slot = int(m["slot"], 16)
        if slot > 0x1F:  # the regex bounds every other field
            raise AddressError(f"{text.strip()!r} is not a PCI address: device {m['slot']} is out "
                               f"of range (devices are 00-1f, functions 0-7); use {FORMS}")  # fmt: skip
        return cls(int(m["domain"] or "0", 16), int(m["bus"], 16), slot, int(m["fn"]))

    @property
    def device(self) -> int:
        """The device number (the same as ``slot``; PCI specs call it "device")."""
        return self.slot

    @property
    def devfn(self) -> int:
        """Device and function packed as the kernel's ``devfn`` byte: ``slot << 3 | function``."""
        return self.slot << 3 | self.function

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"


def as_typed(text: str) -> str:
    """An address as the user typed it, followed by the kernel's spelling when that differs.

    For messages: ``0:0:1f.0`` gives ``"0:0:1f.0 (0000:00:1f.0)"``, ``0000:00:04.0`` gives itself,
    so the user finds what they typed and sees the name sysfs uses.

    Raises:
        AddressError: ``text`` is not an address.
    """
    typed, kernel = text.strip(), str(PciAddress.parse(text))
    return typed if typed == kernel else f"{typed} ({kernel})"


@dataclass(frozen=True)
class IdFilter:
    """A ``vendor:device`` selector: matches every function with these ids."""

    vendor: int
    device: int

    def matches(self, vendor: int, device: int) -> bool:
        """Whether a function with these vendor and device ids is selected."""
        return (vendor, device) == (self.vendor, self.device)

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


#: The name the design notes use for an id filter.
DeviceFilter = IdFilter

Selector = PciAddress | IdFilter


def parse_selector(text: str) -> Selector:
    """An address (it has a ``.function``) or a ``vendor:device`` id filter.

    Raises:
        AddressError: the text is neither; the message names it and the accepted forms.
    """
    text = text.strip()
    if "." in text:
        return PciAddress.parse(text)
    m = _IDS.fullmatch(text)
    if not m:
        raise AddressError(f"{text!r} is neither a PCI address nor a vendor:device id; use {FORMS}")
    return IdFilter(int(m["vendor"], 16), int(m["device"], 16))


#: A selector with this prefix names a device behind a vfio-user server's socket
#: (``vfio-user:/tmp/edu.sock``) rather than a PCI function of this machine.
VFIO_USER_PREFIX = "vfio-user:"


def vfio_user_path(selector: str) -> str | None:
    """The socket path of a ``vfio-user:PATH`` selector, or None for any other selector.

    Raises:
        AddressError: the prefix is there but the path is empty.
    """
    if not selector.startswith(VFIO_USER_PREFIX):
        return None
    path = selector[len(VFIO_USER_PREFIX) :]
    if not path:
        raise AddressError(
            f"{selector!r} names no socket; write vfio-user:PATH, e.g. vfio-user:/tmp/edu.sock"
        )
    return path
