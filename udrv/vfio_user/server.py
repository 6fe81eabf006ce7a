"""A vfio-user server: serves one :class:`~udrv.models.base.PciModel` on a Unix socket.

One client at a time (the specification's "dedicated sockets per client/server
connection"). Per connection a reader thread takes messages off the socket: replies to our
own DMA_READ/DMA_WRITE commands go to whoever waits for them, commands go to the handler
(the serving thread), which answers them in order ("Command Concurrency"). When the client
goes, its DMA mappings and eventfds are dropped and the device state is kept ("Client
Disconnection").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import itertools
import logging
import mmap
import os
import queue
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from udrv.errors import ModelError, VfioUserError
from udrv.kernel import vfio as V
from udrv.models.base import DetachedHost, PciModel
from udrv.vfio_user import protocol as P
from udrv.vfio_user.transport import Channel, Message, PeerClosed

log = logging.getLogger(__name__)

NUM_REGIONS = V.VfioPciRegion.VGA + 1  # VFIO_PCI_NUM_REGIONS
NUM_IRQS = V.VfioPciIrq.REQ + 1  # VFIO_PCI_NUM_IRQS
#: What this server accepts from a client ("Version" capabilities of the reply).
SERVER_CAPS = P.Negotiated(max_msg_fds=8, max_dma_maps=1024)


@dataclass
class DmaRegion:
    """Client memory the device may reach: mapped from the client's fd, or by messages."""

    addr: int
    size: int
    flags: int
    mem: mmap.mmap | None

    @property
    def end(self) -> int:
        return self.addr + self.size


class _Pending:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.message: Message | None = None


