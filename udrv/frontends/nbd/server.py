"""An NBD server on a socket: ``nbdinfo``, ``nbdcopy``, ``qemu-img``, ``nbd-client`` as clients.

:class:`NbdServer` speaks the fixed newstyle handshake (NBD_OPT_GO / INFO / LIST /
EXPORT_NAME / ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, STARTTLS) on a Unix or TCP
socket: reads as structured replies when the client asks, NBD_CMD_BLOCK_STATUS for
``base:allocation`` from the driver's ``extents`` (holes show in ``qemu-img map``), TLS with
Python's ``ssl`` and certificates in nbdkit's layout (:func:`tls_context`). TCP on a
non-loopback address without required TLS is refused unless the caller says ``insecure``.

Threads: one accepts; each new client gets a short-lived thread for its handshake (plain
blocking reads, a deadline of :data:`HANDSHAKE_TIMEOUT`); then its socket (an
``ssl.SSLSocket`` after STARTTLS) goes to a :class:`~udrv.frontends.nbd.transmission.Worker`.
The server has up to ``queues`` workers, each on one of the driver's hardware queues: the
first ``queues`` clients get one each (``nbdcopy --connections=N`` then drives N NVMe queue
pairs), later ones share the least loaded. Every export advertises
``NBD_FLAG_CAN_MULTI_CONN`` where that is true (:func:`transmission_flags`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from types import TracebackType

from udrv.block.driver import BlockDriver
from udrv.errors import FrontendError
from udrv.frontends.nbd.transmission import (
    MAX_REQUEST,
    ProtocolError,
    Session,
    Worker,
    transmission_flags,
)
from udrv.kernel import nbd as N

log = logging.getLogger("udrv.frontends.nbd")
HANDSHAKE_TIMEOUT = 10.0
MAX_OPTION = 4096  # option payloads are names and info requests: small
BASE_ALLOCATION_ID = 1  # our id for base:allocation (any u32 will do: proto.md)


class _Truncated(ProtocolError):
    """The client closed the connection in the middle of a message."""


class _Wire:
    """A blocking socket with a deadline for the whole handshake."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise _Truncated("truncated message")
            data += chunk
        return bytes(data)

    def write(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        """An option reply (proto.md "Fixed newstyle negotiation")."""
        self.write(N.OPTION_REPLY.pack(N.OPTION_REPLY_MAGIC, opt, rep, len(data)) + data)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def tls_context(directory: str | Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """The server's TLS context from certificates in nbdkit's layout (nbdkit-tls(1)):
    ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` in ``directory``.

    Args:
        verify_peer: require a client certificate signed by ``ca-cert.pem``
            (``nbdkit --tls-verify-peer``).

    Raises:
        FrontendError: a file is missing or unusable.
    """
    d = Path(directory)
    cert, key, ca = d / "server-cert.pem", d / "server-key.pem", d / "ca-cert.pem"
    missing = [p.name for p in (cert, key) + ((ca,) if verify_peer else ()) if not p.is_file()]
    if missing:
        raise FrontendError(f"TLS certificates in {d}: {', '.join(missing)} missing (the layout "
                            "is nbdkit's: ca-cert.pem, server-cert.pem, server-key.pem)")  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise FrontendError(f"cannot use the TLS certificates in {d}: {exc}") from None
    return ctx


class NbdServer:
    """An NBD server for ``driver`` (context manager): fixed newstyle, structured replies with
    block status (``base:allocation``), and TLS.

    Args:
        address: a Unix socket path, or ``(host, port)`` for TCP (port 0: any free port).
        export: the export name clients ask for ("" is the default export).
        read_only: refuse writes with EPERM and say so in the transmission flags.
        tls: the server's TLS context (:func:`tls_context`): clients may NBD_OPT_STARTTLS.
        tls_required: with ``tls``, refuse everything but STARTTLS before TLS
            (NBD_REP_ERR_TLS_REQD), as ``nbdkit --tls=require``.
        insecure: allow TCP on a non-loopback address without ``tls_required``. Without it
            that is refused: anyone who reaches the port could read and write the disk.
        queues: hardware queues (worker threads) at most; clients beyond share them.
        depth: requests in flight per hardware queue.

    Raises:
        FrontendError: a non-loopback TCP address without required TLS or ``insecure``.
    """

    def __init__(self, driver: BlockDriver, address: str | tuple[str, int], *, export: str = "",
                 read_only: bool = False, tls: ssl.SSLContext | None = None,
                 tls_required: bool = False, insecure: bool = False, queues: int = 1,
                 depth: int = 64) -> None:  # fmt: skip
        if tls_required and tls is None:
            raise FrontendError("tls_required needs a TLS context (tls_context(DIR))")
        if queues < 1 or depth < 1:
            raise FrontendError(f"queues={queues}, depth={depth}: need at least one")
        if (isinstance(address, tuple) and not _is_loopback(address[0])
                and not (tls_required or insecure)):  # fmt: skip
            host, port = address
            raise FrontendError(
                f"refusing to export the disk on {host}:{port} without TLS: anyone who can "
                "reach that address could read and write it. Enable TLS with "
                "--tls=require --tls-certificates DIR (DIR holding ca-cert.pem, "
                "server-cert.pem and server-key.pem, as for nbdkit), listen on "
                "127.0.0.1 or a Unix socket, or say --insecure if the network is trusted"
            )
        self.driver, self.address, self.export, self.read_only = driver, address, export, read_only
        self.tls, self.tls_required = tls, tls_required
        self.queues, self.depth = queues, depth
        self.uri = ""
        self.connections = 0
        self.workers: list[Worker] = []
        self._rmw = threading.Lock()
        self._assign = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake = -1
        self._handshaking: set[socket.socket] = set()
        self._stopping = False
        self._done = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> NbdServer:
        scheme = "nbds" if self.tls is not None else "nbd"
        try:
            if isinstance(self.address, str):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)
                lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                lsock.bind(self.address)
                self.uri = f"{scheme}+unix:///{self.export}?socket={self.address}"
            else:
                host, port = self.address
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                lsock = socket.socket(info[0], socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(info[4])
                port = lsock.getsockname()[1]
                self.uri = f"{scheme}://{host}:{port}/{self.export}"
            lsock.listen(64)
        except OSError as exc:
            raise FrontendError(f"cannot serve NBD on {self.address}: {exc}") from None
        lsock.setblocking(False)
        self._listener = lsock
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._accept, name="nbd-server", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        p = select.poll()
        p.register(self._listener, select.POLLIN)
        p.register(self._wake, select.POLLIN)
        try:
            while not self._stopping:
                p.poll()
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if not self._stopping:
                        log.warning("nbd server: accept failed: %s", exc)
                    continue
                if sock.family != socket.AF_UNIX:  # replies go out as they are ready
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connections += 1
                peer = f"nbd client {self.connections}"
                self._handshaking.add(sock)
                threading.Thread(target=self._client, args=(sock, peer), name=peer,
                                 daemon=True).start()  # fmt: skip
        finally:
            self._done.set()

    def _client(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(True)
        wire = _Wire(sock, time.monotonic() + HANDSHAKE_TIMEOUT)
        handed = False
        try:
            no_zeroes = self._greet(wire)
            got = self._options(wire, no_zeroes)
            if got is not None:
                session, worker = got
                worker.add(wire.sock, peer, session)
                handed = True
        except _Truncated:
            log.warning("%s: closing the connection during the handshake: truncated message",
                        peer)  # fmt: skip
        except ProtocolError as exc:
            log.warning("%s: closing the connection during the handshake: %s", peer, exc)
        except TimeoutError:
            log.warning("%s: handshake took over %g s; closing", peer, HANDSHAKE_TIMEOUT)
        except ssl.SSLError as exc:
            log.warning("%s: TLS failed: %s", peer, exc)
        except FrontendError as exc:
            log.warning("%s: %s", peer, exc)
        except OSError as exc:
            if not self._stopping:
                log.info("%s: connection lost: %s", peer, exc)
        finally:
            self._handshaking.discard(sock)
            self._handshaking.discard(wire.sock)
            if not handed:
                wire.sock.close()

    def _worker(self) -> Worker:
        """A worker for a new connection: a hardware queue of its own while there are fewer
        than ``queues``, else the least loaded."""
        with self._assign:
            if self._stopping:
                raise FrontendError("the server is stopping")
            idle = [w for w in self.workers if not w.load]
            if not idle and len(self.workers) < self.queues:
                w = Worker(self.driver, len(self.workers), self.depth,
                           name=f"nbd server queue {len(self.workers)}",
                           read_only=self.read_only, rmw_lock=self._rmw)  # fmt: skip
                try:
                    self.workers.append(w.start())
                except FrontendError as exc:
                    if not self.workers:
                        raise
                    log.warning("%s; sharing the queues there are", exc)
                    self.queues = len(self.workers)
            return min(self.workers, key=lambda w: w.load)

    def _greet(self, wire: _Wire) -> bool:
        wire.write(struct.pack(">QQH", N.NBDMAGIC, N.IHAVEOPT,
                               N.NBD_FLAG_FIXED_NEWSTYLE | N.NBD_FLAG_NO_ZEROES))  # fmt: skip
        (cflags,) = struct.unpack(">I", wire.read(4))
        if cflags & ~(N.NBD_FLAG_C_FIXED_NEWSTYLE | N.NBD_FLAG_C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        return bool(cflags & N.NBD_FLAG_C_NO_ZEROES)

    def _options(self, wire: _Wire, no_zeroes: bool) -> tuple[Session, Worker] | None:
        """Option haggling (proto.md "Option types"); the session and the worker (its
        hardware queue taken before the client is told to go) when transmission starts,
        None on NBD_OPT_ABORT."""
        g = self.driver.geometry
        tflags = transmission_flags(self.driver, self.read_only)
        session = Session()
        while True:
            magic, opt, length = N.OPTION.unpack(wire.read(N.OPTION.size))
            if magic != N.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise ProtocolError(f"option {opt} with a {length}-byte payload")
            data = wire.read(length)
            if opt == N.NBD_OPT_ABORT:
                wire.reply(opt, N.NBD_REP_ACK)
                return None
            if self.tls_required and not session.tls and opt != N.NBD_OPT_STARTTLS:
                if opt == N.NBD_OPT_EXPORT_NAME:  # it has no error reply: hang up
                    raise ProtocolError("NBD_OPT_EXPORT_NAME before TLS, which is required")
                wire.reply(opt, N.NBD_REP_ERR_TLS_REQD, b"TLS is required")
            elif opt == N.NBD_OPT_STARTTLS:
                self._starttls(wire, opt, length, session)
            elif opt == N.NBD_OPT_EXPORT_NAME:
                if data.decode(errors="replace") != self.export:
                    raise ProtocolError(f"unknown export {data[:64]!r}")  # no way to say so
                worker = self._worker()
                wire.write(struct.pack(">QH", g.size, tflags) + (b"" if no_zeroes else bytes(124)))
                return session, worker
            elif opt == N.NBD_OPT_LIST:
                if length:
                    wire.reply(opt, N.NBD_REP_ERR_INVALID)
                    continue
                raw = self.export.encode()
                wire.reply(opt, N.NBD_REP_SERVER, struct.pack(">I", len(raw)) + raw)
                wire.reply(opt, N.NBD_REP_ACK)
            elif opt == N.NBD_OPT_STRUCTURED_REPLY:
                if length:
                    wire.reply(opt, N.NBD_REP_ERR_INVALID)
                else:
                    session.structured = True
                    wire.reply(opt, N.NBD_REP_ACK)
            elif opt in (N.NBD_OPT_LIST_META_CONTEXT, N.NBD_OPT_SET_META_CONTEXT):
                self._meta_context(wire, opt, data, session)
            elif opt in (N.NBD_OPT_INFO, N.NBD_OPT_GO):
                parsed = _parse_info_request(data)
                if parsed is None:
                    wire.reply(opt, N.NBD_REP_ERR_INVALID)
                    continue
                name, requests = parsed
                if name != self.export:
                    wire.reply(opt, N.NBD_REP_ERR_UNKNOWN, b"no such export")
                    continue
                wire.reply(opt, N.NBD_REP_INFO, struct.pack(">HQH", N.NBD_INFO_EXPORT, g.size,
                                                            tflags))  # fmt: skip
                if N.NBD_INFO_BLOCK_SIZE in requests:
                    wire.reply(opt, N.NBD_REP_INFO, struct.pack(
                        ">HIII", N.NBD_INFO_BLOCK_SIZE, g.block_size, max(g.block_size, 4096),
                        min(g.max_transfer, MAX_REQUEST)))  # fmt: skip
                if opt == N.NBD_OPT_INFO:
                    wire.reply(opt, N.NBD_REP_ACK)
                    continue
                try:
                    worker = self._worker()
                except FrontendError as exc:  # proto.md: an error reply, then more options
                    wire.reply(opt, N.NBD_REP_ERR_SHUTDOWN, str(exc).encode()[:4096])
                    continue
                wire.reply(opt, N.NBD_REP_ACK)
                return session, worker
            else:
                wire.reply(opt, N.NBD_REP_ERR_UNSUP)

    def _starttls(self, wire: _Wire, opt: int, length: int, session: Session) -> None:
        """NBD_OPT_STARTTLS (proto.md "TLS support"): ACK, then the TLS handshake on the same
        socket; what was negotiated before it is forgotten."""
        if self.tls is None:
            wire.reply(opt, N.NBD_REP_ERR_UNSUP, b"TLS is not enabled")
        elif length or session.tls:
            wire.reply(opt, N.NBD_REP_ERR_INVALID)
        else:
            wire.reply(opt, N.NBD_REP_ACK)
            tls = self.tls.wrap_socket(wire.sock, server_side=True, do_handshake_on_connect=False)
            self._handshaking.add(tls)
            wire.sock = tls
            tls.settimeout(wire._left())
            tls.do_handshake()
            session.tls, session.structured, session.contexts = True, False, {}

    def _meta_context(self, wire: _Wire, opt: int, data: bytes, session: Session) -> None:
        """NBD_OPT_LIST/SET_META_CONTEXT (proto.md "Metadata querying"): only base:allocation
        exists; SET needs structured replies and selects it when asked for by name."""
        parsed = _parse_meta_request(data)
        if parsed is None:
            wire.reply(opt, N.NBD_REP_ERR_INVALID, b"malformed request")
            return
        name, queries = parsed
        if opt == N.NBD_OPT_SET_META_CONTEXT and not session.structured:
            wire.reply(opt, N.NBD_REP_ERR_INVALID, b"structured replies first")
            return
        if name != self.export:
            wire.reply(opt, N.NBD_REP_ERR_UNKNOWN, b"no such export")
            return
        listing = opt == N.NBD_OPT_LIST_META_CONTEXT
        # LIST with no query, or "base:" (a namespace), lists everything; SET takes full names.
        chosen = any(q == N.BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        if listing and not queries:
            chosen = True
        if opt == N.NBD_OPT_SET_META_CONTEXT:
            session.contexts = {BASE_ALLOCATION_ID: N.BASE_ALLOCATION} if chosen else {}
        if chosen:
            raw = N.BASE_ALLOCATION.encode()
            wire.reply(opt, N.NBD_REP_META_CONTEXT, struct.pack(">I", BASE_ALLOCATION_ID) + raw)
        wire.reply(opt, N.NBD_REP_ACK)

    def wait(self) -> None:
        self._done.wait()

    def serve_forever(self) -> None:
        self.wait()

    def stop(self) -> None:
        """Close the listening socket and every connection (once the requests they have on
        the device are done); safe from any thread."""
        if self._stopping:
            return
        with self._assign:
            self._stopping = True
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(30)
        for s in list(self._handshaking):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for w in self.workers:
            w.stop()
        for w in self.workers:
            if not w.join(90):
                log.error("nbd server: %s still has requests on the device after 90 s", w.name)
        if self._listener is not None:
            self._listener.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """NBD_OPT_*_META_CONTEXT payload: u32 name length, name, u32 count, (u32 length, query)s."""
    try:
        (n,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + n].decode()
        pos = 4 + n
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (q,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + q > len(data):
                return None
            queries.append(data[pos + 4 : pos + 4 + q].decode())
            pos += 4 + q
    except (struct.error, UnicodeDecodeError):
        return None
    return (name, queries) if pos == len(data) and len(name.encode()) == n else None


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    """NBD_OPT_INFO/GO payload: u32 name length, name, u16 count, u16 info types."""
    if len(data) < 6:
        return None
    (n,) = struct.unpack_from(">I", data)
    if 4 + n + 2 > len(data):
        return None
    name = data[4 : 4 + n].decode(errors="replace")
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        return None
    return name, set(struct.unpack_from(f">{count}H", data, 4 + n + 2))
