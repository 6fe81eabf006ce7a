"""The new user's path, as commands: `udrv emulate edu` in the background, then `udrv peek`,
`udrv info` and `udrv edu selftest` on vfio-user:PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

UDRV = [sys.executable, "-m", "udrv"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UDRV, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def edu_socket() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")
    path = str(Path(d) / "edu.sock")
    proc = subprocess.Popen([*UDRV, "emulate", "edu", "--socket", path], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket listens
        assert f"serving on vfio-user:{path}" in line
        yield path
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean stop
        assert not os.path.exists(path)  # and the socket is removed
        shutil.rmtree(d, ignore_errors=True)


def test_peek_ident(edu_socket: str) -> None:
    r = run("peek", f"vfio-user:{edu_socket}", "0", "0x0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0x010000ed"


def test_poke_then_peek_liveness(edu_socket: str) -> None:
    assert run("poke", f"vfio-user:{edu_socket}", "0", "0x4", "0x0f0f0f0f").returncode == 0
    assert run("peek", f"vfio-user:{edu_socket}", "0", "0x4").stdout.strip() == "0xf0f0f0f0"


def test_info(edu_socket: str) -> None:
    r = run("info", f"vfio-user:{edu_socket}")
    assert r.returncode == 0, r.stderr
    assert "1234:11e8" in r.stdout and "MSI: Enable-" in r.stdout
    assert "Region 0: Memory at" in r.stdout and "[size=1M]" in r.stdout


@pytest.mark.parametrize("interrupts", ["msi", "intx"])
def test_edu_selftest(edu_socket: str, interrupts: str) -> None:
    r = run("edu", "selftest", "--interrupts", interrupts, f"vfio-user:{edu_socket}")
    assert r.returncode == 0, r.stderr
    assert "10! = 3628800 (interrupt)" in r.stdout
    assert "DMA round trip of 256 bytes: ok" in r.stdout


def test_no_server_is_a_one_line_error() -> None:
    r = run("peek", "vfio-user:/nonexistent/edu.sock", "0", "0x0")
    assert r.returncode == 1
    assert r.stderr.startswith("udrv: error: cannot connect to vfio-user:/nonexistent/edu.sock")
    assert "Traceback" not in r.stderr


def test_socket_in_use_is_refused(edu_socket: str) -> None:
    r = run("emulate", "edu", "--socket", edu_socket)
    assert r.returncode == 1 and "another server is listening" in r.stderr
    assert run("peek", f"vfio-user:{edu_socket}", "0", "0x0").stdout.strip() == "0x010000ed"


def test_config_reads_the_servers_config_space(edu_socket: str) -> None:
    r = run("config", f"vfio-user:{edu_socket}", "0x0", "--width", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0x11e81234"
