"""Messages over a Unix stream socket: header + payload, file descriptors as SCM_RIGHTS.

Both the server and the client frame messages here. A message is read in two steps (the
16-byte header, then ``msg_size - 16`` bytes); descriptors may arrive with any part of it
and are collected. Sizes are bounded before anything is allocated, and once a header has
started to arrive the rest must follow within ``timeout``: a peer that stalls mid-message
or lies about its size cannot make us hang or allocate at will.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import socket
import threading
from dataclasses import dataclass, field

from udrv.errors import VfioUserError
from udrv.vfio_user import protocol as P

#: Largest message accepted: a full data transfer plus its access header, with room for a
#: region info reply carrying capabilities.
MAX_MESSAGE = P.HEADER_SIZE + P.DEFAULT_MAX_DATA_XFER_SIZE + 4096
#: Most descriptors taken from one message (the rest are closed on arrival).
MAX_FDS = 64


@dataclass
class Message:
    """One received message. ``fds`` belong to the receiver: close those it does not keep."""

    msg_id: int
    command: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & P.FLAG_TYPE_MASK == P.TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & P.FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & P.FLAG_ERROR)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def take_fds(self) -> list[int]:
        """The descriptors, now owned by the caller."""
        fds, self.fds = self.fds, []
        return fds


class PeerClosed(VfioUserError):
    """The peer closed the connection (between messages: a clean end)."""


class Channel:
    """One end of a vfio-user connection.

    Args:
        sock: a connected ``AF_UNIX`` ``SOCK_STREAM`` socket (owned from now on).
        name: for messages, e.g. ``"vfio-user:/tmp/edu.sock"``.
        timeout: seconds the rest of a message may take once its first byte arrived.
        max_message: the largest message accepted (header included).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        timeout: float = 5.0,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.sock, self.name, self.timeout, self.max_message = sock, name, timeout, max_message
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- sending --------------------------------------------------------------------------

    def send(
        self,
        msg_id: int,
        command: int,
        payload: bytes = b"",
        *,
        flags: int = P.TYPE_COMMAND,
        error_no: int = 0,
        fds: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Send one message (header built here) with ``fds`` attached to its first byte.

        Raises:
            VfioUserError: the socket failed (the peer went away: EPIPE/ECONNRESET).
        """
        hdr = P.vfio_user_header(
            msg_id=msg_id & 0xFFFF,
            command=command,
            msg_size=P.HEADER_SIZE + len(payload),
            flags=flags,
            error_no=error_no,
        )
        data = bytes(hdr) + bytes(payload)
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        with self._send_lock:
            try:
                sent = self.sock.sendmsg([data], anc)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            except OSError as exc:
                raise VfioUserError(
                    f"{self.name}: sending {_cmd_name(command)} failed (the peer went away?)",
                    errno=exc.errno,
                ) from None

    def reply(
        self, request: Message, payload: bytes = b"", *, fds: list[int] | tuple[int, ...] = ()
    ) -> None:
        """Acknowledge ``request`` (skipped if it asked for no reply)."""
        if not request.no_reply:
            self.send(request.msg_id, request.command, payload, flags=P.TYPE_REPLY, fds=fds)

    def reply_error(self, request: Message, errno: int) -> None:
        """An error reply: header only ("If an error occurs, the reply message must only
        include the reply header")."""
        if not request.no_reply:
            self.send(
                request.msg_id,
                request.command,
                flags=P.TYPE_REPLY | P.FLAG_ERROR,
                error_no=errno,
            )

    # -- receiving ------------------------------------------------------------------------

    def recv(self, idle_timeout: float | None = None) -> Message:
        """The next message.

        Args:
            idle_timeout: seconds to wait for the first byte (None: forever).

        Raises:
            PeerClosed: the peer closed the connection between messages.
            TimeoutError: nothing arrived within ``idle_timeout``.
            VfioUserError: a truncated or oversized message, or a stall mid-message (the
                connection is unusable afterwards: framing is lost).
        """
        fds: list[int] = []
        try:
            try:
                self.sock.settimeout(idle_timeout)
            except OSError:  # closed under us by close() on another thread
                raise PeerClosed(f"{self.name}: the connection is closed") from None
            head = self._recv_exact(P.HEADER_SIZE, fds, first=True)
            hdr = P.vfio_user_header.from_buffer_copy(head)
            if hdr.msg_size < P.HEADER_SIZE or hdr.msg_size > self.max_message:
                raise VfioUserError(
                    f"{self.name}: message {hdr.msg_id} ({_cmd_name(hdr.command)}) claims "
                    f"{hdr.msg_size} bytes; allowed are {P.HEADER_SIZE} to {self.max_message}",
                    errno=22,
                )
            self.sock.settimeout(self.timeout)
            payload = self._recv_exact(hdr.msg_size - P.HEADER_SIZE, fds)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return Message(hdr.msg_id, hdr.command, hdr.flags, hdr.error_no, payload, fds)

    def _recv_exact(self, n: int, fds: list[int], first: bool = False) -> bytes:
        buf = bytearray()
        anc_size = socket.CMSG_SPACE(MAX_FDS * ctypes.sizeof(ctypes.c_int))
        while len(buf) < n:
            try:
                data, anc, msg_flags, _ = self.sock.recvmsg(n - len(buf), anc_size)
            except TimeoutError:
                if first and not buf:
                    raise
                raise VfioUserError(
                    f"{self.name}: the peer stalled in the middle of a message "
                    f"({len(buf)} of {n} bytes after {self.timeout:g} s)",
                    errno=110,
                ) from None
            except OSError as exc:
                raise VfioUserError(f"{self.name}: receiving failed", errno=exc.errno) from None
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[: len(blob) - len(blob) % got.itemsize])
                    fds.extend(got)
            if msg_flags & socket.MSG_CTRUNC:
                raise VfioUserError(
                    f"{self.name}: more than {MAX_FDS} file descriptors in one message", errno=22
                )
            if not data:
                if first and not buf:
                    raise PeerClosed(f"{self.name}: the peer closed the connection")
                raise VfioUserError(
                    f"{self.name}: the peer closed the connection in the middle of a message "
                    f"({len(buf)} of {n} bytes)",
                    errno=104,
                )
            buf += data
            if first:
                # The message has started: the rest must follow promptly.
                self.sock.settimeout(self.timeout)
            first = False
        return bytes(buf)


def _cmd_name(command: int) -> str:
    try:
        return P.Command(command).name
    except ValueError:
        return f"command {command}"
