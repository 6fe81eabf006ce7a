"""udrv.kernel.tun against linux/if_tun.h and linux/virtio_net.h: ioctl numbers, flags and
the virtio_net_hdr layout, compiled with gcc from the installed uapi headers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from udrv.frontends.tap import parse_vnet_hdr
from udrv.kernel import tun as T
from udrv.net import TxOffload

KNOWN = {  # computed by hand from _IOW/_IOR('T', nr, 4): direction, size 4, 'T' = 0x54
    "TUNSETIFF": (T.TUNSETIFF, 0x400454CA),
    "TUNSETOFFLOAD": (T.TUNSETOFFLOAD, 0x400454D0),
    "TUNGETVNETHDRSZ": (T.TUNGETVNETHDRSZ, 0x800454D7),
    "TUNSETCARRIER": (T.TUNSETCARRIER, 0x400454E2),
}
CONSTANTS = [
    "IFF_TAP", "IFF_NO_PI", "IFF_VNET_HDR", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6",
    "TUN_F_TSO_ECN", "TUN_F_UFO", "VIRTIO_NET_HDR_F_NEEDS_CSUM", "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_GSO_NONE", "VIRTIO_NET_HDR_GSO_TCPV4", "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_GSO_TCPV6", "VIRTIO_NET_HDR_GSO_ECN",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_ioctl_numbers(name: str) -> None:
    ours, known = KNOWN[name]
    assert ours == known


@pytest.fixture(scope="module")
def from_headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    if not shutil.which("gcc") or not Path("/usr/include/linux/virtio_net.h").exists():
        pytest.skip(
            "gcc or the kernel uapi headers are missing: `apt-get install gcc linux-libc-dev`"
        )
    fields = [f[0] for f in T.virtio_net_hdr._fields_]
    offs = " ".join(f'printf(" %zu", offsetof(struct virtio_net_hdr, {f}));' for f in fields)
    lines = [f'printf("virtio_net_hdr %zu", sizeof(struct virtio_net_hdr)); {offs} printf("\\n");']
    lines += [f'printf("{m} %lu\\n", (unsigned long){m});' for m in [*KNOWN, *CONSTANTS]]
    src = tmp_path_factory.mktemp("tun") / "tun.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/ioctl.h>\n#include <linux/if_tun.h>\n"
                   "#include <linux/virtio_net.h>\nint main(void) {\n" + "\n".join(lines)
                   + "\nreturn 0; }\n")  # fmt: skip
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in out.splitlines()}


def test_virtio_net_hdr_layout_matches_the_header(from_headers: dict[str, list[int]]) -> None:
    t = T.virtio_net_hdr
    ours = [ctypes.sizeof(t)] + [getattr(t, f[0]).offset for f in t._fields_]
    assert ours == from_headers["virtio_net_hdr"]


def test_numbers_match_the_headers(from_headers: dict[str, list[int]]) -> None:
    for name in KNOWN:
        assert KNOWN[name][0] == from_headers[name][0], name
    for name in CONSTANTS:
        assert getattr(T, name) == from_headers[name][0], name


def test_parse_vnet_hdr() -> None:
    def hdr(flags: int, gso: int, size: int = 0, start: int = 0, off: int = 0) -> bytes:
        return bytes(T.virtio_net_hdr(flags, gso, 999, size, start, off)) + b"frame"

    csum = T.VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert parse_vnet_hdr(hdr(0, 0)) is None
    assert parse_vnet_hdr(hdr(T.VIRTIO_NET_HDR_F_DATA_VALID, 0)) is None
    assert parse_vnet_hdr(hdr(csum, 0, 0, 34, 6)) == TxOffload(34, 6, 0)
    assert parse_vnet_hdr(hdr(csum, T.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)) == TxOffload(
        34, 16, 1448
    )
    # kinds udrv does not announce: refused, never passed on as plain frames
    assert parse_vnet_hdr(hdr(csum, T.VIRTIO_NET_HDR_GSO_TCPV6, 1428, 54, 16)) == "gso_type"
    assert parse_vnet_hdr(hdr(csum, T.VIRTIO_NET_HDR_GSO_UDP, 1472, 34, 6)) == "gso_type"
    ecn = T.VIRTIO_NET_HDR_GSO_TCPV4 | T.VIRTIO_NET_HDR_GSO_ECN
    assert parse_vnet_hdr(hdr(csum, ecn, 1448, 34, 16)) == "gso_type"
    assert parse_vnet_hdr(hdr(0, T.VIRTIO_NET_HDR_GSO_TCPV4, 1448)) == "gso_type"
