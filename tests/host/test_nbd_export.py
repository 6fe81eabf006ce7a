"""The NBD export on a par with nbdkit: structured replies, NBD_CMD_BLOCK_STATUS for
base:allocation, TLS (NBD_OPT_STARTTLS) and the refusal to export in the clear, with raw
bytes and with real clients (nbdinfo, qemu-img; nbdkit itself as the peer)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.host.test_nbd_server import Client
from udrv.block.ram import RamDisk
from udrv.errors import FrontendError
from udrv.frontends.nbd import NbdServer, tls_context
from udrv.kernel import nbd as N
from udrv.plugins import load, open_driver

ROOT = Path(__file__).resolve().parents[2]
FILE_PLUGIN = ROOT / "examples" / "plugins" / "file.py"
SIZE = 1 << 20
HOLE_ZERO = N.NBD_STATE_HOLE | N.NBD_STATE_ZERO
needs_nbdinfo = pytest.mark.skipif(not shutil.which("nbdinfo"),
                                   reason="needs nbdinfo (apt install libnbd-bin)")  # fmt: skip
needs_qemu_img = pytest.mark.skipif(not shutil.which("qemu-img"),
                                    reason="needs qemu-img (apt install qemu-utils)")  # fmt: skip
needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


class MappedRam(RamDisk):
    """A RAM disk that reports a fixed allocation map: 64K data, 64K hole, the rest zero."""

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        runs = [(0, 65536, 0), (65536, 65536, HOLE_ZERO), (131072, SIZE - 131072,
                                                           N.NBD_STATE_ZERO)]  # fmt: skip
        out = []
        for o, n, kind in runs:
            lo, hi = max(o, offset), min(o + n, offset + length)
            if lo < hi:
                out.append((lo, hi - lo, kind))
        return out


class StructuredClient(Client):
    def meta(self, opt: int, queries: list[str], name: str = "") -> list[tuple[int, bytes]]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        data += b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries)
        return self.option(opt, data)

    def chunk(self, cmd: int, offset: int, length: int, flags: int = 0,
              cookie: int = 9) -> tuple[int, int, bytes]:  # fmt: skip
        """Send one request; its (single, final) reply chunk: type, flags, payload."""
        self.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length))
        magic, cflags, kind, got, n = N.CHUNK.unpack(self.recv(N.CHUNK.size))
        assert magic == N.NBD_STRUCTURED_REPLY_MAGIC and got == cookie
        return kind, cflags, self.recv(n)


@pytest.fixture
def mapped(tmp_path: Path) -> Iterator[NbdServer]:
    disk = MappedRam(SIZE)
    with NbdServer(disk, str(tmp_path / "map.sock")) as s:
        yield s
    disk.close()


def negotiated(server: NbdServer, contexts: list[str] = [N.BASE_ALLOCATION]) -> StructuredClient:  # noqa: B006
    c = StructuredClient(str(server.address))
    c.greet()
    assert c.option(N.NBD_OPT_STRUCTURED_REPLY) == [(N.NBD_REP_ACK, b"")]
    c.meta(N.NBD_OPT_SET_META_CONTEXT, contexts)
    assert c.go()[-1][0] == N.NBD_REP_ACK
    return c


def test_meta_context_negotiation(mapped: NbdServer) -> None:
    c = StructuredClient(str(mapped.address))
    c.greet()
    base = (N.NBD_REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
    ack = (N.NBD_REP_ACK, b"")
    assert c.meta(N.NBD_OPT_LIST_META_CONTEXT, []) == [base, ack]  # no query: everything
    assert c.meta(N.NBD_OPT_LIST_META_CONTEXT, ["base:"]) == [base, ack]
    assert c.meta(N.NBD_OPT_LIST_META_CONTEXT, ["qemu:dirty-bitmap:a"]) == [ack]
    # SET before structured replies is invalid; after, it selects by full name only.
    assert c.meta(N.NBD_OPT_SET_META_CONTEXT, [N.BASE_ALLOCATION])[-1][0] == N.NBD_REP_ERR_INVALID
    assert c.option(N.NBD_OPT_STRUCTURED_REPLY) == [ack]
    assert c.meta(N.NBD_OPT_SET_META_CONTEXT, ["base:"]) == [ack]
    assert c.meta(N.NBD_OPT_SET_META_CONTEXT, ["x", N.BASE_ALLOCATION]) == [base, ack]
    assert c.meta(N.NBD_OPT_SET_META_CONTEXT, [N.BASE_ALLOCATION], name="other")[-1][0] == (
        N.NBD_REP_ERR_UNKNOWN
    )
    assert c.option(N.NBD_OPT_SET_META_CONTEXT, b"\0\0\0\0\0\0\0\5ab")[-1][0] == (
        N.NBD_REP_ERR_INVALID  # a query longer than the payload
    )
    c.close()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    opt=st.sampled_from([N.NBD_OPT_LIST_META_CONTEXT, N.NBD_OPT_SET_META_CONTEXT]),
    payload=st.one_of(
        st.binary(max_size=64),
        st.lists(st.text(max_size=20), max_size=4).map(
            lambda qs: (
                struct.pack(">II", 0, len(qs))
                + b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in qs)
            )
        ),
    ),
)
def test_any_meta_context_payload_gets_an_answer(
    mapped: NbdServer, opt: int, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the payload, the server answers (ACK or an error reply) and stays usable."""
    c = StructuredClient(str(mapped.address))
    with caplog.at_level(logging.WARNING):
        c.greet()
        c.option(N.NBD_OPT_STRUCTURED_REPLY)
        replies = c.option(opt, payload)
        final = (N.NBD_REP_ACK, N.NBD_REP_ERR_INVALID, N.NBD_REP_ERR_UNKNOWN)
        assert replies[-1][0] in final
        assert all(rep in (N.NBD_REP_META_CONTEXT, *final) for rep, _ in replies)
        assert c.go()[-1][0] == N.NBD_REP_ACK
    c.close()
    assert not caplog.records, caplog.text


