"""`udrv plugin serve`: plugins written for nbdkit's Python API as /dev/ublkbN in the lab.

The RAM plugin of examples/plugins/ram.py (64 MiB) takes mkfs.ext4, a mount and an fio
verify job; a plugin's nbdkit.set_error() errno reaches the application through ublk as far
as the block layer carries it (errno_to_blk_status in block/blk-core.c).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab(cpus=2)
ROOT = Path(__file__).resolve().parents[2]
RAM_PLUGIN = ROOT / "examples" / "plugins" / "ram.py"
FAILING_PLUGIN = ROOT / "tests" / "host" / "data" / "plugins" / "failing.py"


def sh(cmd: str, timeout: float = 300) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


class Served:
    """`udrv plugin serve PLUGIN ...` in a subprocess; ``path`` is the disk it printed."""

    def __init__(self, *args: str) -> None:
        subprocess.run(["modprobe", "ublk_drv"], check=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "udrv", "plugin", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.path = self.proc.stdout.readline().strip()
        assert re.fullmatch(r"/dev/ublkb\d+", self.path), self.proc.communicate(timeout=30)[1]
        deadline = time.monotonic() + 20
        while not os.path.exists(self.path):
            assert time.monotonic() < deadline, f"{self.path} did not appear"
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        deadline = time.monotonic() + 10
        while os.path.exists(self.path):
            assert time.monotonic() < deadline, f"{self.path} stayed after the plugin stopped"
            time.sleep(0.05)
        return err


@pytest.mark.slow  # make soak: `make test` stays under 30 minutes
def test_ram_plugin_takes_mkfs_mount_and_fio_verify(tmp_path: Path) -> None:
    srv = Served(str(RAM_PLUGIN), "size=64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert srv.path == "/dev/ublkb0"  # the first disk of a fresh guest
        assert int(sh(f"blockdev --getsize64 {srv.path}")) == 64 << 20
        sh(f"mkfs.ext4 -q -F {srv.path}")
        sh(f"mount {srv.path} {mnt}")
        try:
            out = sh(f"fio --name=v --directory={mnt} --size=16M --rw=randwrite --bs=4k "
                     "--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c "
                     "--verify_fatal=1 --output-format=json")  # fmt: skip
            job = json.loads(out[out.index("{") :])["jobs"][0]
            assert job["error"] == 0 and job["write"]["total_ios"] == 4096
            assert job["read"]["total_ios"] == 4096  # the verify pass read every block back
            (mnt / "note").write_bytes(os.urandom(1 << 20))
            want = (mnt / "note").read_bytes()
        finally:
            sh(f"umount {mnt}")
        sh(f"fsck.ext4 -n -f {srv.path}")
        sh(f"mount {srv.path} {mnt}")  # what the plugin holds, read back through a new mount
        try:
            assert (mnt / "note").read_bytes() == want
        finally:
            sh(f"umount {mnt}")
    finally:
        err = srv.stop()
    assert "ram.py (67108864 bytes, 512-byte blocks, serialize_all_requests)" in err
    assert "udrv: stopped" in err


@pytest.mark.parametrize(
    "error, seen",
    [
        ("ENOSPC", errno.ENOSPC),  # BLK_STS_NOSPC
        ("ETIMEDOUT", errno.ETIMEDOUT),  # BLK_STS_TIMEOUT
        ("ENODATA", errno.ENODATA),  # BLK_STS_MEDIUM
        ("EROFS", errno.EIO),  # no blk_status for it: BLK_STS_IOERR
        ("none", errno.EIO),  # no set_error(): EIO, as nbdkit
    ],
)
def test_set_error_reaches_the_application(error: str, seen: int) -> None:
    srv = Served(str(FAILING_PLUGIN), "fail=pread", f"error={error}", "at=64K")
    try:
        fd = os.open(srv.path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        try:
            with pytest.raises(OSError) as exc:
                os.preadv(fd, [buf], 64 << 10)
            assert exc.value.errno == seen, exc.value
            assert os.preadv(fd, [buf], 0) == 4096  # the disk lives on
        finally:
            os.close(fd)
            buf.close()
    finally:
        err = srv.stop()
    assert "pread() failed: pread fails here, as configured" in err


def _certificates(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1/localhost, in nbdkit's layout."""
    sh(f"cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem"
       " -days 2 -subj '/CN=udrv lab CA' -addext basicConstraints=critical,CA:TRUE"
       " -addext keyUsage=critical,keyCertSign"
       " && openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr"
       " -subj /CN=localhost"
       " && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n'"
       " > ext.cnf && openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem"
       " -CAcreateserial -out server-cert.pem -days 2 -extfile ext.cnf")  # fmt: skip


