"""Kernel ABI: ioctl numbers and structure layouts checked against the real uapi headers."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from udrv.errors import FrontendError, UdrvError
from udrv.kernel import fuse as F
from udrv.kernel import nbd as N
from udrv.kernel import vfio as V
from udrv.kernel.ioctl import (
    _IOC_DIR,
    _IOC_NR,
    _IOC_READ,
    _IOC_SIZE,
    _IOC_TYPE,
    _IOC_WRITE,
    _IOR,
    _IOW,
    _IOWR,
    ioctl,
)

# Known values (computed by gcc from the headers; also checked live below).
KNOWN = {
    "VFIO_GET_API_VERSION": (V.VFIO_GET_API_VERSION, 0x3B64),
    "VFIO_CHECK_EXTENSION": (V.VFIO_CHECK_EXTENSION, 0x3B65),
    "VFIO_SET_IOMMU": (V.VFIO_SET_IOMMU, 0x3B66),
    "VFIO_GROUP_GET_STATUS": (V.VFIO_GROUP_GET_STATUS, 0x3B67),
    "VFIO_DEVICE_GET_INFO": (V.VFIO_DEVICE_GET_INFO, 0x3B6B),
    "VFIO_DEVICE_SET_IRQS": (V.VFIO_DEVICE_SET_IRQS, 0x3B6E),
    "VFIO_IOMMU_MAP_DMA": (V.VFIO_IOMMU_MAP_DMA, 0x3B71),
    "NBD_SET_SOCK": (N.NBD_SET_SOCK, 0xAB00),
    "NBD_SET_BLKSIZE": (N.NBD_SET_BLKSIZE, 0xAB01),
    "NBD_DO_IT": (N.NBD_DO_IT, 0xAB03),
    "NBD_CLEAR_SOCK": (N.NBD_CLEAR_SOCK, 0xAB04),
    "NBD_SET_SIZE_BLOCKS": (N.NBD_SET_SIZE_BLOCKS, 0xAB07),
    "NBD_DISCONNECT": (N.NBD_DISCONNECT, 0xAB08),
    "NBD_SET_TIMEOUT": (N.NBD_SET_TIMEOUT, 0xAB09),
    "NBD_SET_FLAGS": (N.NBD_SET_FLAGS, 0xAB0A),
    "FUSE_DEV_IOC_CLONE": (_IOR(229, 0, ctypes.c_uint32), 0x8004E500),
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
    macros = [k for k in KNOWN if k.startswith(("VFIO", "NBD", "TUN", "FUSE"))]
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


@pytest.mark.parametrize(
    ("number", "fields"),
    [
        (0x400454CA, (_IOC_WRITE, ord("T"), 202, 4)),  # TUNSETIFF
        (0xC0207504, (_IOC_READ | _IOC_WRITE, ord("u"), 4, 32)),  # UBLK_U_CMD_ADD_DEV
        (0x8004E500, (_IOC_READ, 229, 0, 4)),  # FUSE_DEV_IOC_CLONE
        (0xAB03, (0, 0xAB, 3, 0)),  # NBD_DO_IT
        (0x3B71, (0, ord(";"), 113, 0)),  # VFIO_IOMMU_MAP_DMA
    ],
)
def test_ioc_fields_take_known_numbers_apart(number: int, fields: tuple[int, ...]) -> None:
    assert (_IOC_DIR(number), _IOC_TYPE(number), _IOC_NR(number), _IOC_SIZE(number)) == fields


def test_ioctl_errors_name_the_operation_and_carry_errno() -> None:
    with open("/dev/null", "rb") as f:
        with pytest.raises(
            FrontendError, match=r"^ioctl NBD_SET_BLKSIZE on /dev/null failed: \[ENOTTY\]"
        ) as exc:
            N.nbd_ioctl(f.fileno(), N.NBD_SET_BLKSIZE, 4096, path="/dev/null")
        assert exc.value.errno == 25
        buf = bytearray(4)
        with pytest.raises(UdrvError, match=r"^ioctl TUNGETIFF on /dev/null failed: \[ENOTTY\]"):
            ioctl(f.fileno(), _IOR("T", 210, ctypes.c_uint), buf, what="TUNGETIFF on /dev/null")


def test_nbd_device_setup_failure_names_the_ioctl_and_closes_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from udrv.block.ram import RamDisk
    from udrv.frontends.nbd import NbdDevice

    dev = NbdDevice(RamDisk(1 << 20))
    opened: list[int] = []

    def open_null() -> None:  # /dev/null stands in for /dev/nbd0: every NBD ioctl is ENOTTY
        dev.fd, dev.path = os.open("/dev/null", os.O_RDWR), "/dev/null"
        opened.append(dev.fd)

    monkeypatch.setattr(dev, "_open_free", open_null)
    with pytest.raises(
        FrontendError, match=r"^ioctl NBD_SET_BLKSIZE on /dev/null failed: \[ENOTTY\]"
    ):
        dev.start()
    assert dev.fd == -1
    with pytest.raises(OSError):
        os.fstat(opened[0])  # closed, not leaked


def test_no_fcntl_ioctl_outside_udrv_kernel() -> None:
    root = Path(__import__("udrv").__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.parent.name != "kernel" and "fcntl.ioctl" in p.read_text()
    ]
    assert offenders == []


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
