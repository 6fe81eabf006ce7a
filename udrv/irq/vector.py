"""One interrupt vector delivered to a file descriptor, with every way to wait on it.

VFIO signals an eventfd per vector; UIO makes ``/dev/uioN`` readable. Either way a vector
offers ``wait(timeout)`` (blocking), ``fileno()`` (select/epoll), ``await wait_async()``
(asyncio) and an optional handler thread (the seed's "separate thread waits for interrupts").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import Callable

from udrv.errors import IrqError


class Vector:
    """An interrupt source.

    Args:
        fd: readable when the interrupt fired; ``read_count(fd)`` consumes the event.
        name: for messages, e.g. ``"MSI 0 of 0000:00:04.0"``.
        read_count: returns how many interrupts were signalled since the last read.
        rearm: re-enables a level interrupt once the driver acknowledged the device (INTx);
            None for edge/message interrupts.
    """

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        read_count: Callable[[int], int],
        rearm: Callable[[], None] | None = None,
    ) -> None:
        self.fd, self.name = fd, name
        self._read_count, self._rearm = read_count, rearm
        self._handler: threading.Thread | None = None
        self._stop_r = self._stop_w = -1
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def wait(self, timeout: float | None = None) -> int:
        """Block until the interrupt fires; returns the count (0 on timeout)."""
        if self.closed:
            raise IrqError(f"{self.name} is disabled")
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return 0
        return self._read_count(self.fd)

    def poll(self) -> int:
        """The count if the interrupt fired, else 0, without blocking."""
        return self.wait(0)

    async def wait_async(self) -> int:
        """``await vector.wait_async()``; cancelling it leaves no reader registered."""
        if self.closed:
            raise IrqError(f"{self.name} is disabled")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                try:
                    fut.set_result(self._read_count(self.fd))
                except OSError as exc:
                    fut.set_exception(exc)

        loop.add_reader(self.fd, ready)
        try:
            return await fut
        finally:
            loop.remove_reader(self.fd)

    def rearm(self) -> None:
        """After acknowledging the device: let a level (INTx) interrupt fire again."""
        if self._rearm is not None:
            self._rearm()

    def start_handler(self, handler: Callable[[int], None], *, rearm: bool = True) -> None:
        """Run ``handler(count)`` on a dedicated thread for every interrupt.

        The handler must acknowledge the device; with ``rearm`` the vector is re-armed after
        it returns. An exception in the handler stops the thread and is re-raised by
        :meth:`stop_handler`.
        """
        if self._handler is not None:
            raise IrqError(f"{self.name} already has a handler thread")
        self._stop_r, self._stop_w = os.pipe()
        self.handler_error: BaseException | None = None

        def loop() -> None:
            while True:
                r, _, _ = select.select([self.fd, self._stop_r], [], [])
                if self._stop_r in r:
                    return
                try:
                    handler(self._read_count(self.fd))
                    if rearm:
                        self.rearm()
                except BaseException as exc:
                    self.handler_error = exc
                    return

        self._handler = threading.Thread(target=loop, name=f"irq {self.name}", daemon=True)
        self._handler.start()

    def stop_handler(self) -> None:
        if self._handler is None:
            return
        os.write(self._stop_w, b"x")
        self._handler.join(5)
        self._handler = None
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.handler_error is not None:
            err, self.handler_error = self.handler_error, None
            raise IrqError(f"interrupt handler of {self.name} failed: {err!r}") from err

    def close(self) -> None:
        with contextlib.suppress(IrqError):
            self.stop_handler()
        self.closed = True

    def __repr__(self) -> str:
        return f"<Vector {self.name}>"


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd's 64-bit counter."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
