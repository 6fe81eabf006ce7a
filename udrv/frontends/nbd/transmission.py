"""The NBD transmission phase (proto.md "Transmission phase") on a driver's hardware queues.

A :class:`Worker` is one thread, one :class:`~udrv.block.queue.HardwareQueue` and the
connections it serves; there is no task or callback per request. Each pass of its loop:

1. ``poll`` on its sockets, the queue's completion eventfd and a wake-up eventfd (new
   connections, stop), or, for a polled queue with requests out, no sleep at all;
2. parse every request in each socket's buffer: a READ or WRITE that fits a tag's buffer
   (and a FLUSH) becomes ``queue_rq`` on a free tag, a WRITE's payload copied from the socket
   buffer into the tag's buffer; one ``commit`` (one doorbell) for the batch;
3. ``complete`` the finished requests and queue their replies; a READ's reply points at the
   tag's buffer, so the data goes from the device's DMA memory to the socket in the same
   ``sendmsg`` as the headers: one system call for every reply of the pass;
4. a tag is free again when its reply is sent (or its connection is gone) and, always, only
   after the queue completed it: a request a dead client left on the device keeps its
   buffer until the device is done with it (or ``expire`` aborted it, about once a second).

Everything else (unaligned or oversized requests, FUA, TRIM, WRITE_ZEROES, BLOCK_STATUS)
takes the slow path: the worker runs it to the end, one sub-request at a time on a tag of
its own, while completions of the fast path keep being answered. Sub-block writes are
read-modify-write under a lock shared by every worker of the export, so that two connections
writing different bytes of one block do not undo each other.

A request past the end of the disk gets EINVAL without reaching the driver; garbage (bad
magic, a WRITE over :data:`MAX_REQUEST`, a truncated message) ends the connection with a
log line, once the requests it has on the device are done.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from udrv.block.driver import BlockDriver
from udrv.block.queue import HardwareQueue, Op
from udrv.errors import FrontendError
from udrv.frontends.nbd.driverqueue import DriverQueue, result_errno
from udrv.kernel import nbd as N

log = logging.getLogger("udrv.frontends.nbd")
MAX_REQUEST = 32 << 20  # largest READ/WRITE accepted (proto.md: servers may limit)
RECV_SIZE = 256 * 1024  # bytes asked of one recv
RX_LIMIT = 1 << 20  # unparsed bytes buffered per connection (more when one WRITE needs it)
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)  # buffers per sendmsg (uio.h UIO_MAXIOV)
TICK = 1.0  # seconds between HardwareQueue.expire calls
STOP_GRACE = 5.0  # seconds a stopping worker waits for a client to take its replies
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = map(int, (Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD,
                                                      Op.WRITE_ZEROES))  # fmt: skip
_IN, _OUT, _HUP = select.POLLIN, select.POLLOUT, select.POLLHUP | select.POLLERR
_OFFSET = struct.Struct(">Q")
_ERROR = struct.Struct(">IH")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


# Errnos the wire lacks, sent as the nearest one it has (as nbdkit's server does); the rest
# become EIO. proto.md "Error values" lists what may be sent.
_NEAREST_WIRE_ERRNO = {errno.EROFS: N.NBD_EPERM, errno.EDQUOT: N.NBD_ENOSPC,
                       errno.EFBIG: N.NBD_ENOSPC}  # fmt: skip


def wire_errno(code: int) -> int:
    """The NBD error value for errno ``code``."""
    if code in N.WIRE_ERRNOS:
        return code
    return _NEAREST_WIRE_ERRNO.get(code, N.NBD_EIO)


@dataclass
class Session:
    """What one client negotiated before transmission (the kernel's device: nothing)."""

    tls: bool = False
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)