def test_structured_reads_errors_and_block_status(mapped: NbdServer) -> None:
    c = negotiated(mapped)
    c.request(N.NBD_CMD_WRITE, 512, 4, b"abcd")  # simple replies for writes are allowed
    kind, flags, payload = c.chunk(N.NBD_CMD_READ, 512, 8)
    assert (kind, flags) == (N.NBD_REPLY_TYPE_OFFSET_DATA, N.NBD_REPLY_FLAG_DONE)
    assert payload == struct.pack(">Q", 512) + b"abcd" + bytes(4)
    kind, flags, payload = c.chunk(N.NBD_CMD_READ, SIZE - 512, 1024)  # past the end
    assert (kind, flags) == (N.NBD_REPLY_TYPE_ERROR, N.NBD_REPLY_FLAG_DONE)
    code, n = struct.unpack_from(">IH", payload)
    assert code == N.NBD_EINVAL and b"past the end" in payload[6 : 6 + n]

    kind, _, payload = c.chunk(N.NBD_CMD_BLOCK_STATUS, 4096, SIZE - 4096)
    assert kind == N.NBD_REPLY_TYPE_BLOCK_STATUS and payload[:4] == struct.pack(">I", 1)
    descs = list(struct.iter_unpack(">II", payload[4:]))
    assert descs == [(65536 - 4096, 0), (65536, HOLE_ZERO), (SIZE - 131072, N.NBD_STATE_ZERO)]
    _, _, one = c.chunk(N.NBD_CMD_BLOCK_STATUS, 0, SIZE, flags=N.NBD_CMD_FLAG_REQ_ONE)
    assert list(struct.iter_unpack(">II", one[4:])) == [(65536, 0)]
    assert c.chunk(N.NBD_CMD_BLOCK_STATUS, 0, 0)[0] == N.NBD_REPLY_TYPE_ERROR
    c.close()


