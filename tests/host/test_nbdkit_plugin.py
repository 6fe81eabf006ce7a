"""nbdkit Python plugins (API version 2) served by udrv: loading, configuration errors,
thread models and error mapping, through the NBD server on a Unix socket (no root)."""

from __future__ import annotations

import ast
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.test_nbd_server import Client, connected
from udrv.errors import PluginError
from udrv.frontends.nbd import NbdServer
from udrv.kernel import nbd as N
from udrv.plugins import ParallelPluginDriver, PluginDriver, load, nbdkit, open_driver
from udrv.plugins.driver import clip_extents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "plugins"
PLUGINS = Path(__file__).parent / "data" / "plugins"
UDRV = [sys.executable, "-m", "udrv"]
needs_libnbd = pytest.mark.skipif(
    not (shutil.which("nbdinfo") and shutil.which("nbdcopy")),
    reason="needs nbdinfo/nbdcopy (apt install libnbd-bin)",
)
PYTHON_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so")
needs_nbdkit = pytest.mark.skipif(
    not (shutil.which("nbdkit") and PYTHON_PLUGIN.exists()),
    reason="needs nbdkit with its Python plugin (apt install nbdkit nbdkit-plugin-python)",
)


def serve(driver: PluginDriver, tmp_path: Path) -> NbdServer:
    return NbdServer(driver, str(tmp_path / "plugin.sock"))


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[tuple[PluginDriver, NbdServer]]:
    plugin = load(EXAMPLES / "ram.py", ["size=8M"])
    driver = open_driver(plugin)
    with serve(driver, tmp_path) as server:
        yield driver, server
    driver.close()


# -- the nbdkit module ---------------------------------------------------------------------


