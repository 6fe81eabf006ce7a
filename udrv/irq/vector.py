"""One interrupt vector delivered to a file descriptor, with every way to wait on it.

VFIO signals an eventfd per vector; UIO makes ``/dev/uioN`` readable. Either way a vector
offers ``wait(timeout)`` (blocking), ``fileno()`` (select/epoll), ``await wait_async()``
(asyncio) and an optional handler thread (the seed's "separate thread waits for interrupts").
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import threading
import time
from collections.abc import Callable, Iterable

from udrv.errors import IrqError
from udrv.irq import affinity


class Vector:
    """An interrupt source.

    Args:
        fd: readable when the interrupt fired; non-blocking; ``read_count(fd)`` consumes the
            event and returns 0 when nothing is pending.
        name: for messages, e.g. ``"MSI 0 of 0000:00:04.0"``.
        read_count: returns how many interrupts were signalled since the last read (0 if
            another reader consumed the event first).
        rearm: re-enables a level interrupt once the driver acknowledged the device (INTx);
            None for edge/message interrupts.
        irq_name: the name of the kernel's handler that signals ``fd``, as
            ``/proc/interrupts`` lists it (:mod:`udrv.irq.affinity`); None where no kernel
            interrupt stands behind the vector (a vfio-user server's).
    """

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        read_count: Callable[[int], int],
        rearm: Callable[[], None] | None = None,
        irq_name: str | None = None,
    ) -> None:
        self.fd, self.name, self.irq_name = fd, name, irq_name
        self._read_count, self._rearm = read_count, rearm
        self._handler: threading.Thread | None = None
        self._stop_fd = -1
        self._stopping = threading.Event()
        self._handoff = _Handoff()
        self._async_waiting = False
        self._poller: select.poll | None = None
        self.handler_error: BaseException | None = None
        self.closed = False

    def fileno(self) -> int:
        """The fd to hand to select/poll/epoll: readable while an interrupt is pending."""
        return self.fd

    def _check_open(self) -> None:
        if self.closed:
            raise IrqError(f"{self.name} is disabled; enable the interrupts again to wait")

    def wait(self, timeout: float | None = None) -> int:
        """Block until the interrupt fires.

        Args:
            timeout: seconds; None waits forever, 0 only polls.

        Returns:
            How many interrupts were signalled since the last wait (0 on timeout).

        Raises:
            IrqError: the vector is disabled, or has a handler thread consuming its events.
        """
        if self.closed or self._handler is not None:
            self._refuse_wait()
        # Fast path: the interrupt is often pending already (the fd is non-blocking), and
        # one read is cheaper than poll + read.
        n = self._read_count(self.fd)
        if n or timeout == 0:
            return n
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = (
                None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1e3))
            )
            if self._poller.poll(left):
                n = self._read_count(self.fd)
                if n:
                    return n
            if deadline is not None and time.monotonic() >= deadline:
                return 0

    def _refuse_wait(self) -> None:
        self._check_open()
        raise IrqError(f"{self.name} has a handler thread; stop_handler() before wait()")

    def poll(self) -> int:
        """The count if the interrupt fired, else 0, without blocking."""
        return self.wait(0)

    async def wait_async(self) -> int:
        """``await vector.wait_async()``: the count, without blocking the event loop.

        Cancelling it (``asyncio.wait_for`` timeouts included) removes the reader from the
        loop and consumes nothing: a pending interrupt stays pending for the next wait.

        Raises:
            IrqError: disabled, or another coroutine is already waiting on this vector.
        """
        self._check_open()
        if self._async_waiting:
            raise IrqError(f"another coroutine is already waiting on {self.name}")
        n = self._read_count(self.fd)  # already pending: no trip through the event loop
        if n:
            return n
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def ready() -> None:
            if fut.done():
                return
            try:
                n = self._read_count(self.fd)
            except Exception as exc:
                fut.set_exception(exc)
                return
            if n:
                fut.set_result(n)

        self._async_waiting = True
        loop.add_reader(self.fd, ready)
        try:
            return await fut
        finally:
            loop.remove_reader(self.fd)
            self._async_waiting = False

    def rearm(self) -> None:
        """After acknowledging the device: let a level (INTx) interrupt fire again.

        A no-op for MSI/MSI-X. Call it after the device's own acknowledge (edu: INTR_ACK),
        or the line is still asserted and fires again at once.
        """
        if self._rearm is not None:
            self._rearm()

    def set_affinity(self, cpus: Iterable[int]) -> bool:
        """Have the kernel take this interrupt on ``cpus`` (the CPUs the thread that waits
        for it runs on), so that its eventfd wakes the waiter without an inter-processor
        interrupt. Returns False where the vector has no kernel interrupt to steer.

        Raises:
            IrqError: the vector is disabled, or the kernel refused (the message says why).
        """
        self._check_open()
        if self.irq_name is None:
            return False
        irq = affinity.find_irq(self.irq_name)
        if irq is None:
            raise IrqError(f"{self.name}: no interrupt called {self.irq_name} in "
                           f"{affinity.PROC_INTERRUPTS}; is the vector still enabled?")  # fmt: skip
        affinity.set_irq_affinity(irq, cpus, what=self.name)
        return True

    def start_handler(self, handler: Callable[[int], None], *, rearm: bool = True) -> None:
        """Run ``handler(count)`` on a dedicated thread for every interrupt.

        The handler must acknowledge the device; with ``rearm`` the vector is re-armed after
        it returns. An exception in the handler stops the thread and is re-raised by
        :meth:`stop_handler` (and so by :meth:`close` and ``dev.irq.disable()``).

        Raises:
            IrqError: the vector is disabled or already has a handler.
        """
        self._check_open()
        if self._handler is not None:
            raise IrqError(f"{self.name} already has a handler thread; stop_handler() first")
        self.handler_error = None
        # The thread owns a duplicate of the vector's fd: if a stuck handler outlives
        # stop_handler()'s timeout and the owner closes the vector's fd, the thread never
        # selects on a number the process may have reused for another file meanwhile. The
        # stop fd belongs to this object until a timeout hands it over to the thread.
        own_fd = os.dup(self.fd)
        stop_fd = self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        stopping = self._stopping = threading.Event()
        handoff = self._handoff = _Handoff()

        def loop() -> None:
            try:
                while not stopping.is_set():
                    r, _, _ = select.select([own_fd, stop_fd], [], [])
                    if stop_fd in r or stopping.is_set():
                        return
                    n = self._read_count(own_fd)
                    if not n:
                        continue
                    handler(n)
                    if rearm and not stopping.is_set():
                        self.rearm()
            except BaseException as exc:
                self.handler_error = exc
            finally:
                os.close(own_fd)
                handoff.thread_done(stop_fd)

        self._handler = threading.Thread(target=loop, name=f"irq {self.name}", daemon=True)
        self._handler.start()

    @property
    def handler_running(self) -> bool:
        return self._handler is not None and self._handler.is_alive()

    def stop_handler(self, timeout: float = 5.0) -> None:
        """Stop the handler thread (if any) and wait for it to end.

        Raises:
            IrqError: the handler raised (the original exception is chained), or the thread
                did not end within ``timeout`` (the handler is stuck; it ends, without
                touching the vector again, when the handler returns).
        """
        if self._handler is None:
            return
        thread, self._handler = self._handler, None
        self._stopping.set()
        os.eventfd_write(self._stop_fd, 1)
        thread.join(timeout)
        if not self._handoff.owner_done(self._stop_fd):
            self._stop_fd = -1
            raise IrqError(
                f"the handler thread of {self.name} did not stop within {timeout} s "
                "(the handler is stuck; the thread ends without touching the vector again "
                "when it returns)"
            )
        self._stop_fd = -1
        if self.handler_error is not None:
            err, self.handler_error = self.handler_error, None
            raise IrqError(f"interrupt handler of {self.name} failed: {err!r}") from err

    def close(self) -> None:
        """Stop the handler thread and mark the vector disabled; the owner (the backend's
        interrupts) closes the fd afterwards.

        Raises:
            IrqError: the handler thread had failed or did not stop (see
                :meth:`stop_handler`); the vector is disabled all the same.
        """
        self.closed = True
        self.stop_handler()

    def __repr__(self) -> str:
        state = " disabled" if self.closed else ""
        return f"<Vector {self.name}{state}>"


def eventfd_count(fd: int) -> int:
    """Read (and reset) a non-blocking eventfd's 64-bit counter; 0 when nothing is pending."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class _Handoff:
    """Who closes a handler thread's stop fd: the owner once the thread ended, or the
    thread itself when the owner gave up waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread_ended = self._owner_left = False

    def thread_done(self, stop_fd: int) -> None:
        with self._lock:
            self._thread_ended = True
            if self._owner_left:
                os.close(stop_fd)

    def owner_done(self, stop_fd: int) -> bool:
        """Close ``stop_fd`` if the thread ended (True), else leave it to the thread."""
        with self._lock:
            self._owner_left = True
            if self._thread_ended:
                os.close(stop_fd)
            return self._thread_ended