def test_block_status_needs_a_context_and_a_driver_without_extents_is_all_data(
    tmp_path: Path,
) -> None:
    disk = RamDisk(SIZE)
    with NbdServer(disk, str(tmp_path / "plain.sock")) as s:
        c = negotiated(s, contexts=[])
        kind, _, payload = c.chunk(N.NBD_CMD_BLOCK_STATUS, 0, 4096)
        assert kind == N.NBD_REPLY_TYPE_ERROR and struct.unpack_from(">I", payload) == (
            N.NBD_EINVAL,
        )
        c.close()
        c = negotiated(s)
        _, _, payload = c.chunk(N.NBD_CMD_BLOCK_STATUS, 8192, 4096)
        assert list(struct.iter_unpack(">II", payload[4:])) == [(4096, 0)]
        c.close()
    disk.close()


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    img = tmp_path / "sparse.img"
    with img.open("wb") as f:
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(b"\xaa" * (128 << 10))
        f.seek(8 << 20)
        f.write(b"\x55" * (64 << 10))
    return img


def _serve_file(img: Path, sock: Path) -> tuple[NbdServer, object]:
    driver = open_driver(load(FILE_PLUGIN, [f"file={img}"]))
    return NbdServer(driver, str(sock)).start(), driver


@needs_nbdinfo
@needs_qemu_img
def test_nbdinfo_and_qemu_img_map_show_the_holes(sparse: Path, tmp_path: Path) -> None:
    server, driver = _serve_file(sparse, tmp_path / "f.sock")
    try:
        out = subprocess.run(["nbdinfo", "--map", "--json", server.uri], capture_output=True,
                             text=True, check=True, timeout=60).stdout  # fmt: skip
        runs = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert runs == [(0, 1 << 20, 3), (1 << 20, 128 << 10, 0),
                        ((1 << 20) + (128 << 10), (7 << 20) - (128 << 10), 3),
                        (8 << 20, 64 << 10, 0), ((8 << 20) + (64 << 10), (8 << 20) - (64 << 10),
                                                 3)]  # fmt: skip
        out = subprocess.run(["qemu-img", "map", "--output=json", server.uri],
                             capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
        data = [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]
        assert data == [(1 << 20, 128 << 10), (8 << 20, 64 << 10)]
    finally:
        server.stop()
        driver.close()  # type: ignore[attr-defined]


PYTHON_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so")


@needs_nbdinfo
@pytest.mark.skipif(not (shutil.which("nbdkit") and PYTHON_PLUGIN.exists()),
                    reason="needs nbdkit and nbdkit-plugin-python")  # fmt: skip
def test_the_same_plugin_maps_the_same_under_nbdkit(sparse: Path, tmp_path: Path) -> None:
    """nbdkit is the peer: its `nbdinfo --map` and ours of the same plugin and file agree."""
    server, driver = _serve_file(sparse, tmp_path / "ours.sock")
    try:
        ours = subprocess.run(["nbdinfo", "--map", server.uri], capture_output=True, text=True,
                              check=True, timeout=60).stdout  # fmt: skip
        theirs = subprocess.run(["nbdkit", "-U", "-", "python", str(FILE_PLUGIN), f"file={sparse}",
                                 "--run", "nbdinfo --map \"$uri\""], capture_output=True,
                                text=True, check=True, timeout=60).stdout  # fmt: skip
    finally:
        server.stop()
        driver.close()  # type: ignore[attr-defined]
    assert ours == theirs and "hole,zero" in ours


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for localhost/127.0.0.1, in nbdkit's layout."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
             "ca-cert.pem", "-days", "2", "-subj", "/CN=udrv test CA", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out",
             "server.csr", "-subj", "/CN=localhost", cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)  # fmt: skip
    return d


@pytest.fixture
def tls_server(pki: Path) -> Iterator[NbdServer]:
    disk = RamDisk(SIZE)
    disk.write(4096, memoryview(b"secret" * 100))
    with NbdServer(disk, ("127.0.0.1", 0), tls=tls_context(pki), tls_required=True) as s:
        yield s
    disk.close()