def test_nbd_client_over_tls(tmp_path: Path) -> None:
    """The kernel's NBD client through nbd-client's TLS, to `udrv plugin serve --tls=require`."""
    _certificates(tmp_path)
    subprocess.run(["modprobe", "nbd", "nbds_max=4"], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "udrv", "plugin", "serve", str(RAM_PLUGIN),
                             "size=16M", "--frontend", "nbd", "--listen", "127.0.0.1:10809",
                             "--tls=require", "--tls-certificates", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    uri = proc.stdout.readline().strip()
    dev = "/dev/nbd1"
    try:
        assert uri == "nbds://127.0.0.1:10809/", proc.communicate(timeout=30)[1]
        plain = subprocess.run(["nbd-client", "127.0.0.1", "10809", dev, "-N", "", "-nonetlink"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert plain.returncode != 0  # TLS is required
        sh(f"nbd-client 127.0.0.1 10809 {dev} -N '' -x -A {tmp_path}/ca-cert.pem -H localhost "
           "-b 512 -nonetlink")  # fmt: skip
        try:
            assert int(sh(f"blockdev --getsize64 {dev}")) == 16 << 20
            data = tmp_path / "data"
            data.write_bytes(os.urandom(4 << 20))
            sh(f"dd if={data} of={dev} bs=1M oflag=direct")
            sh(f"dd if={dev} of={tmp_path}/back bs=1M count=4 iflag=direct")
            assert (tmp_path / "back").read_bytes() == data.read_bytes()
        finally:
            sh(f"nbd-client -d {dev}")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


FILE_PLUGIN = ROOT / "examples" / "plugins" / "file.py"
READONLY_PLUGIN = ROOT / "tests" / "host" / "data" / "plugins" / "readonly.py"


def test_parallel_plugin_over_two_queues_fio_verify(tmp_path: Path) -> None:
    """file.py is THREAD_MODEL_PARALLEL: its callbacks run on a thread pool from each ublk
    queue's event loop; what fio wrote is in the file afterwards."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 32 << 20)
    srv = Served(str(FILE_PLUGIN), f"file={img}", "--queues", "2", "--threads", "8")
    try:
        out = sh(f"fio --name=v --filename={srv.path} --direct=1 --ioengine=libaio "
                 "--rw=randwrite --bs=4k --size=8M --iodepth=16 --numjobs=2 "
                 "--offset_increment=12M --verify=crc32c --verify_fatal=1 --group_reporting "
                 "--output-format=json")  # fmt: skip
        job = json.loads(out[out.index("{") :])["jobs"][0]
        assert job["error"] == 0 and job["write"]["total_ios"] == 2 * 2048
        sh(f"dd if=/dev/urandom of={tmp_path}/mark bs=64k count=1")
        sh(f"dd if={tmp_path}/mark of={srv.path} bs=64k seek=400 oflag=direct conv=fsync")
    finally:
        err = srv.stop()
    assert "parallel" in err
    mark = (tmp_path / "mark").read_bytes()
    with img.open("rb") as f:
        f.seek(400 * 65536)
        assert f.read(65536) == mark  # the plugin wrote through to its file


def test_read_only_plugin_is_a_read_only_disk() -> None:
    srv = Served(str(READONLY_PLUGIN))
    try:
        assert sh(f"blockdev --getro {srv.path}").strip() == "1"  # UBLK_ATTR_READ_ONLY
        r = subprocess.run(["dd", "if=/dev/zero", f"of={srv.path}", "bs=4k", "count=1",
                            "oflag=direct"], capture_output=True, text=True)  # fmt: skip
        assert r.returncode != 0
        fd = os.open(srv.path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            assert os.preadv(fd, [buf], 7 * 512) == 4096
            assert buf[:8] == (7).to_bytes(8, "little") and buf[512:520] == (8).to_bytes(
                8, "little"
            )
        finally:
            os.close(fd)
            buf.close()
    finally:
        err = srv.stop()
    assert "read-only" in err
