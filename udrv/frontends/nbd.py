"""NBD: a block driver as the kernel's ``/dev/nbdN``, or as an NBD server on a socket.

:class:`NbdDevice` hands one end of a socketpair per connection to the kernel's nbd driver
with the classic ioctls (``NBD_SET_SOCK``, ``NBD_DO_IT``...; ``linux/nbd.h``) and serves the
transmission phase on the other end. The ioctls need nothing beyond the module and keep the
device's life tied to this process (``NBD_DO_IT`` returns when we disconnect); the netlink
interface would add a dependency for features (dynamic device creation, status) a driver
does not need here.

:class:`NbdServer` speaks the fixed newstyle handshake (NBD_OPT_GO / INFO / LIST /
EXPORT_NAME / ABORT; simple replies only) on a Unix or loopback TCP socket, so ``nbdinfo``,
``nbdcopy``, ``qemu-img`` and ``nbd-client`` can use the driver.

Each connection runs in an asyncio loop: requests are read in order, each becomes a task (an
``async`` driver has many in flight), replies go out as they complete, cookie-tagged. A
request past the end of the disk gets EINVAL without reaching the driver; garbage (bad
magic, a length over the limit, a truncated message) closes the connection with a log line.
FUA writes are followed by a flush before the reply; a FLUSH is answered only after the
driver's ``flush`` returned, so nothing the kernel was told is durable can be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from types import TracebackType

from udrv.block.driver import BlockDriver, call
from udrv.errors import FrontendError
from udrv.kernel import nbd as N

log = logging.getLogger(__name__)
MAX_REQUEST = 32 << 20  # largest READ/WRITE accepted (proto.md: servers may limit)
HANDSHAKE_TIMEOUT = 10.0
MAX_OPTION = 4096  # option payloads are names and info requests: small
MAX_IN_FLIGHT = 256  # requests being served per connection


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


def _wire_errno(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno in N.WIRE_ERRNOS:
        return int(exc.errno)
    if isinstance(exc, FrontendError):
        return N.NBD_EINVAL
    return N.NBD_EIO


class Transmission:
    """The transmission phase of one connection (proto.md "Transmission phase")."""

    def __init__(self, driver: BlockDriver, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, read_only: bool = False, name: str = "nbd") -> None:  # fmt: skip
        self.driver, self.reader, self.writer = driver, reader, writer
        self.geometry = driver.geometry
        self.read_only, self.name = read_only, name
        self.tasks: set[asyncio.Task[None]] = set()
        self.requests = 0

    async def run(self) -> None:
        """Serve until NBD_CMD_DISC, EOF, or a protocol error (logged)."""
        try:
            while True:
                try:
                    head = await self.reader.readexactly(N.REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise ProtocolError("truncated request header") from None
                    return  # EOF between requests: the client went away
                magic, flags, cmd, cookie, offset, length = N.REQUEST.unpack(head)
                if magic != N.NBD_REQUEST_MAGIC:
                    raise ProtocolError(f"bad request magic {magic:#x}")
                if cmd == N.NBD_CMD_DISC:
                    return
                data = None
                if cmd == N.NBD_CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise ProtocolError(f"WRITE of {length} bytes is over {MAX_REQUEST}")
                    try:
                        data = await self.reader.readexactly(length)
                    except asyncio.IncompleteReadError:
                        raise ProtocolError("truncated WRITE payload") from None
                elif cmd == N.NBD_CMD_READ and length > MAX_REQUEST:
                    # The reply would carry that much; answer EINVAL, stay in sync.
                    self._reply(cookie, N.NBD_EINVAL)
                    continue
                self.requests += 1
                if len(self.tasks) >= MAX_IN_FLIGHT:  # bound the memory a client can pin
                    await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.get_running_loop().create_task(
                    self._handle(flags, cmd, cookie, offset, length, data)
                )
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except ProtocolError as exc:
            log.warning("%s: closing the connection: %s", self.name, exc)
        except (ConnectionError, OSError) as exc:
            log.info("%s: connection lost: %s", self.name, exc)
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.writer.drain()

    def _reply(self, cookie: int, error: int, payload: bytes | bytearray = b"") -> None:
        if self.writer.is_closing():
            return
        self.writer.write(N.REPLY.pack(N.NBD_SIMPLE_REPLY_MAGIC, error, cookie) + payload)

    async def _handle(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                      data: bytes | None) -> None:  # fmt: skip
        try:
            payload = await self._do(flags, cmd, offset, length, data)
        except Exception as exc:
            code = _wire_errno(exc)
            level = logging.DEBUG if code == N.NBD_EINVAL else logging.WARNING
            log.log(level, "%s: %s at %#x+%#x failed: %s", self.name,
                    N.CMD_NAMES.get(cmd, cmd), offset, length, exc)  # fmt: skip
            self._reply(cookie, code)
            return
        self._reply(cookie, 0, payload)
        if self.writer.transport.get_write_buffer_size() > 1 << 20:
            await self.writer.drain()

    async def _do(self, flags: int, cmd: int, offset: int, length: int,
                  data: bytes | None) -> bytes | bytearray:  # fmt: skip
        d, g = self.driver, self.geometry
        if cmd not in N.CMD_NAMES:
            raise OSError(errno.EINVAL, f"unknown command {cmd}")
        if cmd != N.NBD_CMD_FLUSH and offset + length > g.size:
            raise FrontendError(f"{offset:#x}+{length:#x} is past the end ({g.size:#x})")
        if self.read_only and cmd in (N.NBD_CMD_WRITE, N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
            raise OSError(errno.EPERM, "the export is read-only")
        if cmd == N.NBD_CMD_READ:
            return await self._read(offset, length)
        if cmd == N.NBD_CMD_WRITE:
            assert data is not None
            await self._write(offset, data)
        elif cmd == N.NBD_CMD_FLUSH:
            await call(d.flush())
            return b""
        elif cmd == N.NBD_CMD_TRIM:
            if not g.discard:
                raise OSError(errno.EOPNOTSUPP, "discard is not supported")
            # Only whole blocks can be discarded; TRIM is advisory, so trim the inside.
            bs = g.block_size
            start, end = -(-offset // bs) * bs, (offset + length) // bs * bs
            if end > start:
                await call(d.discard(start, end - start))
        elif cmd == N.NBD_CMD_WRITE_ZEROES:
            bs = g.block_size
            if offset % bs or length % bs:
                await self._write(offset, bytes(length))
            else:
                await call(d.write_zeroes(offset, length))
        if flags & N.NBD_CMD_FLAG_FUA:
            await call(d.flush())
        return b""

    async def _read(self, offset: int, length: int) -> bytearray:
        bs = self.geometry.block_size
        start, end = offset // bs * bs, -(-(offset + length) // bs) * bs
        buf = bytearray(end - start)
        await self._chunks(self.driver.read, start, memoryview(buf))
        return buf if (start, end) == (offset, offset + length) else buf[offset - start :][:length]

    async def _write(self, offset: int, data: bytes) -> None:
        bs = self.geometry.block_size
        start, end = offset // bs * bs, -(-(offset + len(data)) // bs) * bs
        if (start, end) == (offset, offset + len(data)):
            await self._chunks(self.driver.write, start, memoryview(data))
            return
        # Unaligned (clients that did not ask for block sizes may do it): read-modify-write.
        buf = bytearray(end - start)
        await self._chunks(self.driver.read, start, memoryview(buf))
        buf[offset - start : offset - start + len(data)] = data
        await self._chunks(self.driver.write, start, memoryview(buf))

    async def _chunks(self, op: object, offset: int, view: memoryview) -> None:
        step = self.geometry.max_transfer
        for pos in range(0, len(view), step):
            await call(op(offset + pos, view[pos : pos + step]))  # type: ignore[operator]


def _transmission_flags(driver: BlockDriver, read_only: bool) -> int:
    g = driver.geometry
    flags = N.NBD_FLAG_HAS_FLAGS | N.NBD_FLAG_SEND_FLUSH | N.NBD_FLAG_SEND_FUA
    flags |= N.NBD_FLAG_SEND_WRITE_ZEROES | N.NBD_FLAG_CAN_MULTI_CONN
    if g.discard:
        flags |= N.NBD_FLAG_SEND_TRIM
    if read_only:
        flags |= N.NBD_FLAG_READ_ONLY
    return flags


# -- the kernel's /dev/nbdN ---------------------------------------------------------------------


class NbdDevice:
    """``driver`` as ``/dev/nbdN`` (context manager). ``modprobe nbd`` first.

    Args:
        driver: the block driver; with several connections, an ``async`` driver gets one
            event loop per connection (``AsyncNvme`` one queue pair per connection).
        index: use ``/dev/nbdINDEX``; default: the first free one.
        connections: sockets handed to the kernel (it spreads requests over them).
        timeout: seconds the kernel waits for a reply before failing the request.
    """

    def __init__(self, driver: BlockDriver, *, index: int | None = None, connections: int = 1,
                 timeout: int = 30) -> None:  # fmt: skip
        if connections < 1:
            raise FrontendError(f"connections={connections}: need at least one")
        self.driver, self.index, self.connections, self.timeout = (
            driver,
            index,
            connections,
            timeout,
        )
        self.path = ""
        self.fd = -1
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._stopping = False
        self._stop_lock = threading.Lock()
        self.error: BaseException | None = None

    def _open_free(self) -> None:
        if not Path("/sys/module/nbd").exists():
            raise FrontendError("the nbd module is not loaded; run `modprobe nbd`")
        candidates = [self.index] if self.index is not None else range(256)
        for i in candidates:
            path = f"/dev/nbd{i}"
            if not os.path.exists(path):
                if self.index is not None:
                    raise FrontendError(f"{path} does not exist; `modprobe nbd nbds_max={i + 1}`")
                break
            if Path(f"/sys/block/nbd{i}/pid").exists():
                continue  # connected to someone else
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                N.nbd_ioctl(fd, N.NBD_CLEAR_SOCK, path=path)
                self.fd, self.path = fd, path
                return
            except FrontendError:
                os.close(fd)
        raise FrontendError("no free /dev/nbdN; disconnect one or `modprobe nbd nbds_max=N`")

    def start(self) -> NbdDevice:
        g = self.driver.geometry
        self._open_free()
        fd, path = self.fd, self.path
        try:
            N.nbd_ioctl(fd, N.NBD_SET_BLKSIZE, g.block_size, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_SIZE_BLOCKS, g.num_blocks, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_TIMEOUT, self.timeout, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_FLAGS, _transmission_flags(self.driver, False), path=path)
            for i in range(self.connections):
                kernel_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    N.nbd_ioctl(fd, N.NBD_SET_SOCK, kernel_end.fileno(), path=path)
                except FrontendError:
                    ours.close()
                    raise
                finally:
                    kernel_end.close()  # the kernel holds its own reference
                t = threading.Thread(target=self._serve, args=(ours, i), name=f"{self.path}-{i}",
                                     daemon=True)  # fmt: skip
                t.start()
                self._threads.append(t)
        except FrontendError:
            self._cleanup()
            raise
        except OSError as exc:
            self._cleanup()
            raise FrontendError(f"cannot set up {self.path or '/dev/nbdN'}: {exc}",
                                errno=exc.errno) from None  # fmt: skip
        doit = threading.Thread(target=self._do_it, name=f"{self.path}-do-it", daemon=True)
        doit.start()
        self._threads.append(doit)
        name = os.path.basename(self.path)
        size = Path(f"/sys/block/{name}/size")
        for _ in range(400):  # NBD_DO_IT creates the pid file, then sets the capacity
            if size.read_text().strip() not in ("", "0"):
                break
            if self._done.wait(0.025):
                raise FrontendError(f"{self.path} did not start: {self.error}")
        else:
            self.stop()
            raise FrontendError(f"{self.path} did not get its size within 10 s; see `dmesg`")
        return self

    def _do_it(self) -> None:
        try:
            # Blocks (GIL released) until disconnected.
            N.nbd_ioctl(self.fd, N.NBD_DO_IT, path=self.path)
        except FrontendError as exc:
            if not self._stopping:
                self.error = exc
                log.warning("%s: NBD_DO_IT ended: %s", self.path, exc)
        finally:
            self._done.set()

    def _serve(self, sock: socket.socket, i: int) -> None:
        async def main() -> None:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            await Transmission(self.driver, reader, writer, name=f"{self.path}[{i}]").run()
            writer.close()

        try:
            asyncio.run(main())
        except Exception as exc:
            log.exception("%s: connection %d failed", self.path, i)
            self.error = exc
        finally:
            sock.close()

    def wait(self) -> None:
        """Until :meth:`stop` or the kernel disconnects."""
        self._done.wait()

    def stop(self) -> None:
        """Disconnect: the kernel fails new I/O, NBD_DO_IT returns, the size drops to 0.
        Safe from several threads at once (the first does it, the others wait)."""
        with self._stop_lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self.fd < 0:
            return
        self._stopping = True
        with contextlib.suppress(FrontendError):
            N.nbd_ioctl(self.fd, N.NBD_DISCONNECT, path=self.path)
        self._done.wait(30)
        for t in self._threads:
            t.join(30)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FrontendError):
                N.nbd_ioctl(self.fd, N.NBD_CLEAR_SOCK, path=self.path)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NbdDevice:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()


# -- the socket server ----------------------------------------------------------------------------


class NbdServer:
    """An NBD server for ``driver`` (context manager), fixed newstyle, simple replies.

    Args:
        address: a Unix socket path, or ``(host, port)`` for TCP (port 0: any free port).
            TCP binds to the host given; serve on loopback unless you mean to export.
        export: the export name clients ask for ("" is the default export).
        read_only: refuse writes with EPERM and say so in the transmission flags.
    """

    def __init__(self, driver: BlockDriver, address: str | tuple[str, int], *, export: str = "",
                 read_only: bool = False) -> None:  # fmt: skip
        self.driver, self.address, self.export, self.read_only = driver, address, export, read_only
        self.uri = ""
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> NbdServer:
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise FrontendError(f"cannot serve NBD on {self.address}: {self.error}") from None
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()
            self._done.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)
            self._server = await asyncio.start_unix_server(self._client, path=self.address)
            self.uri = f"nbd+unix:///{self.export}?socket={self.address}"
        else:
            host, port = self.address
            self._server = await asyncio.start_server(self._client, host, port)
            port = self._server.sockets[0].getsockname()[1]
            self.uri = f"nbd://{host}:{port}/{self.export}"
        self._ready.set()
        async with self._server:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.serve_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = f"nbd client {self.connections}"
        try:
            no_zeroes = await asyncio.wait_for(self._greet(reader, writer), HANDSHAKE_TIMEOUT)
            go = await asyncio.wait_for(self._options(reader, writer, no_zeroes), HANDSHAKE_TIMEOUT)
            if go:
                await Transmission(self.driver, reader, writer, read_only=self.read_only,
                                   name=peer).run()  # fmt: skip
        except (ProtocolError, asyncio.IncompleteReadError) as exc:
            log.warning("%s: closing the connection during the handshake: %s", peer,
                        exc if isinstance(exc, ProtocolError) else "truncated message")  # fmt: skip
        except TimeoutError:
            log.warning("%s: handshake took over %g s; closing", peer, HANDSHAKE_TIMEOUT)
        except (ConnectionError, OSError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(struct.pack(">QQH", N.NBDMAGIC, N.IHAVEOPT,
                                 N.NBD_FLAG_FIXED_NEWSTYLE | N.NBD_FLAG_NO_ZEROES))  # fmt: skip
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))
        if cflags & ~(N.NBD_FLAG_C_FIXED_NEWSTYLE | N.NBD_FLAG_C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        return bool(cflags & N.NBD_FLAG_C_NO_ZEROES)

    def _opt_reply(
        self, writer: asyncio.StreamWriter, opt: int, rep: int, data: bytes = b""
    ) -> None:
        writer.write(N.OPTION_REPLY.pack(N.OPTION_REPLY_MAGIC, opt, rep, len(data)) + data)

    async def _options(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       no_zeroes: bool) -> bool:  # fmt: skip
        """Option haggling; True when transmission starts, False on NBD_OPT_ABORT."""
        g = self.driver.geometry
        tflags = _transmission_flags(self.driver, self.read_only)
        while True:
            magic, opt, length = N.OPTION.unpack(await reader.readexactly(N.OPTION.size))
            if magic != N.IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise ProtocolError(f"option {opt} with a {length}-byte payload")
            data = await reader.readexactly(length)
            if opt == N.NBD_OPT_EXPORT_NAME:
                if data.decode(errors="replace") != self.export:
                    raise ProtocolError(f"unknown export {data[:64]!r}")  # no way to say so
                writer.write(
                    struct.pack(">QH", g.size, tflags) + (b"" if no_zeroes else bytes(124))
                )
                return True
            if opt == N.NBD_OPT_ABORT:
                self._opt_reply(writer, opt, N.NBD_REP_ACK)
                await writer.drain()
                return False
            if opt == N.NBD_OPT_LIST:
                if length:
                    self._opt_reply(writer, opt, N.NBD_REP_ERR_INVALID)
                    continue
                raw = self.export.encode()
                self._opt_reply(writer, opt, N.NBD_REP_SERVER, struct.pack(">I", len(raw)) + raw)
                self._opt_reply(writer, opt, N.NBD_REP_ACK)
            elif opt in (N.NBD_OPT_INFO, N.NBD_OPT_GO):
                parsed = _parse_info_request(data)
                if parsed is None:
                    self._opt_reply(writer, opt, N.NBD_REP_ERR_INVALID)
                    continue
                name, requests = parsed
                if name != self.export:
                    self._opt_reply(writer, opt, N.NBD_REP_ERR_UNKNOWN, b"no such export")
                    continue
                self._opt_reply(writer, opt, N.NBD_REP_INFO,
                                struct.pack(">HQH", N.NBD_INFO_EXPORT, g.size, tflags))  # fmt: skip
                if N.NBD_INFO_BLOCK_SIZE in requests:
                    self._opt_reply(writer, opt, N.NBD_REP_INFO, struct.pack(
                        ">HIII", N.NBD_INFO_BLOCK_SIZE, g.block_size, max(g.block_size, 4096),
                        min(g.max_transfer, MAX_REQUEST)))  # fmt: skip
                self._opt_reply(writer, opt, N.NBD_REP_ACK)
                if opt == N.NBD_OPT_GO:
                    return True
            else:
                self._opt_reply(writer, opt, N.NBD_REP_ERR_UNSUP)
            await writer.drain()

    def wait(self) -> None:
        self._done.wait()

    def serve_forever(self) -> None:
        self.wait()

    def _shutdown(self) -> None:  # in the server's loop
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks():
            task.cancel()

    def stop(self) -> None:
        """Close the listening socket and every connection; safe from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(30)
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()


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
