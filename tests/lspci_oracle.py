"""Compare udrv's decoding of a device with `lspci -vvv` output (the oracle)."""

from __future__ import annotations

import re

from udrv.pci.config import Command, ConfigSpace


def parse_lspci(text: str) -> dict[str, object]:
    caps = [
        (int(m[1], 16), m[2].strip())
        for m in re.finditer(r"Capabilities: \[([0-9a-f]+)(?: v\d)?\] ([^\n]+)", text)
    ]
    regions = []
    for m in re.finditer(
        r"Region (\d): (Memory|I/O ports) at ([0-9a-f]+)(?: \((\d+)-bit, (non-)?prefetchable\))?",
        text,
    ):
        regions.append(
            (
                int(m[1]),
                m[2] == "I/O ports",
                int(m[3], 16),
                m[4] == "64",
                m[2] == "Memory" and not m[5],
            )
        )
    out: dict[str, object] = {"caps": caps, "regions": regions}
    if m := re.search(r"MSI: Enable([+-]) Count=(\d+)/(\d+) Maskable([+-]) 64bit([+-])", text):
        out["msi"] = (m[1] == "+", int(m[3]), m[4] == "+", m[5] == "+")
    if m := re.search(r"MSI-X: Enable([+-]) Count=(\d+)", text):
        t = re.search(r"Vector table: BAR=(\d) offset=([0-9a-f]+)", text)
        p = re.search(r"PBA: BAR=(\d) offset=([0-9a-f]+)", text)
        assert t and p
        out["msix"] = (m[1] == "+", int(m[2]), int(t[1]), int(t[2], 16), int(p[1]), int(p[2], 16))
    if m := re.search(r"Subsystem: .*", text):
        out["has_subsystem"] = True
    return out


def compare(cs: ConfigSpace, lspci: str) -> None:
    """Assert that our decoding agrees with lspci on ids, BARs, capabilities, MSI and MSI-X."""
    first = lspci.splitlines()[0]
    want = parse_lspci(lspci)
    ours_caps = [(c.offset, c.name) for c in cs.capabilities]
    assert [o for o, _ in ours_caps] == [o for o, _ in want["caps"]], (ours_caps, want["caps"])  # type: ignore[index]
    regions = [
        (b.index, b.io, b.address, b.is_64bit, (not b.io) and b.prefetchable) for b in cs.bars
    ]
    assert regions == want["regions"], (regions, want["regions"])
    msi = cs.cap("MSI")
    if "msi" in want:
        assert msi is not None
        f = msi.fields
        assert (
            f["enabled"],
            f["multiple_message_capable"],
            f["per_vector_masking"],
            f["is_64bit"],
        ) == want["msi"]
    msix = cs.cap("MSI-X")
    if "msix" in want:
        assert msix is not None
        f = msix.fields
        assert (
            f["enabled"],
            f["table_size"],
            f["table_bar"],
            f["table_offset"],
            f["pba_bar"],
            f["pba_offset"],
        ) == want["msix"]
    # The device line: revision and programming interface as lspci prints them (absent = 0).
    rev = re.search(r"\(rev ([0-9a-f]+)\)", first)
    assert cs.revision == (int(rev[1], 16) if rev else 0), (first, cs.revision)
    prog_if = re.search(r"\(prog-if ([0-9a-f]+)", first)
    assert cs.header.prog_if == (int(prog_if[1], 16) if prog_if else 0), (first, cs.header.prog_if)
    bus_master = re.search(r"BusMaster([+-])", lspci)
    assert bus_master and bool(cs.command & Command.BUS_MASTER) == (bus_master[1] == "+")
