"""The edu driver, and /dev/edu0 used by programs that know nothing of udrv."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udrv
from udrv.drivers.edu import Edu
from udrv.drivers.edu.driver import EduError

pytestmark = pytest.mark.lab("edu")
Bind = Callable[[str, "str | None"], str]
HERE = Path(__file__).parent


@pytest.mark.parametrize("interrupts", ["msi", "intx", None])
def test_driver(bound: Bind, interrupts: str | None) -> None:
    with udrv.open(bound("edu", "vfio-pci")) as dev, Edu(dev, interrupts=interrupts) as edu:
        assert edu.version == (1, 0)
        assert edu.check_liveness(0xA5A5A5A5)
        assert [edu.factorial(n) for n in (0, 1, 5, 12)] == [1, 1, 120, 479001600]
        assert edu.factorial(13) == 6227020800 % (1 << 32)  # 32-bit register wraps
        data = os.urandom(4000)
        edu.dma_to_device(data, 50)
        assert edu.dma_from_device(4000, 50) == data
        with pytest.raises(EduError, match="does not fit the device buffer"):
            edu.dma_to_device(b"x" * 100, 4000)
        with pytest.raises(EduError, match="beyond edu's 28-bit DMA mask"):
            edu.dma(1 << 28, 0x40000, 16, to_ram=False)


def test_driver_works_over_uio(bound: Bind) -> None:
    from udrv.dma.hugepage import reserve_hugepages

    reserve_hugepages(4)
    with udrv.open(bound("edu", "uio_pci_generic")) as dev, Edu(dev, interrupts="intx") as edu:
        assert edu.factorial(6) == 720
        edu.dma_to_device(b"hello uio", 0)
        assert edu.dma_from_device(9, 0) == b"hello uio"


@pytest.fixture
def served(bound: Bind) -> Iterator[subprocess.Popen[str]]:
    address = bound("edu", "vfio-pci")
    proc = subprocess.Popen(
        [sys.executable, "-m", "udrv", "edu", "serve", address, "--name", "edu0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "/dev/edu0" in proc.stdout.readline()
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def test_factorial_from_the_shell(served: subprocess.Popen[str]) -> None:
    r = subprocess.run(
        "exec 3<>/dev/edu0; printf '\\012\\000\\000\\000' >&3; od -An -tu4 -N4 <&3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.split() == ["3628800"], r.stderr


def test_c_program_uses_factorial_and_dma_ioctls(
    served: subprocess.Popen[str], tmp_path: Path
) -> None:
    exe = tmp_path / "edu_client"
    include = Path(udrv.__file__).parent / "drivers" / "edu"
    subprocess.run(
        ["gcc", "-O1", "-I", str(include), "-o", str(exe), str(HERE / "helpers" / "edu_client.c")],
        check=True,
        timeout=120,
    )
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "factorial 12 479001600",
        "dma ok",
        "oversize rejected",
        "liveness ok f0f0f0f0",
    ]


def test_eight_concurrent_clients(served: subprocess.Popen[str]) -> None:
    results: dict[int, int] = {}

    def client(n: int) -> None:
        fd = os.open("/dev/edu0", os.O_RDWR)
        try:
            for _ in range(3):
                os.write(fd, n.to_bytes(4, "little"))
                results[n] = int.from_bytes(os.read(fd, 4), "little")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    import math

    assert results == {n: math.factorial(n) for n in range(1, 9)}


def test_killed_server_releases_device_and_can_serve_again(
    served: subprocess.Popen[str], bound: Bind
) -> None:
    fd = os.open("/dev/edu0", os.O_RDWR)
    served.send_signal(signal.SIGKILL)
    served.wait(10)
    with pytest.raises(OSError):
        os.write(fd, (5).to_bytes(4, "little"))
    os.close(fd)
    deadline = time.monotonic() + 10
    while Path("/dev/edu0").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The device is releasable: open it again and it works.
    with udrv.open("1234:11e8") as dev, Edu(dev) as edu:
        assert edu.factorial(5) == 120
