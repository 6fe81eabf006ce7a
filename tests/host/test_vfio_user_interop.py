"""Interoperability with libvfio-user (github.com/nutanix/libvfio-user), an independent
implementation of the protocol, through its sample programs.

Needs a local build of libvfio-user: set ``UDRV_LIBVFIO_USER`` to its meson build directory
(see docs/vfio-user.md: `meson setup build && ninja -C build`). Without it these tests are
skipped, and reported as skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import udrv
from udrv.models.base import PciModel
from udrv.models.edu import EduModel
from udrv.models.pci import ConfigSpace

from .vfio_user_helpers import served

BUILD = os.environ.get("UDRV_LIBVFIO_USER", "")
SAMPLES = Path(BUILD) / "samples"
pytestmark = pytest.mark.skipif(
    not (SAMPLES / "gpio-pci-idio-16").exists(),
    reason="set UDRV_LIBVFIO_USER to a libvfio-user meson build directory",
)


@pytest.fixture
def gpio() -> Iterator[str]:
    """libvfio-user's gpio-pci-idio-16 sample server."""
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")
    path = f"{d}/gpio.sock"
    proc = subprocess.Popen([str(SAMPLES / "gpio-pci-idio-16"), path], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the gpio sample did not create its socket"
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_udrv_backend_drives_the_gpio_sample(gpio: str) -> None:
    with udrv.open(f"vfio-user:{gpio}") as dev:
        assert (dev.config.read16(0), dev.config.read16(2)) == (0x494F, 0x0DC8)
        [bar2] = dev.bars  # the sample has one region: BAR2, 256 bytes of I/O registers
        assert (bar2.index, bar2.size, bar2.kind.value) == (2, 256, "io")
        assert dev.irq.available() == {"intx": 1, "msi": 0, "msix": 0}
        dev.irq.enable("intx")[0].rearm()  # SET_IRQS with an eventfd, then UNMASK
        dev.irq.disable()
        dma = dev.dma
        with dma.alloc(8192), dma.map(bytearray(4096)):  # DMA_MAP with and without an fd
            pass
        dev.bar(2).write8(0, 3)  # output pins
        assert dev.bar(2).read8(0) == 0
        dev.reset()


def test_udrv_cli_on_the_gpio_sample(gpio: str) -> None:
    run = lambda *a: subprocess.run(["udrv", *a], capture_output=True, text=True, timeout=60)  # noqa: E731
    info = run("info", f"vfio-user:{gpio}")
    assert info.returncode == 0 and "PCI-IDIO-16" in info.stdout and "[size=256]" in info.stdout
    peek = run("peek", f"vfio-user:{gpio}", "2", "0x0", "--width", "8")
    assert peek.returncode == 0 and peek.stdout.strip() == "0x00"


def test_libvfio_user_client_against_udrv_edu() -> None:
    """The sample client talks to udrv's server until it asserts that the device is its own
    sample server's (0xdead:0xbeef): negotiation, a bogus region refused with EINVAL,
    DEVICE_GET_INFO, every REGION_INFO and a config space read all went through."""
    with served(EduModel()) as (_, path):
        r = subprocess.run(
            [str(SAMPLES / "client"), path], capture_output=True, text=True, timeout=30
        )
    # (its stdout is lost: buffered when it aborts)
    assert "failed to read from region -559038737" in r.stderr  # the bogus region, EINVAL
    assert "config_space.id.vid == 0xdead" in r.stderr


class SampleLike(PciModel):
    """A device with the identity libvfio-user's sample client insists on."""

    name = "samplelike"

    def __init__(self) -> None:
        super().__init__(ConfigSpace(vendor_id=0xDEAD, device_id=0xBEEF, class_code=0xFF0000,
                                     subsystem_vendor_id=0xCAFE, subsystem_id=0xBABE))  # fmt: skip
        self.add_bar(0, 4096, read=lambda o, w: 0, write=lambda o, w, v: None)
        self.add_bar(1, 0x4000, read=lambda o, w: 0, write=lambda o, w, v: None)
        self.seal()


def test_libvfio_user_client_goes_as_far_as_dma_logging() -> None:
    """With that identity the client also resets the device, maps 16 DMA regions sharing one
    file at different offsets (SCM_RIGHTS), configures INTx with an eventfd, and stops at
    DEVICE_FEATURE (dirty-page logging for migration), which udrv does not implement."""
    model = SampleLike()
    with served(model) as (server, path):
        r = subprocess.run(
            [str(SAMPLES / "client"), path], capture_output=True, text=True, timeout=30
        )
        deadline = time.monotonic() + 5
        while server.connection is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the server notices the client left and drops its session
        conn_gone = server.connection is None
    assert "IRQ INTx: count=1 flags=0x7" in r.stdout
    assert "failed to start dirty page logging: Operation not supported" in r.stderr
    assert conn_gone and model.faults == []