@needs_nbdkit
def test_constants_match_nbdkits_own_module(tmp_path: Path) -> None:
    """Run a probe plugin under the real `nbdkit python` and compare its module's constants."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, nbdkit\nAPI_VERSION = 2\n"
        "print(repr({k: getattr(nbdkit, k) for k in dir(nbdkit) if k.isupper()}), "
        "file=sys.stderr)\n"
        "def open(ro): return 1\ndef get_size(h): return 512\ndef pread(h, b, o, f): pass\n"
    )
    r = subprocess.run(["nbdkit", "python", str(probe), "--dump-plugin"],
                       capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    theirs = ast.literal_eval(r.stderr.strip().splitlines()[0])
    ours = {k: getattr(nbdkit, k) for k in theirs}
    assert theirs and ours == theirs
    ours_names = {
        k for k in dir(nbdkit) if k.isupper() and k[0] != "_" and k != "THREAD_MODEL_NAMES"
    }
    assert ours_names == set(theirs)


@pytest.mark.parametrize(
    "text, size",
    [("4096", 4096), ("64M", 64 << 20), ("1g", 1 << 30), ("3s", 1536), ("10k", 10240),
     ("7b", 7), (" 2T ", 2 << 40)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert nbdkit.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1", "10X", "99999999999E"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="parse_size"):
        nbdkit.parse_size(text)


def test_set_error_is_per_thread() -> None:
    nbdkit.set_error(errno.ENOSPC)
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(nbdkit.take_error()))
    t.start()
    t.join()
    assert seen == [0] and nbdkit.take_error() == errno.ENOSPC and nbdkit.take_error() == 0


# -- loading and configuration --------------------------------------------------------------


def test_load_runs_config_in_order_and_reports_the_thread_model() -> None:
    plugin = load(PLUGINS / "slow.py", ["model=parallel", "delay=0.5", "model=serialize_requests"])
    assert plugin.thread_model == nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS
    assert plugin.module.delay == 0.5
    assert load(EXAMPLES / "ram.py").thread_model == nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def test_each_load_has_its_own_globals() -> None:
    a, b = load(EXAMPLES / "ram.py", ["size=1M"]), load(EXAMPLES / "ram.py", ["size=2M"])
    assert (len(a.module.disk), len(b.module.disk)) == (1 << 20, 2 << 20)


@pytest.mark.parametrize(
    "plugin, params, message",
    [
        (EXAMPLES / "ram.py", ["colour=red"],
         r"config\('colour', 'red'\) refused the configuration: unknown parameter 'colour'"),
        (EXAMPLES / "file.py", [], r"config_complete\(\) refused .*file parameter missing"),
        (EXAMPLES / "ram.py", ["size=lots"], r"config\('size', 'lots'\).*cannot parse 'lots'"),
        (EXAMPLES / "ram.py", ["64M"], r"parameter '64M' for ram.py is not key=value"),
        (PLUGINS / "readonly.py", ["a=b"], r"readonly.py takes no parameters .*drop 'a=b'"),
        (PLUGINS / "nope.py", [], r"plugin .*nope.py does not exist"),
        (PLUGINS / "s3like.py", ["bucket=b"], "key parameter missing"),
        (PLUGINS / "s3like.py", ["bucket=b", "key=k", "size=1M"], "must be given together"),
        (PLUGINS / "slow.py", ["model=sideways"], r"thread_model\(\) refused"),
    ],
)  # fmt: skip
def test_config_errors_name_the_plugin_and_the_fix(plugin: Path, params: list[str],
                                                    message: str) -> None:  # fmt: skip
    with pytest.raises(PluginError, match=message):
        load(plugin, params)


@pytest.mark.parametrize(
    "source, message",
    [
        ("def open(ro): pass\ndef get_size(h): return 512\ndef pread(h, b, o, f): pass\n",
         "declares API_VERSION = 1; udrv serves version 2"),
        ("API_VERSION = 2\ndef open(ro): pass\n", r"has no get_size, pread\(\)"),
        ("API_VERSION = 2\nimport nbdkit\nnbdkit.no_such_thing()\n",
         "failed while loading: AttributeError"),
        ("API_VERSION = 2\nimport nbdkit\ndef thread_model(): return 7\n"
         "def open(ro): pass\ndef get_size(h): return 512\ndef pread(h, b, o, f): pass\n",
         r"thread_model\(\) returned 7"),
    ],
)  # fmt: skip
def test_bad_plugins_are_refused(tmp_path: Path, source: str, message: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(PluginError, match=message):
        load(path)


def test_sizes_the_frontends_cannot_serve_are_refused(tmp_path: Path) -> None:
    tiny = load(EXAMPLES / "ram.py", ["size=100"])
    with pytest.raises(PluginError, match=r"get_size\(\) returned 100"):
        open_driver(tiny)
    odd = tmp_path / "odd.py"
    odd.write_text("API_VERSION = 2\ndef open(ro): return 1\ndef get_size(h): return 1 << 20\n"
                   "def block_size(h): return (4096, 4096, 512)\n"
                   "def pread(h, b, o, f): pass\n")  # fmt: skip
    with pytest.raises(PluginError, match="minimum 4096, maximum 512"):
        open_driver(load(odd))


def test_objects_larger_than_a_block_are_read_modify_written(tmp_path: Path) -> None:
    """The S3 plugin's block_size() is its object size (here 64K): the disk gets 4K blocks and
    the driver reads and writes whole objects, even with partial writes to one object in
    flight at once on a PARALLEL plugin."""
    s3 = load(PLUGINS / "s3like.py", ["bucket=b", "key=rmw", "size=1M", "object-size=64K",
                                      "latency=0.01"])  # fmt: skip
    driver = open_driver(s3, threads=8)
    assert driver.geometry.block_size == 4096 and driver.granule == 65536
    objects = s3.module.BUCKETS[("b", "rmw")]
    with serve(driver, tmp_path) as server:
        c = connected(server)
        blocks = {i: os.urandom(4096) for i in range(16)}  # all of object 0, 4K at a time
        for i, data in blocks.items():
            c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_WRITE, i, i * 4096,
                                       4096) + data)  # fmt: skip
        for _ in blocks:
            assert N.REPLY.unpack(c.recv(N.REPLY.size))[1] == 0
        assert objects[0] == b"".join(blocks[i] for i in range(16))  # no write was lost
        assert c.request(N.NBD_CMD_WRITE, 65536 + 512, 1024, b"p" * 1024) == (0, b"")
        assert objects[1] == bytes(512) + b"p" * 1024 + bytes(65536 - 1536)
        assert c.request(N.NBD_CMD_READ, 65536, 2048) == (0, bytes(512) + b"p" * 1024 + bytes(512))
        assert c.request(N.NBD_CMD_TRIM, 4096, 4096) == (0, b"")  # part of an object: kept
        assert sorted(objects) == [0, 1]
        assert c.request(N.NBD_CMD_TRIM, 65536, 65536) == (0, b"")  # a whole one: deleted
        assert sorted(objects) == [0]
        assert c.request(N.NBD_CMD_WRITE_ZEROES, 8192, 4096) == (0, b"")  # partial: RMW
        assert objects[0][8192:12288] == bytes(4096) and objects[0][:8192] == blocks[0] + blocks[1]
        c.close()
    driver.close()


def test_geometry_follows_the_can_queries() -> None:
    ram = PluginDriver(load(EXAMPLES / "ram.py", ["size=1M"]))
    g = ram.geometry
    assert (g.size, g.block_size, g.read_only, g.discard, g.volatile_cache) == (
        1 << 20, 512, False, True, True)  # fmt: skip
    ro = PluginDriver(load(PLUGINS / "readonly.py"))
    assert ro.geometry.read_only and not ro.geometry.discard and not ro.geometry.volatile_cache
    assert PluginDriver(load(EXAMPLES / "ram.py", ["size=1M"]), readonly=True).geometry.read_only
    s3 = load(PLUGINS / "s3like.py", ["bucket=b", "key=g", "size=1M", "object-size=4096"])
    d = open_driver(s3, threads=4)
    assert isinstance(d, ParallelPluginDriver) and d.geometry.block_size == 4096
    d.close()


# -- serving over NBD ------------------------------------------------------------------------


def test_ram_plugin_reads_writes_trims_and_zeroes(ram: tuple[PluginDriver, NbdServer]) -> None:
    driver, server = ram
    disk = driver.plugin.module.disk
    c = connected(server)
    data = os.urandom(8192)
    assert c.request(N.NBD_CMD_WRITE, 4096, 8192, data, flags=N.NBD_CMD_FLAG_FUA) == (0, b"")
    assert bytes(disk[4096 : 4096 + 8192]) == data  # it went to the plugin's own buffer
    assert c.request(N.NBD_CMD_READ, 4096, 8192) == (0, data)
    assert c.request(N.NBD_CMD_WRITE, 10, 3, b"abc") == (0, b"")  # unaligned: read-modify-write
    assert c.request(N.NBD_CMD_READ, 8, 7) == (0, b"\0\0abc\0\0")
    assert c.request(N.NBD_CMD_TRIM, 4096, 4096) == (0, b"")
    assert c.request(N.NBD_CMD_WRITE_ZEROES, 8192, 4096) == (0, b"")
    assert c.request(N.NBD_CMD_READ, 4096, 8192) == (0, bytes(8192))
    assert c.request(N.NBD_CMD_FLUSH, 0, 0) == (0, b"")
    c.close()


@needs_libnbd
def test_nbdcopy_round_trip_and_nbdinfo(ram: tuple[PluginDriver, NbdServer],
                                        tmp_path: Path) -> None:  # fmt: skip
    import json

    _, server = ram
    src = tmp_path / "in.img"
    src.write_bytes(os.urandom(8 << 20))
    subprocess.run(["nbdcopy", str(src), server.uri], check=True, timeout=60)
    subprocess.run(["nbdcopy", server.uri, str(tmp_path / "out.img")], check=True, timeout=60)
    assert (tmp_path / "out.img").read_bytes() == src.read_bytes()
    info = json.loads(subprocess.run(["nbdinfo", "--json", server.uri], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    (export,) = info["exports"]
    assert export["export-size"] == 8 << 20 and export["can_trim"] and not export["is_read_only"]


def test_file_plugin_writes_the_file(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    driver = open_driver(load(EXAMPLES / "file.py", [f"file={img}"]))
    assert isinstance(driver, ParallelPluginDriver)
    with serve(driver, tmp_path) as server:
        c = connected(server)
        assert c.request(N.NBD_CMD_WRITE, 512, 512, b"F" * 512) == (0, b"")
        assert c.request(N.NBD_CMD_FLUSH, 0, 0) == (0, b"")
        assert c.request(N.NBD_CMD_TRIM, 0, 512)[0] == N.NBD_ENOTSUP  # no trim: not offered
        c.close()
    driver.close()
    assert img.read_bytes()[512:1024] == b"F" * 512


def test_read_only_plugin(tmp_path: Path) -> None:
    driver = open_driver(load(PLUGINS / "readonly.py"))
    with serve(driver, tmp_path) as server:
        c = Client(str(server.address))
        c.greet()
        (rep, data), *_ = c.go()
        assert rep == N.NBD_REP_INFO
        assert int.from_bytes(data[10:12], "big") & N.NBD_FLAG_READ_ONLY
        assert c.request(N.NBD_CMD_READ, 3 * 512, 16) == (0, (3).to_bytes(8, "little") * 2)
        assert c.request(N.NBD_CMD_WRITE, 0, 512, bytes(512))[0] == N.NBD_EPERM
        assert c.request(N.NBD_CMD_WRITE_ZEROES, 0, 512)[0] == N.NBD_EPERM
        c.close()
    driver.close()


@pytest.mark.parametrize(
    "callback, error, cmd, wire",
    [
        ("pwrite", "ENOSPC", N.NBD_CMD_WRITE, N.NBD_ENOSPC),
        ("pread", "ENOMEM", N.NBD_CMD_READ, N.NBD_ENOMEM),
        ("pread", "EROFS", N.NBD_CMD_READ, N.NBD_EPERM),  # not on the wire: the nearest
        ("pwrite", "EDQUOT", N.NBD_CMD_WRITE, N.NBD_ENOSPC),
        ("pread", "ETIMEDOUT", N.NBD_CMD_READ, N.NBD_EIO),  # nothing near: EIO
        ("pread", "none", N.NBD_CMD_READ, N.NBD_EIO),  # no set_error: EIO, as nbdkit
        ("flush", "ESHUTDOWN", N.NBD_CMD_FLUSH, N.NBD_ESHUTDOWN),
        ("trim", "EINVAL", N.NBD_CMD_TRIM, N.NBD_EINVAL),
    ],
)
def test_set_error_reaches_the_client(tmp_path: Path, callback: str, error: str, cmd: int,
                                      wire: int) -> None:  # fmt: skip
    driver = open_driver(load(PLUGINS / "failing.py", [f"fail={callback}", f"error={error}",
                                                       "at=4096"]))  # fmt: skip
    with serve(driver, tmp_path) as server:
        c = connected(server)
        payload = bytes(512) if cmd == N.NBD_CMD_WRITE else b""
        assert c.request(cmd, 4096, 512, payload)[0] == wire
        if cmd != N.NBD_CMD_FLUSH:  # the same command elsewhere works
            assert c.request(cmd, 0, 512, payload)[0] == 0
        c.close()
    driver.close()


def test_zero_failing_with_eopnotsupp_falls_back_to_pwrite(tmp_path: Path) -> None:
    plugin = load(PLUGINS / "failing.py", ["fail=zero", "error=EOPNOTSUPP", "at=0"])
    driver = open_driver(plugin)
    plugin.module.disk[:] = b"x" * len(plugin.module.disk)
    with serve(driver, tmp_path) as server:
        c = connected(server)
        assert c.request(N.NBD_CMD_WRITE_ZEROES, 0, 4096) == (0, b"")  # zero() refused
        assert c.request(N.NBD_CMD_WRITE_ZEROES, 8192, 512) == (0, b"")  # zero() did it
        c.close()
    driver.close()
    disk = plugin.module.disk
    assert disk[:4096] == bytes(4096) and disk[8192:8704] == bytes(512)
    assert disk[4096:8192] == b"x" * 4096


def test_s3_shaped_plugin_trims_and_zeroes_whole_objects(tmp_path: Path) -> None:
    s3 = load(PLUGINS / "s3like.py", ["bucket=b", "key=z", "size=64K", "object-size=4096"])
    driver = open_driver(s3)
    with serve(driver, tmp_path) as server:
        c = connected(server)
        assert c.request(N.NBD_CMD_WRITE, 0, 8192, b"s" * 8192) == (0, b"")
        objects = s3.module.BUCKETS[("b", "z")]
        assert sorted(objects) == [0, 1]
        assert c.request(N.NBD_CMD_TRIM, 4096, 4096) == (0, b"")  # trim deletes object 1
        assert sorted(objects) == [0]
        assert c.request(N.NBD_CMD_WRITE_ZEROES, 0, 4096) == (0, b"")
        assert objects == {}
        assert c.request(N.NBD_CMD_READ, 0, 8192) == (0, bytes(8192))
        c.close()
    driver.close()


def _max_concurrent_reads(model: str, tmp_path: Path) -> int:
    plugin = load(PLUGINS / "slow.py", [f"model={model}", "delay=0.05"])
    driver = open_driver(plugin, threads=8)
    with serve(driver, tmp_path) as server:
        clients = [connected(server) for _ in range(2)]
        for c in clients:  # four reads per connection, sent before any reply is read
            for i in range(4):
                c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, i, 0, 512))
        for c in clients:
            for _ in range(4):
                magic, error, _cookie = N.REPLY.unpack(c.recv(N.REPLY.size))
                assert (magic, error) == (N.NBD_SIMPLE_REPLY_MAGIC, 0)
                c.recv(512)
            c.close()
    driver.close()
    return int(plugin.module.max_active)


@pytest.mark.parametrize(
    "model", ["serialize_connections", "serialize_all_requests", "serialize_requests"]
)
def test_serialised_plugins_get_one_request_at_a_time(model: str, tmp_path: Path) -> None:
    assert _max_concurrent_reads(model, tmp_path) == 1


def test_parallel_plugins_run_requests_concurrently(tmp_path: Path) -> None:
    assert _max_concurrent_reads("parallel", tmp_path) > 1


def test_serialised_driver_locks_across_threads() -> None:
    """ublk calls a sync driver from one thread per queue: the lock must hold there too."""
    plugin = load(PLUGINS / "slow.py", ["delay=0.02"])
    driver = open_driver(plugin)
    threads = [threading.Thread(target=driver.read, args=(0, memoryview(bytearray(512))))
               for _ in range(6)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert plugin.module.max_active == 1


def test_clip_extents() -> None:
    H, Z = nbdkit.EXTENT_HOLE, nbdkit.EXTENT_ZERO
    raw = [(0, 4096, 0), (4096, 4096, 0), (8192, 8192, H | Z), (20480, 4096, Z)]
    assert clip_extents(raw, 1024, 20000) == [(1024, 7168, 0), (8192, 8192, 3), (16384, 4096, 0),
                                              (20480, 544, 2)]  # fmt: skip
    assert clip_extents(iter([(0, 1 << 30, H)]), 512, 512) == [(512, 512, H)]
    with pytest.raises(OSError, match="described nothing"):
        clip_extents([(4096, 512, 0)], 0, 8192)


# -- the command line ------------------------------------------------------------------------


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*UDRV, "plugin", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


@needs_libnbd
def test_cli_serves_a_plugin_until_sigint(tmp_path: Path) -> None:
    sock = tmp_path / "cli.sock"
    proc, uri = _start([str(PLUGINS / "readonly.py"), "--frontend", "nbd", "--listen", str(sock),
                        "-v"])  # fmt: skip
    try:
        assert uri == f"nbd+unix:///?socket={sock}"
        out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=60)
        assert out.stdout[512 * 9 : 512 * 9 + 8] == (9).to_bytes(8, "little")
        assert len(out.stdout) == 1 << 20
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serialize_all_requests, read-only" in err
    assert "udrv.plugins.nbdkit: pread " in err  # -v shows nbdkit.debug()


def test_cli_config_error_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([*UDRV, "plugin", "serve", str(EXAMPLES / "file.py"), "--frontend", "nbd",
                        "--listen", str(tmp_path / "x.sock")],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "file parameter missing: give file=PATH" in r.stderr
    assert not (tmp_path / "x.sock").exists()


def test_plugin_shutdown_stops_the_cli(tmp_path: Path) -> None:
    plugin = tmp_path / "quits.py"
    plugin.write_text(
        "import nbdkit\nAPI_VERSION = 2\ndef open(ro): return 1\ndef get_size(h): return 4096\n"
        "def pread(h, buf, offset, flags):\n    buf[:] = bytes(len(buf))\n    nbdkit.shutdown()\n"
    )
    proc, _ = _start([str(plugin), "--frontend", "nbd", "--listen", str(tmp_path / "q.sock")])
    try:
        c = Client(str(tmp_path / "q.sock"))
        c.greet()
        c.go()
        c.request(N.NBD_CMD_READ, 0, 512)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


# -- nbdkit's own S3 plugin, unchanged, with a stand-in for boto3 ------------------------------

S3_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin")


@pytest.fixture
def fake_boto3(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """``boto3`` and ``botocore.exceptions`` modules just big enough for the S3 plugin to
    import; ``boto3.client()`` returns whatever the test puts in the dict."""
    import types

    holder: dict[str, object] = {}
    boto3 = types.ModuleType("boto3")
    boto3.client = lambda *args, **kw: holder["client"]  # type: ignore[attr-defined]
    botocore = types.ModuleType("botocore")
    exceptions = types.ModuleType("botocore.exceptions")

    class ClientError(Exception):
        def __init__(self, error_response: dict[str, object], operation_name: str) -> None:
            super().__init__(f"{operation_name}: {error_response}")
            self.response = error_response

    exceptions.ClientError = ClientError  # type: ignore[attr-defined]
    for name in ("ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError"):
        setattr(exceptions, name, type(name, (Exception,), {}))
    botocore.exceptions = exceptions  # type: ignore[attr-defined]
    for name, module in (("boto3", boto3), ("botocore", botocore),
                         ("botocore.exceptions", exceptions)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return holder


@pytest.mark.skipif(not S3_PLUGIN.exists(), reason="needs nbdkit-plugin-python (Debian)")
def test_nbdkits_s3_plugin_runs_unchanged(fake_boto3: dict[str, object], tmp_path: Path) -> None:
    """The S3 plugin Debian ships (an extensionless script), loaded as it is, its requests
    going to the in-memory S3 client it carries for its own unit tests."""
    with pytest.raises(PluginError, match="bucket parameter missing"):
        load(S3_PLUGIN, ["key=disk"])
    plugin = load(S3_PLUGIN, ["bucket=b", "key=disk", "size=1M", "object-size=64K"])
    assert plugin.thread_model == nbdkit.THREAD_MODEL_PARALLEL
    client = plugin.module.MockS3Client()
    fake_boto3["client"] = client
    driver = open_driver(plugin, threads=4)
    assert driver.geometry.block_size == 4096 and driver.granule == 65536
    with serve(driver, tmp_path) as server:
        c = connected(server)
        data = os.urandom(8192)
        assert c.request(N.NBD_CMD_WRITE, 65536 + 4096, 8192, data) == (0, b"")
        assert sorted(client.keys) == [("b", "disk/0000000000000001")]  # one whole object
        obj = client.keys[("b", "disk/0000000000000001")]
        assert obj == bytes(4096) + data + bytes(65536 - 12288)
        assert c.request(N.NBD_CMD_READ, 65536, 16384) == (0, bytes(4096) + data + bytes(4096))
        assert c.request(N.NBD_CMD_READ, 0, 4096) == (0, bytes(4096))  # never written
        assert c.request(N.NBD_CMD_TRIM, 65536, 65536) == (0, b"")
        assert client.keys == {}
        c.close()
    driver.close()
