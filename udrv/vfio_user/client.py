"""A vfio-user client: the VFIO device interface of a server's device, over its socket.

A reader thread takes every message off the socket: replies wake the request that waits
for them, and the server's own commands (DMA_READ/DMA_WRITE into memory mapped without a
file descriptor) are answered from the buffers registered with :meth:`Client.dma_map`.
Requests may come from several threads at once ("Command Concurrency").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import itertools
import os
import socket
import threading
import time
from types import TracebackType

from udrv.errors import VfioUserError
from udrv.kernel import vfio as V
from udrv.vfio_user import protocol as P
from udrv.vfio_user.transport import Channel, Message, PeerClosed, _cmd_name

#: What this client accepts from a server.
CLIENT_CAPS = P.Negotiated(max_msg_fds=8)


#: Seconds a client waits for a server socket that does not accept yet.
STARTUP_WAIT = 3.0


class _Slot:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.message: Message | None = None


class Client:
    """A connection to a vfio-user server.

    Args:
        path: the server's Unix socket.
        timeout: seconds any request may take.

    Raises:
        VfioUserError: nothing listens at ``path`` (the message says how to start a
            server), or the version negotiation failed.
    """

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path, self.timeout = path, timeout
        self.name = f"vfio-user:{path}"
        sock = self._connect(path, min(timeout, STARTUP_WAIT))
        self.ch = Channel(sock, name=self.name, timeout=timeout)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._plock = threading.Lock()
        self._local: list[tuple[int, int, memoryview, bool]] = []  # addr, size, memory, writable
        self._gone: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{self.name} reader", daemon=True)
        self._reader.start()
        self.server = P.Negotiated()
        try:
            self._negotiate()
        except BaseException:
            self.close()
            raise

    # -- plumbing --------------------------------------------------------------------------

    def _connect(self, path: str, wait: float) -> socket.socket:
        """Connect, waiting up to ``wait`` seconds for a server that is still starting (the
        usual `udrv emulate ... &` followed at once by a client)."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except OSError as exc:
                sock.close()
                starting = exc.errno in (E.ENOENT, E.ECONNREFUSED)
                if starting and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                hint = (
                    f"; start a server first, e.g. `udrv emulate edu --socket {path}`"
                    if starting
                    else ""
                )
                raise VfioUserError(
                    f"cannot connect to {self.name}{hint}", errno=exc.errno
                ) from None

    def _read(self) -> None:
        try:
            while True:
                msg = self.ch.recv()
                if msg.is_reply:
                    with self._plock:
                        slot = self._pending.get(msg.msg_id)
                    if slot is None:
                        msg.close_fds()
                        continue
                    slot.message = msg
                    slot.event.set()
                else:
                    self._serve(msg)
        except PeerClosed:
            self._gone = f"{self.name}: the server closed the connection"
        except VfioUserError as exc:
            self._gone = str(exc)
        finally:
            with self._plock:
                for slot in self._pending.values():
                    slot.event.set()

    def request(
        self, command: int, payload: bytes = b"", *, fds: tuple[int, ...] | list[int] = ()
    ) -> Message:
        """Send a command and wait for its reply.

        Returns:
            The reply; its ``fds`` are the caller's to keep or close.

        Raises:
            VfioUserError: the server refused (``errno`` is its error), did not answer within
                the timeout, or went away.
        """
        what = _cmd_name(command)
        if self._gone is not None:
            raise VfioUserError(f"{what}: {self._gone}", errno=E.ENOTCONN)
        slot = _Slot()
        with self._plock:
            msg_id = next(self._ids) & 0xFFFF
            self._pending[msg_id] = slot
        try:
            self.ch.send(msg_id, command, payload, fds=fds)
            if not slot.event.wait(self.timeout):
                raise VfioUserError(
                    f"{self.name}: no reply to {what} within {self.timeout:g} s (server hung?)",
                    errno=E.ETIMEDOUT,
                )
            reply = slot.message
            if reply is None:
                raise VfioUserError(f"{what}: {self._gone or 'connection lost'}", errno=E.ENOTCONN)
        finally:
            with self._plock:
                self._pending.pop(msg_id, None)
        if reply.is_error:
            reply.close_fds()
            raise VfioUserError(
                f"{self.name}: the server refused {what}", errno=reply.error_no or E.EIO
            )
        if reply.command != command:
            reply.close_fds()
            raise VfioUserError(f"{self.name}: reply to {what} carries command {reply.command}")
        return reply

    def _serve(self, msg: Message) -> None:
        """A command from the server: DMA_READ/DMA_WRITE into memory mapped without an fd."""
        msg.close_fds()
        try:
            acc = P.parse(P.vfio_user_dma_region_access, msg.payload, _cmd_name(msg.command))
            if msg.command not in (P.Command.DMA_READ, P.Command.DMA_WRITE):
                raise VfioUserError(
                    f"unexpected command {msg.command} from the server", errno=E.ENOTSUP
                )
            write = msg.command == P.Command.DMA_WRITE
            mem = self._local_span(acc.addr, acc.count, write)
            if write:
                data = msg.payload[ctypes.sizeof(acc) :]
                if len(data) != acc.count:
                    raise VfioUserError("DMA_WRITE data does not match its count", errno=E.EINVAL)
                mem[:] = data
                self.ch.reply(msg, bytes(acc))
            else:
                self.ch.reply(msg, bytes(acc) + bytes(mem))
        except VfioUserError as exc:
            with contextlib.suppress(VfioUserError):
                self.ch.reply_error(msg, exc.errno or E.EINVAL)

    def _local_span(self, addr: int, count: int, write: bool) -> memoryview:
        for base, size, mem, writable in list(self._local):
            if base <= addr and addr + count <= base + size:
                if write and not writable:
                    raise VfioUserError(
                        f"DMA_WRITE to read-only memory at {addr:#x}", errno=E.EPERM
                    )
                return mem[addr - base : addr - base + count]
        raise VfioUserError(f"DMA of {count} bytes at {addr:#x}: not mapped", errno=E.EFAULT)

    def _negotiate(self) -> None:
        v = P.vfio_user_version(P.VERSION_MAJOR, P.VERSION_MINOR)
        reply = self.request(P.Command.VERSION, bytes(v) + CLIENT_CAPS.to_json())
        reply.close_fds()
        self.server = P.Negotiated.from_payload(reply.payload, f"{self.name} VERSION reply")
        if self.server.major != P.VERSION_MAJOR or self.server.minor > P.VERSION_MINOR:
            raise VfioUserError(
                f"{self.name}: the server answered version {self.server.major}."
                f"{self.server.minor} to our {P.VERSION_MAJOR}.{P.VERSION_MINOR}"
            )

    # -- device ------------------------------------------------------------------------------

    def device_info(self) -> P.vfio_user_device_info:
        req = P.vfio_user_device_info(argsz=ctypes.sizeof(P.vfio_user_device_info))
        reply = self.request(P.Command.DEVICE_GET_INFO, bytes(req))
        reply.close_fds()
        return P.parse(P.vfio_user_device_info, reply.payload, "DEVICE_GET_INFO reply")

    def region_info(self, index: int) -> tuple[P.vfio_region_info, bytes, int | None]:
        """(info, the whole reply payload for walking capabilities, the mmap fd or None)."""
        argsz = ctypes.sizeof(P.vfio_region_info)
        for _ in range(2):  # a second time with the argsz the server said it needs
            req = P.vfio_region_info(argsz=argsz, index=index)
            reply = self.request(P.Command.DEVICE_GET_REGION_INFO, bytes(req))
            info = P.parse(P.vfio_region_info, reply.payload, "DEVICE_GET_REGION_INFO reply")
            if info.argsz <= argsz or info.argsz > 65536:
                fds = reply.take_fds()
                for fd in fds[1:]:
                    os.close(fd)
                return info, reply.payload, fds[0] if fds else None
            reply.close_fds()
            argsz = info.argsz
        raise VfioUserError(f"{self.name}: region {index} info keeps growing")

    def irq_info(self, index: int) -> P.vfio_irq_info:
        req = P.vfio_irq_info(argsz=ctypes.sizeof(P.vfio_irq_info), index=index)
        reply = self.request(P.Command.DEVICE_GET_IRQ_INFO, bytes(req))
        reply.close_fds()
        return P.parse(P.vfio_irq_info, reply.payload, "DEVICE_GET_IRQ_INFO reply")

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int = 0,
        count: int = 0,
        *,
        fds: list[int] | None = None,
    ) -> None:
        """VFIO_USER_DEVICE_SET_IRQS; with ``fds``, DATA_EVENTFD and one fd per vector."""
        n = len(fds) if fds else count
        req = P.vfio_irq_set(argsz=ctypes.sizeof(P.vfio_irq_set), flags=flags, index=index, start=start, count=n)  # fmt: skip
        self.request(P.Command.DEVICE_SET_IRQS, bytes(req), fds=fds or ()).close_fds()

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        out = bytearray()
        step = self.server.max_data_xfer_size or P.DEFAULT_MAX_DATA_XFER_SIZE
        while len(out) < count:
            n = min(step, count - len(out))
            req = P.vfio_user_region_access(offset=offset + len(out), region=index, count=n)
            reply = self.request(P.Command.REGION_READ, bytes(req))
            reply.close_fds()
            data = reply.payload[ctypes.sizeof(req) :]
            if len(data) != n:
                raise VfioUserError(
                    f"{self.name}: REGION_READ of {n} bytes at {offset + len(out):#x} of region "
                    f"{index} returned {len(data)}"
                )
            out += data
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        step = self.server.max_data_xfer_size or P.DEFAULT_MAX_DATA_XFER_SIZE
        for at in range(0, len(data), step):
            chunk = data[at : at + step]
            req = P.vfio_user_region_access(offset=offset + at, region=index, count=len(chunk))
            self.request(P.Command.REGION_WRITE, bytes(req) + chunk).close_fds()

    def dma_map(
        self,
        addr: int,
        size: int,
        *,
        readable: bool = True,
        writable: bool = True,
        fd: int | None = None,
        offset: int = 0,
        memory: memoryview | None = None,
    ) -> None:
        """Make [addr, addr+size) reachable by the device: from ``fd`` (the server mmaps it)
        or, without one, through DMA_READ/DMA_WRITE served from ``memory``."""
        flags = (P.DMA_FLAG_READ if readable else 0) | (P.DMA_FLAG_WRITE if writable else 0)
        if fd is None:
            if memory is None or len(memory) < size:
                raise VfioUserError(
                    f"{self.name}: DMA_MAP without an fd needs {size} bytes of memory"
                )
            self._local.append((addr, size, memory.cast("B")[:size], writable))
        req = P.vfio_user_dma_map(argsz=ctypes.sizeof(P.vfio_user_dma_map), flags=flags, offset=offset, addr=addr, size=size)  # fmt: skip
        try:
            self.request(
                P.Command.DMA_MAP, bytes(req), fds=(fd,) if fd is not None else ()
            ).close_fds()
        except BaseException:
            self._local = [e for e in self._local if e[0] != addr]
            raise

    def dma_unmap(self, addr: int, size: int) -> None:
        req = P.vfio_user_dma_unmap(
            argsz=ctypes.sizeof(P.vfio_user_dma_unmap), addr=addr, size=size
        )
        try:
            self.request(P.Command.DMA_UNMAP, bytes(req)).close_fds()
        finally:
            self._local = [e for e in self._local if e[0] != addr]

    def reset(self) -> None:
        self.request(P.Command.DEVICE_RESET).close_fds()

    @property
    def connected(self) -> bool:
        return self._gone is None

    def close(self) -> None:
        """Disconnect (the server keeps the device state and drops our mappings)."""
        self.ch.close()
        if self._reader is not threading.current_thread():
            self._reader.join(self.timeout)
        self._local = []

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Client", "V"]
