"""CUSE in the real kernel: a Python process publishes /dev/NAME for ordinary programs."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.helpers.echo_cuse import ECHO_ADD1

pytestmark = pytest.mark.lab()


def _start(name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lab.helpers.echo_cuse", name],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while not Path(f"/dev/{name}").exists():
        assert time.monotonic() < deadline, f"/dev/{name} did not appear"
        time.sleep(0.02)
    return proc


@pytest.fixture
def echo() -> Iterator[subprocess.Popen[str]]:
    proc = _start("echo0")
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_shell_tools_use_the_node(echo: subprocess.Popen[str]) -> None:
    r = subprocess.run(
        "printf 'hi there' > /dev/echo0 && head -c 8 /dev/echo0 | od -An -c",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.split() == ["h", "i", "t", "h", "e", "r", "e"]


def test_ioctl_through_the_retry_protocol(echo: subprocess.Popen[str]) -> None:
    fd = os.open("/dev/echo0", os.O_RDWR)
    try:
        buf = bytearray(struct.pack("<Q", 41))
        fcntl.ioctl(fd, ECHO_ADD1, buf)
        assert struct.unpack("<Q", buf) == (42,)
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(fd, 0x4242, 0)
        assert exc.value.errno == 25  # ENOTTY from the handler
    finally:
        os.close(fd)


def test_eight_concurrent_clients(echo: subprocess.Popen[str]) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            fd = os.open("/dev/echo0", os.O_RDONLY)
            try:
                results.append(os.read(fd, 16))
            finally:
                os.close(fd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all eight are now blocked in read in the driver
    Path("/dev/echo0").write_bytes(b"wake up")
    for t in threads:
        t.join(20)
    assert not errors
    assert results == [b"wake up"] * 8


def test_killed_driver_fails_blocked_reader_and_can_serve_again(
    echo: subprocess.Popen[str],
) -> None:
    outcome: list[object] = []

    def reader() -> None:
        fd = os.open("/dev/echo0", os.O_RDONLY)
        try:
            outcome.append(os.read(fd, 16))
        except OSError as exc:
            outcome.append(exc.errno)
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    echo.send_signal(signal.SIGKILL)
    echo.wait(10)
    t.join(15)
    assert not t.is_alive(), "the client hangs on a dead driver"
    assert time.monotonic() - killed_at < 10
    assert outcome and isinstance(outcome[0], int), f"reader got {outcome}, not an error"
    deadline = time.monotonic() + 10
    while Path("/dev/echo0").exists():
        assert time.monotonic() < deadline, "/dev/echo0 outlived its driver"
        time.sleep(0.05)
    again = _start("echo0")
    try:
        Path("/dev/echo0").write_bytes(b"back")
        with open("/dev/echo0", "rb") as f:
            assert f.read(4) == b"back"
    finally:
        again.terminate()
        again.wait(10)
