"""Identify data structures decoded: what a controller and a namespace can do.

Byte offsets are those of NVM Express Base Specification 2.0, §5.17.2.1 figure 275
("Identify Controller Data Structure") and NVM Command Set Specification 1.0, §4.1.5.1
figure 97 ("Identify Namespace Data Structure"). The driver advertises a block feature only
when these say the controller has it, as Linux does (``nvme_update_disk_info``,
``nvme_config_discard``), and refuses namespaces whose blocks it would transfer wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

# Identify Controller.
ONCS_WRITE_ZEROES_BIT = 3  # ONCS bit 3: Write Zeroes supported
ONCS_DSM_BIT = 2  # ONCS bit 2: Dataset Management supported
VWC_PRESENT = 1 << 0  # VWC bit 0: a volatile write cache is present


def _text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip()


def _u(d: bytes, start: int, size: int) -> int:
    return int.from_bytes(d[start : start + size], "little")


@dataclass(frozen=True)
class Controller:
    """Identify Controller, the fields the driver uses."""

    vid: int  # bytes 1:0
    serial: str  # SN, 23:4
    model: str  # MN, 63:24
    firmware: str  # FR, 71:64
    mdts: int  # MDTS (byte 77) as bytes: 2**MDTS minimum pages; 0 = no limit
    version: int  # VER, 83:80 (0 before NVMe 1.2: read the VS register instead)
    rtd3e: int  # RTD3 entry latency, 91:88, microseconds (0: not reported)
    namespaces: int  # NN, 519:516
    oncs: int  # optional NVM command support, 521:520
    vwc: int  # volatile write cache, byte 525

    @property
    def discard(self) -> bool:
        """Dataset Management (deallocate) is supported (ONCS bit 2)."""
        return bool(self.oncs >> ONCS_DSM_BIT & 1)

    @property
    def write_zeroes(self) -> bool:
        """Write Zeroes is supported (ONCS bit 3)."""
        return bool(self.oncs >> ONCS_WRITE_ZEROES_BIT & 1)

    @property
    def volatile_cache(self) -> bool:
        """A volatile write cache is present, so writes need Flush to be durable (VWC bit 0)."""
        return bool(self.vwc & VWC_PRESENT)


def parse_controller(d: bytes, mps_min: int) -> Controller:
    """Decode a 4096-byte Identify Controller structure; ``mps_min``: CAP.MPSMIN in bytes."""
    if len(d) < 4096:
        raise ValueError(f"Identify Controller data is 4096 bytes, got {len(d)}")
    mdts = d[77]
    return Controller(
        vid=_u(d, 0, 2), serial=_text(d[4:24]), model=_text(d[24:64]), firmware=_text(d[64:72]),
        mdts=(1 << mdts) * mps_min if mdts else 0, version=_u(d, 80, 4), rtd3e=_u(d, 88, 4),
        namespaces=_u(d, 516, 4), oncs=_u(d, 520, 2), vwc=d[525],
    )  # fmt: skip


@dataclass(frozen=True)
class LbaFormat:
    """LBA Format Data Structure (NVM Command Set figure 98): one dword."""

    ms: int  # metadata bytes per block, bits 15:0
    lbads: int  # block size 2**LBADS, bits 23:16 (0: format not available)
    rp: int  # relative performance, bits 25:24


@dataclass(frozen=True)
class Namespace:
    """Identify Namespace, the fields the driver uses."""

    nsid: int
    blocks: int  # NSZE, bytes 7:0
    capacity: int  # NCAP, bytes 15:8
    flbas: int  # formatted LBA size, byte 26
    dps: int  # end-to-end data protection type settings, byte 29
    formats: tuple[LbaFormat, ...]  # LBAF0.., from byte 128, NLBAF (byte 25) + 1 of them

    @property
    def format_index(self) -> int:
        """The LBA format in use: FLBAS bits 3:0, and bits 6:5 as the upper bits when there
        are more than 16 formats (NVM Command Set figure 97)."""
        low = self.flbas & 0xF
        return low | ((self.flbas >> 5) & 3) << 4 if len(self.formats) > 16 else low

    @property
    def format(self) -> LbaFormat:
        i = self.format_index
        return self.formats[i] if i < len(self.formats) else LbaFormat(0, 0, 0)

    @property
    def block_size(self) -> int:
        return 1 << self.format.lbads

    @property
    def extended(self) -> bool:
        """Metadata is transferred at the end of each block's data (FLBAS bit 4)."""
        return bool(self.flbas & 0x10)

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    def unsupported(self) -> str | None:
        """Why the driver cannot serve this namespace, or None.

        udrv moves plain blocks: metadata (separate or extended) would change the transfer
        length or need a metadata pointer, and protection information needs PRACT/PRCHK
        settings per command; Linux likewise refuses I/O to such namespaces unless it can
        set them up. The message names a format that would work, if the namespace has one.
        """
        f = self.format
        if f.lbads < 9:
            return f"its LBA format {self.format_index} has no valid block size (LBADS {f.lbads})"
        what = []
        if f.ms:
            what.append(f"{f.ms} bytes of {'extended ' if self.extended else ''}metadata per block")
        if self.dps & 0x7:
            what.append(f"protection information type {self.dps & 0x7} (DPS)")
        if not what:
            return None
        plain = [i for i, g in enumerate(self.formats) if g.ms == 0 and g.lbads >= 9]
        hint = (
            f"; reformat it with a format without metadata or protection, e.g. "
            f"`nvme format --lbaf={plain[0]} --pi=0` (LBAF {plain[0]}: {1 << self.formats[plain[0]].lbads}-byte blocks)"
            if plain
            else "; the namespace offers no LBA format without metadata"
        )
        return f"it is formatted with {' and '.join(what)}, which udrv does not transfer{hint}"


def parse_namespace(nsid: int, d: bytes) -> Namespace:
    """Decode a 4096-byte Identify Namespace structure."""
    if len(d) < 4096:
        raise ValueError(f"Identify Namespace data is 4096 bytes, got {len(d)}")
    nlbaf = d[25] + 1
    formats = []
    for i in range(min(nlbaf, 64)):
        dw = _u(d, 128 + 4 * i, 4)
        formats.append(LbaFormat(ms=dw & 0xFFFF, lbads=(dw >> 16) & 0xFF, rp=(dw >> 24) & 3))
    return Namespace(nsid=nsid, blocks=_u(d, 0, 8), capacity=_u(d, 8, 8), flbas=d[26], dps=d[29],
                     formats=tuple(formats))  # fmt: skip