@needs_openssl
@needs_nbdinfo
def test_nbdinfo_over_tls(tls_server: NbdServer, pki: Path) -> None:
    assert tls_server.uri.startswith("nbds://127.0.0.1:")
    r = subprocess.run(["nbdinfo", f"{tls_server.uri}?tls-certificates={pki}"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "with TLS, using structured packets" in r.stdout and "export-size: 1048576" in r.stdout
    plain = tls_server.uri.replace("nbds://", "nbd://")
    r = subprocess.run(["nbdinfo", plain], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # TLS is required: no plain-text access


@needs_openssl
@needs_qemu_img
def test_qemu_img_with_tls_creds_x509(tls_server: NbdServer, pki: Path, tmp_path: Path) -> None:
    port = tls_server.uri.rsplit(":", 1)[1].strip("/")
    out = tmp_path / "out.raw"
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                        f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}", "--image-opts",
                        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                        "tls-creds=tls0", str(out)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[4096:4696] == b"secret" * 100 and len(out.read_bytes()) == SIZE


@needs_openssl
def test_starttls_with_a_raw_client(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = RamDisk(SIZE)
    with NbdServer(disk, ("127.0.0.1", 0), tls=tls_context(pki), tls_required=True) as s:
        port = int(s.uri.rsplit(":", 1)[1].strip("/"))
        c = Client.__new__(Client)
        c.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.greet()
        assert c.go()[-1][0] == N.NBD_REP_ERR_TLS_REQD  # before TLS: refused, not closed
        assert c.option(N.NBD_OPT_LIST)[-1][0] == N.NBD_REP_ERR_TLS_REQD
        assert c.option(N.NBD_OPT_STARTTLS) == [(N.NBD_REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        c.s = ctx.wrap_socket(c.s, server_hostname="localhost")
        assert c.option(N.NBD_OPT_STARTTLS)[-1][0] == N.NBD_REP_ERR_INVALID  # already TLS
        assert c.go()[-1][0] == N.NBD_REP_ACK
        assert c.request(N.NBD_CMD_READ, 0, 512) == (0, bytes(512))
        c.close()
        # A client that trusts another CA fails its handshake; the server lives on.
        bad = Client.__new__(Client)
        bad.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        bad.greet()
        bad.option(N.NBD_OPT_STARTTLS)
        with caplog.at_level(logging.ERROR), pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(bad.s, server_hostname="localhost")
        bad.close()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    disk.close()


@needs_openssl
def test_tls_on_also_serves_plain_clients(pki: Path, tmp_path: Path) -> None:
    disk = RamDisk(SIZE)
    with NbdServer(disk, str(tmp_path / "on.sock"), tls=tls_context(pki)) as s:
        assert s.uri.startswith("nbds+unix://")
        c = Client(str(s.address))
        c.greet()
        assert c.go()[-1][0] == N.NBD_REP_ACK
        c.close()
    disk.close()


def test_certificate_errors_name_the_files(tmp_path: Path) -> None:
    with pytest.raises(FrontendError, match=r"server-cert\.pem, server-key\.pem missing"):
        tls_context(tmp_path)
    (tmp_path / "server-cert.pem").write_text("not a certificate")
    (tmp_path / "server-key.pem").write_text("nor a key")
    with pytest.raises(FrontendError, match=f"cannot use the TLS certificates in {tmp_path}"):
        tls_context(tmp_path)


# -- exporting in the clear ----------------------------------------------------------------------


def test_non_loopback_without_tls_is_refused() -> None:
    disk = RamDisk(SIZE)
    with pytest.raises(FrontendError, match=r"0.0.0.0:10809 without TLS.*--tls=require "
                                            r"--tls-certificates DIR.*--insecure"):  # fmt: skip
        NbdServer(disk, ("0.0.0.0", 10809))
    for host in ("127.0.0.1", "::1", "localhost"):
        NbdServer(disk, (host, 0))  # loopback: fine (not started)
    with NbdServer(disk, ("0.0.0.0", 0), insecure=True) as s:
        assert s.uri.startswith("nbd://0.0.0.0:")
    disk.close()


def test_cli_refuses_and_explains(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "udrv", "ramdisk", "serve", "1M", "--frontend", "nbd"]
    r = subprocess.run([*base, "--listen", "0.0.0.0:10809"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "without TLS" in r.stderr and "--tls=require --tls-certificates DIR" in r.stderr
    r = subprocess.run([*base, "--listen", "127.0.0.1:0", "--tls=on"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 1 and "--tls=on needs --tls-certificates DIR" in r.stderr
    r = subprocess.run([*base, "--listen", "127.0.0.1:0", "--tls=require", "--tls-certificates",
                        str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 1 and "server-cert.pem, server-key.pem missing" in r.stderr
