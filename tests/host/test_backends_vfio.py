"""The VFIO backend against a fake kernel: the module's ``ioctl`` is replaced by a model of
vfio-pci's, the group/container nodes are files, and the device fd is a real memfd holding the
regions at their offsets (so pread/pwrite and mmap are the real system calls)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import udrv
import udrv.backends.vfio as bv
from udrv.backends import ConfigRegion, PortRegion, SparseRegion
from udrv.core.device import RegionKind
from udrv.core.region import FileRegion, MmioRegion, RecordingRegion
from udrv.dma.iommu import IommuInfo
from udrv.errors import BackendError, DeviceBusyError, RegionError, UdrvError, VfioError
from udrv.kernel import vfio as V

from .test_pci_sysfs import DATA, make_tree

ADDR = "0000:00:05.0"
ADDR2 = "0000:00:05.1"  # function 1 of the same slot, same IOMMU group
GROUP = 4
SHIFT = 24  # region N at N << 24 in the fake device fd (the kernel uses 40)
HDR = ctypes.sizeof(V.vfio_region_info)


def cap(cap_id: int, payload: bytes, nxt: int = 0) -> bytes:
    return struct.pack("<HHI", cap_id, 1, nxt) + payload


def sparse_cap(areas: list[tuple[int, int]]) -> bytes:
    body = struct.pack("<II", len(areas), 0) + b"".join(struct.pack("<QQ", o, s) for o, s in areas)
    return cap(V.VFIO_REGION_INFO_CAP_SPARSE_MMAP, body)


def fill(arg: Any, data: bytes) -> None:
    """Write the kernel's reply into the caller's buffer, as the real ioctl does."""
    if isinstance(arg, bytearray):
        arg[: len(data)] = data[: len(arg)]
    else:
        n = min(len(data), ctypes.sizeof(arg))
        ctypes.memmove(ctypes.addressof(arg), data, n)


class FakeKernel:
    """vfio-pci for one e1000e-like device (regions from the lab's e1000e dump)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "dev-vfio"
        self.dir.mkdir()
        (self.dir / "vfio").write_bytes(b"")
        (self.dir / str(GROUP)).write_bytes(b"")
        self.memfd = os.memfd_create("fake-vfio-device")
        os.ftruncate(self.memfd, 9 << SHIFT)
        cfg = (DATA / "e1000e.config").read_bytes()
        os.pwrite(self.memfd, cfg, 7 << SHIFT)
        mem = V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE
        mmap_ = mem | V.VFIO_REGION_INFO_FLAG_MMAP
        # index: (flags, size, caps)
        self.regions: dict[int, tuple[int, int, bytes]] = {
            0: (mmap_, 0x20000, b""),
            1: (mmap_, 0x20000, cap(V.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, b"")),
            2: (mem, 0x20, b""),
            # BAR3 as kernels before 4.16 reported it: the MSI-X table page is a hole.
            3: (mmap_, 0x4000, sparse_cap([(0x1000, 0x3000)])),
            4: (0, 0, b""),
            5: (0, 0, b""),
            6: (V.VFIO_REGION_INFO_FLAG_READ, 0x40000, b""),
            7: (mem, 0x1000, b""),
            8: (0, 0, b""),
        }
        self.extensions = {V.VFIO_TYPE1_IOMMU, V.VFIO_TYPE1v2_IOMMU}
        self.viable = True
        self.device_flags = V.VFIO_DEVICE_FLAGS_PCI | V.VFIO_DEVICE_FLAGS_RESET
        self.device_busy = False
        self.iommu_caps = True
        self.log: list[str] = []
        self.fds: list[int] = []  # device fds handed out
        self.open_devices: set[str] = set()
        self.maps: list[tuple[int, int]] = []  # (iova, size) of VFIO_IOMMU_MAP_DMA
        self.names = {
            v: k
            for k, v in vars(V).items()
            if k.startswith("VFIO_") and isinstance(v, int) and v >> 8 == V.VFIO_TYPE
        }

    def ioctl(
        self, fd: int, request: int, arg: Any = 0, *, what: str, error: type[UdrvError] = UdrvError
    ) -> int:
        name = self.names[request]
        self.log.append(name)
        os.fstat(fd)  # a closed fd would be EBADF in the kernel

        def fail(err: int) -> UdrvError:
            return error(f"ioctl {what} failed", errno=err)

        if name == "VFIO_GET_API_VERSION":
            return V.VFIO_API_VERSION
        if name == "VFIO_CHECK_EXTENSION":
            return int(arg in self.extensions)
        if name == "VFIO_SET_IOMMU":
            self.log[-1] += f" {arg}"
            return 0
        if name == "VFIO_GROUP_GET_STATUS":
            fill(arg, struct.pack("<II", 8, V.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0))
            return 0
        if name in ("VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_UNSET_CONTAINER", "VFIO_DEVICE_RESET"):
            return 0
        if name == "VFIO_IOMMU_MAP_DMA":
            self.maps.append((int(arg.iova), int(arg.size)))
            return 0
        if name == "VFIO_IOMMU_UNMAP_DMA":
            self.maps.remove((int(arg.iova), int(arg.size)))
            return 0
        if name == "VFIO_IOMMU_GET_INFO":
            argsz = struct.unpack_from("<I", bytes(arg))[0]
            ranges = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
            iova = cap(
                V.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
                struct.pack("<II", len(ranges), 0)
                + b"".join(struct.pack("<QQ", *r) for r in ranges),
                nxt=24 + 8 + 8 + 32,
            )
            caps = iova + cap(
                V.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, struct.pack("<I", 65535) + bytes(4)
            )
            flags = V.VFIO_IOMMU_INFO_PGSIZES | (V.VFIO_IOMMU_INFO_CAPS if self.iommu_caps else 0)
            need = 24 + len(caps) if self.iommu_caps else 24
            if argsz < need:
                fill(arg, struct.pack("<IIQI", need, flags, 0x40201000, 0))
            else:
                fill(arg, struct.pack("<IIQI4x", need, flags, 0x40201000, 24) + caps)
            return 0
        if name == "VFIO_GROUP_GET_DEVICE_FD":
            addr = bytes(arg).rstrip(b"\0").decode()
            assert addr in (ADDR, ADDR2)
            if self.device_busy:
                raise fail(errno.EBUSY)
            self.log[-1] += f" {addr}"
            fd2 = os.dup(self.memfd)
            self.fds.append(fd2)
            return fd2
        if name == "VFIO_DEVICE_GET_INFO":
            fill(arg, struct.pack("<IIIII", 20, self.device_flags, 9, 5, 0))
            return 0
        if name == "VFIO_DEVICE_GET_REGION_INFO":
            argsz, _, index = struct.unpack_from("<III", bytes(arg))
            if index not in self.regions:
                raise fail(errno.EINVAL)
            flags, size, caps = self.regions[index]
            if caps:
                flags |= V.VFIO_REGION_INFO_FLAG_CAPS
            # vfio_pci_ioctl_get_region_info: too small -> argsz = what is needed, no caps.
            if argsz < HDR + len(caps):
                reply = struct.pack(
                    "<IIIIQQ", HDR + len(caps), flags, index, 0, size, index << SHIFT
                )
            else:
                reply = (
                    struct.pack(
                        "<IIIIQQ",
                        HDR + len(caps),
                        flags,
                        index,
                        HDR if caps else 0,
                        size,
                        index << SHIFT,
                    )
                    + caps
                )
            fill(arg, reply)
            return 0
        raise AssertionError(f"unexpected ioctl {name}")

    def peek(self, index: int, offset: int, n: int) -> int:
        return int.from_bytes(os.pread(self.memfd, n, (index << SHIFT) + offset), "little")

    def poke(self, index: int, offset: int, value: int, n: int) -> None:
        os.pwrite(self.memfd, value.to_bytes(n, "little"), (index << SHIFT) + offset)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    k = FakeKernel(tmp_path)
    make_tree(tmp_path, "e1000e", ADDR, driver="vfio-pci", group=GROUP)
    monkeypatch.setattr(bv, "VFIO_DIR", k.dir)
    monkeypatch.setattr(bv, "IOMMU_GROUPS", tmp_path / "groups")
    monkeypatch.setattr(bv, "ioctl", k.ioctl)
    (tmp_path / "groups" / str(GROUP) / "devices").mkdir(parents=True)
    os.symlink(tmp_path / "devices" / ADDR, tmp_path / "groups" / str(GROUP) / "devices" / ADDR)
    yield k
    os.close(k.memfd)


@pytest.fixture
def tree(tmp_path: Path, kernel: FakeKernel) -> Path:
    return tmp_path / "devices"


def test_open_sequence_follows_the_vfio_documentation(kernel: FakeKernel, tree: Path) -> None:
    with udrv.open("00:05.0", root=tree) as dev:
        assert isinstance(dev, bv.VfioDevice) and dev.backend == "vfio"
        assert kernel.log == [
            "VFIO_GET_API_VERSION",
            "VFIO_CHECK_EXTENSION",  # type1v2 first, offered
            "VFIO_GROUP_GET_STATUS",
            "VFIO_GROUP_SET_CONTAINER",
            f"VFIO_SET_IOMMU {V.VFIO_TYPE1v2_IOMMU}",
            "VFIO_IOMMU_GET_INFO",
            "VFIO_IOMMU_GET_INFO",  # again with room for the capabilities
            f"VFIO_GROUP_GET_DEVICE_FD {ADDR}",
            "VFIO_DEVICE_GET_INFO",
            "VFIO_DEVICE_GET_REGION_INFO",  # config (7)
        ]
        assert dev.iommu is dev.container
        assert dev.iommu_info == IommuInfo(
            pgsizes=0x40201000,
            iova_ranges=[(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)],
            dma_avail=65535,
        )
        assert isinstance(dev.config, ConfigRegion)
        assert (dev.config.read16(0), dev.config.read16(2)) == (0x8086, 0x10D3)
        assert (dev.num_regions, dev.num_irqs) == (9, 5)


def test_type1_fallback_and_iommu_info_without_caps(kernel: FakeKernel, tree: Path) -> None:
    kernel.extensions = {V.VFIO_TYPE1_IOMMU}
    kernel.iommu_caps = False
    with udrv.open(ADDR, root=tree) as dev:
        assert f"VFIO_SET_IOMMU {V.VFIO_TYPE1_IOMMU}" in kernel.log
        assert isinstance(dev, bv.VfioDevice)
        assert dev.iommu_info == IommuInfo(pgsizes=0x40201000)
    kernel.extensions = set()
    with pytest.raises(VfioError, match="offers no type1 IOMMU; enable the IOMMU"):
        udrv.open(ADDR, root=tree)


def test_regions_by_kind(kernel: FakeKernel, tree: Path) -> None:
    with udrv.open(ADDR, root=tree) as dev:
        infos = {b.index: b for b in dev.bars}
        assert sorted(infos) == [0, 1, 2, 3]
        assert infos[2].kind is RegionKind.IO and not infos[2].mappable
        assert infos[3].mmap_areas == ((0x1000, 0x3000),)
        assert isinstance(dev, bv.VfioDevice)
        assert dev.vfio_region_info(1).msix_mappable and dev.vfio_region_info(1).cap_ids == (3,)

        bar0 = dev.bar(0)
        assert isinstance(bar0, MmioRegion) and bar0 is dev.bar(0) and bar0.index == 0
        bar0.write32(0x8, 0x80080783)
        assert kernel.peek(0, 0x8, 4) == 0x80080783  # the store reached the device fd's pages
        kernel.poke(0, 0x10, 0x1122334455667788, 8)
        assert bar0.read64(0x10) == 0x1122334455667788
        assert isinstance(dev.bar(1), MmioRegion)  # MSI-X mappable: the whole BAR

        io = dev.bar(2)
        assert isinstance(io, PortRegion) and io.size == 0x20
        io.write32(0, 0x8)
        assert kernel.peek(2, 0, 4) == 8
        with pytest.raises(RegionError, match="8-byte read at 0x0 refused: an I/O-port BAR"):
            io.read64(0)

        with pytest.raises(RegionError, match="does not implement BAR4"):
            dev.bar(4)
        with pytest.raises(RegionError, match="BAR index 7 out of range"):
            dev.bar(7)


def test_sparse_bar_maps_the_areas_and_uses_the_fd_elsewhere(
    kernel: FakeKernel, tree: Path
) -> None:
    with udrv.open(ADDR, root=tree) as dev:
        bar3 = dev.bar(3)
        assert isinstance(bar3, SparseRegion) and bar3.size == 0x4000
        assert [(o, r.size, type(r)) for o, r in bar3.areas] == [(0x1000, 0x3000, MmioRegion)]
        assert isinstance(bar3.fallback, FileRegion)
        spy = RecordingRegion(bar3.fallback)
        bar3.fallback = spy
        bar3.write32(0x0, 0xFEE00000)  # MSI-X table entry 0: the hole, through pwrite
        bar3.write16(0xFFE, 0xABCD)  # last word of the hole
        bar3.write64(0x2000, 0x5555)  # PBA page: mapped
        kernel.poke(3, 0x3FFC, 0x77, 4)
        assert bar3.read32(0x3FFC) == 0x77  # mapped: sees the device's value
        assert bar3.read32(0x0) == 0xFEE00000
        assert spy.log == [
            ("w", 0x0, 4, 0xFEE00000),
            ("w", 0xFFE, 2, 0xABCD),
            ("r", 0x0, 4, 0xFEE00000),
        ]
        assert kernel.peek(3, 0x2000, 8) == 0x5555 and kernel.peek(3, 0xFFE, 2) == 0xABCD
        # Bulk copies split at the area boundary and stay consistent.
        bar3.write(0xFF8, bytes(range(16)))
        assert bar3.read(0xFF8, 16) == bytes(range(16))
        assert kernel.peek(3, 0xFF8, 8) == int.from_bytes(bytes(range(8)), "little")
        with pytest.raises(RegionError, match="outside the 16 KiB region"):
            bar3.read32(0x4000)
        with pytest.raises(RegionError, match="not 4-byte aligned"):
            bar3.read32(0x1002)
    with pytest.raises(RegionError, match="closed"):
        bar3.read32(0x2000)


def test_region_info_with_a_broken_cap_chain_is_an_error_not_a_hang(
    kernel: FakeKernel, tree: Path
) -> None:
    flags, size, _ = kernel.regions[0]
    kernel.regions[0] = (flags, size, cap(V.VFIO_REGION_INFO_CAP_SPARSE_MMAP, bytes(8), nxt=HDR))
    with udrv.open(ADDR, root=tree) as dev, pytest.raises(VfioError, match="chain is broken"):
        dev.bar(0)


def test_close_releases_everything_and_reopen_works(kernel: FakeKernel, tree: Path) -> None:
    dev = udrv.open(ADDR, root=tree)
    assert isinstance(dev, bv.VfioDevice)
    bar0, bar3, cfg = dev.bar(0), dev.bar(3), dev.config
    fds = [dev.device_fd, dev.group_fd, dev.container.fd]
    dev.close()
    dev.close()  # twice is fine
    assert kernel.log[-1] == "VFIO_GROUP_UNSET_CONTAINER"
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    for region in (bar0, bar3):
        with pytest.raises(RegionError, match="closed"):
            region.read32(0x2000)
    with pytest.raises(VfioError, match="is closed; open it again"):
        dev.bar(0)
    with pytest.raises(RegionError, match=r"config space of 0000:00:05\.0 is closed"):
        cfg.read16(0)  # not a pread on an fd number that may belong to another file by now
    with udrv.open(ADDR, root=tree) as again:
        assert again.bar(0).read32(0x8) == 0


def test_failed_open_leaks_no_fd(kernel: FakeKernel, tree: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    kernel.device_busy = True
    with pytest.raises(VfioError, match=r"0000:00:05.0 is already opened \(by another process"):
        udrv.open(ADDR, root=tree)
    kernel.device_busy = False
    kernel.device_flags = 0
    with pytest.raises(VfioError, match="does not present it as a PCI device"):
        udrv.open(ADDR, root=tree)
    assert set(os.listdir("/proc/self/fd")) == before


def test_group_errors_name_the_fix(
    kernel: FakeKernel, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not viable: another member of the group is bound to a kernel driver.
    make_tree(tmp_path, "e1000", "0000:00:06.0", driver="e1000", group=GROUP)
    os.symlink(
        tmp_path / "devices" / "0000:00:06.0",
        tmp_path / "groups" / str(GROUP) / "devices" / "0000:00:06.0",
    )
    kernel.viable = False
    with pytest.raises(
        VfioError,
        match=r"IOMMU group 4 of 0000:00:05.0 is not viable: 0000:00:06.0 \(bound to e1000\) is still bound .* run `udrv bind 0000:00:05.0`",
    ):
        udrv.open(ADDR, root=tree)
    kernel.viable = True

    real_open = os.open

    def failing_open(err: int) -> Any:
        def fake(path: Any, *a: Any, **k: Any) -> int:
            if str(path) == str(kernel.dir / str(GROUP)):
                raise OSError(err, os.strerror(err))
            return real_open(path, *a, **k)

        return fake

    cases = {
        errno.ENOENT: r"0000:00:05.0 is not bound to vfio-pci \(.*/4 does not exist\); run `udrv bind 0000:00:05.0`",
        errno.EACCES: r"no permission on .*/4 .*run `udrv bind 0000:00:05.0 --user \$USER` or run as root: \[EACCES\]",
        errno.EBUSY: r"already opened by another process; stop it first: \[EBUSY\]",
    }
    for err, pattern in cases.items():
        monkeypatch.setattr(os, "open", failing_open(err))
        with pytest.raises(VfioError, match=pattern):
            udrv.open(ADDR, root=tree)
    monkeypatch.setattr(os, "open", real_open)


def test_binding_checked_before_any_vfio_call(kernel: FakeKernel, tmp_path: Path) -> None:
    make_tree(tmp_path, "e1000", "0000:00:06.0", driver="e1000", group=7)
    make_tree(tmp_path, "edu", "0000:00:04.0", group=8)
    with pytest.raises(
        DeviceBusyError,
        match=r"0000:00:06.0 is bound to e1000, not vfio-pci; run `udrv bind 0000:00:06.0`",
    ):
        udrv.open("00:06.0", "vfio", root=tmp_path / "devices")
    with pytest.raises(
        VfioError, match=r"0000:00:04.0 is not bound to vfio-pci \(no driver\); run `udrv bind"
    ):
        udrv.open("00:04.0", "vfio", root=tmp_path / "devices")
    assert kernel.log == []


def test_reset(kernel: FakeKernel, tree: Path) -> None:
    with udrv.open(ADDR, root=tree) as dev:
        dev.reset()
        assert kernel.log[-1] == "VFIO_DEVICE_RESET"
    kernel.device_flags = V.VFIO_DEVICE_FLAGS_PCI
    with (
        udrv.open(ADDR, root=tree) as dev,
        pytest.raises(VfioError, match="cannot be reset through VFIO"),
    ):
        dev.reset()


# -- one container per process, groups shared ------------------------------------------------


@pytest.fixture
def second_function(kernel: FakeKernel, tmp_path: Path) -> str:
    """Function 1 of the same slot, in the same IOMMU group, bound to vfio-pci."""
    make_tree(tmp_path, "e1000e", ADDR2, driver="vfio-pci", group=GROUP)
    os.symlink(tmp_path / "devices" / ADDR2, tmp_path / "groups" / str(GROUP) / "devices" / ADDR2)
    return ADDR2


def test_two_devices_of_one_group_share_the_group_and_the_container(
    kernel: FakeKernel, tree: Path, second_function: str
) -> None:
    a = udrv.open(ADDR, root=tree)
    b = udrv.open(second_function, root=tree)
    assert isinstance(a, bv.VfioDevice) and isinstance(b, bv.VfioDevice)
    assert a.group is b.group and a.container is b.container
    # The group node was opened and attached once, the IOMMU set once.
    assert kernel.log.count("VFIO_GROUP_SET_CONTAINER") == 1
    assert sum(e.startswith("VFIO_SET_IOMMU") for e in kernel.log) == 1
    assert [e for e in kernel.log if e.startswith("VFIO_GROUP_GET_DEVICE_FD")] == [
        f"VFIO_GROUP_GET_DEVICE_FD {ADDR}",
        f"VFIO_GROUP_GET_DEVICE_FD {ADDR2}",
    ]
    # One IOVA space: buffers through either device never overlap.
    x, y = a.dma.alloc(8192), b.dma.alloc(8192)
    assert x.iova + 8192 <= y.iova or y.iova + 8192 <= x.iova
    assert sorted(kernel.maps) == sorted([(x.iova, 8192), (y.iova, 8192)])
    group_fd, container_fd = a.group_fd, a.container.fd
    a.close()  # b still uses the group and the container
    assert kernel.maps == [(y.iova, 8192)]
    assert "VFIO_GROUP_UNSET_CONTAINER" not in kernel.log
    os.fstat(group_fd)
    os.fstat(container_fd)
    assert b.bar(0).read32(0) == 0
    b.close()  # the last user: the group is detached and both fds closed
    assert kernel.log[-1] == "VFIO_GROUP_UNSET_CONTAINER" and kernel.maps == []
    for fd in (group_fd, container_fd):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_failed_second_open_leaves_the_first_device_working(
    kernel: FakeKernel, tree: Path, second_function: str
) -> None:
    with udrv.open(ADDR, root=tree) as a:
        kernel.device_busy = True
        with pytest.raises(VfioError, match="already opened"):
            udrv.open(second_function, root=tree)
        kernel.device_busy = False
        assert isinstance(a, bv.VfioDevice)
        os.fstat(a.group_fd)
        assert "VFIO_GROUP_UNSET_CONTAINER" not in kernel.log
        with udrv.open(second_function, root=tree) as b:
            assert isinstance(b, bv.VfioDevice) and b.group is a.group
    assert kernel.log[-1] == "VFIO_GROUP_UNSET_CONTAINER"


def test_dma_mask_at_open_is_fixed(kernel: FakeKernel, tree: Path) -> None:
    with udrv.open(ADDR, root=tree, dma_mask_bits=28) as dev:
        assert dev.dma.mask_bits == 28
        with pytest.raises(
            UdrvError, match=r"already 28 bits \(set by udrv.open\(dma_mask_bits=28\)\)"
        ):
            dev.dma.set_mask(32)
        buf = dev.dma.alloc(4096)
        assert buf.iova + 4096 <= 1 << 28


def test_no_iommu_mode_says_what_it_is(
    kernel: FakeKernel, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 16: vfio in no-IOMMU mode names its group node noiommu-N and offers
    only the no-IOMMU 'IOMMU'; say so rather than 'not bound'."""
    os.rename(kernel.dir / str(GROUP), kernel.dir / f"noiommu-{GROUP}")
    with pytest.raises(VfioError, match=r"no-IOMMU mode.*enable_unsafe_noiommu_mode"):
        udrv.open(ADDR, root=tree)
    kernel.extensions = {V.VFIO_NOIOMMU_IOMMU}
    with pytest.raises(VfioError, match=r"no-IOMMU mode.*intel_iommu=on"):
        udrv.open(ADDR, root=tree)


def test_cpu_other_than_x86_64_is_refused_for_driving(
    kernel: FakeKernel, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 item 6: barriers are verified on x86-64 only; inspection stays allowed."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(BackendError, match=r"cannot drive 0000:00:05.0 on aarch64.*x86-64"):
        udrv.open(ADDR, root=tree)
    assert kernel.log == []  # refused before touching VFIO
    with udrv.open(ADDR, "sysfs", root=tree) as dev:
        assert dev.config.read16(0) == 0x8086


def test_sysfs_devices_have_no_interrupts_or_dma(kernel: FakeKernel, tree: Path) -> None:
    with udrv.open(ADDR, "sysfs", root=tree) as dev:
        with pytest.raises(UdrvError, match=r"0000:00:05.0: the sysfs backend has no interrupts"):
            dev.irq.available()
        with pytest.raises(
            UdrvError, match=r"sysfs backend cannot do DMA; open it with backend='vfio'"
        ):
            dev.dma.alloc(4096)
        with pytest.raises(UdrvError, match="cannot do DMA"):
            udrv.open(ADDR, "sysfs", root=tree, dma_mask_bits=28)


def test_listing_bars_skips_absent_ones_but_reports_failures(
    kernel: FakeKernel, tree: Path
) -> None:
    """Issue 13 item 7: ``bars`` skips BARs the device does not implement, and lets any
    other failure (here VFIO refusing the region query) reach the caller."""
    with udrv.open(ADDR, root=tree) as dev:
        assert [b.index for b in dev.bars] == [0, 1, 2, 3]
    del kernel.regions[2]
    with (
        udrv.open(ADDR, root=tree) as dev,
        pytest.raises(VfioError, match=r"VFIO_DEVICE_GET_REGION_INFO 2 .*EINVAL"),
    ):
        dev.bars  # noqa: B018
