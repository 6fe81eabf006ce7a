"""Kernel ABI: ioctl numbers and structure layouts checked against the real uapi headers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from udrv.kernel import fuse as F
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import _IO, _IOR, _IOW, _IOWR

# Known values (computed by gcc from the headers; also checked live below).
KNOWN = {
    "VFIO_GET_API_VERSION": (V.VFIO_GET_API_VERSION, 0x3B64),
    "VFIO_CHECK_EXTENSION": (V.VFIO_CHECK_EXTENSION, 0x3B65),
    "VFIO_SET_IOMMU": (V.VFIO_SET_IOMMU, 0x3B66),
    "VFIO_GROUP_GET_STATUS": (V.VFIO_GROUP_GET_STATUS, 0x3B67),
    "VFIO_DEVICE_GET_INFO": (V.VFIO_DEVICE_GET_INFO, 0x3B6B),
    "VFIO_DEVICE_SET_IRQS": (V.VFIO_DEVICE_SET_IRQS, 0x3B6E),
    "VFIO_IOMMU_MAP_DMA": (V.VFIO_IOMMU_MAP_DMA, 0x3B71),
    "NBD_SET_SOCK": (_IO(0xAB, 0), 0xAB00),
    "TUNSETIFF": (_IOW("T", 202, ctypes.c_int), 0x400454CA),
    "EVIOCGVERSION": (_IOR("E", 0x01, ctypes.c_int), 0x80044501),
    "UBLK_U_CMD_ADD_DEV": (_IOWR("u", 0x04, 32), 0xC0207504),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_ioctl_numbers(name: str) -> None:
    ours, known = KNOWN[name]
    assert ours == known


STRUCTS = {
    "vfio_group_status": V.vfio_group_status,
    "vfio_device_info": V.vfio_device_info,
    "vfio_region_info": V.vfio_region_info,
    "vfio_irq_info": V.vfio_irq_info,
    "vfio_irq_set": V.vfio_irq_set,
    "vfio_info_cap_header": V.vfio_info_cap_header,
    "vfio_iommu_type1_info": V.vfio_iommu_type1_info,
    "vfio_iommu_type1_dma_map": V.vfio_iommu_type1_dma_map,
    "vfio_iommu_type1_dma_unmap": V.vfio_iommu_type1_dma_unmap,
    "vfio_iova_range": V.vfio_iova_range,
    "fuse_in_header": F.fuse_in_header,
    "fuse_out_header": F.fuse_out_header,
    "cuse_init_in": F.cuse_init_in,
    "cuse_init_out": F.cuse_init_out,
    "fuse_open_in": F.fuse_open_in,
    "fuse_open_out": F.fuse_open_out,
    "fuse_read_in": F.fuse_read_in,
    "fuse_write_in": F.fuse_write_in,
    "fuse_write_out": F.fuse_write_out,
    "fuse_release_in": F.fuse_release_in,
    "fuse_ioctl_in": F.fuse_ioctl_in,
    "fuse_ioctl_out": F.fuse_ioctl_out,
    "fuse_ioctl_iovec": F.fuse_ioctl_iovec,
    "fuse_poll_in": F.fuse_poll_in,
    "fuse_poll_out": F.fuse_poll_out,
    "fuse_interrupt_in": F.fuse_interrupt_in,
}


@pytest.fixture(scope="module")
def c_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    if not shutil.which("gcc") or not Path("/usr/include/linux/vfio.h").exists():
        pytest.skip(
            "gcc or the kernel uapi headers are missing: `apt-get install gcc linux-libc-dev`"
        )
    lines = []
    for name, t in STRUCTS.items():
        offs = " ".join(f'printf(" %zu", offsetof(struct {name}, {f[0]}));' for f in t._fields_)
        lines.append(f'printf("{name} %zu", sizeof(struct {name})); {offs} printf("\\n");')
    # (UBLK_U_* are newer than Debian 12's headers: checked against the known value only.)
    macros = [k for k in KNOWN if k.startswith(("VFIO", "NBD", "TUN"))]
    lines += [f'printf("{m} %lu\\n", (unsigned long){m});' for m in macros]
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\n#include <linux/fuse.h>\n"
        "#include <linux/nbd.h>\n#include <linux/if_tun.h>\n#include <linux/ublk_cmd.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in out.splitlines()}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_layout_matches_the_header(c_layouts: dict[str, list[int]], name: str) -> None:
    t = STRUCTS[name]
    ours = [ctypes.sizeof(t)] + [getattr(t, f[0]).offset for f in t._fields_]
    assert ours == c_layouts[name]


def test_ioctl_numbers_match_the_headers(c_layouts: dict[str, list[int]]) -> None:
    for name, (ours, _) in KNOWN.items():
        if name in c_layouts:
            assert ours == c_layouts[name][0], name


def test_vfio_capability_chain_walk_and_loop_detection() -> None:
    buf = bytearray(64)
    buf[16:24] = bytes(V.vfio_info_cap_header(id=1, version=1, next=32))
    buf[32:40] = bytes(V.vfio_info_cap_header(id=3, version=1, next=0))
    buf[40:44] = (7).to_bytes(4, "little")
    caps = list(V.capabilities(bytes(buf), 16))
    assert [(c.id, c.offset) for c in caps] == [(1, 16), (3, 32)]
    assert V.dma_avail(bytes(buf), caps[1]) == 7
    buf[32:40] = bytes(V.vfio_info_cap_header(id=3, version=1, next=16))  # loop back
    with pytest.raises(ValueError, match="broken"):
        list(V.capabilities(bytes(buf), 16))
    buf[32:40] = bytes(V.vfio_info_cap_header(id=3, version=1, next=60))  # runs off the end
    with pytest.raises(ValueError, match="broken"):
        list(V.capabilities(bytes(buf), 16))


def test_irq_set_payload() -> None:
    raw = V.irq_set(
        V.VfioPciIrq.MSIX, V.VFIO_IRQ_SET_DATA_EVENTFD | V.VFIO_IRQ_SET_ACTION_TRIGGER, 0, [5, -1]
    )
    hdr = V.vfio_irq_set.from_buffer_copy(raw)
    assert (hdr.argsz, hdr.index, hdr.count) == (28, 2, 2)
    assert raw[20:] == (5).to_bytes(4, "little") + (-1).to_bytes(4, "little", signed=True)