class Connection:
    """One socket in the transmission phase: unparsed bytes in, unsent replies out."""

    def __init__(self, sock: socket.socket, name: str, session: Session | None = None) -> None:
        sock.setblocking(False)
        self.sock, self.name = sock, name
        self.fd = sock.fileno()
        self.session = session or Session()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.rx = bytearray()
        self.need = N.REQUEST.size  # bytes the next request needs in rx
        self.tx: list[Any] = []  # buffers to send, in order
        self.sent_tags: list[int] = []  # tags whose replies are in tx: freed once it is sent
        self.blocked = False  # the socket was full: wait for POLLOUT
        self.eof = False  # no more requests will be read (DISC, EOF, garbage, stop)
        self.broken = False  # replies cannot be sent any more
        self.inflight = 0  # tags this connection holds
        self.events = 0  # what the worker polls this socket for
        self.requests = 0

    def end(self, level: int, why: str) -> None:
        """Read no more requests (those on the device still finish)."""
        if not self.eof:
            log.log(level, "%s: %s", self.name, why)
        self.eof = True

    def lost(self, why: object) -> None:
        """Replies cannot be sent: drop them and the unread requests."""
        if not self.broken:
            log.info("%s: connection lost: %s", self.name, why)
        self.eof = self.broken = True
        self.tx.clear()
        self.rx.clear()


