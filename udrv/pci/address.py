"""PCI addresses (``0000:00:04.0``) and device selectors (an address, or ``vendor:device``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from udrv.errors import AddressError

_ADDR = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<slot>[0-9a-fA-F]{1,2})"
    r"\.(?P<fn>[0-7])$"
)
_IDS = re.compile(r"^(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})$")
FORMS = "0000:00:04.0, 00:04.0, or a vendor:device id such as 1234:11e8"


@dataclass(frozen=True, order=True)
class PciAddress:
    """domain:bus:slot.function, printed as the kernel does: ``0000:00:04.0``."""

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        if not (
            0 <= self.domain <= 0xFFFF
            and 0 <= self.bus <= 0xFF
            and 0 <= self.slot <= 0x1F
            and 0 <= self.function <= 7
        ):
            raise AddressError(
                f"PCI address out of range: {self.domain:x}:{self.bus:x}:"
                f"{self.slot:x}.{self.function:x} (slots are 00-1f, functions 0-7); "
                f"use {FORMS}"
            )

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``0000:00:04.0`` or ``00:04.0`` (domain 0).

        Raises:
            AddressError: naming the text and the accepted forms.
        """
        m = _ADDR.match(text.strip())
        if not m:
            raise AddressError(f"{text!r} is not a PCI address; use {FORMS}")
        return cls(int(m["domain"] or "0", 16), int(m["bus"], 16), int(m["slot"], 16), int(m["fn"]))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"


@dataclass(frozen=True)
class IdFilter:
    """A ``vendor:device`` selector."""

    vendor: int
    device: int

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def parse_selector(text: str) -> PciAddress | IdFilter:
    """An address (it has a ``.function``) or a ``vendor:device`` id filter."""
    text = text.strip()
    if "." in text:
        return PciAddress.parse(text)
    m = _IDS.match(text)
    if not m:
        raise AddressError(f"{text!r} is neither a PCI address nor a vendor:device id; use {FORMS}")
    return IdFilter(int(m["vendor"], 16), int(m["device"], 16))