class Connection:
    """One client's session: the :class:`~udrv.models.base.Host` of the model meanwhile."""

    def __init__(self, model: PciModel, channel: Channel, *, timeout: float = 5.0) -> None:
        self.model, self.ch, self.timeout = model, channel, timeout
        self.client = P.Negotiated()
        self.negotiated = False
        self.dma: list[DmaRegion] = []
        self.irq_fds: dict[int, list[int | None]] = {}
        self.intx_masked = False
        self._commands: queue.Queue[Message | None] = queue.Queue(maxsize=256)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    # -- the session ---------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the client disconnects or sends something unrecoverable."""
        reader = threading.Thread(target=self._read, name="vfio-user reader", daemon=True)
        reader.start()
        self.model.host = self
        try:
            while True:
                msg = self._commands.get()
                if msg is None:
                    break
                self.handle(msg)
        finally:
            self.model.host = DetachedHost()
            self.close()
            reader.join(self.timeout)

    def _read(self) -> None:
        try:
            while True:
                msg = self.ch.recv()
                if msg.is_reply:
                    slot = self._pending.get(msg.msg_id)
                    if slot is None:
                        msg.close_fds()  # a reply nobody asked for
                        continue
                    slot.message = msg
                    slot.event.set()
                elif msg.flags & P.FLAG_TYPE_MASK == P.TYPE_COMMAND:
                    self._commands.put(msg)
                else:
                    msg.close_fds()
        except PeerClosed:
            pass
        except VfioUserError as exc:
            log.warning("%s", exc)  # framing is lost: end the session
        finally:
            for slot in list(self._pending.values()):
                slot.event.set()
            self._commands.put(None)

    def close(self) -> None:
        """Forget the client's memory and eventfds; close the socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for region in self.dma:
                if region.mem is not None:
                    with contextlib.suppress(BufferError):
                        region.mem.close()
            self.dma = []
            for fds in self.irq_fds.values():
                for fd in fds:
                    if fd is not None:
                        os.close(fd)
            self.irq_fds = {}
        self.ch.close()

    # -- dispatch --------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Answer one command; errors become error replies, never exceptions."""
        handlers = {
            P.Command.VERSION: self._version,
            P.Command.DMA_MAP: self._dma_map,
            P.Command.DMA_UNMAP: self._dma_unmap,
            P.Command.DEVICE_GET_INFO: self._device_info,
            P.Command.DEVICE_GET_REGION_INFO: self._region_info,
            P.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            P.Command.DEVICE_SET_IRQS: self._set_irqs,
            P.Command.REGION_READ: self._region_read,
            P.Command.REGION_WRITE: self._region_write,
            P.Command.DEVICE_RESET: self._reset,
        }
        try:
            handler = handlers.get(msg.command)  # type: ignore[call-overload]
            if handler is None:
                raise VfioUserError(f"command {msg.command} is not supported", errno=E.ENOTSUP)
            if not self.negotiated and msg.command != P.Command.VERSION:
                raise VfioUserError("VFIO_USER_VERSION must come first", errno=E.EINVAL)
            handler(msg)
        except VfioUserError as exc:
            log.debug("refused message %d: %s", msg.msg_id, exc)
            self._error(msg, exc.errno or E.EINVAL)
        except ModelError as exc:
            log.debug("model refused message %d: %s", msg.msg_id, exc)
            self._error(msg, E.EINVAL)
        except Exception as exc:  # a bug in a model must not take the server down
            log.exception("%s failed on message %d", self.model.name, msg.msg_id)
            self.model.fault(f"internal error in {self.model.name}: {exc!r}")
            self._error(msg, E.EIO)
        finally:
            msg.close_fds()

    def _error(self, msg: Message, errno: int) -> None:
        with contextlib.suppress(VfioUserError):
            self.ch.reply_error(msg, errno)

    def _reply(self, msg: Message, payload: bytes = b"") -> None:
        with contextlib.suppress(VfioUserError):  # the client left: the reader ends the session
            self.ch.reply(msg, payload)

    @staticmethod
    def _no_fds(msg: Message) -> None:
        if msg.fds:
            raise VfioUserError(f"{len(msg.fds)} unexpected file descriptor(s)", errno=E.EINVAL)

    # -- commands --------------------------------------------------------------------------

    def _version(self, msg: Message) -> None:
        self._no_fds(msg)
        if self.negotiated:
            raise VfioUserError("the version is already negotiated", errno=E.EINVAL)
        client = P.Negotiated.from_payload(msg.payload, "VFIO_USER_VERSION")
        if client.major != P.VERSION_MAJOR:
            # "If the client does not support the proposed major, it closes the connection";
            # we refuse the message and the client may propose another.
            raise VfioUserError(f"protocol major {client.major} is not supported", errno=E.ENOTSUP)
        self.client = client
        ours = P.Negotiated(
            minor=min(client.minor, P.VERSION_MINOR),
            max_msg_fds=SERVER_CAPS.max_msg_fds,
            max_data_xfer_size=SERVER_CAPS.max_data_xfer_size,
            max_dma_maps=SERVER_CAPS.max_dma_maps,
            pgsizes=SERVER_CAPS.pgsizes,
        )
        self.negotiated = True
        self._reply(msg, bytes(P.vfio_user_version(ours.major, ours.minor)) + ours.to_json())

    def _dma_map(self, msg: Message) -> None:
        req = P.parse(P.vfio_user_dma_map, msg.payload, "VFIO_USER_DMA_MAP")
        if req.flags & ~(P.DMA_FLAG_READ | P.DMA_FLAG_WRITE):
            raise VfioUserError(f"DMA_MAP: unknown flags {req.flags:#x}", errno=E.EINVAL)
        if req.size == 0 or req.addr + req.size > 1 << 64:
            raise VfioUserError(f"DMA_MAP: bad range {req.addr:#x}+{req.size:#x}", errno=E.EINVAL)
        if len(msg.fds) > 1:
            raise VfioUserError("DMA_MAP carries at most one file descriptor", errno=E.EINVAL)
        if len(self.dma) >= SERVER_CAPS.max_dma_maps:
            raise VfioUserError("too many DMA mappings", errno=E.ENOSPC)
        for r in self.dma:
            if req.addr < r.end and r.addr < req.addr + req.size:
                raise VfioUserError(
                    f"DMA_MAP {req.addr:#x}+{req.size:#x} overlaps {r.addr:#x}+{r.size:#x}",
                    errno=E.EEXIST,
                )
        mem = None
        if msg.fds:
            mem = self._mmap_client(msg.fds[0], req)
        self.dma.append(DmaRegion(req.addr, req.size, req.flags, mem))
        self._reply(msg)

    @staticmethod
    def _mmap_client(fd: int, req: P.vfio_user_dma_map) -> mmap.mmap:
        st = os.fstat(fd)
        # Touching pages past the end of a file is SIGBUS: refuse a file that is too short.
        if stat.S_ISREG(st.st_mode) and st.st_size < req.offset + req.size:
            raise VfioUserError(
                f"DMA_MAP: the fd holds {st.st_size} bytes, the mapping needs "
                f"{req.offset + req.size}",
                errno=E.EINVAL,
            )
        prot = (mmap.PROT_READ if req.flags & P.DMA_FLAG_READ else 0) | (
            mmap.PROT_WRITE if req.flags & P.DMA_FLAG_WRITE else 0
        )
        try:
            return mmap.mmap(
                fd, req.size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=req.offset
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise VfioUserError(
                f"DMA_MAP: cannot mmap the client's fd: {exc}", errno=E.EINVAL
            ) from None

    def _dma_unmap(self, msg: Message) -> None:
        self._no_fds(msg)
        req = P.parse(P.vfio_user_dma_unmap, msg.payload, "VFIO_USER_DMA_UNMAP")
        if req.flags:
            raise VfioUserError(f"DMA_UNMAP: flags {req.flags:#x} not supported", errno=E.ENOTSUP)
        with self.model.lock:  # no device work may be using it while it goes
            for i, r in enumerate(self.dma):
                if (r.addr, r.size) == (req.addr, req.size):
                    del self.dma[i]
                    if r.mem is not None:
                        with contextlib.suppress(BufferError):
                            r.mem.close()
                    break
            else:
                raise VfioUserError(
                    f"DMA_UNMAP {req.addr:#x}+{req.size:#x} matches no mapping", errno=E.ENOENT
                )
        self._reply(msg, bytes(req))

    def _device_info(self, msg: Message) -> None:
        self._no_fds(msg)
        req = P.parse(P.vfio_user_device_info, msg.payload, "VFIO_USER_DEVICE_GET_INFO")
        if req.argsz < ctypes.sizeof(P.vfio_user_device_info):
            raise VfioUserError(f"DEVICE_GET_INFO: argsz {req.argsz} < 16", errno=E.EINVAL)
        info = P.vfio_user_device_info(
            argsz=ctypes.sizeof(P.vfio_user_device_info),
            flags=V.VFIO_DEVICE_FLAGS_RESET | V.VFIO_DEVICE_FLAGS_PCI,
            num_regions=NUM_REGIONS,
            num_irqs=NUM_IRQS,
        )
        self._reply(msg, bytes(info))

    def _region_info(self, msg: Message) -> None:
        self._no_fds(msg)
        req = P.parse(P.vfio_region_info, msg.payload, "VFIO_USER_DEVICE_GET_REGION_INFO")
        if req.argsz < ctypes.sizeof(P.vfio_region_info):
            raise VfioUserError(f"DEVICE_GET_REGION_INFO: argsz {req.argsz} < 32", errno=E.EINVAL)
        if req.index >= NUM_REGIONS:
            raise VfioUserError(f"region {req.index} does not exist", errno=E.EINVAL)
        size = self.model.region_size(req.index)
        flags = V.VFIO_REGION_INFO_FLAG_READ | V.VFIO_REGION_INFO_FLAG_WRITE if size else 0
        bar = self.model.bars.get(req.index) if req.index < V.VfioPciRegion.ROM else None
        fds: tuple[int, ...] = ()
        if bar is not None and bar.fd >= 0:
            # A RAM BAR: "the reply will include a file descriptor in its meta-data".
            flags |= V.VFIO_REGION_INFO_FLAG_MMAP
            fds = (bar.fd,)
        info = P.vfio_region_info(
            argsz=ctypes.sizeof(P.vfio_region_info), flags=flags, index=req.index, size=size
        )
        with contextlib.suppress(VfioUserError):
            self.ch.reply(msg, bytes(info), fds=fds)

    def _irq_info(self, msg: Message) -> None:
        self._no_fds(msg)
        req = P.parse(P.vfio_irq_info, msg.payload, "VFIO_USER_DEVICE_GET_IRQ_INFO")
        if req.argsz < ctypes.sizeof(P.vfio_irq_info):
            raise VfioUserError(f"DEVICE_GET_IRQ_INFO: argsz {req.argsz} < 16", errno=E.EINVAL)
        if req.index >= NUM_IRQS:
            raise VfioUserError(f"IRQ index {req.index} does not exist", errno=E.EINVAL)
        flags = V.VFIO_IRQ_INFO_EVENTFD
        if req.index == V.VfioPciIrq.INTX:
            flags |= V.VFIO_IRQ_INFO_MASKABLE | V.VFIO_IRQ_INFO_AUTOMASKED
        elif req.index == V.VfioPciIrq.MSI:
            flags |= V.VFIO_IRQ_INFO_NORESIZE
        info = P.vfio_irq_info(
            argsz=ctypes.sizeof(P.vfio_irq_info),
            flags=flags,
            index=req.index,
            count=self.model.irq_count(req.index),
        )
        self._reply(msg, bytes(info))

    def _set_irqs(self, msg: Message) -> None:
        req = P.parse(P.vfio_irq_set, msg.payload, "VFIO_USER_DEVICE_SET_IRQS")
        hdr = ctypes.sizeof(P.vfio_irq_set)
        data_flags = req.flags & (V.VFIO_IRQ_SET_DATA_NONE | V.VFIO_IRQ_SET_DATA_BOOL | V.VFIO_IRQ_SET_DATA_EVENTFD)  # fmt: skip
        action = req.flags & (V.VFIO_IRQ_SET_ACTION_MASK | V.VFIO_IRQ_SET_ACTION_UNMASK | V.VFIO_IRQ_SET_ACTION_TRIGGER)  # fmt: skip
        if (
            req.flags & ~(data_flags | action)
            or bin(data_flags).count("1") != 1
            or bin(action).count("1") != 1
        ):
            raise VfioUserError(
                f"SET_IRQS: flags {req.flags:#x} need exactly one DATA_ and one ACTION_ flag",
                errno=E.EINVAL,
            )
        if req.index >= NUM_IRQS:
            raise VfioUserError(f"SET_IRQS: IRQ index {req.index} does not exist", errno=E.EINVAL)
        offered = self.model.irq_count(req.index)
        disable_all = (
            req.count == 0 and data_flags == V.VFIO_IRQ_SET_DATA_NONE
            and action == V.VFIO_IRQ_SET_ACTION_TRIGGER
        )  # fmt: skip
        if not disable_all and (req.count == 0 or req.start + req.count > offered):
            raise VfioUserError(
                f"SET_IRQS: vectors {req.start}..{req.start + req.count - 1} of index "
                f"{req.index}, which has {offered}",
                errno=E.EINVAL,
            )
        if data_flags == V.VFIO_IRQ_SET_DATA_BOOL:
            if len(msg.payload) < hdr + req.count:
                raise VfioUserError("SET_IRQS: DATA_BOOL without its bytes", errno=E.EINVAL)
            chosen = [req.start + i for i in range(req.count) if msg.payload[hdr + i]]
        else:
            chosen = list(range(req.start, req.start + req.count))
        if data_flags == V.VFIO_IRQ_SET_DATA_EVENTFD:
            if action != V.VFIO_IRQ_SET_ACTION_TRIGGER:
                raise VfioUserError("SET_IRQS: eventfds only for ACTION_TRIGGER", errno=E.ENOTSUP)
            if msg.fds and len(msg.fds) != req.count:
                raise VfioUserError(
                    f"SET_IRQS: {len(msg.fds)} eventfds for {req.count} vectors", errno=E.EINVAL
                )
        elif msg.fds:
            raise VfioUserError("SET_IRQS: file descriptors without DATA_EVENTFD", errno=E.EINVAL)
        if (
            req.index == V.VfioPciIrq.INTX
            and data_flags == V.VFIO_IRQ_SET_DATA_EVENTFD
            and msg.fds
            and self.model.intx_unmaskable_shared
        ):  # vfio-pci: request_irq of a shared line without PCI 2.3 masking fails
            raise VfioUserError("SET_IRQS: INTx is shared and cannot be masked", errno=E.EBUSY)
        with self.model.lock:
            if disable_all:
                self._set_fds(req.index, None)
            elif data_flags == V.VFIO_IRQ_SET_DATA_EVENTFD:
                fds = msg.take_fds()
                table = self.irq_fds.setdefault(req.index, [None] * offered)
                for i in range(req.count):
                    old = table[req.start + i]
                    if old is not None:
                        os.close(old)
                    table[req.start + i] = fds[i] if fds else None
                self._set_fds(req.index, table)
            elif action == V.VFIO_IRQ_SET_ACTION_TRIGGER:
                for v in chosen:  # the client triggers the interrupt itself
                    self._kick(req.index, v)
            elif req.index == V.VfioPciIrq.INTX:
                self.intx_masked = action == V.VFIO_IRQ_SET_ACTION_MASK
                if not self.intx_masked and self.model.intx_asserted:
                    self.set_intx(True)  # still asserted: fires again (automasked)
            else:
                raise VfioUserError("SET_IRQS: MASK/UNMASK only for INTx", errno=E.ENOTSUP)
        self._reply(msg)

    def _set_fds(self, index: int, table: list[int | None] | None) -> None:
        """Install the eventfds of ``index``; MSI/MSI-X enable follows, as vfio-pci does."""
        if table is None:
            for fd in self.irq_fds.pop(index, []):
                if fd is not None:
                    os.close(fd)
        active = table is not None and any(fd is not None for fd in table)
        if table is not None and not active:
            self.irq_fds.pop(index, None)
        cfg = self.model.config
        if index == V.VfioPciIrq.MSI:
            cfg.set_msi_enabled(active, len(table) if table else 1)
        elif index == V.VfioPciIrq.MSIX:
            # vfio-pci enables MSI-X and unmasks the vectors it was given eventfds for.
            cfg.set_msix_enabled(active)
            for v in range(self.model.irq_count(index)):
                self.model.msix_set_masked(
                    v, not (table and v < len(table) and table[v] is not None)
                )
        elif index == V.VfioPciIrq.INTX:
            self.intx_masked = False

    def _region_access(self, msg: Message, name: str) -> P.vfio_user_region_access:
        self._no_fds(msg)
        req = P.parse(P.vfio_user_region_access, msg.payload, name)
        if req.count == 0 or req.count > SERVER_CAPS.max_data_xfer_size:
            raise VfioUserError(f"{name}: count {req.count} out of range", errno=E.EINVAL)
        size = self.model.region_size(req.region) if req.region < NUM_REGIONS else 0
        if req.offset + req.count > size:
            raise VfioUserError(
                f"{name}: {req.count} bytes at {req.offset:#x} of region {req.region} "
                f"({size:#x} bytes)",
                errno=E.EINVAL,
            )
        return req

    def _region_read(self, msg: Message) -> None:
        req = self._region_access(msg, "VFIO_USER_REGION_READ")
        data = self.model.region_read(req.region, req.offset, req.count)
        self._reply(msg, bytes(req) + data)

    def _region_write(self, msg: Message) -> None:
        req = self._region_access(msg, "VFIO_USER_REGION_WRITE")
        data = msg.payload[ctypes.sizeof(req) :]
        if len(data) != req.count:
            raise VfioUserError(
                f"REGION_WRITE: count {req.count} but {len(data)} data bytes", errno=E.EINVAL
            )
        self.model.region_write(req.region, req.offset, data)
        self._reply(msg, bytes(req))

    def _reset(self, msg: Message) -> None:
        self._no_fds(msg)
        self.model.device_reset()
        self._reply(msg)

    # -- Host: what the model calls -------------------------------------------------------

    def _kick(self, index: int, vector: int) -> None:
        fds = self.irq_fds.get(index)
        fd = fds[vector] if fds and vector < len(fds) else None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def signal(self, index: int, vector: int) -> None:
        self._kick(index, vector)

    def set_intx(self, level: bool) -> None:
        # VFIO_IRQ_INFO_AUTOMASKED: the line masks itself when it fires; the client unmasks.
        if level and not self.intx_masked and self.irq_fds.get(V.VfioPciIrq.INTX):
            self._kick(V.VfioPciIrq.INTX, 0)
            self.intx_masked = True

    def _find(self, addr: int, size: int, write: bool) -> DmaRegion:
        for r in self.dma:
            if r.addr <= addr and addr + size <= r.end:
                need = P.DMA_FLAG_WRITE if write else P.DMA_FLAG_READ
                if not r.flags & need:
                    raise ModelError(
                        f"DMA {'write' if write else 'read'} at {addr:#x}: the client mapped "
                        f"{r.addr:#x}+{r.size:#x} {'read' if write else 'write'}-only"
                    )
                return r
        raise ModelError(f"DMA of {size} bytes at {addr:#x}: not in memory the client mapped")

    def dma_read(self, addr: int, size: int) -> bytes:
        r = self._find(addr, size, write=False)
        if r.mem is not None:
            return r.mem[addr - r.addr : addr - r.addr + size]
        out = bytearray()
        step = self.client.max_data_xfer_size or P.DEFAULT_MAX_DATA_XFER_SIZE
        while len(out) < size:
            n = min(step, size - len(out))
            acc = P.vfio_user_dma_region_access(addr=addr + len(out), count=n)
            reply = self._request(P.Command.DMA_READ, bytes(acc))
            data = reply[ctypes.sizeof(acc) :]
            if len(data) != n:
                raise ModelError(f"DMA_READ at {addr:#x}: the client sent {len(data)} of {n} bytes")
            out += data
        return bytes(out)

    def dma_write(self, addr: int, data: bytes) -> None:
        r = self._find(addr, len(data), write=True)
        if r.mem is not None:
            r.mem[addr - r.addr : addr - r.addr + len(data)] = data
            return
        step = self.client.max_data_xfer_size or P.DEFAULT_MAX_DATA_XFER_SIZE
        for at in range(0, len(data), step):
            chunk = data[at : at + step]
            acc = P.vfio_user_dma_region_access(addr=addr + at, count=len(chunk))
            self._request(P.Command.DMA_WRITE, bytes(acc) + chunk)

    def _request(self, command: int, payload: bytes) -> bytes:
        """A server-to-client command; its reply payload. Must not run on the handler thread
        (it waits for the reader)."""
        msg_id = next(self._ids) & 0xFFFF
        slot = _Pending()
        self._pending[msg_id] = slot
        try:
            try:
                self.ch.send(msg_id, command, payload)
            except VfioUserError as exc:
                raise ModelError(str(exc)) from None
            if not slot.event.wait(self.timeout) or slot.message is None:
                raise ModelError(
                    f"{P.Command(command).name}: no reply from the client within {self.timeout:g} s"
                )
            reply = slot.message
            reply.close_fds()
            if reply.is_error:
                raise ModelError(
                    f"{P.Command(command).name}: the client refused "
                    f"({os.strerror(reply.error_no) if reply.error_no else 'error'})"
                )
            return reply.payload
        finally:
            self._pending.pop(msg_id, None)


class Server:
    """Serve ``model`` at ``path`` until :meth:`stop` (or forever with :meth:`serve_forever`).

    Args:
        model: the device.
        path: the Unix socket to create. A stale socket file (nobody listening) is replaced.
        timeout: seconds for a message to arrive in full and for the client to answer DMA
            requests.

    Raises:
        VfioUserError: the path is in use by a live server or is not a socket.
    """

    def __init__(self, model: PciModel, path: str | Path, *, timeout: float = 5.0) -> None:
        self.model, self.path, self.timeout = model, str(path), timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connection: Connection | None = None
        self.connections = 0
        self.sock = self._listen()

    def _listen(self) -> socket.socket:
        p = Path(self.path)
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise VfioUserError(f"{self.path} exists and is not a socket; pick another path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                p.unlink()  # stale: nobody listens
            else:
                probe.close()
                raise VfioUserError(
                    f"{self.path}: another server is listening there; stop it or pick another path"
                )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise VfioUserError(f"cannot listen on {self.path}", errno=exc.errno) from None
        sock.settimeout(0.1)
        return sock

    def serve_forever(self) -> None:
        """Accept clients one after another until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn.setblocking(True)
            self.connections += 1
            session = Connection(
                self.model,
                Channel(conn, name=f"vfio-user client of {self.path}", timeout=self.timeout),
                timeout=self.timeout,
            )
            self.connection = session
            try:
                session.run()
            finally:
                self.connection = None

    def start(self) -> Server:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"vfio-user {self.path}", daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end the current session, remove the socket file."""
        self._stop.set()
        if self.connection is not None:
            self.connection.ch.close()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.model.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