class Worker:
    """One hardware queue of ``driver`` and the connections it serves, on one thread.

    Args:
        driver: the block driver; its ``hardware_queue(index, tags)``, or a
            :class:`~udrv.frontends.nbd.driverqueue.DriverQueue` when it has none.
        index: the hardware queue's number.
        tags: requests in flight at most (over all its connections).
        read_only: refuse writes with EPERM.
        rmw_lock: serialises read-modify-write across the export's workers.
    """

    def __init__(self, driver: BlockDriver, index: int, tags: int, *, name: str,
                 read_only: bool = False, rmw_lock: threading.Lock | None = None) -> None:  # fmt: skip
        self.driver, self.index, self.tags, self.name = driver, index, tags, name
        g = self.geometry = driver.geometry
        self.read_only = read_only or g.read_only
        self.size, self.bs_mask = g.size, g.block_size - 1
        self.rmw_lock = rmw_lock or threading.Lock()
        self.hwq: HardwareQueue | None = None
        self.error: BaseException | None = None
        self.conns: dict[int, Connection] = {}
        self._pending: collections.deque[Connection] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._stop_at = 0.0
        self._ready = threading.Event()
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.served = 0  # requests answered
        self.sends = 0  # sendmsg (TLS: send) calls that carried replies

    # -- control, from other threads ------------------------------------------------------------

    def start(self) -> Worker:
        """Start the thread and get the hardware queue; raise what that raised."""
        self.thread.start()
        self._ready.wait()
        if self.error is not None:
            self.join(0)
            raise FrontendError(f"{self.name}: cannot get hardware queue {self.index}: "
                                f"{self.error}") from None  # fmt: skip
        return self

    def add(self, sock: socket.socket, name: str, session: Session | None = None) -> None:
        """Serve ``sock`` (handshake done) on this worker's queue."""
        self._pending.append(Connection(sock, name, session))
        os.eventfd_write(self._wake, 1)

    @property
    def load(self) -> int:
        return len(self.conns) + len(self._pending)

    def stop(self) -> None:
        """End every connection once its requests are done, then the thread (no wait)."""
        self._stop_at = time.monotonic()
        self._stopping = True
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; whether it did."""
        if not self._done.wait(timeout):
            return False
        if self._wake >= 0:  # closed here, by the owner: stop() may still write to it
            os.close(self._wake)
            self._wake = -1
        return True

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            hwq = self.driver.hardware_queue(self.index, self.tags)
            self.hwq = hwq if hwq is not None else DriverQueue(self.driver, self.tags,
                                                               name=self.name)  # fmt: skip
        except Exception as exc:
            self.error = exc
            self._ready.set()
            self._done.set()
            return
        self._ready.set()
        try:
            self._setup()
            self._serve()
        except Exception as exc:  # a bug, or the driver's queue broke: say it, end cleanly
            self.error = exc
            log.exception("%s: the worker failed", self.name)
        finally:
            try:
                self._teardown()
            except Exception as exc:  # the queue would not close: say so, still end
                log.warning("%s: closing the hardware queue failed: %s", self.name, exc)
            finally:
                self._done.set()

    def _setup(self) -> None:
        hwq = self.hwq
        assert hwq is not None
        if hwq.tags < self.tags:
            raise FrontendError(f"{self.name}: the driver's hardware queue has {hwq.tags} tags, "
                                f"not {self.tags}")  # fmt: skip
        self.bufsize = hwq.buffer_size
        self.bufs = [hwq.buffer(t) for t in range(self.tags)]  # one slice each, made once
        self._scratch = memoryview(bytearray(RECV_SIZE))
        self.free = list(range(self.tags - 1, -1, -1))
        self.owner: list[Connection | None] = [None] * self.tags
        self.cookie = [0] * self.tags
        self.cmd = [0] * self.tags
        self.offset = [0] * self.tags
        self.length = [0] * self.tags
        self.started = 0  # requests the queue holds (queue_rq returned None)
        self.waiting, self.waited = -1, 0  # the slow path's tag and, once done, its result
        self.poller = select.poll()
        self.poller.register(self._wake, _IN)
        self.irq = hwq.fileno()
        if self.irq >= 0:
            self.poller.register(self.irq, _IN)
        self.next_tick = time.monotonic() + TICK

    def _serve(self) -> None:
        hwq, conns, irq, wake = self.hwq, self.conns, self.irq, self._wake
        assert hwq is not None
        while conns or self._pending or self.started or not self._stopping:
            now = time.monotonic()
            if self.started and irq < 0:
                timeout = 0  # a polled queue with requests out: busy polling
            else:
                timeout = max(0, int((self.next_tick - now) * 1000) + 1)
            for fd, ev in self.poller.poll(timeout):
                if fd == irq:
                    _drain(irq)
                elif fd == wake:
                    _drain(wake)
                    self._attach()
                else:
                    conn = conns[fd]
                    if ev & _OUT:
                        conn.blocked = False
                    if ev & (_IN | _HUP):
                        self._recv(conn)
            for conn in list(conns.values()):
                if conn.tls and conn.events & _IN and conn.sock.pending():  # type: ignore[attr-defined]
                    self._recv(conn)  # decrypted bytes the kernel's socket no longer shows
                if len(conn.rx) >= conn.need or (conn.eof and conn.rx):
                    self._parse(conn)
            hwq.commit()
            if self.started:
                for tag, res in hwq.complete():
                    self._finish(tag, res, True)
            if time.monotonic() >= self.next_tick:
                self._tick()
            late = self._stopping and time.monotonic() > self._stop_at + STOP_GRACE
            for conn in list(conns.values()):
                if late and conn.tx:
                    conn.lost(f"replies not taken {STOP_GRACE:g} s after the stop")
                if conn.tx and not conn.blocked:
                    self._send(conn)
                self._update(conn)

    def _tick(self) -> None:
        assert self.hwq is not None
        self.next_tick = time.monotonic() + TICK
        for tag, res in self.hwq.expire():
            self._finish(tag, res, True)

    def _attach(self) -> None:
        while self._pending:
            conn = self._pending.popleft()
            self.conns[conn.fd] = conn
            if self._stopping:
                conn.end(logging.DEBUG, "stopping")
        if self._stopping:
            for conn in self.conns.values():
                conn.end(logging.DEBUG, "stopping")

    def _update(self, conn: Connection) -> None:
        """Poll ``conn`` for what it can use now, or not at all (a socket that hung up would
        otherwise wake every poll); close it when it is done."""
        if conn.broken and conn.sent_tags:
            for tag in conn.sent_tags:
                self._release(tag)
            conn.sent_tags.clear()
        if conn.eof and not conn.inflight and not conn.tx and not conn.rx:
            self._close(conn)
            return
        want = 0
        if not conn.eof and len(conn.rx) < max(conn.need, RX_LIMIT):
            want |= _IN
        if conn.tx and conn.blocked:
            want |= _OUT
        if want != conn.events:
            if not want:
                self.poller.unregister(conn.fd)
            elif conn.events:
                self.poller.modify(conn.fd, want)
            else:
                self.poller.register(conn.fd, want)
            conn.events = want

    def _close(self, conn: Connection) -> None:
        if conn.events:
            self.poller.unregister(conn.fd)
        del self.conns[conn.fd]
        log.debug("%s: %s closed after %d requests", self.name, conn.name, conn.requests)
        conn.sock.close()

    def _teardown(self) -> None:
        for conn in list(self.conns.values()):
            conn.eof = conn.broken = True
            conn.inflight = 0
            self._close(conn)
        while self._pending:
            self._pending.popleft().sock.close()
        for b in getattr(self, "bufs", []):
            b.release()
        if self.hwq is not None:
            self.hwq.close()

    # -- reading requests -----------------------------------------------------------------------

    def _recv(self, conn: Connection) -> None:
        # recv_into the worker's scratch buffer: sock.recv(n) would allocate (and, past
        # malloc's mmap threshold, map and unmap) n bytes per call.
        sock, rx, scratch = conn.sock, conn.rx, self._scratch
        while len(rx) < max(conn.need, RX_LIMIT):
            try:
                n = sock.recv_into(scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (OSError, ssl.SSLError) as exc:
                conn.lost(exc)
                return
            if not n:  # what is complete in rx is still served
                conn.end(logging.DEBUG, "the client closed the connection")
                return
            rx += scratch[:n]
            if n < RECV_SIZE and not conn.tls:
                return  # drained (TLS: the record layer may hold more; ask until it says so)

    def _parse(self, conn: Connection) -> None:
        """Start every complete request in ``conn.rx`` while tags are free.

        The fast path (an aligned READ or WRITE that fits a tag's buffer, no FUA) is inline:
        it is most of what a disk sees, and a Python call per request costs under TCG."""
        rx, pos, end = conn.rx, 0, len(conn.rx)
        view = memoryview(rx)
        hsize, unpack = N.REQUEST.size, N.REQUEST.unpack_from
        free, owner, cookies, cmds = self.free, self.owner, self.cookie, self.cmd
        offsets, lengths, bufs = self.offset, self.length, self.bufs
        bufsize, mask, size = self.bufsize, self.bs_mask, self.size
        writable = not self.read_only
        try:
            while free and end - pos >= hsize:
                magic, flags, cmd, cookie, offset, length = unpack(rx, pos)
                if magic != N.NBD_REQUEST_MAGIC:
                    conn.end(logging.WARNING,
                             f"closing the connection: bad request magic {magic:#x}")  # fmt: skip
                    pos = end
                    break
                body = length if cmd == N.NBD_CMD_WRITE else 0
                if body > MAX_REQUEST:
                    conn.end(logging.WARNING, f"closing the connection: WRITE of {length} "
                                              f"bytes is over {MAX_REQUEST}")  # fmt: skip
                    pos = end
                    break
                if end - pos < hsize + body:
                    conn.need = hsize + body
                    break
                conn.need = hsize
                if cmd == N.NBD_CMD_DISC:
                    conn.end(logging.DEBUG, "NBD_CMD_DISC")
                    pos = end
                    break
                conn.requests += 1
                start, pos = pos + hsize, pos + hsize + body
                if ((cmd == N.NBD_CMD_READ or (body and writable))
                        and not flags & N.NBD_CMD_FLAG_FUA and 0 < length <= bufsize
                        and not (offset | length) & mask and offset + length <= size):  # fmt: skip
                    tag = free.pop()  # NBD READ/WRITE are Op READ/WRITE
                    owner[tag], cookies[tag], cmds[tag] = conn, cookie, cmd
                    offsets[tag], lengths[tag] = offset, length
                    conn.inflight += 1
                    if body:
                        bufs[tag][:length] = view[start:pos]
                    self._start(tag, cmd, offset, length)
                    continue
                payload = view[start:pos]
                self._request(conn, flags, cmd, cookie, offset, length, payload)
                del payload
        finally:
            view.release()
            del rx[:pos]
        if conn.eof and 0 < len(rx) < conn.need:  # EOF in the middle of a request
            what = "WRITE payload" if conn.need > hsize else "request"
            log.warning("%s: closing the connection: truncated %s", conn.name, what)
            rx.clear()

    def _start(self, tag: int, op: int, offset: int, length: int) -> None:
        """``queue_rq`` for a tag whose request is recorded; answer it if it is done."""
        assert self.hwq is not None
        try:
            r = self.hwq.queue_rq(tag, op, offset, length)
        except Exception as exc:
            r = -result_errno(exc)
        if r is None:
            self.started += 1
        else:
            self._finish(tag, r, False)

    def _request(self, conn: Connection, flags: int, cmd: int, cookie: int, offset: int,
                 length: int, payload: memoryview) -> None:  # fmt: skip
        """Start a request the fast path in :meth:`_parse` did not take: a FLUSH on the
        hardware queue, anything else on the slow path."""
        if cmd == N.NBD_CMD_FLUSH:
            tag = self.free.pop()
            self.owner[tag], self.cookie[tag], self.cmd[tag] = conn, cookie, cmd
            self.offset[tag], self.length[tag] = offset, 0
            conn.inflight += 1
            self._start(tag, FLUSH, 0, 0)
            return
        # A copy: the socket buffer under ``payload`` moves once this pass is parsed, and
        # an exception's traceback may keep the slow path's frames a while.
        data = bytes(payload)
        self.served += 1
        try:
            kind, data = self._slow(conn, flags, cmd, offset, length, data)
        except Exception as exc:
            code, why = wire_errno(result_errno(exc)), str(exc)
            level = logging.DEBUG if code == N.NBD_EINVAL else logging.WARNING
            log.log(level, "%s: %s at %#x+%#x failed: %s", conn.name,
                    N.CMD_NAMES.get(cmd, cmd), offset, length, why)  # fmt: skip
            self._error(conn, cookie, code, why)
            return
        if kind == N.NBD_REPLY_TYPE_BLOCK_STATUS:
            self._chunk(conn, cookie, kind, data)
        elif cmd == N.NBD_CMD_READ and conn.session.structured:
            self._chunk(conn, cookie, N.NBD_REPLY_TYPE_OFFSET_DATA, _OFFSET.pack(offset), data)
        else:
            self._reply(conn, cookie, 0, data)

    # -- completions and replies ----------------------------------------------------------------

    def _finish(self, tag: int, res: int, started: bool) -> None:
        if started:
            self.started -= 1
        if tag == self.waiting:
            self.waiting, self.waited = -1, res
            return
        conn = self.owner[tag]
        assert conn is not None
        self.served += 1
        if conn.broken:  # nobody to answer: the tag is free now that the device is done
            self._release(tag)
            return
        cookie = self.cookie[tag]
        if res < 0:
            code = wire_errno(-res)
            self._error(conn, cookie, code, os.strerror(-res))
            self._release(tag)
            return
        if self.cmd[tag] == N.NBD_CMD_READ:
            assert self.hwq is not None
            data = self.bufs[tag][: self.length[tag]]
            if conn.session.structured:
                self._chunk(conn, cookie, N.NBD_REPLY_TYPE_OFFSET_DATA,
                            _OFFSET.pack(self.offset[tag]), data)  # fmt: skip
            else:
                conn.tx.append(N.REPLY.pack(N.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
                conn.tx.append(data)
            conn.sent_tags.append(tag)  # its buffer is in tx: free once sent
        else:
            conn.tx.append(N.REPLY.pack(N.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
            self._release(tag)

    def _release(self, tag: int) -> None:
        conn = self.owner[tag]
        assert conn is not None
        conn.inflight -= 1
        self.owner[tag] = None
        self.free.append(tag)

    def _reply(self, conn: Connection, cookie: int, error: int, data: bytes = b"") -> None:
        conn.tx.append(N.REPLY.pack(N.NBD_SIMPLE_REPLY_MAGIC, error, cookie))
        if data:
            conn.tx.append(data)

    def _chunk(self, conn: Connection, cookie: int, kind: int, head: bytes,
               data: Any = b"") -> None:  # fmt: skip
        """One structured reply chunk that ends the reply (proto.md "Structured reply chunk
        message"): every reply of ours is a single chunk with NBD_REPLY_FLAG_DONE."""
        conn.tx.append(N.CHUNK.pack(N.NBD_STRUCTURED_REPLY_MAGIC, N.NBD_REPLY_FLAG_DONE, kind,
                                    cookie, len(head) + len(data)) + head)  # fmt: skip
        if len(data):
            conn.tx.append(data)

    def _error(self, conn: Connection, cookie: int, code: int, message: str) -> None:
        """With structured replies an error is an NBD_REPLY_TYPE_ERROR chunk (a READ's must
        be: proto.md "Structured replies"), the message for the client's log."""
        if not conn.session.structured:
            self._reply(conn, cookie, code)
            return
        raw = message.encode()[:4096]
        self._chunk(conn, cookie, N.NBD_REPLY_TYPE_ERROR, _ERROR.pack(code, len(raw)) + raw)

    def _send(self, conn: Connection) -> None:
        """Send what ``conn.tx`` holds, in as few system calls as the socket takes (one
        ``sendmsg`` of up to IOV_MAX buffers; TLS: one record write)."""
        tx, sock = conn.tx, conn.sock
        while tx:
            try:
                if conn.tls:
                    if len(tx) > 1:
                        tx[:] = [b"".join(tx)]
                    n = sock.send(tx[0])
                else:
                    n = sock.sendmsg(tx[:IOV_MAX])
                self.sends += 1
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                conn.blocked = True
                return
            except (OSError, ssl.SSLError) as exc:
                conn.lost(exc)
                break
            i = 0
            while i < len(tx) and n >= len(tx[i]):
                n -= len(tx[i])
                i += 1
            if n:
                tx[i] = memoryview(tx[i])[n:]
            del tx[:i]
        for tag in conn.sent_tags:
            self._release(tag)
        conn.sent_tags.clear()

    # -- the slow path --------------------------------------------------------------------------

    def _slow(self, conn: Connection, flags: int, cmd: int, offset: int, length: int,
              payload: bytes) -> tuple[int, Any]:  # fmt: skip
        """Serve one request to the end; its reply's (chunk type, data)."""
        g = self.geometry
        if cmd not in N.CMD_NAMES:
            raise OSError(errno.EINVAL, f"unknown command {cmd}")
        if cmd == N.NBD_CMD_READ and length > MAX_REQUEST:
            raise FrontendError(f"READ of {length} bytes is over the maximum size {MAX_REQUEST}")
        if offset + length > g.size:
            raise FrontendError(f"{offset:#x}+{length:#x} is past the end ({g.size:#x})")
        if self.read_only and cmd in (N.NBD_CMD_WRITE, N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
            raise OSError(errno.EPERM, "the export is read-only")
        if cmd == N.NBD_CMD_BLOCK_STATUS:
            return N.NBD_REPLY_TYPE_BLOCK_STATUS, self._block_status(conn, flags, offset, length)
        tag = self._take_tag()
        self.owner[tag] = conn
        conn.inflight += 1
        try:
            if cmd == N.NBD_CMD_READ:
                return N.NBD_REPLY_TYPE_OFFSET_DATA, self._read(tag, offset, length)
            if cmd == N.NBD_CMD_WRITE:
                self._write(tag, offset, payload)
            elif cmd == N.NBD_CMD_TRIM:
                if not g.discard:
                    raise OSError(errno.EOPNOTSUPP, "discard is not supported")
                # Only whole blocks can be discarded; TRIM is advisory, so trim the inside.
                bs = g.block_size
                start, end = -(-offset // bs) * bs, (offset + length) // bs * bs
                if end > start:
                    self._sync(tag, DISCARD, start, end - start)
            elif cmd == N.NBD_CMD_WRITE_ZEROES:
                self._write_zeroes(tag, offset, length)
            if flags & N.NBD_CMD_FLAG_FUA:
                self._sync(tag, FLUSH, 0, 0)
            return 0, b""
        finally:
            self._release(tag)

    def _take_tag(self) -> int:
        while not self.free:
            if self._stopping:
                raise OSError(errno.ESHUTDOWN, "the server is stopping")
            self._pump()
        return self.free.pop()

    def _sync(self, tag: int, op: int, offset: int, length: int) -> None:
        """Request ``tag`` on the queue, and wait for it (answering others meanwhile)."""
        hwq = self.hwq
        assert hwq is not None
        r = hwq.queue_rq(tag, op, offset, length)
        if r is None:
            self.started += 1
            self.waiting = tag
            hwq.commit()
            for t, res in hwq.complete():  # a fast device may be done already
                self._finish(t, res, True)
            while self.waiting == tag:
                self._pump()
            r = self.waited
        if r < 0:
            raise OSError(-r, f"{Op(op).name} at {offset:#x}+{length:#x}: {os.strerror(-r)}")

    def _pump(self) -> None:
        """One wait for the device (or a socket to take replies), without reading requests."""
        hwq = self.hwq
        assert hwq is not None
        p = select.poll()
        if self.irq >= 0:
            p.register(self.irq, _IN)
        for conn in self.conns.values():
            if conn.tx and conn.blocked:
                p.register(conn.fd, _OUT)
        busy = self.started and self.irq < 0
        timeout = 0 if busy else max(0, int((self.next_tick - time.monotonic()) * 1000) + 1)
        for fd, ev in p.poll(timeout):
            if fd == self.irq:
                _drain(fd)
            elif ev & (_OUT | _HUP):
                self.conns[fd].blocked = False
        if self.started:
            for tag, res in hwq.complete():
                self._finish(tag, res, True)
        if time.monotonic() >= self.next_tick:
            self._tick()
        for conn in self.conns.values():
            if conn.tx and not conn.blocked:
                self._send(conn)

    def _chunks(self, tag: int, op: int, offset: int, view: memoryview) -> None:
        """``op`` (READ or WRITE) of ``view`` at ``offset``, a tag's buffer at a time."""
        buf = self.bufs[tag]
        for pos in range(0, len(view), self.bufsize):
            n = min(self.bufsize, len(view) - pos)
            if op == WRITE:
                buf[:n] = view[pos : pos + n]
            self._sync(tag, op, offset + pos, n)
            if op == READ:
                view[pos : pos + n] = buf[:n]

    def _read(self, tag: int, offset: int, length: int) -> bytes | bytearray:
        bs = self.geometry.block_size
        start, end = offset // bs * bs, -(-(offset + length) // bs) * bs
        buf = bytearray(end - start)
        self._chunks(tag, READ, start, memoryview(buf))
        return buf if (start, end) == (offset, offset + length) else buf[offset - start :][:length]

    def _write(self, tag: int, offset: int, data: memoryview | bytes) -> None:
        bs = self.geometry.block_size
        start, end = offset // bs * bs, -(-(offset + len(data)) // bs) * bs
        if (start, end) == (offset, offset + len(data)):
            self._chunks(tag, WRITE, start, memoryview(data))
            return
        # Unaligned (clients that did not ask for block sizes may do it): read-modify-write,
        # under the export's lock so that writes to other bytes of the block are not undone.
        with self.rmw_lock:
            buf = bytearray(end - start)
            self._chunks(tag, READ, start, memoryview(buf))
            buf[offset - start : offset - start + len(data)] = data
            self._chunks(tag, WRITE, start, memoryview(buf))

    def _write_zeroes(self, tag: int, offset: int, length: int) -> None:
        g = self.geometry
        if (offset | length) & self.bs_mask:
            self._write(tag, offset, bytes(length))
            return
        step = g.max_write_zeroes or length or 1
        try:
            for pos in range(offset, offset + length, step):
                self._sync(tag, WRITE_ZEROES, pos, min(step, offset + length - pos))
            return
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
        buf = self.bufs[tag]  # no Write Zeroes on the device: write zero buffers
        buf[:] = bytes(len(buf))
        for pos in range(offset, offset + length, self.bufsize):
            self._sync(tag, WRITE, pos, min(self.bufsize, offset + length - pos))

    def _block_status(self, conn: Connection, flags: int, offset: int, length: int) -> bytes:
        """The base:allocation chunk payload: context id, then (length, flags) descriptors
        (proto.md "NBD_REPLY_TYPE_BLOCK_STATUS"), from the driver's ``extents``; a driver
        that cannot tell says "all data", which is always true."""
        ids = [i for i, name in conn.session.contexts.items() if name == N.BASE_ALLOCATION]
        if not ids or not conn.session.structured:
            raise FrontendError("BLOCK_STATUS without a negotiated metadata context")
        if length == 0:
            raise FrontendError("BLOCK_STATUS of 0 bytes")
        r = self.driver.extents(offset, length)
        if inspect.isawaitable(r):
            r = asyncio.run(_awaited(r))
        extents = r or [(offset, length, 0)]
        if flags & N.NBD_CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        descriptors = b"".join(struct.pack(">II", n, kind & (N.NBD_STATE_HOLE | N.NBD_STATE_ZERO))
                               for _o, n, kind in extents)  # fmt: skip
        return struct.pack(">I", ids[0]) + descriptors


async def _awaited(r: Any) -> Any:
    return await r


def _drain(fd: int) -> None:
    """Reset a non-blocking eventfd that polled readable."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def transmission_flags(driver: BlockDriver, read_only: bool) -> int:
    """The export's transmission flags (proto.md "Transmission flags").

    ``NBD_FLAG_CAN_MULTI_CONN`` says that "the server operates entirely without cache, or
    that the cache it uses is shared among all connections", so that a FLUSH or FUA on one
    connection covers the writes completed on all of them. Here every connection serves the
    one driver object, and a write is answered only once the driver completed it, so this
    holds when a flush covers every completed write, whichever queue it came through: the
    :class:`~udrv.block.driver.BlockDriver` contract for ``flush``, and NVMe's Flush (Base
    2.0 §7.1: it commits what every command completed for the namespace before the Flush
    was submitted had written, whichever queue carried it). A driver whose hardware queues
    each have a cache of their own declares
    :attr:`~udrv.block.driver.BlockDriver.flush_per_queue` true and is served without the
    flag (and a read-only export, which nothing can make stale, always has it). Sub-block
    writes are read-modify-written under one lock per export, so connections do not undo
    each other's bytes either.
    """
    g = driver.geometry
    ro = read_only or g.read_only
    flags = N.NBD_FLAG_HAS_FLAGS | N.NBD_FLAG_SEND_FLUSH | N.NBD_FLAG_SEND_FUA
    flags |= N.NBD_FLAG_SEND_WRITE_ZEROES
    if ro or not driver.flush_per_queue:
        flags |= N.NBD_FLAG_CAN_MULTI_CONN
    if g.discard:
        flags |= N.NBD_FLAG_SEND_TRIM
    if ro:
        flags |= N.NBD_FLAG_READ_ONLY
    return flags
