"""The new user's path, as commands: `udrv emulate edu` in the background, then `udrv peek`,
`udrv info` and `udrv edu selftest` on vfio-user:PATH."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


@pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="needs nbdcopy (libnbd-bin)")
def test_nvme_model_served_as_a_disk_over_nbd(tmp_path: Path) -> None:
    """The issue's done-when: `udrv emulate nvme`, `udrv nvme serve vfio-user:... --frontend
    nbd --listen`, then nbdcopy fills 16 MiB of random data and reads it back intact."""
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")
    nvme_sock, nbd_sock = f"{d}/nvme.sock", f"{d}/n.sock"
    procs = []
    try:
        emu = subprocess.Popen([*UDRV, "emulate", "nvme", "--socket", nvme_sock, "--size", "32M"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(emu)
        assert emu.stdout is not None and "serving on" in emu.stdout.readline()
        srv = subprocess.Popen([*UDRV, "nvme", "serve", f"vfio-user:{nvme_sock}", "--frontend", "nbd",
                                "--listen", nbd_sock], stdout=subprocess.DEVNULL)  # fmt: skip
        procs.append(srv)
        deadline = time.monotonic() + 30
        while True:  # until it accepts connections
            assert srv.poll() is None, "udrv nvme serve ended early"
            assert time.monotonic() < deadline, "udrv nvme serve did not listen within 30 s"
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(nbd_sock)
                    break
                except OSError:
                    time.sleep(0.05)
        uri = f"nbd+unix:///?socket={nbd_sock}"
        data = os.urandom(16 << 20)
        src, back = tmp_path / "src", tmp_path / "back"
        src.write_bytes(data)
        subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=120)
        out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=120)
        back.write_bytes(out.stdout[: len(data)])
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert len(out.stdout) == 32 << 20  # the whole namespace
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)
